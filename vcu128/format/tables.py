"""The board's two global tables (FORMAT.md 5): the RoPE table and the SiLU table, made from the
model's config.json, with their readers beside the writers.

RoPE: `pos_in_4_token{MAX_TOKEN}_ch32.bin`, per position t a row of 128 fp16 values stored in four
blocks of 32 channels (value c of position t at byte ((c // 32) * MAX_TOKEN + t) * 64 + (c % 32) * 2).
The frequencies and the fp32 arithmetic are transformers' (`rope_theta`, head_dim, `rope_scaling`
none / linear / llama3). What a row holds is not established from public code, so it is an option:
`halves` (64 cosines, then 64 sines) or `pairs` (cos, sin of each frequency, interleaved).

SiLU: `ACT_parameter_in_DDR.bin`, 16 segments of a piecewise-linear function in three 64-byte beats
(slopes, offsets, breakpoints; 16 fp16 each, then 32 zero bytes), zero-filled to 8192 bytes. `board`
is the table the accelerator's public host code loads, bit for bit; `fit` is this project's own
minimax fit over the range the model's gate outputs take.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vcu128.format.constants import DEFAULT_MAX_TOKEN, ROPE_ORDERS, SILU_TABLES  # noqa: F401 (their home is constants.py)
from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import get_float, get_int

BOARD_HEAD_DIM = 128  # the board's head: its RoPE unit rotates 128 channels
ROPE_CHANNELS_PER_BLOCK = 32
DEFAULT_ROPE_ORDER = "halves"  # FORMAT.md 5: the driver's head stride is half the file (two halves of 64)
# FORMAT.md 8: ChatGLM's RoPE rotates the first 64 channels of a head in pairs; the testbench reference
# (tasks_EMB.vh) reads 64 values a position, cos and sin of each pair interleaved, and the host test
# (HBM_emb_test.cpp) zero-pads the table to the full 128.
GLM_ROPE_ORDER = "glm"
ROPE_ORDERS_OF = {"rotate_half": ("halves", "pairs"), "glm_interleaved": (GLM_ROPE_ORDER,)}


# The most positions a RoPE table may hold: 2^24. Two limits meet there. The table's phases are
# float32(t) * inv_freq, and float32 holds every whole position exactly only up to 2^24 (past it,
# neighbouring positions share a phase); and the table is 256 bytes a position, so 2^24 positions
# are 4 GiB, all that a 32-bit byte address (the board's DDR/HBM port addresses) reaches.
MAX_TOKEN_LIMIT = 1 << 24
ROPE_BYTES_A_POSITION = BOARD_HEAD_DIM * 2


def check_max_token(max_token) -> None:
    if isinstance(max_token, bool) or not isinstance(max_token, int) or not 1 <= max_token <= MAX_TOKEN_LIMIT:
        raise VCUError(f"--max_token {max_token}: expected 1 to {MAX_TOKEN_LIMIT} (2^24: float32 positions are exact up to there, "
                       f"and the table, {ROPE_BYTES_A_POSITION} bytes a position, then fills the board's 32-bit address space)")


def rope_file_name(max_token: int) -> str:
    return f"pos_in_4_token{max_token}_ch32.bin"


def _positive(doc: dict, key: str, where: Path, name: str, above: float = 0.0) -> float:
    value = get_float(doc, key, where, name=name)
    if value is None:
        raise VCUError(f"{where}: missing '{name}'")
    if not value > above:
        raise VCUError(f"{where}: '{name}' is {value!r}, expected a number above {above:g}")
    return value


def rope_values(cfg: dict, where: Path) -> tuple[float, dict]:
    """(theta, scaling) from a config, old style (rope_theta, rope_scaling) or transformers 5's
    rope_parameters, every value the table is computed from checked (a theta of 0, below 1, NaN or
    not a number, a scaling factor of 0 ...: one error naming the key), whatever the scaling type.
    ChatGLM2/3's remote-code config has rope_ratio instead: theta is 10000 x rope_ratio (absent: 1)."""
    if cfg.get("model_type") == "chatglm":
        ratio = get_float(cfg, "rope_ratio", where, default=1.0)
        if not ratio > 0:
            raise VCUError(f"{where}: 'rope_ratio' is {ratio!r}, expected a number above 0")
        return 10000.0 * ratio, {"rope_type": "default"}
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise VCUError(f"{where}: 'rope_parameters' is {params!r}, expected an object or null")
    params = dict(params or {})
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise VCUError(f"{where}: 'rope_scaling' is {scaling!r}, expected an object or null")
    scaling = dict(scaling or {})
    merged = {**scaling, **params}
    source = {**{k: "rope_scaling" for k in scaling}, **{k: "rope_parameters" for k in params}}
    named = lambda key: f"{source[key]}.{key}" if key in source else key  # noqa: E731
    if "rope_theta" in merged and merged["rope_theta"] is not None:
        # theta^(2i/128) with theta <= 1 gives frequencies that rise along the head: no model has one
        theta = _positive(merged, "rope_theta", where, named("rope_theta"), above=1.0)
    elif cfg.get("rope_theta") is not None:
        theta = _positive(cfg, "rope_theta", where, "rope_theta", above=1.0)
    else:
        theta = 10000.0
    kind = merged.get("rope_type", merged.get("type")) or "default"
    if not isinstance(kind, str):
        raise VCUError(f"{where}: '{named('rope_type' if 'rope_type' in merged else 'type')}' is {kind!r}, expected a string")
    if kind in ("linear", "llama3"):
        _positive(merged, "factor", where, named("factor"))
    if kind == "llama3":
        low = _positive(merged, "low_freq_factor", where, named("low_freq_factor"))
        high = _positive(merged, "high_freq_factor", where, named("high_freq_factor"))
        if high == low:
            raise VCUError(f"{where}: '{named('high_freq_factor')}' equals '{named('low_freq_factor')}' ({low}): llama3 scaling divides by their difference")
        get_int(merged, "original_max_position_embeddings", where, name=named("original_max_position_embeddings"))
    return theta, {**merged, "rope_type": kind}


