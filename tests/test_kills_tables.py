"""Known answers for vcu128/format/tables.py that mutation testing (bench/mutation.py, issue #23)
showed missing: the RoPE parameters read from config.json (every value, every refusal word for
word), the inverse frequencies (float32 steps, llama3's band edges), the table's pieces, and
--max_token's bounds. Direct calls only, milliseconds each."""

from pathlib import Path

import numpy as np
import pytest

from vcu128.format.tables import (
    check_max_token,
    rope_cos_sin,
    rope_inv_freq,
    rope_parameters,
    rope_rotary_dim,
    rope_rows,
    rope_table,
    rope_table_blocks,
    rope_values,
)
from vcu128.io.errors import VCUError

WHERE = Path("model/config.json")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
TWO_PI = np.float32(2 * np.pi)  # the wavelength of the first frequency (inv_freq[0] = theta^0 = 1)


def refusal(call, *args) -> str:
    with pytest.raises(VCUError) as e:
        call(*args)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# --max_token

MAX_TOKEN_MESSAGE = ("--max_token {}: expected 1 to 16777216 (2^24: float32 positions are exact up to there, "
                     "and the table, 256 bytes a position, then fills the board's 32-bit address space)")


@pytest.mark.parametrize("value", [1, 2, 1 << 24])
def test_max_token_takes_1_to_2_to_the_24(value):
    check_max_token(value)


@pytest.mark.parametrize("value", [0, -1, (1 << 24) + 1, True, False, 2.0, "5"])
def test_max_token_outside_its_bounds_or_not_an_int_is_refused_word_for_word(value):
    assert refusal(check_max_token, value) == MAX_TOKEN_MESSAGE.format(value)


# ---------------------------------------------------------------------------------------------
# rope_values: theta and the scaling, from every place a config keeps them


@pytest.mark.parametrize(
    "cfg, theta, scaling",
    [
        ({}, 10000.0, {"rope_type": "default"}),
        ({"rope_theta": None}, 10000.0, {"rope_type": "default"}),
        ({"rope_theta": 500000}, 500000.0, {"rope_type": "default"}),
        ({"rope_theta": 1.5}, 1.5, {"rope_type": "default"}),  # just above 1: theta must exceed 1, nothing more
        ({"rope_parameters": {"rope_theta": 500000.0}}, 500000.0, {"rope_theta": 500000.0, "rope_type": "default"}),
        ({"rope_parameters": {"rope_theta": 1.5}}, 1.5, {"rope_theta": 1.5, "rope_type": "default"}),
        # transformers 5's rope_parameters win over the old top-level rope_theta
        ({"rope_theta": 10000.0, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, 500000.0,
         {"rope_theta": 500000.0, "rope_type": "default"}),
        ({"rope_theta": 7.0, "rope_parameters": {"rope_theta": None}}, 7.0, {"rope_theta": None, "rope_type": "default"}),
        # an older config's scaling names its kind 'type'
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, 10000.0, {"type": "linear", "factor": 2.0, "rope_type": "linear"}),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_parameters": {"factor": 4.0}}, 10000.0,
         {"rope_type": "linear", "factor": 4.0}),
        ({"rope_scaling": {**LLAMA3}}, 10000.0, LLAMA3),
        ({"model_type": "chatglm"}, 10000.0, {"rope_type": "default"}),
        ({"model_type": "chatglm", "rope_ratio": 50}, 500000.0, {"rope_type": "default"}),
        ({"model_type": "chatglm", "rope_ratio": 0.5, "rope_theta": 3.0}, 5000.0, {"rope_type": "default"}),
    ],
)
def test_rope_values_known_answers(cfg, theta, scaling):
    got = rope_values(cfg, WHERE)
    assert got == (theta, scaling)
    assert isinstance(got[0], float)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"model_type": "chatglm", "rope_ratio": "x"}, "'rope_ratio' is 'x', expected a finite number"),
        ({"model_type": "chatglm", "rope_ratio": 0}, "'rope_ratio' is 0.0, expected a number above 0"),
        ({"rope_parameters": [1]}, "'rope_parameters' is [1], expected an object or null"),
        ({"rope_scaling": "linear"}, "'rope_scaling' is 'linear', expected an object or null"),
        ({"rope_theta": 1.0}, "'rope_theta' is 1.0, expected a number above 1"),
        ({"rope_theta": 0.5}, "'rope_theta' is 0.5, expected a number above 1"),
        ({"rope_theta": "1e4"}, "'rope_theta' is '1e4', expected a finite number"),
        ({"rope_parameters": {"rope_theta": 1.0}}, "'rope_parameters.rope_theta' is 1.0, expected a number above 1"),
        ({"rope_parameters": {"rope_theta": "x"}}, "'rope_parameters.rope_theta' is 'x', expected a finite number"),
        ({"rope_scaling": {"rope_theta": 0.25}}, "'rope_scaling.rope_theta' is 0.25, expected a number above 1"),
        ({"rope_parameters": {"rope_type": "linear"}}, "missing 'factor'"),
        ({"rope_scaling": {"rope_type": "linear"}}, "missing 'factor'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "'rope_scaling.factor' is 0.0, expected a number above 0"),
        ({"rope_scaling": {"type": "linear", "factor": -1}}, "'rope_scaling.factor' is -1.0, expected a number above 0"),
        ({"rope_parameters": {"rope_type": "linear", "factor": "2"}}, "'rope_parameters.factor' is '2', expected a finite number"),
        ({"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "factor"}}, "missing 'factor'"),
        ({"rope_scaling": {**LLAMA3, "factor": 0.0}}, "'rope_scaling.factor' is 0.0, expected a number above 0"),
        ({"rope_scaling": {**LLAMA3, "low_freq_factor": 0}}, "'rope_scaling.low_freq_factor' is 0.0, expected a number above 0"),
        ({"rope_scaling": {**LLAMA3, "high_freq_factor": 0}}, "'rope_scaling.high_freq_factor' is 0.0, expected a number above 0"),
        ({"rope_parameters": {**LLAMA3, "high_freq_factor": None}}, "missing 'rope_parameters.high_freq_factor'"),
        ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}},
         "'rope_scaling.high_freq_factor' equals 'rope_scaling.low_freq_factor' (1.0): llama3 scaling divides by their difference"),
        ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 0.5}},
         "'rope_scaling.original_max_position_embeddings' is 0.5, expected an integer"),
        ({"rope_scaling": {"rope_type": 5}}, "'rope_scaling.rope_type' is 5, expected a string"),
        ({"rope_parameters": {"type": [1]}}, "'rope_parameters.type' is [1], expected a string"),
    ],
)
def test_rope_values_refusals_name_the_file_and_key_word_for_word(cfg, message):
    assert refusal(rope_values, cfg, WHERE) == f"{WHERE}: {message}"


