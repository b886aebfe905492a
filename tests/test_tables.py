"""The board's two global tables (FORMAT.md 5), the assumptions a folder records, and the older
bitstream's sign-magnitude int4 (FORMAT.md 3.1): bytes against values computed here, independently."""

import json
import shutil

import numpy as np
import pytest
from conftest import export_all

from vcu128.check.verify import bit_check
from vcu128.export.hardware import BoardOptions, pack_hardware
from vcu128.io.errors import VCUError

ROPE = "pos_in_4_token2048_ch32.bin"
ACT = "ACT_parameter_in_DDR.bin"

# FORMAT.md 5, copied by hand: the SiLU table the accelerator's public host code loads.
BOARD_WT = "0x0000 0x9310 0xa122 0xa78a 0xab4b 0xadd1 0x29a0 0x342b 0x37f6 0x397d 0x3aca 0x3bf7 0x3c5c 0x3c22 0x3c04 0x3c00"
BOARD_BIAS = "0x0000 0xa0e3 0xacd9 0xb1cf 0xb4d0 0xb6ab 0xb317 0xaacf 0x1bce 0xa83d 0xaff2 0xb451 0xb6a3 0xb274 0xa824 0x0000"
BOARD_X = "0xca00 0xc73a 0xc573 0xc454 0xc2d8 0xbdcb 0xba39 0xb3b1 0x3245 0x387b 0x3bef 0x3e25 0x4388 0x45b8 0x4900 0x0000"


@pytest.fixture(scope="module")
def hd128(tmp_path_factory):
    """A checkpoint with the board's head_dim 128 (two heads), exported with the defaults."""
    from vcu128.format.synthetic import SyntheticSpec, write_gptq_checkpoint

    spec = SyntheticSpec(hidden=256, intermediate=384, num_layers=2, num_heads=2, num_kv_heads=1, vocab=256, seed=7)
    qdir = write_gptq_checkpoint(tmp_path_factory.mktemp("hd128") / "q", spec)
    return export_all(qdir)


@pytest.fixture
def folder(hd128, tmp_path):
    qdir = tmp_path / "q"
    shutil.copytree(hd128["qdir"], qdir)
    return qdir, qdir / "compile" / "QWEN_BLOCK_write_data_port32"


