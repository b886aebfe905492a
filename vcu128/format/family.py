"""Model families: where a checkpoint keeps each tensor the board's layout names.

The pipeline names every tensor as HF Qwen2/Llama do (`model.layers.N.self_attn.q_proj`, ...,
`model.norm`, `model.embed_tokens.weight`, `lm_head`): the board's seven linears a layer, its two
norms, the final norm, the embedding and the output layer (FORMAT.md 3.3). A family says where its
checkpoints keep each of them: under the same name (qwen2, llama, mistral), or as output rows of a
fused tensor under names of its own (transformers' `glm`: `mlp.gate_up_proj`; ChatGLM2/3's remote
code: `transformer.encoder.layers.N.self_attention.query_key_value`, `mlp.dense_h_to_4h`, ...;
FORMAT.md 8). `aliases` turns a pipeline name into the checkpoint's tensor and row range, so every
step reads every family through one view (format.checkpoint.TensorView) and writes the same board
files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from vcu128.format.model import (  # noqa: F401 (the families are defined beside ModelDims, which names its own)
    CHATGLM,
    EMBEDDING,
    FAMILIES,
    FINAL_NORM,
    GLM,
    GLM_INTERLEAVED,
    LAYER_NORMS,
    LINEARS,
    LM_HEAD,
    QWEN2,
    ROTATE_HALF,
    Family,
    ModelDims,
    SourceLinear,
    family_of,
)


@dataclass(frozen=True)
class Alias:
    """Where a pipeline module lives in a checkpoint: `module`, output rows start..stop of it (None:
    all of it)."""

    module: str
    start: int | None = None
    stop: int | None = None


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


@lru_cache(maxsize=64)
def _layer_aliases(family: Family, dims: ModelDims) -> dict[str, Alias]:
    """Inside a layer: pipeline module -> its place (a fused tensor's rows in `parts` order)."""
    out = {}
    for src in family.linears:
        if len(src.parts) == 1:
            out[src.parts[0]] = Alias(src.module)
            continue
        row = 0
        for part in src.parts:
            lin = next(lin for lin in LINEARS if lin.module == part)
            chout = dims.linear_shape(lin)[1]
            out[part] = Alias(src.module, row, row + chout)
            row += chout
        out[fused_name(src)] = Alias(src.module)  # the fused tensor whole, under transformers' glm name
    for norm, _ in LAYER_NORMS:
        out[norm] = Alias(norm)
    return out


def fused_name(src: SourceLinear) -> str:
    """transformers' glm name of a fused linear (what quantize's calibration model calls it)."""
    if src.parts == ("mlp.gate_proj", "mlp.up_proj"):
        return "mlp.gate_up_proj"
    return "+".join(src.parts)


def module_alias(family: Family, dims: ModelDims, module: str) -> Alias | None:
    """The checkpoint's place of a pipeline module (`model.layers.3.self_attn.q_proj`, `model.norm`,
    `lm_head`, ...), or None where the family keeps no such module."""
    m = _LAYER.fullmatch(module)
    if m:
        inner = _layer_aliases(family, dims).get(m.group(2))
        return None if inner is None else Alias(f"{family.layer(int(m.group(1)))}.{inner.module}", inner.start, inner.stop)
    top = {FINAL_NORM: family.final_norm, LM_HEAD: family.output_layer, EMBEDDING.rpartition(".")[0]: family.embedding.rpartition(".")[0]}
    return Alias(top[module]) if module in top else None


def source_linears(family: Family, dims: ModelDims, layer: int) -> list[tuple[str, int, tuple[str, ...]]]:
    """A layer's linears as the checkpoint stores them: (tensor prefix, output rows, pipeline names of its parts)."""
    out = []
    for src in family.linears:
        rows = sum(dims.linear_shape(next(lin for lin in LINEARS if lin.module == p))[1] for p in src.parts)
        out.append((f"{family.layer(layer)}.{src.module}", rows, tuple(f"model.layers.{layer}.{p}" for p in src.parts)))
    return out


def tensor_places(family: Family, quantized: bool) -> re.Pattern:
    """The tensor names a checkpoint of the family may hold (FORMAT.md 1, 3.3 and 8); anything else
    (Qwen3's q_norm, a bias on the output layer, GLM-4's extra norms) has no place on the board."""
    prefix = re.escape(family.layer_prefix)
    linears = "|".join(re.escape(s.module) for s in family.linears)
    norms = "|".join(re.escape(n) for n, _ in LAYER_NORMS)
    gptq = r"(?:qweight|qzeros|scales|g_idx)"
    linear = rf"{prefix}\.(\d+)\.(?:{linears})"
    parts = [rf"{linear}\.(?:{gptq}|bias)" if quantized else rf"{linear}\.(?:weight|bias)", rf"{prefix}\.(\d+)\.(?:{norms})\.weight",
             *family.buffers]
    if quantized:
        parts.append(rf"{re.escape(family.output_layer)}\.{gptq}")
    return re.compile("^(?:" + "|".join(parts) + ")$")


def top_tensors(family: Family) -> set[str]:
    """The tensors outside the layers every checkpoint of the family may hold as floats."""
    return {f"{family.final_norm}.weight", family.embedding, f"{family.output_layer}.weight"}


# The axis of a tensor that holds a linear's output rows (GPTQ stores them transposed); None: shared by
# a fused linear's parts (its g_idx).
OUTPUT_AXIS = {"weight": 0, "bias": 0, "qweight": 1, "scales": 1, "qzeros": 1, "g_idx": None}


def to_source_names(tensors: dict, dims: ModelDims, concat) -> dict:
    """Tensors under the pipeline's names (`model.layers.0.self_attn.q_proj.qweight`, ...) to the
    family's own (`transformer.encoder.layers.0.self_attention.query_key_value.qweight`): a fused
    linear's parts joined in order along their output axis by `concat(list, axis)` (numpy or torch),
    every part present. The inverse of format.checkpoint.TensorView."""
    family = dims.family
    out, fused = {}, {}
    for name, t in tensors.items():
        module, _, part = name.rpartition(".")
        alias = module_alias(family, dims, module)
        if alias is None:
            out[name] = t
        elif alias.start is None:
            out[f"{alias.module}.{part}"] = t
        else:
            fused.setdefault(f"{alias.module}.{part}", []).append((alias.start, part, t))
    for source, parts in fused.items():
        parts.sort(key=lambda p: p[0])
        module = source.rpartition(".")[0].rpartition(".")[2]
        want = next(len(s.parts) for s in family.linears if s.module.endswith(module))
        if len(parts) != want:
            raise ValueError(f"{source}: {len(parts)} of its {want} parts given")
        axis = OUTPUT_AXIS[parts[0][1]]
        out[source] = parts[0][2] if axis is None else concat([t for _, _, t in parts], axis)
    return out


def rotary_dim(dims: ModelDims) -> int:
    """The channels of a head RoPE rotates: all of them, or GLM's first half."""
    return dims.head_dim // 2 if dims.family.rope == GLM_INTERLEAVED else dims.head_dim
