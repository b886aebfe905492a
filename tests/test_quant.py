"""lm_head quantization (FORMAT.md 2): the trunc rule bit for bit, rtn, and the error they make."""

import numpy as np
import pytest
import reference as ref

from vcu128.quant.rtn import dequantize_rows, quantize_rows


def test_trunc_literal_groups():
    w = np.zeros((4, 128), np.float32)
    w[0, :3] = [7.0, -3.5, 1.9]  # max reaches |min|: scale 1.0
    w[1, :3] = [-8.0, 3.9, 6.99]  # |min| larger: scale 1.0; 6.99 truncates to 6
    w[2, :] = -np.linspace(0.5, 4.0, 128)  # all negative: max -0.5 < |min| 4: scale 0.5
    # row 3 all zero: scale 0, q 0
    q, s = quantize_rows(w, "trunc")
    assert s.tolist() == [[1.0], [1.0], [0.5], [0.0]]
    assert q[0, :3].tolist() == [7, -3, 1]
    assert q[1, :3].tolist() == [-8, 3, 6]
    assert q[2, 0] == -1 and q[2, -1] == -8 and (q[2] <= -1).all()
    assert not q[3].any()


def test_trunc_largest_element_can_come_out_as_six():
    # FORMAT.md: "Rounding in that division means the largest element can come out as 6": for these
    # values float32(mx / 7) is rounded up, so mx / scale is just under 7 and truncates to 6.
    rng = np.random.default_rng(0)
    cands = rng.uniform(0.01, 1, 4096).astype(np.float32)
    sixes = [x for x in cands if np.trunc(x / (x / np.float32(7))) == 6]
    assert sixes, "no float32 value shows the rule (the premise of this test broke)"
    w = np.zeros((1, 128), np.float32)
    w[0, 0] = sixes[0]
    q, _ = quantize_rows(w, "trunc")
    assert q[0, 0] == 6


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_trunc_matches_literal_reference(dtype):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((6, 384)) * rng.uniform(0.001, 2, (6, 1))).astype(dtype)
    w[2, 128:256] = 0  # an all-zero group
    w[3, :128] = -np.abs(w[3, :128])  # an all-negative group
    q, s = quantize_rows(w, "trunc")
    for r in range(6):
        for g in range(3):
            scale, ints = ref.trunc_group(w[r, 128 * g : 128 * (g + 1)])
            assert q[r, 128 * g : 128 * (g + 1)].tolist() == ints, (r, g)
            assert s[r, g].view(np.uint16) == np.float16(scale).view(np.uint16)


def test_rtn_never_worse_than_trunc_and_error_is_bounded():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 1024)) * 0.02).astype(np.float16)
    errs = {}
    for method in ("trunc", "rtn"):
        q, s = quantize_rows(w, method)
        assert q.min() >= -8 and q.max() <= 7
        w_hat = dequantize_rows(q, s)
        errs[method] = np.linalg.norm(w.astype(np.float32) - w_hat) / np.linalg.norm(w.astype(np.float32))
    assert errs["rtn"] <= errs["trunc"]
    # Gaussian weights, 16 levels over the group's range: about 8-10% for rtn, about twice that for trunc.
    assert 0.05 < errs["rtn"] < 0.13
    assert 0.12 < errs["trunc"] < 0.25


def test_rtn_is_nearest_level():
    w = np.zeros((1, 128), np.float32)
    w[0, :4] = [7.0, 2.5, 2.6, -3.4]  # scale 1.0
    q, _ = quantize_rows(w, "rtn")
    assert q[0, :4].tolist() == [7, 2, 3, -3]  # 2.5 ties to even


@pytest.mark.parametrize("rows, cols", [(1, 128), (17, 3584), (100, 640), (40, 18944)])
@pytest.mark.parametrize("method", ["rtn", "trunc"])
def test_strips_give_the_whole_blocks_arithmetic(rows, cols, method):
    """quantize_rows and dequantize_rows work a strip of rows at a time: the same numbers as the
    whole block at once (row by row the arithmetic is the same), for any row count."""
    from vcu128.quant.rtn import _quantize_strip

    w = (np.random.default_rng(7).standard_normal((rows, cols)) * 0.02).astype(np.float16)
    w[0, :128] = 0  # an all-zero group: q = 0 there
    q, s = quantize_rows(w, method)
    q_whole, s_whole = _quantize_strip(w, method, -8)
    assert np.array_equal(q, q_whole) and np.array_equal(s.view(np.uint16), s_whole.view(np.uint16))
    assert not q[0, :128].any()
    whole = (q.reshape(rows, -1, 128).astype(np.float32) * s.astype(np.float32)[..., None]).reshape(rows, cols)
    assert np.array_equal(dequantize_rows(q, s).view(np.uint32), whole.view(np.uint32))
