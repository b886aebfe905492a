"""fp16 rescaling (FORMAT.md 7), the rules that choose a plan: power-of-two factors that keep a
model's activations inside the fp16 range the board stores them in. What a plan means for the bytes
is `format.rescale`; the search for k in board numerics is `check.rescale_search`.

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

from vcu128.board.stats import SITES
from vcu128.format.rescale import FP16_MAX, MAX_EXPONENT, RescalePlan
from vcu128.io.errors import VCUError

log = logging.getLogger("vcu128")

RESIDUAL_SITES = ("residual_attention", "residual_mlp", "o", "down")  # scaled by 2^-k
MLP_SITES = ("up", "mlp_product")  # scaled by 2^-m
UNREACHED_SITES = ("q", "k", "v", "gate")  # no factor reaches them
TRIGGER = FP16_MAX / 2  # a site above half the fp16 range is rescaled ...
TARGET = FP16_MAX / 4  # ... until it has 4x headroom
MODES = ("auto", "off", "measure")
assert set(RESIDUAL_SITES + MLP_SITES + UNREACHED_SITES) <= set(SITES)


def parse_mode(text: str) -> tuple[str, dict | None]:
    """'auto' | 'off' | 'measure' | 'k=K,m=M' (explicit factors, m for every layer)."""
    if text in MODES:
        return text, None
    m = re.fullmatch(r"k=(\d+)(?:,m=(\d+))?", text.replace(" ", ""))
    if not m:
        raise VCUError(f"--fp16_rescale {text}: expected auto, off, measure or k=K,m=M (non-negative integers)")
    k, mm = int(m.group(1)), int(m.group(2) or 0)
    if max(k, mm) > MAX_EXPONENT:
        raise VCUError(f"--fp16_rescale {text}: k and m go up to {MAX_EXPONENT} (2^{MAX_EXPONENT} moves every fp16 value out of range)")
    return "explicit", {"k": k, "m": mm}


def steps_needed(value: float) -> int:
    """The smallest power of two that brings |value| under TARGET."""
    if not value > TRIGGER:
        return 0
    if not math.isfinite(value):
        raise VCUError("fp16 statistics hold an inf or NaN: the model overflowed where it was measured (measure in fp32: --fp16_rescale measure)")
    return max(0, math.ceil(math.log2(value / TARGET)))


def plan_from_stats(stats: dict, num_layers: int, statistics: str | None = None) -> RescalePlan:
    """The plan that per-layer site statistics call for; refuses sites that no factor reaches and
    that pass the fp16 range."""
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
    return RescalePlan(k, tuple(ms), tuple(why), statistics)
