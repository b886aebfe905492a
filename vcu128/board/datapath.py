"""The board's datapath, one decoder layer at a time, in the board's arithmetic or in plain fp32.

This is a model of the board, not the board (FORMAT.md 6 says what is known; docs/FORMAT.md
section "The emulator" what it assumes). In `board` numerics:

- every tensor the accelerator keeps between operations is stored as fp16: rounded through fp32,
  clamped to +-65504 (saturation, counted per site) and magnitudes below FLUSH flushed to zero,
  as the testbench references do;
- a matrix product (int4 x fp16 scale weights, fp16 input) is summed in fp32 and rounded once; the
  affine unit then adds the bias (1.0 * y + bias) as its own fp16 step;
- RMSNorm uses the board's fixed eps 1e-6 (optionally the testbench's centred variance), RoPE
  takes cos/sin from the folder's table, softmax runs in fp32 with 1/sqrt(head_dim) folded into
  the product, SiLU is exact or the folder's piecewise table, and the residual adds and the MLP's
  element-wise product are separate rounded steps.

In `fp32` numerics the same pipeline runs with no rounding, the model's own eps, exact SiLU and
transformers' cos/sin: the checkpoint's model as PyTorch computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vcu128.board.stats import FP16_MAX, SITES

FLUSH = 2e-5  # FORMAT.md 6: the references flush magnitudes below about 2e-5 to zero
BOARD_EPS = 1e-6  # FORMAT.md 6: the norm unit's eps is fixed



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
    """How a model computes: the board's fp16 datapath, or plain fp32."""

    name: str
    board: bool
    eps: float
    cos: torch.Tensor  # [positions, head_dim / 2] float32 (fp16 values in board numerics)
    sin: torch.Tensor
    silu_table: object | None = None  # tables.SiluTable: the board's piecewise SiLU, or None for exact
    centred_variance: bool = False
    stats: SiteStats = field(default_factory=SiteStats)
    track: bool = True

    def store(self, x: torch.Tensor, layer, site: str) -> torch.Tensor:
        """What the board keeps of a value: fp16 (saturating, flushing tiny magnitudes); in fp32
        numerics the value itself. Records the site's largest |value| and saturation count, and
        stops at the first non-finite value."""
        if self.track:
            amax = float(x.detach().abs().amax()) if x.numel() else 0.0
            if not math.isfinite(amax):
                raise NonFinite(self.name, layer, site)
            key = (layer, site)
            self.stats.max_abs[key] = max(self.stats.max_abs.get(key, 0.0), amax)
            if self.board and amax > FP16_MAX:
                self.stats.saturated[key] = self.stats.saturated.get(key, 0) + int((x.abs() > FP16_MAX).sum())
        if not self.board:
            return x
        y = x.clamp(-FP16_MAX, FP16_MAX).half().float()
        return torch.where(y.abs() < FLUSH, torch.zeros_like(y), y)


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

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., chin] @ W.T in fp32 (on x's device; a GPU decodes the whole matrix at once)."""
        flat = x.reshape(-1, self.chin)
        rows = self.chout if x.is_cuda else self.ROWS
        out = torch.empty(flat.shape[0], self.chout, device=x.device)
        groups = self.scales.shape[1]
        buf = torch.empty(min(rows, self.chout), groups, self.chin // groups, device=x.device)
        pairs = buf.view(buf.shape[0], self.chin // 2, 2)
        for r in range(0, self.chout, rows):
            n = min(rows, self.chout - r)
            b = self.nibbles[r : r + n]
            pairs[:n, :, 0] = b & 15
            pairs[:n, :, 1] = b >> 4
            w = buf[:n].sub_(8).mul_(self.scales[r : r + n, :, None]).view(n, self.chin)
            out[:, r : r + n] = flat @ w.T
        return out.view(*x.shape[:-1], self.chout)


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, num: Numerics, layer, site: str) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    if num.centred_variance:  # the testbench's RMS mode: no mean subtracted from x, but from the variance
        var = var - x.mean(-1, keepdim=True).pow(2)
    return num.store(weight * (x * torch.rsqrt(var + num.eps)), layer, site)


def shared_matmul(xs: list[torch.Tensor], weight) -> list[torch.Tensor]:
    """x @ W.T for every model that shares W: their inputs stacked, so an int4 weight is decoded
    once for all of them (what makes greedy decoding of several models cheap)."""
    flat = [x.reshape(-1, x.shape[-1]) for x in xs]
    stacked = torch.cat(flat) if len(flat) > 1 else flat[0]
    y = weight.apply(stacked) if isinstance(weight, Int4Weight) else stacked @ weight.T
    out, row = [], 0
    for x, f in zip(xs, flat, strict=True):
        out.append(y[row : row + f.shape[0]].view(*x.shape[:-1], -1))
        row += f.shape[0]
    return out


def linear(xs: list[torch.Tensor], wb, nums: list[Numerics], layer, site: str) -> list[torch.Tensor]:
    """MVM then the affine unit: the product rounded once, then the bias added and rounded."""
    weight, bias = wb
    out = []
    for y, num in zip(shared_matmul(xs, weight), nums, strict=True):
        if bias is not None:
            if num.board:
                y = num.store(y, layer, f"{site}_product")
            y = y + bias
        out.append(num.store(y, layer, site))
    return out


def silu(x: torch.Tensor, num: Numerics) -> torch.Tensor:
    """Exact SiLU, or the board's piecewise table: segment i the first i < 15 with x < x_region[i],
    else 15, and wt[i] * x + bias[i] in double (FORMAT.md 5)."""
    t = num.silu_table
    if t is None:
        return torch.nn.functional.silu(x)
    wt, bias, xr = (torch.from_numpy(v.astype("float64")).to(x.device) for v in (t.wt, t.bias, t.x_region))
    below = x.double()[..., None] < xr[:15]
    i = torch.where(below.any(-1), below.int().argmax(-1), 15)
    return (wt[i] * x.double() + bias[i]).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE: channel i with i + head_dim / 2. x [B, H, T, D], cos/sin [T, D/2]."""
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Shape, num: Numerics, layer: int, start: int,
              cache: KVCache | None) -> torch.Tensor:
    """Rotary attention of one model: q, k, v [B, T, heads * D] to [B, T, heads * D]."""
    B, T, _ = q.shape
    H, KV, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
    q, k, v = (t.view(B, T, n, D).transpose(1, 2) for t, n in ((q, H), (k, KV), (v, KV)))
    cos, sin = num.cos[start : start + T], num.sin[start : start + T]
    q = num.store(rotate(q, cos, sin), layer, "q_rope")
    k = num.store(rotate(k, cos, sin), layer, "k_rope")
    if cache is not None:
        k, v = cache.extend(k, v)
    groups = H // KV
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # fp32, the scale folded into the product
    past = k.shape[2] - T
    mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).tril(past)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = num.store(torch.softmax(scores, -1) @ v, layer, "attention")
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
    xs = each(lambda x, o_, n: n.store(x + o_, layer, "residual_attention"), xs, o, nums)
    h = each(lambda x, n: rms_norm(x, w.post_norm, n, layer, "post_attention_norm"), xs, nums)
    gate = linear(h, w.linears["mlp.gate_proj"], nums, layer, "gate")
    up = linear(h, w.linears["mlp.up_proj"], nums, layer, "up")
    product = each(lambda g, u, n: n.store(n.store(silu(g, n), layer, "silu") * u, layer, "mlp_product"), gate, up, nums)
    down = linear(product, w.linears["mlp.down_proj"], nums, layer, "down")
    return each(lambda x, d, n: n.store(x + d, layer, "residual_mlp"), xs, down, nums)


def final_norm(x: torch.Tensor, weight: torch.Tensor, num: Numerics) -> torch.Tensor:
    return rms_norm(x, weight, num, "final", "final_norm")
