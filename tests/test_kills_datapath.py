"""Known answers for the board model's pieces (vcu128/board/datapath.py) that the op-by-op comparison
with the testbench reference (tests/test_board_reference.py) does not pin: the FP20 register format
word by word, the fp16 register's range, the names and layers every stored site is recorded under,
the statistics' order, the blocked and chunked loops of the int4 and grouped products, and that
every product stays on its input's device (the `meta` device stands in for a GPU: a tensor left on
the CPU cannot mix with it). Issue #23: each test here kills mutants that survived the module's
selection; bench/mutation.py's dispositions name them.

FP20 (`real_to_FP20`, basic_tasks.vh): 1 sign, 6 exponent (bias 31), 13 mantissa bits; exponent 0
holds m * 2^-43. The words below are worked from that definition by hand.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vcu128.board import datapath
from vcu128.board.datapath import (
    BOARD_EPS,
    FLUSH_F32,
    BoardVariant,
    Int4Weight,
    KVCache,
    LayerWeights,
    NonFinite,
    Numerics,
    Shape,
    SiteStats,
    _f32,
    _f32_bits,
    _f32_from_bits,
    attention,
    attention_weights,
    decoder_layer,
    final_norm,
    fp16_register,
    fp20_bits,
    fp20_value,
    grouped_matmul,
    linear,
    rotate,
    shared_matmul,
    silu,
    to_fp16,
)
from vcu128.io.errors import VCUError


def numerics(board: bool = True, positions: int = 8, half: int = 4, device: str = "cpu", **kw) -> Numerics:
    """Numerics with an identity RoPE (cos 1, sin 0) over `positions` positions."""
    cos, sin = torch.ones(positions, half, device=device), torch.zeros(positions, half, device=device)
    return Numerics("b" if board else "f", board, BOARD_EPS if board else 1e-6, cos, sin, **kw)


# ---------------------------------------------------------------------------------------------
# Number formats


def test_float32_helpers_round_and_reinterpret():
    """0.1 rounds to the float32 13421773 * 2^-27; the bits of -1.0 are 0xBF800000 (unsigned), and
    back. FLUSH_F32 is the float32 just above 2e-5 (2e-5 rounds down in float32)."""
    assert _f32(0.1) == 13421773 * 2.0**-27 != 0.1
    assert _f32(1.0) == 1.0 and _f32(-2.5) == -2.5
    assert _f32_bits(-1.0) == 0xBF800000 and _f32_bits(1.0) == 0x3F800000
    assert _f32_from_bits(0xBF800000) == -1.0 and _f32_from_bits(0x3EAAA000) == 1365 / 4096
    assert FLUSH_F32 == _f32_from_bits(_f32_bits(2e-5) + 1) > 2e-5 > _f32(2e-5)


# (float32 value, FP20 word), each from the definition
FP20_WORDS = [
    (0.0, 0x00000),
    (1.0, 31 << 13),  # 0x3E000: exponent 127 - 96
    (-1.0, 1 << 19 | 31 << 13),  # 0xBE000
    (1.5, 31 << 13 | 0x1000),
    (2.0**-50, 0),  # float32 exponent 77 < 84: zero
    (-(2.0**-50), 0),  # and without its sign
    (2.0**-44, 0),  # exponent 83: still zero, though half the smallest step
    (2.0**-43, 0x00001),  # exponent 84: the smallest subnormal word, 1 * 2^-43
    (2.0**-30, 0x02000),  # exponent 97: the smallest normal word (exponent 1, mantissa 0)
    (2.0**-31, 0x01000),  # exponent 96: subnormal, 4096 * 2^-43
    (-(2.0**-31), 1 << 19 | 0x01000),
    (2.0**-31 * (1 + 2.0**-13), 0x01001),  # 4096.5 * 2^-43: half rounds up
    (-(2.0**-31) * (1 + 2.0**-13), 1 << 19 | 0x01001),
    (2.0**-31 * (1 + 2.0**-14), 0x01000),  # 4096.25 * 2^-43: rounds down
    (2.0**-30 - 2.0**-44, 0x00000),  # 8191.5 * 2^-43 rounds up to 8192: the carry out of 13 bits is dropped
    (2.0 - 2.0**-14, 31 << 13),  # mantissa 0x7FFE00, bit 9 set: rounds up to 2^13, the carry dropped: 1.0
    (1 + 2.0**-14, 31 << 13 | 1),  # bit 9 set: half up
    (1 + 2.0**-14 - 2.0**-23, 31 << 13),  # bit 9 clear
    (2.0**31, 62 << 13),  # exponent 158: the largest exponent word
    (2.0**32, 62 << 13 | 0x1FFF),  # exponent 159: saturates to the largest word
    (-(2.0**32), 1 << 19 | 62 << 13 | 0x1FFF),
    (1e38, 62 << 13 | 0x1FFF),
]


@pytest.mark.parametrize(("value", "word"), FP20_WORDS)
def test_fp20_words_of_chosen_values(value, word):
    assert fp20_bits(value) == word


def test_fp20_values_of_chosen_words():
    """FP20_tp_real: exponent 0 is m/8192 * 2^-30, else 2^(e-31) * (1 + m/8192); bit 19 the sign."""
    assert fp20_value(31 << 13) == 1.0 and fp20_value(1 << 19 | 31 << 13) == -1.0
    assert fp20_value(0x01000) == 2.0**-31 and fp20_value(0x00001) == 2.0**-43
    assert fp20_value(1 << 19 | 0x01001) == -4097 * 2.0**-43
    assert fp20_value(0x02000) == 2.0**-30 and fp20_value(0x02001) == 2.0**-30 * (1 + 2.0**-13)
    assert fp20_value(62 << 13 | 0x1FFF) == 2.0**31 * (2 - 2.0**-13)
    assert fp20_value(0x26492) == 9362 / 2**25
    assert fp20_value(0) == 0.0 and fp20_value(1 << 20 | 31 << 13) == 1.0  # bits above 19 are not the sign


def test_fp16_register_truncates_and_holds_only_normal_values():
    """real_to_FP16 of a register: the float32 mantissa's top 10 bits; 2^-14..65504 (either sign)."""
    assert fp16_register(1 / 3) == 1365 / 4096 and fp16_register(-1 / 3) == -1365 / 4096
    assert fp16_register(2.0**-14) == 2.0**-14 and fp16_register(65504.0) == 65504.0 and fp16_register(-0.5) == -0.5
    for bad in (2.0**-15, 3e-7, 65505.0, -65520.0):
        with pytest.raises(VCUError) as e:
            fp16_register(bad)
        assert str(e.value) == f"fp16 register value {bad}: outside the normal fp16 range"