def rope_parameters(cfg: dict, where: Path) -> tuple[float, dict]:
    """rope_values, and refused unless a static table can hold the scaling type."""
    theta, scaling = rope_values(cfg, where)
    kind = scaling["rope_type"]
    if kind not in ("default", "linear", "llama3"):
        raise VCUError(f"{where}: rope scaling {kind!r}: a static RoPE table holds only none, linear or llama3 "
                       "(dynamic and YaRN scaling change with the sequence)")
    return theta, scaling


def rope_inv_freq(cfg: dict, head_dim: int, where: Path) -> np.ndarray:
    """The inverse frequencies [head_dim / 2] in float32, as transformers computes them
    (`1.0 / theta ** (arange(0, d, 2).float() / d)`, then the linear or llama3 scaling), every step a
    float32 operation but the power, which is taken correctly rounded (through float64): torch's
    float32 pow may be an ulp off there, and which ulp depends on the CPU's vector unit. The table is
    then a function of config.json alone, the same on every machine."""
    theta, scaling = rope_parameters(cfg, where)
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / (theta ** exponent.astype(np.float64)).astype(np.float32)
    kind = scaling["rope_type"]
    if kind == "linear":
        inv_freq = inv_freq / np.float32(get_float(scaling, "factor", where))
    elif kind == "llama3":  # transformers' _compute_llama3_parameters, in float32 as there
        factor = np.float32(get_float(scaling, "factor", where))
        low, high = np.float32(get_float(scaling, "low_freq_factor", where)), np.float32(get_float(scaling, "high_freq_factor", where))
        old_len = np.float32(get_int(scaling, "original_max_position_embeddings", where))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(cfg: dict, head_dim: int, positions: int, where: Path, start: int = 0, inv_freq=None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, head_dim / 2] (of positions start .. start + positions - 1) as fp16: the
    phase float32(t) * inv_freq in float32 as a model's forward computes it, its cos and sin in float64
    rounded once to fp16 (the same bytes on any CPU, any thread count). Element by element: a block of
    positions is exactly those rows of the whole."""
    inv_freq = rope_inv_freq(cfg, head_dim, where) if inv_freq is None else np.asarray(inv_freq, np.float32)
    phase = (np.arange(start, start + positions, dtype=np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
    return np.cos(phase).astype(np.float16), np.sin(phase).astype(np.float16)


def rope_rotary_dim(order: str) -> int:
    """The channels of a head the table's frequencies rotate: all 128, or GLM's first 64."""
    return BOARD_HEAD_DIM // 2 if order == GLM_ROPE_ORDER else BOARD_HEAD_DIM


def rope_rows(cos: np.ndarray, sin: np.ndarray, order: str) -> np.ndarray:
    """[positions, 128] fp16 rows of the table in the chosen value order (cos, sin [positions, 64],
    or [positions, 32] for GLM)."""
    if order == "halves":
        return np.concatenate([cos, sin], axis=1)
    if order == "pairs":
        return np.stack([cos, sin], axis=2).reshape(cos.shape[0], -1)
    if order == GLM_ROPE_ORDER:
        pairs = np.stack([cos, sin], axis=2).reshape(cos.shape[0], -1)
        return np.concatenate([pairs, np.zeros_like(pairs)], axis=1)
    raise VCUError(f"--rope_table {order}: expected one of {', '.join(ROPE_ORDERS)}")


def pack_rope_table(rows: np.ndarray) -> np.ndarray:
    """[MAX_TOKEN, 128] fp16 to the file's fp16 stream: four blocks of 32 channels, each
    position's 32 values (64 bytes) after the previous position's."""
    t, c = rows.shape
    return np.ascontiguousarray(rows.reshape(t, c // ROPE_CHANNELS_PER_BLOCK, ROPE_CHANNELS_PER_BLOCK).transpose(1, 0, 2)).reshape(-1)


def unpack_rope_table(data: np.ndarray, max_token: int) -> np.ndarray:
    """Inverse of pack_rope_table: [MAX_TOKEN, 128] fp16."""
    blocks = BOARD_HEAD_DIM // ROPE_CHANNELS_PER_BLOCK
    return data.reshape(blocks, max_token, ROPE_CHANNELS_PER_BLOCK).transpose(1, 0, 2).reshape(max_token, BOARD_HEAD_DIM)


def rope_table(cfg: dict, max_token: int, order: str, where: Path) -> np.ndarray:
    cos, sin = rope_cos_sin(cfg, rope_rotary_dim(order), max_token, where)
    return pack_rope_table(rope_rows(cos, sin, order))


def rope_table_blocks(cfg: dict, max_token: int, order: str, where: Path, positions_a_block: int = 1 << 16):
    """rope_table's fp16 stream in pieces, in file order (its four blocks of 32 channels, each in
    runs of positions): the same bytes, in memory a few MB at a time whatever --max_token is."""
    check_max_token(max_token)
    if order not in ROPE_ORDERS:
        raise VCUError(f"--rope_table {order}: expected one of {', '.join(ROPE_ORDERS)}")
    dim = rope_rotary_dim(order)
    inv_freq = rope_inv_freq(cfg, dim, where)
    for block in range(BOARD_HEAD_DIM // ROPE_CHANNELS_PER_BLOCK):
        for start in range(0, max_token, positions_a_block):
            n = min(positions_a_block, max_token - start)
            rows = rope_rows(*rope_cos_sin(cfg, dim, n, where, start, inv_freq), order)
            yield np.ascontiguousarray(rows[:, block * ROPE_CHANNELS_PER_BLOCK : (block + 1) * ROPE_CHANNELS_PER_BLOCK]).reshape(-1)


def rope_from_rows(rows: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, 64] (GLM: [positions, 32]) back from the table's rows."""
    if order == "halves":
        return rows[:, :64], rows[:, 64:]
    if order == GLM_ROPE_ORDER:
        return rows[:, 0:64:2], rows[:, 1:64:2]
    return rows[:, 0::2], rows[:, 1::2]


