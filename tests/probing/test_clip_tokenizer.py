"""CLIP's BPE tokenizer, shipped and offline: public token ids, the same tokens as the pipelines'
tokenizer (transformers' CLIPTokenizer on the same vocabulary), and the tokenize route."""

from __future__ import annotations

import gzip
import json

import pytest

from mergeprobe.probing.clip_tokenizer import CONTEXT_LENGTH, END, START, clip_tokenizer

PROMPTS = [
    "a photo of a cat",
    "A (masterpiece:1.2), [best quality], 1girl, solo, looking_at_viewer!!",
    "((emphasis)) [[de-emphasis]] {novelai} (word:0.8) BREAK, AND",
    "café naïve 東京タワー 🐱 — emoji & punctuation... isn't it?",
    "  multiple   spaces\tand\nnewlines ",
    "lora:myLora:0.8 <lora:x:1> <hypernet:y:0.5>",
    "it's we're they've I'm you'll he'd",
    "1234567890 3.14 -2e5",
    "e\u0301 combining, zero\u200bwidth, \u3000ideographic\u00a0space",
    "한국어 текст ελληνικά عربى İSTANBUL ǅ ß ΣΑΣ",
    " ".join(f"word{i}" for i in range(60)),  # past 77 tokens
]


def test_public_token_ids():
    tokenizer = clip_tokenizer()
    assert len(tokenizer.encoder) == 49408
    assert (tokenizer.encoder[START], tokenizer.encoder[END]) == (49406, 49407)
    # The ids every CLIP text encoder was trained on (OpenAI's CLIP README example).
    assert [t.id for t in tokenizer.tokens("a photo of a cat")] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert [t.text for t in tokenizer.tokens("A Photo of a CAT")][1:-1] == ["a", "photo", "of", "a", "cat"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_tokens_as_the_pipelines_tokenizer(tmp_path, prompt):
    """transformers' CLIPTokenizer (Rust tokenizers) on the vocabulary derived from the shipped merges:
    an independent implementation, and the one the workers' pipelines run."""
    from transformers import CLIPTokenizer

    ours = clip_tokenizer()
    (tmp_path / "vocab.json").write_text(json.dumps(ours.encoder))
    with gzip.open(_merges_path(), "rt", encoding="utf-8") as fh:
        (tmp_path / "merges.txt").write_text(fh.read())
    theirs = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert [t.id for t in ours.tokens(prompt)] == theirs(prompt)["input_ids"]


def _merges_path():
    from importlib import resources

    return resources.files("mergeprobe").joinpath("configs", "tokenizers", "clip_bpe_merges.txt.gz")


def test_the_shipped_merges_are_clips():
    with gzip.open(_merges_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    assert lines[0] == "#version: 0.2" and lines[1:3] == ["i n", "t h"] and len(lines) == 1 + 48894


def test_tokenize_route(client):
    response = client.post("/v1/archs/sdxl/tokenize", json={"prompt": "a (masterpiece:1.2) girl"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["arch"] == "sdxl" and body["context_length"] == CONTEXT_LENGTH and body["truncated"] is False
    assert [t["text"] for t in body["tokens"]] == [
        START,
        "a",
        "(",
        "masterpiece",
        ":",
        "1",
        ".",
        "2",
        ")",
        "girl",
        END,
    ]
    assert [t["position"] for t in body["tokens"]] == list(range(11))
    long = client.post("/v1/archs/sd1/tokenize", json={"prompt": PROMPTS[-1]}).json()
    assert long["truncated"] is True and len(long["tokens"]) > CONTEXT_LENGTH
    unknown = client.post("/v1/archs/sd9/tokenize", json={"prompt": "a"})
    assert unknown.status_code == 404 and unknown.json()["field"] == "arch"
    assert client.post("/v1/archs/sd1/tokenize", json={}).status_code == 422