def test_to_fp16_rounds_to_nearest_by_default_and_names_the_roundings():
    assert to_fp16(torch.tensor([1 + 3 * 2.0**-11, 1 / 3])).tolist() == [1 + 2.0**-9, 1365 / 4096]
    with pytest.raises(VCUError) as e:
        to_fp16(torch.ones(1), "up")
    assert str(e.value) == "rounding 'up': not one of nearest, truncate"


def test_variant_errors_name_the_option_and_its_values():
    for kw, text in (({"rounding": "up"}, "rounding 'up' is not one of nearest, truncate"),
                     ({"accumulation": "fp16"}, "accumulation 'fp16' is not one of fp32, grouped"),
                     ({"variance": "biased"}, "variance 'biased' is not one of centred, mean_square")):
        with pytest.raises(VCUError) as e:
            BoardVariant(**kw)
        assert str(e.value) == f"board variant: {text}"


# ---------------------------------------------------------------------------------------------
# Storing and its statistics


def test_store_of_an_empty_tensor_records_zero():
    num = numerics()
    assert num.store(torch.empty(0, 4), 2, "q").shape == (0, 4)
    assert num.stats.max_abs == {(2, "q"): 0.0} and num.stats.saturated == {}


def test_store_stops_at_a_non_finite_value_naming_model_layer_and_site():
    num = numerics()
    with pytest.raises(NonFinite) as e:
        num.store(torch.tensor([1.0, float("inf")]), 2, "down")
    assert (e.value.model, e.value.layer, e.value.site) == ("b", 2, "down")
    assert str(e.value) == "b: non-finite value (NaN or inf) first at layer 2, down"


