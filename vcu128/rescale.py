"""fp16 rescaling (FORMAT.md 7): power-of-two factors that keep a model's activations inside the
fp16 range the board stores them in.

- The MLP intermediate by 2^-m (per layer): up_proj's scales and bias times 2^-m, down_proj's
  scales times 2^m. Exact: nothing non-linear lies between them.
- The residual stream by 2^-k (one k for the model: the stream runs through every layer):
  embedding rows, o_proj's and down_proj's scales and biases times 2^-k. RMSNorm cancels it,
  except for its eps, which the board fixes at 1e-6: k moves the logits a little, so the smallest k
  that fits is measured in board numerics against saturating instead, and the better one kept.

Sites that no factor reaches (q, k, v, the gate before SiLU) and whose fp32 statistics pass 65504
are refused. The factors are applied by compile_sw.py (so every later file holds them) and
recorded in compile/config.json, compile_sw.json and the packed folder's manifest.json.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np

from .errors import VCUError
from .stats import FP16_MAX

log = logging.getLogger("vcu128")

CONFIG_KEY = "vcu128_fp16_rescale"
RESIDUAL_SITES = ("residual_attention", "residual_mlp", "o", "down")  # scaled by 2^-k
MLP_SITES = ("up", "mlp_product")  # scaled by 2^-m
UNREACHED_SITES = ("q", "k", "v", "gate")  # no factor reaches them
TRIGGER = FP16_MAX / 2  # a site above half the fp16 range is rescaled ...
TARGET = FP16_MAX / 4  # ... until it has 4x headroom
MODES = ("auto", "off", "measure")


def parse_mode(text: str) -> tuple[str, dict | None]:
    """'auto' | 'off' | 'measure' | 'k=K,m=M' (explicit factors, m for every layer)."""
    if text in MODES:
        return text, None
    m = re.fullmatch(r"k=(\d+)(?:,m=(\d+))?", text.replace(" ", ""))
    if not m:
        raise VCUError(f"--fp16_rescale {text}: expected auto, off, measure or k=K,m=M (non-negative integers)")
    return "explicit", {"k": int(m.group(1)), "m": int(m.group(2) or 0)}


def steps_needed(value: float) -> int:
    """The smallest power of two that brings |value| under TARGET."""
    if not value > TRIGGER:
        return 0
    if not math.isfinite(value):
        raise VCUError("fp16 statistics hold an inf or NaN: the model overflowed where it was measured (measure in fp32: --fp16_rescale measure)")
    return max(0, math.ceil(math.log2(value / TARGET)))


def plan_from_stats(stats: dict, num_layers: int) -> dict:
    """{'k': K, 'm': [m per layer], 'why': [...]} from per-layer site statistics; refuses sites
    that no factor reaches and that pass the fp16 range."""
    # A non-finite maximum is written to JSON as null: read it back as inf, not as 0.
    layers = {row["layer"]: {site: float("inf") if v is None else v for site, v in row["max_abs"].items()}
              for row in stats.get("layers", []) if isinstance(row, dict)}
    why = []
    for layer, sites in sorted(layers.items()):
        for site in UNREACHED_SITES:
            if sites.get(site, 0.0) > FP16_MAX:
                raise VCUError(f"layer {layer}, {site}: largest |value| {sites[site]} passes the fp16 range and "
                               "no rescaling factor reaches this site (the board would saturate it)",
                               "pass --fp16_rescale off to export anyway")
    residual = max((sites.get(s) or 0.0 for sites in layers.values() for s in RESIDUAL_SITES), default=0.0)
    k = steps_needed(residual)
    if k:
        why.append(f"residual stream up to {residual:.4g}: k = {k}")
    ms = []
    for layer in range(num_layers):
        sites = layers.get(layer, {})
        m = steps_needed(max((sites.get(s) or 0.0) for s in MLP_SITES))
        if m:
            why.append(f"layer {layer} MLP intermediate up to {max(sites.get(s) or 0.0 for s in MLP_SITES):.4g}: m = {m}")
        ms.append(m)
    return {"k": k, "m": ms, "why": why}


def module_factors(plan: dict | None, layer: int) -> dict:
    """{module: power of two} for one layer's linears."""
    if not plan:
        return {}
    k, m = plan.get("k", 0), (plan.get("m") or [0] * (layer + 1))[layer]
    out = {"self_attn.o_proj": 2.0**-k, "mlp.up_proj": 2.0**-m, "mlp.down_proj": 2.0 ** (m - k)}
    return {mod: f for mod, f in out.items() if f != 1.0}


def is_identity(plan: dict | None) -> bool:
    return not plan or (plan.get("k", 0) == 0 and not any(plan.get("m") or []))


def scale_fp16(values: np.ndarray, factor: float, counter: dict) -> np.ndarray:
    """fp16 values times a power of two: exact unless the result leaves fp16's normal range
    (counted: a subnormal or zero result loses bits, an overflow saturates)."""
    if factor == 1.0:
        return values
    out = values.astype(np.float32) * np.float32(factor)
    normal_before = np.abs(values.astype(np.float32)) >= 2.0**-14
    lost = normal_before & ((np.abs(out) < 2.0**-14) | (np.abs(out) > FP16_MAX))
    counter["out_of_normal_range"] = counter.get("out_of_normal_range", 0) + int(lost.sum())
    return np.clip(out, -FP16_MAX, FP16_MAX).astype(np.float16)


def measure_stats(qdir: Path, tokens: np.ndarray) -> dict:
    """The fp32 checkpoint model's site statistics on `tokens` (streamed, a layer at a time)."""
    from .functional import evaluate_plan

    stats, _ = evaluate_plan(qdir, tokens, None, reference_only=True)
    return stats


def choose_k(qdir: Path, tokens: np.ndarray, plan: dict) -> tuple[dict, dict]:
    """With k > 0: the board-numerics logits with the planned factors and with k = 0 (saturating
    instead), each against the fp32 checkpoint model; keep the plan that moves the logits less."""
    from .functional import evaluate_plan

    without = {**plan, "k": 0}
    _, scaled = evaluate_plan(qdir, tokens, plan)
    _, saturating = evaluate_plan(qdir, tokens, without)
    report = {"with_k": scaled, "saturating_instead": saturating}
    keep = plan if scaled["relative_logit_error"] <= saturating["relative_logit_error"] else without
    report["kept"] = "with_k" if keep is plan else "saturating_instead"
    return keep, report


def evaluation_tokens(qdir: Path, vocab: int, text: Path | None, count: int = 128) -> tuple[np.ndarray, str]:
    """Tokens to measure on: the text (default the demo corpus) with the checkpoint's tokenizer, or
    seeded ids when it has none."""
    from .verify import evaluation_inputs

    inputs = evaluation_inputs(qdir, vocab, text, None, "", count)
    return inputs.eval_ids, inputs.source