# ---------------------------------------------------------------------------------------------
# SiLU

SILU_SEGMENTS = 16
ACT_FILE = "ACT_parameter_in_DDR.bin"
ACT_FILE_BYTES = 8192
ACT_BEAT_BYTES = 64
DEFAULT_FIT_RANGE = (-16.0, 16.0)

# FORMAT.md 5: the table the accelerator's public host code loads, as fp16 bit patterns.
BOARD_SILU_WORDS = {
    "wt": [0x0000, 0x9310, 0xA122, 0xA78A, 0xAB4B, 0xADD1, 0x29A0, 0x342B, 0x37F6, 0x397D, 0x3ACA, 0x3BF7, 0x3C5C, 0x3C22, 0x3C04, 0x3C00],
    "bias": [0x0000, 0xA0E3, 0xACD9, 0xB1CF, 0xB4D0, 0xB6AB, 0xB317, 0xAACF, 0x1BCE, 0xA83D, 0xAFF2, 0xB451, 0xB6A3, 0xB274, 0xA824, 0x0000],
    "x_region": [0xCA00, 0xC73A, 0xC573, 0xC454, 0xC2D8, 0xBDCB, 0xBA39, 0xB3B1, 0x3245, 0x387B, 0x3BEF, 0x3E25, 0x4388, 0x45B8, 0x4900, 0x0000],
}