def test_saturation_is_counted_past_65504_on_the_board_only():
    """65504 itself is the largest fp16: not saturated. fp32 numerics never saturate."""
    board = numerics()
    assert board.store(torch.tensor([65504.0, -65504.0]), 0, "q").tolist() == [65504.0, -65504.0]
    assert board.stats.saturated == {}
    assert board.store(torch.tensor([65505.0, -7e4, 1.0]), 0, "k").tolist() == [65504.0, -65504.0, 1.0]
    assert board.stats.saturated == {(0, "k"): 2}
    fp32 = numerics(board=False)
    assert fp32.store(torch.tensor([7e4]), 0, "q").tolist() == [7e4]
    assert fp32.stats.saturated == {} and fp32.stats.max_abs == {(0, "q"): 7e4}


def test_statistics_are_listed_by_layer_then_pipeline_order_then_name():
    """Layers in order, the final norm last; sites in SITES order (q before k), others after by name;
    zero counts left out."""
    stats = SiteStats(saturated={(1, "q"): 1, ("final", "final_norm"): 4, (0, "residual_mlp"): 5, (0, "k"): 2,
                                 (0, "input_norm"): 6, (0, "q"): 3, (0, "o"): 0})
    assert [(r["layer"], r["site"], r["count"]) for r in stats.saturation_list()] == [
        (0, "q", 3), (0, "k", 2), (0, "residual_mlp", 5), (0, "input_norm", 6), (1, "q", 1), ("final", "final_norm", 4)]


# ---------------------------------------------------------------------------------------------
# The sites a decoder layer records


HIDDEN, INTER, HEADS, KV, D, T = 128, 128, 2, 1, 8, 3
BOARD_SITES = ["input_norm", "q_product", "q", "k_product", "k", "v_product", "v", "q_rope", "k_rope", "attention_scores",
               "attention_probs", "attention", "o", "residual_attention", "post_attention_norm", "gate", "up", "silu",
               "mlp_product", "down", "residual_mlp"]


def tiny_layer() -> LayerWeights:
    g = torch.Generator().manual_seed(3)
    lin = lambda o, i, bias=False: (torch.randn(o, i, generator=g).half().float() * 0.05,  # noqa: E731
                                    torch.randn(o, generator=g).half().float() * 0.1 if bias else None)
    return LayerWeights({"self_attn.q_proj": lin(HEADS * D, HIDDEN, True), "self_attn.k_proj": lin(KV * D, HIDDEN, True),
                         "self_attn.v_proj": lin(KV * D, HIDDEN, True), "self_attn.o_proj": lin(HIDDEN, HEADS * D),
                         "mlp.gate_proj": lin(INTER, HIDDEN), "mlp.up_proj": lin(INTER, HIDDEN), "mlp.down_proj": lin(HIDDEN, INTER)},
                        torch.ones(HIDDEN), torch.ones(HIDDEN))


