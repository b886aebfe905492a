"""GPTQ's 128-column block loop as one Triton kernel (GPUs only; the CPU runs gptq.solve_block_eager).

GPTQ treats rows independently: a column's rounding error moves only that row's later columns.
So each program takes a slice of BLOCK_R rows and walks the block's 128 columns with the slice in
registers: quantize column j, push its error onto columns j+1.., next column. One launch does the
whole block (the eager loop is 128 steps of five kernels), and the feedback to the columns right
of the block stays one matrix product outside (gptq.gptq_quantize).

The arithmetic is the eager solver's, operation for operation: the fp16-rounded group scale,
q = clamp(rint(w / s)), the error w - q s (exact: q s has at most 15 significant bits), and the
feedback w_k -= e U[j, k] / U[j, j]. Only the rounding of that last multiply-add could differ (a
fused multiply-add on the GPU); `bench_quantize.py --runs check` compares the two on one GPU from
the same factor (measured on an H200: no int differs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vcu128.format.model import GROUP_SIZE

ROWS_A_PROGRAM = 16  # rows a program: two [16, 128] fp32 tiles stay in registers at 4 warps


@triton.jit
def _rint(x):
    """Round half to even, as torch.round (exact for |x| < 2^22, far beyond the int4 grid)."""
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _gptq_block_kernel(w_ptr, w_stride, u_ptr, u_stride, u_col_stride, q_ptr, q_stride, s_ptr, s_stride, rows,
                       scale_factor, qmin, qmax, BLOCK_R: tl.constexpr, N: tl.constexpr):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.arange(0, N)
    live = row < rows
    w = tl.load(w_ptr + row[:, None] * w_stride + col[None, :], mask=live[:, None], other=0.0)

    # The group's scale, from the block's weights as they stand now, rounded to fp16 (group_scales).
    amax = tl.max(tl.abs(w), axis=1)
    amax = tl.where(amax == 0.0, 1.0, amax)
    scale = tl.maximum(amax * scale_factor, 5.9604644775390625e-08).to(tl.float16).to(tl.float32)

    q = tl.zeros([BLOCK_R, N], dtype=tl.float32)
    for j in range(N):
        here = col[None, :] == j
        wj = tl.sum(tl.where(here, w, 0.0), axis=1)  # column j: a sum of one value and zeros, exact
        qj = tl.minimum(tl.maximum(_rint(tl.math.div_rn(wj, scale)), qmin), qmax)
        ej = wj - qj * scale
        d = tl.load(u_ptr + j * u_stride + j * u_col_stride)
        g = tl.math.div_rn(tl.load(u_ptr + j * u_stride + col * u_col_stride, mask=col > j, other=0.0), d)
        w = w - ej[:, None] * g[None, :]  # the later columns take the error (g is 0 up to column j)
        q = tl.where(here, qj[:, None], q)

    tl.store(q_ptr + row[:, None] * q_stride + col[None, :], q.to(tl.int8), mask=live[:, None])
    tl.store(s_ptr + row * s_stride, scale, mask=live)


def solve_block(w: torch.Tensor, u: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, qmin: int, qmax: int) -> None:
    """Quantize one block, as gptq.solve_block_eager. w: [rows, 128] fp32 (unit column stride), the
    block's weights after the earlier blocks' feedback; u: [128, 128], U's diagonal block there.
    Writes q [rows, 128] int8 (unit column stride) and scales [rows] (the block's group scale)."""
    rows = w.shape[0]
    assert w.stride(1) == 1 and q.stride(1) == 1
    grid = (triton.cdiv(rows, ROWS_A_PROGRAM),)
    _gptq_block_kernel[grid](w, w.stride(0), u, u.stride(0), u.stride(1), q, q.stride(0), scales, scales.stride(0), rows,
                             2.0 / (qmax - qmin), float(qmin), float(qmax), BLOCK_R=ROWS_A_PROGRAM, N=GROUP_SIZE, num_warps=4)
