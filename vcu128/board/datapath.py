"""The board's datapath, one decoder layer at a time, in the board's arithmetic or in plain fp32.

This is a model of the board, not the board. docs/FORMAT.md section 6 says what is known (the
accelerator's testbench reference tasks, 12113004/FPGA_Demo_wall-oss_new_bitstream
`clib/genregs/HBM_sv/*.vh`), docs/FORMAT.md "The emulator" what is emulated and what is a variant.
In `board` numerics the default follows the reference tasks op by op:

- every tensor the accelerator keeps between operations is stored as fp16 (`to_fp16`): clamped to
  +-65504 (saturation, counted per site), magnitudes below 2e-5 flushed to zero (judged on the value
  before rounding, as `real_to_FP16` does), rounded to nearest even (the reference truncates; a
  variant);
- a matrix product (int4 x fp16 scale weights, fp16 input; `RunMVM_soft`) is summed in fp32 and
  rounded once; the affine unit (`Run_BN_soft`) then adds the bias (1.0 * y + bias) as its own step;
- the norm (`Run_LN_Soft`) divides by the centred variance sum(x^2)/CH - mean^2 plus the fixed eps
  1e-6, its 1/CH the FP20 register value the driver writes (`Run_LN`: `real_to_FP20`);
- attention is three stored steps: q.k times the fp16 scale register (0x2DA8 for head_dim 128;
  `TRP_RunMVMFP16_soft`, `RunHBM_MVM_afterTRP`), the softmax with masked scores -65504 (subtract the
  max, exp, divide; `Softmax_task`), then p.v (`F2W_RunMVMFP16_soft`);
- RoPE takes cos/sin from the folder's table (rotate-half; GLM: interleaved pairs of the first half of
  each head), SiLU is exact or the folder's piecewise
  table (`Run_Activation_Soft`), and the residual adds and the MLP's element-wise product
  (`Run_Res_soft`) are separate rounded steps.

What public code cannot tell is a `BoardVariant`: the rounding (`nearest`, `truncate`), the MVM's
accumulation (`fp32`, `grouped`) and the norm's variance (`centred`, `mean_square`). `VARIANTS` names
every combination; `pessimistic_variants()` the truncate + grouped pair.

In `fp32` numerics the same pipeline runs with no rounding, the model's own eps, HF's RMSNorm, exact
SiLU, transformers' cos/sin and fp32 attention: the checkpoint's model as PyTorch computes it.
"""

from __future__ import annotations

import itertools
import math
import struct
from dataclasses import dataclass, field, replace

import torch

from vcu128.board.stats import FP16_MAX, SITES
from vcu128.io.errors import VCUError

FLUSH = 2e-5  # real_to_FP16 (basic_tasks.vh): |x| < 0.00002 is stored as 0
BOARD_EPS = 1e-6  # Run_LN_Soft (tasks_LN.vh): 1/sqrt(variance + 0.000001); no driver writes an eps
GROUP = 128  # inputs a quantization group (`T_quant_block`): the grouped accumulation's block
MASKED = -FP16_MAX  # Softmax_task (tasks_SOFTMAX.vh): masked scores are -65504, not -inf