def table_value(path, t, c, max_token=2048):
    """src[t][c] read at the byte FORMAT.md 5 gives: ((c // 32) * MAX_TOKEN + t) * 64 + (c % 32) * 2."""
    raw = path.read_bytes()
    at = ((c // 32) * max_token + t) * 64 + (c % 32) * 2
    return np.frombuffer(raw[at : at + 2], "<f2")[0]


def expected_rope(t, c, theta, order="halves"):
    """fp16 cos/sin of position t for channel c, computed here: the float32 inverse frequency (the
    power rounded once), the phase a float32 product (as a float32 forward computes it), cos/sin in
    double, rounded to fp16."""
    k, is_sin = (c % 64, c >= 64) if order == "halves" else (c // 2, c % 2 == 1)
    inv = np.float32(1.0) / np.float32(theta ** float(np.float32(2 * k) / np.float32(128)))
    phase = float(np.float32(t) * inv)
    return np.float16(np.sin(phase) if is_sin else np.cos(phase))


def close_to_transformers(ours: np.ndarray, theirs: np.ndarray) -> None:
    """The table against transformers' fp16 cos/sin: transformers' float32 pow and cos may each be an
    ulp off (which ulp depends on the CPU), so a few words differ, each by one fp16 step at most."""
    a, b = ours.astype(np.float64), theirs.astype(np.float64)
    step = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float64)
    assert (np.abs(a - b) <= step).all()
    assert (a != b).mean() < 0.005, (a != b).mean()


def test_rope_table_is_the_same_whatever_the_threads(tmp_path):
    """The table's bytes are a function of config.json: one, two or more threads (torch's split of a
    float32 cos once moved an ulp in half the positions), any block size, the same words."""
    import torch

    from vcu128.format.tables import rope_table, rope_table_blocks

    cfg = {"rope_theta": 1e6}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rope_table(cfg, 2048, "halves", tmp_path / "config.json")
        torch.set_num_threads(max(2, threads))
        many = np.concatenate(list(rope_table_blocks(cfg, 2048, "halves", tmp_path / "config.json", positions_a_block=300)))
    finally:
        torch.set_num_threads(threads)
    assert one.tobytes() == many.tobytes()
    ref = np.array([[expected_rope(t, c, 1e6) for c in range(128)] for t in (0, 1, 999, 1024, 2047)])
    rows = one.reshape(4, 2048, 32).transpose(1, 0, 2).reshape(2048, 128)
    assert np.array_equal(rows[[0, 1, 999, 1024, 2047]].view(np.uint16), ref.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("t", [0, 1, 2047])
@pytest.mark.parametrize("c", [0, 31, 32, 63, 64, 127])
def test_rope_table_bytes_halves(hd128, t, c):
    path = hd128["hw"] / ROPE
    assert path.stat().st_size == 4 * 2048 * 64 == 524288
    assert table_value(path, t, c) == expected_rope(t, c, 1e6)


def test_rope_table_pairs_and_whole_table_equals_transformers(folder):
    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    qdir, hw = folder
    pack_hardware(qdir / "compile", opts=BoardOptions(rope_table="pairs"), progress=False)
    for t, c in [(0, 0), (5, 1), (2047, 31), (2047, 32), (100, 127)]:
        assert table_value(hw / ROPE, t, c) == expected_rope(t, c, 1e6, "pairs"), (t, c)
    cfg = json.loads((qdir / "config.json").read_text())
    cfg.pop("quantization_config")
    rotary = Qwen2RotaryEmbedding(Qwen2Config(**cfg))
    cos, sin = rotary(torch.zeros(1, dtype=torch.float16), torch.arange(2048)[None])
    rows = np.frombuffer((hw / ROPE).read_bytes(), "<f2").reshape(4, 2048, 32).transpose(1, 0, 2).reshape(2048, 128)
    close_to_transformers(rows[:, 0::2], cos[0, :, :64].numpy())
    close_to_transformers(rows[:, 1::2], sin[0, :, :64].numpy())
    assert json.loads((hw / "manifest.json").read_text())["assumptions"]["rope_table"] == "pairs"
    assert bit_check(qdir, hw, progress=False).ok


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", [LLAMA3, {"rope_type": "linear", "factor": 4.0}], ids=["llama3", "linear"])
def test_rope_scaling_as_transformers_applies_it(make_checkpoint, scaling):
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    qdir = make_checkpoint(model_type="llama", num_heads=2, num_kv_heads=1)
    cfg = json.loads((qdir / "config.json").read_text())
    cfg.update(rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072)
    (qdir / "config.json").write_text(json.dumps(cfg))
    hw = export_all(qdir)["hw"]
    cfg.pop("quantization_config")
    rotary = LlamaRotaryEmbedding(LlamaConfig(**cfg))
    cos, sin = rotary(torch.zeros(1, dtype=torch.float16), torch.arange(2048)[None])
    rows = np.frombuffer((hw / ROPE).read_bytes(), "<f2").reshape(4, 2048, 32).transpose(1, 0, 2).reshape(2048, 128)
    close_to_transformers(rows[:, :64], cos[0, :, :64].numpy())
    close_to_transformers(rows[:, 64:], sin[0, :, :64].numpy())
    # the scaling moved the low frequencies: the table differs from the unscaled one
    assert table_value(hw / ROPE, 2047, 127) != expected_rope(2047, 127, 500000.0)


@pytest.mark.parametrize("kind", ["dynamic", "yarn"])
def test_scalings_a_static_table_cannot_hold_are_refused(make_checkpoint, kind):
    qdir = make_checkpoint(num_heads=2, num_kv_heads=1)
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": kind, "factor": 2.0}
    (qdir / "config.json").write_text(json.dumps(cfg))
    from vcu128.export.compile_sw import compile_software
    from vcu128.export.lm_head import quantize_lm_head

    compile_software(qdir, progress=False)
    quantize_lm_head(qdir, progress=False)
    with pytest.raises(VCUError, match=rf"rope scaling '{kind}': a static RoPE table holds only none, linear or llama3"):
        pack_hardware(qdir / "compile", progress=False)
    assert not (qdir / "compile" / "QWEN_BLOCK_write_data_port32").exists()


def test_head_dim_64_gets_no_rope_table_and_says_so(make_checkpoint, caplog):
    caplog.set_level("INFO", logger="vcu128")
    exp = export_all(make_checkpoint())  # 4 heads of 64, as Qwen2.5-0.5B
    hw = exp["hw"]
    assert not (hw / ROPE).exists() and (hw / ACT).is_file()
    doc = json.loads((hw / "manifest.json").read_text())
    assert doc["assumptions"]["rope_table"] == "none: head_dim 64 is not the board's 128"
    assert "no RoPE table: head_dim is 64, the board's RoPE unit rotates heads of 128" in caplog.text
    assert bit_check(exp["qdir"], hw, progress=False).ok


def test_short_trained_context_is_mentioned(make_checkpoint, caplog):
    caplog.set_level("INFO", logger="vcu128")
    qdir = make_checkpoint(num_heads=2, num_kv_heads=1)
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["max_position_embeddings"] = 1024
    (qdir / "config.json").write_text(json.dumps(cfg))
    export_all(qdir)
    assert "the model was trained on 1024 positions; the RoPE table covers the board's 2048" in caplog.text


def silu_segment_rule(table, x):
    """FORMAT.md 5, written out: the first i < 15 with x < x_region[i], else 15; wt[i] * x + bias[i]."""
    wt, bias, xr = (table[k].astype(np.float64) for k in ("wt", "bias", "x_region"))
    out = []
    for v in x:
        i = next((i for i in range(15) if v < xr[i]), 15)
        out.append(wt[i] * v + bias[i])
    return np.array(out)


def read_act(path):
    raw = path.read_bytes()
    assert len(raw) == 8192 and not any(raw[192:])
    beats = [raw[64 * b : 64 * b + 64] for b in range(3)]
    assert all(not any(b[32:]) for b in beats)
    return {k: np.frombuffer(b[:32], "<f2") for k, b in zip(("wt", "bias", "x_region"), beats, strict=True)}


def silu_error(table, lo=-16, hi=16):
    x = np.linspace(lo, hi, 32001)
    return np.abs(silu_segment_rule(table, x) - x / (1 + np.exp(-x))).max()


def test_board_silu_table_bit_for_bit_and_its_error(hd128):
    table = read_act(hd128["hw"] / ACT)
    for key, words in (("wt", BOARD_WT), ("bias", BOARD_BIAS), ("x_region", BOARD_X)):
        assert table[key].view("<u2").tolist() == [int(w, 16) for w in words.split()], key
    assert table["x_region"][0] == -12 and table["x_region"][14] == 10
    assert 0.0105 < silu_error(table) < 0.0115  # FORMAT.md 5: about 0.011


def test_fitted_silu_table_is_exact_far_out_and_within_bound(folder):
    qdir, hw = folder
    result = pack_hardware(qdir / "compile", opts=BoardOptions(silu_table="fit"), progress=False)
    table = read_act(hw / ACT)
    assert (table["wt"][0], table["bias"][0], table["wt"][15], table["bias"][15]) == (0, 0, 1, 0)  # 0 far left, x far right
    assert np.all(np.diff(table["x_region"][:15].astype(np.float64)) >= 0)
    err = silu_error(table)
    assert err < 0.006  # measured 0.0037; the board's own table: 0.011
    assert abs(result.details["tables"]["silu"]["max_error_on_-16_16"] - err) < 2e-4
    assert json.loads((hw / "manifest.json").read_text())["assumptions"]["silu_table"] == "fit"
    assert bit_check(qdir, hw, progress=False).ok


def test_silu_fit_follows_the_recorded_gate_range(folder):
    qdir, hw = folder
    (qdir / "compile" / "activation_stats.json").write_text(json.dumps({"gate_range": [-3.0, 5.0]}))
    pack_hardware(qdir / "compile", opts=BoardOptions(silu_table="fit"), progress=False)
    table = read_act(hw / ACT)
    assert silu_error(table, -3, 5) < 0.003
    assert json.loads((hw / "manifest.json").read_text())["tables"]["silu"]["fit_range"] == [-3.0, 5.0]
    assert bit_check(qdir, hw, progress=False).ok


@pytest.mark.parametrize("rel, byte, pattern", [
    (ROPE, ((127 // 32) * 2048 + 2047) * 64 + (127 % 32) * 2, r"pos_in_4_token2048_ch32.bin: fp16 word \d+, position 2047, channel 127 \(sin of frequency 63\), is"),
    (ACT, 64 + 2 * 5, r"ACT_parameter_in_DDR.bin: fp16 word 37, offset 5, is 0xb6aa, expected 0xb6ab"),
    (ACT, 300, r"ACT_parameter_in_DDR.bin: fp16 word 150, byte 300 \(must be 0\), is 0x0001, expected 0x0000"),
])
def test_verify_catches_a_flipped_bit_in_either_table(folder, rel, byte, pattern):
    import re

    qdir, hw = folder
    raw = bytearray((hw / rel).read_bytes())
    raw[byte] ^= 1
    (hw / rel).write_bytes(bytes(raw))
    found = bit_check(qdir, hw, progress=False).differences
    assert any(re.search(pattern, d) for d in found), found


def test_a_table_the_manifest_lists_and_the_folder_lacks_is_a_difference(folder):
    qdir, hw = folder
    (hw / ACT).unlink()
    assert "ACT_parameter_in_DDR.bin: missing" in " ".join(bit_check(qdir, hw, progress=False).differences)


def test_a_folder_of_the_original_scripts_passes_what_it_has(folder, caplog):
    """No manifest, no tables: ports and parts from the files, one line each for what is not checked."""
    caplog.set_level("INFO", logger="vcu128")
    qdir, hw = folder
    for name in ("manifest.json", ROPE, ACT):
        (hw / name).unlink()
    report = bit_check(qdir, hw, progress=False)
    assert report.ok, report.differences
    assert "no manifest.json" in caplog.text and "32 ports and 16 embedding parts inferred from the files" in caplog.text
    assert "pos_in_4_token2048_ch32.bin and ACT_parameter_in_DDR.bin missing" in caplog.text


# ---------------------------------------------------------------------------------------------
# Sign-magnitude int4 (FORMAT.md 3.1, end)


def test_sign_magnitude_round_trip_and_nibbles():
    from vcu128.format.layout import pack_nibbles, unpack_nibbles

    q = np.array([[0, 1, 7, -1, -2, -7, 3, -3]], np.int8)
    words = pack_nibbles(q, "sign_magnitude")
    # w for w >= 0, 8 + |w| for w < 0: -1 is 0x9, -7 is 0xF (input 8k+j in bits 4j..4j+3)
    assert words.tolist() == [[0xB3FA9710]]
    nibbles = [(int(words[0, 0]) >> 4 * j) & 0xF for j in range(8)]
    assert nibbles == [0x0, 0x1, 0x7, 0x9, 0xA, 0xF, 0x3, 0xB]
    assert unpack_nibbles(words, code="sign_magnitude").tolist() == q.tolist()


def test_sign_magnitude_folder_verifies_and_minus_8_is_refused(make_checkpoint, tmp_path):
    from vcu128.export.compile_sw import compile_software
    from vcu128.export.lm_head import quantize_lm_head

    qdir = make_checkpoint()
    compile_software(qdir, progress=False)
    quantize_lm_head(qdir, progress=False)
    comp = qdir / "compile"
    # lm_head.json says the output layer is on -8..7: refused before any work, naming the fix
    with pytest.raises(VCUError) as e:
        pack_hardware(comp, opts=BoardOptions(int4="sign_magnitude"), progress=False)
    assert str(e.value) == (f"--int4 sign_magnitude: the output layer in {comp} was quantized on the -8..7 grid (lm_head.json: method rtn, "
                            "int4_range 8), and sign-magnitude int4 has no -8; re-run lm_head.py (it follows the checkpoint's record, "
                            "or pass --int4_range 7), or pack with --int4 twos")
    # no record of the layers' grid (a checkpoint of another tool): every int is checked as it is packed
    quantize_lm_head(qdir, progress=False, int4_range=7)
    with pytest.raises(VCUError, match=r"qweight.bin: row \d+, input \d+ holds -8, which sign-magnitude int4 cannot hold \(-7..7\)"):
        pack_hardware(comp, opts=BoardOptions(int4="sign_magnitude"), progress=False)
    assert not (comp / "QWEN_BLOCK_write_data_port32").exists()
    # a checkpoint on the 15-level grid (-7..7) packs and verifies
    _clip_checkpoint_to_seven(qdir)
    compile_software(qdir, progress=False)
    quantize_lm_head(qdir, progress=False, method="rtn", int4_range=7)  # the output layer on the 15-level grid too
    hw = pack_hardware(comp, opts=BoardOptions(int4="sign_magnitude"), progress=False).out
    from vcu128.export.embedding_tokens import split_embedding

    split_embedding(comp, progress=False)
    word = np.fromfile(hw / "BLOCK00/MVM_BN_write_to_HBM_bin/MVMBN0_q_HBM_DDR_00.bin", "<u4")[8]
    q0 = np.fromfile(comp / "qwen2_qweight_bin/model.layers.0.self_attn.q_proj.qweight.bin", "<i4")[:8]
    assert [(int(word) >> 4 * j) & 0xF for j in range(8)] == [int(v) if v >= 0 else 8 - int(v) for v in q0]
    assert json.loads((hw / "manifest.json").read_text())["assumptions"]["int4"] == "sign_magnitude"
    assert bit_check(qdir, hw, progress=False).ok


def _clip_checkpoint_to_seven(qdir):
    """Move every stored nibble 0 (q = -8) to 1 (q = -7) in the checkpoint's qweights."""
    from safetensors.numpy import load_file, save_file

    for shard in qdir.glob("*.safetensors"):
        tensors = load_file(shard)
        for k, v in tensors.items():
            if k.endswith(".qweight"):
                w = v.view(np.uint32).copy()
                for j in range(8):
                    nib = (w >> np.uint32(4 * j)) & np.uint32(0xF)
                    w |= np.where(nib == 0, np.uint32(1 << 4 * j), np.uint32(0))
                tensors[k] = w.view(np.int32)
        save_file(tensors, shard)


def test_quantize_on_the_15_level_grid_gives_a_sign_magnitude_folder_that_verifies(tiny_model, tmp_path):
    from conftest import FAST

    from vcu128.export.compile_sw import compile_software
    from vcu128.export.embedding_tokens import split_embedding
    from vcu128.export.lm_head import quantize_lm_head
    from vcu128.format.checkpoint import GPTQCheckpoint
    from vcu128.quant.quantize import QuantizeOptions, quantize_model

    qdir, report = quantize_model(tiny_model, tmp_path / "q7", QuantizeOptions(**FAST, int4_range=7))
    ckpt = GPTQCheckpoint(qdir)
    q = ckpt.signed_weights(ckpt.get("model.layers.1.mlp.down_proj.qweight"))
    assert q.min() == -7 and q.max() == 7  # 15 levels, both ends used
    assert json.loads((qdir / "quantize_config.json").read_text())["meta"]["vcu128_int4_range"] == 7
    assert all(row["gptq"] < row["rtn"] for row in report["layers"])
    compile_software(qdir, progress=False)
    quantize_lm_head(qdir, progress=False, int4_range=7)
    lm = np.fromfile(qdir / "compile/qwen2_qweight_bin/lm_head_qweight.bin", "<i4")
    assert lm.min() == -7 and lm.max() == 7
    hw = pack_hardware(qdir / "compile", opts=BoardOptions(int4="sign_magnitude"), progress=False).out
    split_embedding(qdir / "compile", progress=False)
    assert bit_check(qdir, hw, progress=False).ok
