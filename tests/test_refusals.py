"""Bad input: one clear error naming the tensor or file and the rule, and nothing left behind."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, export_all
from safetensors.numpy import load_file, save_file

from vcu128.export.compile_sw import compile_software
from vcu128.export.embedding_tokens import split_embedding
from vcu128.export.hardware import pack_hardware
from vcu128.export.lm_head import quantize_lm_head
from vcu128.io.errors import VCUError


def edit_tensor(qdir, name, change):
    shard = qdir / json.loads((qdir / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = change(tensors[name].copy())
    save_file(tensors, shard)


def edit_quant_config(qdir, **values):
    for f in ("config.json", "quantize_config.json"):
        doc = json.loads((qdir / f).read_text())
        (doc["quantization_config"] if f == "config.json" else doc).update(values)
        (qdir / f).write_text(json.dumps(doc))


def set_nibble(word_array, index, nibble, value):
    w = word_array.view(np.uint32)
    w[index] = (w[index] & ~np.uint32(0xF << 4 * nibble)) | np.uint32(value << 4 * nibble)
    return word_array


def assert_refused(qdir, pattern):
    """compile_sw refuses with `pattern`, and neither the compile folder nor a staging folder exists."""
    before = sorted(p.name for p in qdir.iterdir())
    with pytest.raises(VCUError, match=pattern):
        compile_software(qdir, progress=False)
    assert sorted(p.name for p in qdir.iterdir()) == before


Q = "model.layers.1.self_attn.q_proj"


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda q: edit_quant_config(q, bits=8), r"bits=8: the board supports 4-bit weights only"),
        (lambda q: edit_quant_config(q, group_size=64), r"group_size=64: the board supports group size 128 only"),
        (lambda q: edit_quant_config(q, sym=False), r"sym=false: asymmetric"),
        (lambda q: edit_quant_config(q, desc_act=True), r"desc_act=true: act-order"),
        (lambda q: edit_quant_config(q, checkpoint_format="marlin"), r"checkpoint_format='marlin'"),
        (
            lambda q: edit_tensor(q, f"{Q}.qzeros", lambda z: set_nibble(z, (1, 3), 5, 0x6)),
            rf"{Q}.qzeros: asymmetric: group 1, column 29 has zero point 7 \(stored 0x6, format gptq\)",
        ),
        (
            lambda q: edit_tensor(q, f"{Q}.g_idx", lambda g: np.concatenate([g[128:], g[:128]])),
            rf"{Q}.g_idx: act-order: input row 0 is in group 1, expected 0",
        ),
        (lambda q: edit_tensor(q, f"{Q}.scales", lambda s: s[:, :-8]), rf"{Q}.scales: shape \[2, 248\], expected \[2, 256\]"),
        (lambda q: edit_tensor(q, f"{Q}.scales", lambda s: s.astype(np.float32)), rf"{Q}.scales: dtype F32, expected F16"),
        (lambda q: os.remove(q / "model-00002-of-00003.safetensors"), r"model-00002-of-00003.safetensors: listed in model.safetensors.index.json but missing"),
        (lambda q: (q / "config.json").unlink(), r"config.json: no such file"),
        (lambda q: edit_quant_config(q, quant_method="awq"), r"quant_method='awq': only GPTQ"),
    ],
    ids=["bits", "group", "sym", "desc_act", "format", "qzeros", "g_idx", "shape", "dtype", "shard", "config", "awq"],
)
def test_compile_refuses_what_the_board_cannot_run(make_checkpoint, change, pattern):
    qdir = make_checkpoint()
    change(qdir)
    assert_refused(qdir, pattern)


def test_v2_checkpoint_with_v1_zero_points_is_asymmetric(make_checkpoint):
    qdir = make_checkpoint()  # stores 0x77777777 (v1)
    edit_quant_config(qdir, checkpoint_format="gptq_v2")
    assert_refused(qdir, r"model.layers.0.self_attn.q_proj.qzeros: asymmetric: group 0, column 0 has zero point 7 \(stored 0x7, format gptq_v2\)")


def test_missing_layer_and_extra_layer(make_checkpoint):
    qdir = make_checkpoint()
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (qdir / "config.json").write_text(json.dumps(cfg))
    assert_refused(qdir, r"model.layers.2.self_attn.q_proj.qweight: missing from the checkpoint")
    cfg["num_hidden_layers"] = 1
    (qdir / "config.json").write_text(json.dumps(cfg))
    assert_refused(qdir, r"the checkpoint has more layers than config.json's num_hidden_layers=1")


def test_chin_not_multiple_of_128(make_checkpoint):
    qdir = make_checkpoint(hidden=192, num_heads=3, num_kv_heads=1, intermediate=256)
    assert_refused(qdir, r"model.layers.0.self_attn.q_proj: chin=192 is not a multiple of 128")


def test_conflicting_quant_configs(make_checkpoint):
    qdir = make_checkpoint()
    (qdir / "quantize_config.json").write_text(json.dumps({"bits": 3, "group_size": 128}))
    assert_refused(qdir, r"quantize_config.json: 'bits' is 3, but .*config.json has 'quantization_config.bits' 4; they must agree")


def test_wrong_path(tmp_path):
    with pytest.raises(VCUError, match="no such checkpoint folder"):
        compile_software(tmp_path / "nope", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_rerun_keeps_the_good_output(make_checkpoint):
    qdir = make_checkpoint()
    compile_software(qdir, progress=False)
    good = sorted(p.name for p in (qdir / "compile" / "qwen2_qweight_bin").iterdir())
    edit_quant_config(qdir, desc_act=True)
    with pytest.raises(VCUError):
        compile_software(qdir, progress=False)
    assert sorted(p.name for p in (qdir / "compile" / "qwen2_qweight_bin").iterdir()) == good


@pytest.fixture
def exported(make_checkpoint):
    return export_all(make_checkpoint())


def test_hardware_refuses_truncated_and_missing_inputs(exported):
    comp = exported["compile"]
    out = comp / "hw"
    f = comp / "qwen2_qweight_bin" / "model.layers.1.mlp.down_proj.qweight.bin"
    data = f.read_bytes()
    f.write_bytes(data[:-4])
    with pytest.raises(VCUError, match=r"down_proj.qweight.bin: \d+ bytes, expected \d+ \(int32 \[256, 384\]\): truncated"):
        pack_hardware(comp, out, progress=False)
    assert not out.exists()
    f.unlink()
    with pytest.raises(VCUError, match=r"down_proj.qweight.bin: missing"):
        pack_hardware(comp, out, progress=False)
    f.write_bytes(data)
    (comp / "qwen2_qweight_bin" / "lm_head_qweight.bin").unlink()
    with pytest.raises(VCUError, match=r"lm_head_qweight.bin: missing \(run lm_head.py first\)"):
        pack_hardware(comp, out, progress=False)
    assert sorted(p.name for p in comp.iterdir()) == ["QWEN_BLOCK_write_data_port32", "compile_sw.json", "config.json", "lm_head.json", "qwen2_fp16_weight_bin", "qwen2_qweight_bin"]


def test_hardware_refuses_ints_outside_int4(exported):
    comp = exported["compile"]
    f = comp / "qwen2_qweight_bin" / "model.layers.0.mlp.up_proj.qweight.bin"
    q = np.fromfile(f, "<i4")
    q[256 * 5 + 7] = 9  # up_proj: chin = hidden = 256
    q.tofile(f)
    with pytest.raises(VCUError, match=r"up_proj.qweight.bin: row 5, input 7 holds 9, outside the int4 range"):
        pack_hardware(comp, comp / "hw", progress=False)
    assert not (comp / "hw").exists()


def test_embedding_refuses_vocab_that_does_not_split(exported):
    out = exported["compile"] / "emb"
    with pytest.raises(VCUError, match=r"vocab 256 does not split into 3 equal parts"):
        split_embedding(exported["compile"], out, 3, progress=False)
    assert not out.exists()


def test_lm_head_method_mismatches(make_checkpoint):
    qdir = make_checkpoint()
    with pytest.raises(VCUError, match="no lm_head.qweight"):
        quantize_lm_head(qdir, method="checkpoint", progress=False)
    qdir = make_checkpoint("q2", lm_head_quantized=True)
    with pytest.raises(VCUError, match="already GPTQ-quantized"):
        quantize_lm_head(qdir, method="rtn", progress=False)
    assert not (qdir / "compile").exists()


@pytest.mark.parametrize("script", ["compile_sw.py", "lm_head.py"])
def test_cli_prints_one_error_line_and_exits_2(make_checkpoint, script):
    qdir = make_checkpoint()
    edit_quant_config(qdir, sym=False)
    if script == "lm_head.py":
        qdir = make_checkpoint("q2", lm_head_quantized=True)
        edit_quant_config(qdir, sym=False)
    r = subprocess.run([sys.executable, str(ROOT / script), "--quantize_model", str(qdir)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {qdir}: sym=false: asymmetric quantization; the board needs symmetric (zero point 8)"]
    assert not (qdir / "compile").exists()


@pytest.mark.parametrize(
    "script, flag",
    [("compile_sw.py", "--quantize_model"), ("lm_head.py", "--method"), ("hardware.py", "--ports"), ("embedding_tokens.py", "--parts")],
)
def test_cli_help(script, flag):
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stdout.startswith("usage:") and flag in r.stdout and "FORMAT.md" in r.stdout


def test_truncated_shard(make_checkpoint):
    qdir = make_checkpoint()
    shard = qdir / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_refused(qdir, r"model-00001-of-00003.safetensors: truncated: .* ends at byte \d+, the file has \d+")


def test_dynamic_override_the_board_cannot_run(make_checkpoint):
    # GPTQModel's default for --lm_head: 8 bits, group 32, written as a per-module override
    qdir = make_checkpoint()
    edit_quant_config(qdir, dynamic={"lm_head": {"bits": 8, "group_size": 32, "sym": True, "desc_act": False}})
    assert_refused(qdir, r"quantization_config.dynamic\['lm_head'\] sets bits=8; the board needs bits=4, group_size=128")
