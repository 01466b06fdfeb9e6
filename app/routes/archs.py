from __future__ import annotations

from fastapi import APIRouter

from app.schemas import (
    ArchInfo,
    ArchList,
    BlockList,
    ElementTable,
    ProblemModel,
    TokenizeRequest,
    TokenList,
    TokenModel,
)
from mergeprobe.checkpoints.archs import ARCHITECTURES, Architecture
from mergeprobe.checkpoints.elements import element_table_document
from mergeprobe.probing.clip_tokenizer import CONTEXT_LENGTH, clip_tokenizer
from mergeprobe.service.problems import Problem

router = APIRouter(prefix="/v1/archs", tags=["architectures"])


def _arch(name: str) -> Architecture:
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise Problem(
            404,
            "unknown-architecture",
            "Unknown architecture",
            f"no architecture {name!r}; known: {', '.join(ARCHITECTURES)}",
            field="arch",
        )
    return arch


@router.get(
    "", response_model=ArchList, summary="Supported architectures and their blocks", operation_id="listArchs"
)
def list_archs() -> ArchList:
    return ArchList(
        archs=[
            ArchInfo(
                name=a.name,
                title=a.title,
                blocks=list(a.unet_blocks),
                textless_blocks=sorted(a.textless_blocks),
            )
            for a in ARCHITECTURES.values()
        ]
    )


@router.get(
    "/{arch}/blocks",
    response_model=BlockList,
    summary="Block names of an architecture in U-Net order",
    operation_id="listArchBlocks",
    responses={404: {"model": ProblemModel}},
)
def arch_blocks(arch: str) -> BlockList:
    return BlockList(arch=arch, blocks=list(_arch(arch).unet_blocks))


@router.get(
    "/{arch}/elements",
    response_model=ElementTable,
    summary="Element names of every block (for elemental specs)",
    operation_id="getArchElements",
    description="The key of every tensor of a real full-size checkpoint, relative to its block "
    "(`1.transformer_blocks.0.attn2.to_k.weight`), per U-Net block. Elemental entries match substrings "
    "of these; for BASE the element is the full key.",
    responses={404: {"model": ProblemModel}},
)
def arch_elements(arch: str) -> dict:
    _arch(arch)
    return element_table_document(arch)


@router.post(
    "/{arch}/tokenize",
    response_model=TokenList,
    summary="The tokens a prompt becomes (to pick token positions for attention maps)",
    operation_id="tokenizePrompt",
    description="CLIP's byte-level BPE, shipped with the service (no download): the same tokens, ids and "
    "positions as the text encoders of a dump or sweep on this architecture read, so a dump's attention "
    "maps and token heatmaps can be matched to words.",
    responses={
        400: {"model": ProblemModel, "description": "Invalid JSON, or a non-finite number"},
        404: {"model": ProblemModel},
        422: {"model": ProblemModel},
    },
)
def tokenize(arch: str, body: TokenizeRequest) -> TokenList:
    _arch(arch)
    tokens = clip_tokenizer().tokens(body.prompt)
    return TokenList(
        arch=arch,
        tokens=[TokenModel(position=t.position, id=t.id, text=t.text) for t in tokens],
        context_length=CONTEXT_LENGTH,
        truncated=len(tokens) > CONTEXT_LENGTH,
    )