def _f32(x: float) -> float:
    """x rounded to float32 (round to nearest even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _f32_from_bits(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b))[0]


# The smallest float32 >= FLUSH: for a float32 x, x < FLUSH exactly when x < FLUSH_F32 (2e-5 itself is
# no float32, and a threshold rounded to float32 would move the decision for the neighbours of 2e-5).
FLUSH_F32 = _f32(FLUSH) if _f32(FLUSH) >= FLUSH else _f32_from_bits(_f32_bits(FLUSH) + 1)


# ---------------------------------------------------------------------------------------------
# What is not known: the variants


ROUNDINGS = ("nearest", "truncate")
ACCUMULATIONS = ("fp32", "grouped")
VARIANCES = ("centred", "mean_square")


@dataclass(frozen=True)
class BoardVariant:
    """The board model's options for what public code cannot tell (docs/FORMAT.md, "The emulator").

    rounding: how every fp16 (and FP20) value is rounded. `nearest`: round to nearest even (the
      default; the RTL's mode is not public). `truncate`: toward zero, as the reference's
      `real_to_FP16` does (the top 10 mantissa bits of the float32 value).
    accumulation: how the int4 MVM sums. `fp32`: one fp32 sum rounded once (the reference's
      `RunMVM_soft`, the default). `grouped`: each 128-input group's partial sum rounded to fp16, the
      groups added one after another in a 1-6-13 20-bit float (what `TOP_defines.vh` points to:
      `FP16INT4_MAC_Out_Width_FP16`, `MAX_FP_DW (16+4)`), then rounded to fp16.
    variance: the norm's. `centred`: sum(x^2)/CH - mean^2 (`Run_LN_Soft` in RMS mode, the default).
      `mean_square`: sum(x^2)/CH, HF's RMSNorm.
    """

    rounding: str = "nearest"
    accumulation: str = "fp32"
    variance: str = "centred"

    def __post_init__(self):
        for value, allowed, what in ((self.rounding, ROUNDINGS, "rounding"), (self.accumulation, ACCUMULATIONS, "accumulation"),
                                     (self.variance, VARIANCES, "variance")):
            if value not in allowed:
                raise VCUError(f"board variant: {what} {value!r} is not one of {', '.join(allowed)}")

    @property
    def name(self) -> str:
        """`rounding+accumulation+variance`, e.g. `nearest+fp32+centred` (the default)."""
        return f"{self.rounding}+{self.accumulation}+{self.variance}"

    @classmethod
    def from_name(cls, name: str) -> BoardVariant:
        if name not in VARIANTS:
            raise VCUError(f"board variant {name!r}: not one of {', '.join(VARIANTS)}")
        return VARIANTS[name]


DEFAULT_VARIANT = BoardVariant()
# Every combination by name, the default first.
VARIANTS: dict[str, BoardVariant] = {v.name: v for v in (BoardVariant(r, a, s) for r, a, s in itertools.product(ROUNDINGS, ACCUMULATIONS, VARIANCES))}


def pessimistic_variants() -> tuple[BoardVariant, BoardVariant]:
    """truncate + grouped, with the centred variance and with the mean square: the combination that
    rounds most (which variance hurts more depends on the model; run both and keep the worse)."""
    return BoardVariant("truncate", "grouped", "centred"), BoardVariant("truncate", "grouped", "mean_square")


# ---------------------------------------------------------------------------------------------
# Number formats and the registers the driver writes


def to_fp16(x: torch.Tensor, rounding: str = "nearest", flush: bool = True) -> torch.Tensor:
    """What the board stores of float32 values, as float32 holding fp16 values: clamped to +-65504,
    rounded (`nearest` even, or `truncate` toward zero: the top 10 mantissa bits, subnormals
    truncated on their own grid) and, with `flush`, zero where |x| < 2e-5 before rounding (as
    `real_to_FP16` decides on its input). The reference encodes [2e-5, 2^-14) wrongly (NaN patterns,
    wrong subnormals); this model stores those values as IEEE fp16 does."""
    x = x.float()
    y = x.clamp(-FP16_MAX, FP16_MAX)
    if rounding == "nearest":
        y = y.half().float()
    elif rounding == "truncate":
        _truncate_(y)
    else:
        raise VCUError(f"rounding {rounding!r}: not one of {', '.join(ROUNDINGS)}")
    if flush:
        y = torch.where(x.abs() < FLUSH_F32, torch.zeros_like(y), y)
    return y


def _truncate_(y: torch.Tensor) -> torch.Tensor:
    """float32 values in the fp16 range truncated toward zero to fp16, in place: the top 10 mantissa
    bits, then to a multiple of 2^-24 (which changes only values below 2^-14, on the subnormal grid;
    both steps exact)."""
    y.view(torch.int32).bitwise_and_(-0x2000)
    return y.mul_(2.0**24).trunc_().mul_(2.0**-24)


def fp16_register(value: float) -> float:
    """A real as the driver writes it into an fp16 register: `real_to_FP16` (basic_tasks.vh), which
    truncates the float32 value to 10 mantissa bits (normal values only: a register is never tiny)."""
    if not 2.0**-14 <= abs(value) <= FP16_MAX:
        raise VCUError(f"fp16 register value {value}: outside the normal fp16 range")
    return _f32_from_bits(_f32_bits(value) & ~0x1FFF)


def fp20_bits(value: float) -> int:
    """`real_to_FP20` (basic_tasks.vh; dlavm's `FP32_to_FP20` is the same) of float32(value): 1 sign,
    6 exponent (bias 31), 13 mantissa bits, rounded half up on the float32 mantissa's bit 9 (a carry
    out of the mantissa is dropped, as there)."""
    b = _f32_bits(value)
    s, e, f = b >> 31, (b >> 23) & 0xFF, b & 0x7FFFFF
    if e < 84:  # below 2^-43
        return 0
    if e >= 159:  # 2^32 and up saturates
        return (s << 19) | (0b111110 << 13) | 0x1FFF
    if e >= 97:
        m = ((f + (1 << 10) if (f >> 9) & 1 else f) >> 10) & 0x1FFF
        return (s << 19) | ((e - 96) << 13) | m
    shift = 97 - e
    full = (1 << 23) | f
    m = (((full >> shift) + (1 << 10) if (full >> (9 + shift)) & 1 else full >> shift) >> 10) & 0x1FFF
    return (s << 19) | m


def fp20_value(bits: int) -> float:
    """`FP20_tp_real` (basic_tasks.vh): the real an FP20 word holds."""
    sign = -1.0 if bits >> 19 & 1 else 1.0
    e, m = (bits >> 13) & 0x3F, bits & 0x1FFF
    return sign * (2.0**-30 * (m / 8192) if e == 0 else 2.0 ** (e - 31) * (1 + m / 8192))


def norm_recip(ch: int) -> float:
    """The norm unit's 1/CH: the FP20 register `Run_LN` (tasks_LN.vh) writes, real_to_FP20(1/CH)
    (for 3584: 0x26492, 3.05e-5 relative below 1/3584)."""
    return fp20_value(fp20_bits(1.0 / ch))


def attention_scale(head_dim: int) -> float:
    """The attention scale as the hardware receives it: the fp16 register `FP16_rsqrt` =
    real_to_FP16(1/sqrt(head_dim)) (`RunHBM_MVM_afterTRP`), 0x2DA8 for head_dim 128."""
    return fp16_register(1.0 / math.sqrt(head_dim))


# ---------------------------------------------------------------------------------------------
# How a model computes


class NonFinite(Exception):
    """A NaN or inf appeared: where it first did."""

    def __init__(self, model: str, layer: int | str, site: str):
        super().__init__(f"{model}: non-finite value (NaN or inf) first at layer {layer}, {site}")
        self.model, self.layer, self.site = model, layer, site


@dataclass
class SiteStats:
    """Per (layer, site): largest |value| before storing, and how many values saturated."""

    max_abs: dict = field(default_factory=dict)
    saturated: dict = field(default_factory=dict)

    def saturation_list(self) -> list[dict]:
        return [{"layer": layer, "site": site, "count": n} for (layer, site), n in sorted(self.saturated.items(), key=_order) if n]

    def headroom_list(self) -> list[dict]:
        return [{"layer": layer, "site": site, "max_abs": v} for (layer, site), v in sorted(self.max_abs.items(), key=_order)]


def _order(item):
    (layer, site), _ = item
    return (layer if isinstance(layer, int) else 1 << 30, SITES.index(site) if site in SITES else len(SITES), site)


@dataclass
class Numerics:
    """How a model computes: the board's fp16 datapath (with `variant`'s options), or plain fp32."""

    name: str
    board: bool
    eps: float
    cos: torch.Tensor  # [positions, head_dim / 2] float32 (fp16 values in board numerics)
    sin: torch.Tensor
    silu_table: object | None = None  # tables.SiluTable: the board's piecewise SiLU, or None for exact
    variant: BoardVariant = DEFAULT_VARIANT  # board numerics only
    stats: SiteStats = field(default_factory=SiteStats)
    track: bool = True

    @property
    def centred_variance(self) -> bool:
        return self.board and self.variant.variance == "centred"

    @property
    def group_rounding(self) -> str | None:
        """None where a matrix product is one fp32 sum; the rounding of the grouped accumulation."""
        return self.variant.rounding if self.board and self.variant.accumulation == "grouped" else None

    def with_variant(self, variant: BoardVariant, name: str | None = None) -> Numerics:
        """The same numerics with another variant (and its own statistics)."""
        return replace(self, name=name or self.name, variant=variant, stats=SiteStats())

    def fp16(self, x: torch.Tensor) -> torch.Tensor:
        """x as this model stores it, untracked."""
        return to_fp16(x, self.variant.rounding) if self.board else x

    def store(self, x: torch.Tensor, layer, site: str) -> torch.Tensor:
        """What the board keeps of a value: fp16 (saturating, flushing tiny magnitudes, rounded as the
        variant says); in fp32 numerics the value itself. Records the site's largest |value| and
        saturation count, and stops at the first non-finite value."""
        if self.track:
            amax = float(x.detach().abs().amax()) if x.numel() else 0.0
            if not math.isfinite(amax):
                raise NonFinite(self.name, layer, site)
            key = (layer, site)
            self.stats.max_abs[key] = max(self.stats.max_abs.get(key, 0.0), amax)
            if self.board and amax > FP16_MAX:
                self.stats.saturated[key] = self.stats.saturated.get(key, 0) + int((x.abs() > FP16_MAX).sum())
        return self.fp16(x)


# ---------------------------------------------------------------------------------------------
# Matrix products


# What the grouped accumulation holds at once, in values: its running sums (float64) and a chunk of
# partial sums (float32). A few MB on a CPU, so that its element-wise passes run in cache; more on a
# GPU (fewer, larger kernels).
GROUPED_SUMS = {"cpu": 1 << 18, "cuda": 1 << 24}
GROUPED_PARTIALS = {"cpu": 1 << 20, "cuda": 1 << 26}


def _accumulate(acc: torch.Tensor | None, partials: torch.Tensor, rounding: str) -> torch.Tensor:
    """acc (float64 [...], or None to start from the first group) plus each of the partial sums
    [groups, ...] (float32, overwritten) in order: each rounded to fp16 (clamped, not flushed), each
    exact sum (float64 holds it: fp16 values and 14-bit sums are far apart by less than 2^39) rounded
    to the 1-6-13 float's 13 mantissa bits."""
    y = partials.clamp_(-FP16_MAX, FP16_MAX)
    p = (_truncate_(y) if rounding == "truncate" else y.half()).double()
    first = 0
    if acc is None:
        acc, first = p[0].clone(), 1
    bits = acc.view(torch.int64)
    lsb = torch.empty_like(bits) if rounding == "nearest" else None
    for g in range(first, p.shape[0]):  # acc + p[g], rounded to 13 mantissa bits (52 - 39) in place
        acc.add_(p[g])
        if lsb is not None:
            torch.bitwise_right_shift(bits, 39, out=lsb)
            bits.add_(lsb.bitwise_and_(1)).add_((1 << 38) - 1)
        bits.bitwise_and_(-(1 << 39))
    return acc


