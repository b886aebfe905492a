"""GPTQ for one weight matrix: symmetric 4-bit, group 128, no act-order (the board's only format).

The algorithm is GPTQ (Frantar et al., 2022) as GPTQModel 7.6 runs it by default: H = 2/N X^T X,
damped by 5% of its mean diagonal (1% more on each failed Cholesky); columns quantized in blocks
of 128, each column's rounding error spread over the columns not yet quantized through the upper
Cholesky factor of H^-1 (reached here through H's own factor, without forming H^-1: gptq_quantize);
and GPTQModel's "act-group-aware" order (GAR): whole groups are taken in
order of their largest H diagonal, and inside a group the columns by decreasing H diagonal. The
groups stay the checkpoint's plain groups of 128 consecutive inputs (g_idx = input // 128), so
the board sees an ordinary checkpoint. Two differences, both deliberate:

- a group's scale is rounded to fp16 *before* its columns are quantized, so the error feedback
  sees exactly the weights the board computes with (GPTQModel rounds it afterwards, on saving);
- rows that share one input (q/k/v, gate/up) are solved as one matrix: GPTQ treats rows
  independently, so this is the same result for a third of the column loops.

The column loop inside a block is sequential by nature: 128 steps of a few small kernels. On a
GPU one Triton kernel runs a whole block (gptq_triton.py: each program keeps a slice of rows in
registers for the 128 steps); on the CPU it runs eagerly (solve_block_eager).
"""

from __future__ import annotations

import logging

import torch

from vcu128.format.model import GROUP_SIZE
from vcu128.io.errors import VCUError

BITS = 4
QMIN, QMAX = -(1 << (BITS - 1)), (1 << (BITS - 1)) - 1  # signed levels -8..7 (stored unsigned with zero 8)
DAMP_PERCENT = 0.05  # GPTQModel 7.6's damp_percent and damp_auto_increment
DAMP_STEP = 0.01


