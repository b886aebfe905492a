"""Group-wise int4 quantization of a float matrix (the output layer), FORMAT.md 2 "lm_head quantization"."""

from __future__ import annotations

import numpy as np

from vcu128.format.model import GROUP_SIZE

METHODS = ("rtn", "trunc")


def group_scales(w: np.ndarray, qmin: int = -8) -> np.ndarray:
    """float32 [rows, groups]: max/7 when the max reaches |min|, else |min|/8, one float32 division
    each; on the 15-level grid (qmin -7) max|w| / 7."""
    mx = w.max(axis=-1)
    mn_abs = np.abs(w.min(axis=-1))
    if qmin == -7:
        return (np.maximum(mx, mn_abs) / np.float32(7)).astype(np.float32)
    return np.where(mx >= mn_abs, mx / np.float32(7), mn_abs / np.float32(8)).astype(np.float32)


def quantize_rows(weight: np.ndarray, method: str, qmin: int = -8) -> tuple[np.ndarray, np.ndarray]:
    """float [rows, cols] to (int8 q [rows, cols] in -8..7, fp16 scales [rows, cols/128]).

    `trunc` is the original rule kept bit-exact: q = trunc(float32(w) / float32 scale), one IEEE
    division per weight. `rtn` rounds the same quotient to nearest (ties to even) and clamps to -8..7,
    so its error is never larger. Both store fp16(scale), as the board reads it, and both give
    q = 0 where the scale is 0 (an all-zero group; the original divided by zero there).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    rows, cols = weight.shape
    q = np.empty((rows, cols), np.int8)
    scales = np.empty((rows, cols // GROUP_SIZE), np.float16)
    # Row by row the arithmetic is the same; a strip of rows at a time (256 kB of float32) keeps the
    # temporaries of its passes in the cache: 1.5 times faster than whole blocks of 32 MB.
    strip = max(1, (1 << 16) // max(1, cols))
    for r in range(0, rows, strip):
        q[r : r + strip], scales[r : r + strip] = _quantize_strip(weight[r : r + strip], method, qmin)
    return q, scales


def _quantize_strip(weight: np.ndarray, method: str, qmin: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = weight.shape
    w = weight.astype(np.float32, copy=False).reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    scale = group_scales(w, qmin)
    # Dividing by +inf where the scale is 0 gives q = 0 there without a second pass.
    divisor = np.where(scale == 0, np.float32(np.inf), scale)[..., None]
    quotient = np.divide(w, divisor)  # float32 / float32: a true IEEE division, not a reciprocal multiply
    (np.trunc if method == "trunc" else np.rint)(quotient, out=quotient)
    np.clip(quotient, qmin, 7, out=quotient)
    with np.errstate(over="ignore"):  # a scale past fp16's range becomes inf: the caller refuses it by row
        return quotient.astype(np.int8).reshape(rows, cols), scale.astype(np.float16)


def dequantize_rows(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """What the board computes with: q * fp16 scale, as float32 [rows, cols] (a strip of rows at a
    time, in the cache: the same products)."""
    rows, cols = q.shape
    w = np.empty((rows, cols // GROUP_SIZE, GROUP_SIZE), np.float32)
    strip = max(1, (1 << 16) // max(1, cols))
    for r in range(0, rows, strip):
        qs = q[r : r + strip].reshape(-1, cols // GROUP_SIZE, GROUP_SIZE).astype(np.float32)
        np.multiply(qs, scales[r : r + strip].astype(np.float32)[..., None], out=w[r : r + strip])
    return w.reshape(rows, cols)


def squared_error(w: np.ndarray, w_hat: np.ndarray) -> tuple[float, float]:
    """(||w - w_hat||^2, ||w||^2), each a float32 BLAS dot summed in float64 across blocks by the caller."""
    w = w.astype(np.float32, copy=False).ravel()
    diff = w - w_hat.ravel()
    return float(np.dot(diff, diff)), float(np.dot(w, w))