def group_sum(partials: torch.Tensor, rounding: str) -> torch.Tensor:
    """The grouped accumulation of per-group partial sums [groups, ...] (float32, overwritten): each
    rounded to fp16, then added in group order in the 1-6-13 float, each sum rounded to it. float32
    [...] (an FP20 value is a float32 value); the caller stores it as fp16."""
    return _accumulate(None, partials, rounding).float()


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, rounding: str) -> torch.Tensor:
    """x [N, chin] @ w.T [chin, n] in the grouped accumulation: for a block of output columns, the
    partial sums of a chunk of 128-input groups from one batched product over the reshaped weight,
    accumulated in group order (bounded memory, few element-wise passes)."""
    n_rows, chin = x.shape
    if chin % GROUP:
        raise VCUError(f"grouped accumulation: {chin} inputs is not a multiple of {GROUP}")
    groups, n = chin // GROUP, w.shape[0]
    kind = x.device.type if x.device.type in GROUPED_SUMS else "cpu"
    cols = max(1, min(n, GROUPED_SUMS[kind] // max(1, n_rows)))
    chunk = max(1, min(groups, GROUPED_PARTIALS[kind] // max(1, n_rows * cols)))
    xg = x.reshape(n_rows, groups, GROUP).transpose(0, 1).contiguous()  # [G, N, 128]
    out = torch.empty(n_rows, n, device=x.device)
    for c in range(0, n, cols):
        wg = w[c : c + cols].reshape(-1, groups, GROUP).permute(1, 2, 0)  # [G, 128, m]
        acc = None
        for g in range(0, groups, chunk):
            acc = _accumulate(acc, torch.bmm(xg[g : g + chunk], wg[g : g + chunk]), rounding)
        out[:, c : c + cols] = acc
    return out


class Int4Weight:
    """A linear as the board holds it: int4 weights (two a byte, input 2k in the low nibble, stored
    as q + 8) and fp32 copies of its fp16 scales. `apply` decodes a block of rows at a time into a
    cache-sized buffer and multiplies it at once, so a 7B layer never exists in fp32 and greedy
    decoding costs a decode per token, not a model's worth of memory."""

    ROWS = 1024

    def __init__(self, nibbles: torch.Tensor, scales: torch.Tensor):
        self.nibbles, self.scales = nibbles, scales  # uint8 [chout, chin/2], float32 [chout, chin/128]
        self.chout, self.chin = nibbles.shape[0], nibbles.shape[1] * 2

    def to(self, device) -> Int4Weight:
        return self if self.nibbles.device == torch.device(device) else Int4Weight(self.nibbles.to(device), self.scales.to(device))

    def apply(self, x: torch.Tensor, group_rounding: str | None = None) -> torch.Tensor:
        """x [..., chin] @ W.T in fp32 (on x's device; a GPU decodes the whole matrix at once);
        `group_rounding` set: in the grouped accumulation with that rounding."""
        return self.apply_each([x], [group_rounding])[0]

    def apply_each(self, xs: list[torch.Tensor], group_roundings: list[str | None]) -> list[torch.Tensor]:
        """Each x [..., chin] @ W.T, in its own accumulation, the weight decoded once for all."""
        flats = [x.reshape(-1, self.chin) for x in xs]
        device = flats[0].device
        rows = self.chout if device.type == "cuda" else self.ROWS
        outs = [torch.empty(f.shape[0], self.chout, device=device) for f in flats]
        groups = self.scales.shape[1]
        buf = torch.empty(min(rows, self.chout), groups, self.chin // groups, device=device)
        pairs = buf.view(buf.shape[0], self.chin // 2, 2)
        for r in range(0, self.chout, rows):
            n = min(rows, self.chout - r)
            b = self.nibbles[r : r + n]
            pairs[:n, :, 0] = b & 15
            pairs[:n, :, 1] = b >> 4
            w = buf[:n].sub_(8).mul_(self.scales[r : r + n, :, None]).view(n, self.chin)
            for flat, out, rounding in zip(flats, outs, group_roundings, strict=True):
                out[:, r : r + n] = flat @ w.T if rounding is None else grouped_matmul(flat, w, rounding)
        return [out.view(*x.shape[:-1], self.chout) for x, out in zip(xs, outs, strict=True)]


@dataclass
class LayerWeights:
    """One decoder layer: weights (Int4Weight, or float32 [chout, chin]), biases, norms."""

    linears: dict  # module name -> (weight, bias or None)
    input_norm: torch.Tensor
    post_norm: torch.Tensor

    def to(self, device) -> LayerWeights:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerWeights({k: (w.to(device), move(b)) for k, (w, b) in self.linears.items()}, move(self.input_norm), move(self.post_norm))


@dataclass
class Shape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: str = "rotate_half"  # or "glm_interleaved" (format.family)


def shared_matmul(xs: list[torch.Tensor], weight, group_roundings: list[str | None] | None = None) -> list[torch.Tensor]:
    """x @ W.T for every model that shares W: the inputs of the models that accumulate alike
    stacked, so an int4 weight is decoded once for all of them (what makes greedy decoding of
    several models cheap). `group_roundings`: each model's `Numerics.group_rounding` (default: all
    one fp32 sum)."""
    keys = group_roundings or [None] * len(xs)
    flat = [x.reshape(-1, x.shape[-1]) for x in xs]
    order = list(dict.fromkeys(keys))
    members = [[i for i, k in enumerate(keys) if k == key] for key in order]
    stacks = [torch.cat([flat[i] for i in idx]) if len(idx) > 1 else flat[idx[0]] for idx in members]
    if isinstance(weight, Int4Weight):
        ys = weight.apply_each(stacks, order)
    else:
        ys = [s @ weight.T if key is None else grouped_matmul(s, weight, key) for s, key in zip(stacks, order, strict=True)]
    out: list = [None] * len(xs)
    for idx, y in zip(members, ys, strict=True):
        row = 0
        for i in idx:
            out[i] = y[row : row + flat[i].shape[0]].view(*xs[i].shape[:-1], -1)
            row += flat[i].shape[0]
    return out


def linear(xs: list[torch.Tensor], wb, nums: list[Numerics], layer, site: str) -> list[torch.Tensor]:
    """MVM (`RunMVM_soft`) then the affine unit (`Run_BN_soft`): the product rounded once, then the
    bias added and rounded."""
    weight, bias = wb
    out = []
    for y, num in zip(shared_matmul(xs, weight, [n.group_rounding for n in nums]), nums, strict=True):
        if bias is not None:
            if num.board:
                y = num.store(y, layer, f"{site}_product")
            y = y + bias
        out.append(num.store(y, layer, site))
    return out


# ---------------------------------------------------------------------------------------------
# The other operations


def rms_norm(x: torch.Tensor, weight: torch.Tensor, num: Numerics, layer, site: str) -> torch.Tensor:
    """HF's RMSNorm in fp32 numerics. On the board (`Run_LN_Soft` in RMS mode, in double): the sums
    of x and x^2 times the FP20 register 1/CH, the variance (centred: mean_square - mean^2, or the
    mean square), recip_std = 1/sqrt(variance + eps), out = x * recip_std * weight, stored."""
    if not num.board:
        var = x.pow(2).mean(-1, keepdim=True)
        return num.store(weight * (x * torch.rsqrt(var + num.eps)), layer, site)
    xd = x.double()
    recip_ch = norm_recip(x.shape[-1])
    var = (xd * xd).sum(-1, keepdim=True) * recip_ch
    if num.variant.variance == "centred":  # the mean is not subtracted from x in RMS mode, only here
        mean = xd.sum(-1, keepdim=True) * recip_ch
        var = var - mean * mean
    recip_std = 1 / torch.sqrt(var + num.eps)
    return num.store((xd * recip_std * weight.double()).float(), layer, site)


def silu(x: torch.Tensor, num: Numerics) -> torch.Tensor:
    """Exact SiLU, or the board's piecewise table (`Run_Activation_Soft`): segment i the first
    i < 15 with x < x_region[i], else 15, and wt[i] * x + bias[i] in double (FORMAT.md 5)."""
    t = num.silu_table
    if t is None:
        return torch.nn.functional.silu(x)
    wt, bias, xr = (torch.from_numpy(v.astype("float64")).to(x.device) for v in (t.wt, t.bias, t.x_region))
    below = x.double()[..., None] < xr[:15]
    i = torch.where(below.any(-1), below.int().argmax(-1), 15)
    return (wt[i] * x.double() + bias[i]).float()


def add(a: torch.Tensor, b: torch.Tensor, num: Numerics, layer, site: str) -> torch.Tensor:
    """A residual add (`Run_Res_soft` ew_mode 0), stored."""
    return num.store(a + b, layer, site)


def multiply(a: torch.Tensor, b: torch.Tensor, num: Numerics, layer, site: str) -> torch.Tensor:
    """An element-wise product (`Run_Res_soft` ew_mode 1), stored."""
    return num.store(a * b, layer, site)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: str = "rotate_half") -> torch.Tensor:
    """HF's rotate-half RoPE: channel i with i + head_dim / 2, x [B, H, T, D], cos/sin [T, D/2]; or
    GLM's (`glm_interleaved`; ChatGLM, `Run_PosEmb_Software`): pairs (2j, 2j+1) of the first 2F
    channels turned by frequency j, the rest passed through, cos/sin [T, F]."""
    if rope == "glm_interleaved":
        n = 2 * cos.shape[-1]
        even, odd = x[..., 0:n:2], x[..., 1:n:2]
        turned = torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1).flatten(-2)
        return torch.cat([turned, x[..., n:]], -1)
    c = torch.cat([cos, cos], -1)
    s = torch.cat([sin, sin], -1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * c + rotated * s


@dataclass
class KVCache:
    k: torch.Tensor | None = None  # [B, kv_heads, T, D]
    v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        return self.k, self.v


def attention_weights(q: torch.Tensor, k: torch.Tensor, num: Numerics, layer, past: int = 0) -> torch.Tensor:
    """Causal attention probabilities [B, H, T, S] of q [B, H, T, D] (positions past..past+T-1) over
    k [B, H, S, D]. fp32 numerics: softmax of q.k / sqrt(D), masked with -inf. Board: two stored
    steps, in double as the reference tasks (a small share of the work; fp32 sums would round a
    score the other way now and then, and move its whole row): q.k times the fp16 scale register
    (`TRP_RunMVMFP16_soft`), then the softmax of those fp16 scores with masked ones -65504: subtract
    the row's max, exp, divide by the sum (`Softmax_task`)."""
    T, S = q.shape[2], k.shape[2]
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(past)
    if not num.board:
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # fp32, the scale folded into the product
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    scores = num.store((q.double() @ k.double().transpose(-1, -2)) * attention_scale(q.shape[-1]), layer, "attention_scores")
    x = scores.double().masked_fill(~mask, MASKED)
    e = (x - x.amax(-1, keepdim=True)).exp()
    return num.store((e / e.sum(-1, keepdim=True)).float(), layer, "attention_probs")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Shape, num: Numerics, layer: int, start: int,
              cache: KVCache | None) -> torch.Tensor:
    """Rotary attention of one model: q, k, v [B, T, heads * D] to [B, T, heads * D]; on the board
    the probabilities times v (`F2W_RunMVMFP16_soft`, in double) are the third stored step."""
    B, T, _ = q.shape
    H, KV, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
    q, k, v = (t.view(B, T, n, D).transpose(1, 2) for t, n in ((q, H), (k, KV), (v, KV)))
    cos, sin = num.cos[start : start + T], num.sin[start : start + T]
    q = num.store(rotate(q, cos, sin, shape.rope), layer, "q_rope")
    k = num.store(rotate(k, cos, sin, shape.rope), layer, "k_rope")
    if cache is not None:
        k, v = cache.extend(k, v)
    groups = H // KV
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    p = attention_weights(q, k, num, layer, k.shape[2] - T)
    out = num.store(p.double() @ v.double() if num.board else p @ v, layer, "attention")
    return out.transpose(1, 2).reshape(B, T, H * D)


def decoder_layer(xs: list[torch.Tensor], w: LayerWeights, shape: Shape, nums: list[Numerics], layer: int, start: int = 0,
                  caches: list | None = None) -> list[torch.Tensor]:
    """The residual streams x [B, T, hidden] (positions start..start+T) of the models that share
    this layer's weights, through the layer, in the board's order of operations."""
    caches = caches or [None] * len(xs)
    each = lambda f, *args: [f(*a) for a in zip(*args, strict=True)]  # noqa: E731
    h = each(lambda x, n: rms_norm(x, w.input_norm, n, layer, "input_norm"), xs, nums)
    q = linear(h, w.linears["self_attn.q_proj"], nums, layer, "q")
    k = linear(h, w.linears["self_attn.k_proj"], nums, layer, "k")
    v = linear(h, w.linears["self_attn.v_proj"], nums, layer, "v")
    attn = each(lambda q_, k_, v_, n, c: attention(q_, k_, v_, shape, n, layer, start, c), q, k, v, nums, caches)
    o = linear(attn, w.linears["self_attn.o_proj"], nums, layer, "o")
    xs = each(lambda x, o_, n: add(x, o_, n, layer, "residual_attention"), xs, o, nums)
    h = each(lambda x, n: rms_norm(x, w.post_norm, n, layer, "post_attention_norm"), xs, nums)
    gate = linear(h, w.linears["mlp.gate_proj"], nums, layer, "gate")
    up = linear(h, w.linears["mlp.up_proj"], nums, layer, "up")
    product = each(lambda g, u, n: multiply(n.store(silu(g, n), layer, "silu"), u, n, layer, "mlp_product"), gate, up, nums)
    down = linear(product, w.linears["mlp.down_proj"], nums, layer, "down")
    return each(lambda x, d, n: add(x, d, n, layer, "residual_mlp"), xs, down, nums)


def final_norm(x: torch.Tensor, weight: torch.Tensor, num: Numerics) -> torch.Tensor:
    return rms_norm(x, weight, num, "final", "final_norm")
