"""GPTQ for one weight matrix: symmetric 4-bit, group 128, no act-order (the board's only format).

The algorithm is GPTQ (Frantar et al., 2022) as GPTQModel 7.6 runs it by default: H = 2/N X^T X,
damped by 5% of its mean diagonal (1% more on each failed Cholesky); columns quantized in blocks
of 128, each column's rounding error spread over the columns not yet quantized through the upper
Cholesky factor of H^-1; and GPTQModel's "act-group-aware" order (GAR): whole groups are taken in
order of their largest H diagonal, and inside a group the columns by decreasing H diagonal. The
groups stay the checkpoint's plain groups of 128 consecutive inputs (g_idx = input // 128), so
the board sees an ordinary checkpoint. Two differences, both deliberate:

- a group's scale is rounded to fp16 *before* its columns are quantized, so the error feedback
  sees exactly the weights the board computes with (GPTQModel rounds it afterwards, on saving);
- rows that share one input (q/k/v, gate/up) are solved as one matrix: GPTQ treats rows
  independently, so this is the same result for a third of the column loops.

The column loop inside a block is sequential by nature: 128 steps of a few small kernels. On a
GPU it is captured once per row count as a CUDA graph and replayed, which removes the per-kernel
launch cost that otherwise dominates; on the CPU it runs eagerly.
"""

from __future__ import annotations

import torch

from .errors import VCUError
from .model import GROUP_SIZE

BITS = 4
QMIN, QMAX = -(1 << (BITS - 1)), (1 << (BITS - 1)) - 1  # signed levels -8..7 (stored unsigned with zero 8)
DAMP_PERCENT = 0.05  # GPTQModel 7.6's damp_percent and damp_auto_increment
DAMP_STEP = 0.01


def add_to_hessian(H: torch.Tensor, x: torch.Tensor) -> None:
    """H += x^T x over the rows of x [tokens, chin], accumulated in fp32.

    On a GPU, fp16/bf16 inputs go to the tensor cores with an fp32 output: the products of two
    16-bit values are exact in fp32, so this equals converting to fp32 first, at half the cost.
    """
    x = x.reshape(-1, x.shape[-1])
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        H.add_(torch.mm(x.T, x, out_dtype=torch.float32))
    else:
        H.addmm_(x.T.float(), x.float())


def hessian_inverse_factor(H: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = H^-1), with GPTQModel's damping
    schedule. H is consumed (damped in place)."""
    step = DAMP_PERCENT * H.diagonal().mean()
    damp = DAMP_PERCENT
    H.diagonal().add_(step)
    while True:
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U
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


class BlockSolver:
    """The sequential part of GPTQ: quantize the 128 columns of a block one after another, each
    column's error pushed onto the columns right of it. Works on the block transposed
    ([128, rows], so a column is contiguous) in fixed buffers, which a CUDA graph can replay."""

    def __init__(self, rows: int, device: torch.device, qmin: int = QMIN):
        self.qmin = qmin
        self.w = torch.empty(GROUP_SIZE, rows, device=device)  # in: the block's weights; out: each column as quantized
        self.q = torch.empty(GROUP_SIZE, rows, device=device)  # out: signed ints as floats
        self.g = torch.empty(GROUP_SIZE, GROUP_SIZE, device=device)  # in: rows of Hinv1, each divided by its diagonal
        self.scale = torch.empty(rows, device=device)
        self.graph = None
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # warm up outside the graph, as CUDA graph capture requires
                self._columns()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._columns()

    def _columns(self) -> None:
        w, q, g, scale = self.w, self.q, self.g, self.scale
        err = torch.empty_like(scale)
        for i in range(GROUP_SIZE):
            torch.div(w[i], scale, out=q[i])
            q[i].round_().clamp_(self.qmin, QMAX)
            torch.mul(q[i], scale, out=err)
            torch.sub(w[i], err, out=err)
            if i + 1 < GROUP_SIZE:
                w[i + 1 :].addr_(g[i, i + 1 :], err, alpha=-1)

    def solve(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._columns()


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, name: str, solvers: dict | None = None, qmin: int = QMIN) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-quantize W [rows, cols] (any float dtype) against the Hessian H [cols, cols] (fp32,
    consumed). Returns (q int8 [rows, cols] in qmin..7, scales float32 [rows, cols/128], fp16 values).
    `solvers` caches a BlockSolver (and its CUDA graph) per row count across calls."""
    rows, cols = W.shape
    if cols % GROUP_SIZE:
        raise VCUError(f"{name}: {cols} inputs is not a multiple of the group size {GROUP_SIZE}")
    solvers = {} if solvers is None else solvers
    key = (rows, W.device, qmin)
    if key not in solvers:
        solvers[key] = BlockSolver(rows, W.device, qmin)
    solver = solvers[key]
    dead = H.diagonal() == 0  # inputs that were always zero: any weight there is free
    H.diagonal()[dead] = 1
    perm, group_order = group_aware_order(H.diagonal())
    W = W.float()[:, perm]
    W[:, dead[perm]] = 0
    U = hessian_inverse_factor(H[perm][:, perm], name)
    del H
    q = torch.empty(rows, cols, dtype=torch.int8, device=W.device)
    scales = torch.empty(rows, cols // GROUP_SIZE, device=W.device)
    for b, i1 in enumerate(range(0, cols, GROUP_SIZE)):
        i2 = i1 + GROUP_SIZE
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        scale = group_scales(W[:, i1:i2], qmin)
        scales[:, group_order[b]] = scale
        solver.scale.copy_(scale)
        solver.g.copy_(U1 / d[:, None])
        solver.w.copy_(W[:, i1:i2].T)
        solver.solve()
        q[:, perm[i1:i2]] = solver.q.T.to(torch.int8)
        if i2 < cols:
            # The block's scaled errors (w - q s) / d, carried to every later column at once.
            err = (solver.w - solver.q * solver.scale).div_(d[:, None])
            W[:, i2:].addmm_(err.T, U[i1:i2, i2:], alpha=-1)
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
