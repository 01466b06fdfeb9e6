"""CLIP's byte-level BPE tokenizer, offline, in pure Python: what every Stable Diffusion text
encoder reads (sd1's CLIP-L, sd2's OpenCLIP-H, sdxl's CLIP-L and OpenCLIP-bigG share it).

The merges ship with the project (`mergeprobe/configs/tokenizers/clip_bpe_merges.txt.gz`: the
48,894 merges CLIP uses, from OpenAI's MIT-licensed `bpe_simple_vocab_16e6.txt.gz` as carried by
open-clip-torch, in the `merges.txt` format of Hugging Face tokenizers); the vocabulary follows
from them deterministically: the 256 byte symbols, the same with `</w>`, one entry per merge, then
`<|startoftext|>` (49406) and `<|endoftext|>` (49407). Nothing is fetched.

Text is cleaned exactly as the workers' pipelines clean it (transformers' CLIPTokenizer): NFC,
runs of whitespace to one space, lower case. So the positions it reports are the positions of a
dump's attention maps. (OpenAI's original CLIP code also repairs broken unicode with ftfy and
unescapes HTML entities; there `&amp;` is `&`.)
"""

from __future__ import annotations

import functools
import gzip
import json
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import regex

START, END = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77  # tokens a text encoder reads, start and end included
_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@dataclass(frozen=True)
class Token:
    position: int  # in the encoder's input: 0 is the start token
    id: int
    text: str  # the BPE symbol, `</w>` (end of word) removed


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters, which CLIP's vocabulary uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def clip_vocab(merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's vocabulary layout for a list of merges: the 256 byte symbols, the same with `</w>`,
    one token per merge, then the start and end tokens (ids are list positions)."""
    symbols = list(bytes_to_unicode().values())
    return symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """`symbols` with every adjacent occurrence of `pair` joined into one symbol, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


_WHITESPACE = regex.compile(r"\p{White_Space}+")


def _cleaned(text: str) -> str:
    # Lower case one character at a time, as the Rust tokenizers do: no final-sigma rule.
    return "".join(char.lower() for char in _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)))


class ClipTokenizer:
    def __init__(self, merges: list[tuple[str, str]]) -> None:
        self.byte_encoder = bytes_to_unicode()
        vocab = clip_vocab(merges)
        self.encoder = {symbol: index for index, symbol in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one tokenizer per process (`clip_tokenizer()`)
    def _bpe(self, word: str) -> tuple[str, ...]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            parts = merge_pair(parts, best)
        return tuple(parts)

    def ids(self, text: str) -> list[int]:
        """The token ids of `text`, without the start and end tokens."""
        cleaned = _cleaned(text)
        ids: list[int] = []
        for word in _WORDS.findall(cleaned):
            if word in (START, END):
                ids.append(self.encoder[word])
                continue
            symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[part] for part in self._bpe(symbols))
        return ids

    def tokens(self, text: str) -> list[Token]:
        """Every token the text encoder would see, start and end included (a prompt may run past
        CONTEXT_LENGTH: the pipelines cut it there)."""
        ids = [self.encoder[START], *self.ids(text), self.encoder[END]]
        return [
            Token(i, token_id, self.decoder[token_id].replace("</w>", "")) for i, token_id in enumerate(ids)
        ]


def _merges_text() -> str:
    """The shipped merges file: Hugging Face's merges.txt (a version line, then one merge a line)."""
    data = (
        resources.files("mergeprobe").joinpath("configs", "tokenizers", "clip_bpe_merges.txt.gz").read_bytes()
    )
    return gzip.decompress(data).decode("utf-8")


@functools.cache
def clip_tokenizer() -> ClipTokenizer:
    lines = _merges_text().splitlines()
    return ClipTokenizer([tuple(line.split()) for line in lines[1:] if line])  # type: ignore[misc]


def write_vocabulary_files(directory: Path) -> None:
    """Write `vocab.json` and `merges.txt`, the two files transformers' CLIPTokenizer reads, derived
    from the shipped merges: every CLIP tokenizer (sd1, sd2, both of sdxl's) has this vocabulary."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(
        json.dumps(clip_tokenizer().encoder, ensure_ascii=False), encoding="utf-8"
    )
    (directory / "merges.txt").write_text(_merges_text(), encoding="utf-8")