@dataclass(frozen=True)
class SiluTable:
    """16 slopes, offsets and breakpoints, fp16."""

    wt: np.ndarray
    bias: np.ndarray
    x_region: np.ndarray

    @classmethod
    def from_words(cls, words: dict) -> SiluTable:
        return cls(*(np.array(words[k], "<u2").view("<f2") for k in ("wt", "bias", "x_region")))

    def segment(self, x: np.ndarray) -> np.ndarray:
        """The first i < 15 with x < x_region[i], else 15."""
        below = x[..., None] < self.x_region[:15].astype(np.float64)
        return np.where(below.any(-1), below.argmax(-1), 15)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """wt[i] * x + bias[i] in double (the host reference's arithmetic), not yet rounded."""
        i = self.segment(x)
        return self.wt.astype(np.float64)[i] * x + self.bias.astype(np.float64)[i]

    def pack(self) -> np.ndarray:
        """The 8192-byte file: three beats of 16 fp16 values and 32 zero bytes, then zeros."""
        out = np.zeros(ACT_FILE_BYTES, np.uint8)
        for beat, values in enumerate((self.wt, self.bias, self.x_region)):
            start = beat * ACT_BEAT_BYTES
            out[start : start + 2 * SILU_SEGMENTS] = values.astype("<f2").view(np.uint8)
        return out

    @classmethod
    def unpack(cls, data: np.ndarray) -> SiluTable:
        beats = [data[b * ACT_BEAT_BYTES : b * ACT_BEAT_BYTES + 2 * SILU_SEGMENTS].view("<f2").copy() for b in range(3)]
        return cls(*beats)

    def error(self, lo: float, hi: float, points: int = 200001) -> tuple[float, float]:
        """(largest |table(x) - SiLU(x)| on [lo, hi], where), on a fine grid plus every breakpoint."""
        x = np.concatenate([np.linspace(lo, hi, points), self.x_region.astype(np.float64)])
        x = x[(x >= lo) & (x <= hi)]
        err = np.abs(self(x) - silu(x))
        i = int(err.argmax())
        return float(err[i]), float(x[i])


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


BOARD_SILU = SiluTable.from_words(BOARD_SILU_WORDS)


def _line_errors(a: float, b: np.ndarray, grid: int = 129) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(error, slope, offset) of the minimax line for SiLU on [a, b_j], for every b_j at once. The
    error of a slope s is half the spread of SiLU(x) - s x, convex in s: a ternary search finds
    the best s, started from the chord's slope (the answer where SiLU does not bend both ways)."""
    b = np.atleast_1d(np.asarray(b, np.float64))
    x = a + (b - a)[:, None] * np.linspace(0, 1, grid)[None, :]
    y = silu(x)
    chord = (y[:, -1] - y[:, 0]) / np.maximum(b - a, 1e-12)
    lo, hi = chord - 0.25, chord + 0.25

    def spread(s):
        r = y - s[:, None] * x
        return r.max(1) - r.min(1)

    for _ in range(28):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        left = spread(m1) < spread(m2)
        hi, lo = np.where(left, m2, hi), np.where(left, lo, m1)
    s = (lo + hi) / 2
    r = y - s[:, None] * x
    return (r.max(1) - r.min(1)) / 2, s, (r.max(1) + r.min(1)) / 2


def _longest_piece(a: float, stop: float, eps: float) -> float:
    """The largest b <= stop whose minimax line on [a, b] errs by at most eps (the error grows
    with b): a vectorised scan, then bisection between the two candidates around eps."""
    cand = a + (stop - a) * np.linspace(0, 1, 65)[1:]
    err = _line_errors(a, cand)[0]
    ok = np.flatnonzero(err <= eps)
    if ok.size == cand.size:
        return stop
    lo = cand[ok[-1]] if ok.size else a
    hi = cand[ok[-1] + 1] if ok.size else cand[0]
    for _ in range(10):
        m = (lo + hi) / 2
        lo, hi = (m, hi) if _line_errors(a, m)[0][0] <= eps else (lo, m)
    return lo