def test_a_decoder_layer_records_every_site_under_its_layer():
    """Board numerics record each stored value (a linear with a bias: the product, then the sum) under
    (layer, site); fp32 numerics the same sites less the products and the attention's two inner steps
    (one fp32 softmax). The caches receive k and v."""
    x = torch.randn(1, T, HIDDEN, generator=torch.Generator().manual_seed(4)).half().float()
    nums = [numerics(half=D // 2), numerics(board=False, half=D // 2)]
    caches = [KVCache(), KVCache()]
    out = decoder_layer([x, x], tiny_layer(), Shape(HEADS, KV, D), nums, 3, 0, caches)
    assert [y.shape for y in out] == [(1, T, HIDDEN)] * 2
    assert list(nums[0].stats.max_abs) == [(3, s) for s in BOARD_SITES]
    assert list(nums[1].stats.max_abs) == [(3, s) for s in BOARD_SITES if s not in ("q_product", "k_product", "v_product", "attention_scores", "attention_probs")]
    assert all(c.k.shape == c.v.shape == (1, KV, T, D) for c in caches)
    h = final_norm(out[0], torch.ones(HIDDEN), nums[0])
    assert h.shape == (1, T, HIDDEN) and list(nums[0].stats.max_abs)[-1] == ("final", "final_norm")


def test_models_sharing_a_layer_must_match_their_numerics():
    """One numerics per residual stream: a mismatch is an error, not a layer run for fewer models."""
    x = torch.zeros(1, T, HIDDEN)
    with pytest.raises(ValueError):
        decoder_layer([x, x], tiny_layer(), Shape(HEADS, KV, D), [numerics(half=D // 2)], 0)
    with pytest.raises(ValueError):
        linear([x, x], (torch.ones(4, HIDDEN), None), [numerics()], 0, "q")
    with pytest.raises(ValueError):
        Int4Weight(torch.zeros(2, HIDDEN // 2, dtype=torch.uint8), torch.ones(2, 1)).apply_each([x, x], [None])


# ---------------------------------------------------------------------------------------------
# Attention and RoPE


def test_a_cached_decode_step_sees_every_earlier_position():
    """q = 0: equal scores, so position 2 weighs v0..v2 alike (p = fp16(1/3) = 1365/4096): 1365 * 18 /
    4096 = 5.9985 stores as 6.0; a step that saw only position 0 would give v0 = 3."""
    num = numerics(half=2)
    shape, cache = Shape(1, 1, 4), KVCache()
    v = torch.tensor([3.0, 6.0, 9.0])[:, None].expand(3, 4)
    attention(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), v[None, :2], shape, num, 0, 0, cache)
    out = attention(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), v[None, 2:], shape, num, 0, 2, cache)
    assert out.tolist() == [[[6.0] * 4]] and cache.k.shape == (1, 1, 3, 4)


def test_attention_weights_are_causal_by_default():
    p = attention_weights(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), numerics(half=2), 0)
    assert p[0, 0].tolist() == [[1.0, 0.0], [0.5, 0.5]]


def test_the_board_multiplies_probabilities_and_v_in_double():
    """Position 3 weighs v0..v3 by 1/4 each: 2^-26 + 2^-11 + 0 + 1, summed in double (the reference's
    `real`) and recorded so as the site's largest |value|; no fp32 sum holds it. Stored, it goes
    through float32 first (as real_to_FP16 does): 1 + 2^-11, a tie, to even: 1."""
    v = torch.tensor([2.0**-24, 2.0**-9, 0.0, 4.0])[:, None].expand(4, 4)[None]
    num = numerics(half=2)
    out = attention(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), v, Shape(1, 1, 4), num, 0, 0, None)
    assert num.stats.max_abs[(0, "attention")] == 1 + 2.0**-11 + 2.0**-26
    assert out[0, 3].tolist() == [1.0] * 4


def test_rope_turns_pairs_by_known_angles():
    """cos (0, 1), sin (1, 0): frequency 0 turns a quarter, frequency 1 not at all. Rotate-half pairs
    channel i with i + 2; GLM pairs (0, 1) and (2, 3), channels 4 and 5 pass through."""
    cos, sin = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    assert rotate(torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]]), cos, sin)[0, 0, 0].tolist() == [-3.0, 2.0, 1.0, 4.0]
    glm = rotate(torch.tensor([[[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]]]), cos, sin, "glm_interleaved")
    assert glm[0, 0, 0].tolist() == [-2.0, 1.0, 3.0, 4.0, 5.0, 6.0]


# ---------------------------------------------------------------------------------------------
# Matrix products: the blocks and chunks, the grouped rounding, the devices


def int_data(rows: int, chout: int, chin: int, seed: int):
    """Small integers: every product and sum is exact in fp16, FP20 and fp32 alike."""
    rng = np.random.default_rng(seed)
    return rng.integers(-3, 4, (rows, chin)), rng.integers(-2, 3, (chout, chin))


@pytest.mark.parametrize("rounding", ["nearest", "truncate"])
def test_grouped_products_in_small_blocks_and_chunks(monkeypatch, rounding):
    """Budgets of 5 values: 2 rows x 4 columns x 4 groups run in blocks of 2 columns, one group a
    chunk (the sum carried from chunk to chunk); 1 column, two groups a chunk. Exact either way."""
    monkeypatch.setitem(datapath.GROUPED_SUMS, "cpu", 5)
    monkeypatch.setitem(datapath.GROUPED_PARTIALS, "cpu", 5)
    for chout, seed in ((4, 0), (1, 1)):
        x, w = int_data(2, chout, 512, seed)
        got = grouped_matmul(torch.tensor(x, dtype=torch.float32), torch.tensor(w, dtype=torch.float32), rounding)
        assert got.tolist() == (x @ w.T).astype(float).tolist()
    with pytest.raises(VCUError) as e:
        grouped_matmul(torch.zeros(1, 100), torch.zeros(1, 100), rounding)
    assert str(e.value) == "grouped accumulation: 100 inputs is not a multiple of 128"


