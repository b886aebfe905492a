"""Damaged checkpoints, configs and models the board cannot run: each is one `error:` line naming the
file, key or tensor and the rule, exit code 2, and nothing written."""

import json
import struct
import subprocess
import sys

import pytest
from conftest import ROOT

from vcu128.export.compile_sw import compile_software
from vcu128.format.gate import read_model_dims
from vcu128.io.errors import VCUError

SHARD = "model-00001-of-00003.safetensors"


def rewrite_header(path, edit):
    """Apply edit(header dict) to a safetensors file's header, keeping its data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def offsets(header, name):
    return header[name]["data_offsets"]


def first_two(header):
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def overlap(h):  # v_proj reads k_proj's bytes: same size, so every length still adds up
    k, v = "model.layers.0.self_attn.k_proj.qweight", "model.layers.0.self_attn.v_proj.qweight"
    h[v]["data_offsets"] = list(h[k]["data_offsets"])


def inverted(h):
    a, _ = first_two(h)
    begin, end = h[a]["data_offsets"]
    h[a]["data_offsets"] = [end, begin]


def longer_than_shape(h):
    a, _ = first_two(h)
    h[a]["shape"] = [h[a]["shape"][0] - 1, *h[a]["shape"][1:]]


def no_offsets(h):
    a, _ = first_two(h)
    del h[a]["data_offsets"]


def bad_dtype(h):
    a, _ = first_two(h)
    h[a]["dtype"] = "Q4"


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (overlap, r"damaged header: the data of model.layers.0.self_attn.[kv]_proj.qweight \(bytes \d+..\d+\) overlaps"),
        (inverted, r"damaged header: .* has data_offsets \[\d+, 0\] \(begin after end\)"),
        (longer_than_shape, r"damaged header: .* bytes, but its data_offsets span \d+"),
        (no_offsets, r"damaged header: entry '.*' needs dtype, shape and data_offsets"),
        (bad_dtype, r"damaged header: .* has dtype 'Q4'"),
    ],
    ids=["overlap", "inverted", "longer", "no offsets", "dtype"],
)
def test_damaged_headers_are_refused(make_checkpoint, edit, pattern):
    qdir = make_checkpoint()
    rewrite_header(qdir / SHARD, edit)
    with pytest.raises(VCUError, match=rf"{SHARD}: {pattern}"):
        compile_software(qdir, progress=False)
    assert not (qdir / "compile").exists()


def test_huge_header_length_and_junk_files(make_checkpoint):
    qdir = make_checkpoint()
    raw = (qdir / SHARD).read_bytes()
    (qdir / SHARD).write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    with pytest.raises(VCUError, match=rf"{SHARD}: damaged safetensors file: header length 1099511627776 is over the format's limit"):
        compile_software(qdir, progress=False)
    (qdir / SHARD).write_bytes(struct.pack("<Q", 4) + b"[1] ")
    with pytest.raises(VCUError, match=rf"{SHARD}: not a safetensors file \(the header is not a JSON object\)"):
        compile_software(qdir, progress=False)
    (qdir / SHARD).write_bytes(raw + b"\0" * 16)
    with pytest.raises(VCUError, match=rf"{SHARD}: damaged file: the tensors hold \d+ bytes of data, the file has \d+ after the header"):
        compile_software(qdir, progress=False)


@pytest.mark.parametrize("shard", ["/etc/passwd", "../elsewhere.safetensors", "sub/x.safetensors", ".."])
def test_index_paths_stay_inside_the_checkpoint(make_checkpoint, shard):
    qdir = make_checkpoint()
    index = qdir / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.norm.weight"] = shard
    index.write_text(json.dumps(doc))
    with pytest.raises(VCUError, match=rf"model.safetensors.index.json: shard '{shard}' is not a plain file name inside"):
        compile_software(qdir, progress=False)


@pytest.mark.parametrize(
    "file, content, pattern",
    [
        ("config.json", "[1, 2]", r"config.json: expected a JSON object, found a JSON list"),
        ("config.json", lambda c: {**c, "hidden_size": "256"}, r"config.json: 'hidden_size' is '256', expected an integer"),
        ("config.json", lambda c: {**c, "num_hidden_layers": -1}, r"config.json: 'num_hidden_layers' is -1, expected at least 1"),
        ("config.json", lambda c: {**c, "tie_word_embeddings": "no"}, r"config.json: 'tie_word_embeddings' is 'no', expected true or false"),
        ("config.json", "{not json", r"config.json: not valid JSON"),
        ("quantize_config.json", "nope", r"quantize_config.json: not valid JSON"),
        ("config.json", lambda c: {**c, "quantization_config": {**c["quantization_config"], "bits": "4"}}, r"config.json: 'quantization_config.bits' is '4', expected an integer"),
        ("model.safetensors.index.json", "{", r"model.safetensors.index.json: not valid JSON"),
        ("model.safetensors.index.json", lambda c: {"weight_map": []}, r"'weight_map' must be an object of tensor name -> shard file name"),
    ],
    ids=["list", "string number", "negative", "bool", "config junk", "qc junk", "qc string", "index junk", "index list"],
)
def test_config_files_of_the_wrong_shape(make_checkpoint, file, content, pattern):
    qdir = make_checkpoint()
    path = qdir / file
    path.write_text(content if isinstance(content, str) else json.dumps(content(json.loads(path.read_text()))))
    with pytest.raises(VCUError, match=pattern):
        compile_software(qdir, progress=False)
    assert not (qdir / "compile").exists()


def set_config(qdir, **values):
    cfg = json.loads((qdir / "config.json").read_text())
    cfg.update(values)
    (qdir / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "values, pattern",
    [
        (dict(model_type="qwen3"), r"model_type 'qwen3': the board runs qwen2, llama, mistral"),
        (dict(model_type="gpt2"), r"model_type 'gpt2': the board runs qwen2, llama, mistral"),
        (dict(hidden_act="gelu"), r"hidden_act 'gelu': the board's MLP computes SiLU\(gate\) \* up only"),
        (dict(num_key_value_heads=3), r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        (dict(model_type="mistral", sliding_window=1024), r"sliding_window 1024: the board has no sliding window"),
        (dict(head_dim=32), r"model.layers.0.self_attn.q_proj.qweight: 256 outputs, but 4 heads x head_dim 32 = 128 \(config.json\): head_dim does not match"),
    ],
    ids=["qwen3", "gpt2", "gelu", "kv heads", "sliding window", "head_dim"],
)
def test_the_board_gate(make_checkpoint, values, pattern):
    qdir = make_checkpoint()
    set_config(qdir, **values)
    with pytest.raises(VCUError, match=pattern):
        compile_software(qdir, progress=False)
    assert not (qdir / "compile").exists()


def test_the_gate_passes_what_the_board_runs(make_checkpoint):
    for values in (dict(model_type="mistral", sliding_window=None), dict(model_type="mistral", sliding_window=4096), dict(model_type="llama")):
        qdir = make_checkpoint(f"q{len(values)}{values.get('sliding_window')}")
        set_config(qdir, **values)
        compile_software(qdir, progress=False)
    # head_dim 64, as Qwen2.5-0.5B and this file's checkpoints have
    assert read_model_dims(qdir / "config.json").head_dim == 64


def test_a_tensor_without_a_place_on_the_board(make_checkpoint):
    from safetensors.numpy import load_file, save_file

    qdir = make_checkpoint()
    shard = qdir / SHARD
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.q_norm.weight"] = tensors["model.layers.0.input_layernorm.weight"][:64]  # Qwen3
    save_file(tensors, shard)
    index = qdir / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.layers.0.self_attn.q_norm.weight"] = SHARD
    index.write_text(json.dumps(doc))
    with pytest.raises(VCUError, match=r"model.layers.0.self_attn.q_norm.weight: the board's layout has no place for this tensor"):
        compile_software(qdir, progress=False)


@pytest.mark.parametrize("script", ["compile_sw.py", "lm_head.py", "verify.py"])
def test_every_step_exits_2_with_one_line(make_checkpoint, script):
    qdir = make_checkpoint()
    set_config(qdir, hidden_act="gelu")
    args = ["--quantize_model", str(qdir)] + (["--hardware_dir", str(qdir / "hw")] if script == "verify.py" else [])
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {qdir / 'config.json'}: hidden_act 'gelu': the board's MLP computes SiLU(gate) * up only"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ports", "0"], "error: argument --ports: 0: must be at least 1"),
        (["--ports", "x"], "error: argument --ports: 'x' is not an integer"),
        (["--nope"], "error: unrecognized arguments: --nope"),
    ],
)
def test_bad_arguments_are_one_error_and_one_hint(args, message, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "hardware.py"), "--compile_dir", str(tmp_path), *args], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [message, "hint: hardware.py --help lists the options"]