@pytest.mark.parametrize("kind", ["dynamic", "yarn"])
def test_a_scaling_a_static_table_cannot_hold_is_refused_word_for_word(kind):
    assert refusal(rope_parameters, {"rope_scaling": {"rope_type": kind, "factor": 2.0}}, WHERE) == (
        f"{WHERE}: rope scaling '{kind}': a static RoPE table holds only none, linear or llama3 "
        "(dynamic and YaRN scaling change with the sequence)")


# ---------------------------------------------------------------------------------------------
# rope_inv_freq: transformers' formula, every step in float32


@pytest.mark.parametrize("head_dim", [96, 80, 128])
def test_inverse_frequencies_divide_the_exponent_in_float32(head_dim):
    """arange(0, d, 2).float() / d is a float32 division: for a head of 96 or 80, i / d is not a
    float32 number, and the float64 quotient gives other frequencies (26 of 48 for 96)."""
    got = rope_inv_freq({"rope_theta": 10000.0}, head_dim, WHERE)
    want = [np.float32(1.0) / np.float32(10000.0 ** float(np.float32(i) / np.float32(head_dim))) for i in range(0, head_dim, 2)]
    assert got.dtype == np.float32 and got.shape == (head_dim // 2,)
    assert got.view(np.uint32).tolist() == np.array(want, np.float32).view(np.uint32).tolist()


def test_llama3_frequencies_as_transformers_computes_them_with_a_low_factor_of_2():
    """low_freq_factor 2 (the usual 1 hides old_len / low against old_len * low)."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {**LLAMA3, "low_freq_factor": 2.0, "high_freq_factor": 4.0}
    got = rope_inv_freq({"rope_theta": 500000.0, "rope_scaling": scaling}, 128, WHERE)
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_theta=500000.0, rope_scaling=scaling,
                         max_position_embeddings=131072)
    want = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))[0].numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    # the three bands: wavelengths below 8192 / 4 kept, above 8192 / 2 divided by 8, smoothed between
    wavelen = 2 * np.pi / rope_inv_freq({"rope_theta": 500000.0}, 128, WHERE).astype(np.float64)
    unscaled = rope_inv_freq({"rope_theta": 500000.0}, 128, WHERE)
    assert np.array_equal(got[wavelen < 2048], unscaled[wavelen < 2048])
    assert np.array_equal(got[wavelen > 4096], unscaled[wavelen > 4096] / np.float32(8))
    medium = (wavelen > 2048) & (wavelen < 4096)
    assert medium.any() and np.all(got[medium] < unscaled[medium]) and np.all(got[medium] > unscaled[medium] / 8)


@pytest.mark.parametrize("kind", [LLAMA3, {"rope_type": "linear", "factor": 4.0}, {"rope_type": "default"}])
def test_inverse_frequencies_are_float32_whatever_the_scaling(kind):
    got = rope_inv_freq({"rope_theta": 500000.0, "rope_scaling": kind}, 128, WHERE)
    assert got.dtype == np.float32 and got.shape == (64,)


def llama3_tie(old_len: int, low: float, high: float) -> dict:
    return {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low, "high_freq_factor": high,
                                                    "original_max_position_embeddings": old_len}}


def test_a_wavelength_exactly_on_the_low_band_edge_is_smoothed_there():
    """old_len / low_freq_factor == float32(2 pi) exactly, the first frequency's wavelength: it is
    neither above low_wavelen (divided by factor) nor below high_wavelen, so the smoothed branch
    takes it, with a smoothing of 0 there: 1 / factor, the value the band below gives at its edge."""
    low = 1.1140846014022827  # a float32 number: float32(7) / float32(low) == float32(2 pi)
    assert np.float32(7) / np.float32(low) == TWO_PI
    got = rope_inv_freq(llama3_tie(7, low, 2 * low), 128, WHERE)
    assert got[0] == np.float32(0.125)


def test_a_wavelength_exactly_on_the_high_band_edge_is_smoothed_there():
    """old_len / high_freq_factor == float32(2 pi) exactly: not below high_wavelen, so smoothed, with
    a smoothing of 1 - 2^-23 in float32 here: one ulp above the unscaled 1.0 it would keep if the
    edge counted as below (transformers' `~(wavelen < high_freq_wavelen)` counts it as medium)."""
    high = 3.6605634689331055  # float32(23) / float32(high) == float32(2 pi)
    assert np.float32(23) / np.float32(high) == TWO_PI
    got = rope_inv_freq(llama3_tie(23, 1.0, high), 128, WHERE)
    smooth = (np.float32(23) / TWO_PI - np.float32(1.0)) / (np.float32(high) - np.float32(1.0))
    assert got[0] == (1 - smooth) * np.float32(1.0) / np.float32(8.0) + smooth * np.float32(1.0) == np.nextafter(np.float32(1), np.float32(2))


# ---------------------------------------------------------------------------------------------
# rope_cos_sin, rope_rows, rope_table, rope_table_blocks


def test_cos_sin_use_the_inverse_frequencies_given_rounded_to_float32():
    got_cos, got_sin = rope_cos_sin({}, 4, 3, WHERE, inv_freq=[1.0, 0.5])  # not the config's [1, 0.01]
    phase = np.arange(3, dtype=np.float64)[:, None] * np.array([1.0, 0.5])
    assert got_cos.dtype == got_sin.dtype == np.float16
    assert np.array_equal(got_cos, np.cos(phase).astype(np.float16)) and np.array_equal(got_sin, np.sin(phase).astype(np.float16))
    # a float64 frequency is rounded to float32 first: the phase is float32(t) * float32(0.1) in float32
    # (at t ~ 1e6 float64's product moves several fp16 values)
    cos, sin = rope_cos_sin({}, 2, 8, WHERE, start=1_000_000, inv_freq=[0.1])
    t = np.arange(1_000_000, 1_000_008, dtype=np.float32)[:, None]
    phase = (t * np.float32(0.1)).astype(np.float64)
    assert np.array_equal(cos, np.cos(phase).astype(np.float16)) and np.array_equal(sin, np.sin(phase).astype(np.float16))


def test_a_bad_theta_names_the_config_through_every_table_function():
    message = f"{WHERE}: 'rope_theta' is 0.5, expected a number above 1"
    assert refusal(rope_cos_sin, {"rope_theta": 0.5}, 128, 1, WHERE) == message
    assert refusal(rope_table, {"rope_theta": 0.5}, 4, "halves", WHERE) == message
    assert refusal(lambda: next(rope_table_blocks({"rope_theta": 0.5}, 4, "halves", WHERE))) == message


def test_the_rotary_dim_is_an_int_of_channels():
    assert [rope_rotary_dim(o) for o in ("halves", "pairs", "glm")] == [128, 128, 64]
    assert all(type(rope_rotary_dim(o)) is int for o in ("halves", "pairs", "glm"))


def test_an_unknown_rope_order_is_refused_word_for_word():
    message = "--rope_table rows: expected one of halves, pairs, glm"
    cos = np.zeros((2, 64), np.float16)
    assert refusal(rope_rows, cos, cos, "rows") == message
    assert refusal(rope_table, {}, 2, "rows", WHERE) == message
    assert refusal(lambda: next(rope_table_blocks({}, 2, "rows", WHERE))) == message


@pytest.mark.parametrize("order", ["halves", "pairs", "glm"])
def test_the_table_in_pieces_is_a_flat_fp16_stream_of_the_whole_table(order):
    whole = rope_table({"rope_theta": 1e6}, 5, order, WHERE)
    pieces = list(rope_table_blocks({"rope_theta": 1e6}, 5, order, WHERE, positions_a_block=2))
    # four blocks of 32 channels, each in runs of 2, 2 and 1 positions
    assert [p.shape for p in pieces] == [(64,), (64,), (32,)] * 4
    assert all(p.dtype == np.float16 for p in pieces)
    assert np.concatenate(pieces).view(np.uint16).tolist() == whole.view(np.uint16).tolist()