def _cover(eps: float, lo: float, hi: float) -> tuple[list[float], list[tuple[float, float]]] | None:
    """Breakpoints and lines with error <= eps on [lo, hi]: 0 left of the point where |SiLU| falls
    below eps, x right of the point where x - SiLU(x) does, and at most 14 fitted segments between,
    each fitted on its part of [lo, hi] and as long as eps allows (greedy is optimal here)."""
    left = _solve(lambda x: abs(silu(x)) - eps, -80.0, -1.3)
    right = _solve(lambda x: eps - (x - silu(x)), 1.3, 80.0)
    start, stop = max(left, lo), min(right, hi)
    cuts, lines = [start], []
    while cuts[-1] < stop:
        if len(lines) == SILU_SEGMENTS - 2:
            return None
        a = cuts[-1]
        b = _longest_piece(a, stop, eps)
        if b <= a:
            return None
        _, s, c = _line_errors(a, b)
        cuts.append(float(b))
        lines.append((a, float(b), float(s[0]), float(c[0])))
    if not lines:  # the range lies wholly on the asymptotes
        lines = [(start, stop, 1.0 if start > 0 else 0.0, 0.0)]
    # The table's breakpoints: the zero segment ends at `left`, the identity starts at `right`
    # (outside [lo, hi] the outer fitted segments just extend); unused segments are empty.
    breaks = [left] + [b for _, b, _, _ in lines[:-1]] + [right]
    breaks += [right] * (SILU_SEGMENTS - 1 - len(breaks))
    lines += [lines[-1]] * (SILU_SEGMENTS - 2 - len(lines))
    return breaks, lines


def _round_line(a: float, b: float, slope: float) -> tuple[np.float16, np.float16]:
    """fp16 slope and offset for the piece [a, b]: each fp16 neighbour of the slope, with the
    offset re-centred for it and rounded, and the pair with the smallest error kept (rounding a
    slope near 1 moves the line by up to 0.0005 |x|: more than the fit's own error far out)."""
    x = np.linspace(a, b, 257)
    y = silu(x)
    best = None
    s16 = np.float16(slope)
    for s in {s16, np.nextafter(s16, np.float16(-np.inf)), np.nextafter(s16, np.float16(np.inf))}:
        r = y - float(s) * x
        c = np.float16((r.max() + r.min()) / 2)
        err = np.abs(r - float(c)).max()
        if best is None or err < best[0]:
            best = (err, s, c)
    return best[1], best[2]


def _solve(f, a: float, b: float, steps: int = 60) -> float:
    """Where the increasing function f crosses zero in [a, b] (bisection)."""
    for _ in range(steps):
        m = (a + b) / 2
        a, b = (m, b) if f(m) < 0 else (a, m)
    return b


@functools.lru_cache(maxsize=8)
def fit_silu(lo: float = DEFAULT_FIT_RANGE[0], hi: float = DEFAULT_FIT_RANGE[1]) -> SiluTable:
    """This project's table: the smallest largest error over [lo, hi] that 14 fitted segments
    reach (bisection on the error; each segment the minimax line of its piece), 0 far left and x
    far right exactly, rounded to fp16."""
    if not lo < hi:
        raise VCUError(f"SiLU fit range [{lo}, {hi}] is empty")
    good, bad = 0.02, 0.0005
    best = _cover(good, lo, hi)
    while best is None:  # a range so wide that 0.02 is not enough
        good *= 2
        best = _cover(good, lo, hi)
    for _ in range(10):
        eps = (good + bad) / 2
        got = _cover(eps, lo, hi)
        if got is None:
            bad = eps
        else:
            good, best = eps, got
    breaks, lines = best
    rounded = [_round_line(a, b, slope) for a, b, slope, _ in lines]
    wt = [0.0] + [float(s) for s, _ in rounded] + [1.0]
    bias = [0.0] + [float(c) for _, c in rounded] + [0.0]
    x_region = list(breaks) + [0.0]
    return SiluTable(*(np.array(v, np.float64).astype("<f2") for v in (wt, bias, x_region)))


def silu_table(kind: str, fit_range: tuple[float, float] | None = None) -> SiluTable:
    if kind == "board":
        return BOARD_SILU
    if kind == "fit":
        return fit_silu(*(fit_range or DEFAULT_FIT_RANGE))
    raise VCUError(f"--silu_table {kind}: expected one of {', '.join(SILU_TABLES)}")