@pytest.mark.parametrize("rounding", ["nearest", "truncate"])
def test_group_sums_saturate_at_65504_before_adding(rounding):
    """Group 0 sums +-70000, stored as +-65504 (either rounding); group 1 adds -+1000: +-64504."""
    x = torch.zeros(2, 256)
    x[0, 0], x[0, 128], x[1, 0], x[1, 128] = 7e4, -1000.0, -7e4, 1000.0
    assert grouped_matmul(x, torch.ones(1, 256), rounding).tolist() == [[64504.0], [-64504.0]]


def int4(w: np.ndarray, scales: np.ndarray) -> Int4Weight:
    """w (integers -8..7) packed two a byte, input 2k in the low nibble, stored as q + 8."""
    q = (w + 8).astype(np.uint8)
    return Int4Weight(torch.from_numpy(q[:, 0::2] | q[:, 1::2] << 4), torch.from_numpy(scales.astype(np.float32)))


def test_int4_products_in_blocks_of_rows(monkeypatch):
    """Five output rows decoded two at a time (the last block one row) give x @ W.T, W = q * scale;
    x [2, 3, chin] keeps its leading shape."""
    monkeypatch.setattr(Int4Weight, "ROWS", 2)
    x, w = int_data(6, 5, 256, 2)
    scales = np.array([[1, 2], [0.5, 1], [2, 2], [1, 0.25], [4, 1]])
    want = x @ (w * np.repeat(scales, 128, 1)).T
    got = int4(w, scales).apply(torch.tensor(x, dtype=torch.float32).view(2, 3, 256))
    assert got.shape == (2, 3, 5) and got.reshape(6, 5).tolist() == want.tolist()


def test_int4_products_in_the_grouped_accumulation():
    """Group 0 sums 1, group 1 3 * 2^-15 (0.75 of an FP20 step at 1): nearest adds a step, truncate
    none; one fp32 sum keeps it whole."""
    w = np.zeros((1, 256), int)
    w[0, [0, 128]] = 1
    x = torch.zeros(1, 256)
    x[0, 0], x[0, 128] = 1.0, 3 * 2.0**-15
    weight = int4(w, np.ones((1, 2)))
    assert [weight.apply(x, r).item() for r in (None, "nearest", "truncate")] == [1 + 3 * 2.0**-15, 1 + 2.0**-13, 1.0]


def test_shared_matmul_defaults_to_one_fp32_sum():
    x, w = int_data(3, 2, 128, 5)
    xs = [torch.tensor(x, dtype=torch.float32)]
    assert shared_matmul(xs, torch.tensor(w, dtype=torch.float32))[0].tolist() == (x @ w.T).astype(float).tolist()


def test_products_stay_on_their_inputs_device():
    """The `meta` device in place of a GPU: moving a weight there moves all of it (and moving to
    where it is changes nothing), and a product's output, buffers and masks follow the input."""
    weight = int4(np.zeros((3, 256), int), np.ones((3, 2)))
    assert weight.to("cpu") is weight
    moved = weight.to("meta")
    assert moved.nibbles.device.type == moved.scales.device.type == "meta"
    x = torch.zeros(2, 256, device="meta")
    assert moved.apply(x).device.type == moved.apply(x, "nearest").device.type == "meta"
    assert grouped_matmul(x, torch.zeros(3, 256, device="meta"), "truncate").device.type == "meta"
    layer = LayerWeights({"mlp.up_proj": (torch.zeros(2, 2), None)}, torch.ones(2), torch.ones(2)).to("meta")
    assert layer.linears["mlp.up_proj"][0].device.type == layer.input_norm.device.type == "meta"
    assert layer.linears["mlp.up_proj"][1] is None
    for board in (True, False):
        num = numerics(board, device="meta", half=2, track=False)
        assert attention_weights(*[torch.zeros(1, 1, 2, 4, device="meta")] * 2, num, 0).device.type == "meta"
    table = SimpleNamespace(wt=np.ones(16, np.float16), bias=np.zeros(16, np.float16), x_region=np.arange(16, dtype=np.float16))
    assert silu(torch.zeros(3, device="meta"), numerics(silu_table=table)).device.type == "meta"