def add_to_hessian(H: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """H += x^T y (y defaults to x) over the rows of x, y [tokens, chin], accumulated in fp32.

    On a GPU, fp16/bf16 inputs go to the tensor cores with an fp32 output: the products of two
    16-bit values are exact in fp32, so this equals converting to fp32 first, at half the cost.
    """
    x = x.reshape(-1, x.shape[-1])
    y = x if y is None else y.reshape(-1, y.shape[-1])
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        H.add_(torch.mm(x.T, y, out_dtype=torch.float32))
    else:
        H.addmm_(x.T.float(), y.float())


class HessianAccumulator:
    """H = 2/N sum x^T x over chunks of a linear's inputs (N the tokens), in fp32.

    H is symmetric, so for wide inputs on a GPU (down_proj's 18944) only the blocks on and above the
    diagonal are multiplied (10 of 16 in a 4 x 4 split) and mirrored at the end: a 7B's down_proj
    Hessians are 2.6 of the run's 5.6 PFLOP, and this takes 1 PFLOP off. `split` forces the choice."""

    SPLIT_FROM = 8192  # narrower inputs: one product is faster than ten smaller ones
    SPLIT = 4

    def __init__(self, n: int, device: torch.device, split: bool | None = None):
        self.H = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.tokens = 0
        if split is None:
            split = torch.device(device).type == "cuda" and n >= self.SPLIT_FROM
        size = -(-n // self.SPLIT // GROUP_SIZE) * GROUP_SIZE
        self.blocks = [slice(i, min(i + size, n)) for i in range(0, n, size)] if split else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.tokens += x.shape[0]
        if self.blocks is None:
            add_to_hessian(self.H, x)
            return
        for i, a in enumerate(self.blocks):
            for b in self.blocks[i:]:
                add_to_hessian(self.H[a, b], x[:, a], x[:, b])

    def result(self) -> torch.Tensor:
        H = self.H
        if self.blocks is not None:
            for i, a in enumerate(self.blocks):
                for b in self.blocks[i + 1 :]:
                    H[b, a] = H[a, b].T
        return H.mul_(2 / max(self.tokens, 1))


def hessian_factor(H_reversed: torch.Tensor, name: str) -> torch.Tensor:
    """R, upper triangular with H + damp I = R R^T (GPTQModel's damping schedule), from H with its
    rows and columns in reverse order, J H J (consumed).

    Factoring the reversed matrix, J H J = L L^T (J reverses the order), gives R = J L J. GPTQ is
    usually written with U, the upper Cholesky factor of H^-1, reached by cholesky, cholesky_inverse
    and cholesky again (about 2.7 n^3 flops, 18 TFLOP for a 7B's down_proj); U = R^-1, and
    gptq_quantize needs only R and the inverses of its 128 x 128 diagonal blocks (n^3 / 3)."""
    H = H_reversed
    step = DAMP_PERCENT * H.diagonal().mean()
    damp = DAMP_PERCENT
    H.diagonal().add_(step)
    while True:
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            return L.flip(0, 1)
        damp += DAMP_STEP
        if damp >= 1:
            raise VCUError(f"{name}: the Hessian is not positive definite even with 100% damping "
                           "(calibration inputs degenerate: more or more varied --calib text)")
        H.diagonal().add_(step * DAMP_STEP / DAMP_PERCENT)


def group_aware_order(diag: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """GPTQModel's act-group-aware column order from the Hessian diagonal: (perm, with perm[new]
    = old column; group_order, the original group quantized b-th)."""
    values, inside = torch.sort(diag.view(-1, GROUP_SIZE), dim=1, descending=True)
    group_order = torch.argsort(values[:, 0], descending=True, stable=True)
    base = torch.arange(len(group_order), device=diag.device)[:, None] * GROUP_SIZE
    perm = (inside + base)[group_order].reshape(-1)
    return perm, group_order.tolist()


def group_scales(w: torch.Tensor, qmin: int = QMIN) -> torch.Tensor:
    """Symmetric scale of each row of one group [rows, 128], rounded to fp16 as the checkpoint
    stores it: 2 max|w| / 15 on the full -8..7 grid (an all-zero group gets 2/15, as in GPTQModel),
    max|w| / 7 on the 15-level -7..7 grid (`qmin` -7, for sign-magnitude boards)."""
    amax = w.abs().amax(dim=1)
    amax = torch.where(amax == 0, torch.ones_like(amax), amax)
    return (amax * (2 / (QMAX - qmin))).clamp_min(2.0**-24).half().float()


def solve_block_eager(w: torch.Tensor, u: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, qmin: int, qmax: int) -> None:
    """The sequential part of GPTQ for one block: quantize its 128 columns one after another, each
    column's error pushed onto the columns right of it. w [rows, 128]: the block's weights after the
    earlier blocks' feedback; u [128, 128]: the block's diagonal block of U (upper Cholesky factor of
    H^-1). Writes q (int8) and scales (the block's group scale). The GPU runs the same steps fused
    into one kernel (gptq_triton.solve_block); this is the CPU's, and the reference for that kernel."""
    scale = group_scales(w, qmin)
    w = w.T.clone()  # [128, rows]: a column is contiguous
    g = u / u.diagonal()[:, None]
    qf = torch.empty_like(w)
    e = torch.empty_like(scale)
    for i in range(GROUP_SIZE):
        torch.div(w[i], scale, out=qf[i])
        qf[i].round_().clamp_(qmin, qmax)
        torch.mul(qf[i], scale, out=e)
        torch.sub(w[i], e, out=e)
        if i + 1 < GROUP_SIZE:
            w[i + 1 :].addr_(g[i, i + 1 :], e, alpha=-1)
    q.copy_(qf.T)
    scales.copy_(scale)


def block_solver(device: torch.device):
    """The fused Triton kernel on a GPU (when Triton is there), else the eager loop."""
    if device.type == "cuda":
        try:
            from vcu128.quant.gptq_triton import solve_block
        except ImportError:
            _warn_once("warning: Triton is not installed: GPTQ's column loop runs as small kernels, several times slower")
            return solve_block_eager
        return solve_block
    return solve_block_eager


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger("vcu128").warning(message)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, name: str, qmin: int = QMIN, solve=None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-quantize W [rows, cols] (any float dtype) against the Hessian H [cols, cols] (fp32,
    consumed). Returns (q int8 [rows, cols] in qmin..7, scales float32 [rows, cols/128], fp16 values).
    `solve` picks the block solver (default: block_solver(W.device)).

    GPTQ's scaled errors E (each column's error divided by U's diagonal) satisfy E U = W - Q, so
    E = (W - Q) R with H = R R^T. A block's weights when its turn comes are its own plus the feedback
    of the blocks before it, W_k + S_k U_kk with S_k = sum_{j<k} (W_j - Q_j) R_jk: the lazy sum S
    is carried forward one matrix product a block, as GPTQ carries E U, but needs only R."""
    rows, cols = W.shape
    if cols % GROUP_SIZE:
        raise VCUError(f"{name}: {cols} inputs is not a multiple of the group size {GROUP_SIZE}")
    solve = solve or block_solver(W.device)
    dead = H.diagonal() == 0  # inputs that were always zero: any weight there is free
    H.diagonal()[dead] = 1
    perm, group_order = group_aware_order(H.diagonal())
    W = W.float()[:, perm]
    W[:, dead[perm]] = 0
    reverse = perm.flip(0)
    R = hessian_factor(H[reverse[:, None], reverse[None, :]], name)
    del H, reverse
    blocks = cols // GROUP_SIZE
    eye = torch.eye(GROUP_SIZE, device=W.device).expand(blocks, GROUP_SIZE, GROUP_SIZE)
    diagonal_blocks = torch.stack([R[i : i + GROUP_SIZE, i : i + GROUP_SIZE] for i in range(0, cols, GROUP_SIZE)])
    U_blocks = torch.linalg.solve_triangular(diagonal_blocks, eye, upper=True).contiguous()
    # Solved in the permuted order (groups by importance), put back in the checkpoint's at the end.
    qp = torch.empty(rows, cols, dtype=torch.int8, device=W.device)
    sp = torch.empty(rows, blocks, device=W.device)
    S = torch.zeros(rows, cols, device=W.device)
    w = torch.empty(rows, GROUP_SIZE, device=W.device)
    for b, i1 in enumerate(range(0, cols, GROUP_SIZE)):
        i2 = i1 + GROUP_SIZE
        torch.addmm(W[:, i1:i2], S[:, i1:i2], U_blocks[b], out=w)
        solve(w, U_blocks[b], qp[:, i1:i2], sp[:, b], qmin, QMAX)
        if i2 < cols:
            d = W[:, i1:i2] - qp[:, i1:i2] * sp[:, b, None]
            S[:, i2:].addmm_(d, R[i1:i2, i2:])
    q = torch.empty_like(qp)
    q[:, perm] = qp
    scales = torch.empty_like(sp)
    scales[:, group_order] = sp
    return q, scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Signed ints [rows, cols] times per-group scales [rows, cols/128] (any float dtype)."""
    rows, cols = q.shape
    return (q.float().view(rows, -1, GROUP_SIZE) * scales.float()[..., None]).view(rows, cols).to(dtype)


def gptq_tensors(q: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """One linear in GPTQ (v1) checkpoint form (FORMAT.md 1): qweight int32 [cols/8, rows], input
    8k+j of a row in nibble j of word k as q + 8; qzeros 0x77777777 (v1 stores zero - 1 = 7);
    scales fp16 [cols/128, rows]; g_idx = input // 128. Computed where q lives (the GPU)."""
    rows, cols = q.shape
    nibbles = (q.to(torch.int64) + 8).view(rows, cols // 8, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (nibbles << shifts).sum(-1)  # disjoint bit fields: the sum is their OR
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # uint32 bits as int32
    groups = cols // GROUP_SIZE
    return {
        "qweight": words.T.contiguous(),
        "qzeros": torch.full((groups, rows // 8), 0x77777777, dtype=torch.int32, device=q.device),
        "scales": scales.T.half().contiguous(),
        "g_idx": torch.arange(cols, dtype=torch.int32, device=q.device) // GROUP_SIZE,
    }
