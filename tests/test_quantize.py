"""quantize.py with GPTQModel on the CPU, on a tiny Qwen2 trained here for a few seconds."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST, ROOT, export_all
from test_export import (
    QKV,
    check_embedding,
    check_hardware,
    check_manifest,
    check_software,
)

from vcu128.demo.tiny_model import DEMO_CORPUS
from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.io.errors import VCUError
from vcu128.quant.calibration import build_calibration, read_texts
from vcu128.quant.quantize import QuantizeOptions, check_board_settings, quantize_model


def test_gptq_beats_round_to_nearest(quantized):
    _, report = quantized
    layers = report["layers"]
    assert [row["layer"] for row in layers] == [0, 1]
    for row in layers:
        # measured: GPTQ about half of RTN's output error on this model
        assert row["gptq"] < 0.8 * row["rtn"], row
        assert 0.005 < row["gptq"] < 0.1, row
    p = report["perplexity"]
    assert 1 < p["fp16"] < 50 and abs(p["gptq"] / p["fp16"] - 1) < 0.1


def whole_model_report(model, out, seqlen: int = FAST["seqlen"]) -> dict:
    """quant_report.json's numbers measured from whole transformers models built from the two
    folders (the report GPTQModel's checkpoints get), in float32."""
    import torch

    from vcu128.quant.calibration import load_tokenizer
    from vcu128.quant.report import (
        layer_errors,
        load_checkpoint_model,
        load_float_model,
        perplexity,
    )

    ids = build_calibration(load_tokenizer(model), FAST["calib"], FAST["nsamples"], seqlen, 0, None, 1 << 20).eval_ids
    ref = load_float_model(model, "cpu", torch.float32)
    return {"eval_tokens": len(ids), "layers": layer_errors(ref, GPTQCheckpoint(out), ids, seqlen),
            "perplexity": {"fp16": perplexity(ref, ids, seqlen), "gptq": perplexity(load_checkpoint_model(out, "cpu", torch.float32), ids, seqlen)}}


def assert_same_report(ours: dict, theirs: dict) -> None:
    """Both in float32: they differ only in summation order."""
    assert ours["eval_tokens"] == theirs["eval_tokens"] > 2 * FAST["seqlen"]  # several windows: the chunking is exercised
    for key in ("fp16", "gptq"):
        assert ours["perplexity"][key] == pytest.approx(theirs["perplexity"][key], rel=1e-5)
    # two models measured: they differ (7e-4 here) by far more than the tolerance above
    assert abs(ours["perplexity"]["gptq"] / ours["perplexity"]["fp16"] - 1) > 1e-4
    for a, b in zip(ours["layers"], theirs["layers"], strict=True):
        assert a["layer"] == b["layer"]
        assert a["gptq"] == pytest.approx(b["gptq"], rel=1e-5) and a["rtn"] == pytest.approx(b["rtn"], rel=1e-5)


def test_the_walks_report_is_the_whole_model_report(quantized, tiny_model):
    """The report measured inside GPTQ's layer walk (two held-out streams beside the calibration)
    equals the one measured from whole models."""
    out, report = quantized
    assert_same_report(report, whole_model_report(tiny_model, out))


def tied_copy(model, folder):
    """The tiny model with its output layer tied to the embedding (no lm_head.weight)."""
    from safetensors.numpy import load_file, save_file

    folder.mkdir()
    for f in model.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    for f in model.glob("*.safetensors"):
        save_file({k: v for k, v in load_file(f).items() if k != "lm_head.weight"}, folder / f.name, {"format": "pt"})
    cfg = json.loads((model / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    return folder


@pytest.mark.parametrize("case", ["lm_head quantized", "tied output layer"])
def test_the_walks_report_with_either_output_layer(case, tiny_model, tmp_path):
    """The walk's perplexities use the output layer the GPTQ model has: GPTQ's own (quantize.py
    --lm_head), or the embedding where the model ties them."""
    model = tied_copy(tiny_model, tmp_path / "tied") if case == "tied output layer" else tiny_model
    opts = dict(FAST, nsamples=8, lm_head=case == "lm_head quantized")
    out, report = quantize_model(model, tmp_path / "q", QuantizeOptions(**opts))
    assert GPTQCheckpoint(out).has("lm_head.qweight") == opts["lm_head"]
    assert_same_report(report, whole_model_report(model, out))


def test_the_report_names_the_source_model_and_the_options(quantized, tiny_model):
    """What main.sh (and a reader) needs to tell whether a checkpoint is up to date with its source."""
    from vcu128.io.uptodate import fingerprint

    _, report = quantized
    assert report["model"] == str(tiny_model.resolve())
    assert report["made_from"] == {"model": report["model"], "fingerprint": fingerprint(tiny_model)}
    assert {k: report["settings"][k] for k in ("nsamples", "seqlen", "device", "engine", "report")} == {
        "nsamples": FAST["nsamples"], "seqlen": FAST["seqlen"], "device": "cpu", "engine": "vcu128", "report": True}
    assert report["calibration"]["calib_sha256"] and report["calibration"]["seed"] == 0


def test_checkpoint_is_fp16_gptq_v1_with_metadata(quantized, tiny_model):
    out, _ = quantized
    assert out == tiny_model.parent / "tiny-qwen2-W4A16-gptq"
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["checkpoint_format"]) == (4, 128, True, False, "gptq")
    meta = qc["meta"]["vcu128_calibration"]
    assert meta["seed"] == 0 and meta["nsamples"] == 32 and meta["seqlen"] == 128 and len(meta["calib_sha256"]) == 64
    assert json.loads((out / "config.json").read_text())["quantization_config"]["meta"]["vcu128_calibration"] == meta
    assert (out / "tokenizer.json").is_file() and (out / "quant_report.json").is_file()
    ckpt = GPTQCheckpoint(out)
    assert ckpt.info("model.layers.0.self_attn.q_proj.scales")[0] == "F16"
    assert ckpt.info("model.norm.weight")[0] == "F16"
    assert set(ckpt.get("model.layers.1.mlp.down_proj.qzeros").view(np.uint32).ravel().tolist()) == {0x77777777}
    ckpt.validate()


def test_real_checkpoint_exports_exactly(quantized):
    out, _ = quantized
    exp = export_all(out)
    check_software(exp, QKV)
    check_hardware(exp)
    check_embedding(exp)
    check_manifest(exp["hw"])


def test_lm_head_quantized_by_gptq_is_taken_from_the_checkpoint(tiny_model, tmp_path):
    out, _ = quantize_model(tiny_model, tmp_path / "q", QuantizeOptions(**FAST, lm_head=True, report=False))
    ckpt = GPTQCheckpoint(out)
    assert ckpt.has("lm_head.qweight")
    from vcu128.export.lm_head import quantize_lm_head

    _, method, error = quantize_lm_head(out, progress=False)
    assert method == "checkpoint" and error is None
    q = np.fromfile(out / "compile" / "qwen2_qweight_bin" / "lm_head_qweight.bin", "<i4").reshape(512, 256)
    assert ckpt.info("lm_head.qweight") == ("I32", (32, 512))  # 4 bits: chin / 8 words
    assert ckpt.info("lm_head.scales") == ("F16", (2, 512))  # group 128
    qweight = ckpt.get("lm_head.qweight").view(np.uint32)
    assert q[5, 9] == ((int(qweight[9 // 8, 5]) >> 4 * (9 % 8)) & 0xF) - 8


def test_calibration_is_seeded_and_reads_jsonl_and_datasets(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    a = build_calibration(tok, str(DEMO_CORPUS), 8, 64, seed=1)
    b = build_calibration(tok, str(DEMO_CORPUS), 8, 64, seed=1)
    c = build_calibration(tok, str(DEMO_CORPUS), 8, 64, seed=2)
    assert a.samples == b.samples and a.samples != c.samples
    assert all(len(s["input_ids"]) == 64 for s in a.samples)
    paragraphs = [p for p in DEMO_CORPUS.read_text().split("\n\n") if p]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    assert read_texts(jsonl) == paragraphs
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": paragraphs + ["x" * 1100]})}).save_to_disk(tmp_path / "ds")
    assert read_texts(tmp_path / "ds") == ["x" * 1100]  # rows of 1024+ characters, as the original took


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda m: (m / "config.json").unlink(), "no config.json: not a HuggingFace model folder"),
        (lambda m: patch(m, architectures=["Qwen2Model"]), r"has no \*ForCausalLM: not a causal language model"),
        (lambda m: patch(m, model_type="falcon", architectures=["FalconForCausalLM"]), "model_type 'falcon': the board runs qwen2, llama, mistral"),
        (lambda m: patch(m, quantization_config={"quant_method": "gptq"}), "already quantized"),
    ],
)
def test_model_folder_refusals(tiny_model, tmp_path, edit, pattern):
    import shutil

    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    edit(m)
    with pytest.raises(VCUError, match=pattern):
        quantize_model(m, None, QuantizeOptions(**FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def patch(model_dir, **values):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(values)
    (model_dir / "config.json").write_text(json.dumps(cfg))


def test_calibration_refusals(tiny_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(VCUError, match=r"short.txt: too little text: \d+ calibration tokens, need more than --seqlen 128"):
        quantize_model(tiny_model, tmp_path / "q", QuantizeOptions(**{**FAST, "calib": str(short)}))
    with pytest.raises(VCUError, match="--calib random: pass --eval_text too"):
        quantize_model(tiny_model, tmp_path / "q", QuantizeOptions(**{**FAST, "calib": "random"}))
    with pytest.raises(VCUError, match="no such model folder"):
        quantize_model(tmp_path / "nope", None, QuantizeOptions(**FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


@pytest.mark.parametrize("flags", [["--wbits", "8"], ["--group_size", "64"], ["--no-sym"], ["--desc_act"]])
def test_compile_refuses_settings_the_board_cannot_run(tiny_model, tmp_path, flags):
    r = subprocess.run(
        [sys.executable, str(ROOT / "quantize.py"), "--model", str(tiny_model), "--calib", str(DEMO_CORPUS),
         "--quantize_model", str(tmp_path / "q"), "--compile", *flags],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {flags[0]}{' ' + flags[1] if len(flags) > 1 else ''} with --compile: the board supports only 4-bit, group size 128, symmetric, no act-order"
    ]
    assert not (tmp_path / "q").exists()
    with pytest.raises(VCUError):
        check_board_settings(QuantizeOptions(wbits=3))


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda m, t: ["--calib", _write(t / "bin.txt", bytes(range(256)) * 10)], "error: {t}/bin.txt: not UTF-8 text (byte 128); calibration needs a text, JSONL or saved dataset"),
        (lambda m, t: ["--calib", _mkdir(t / "plain")], "error: {t}/plain: not a dataset saved with save_to_disk (FileNotFoundError); pass a .txt or .jsonl file"),
        (lambda m, t: ["--calib", str(DEMO_CORPUS), "--nsamples", "0"], "error: argument --nsamples: 0: must be at least 1"),
        (lambda m, t: ["--calib", str(DEMO_CORPUS), "--seqlen", "-5"], "error: argument --seqlen: -5: must be at least 1"),
        (lambda m, t: ["--calib", str(DEMO_CORPUS), "--quantize_model", str(m)], "error: --quantize_model {m}: is or contains the input {m}; choose another folder"),
    ],
    ids=["binary calib", "plain folder", "nsamples 0", "seqlen negative", "out is the model"],
)
def test_quantize_cli_refusals(tiny_model, tmp_path, make_args, message):
    r = subprocess.run([sys.executable, str(ROOT / "quantize.py"), "--model", str(tiny_model), *make_args(tiny_model, tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert lines[0] == message.format(t=tmp_path, m=tiny_model) and len(lines) <= 2 and "Traceback" not in r.stderr
    assert not (tiny_model.parent / "tiny-qwen2-W4A16-gptq-x").exists()


def _write(path, data):
    path.write_bytes(data)
    return str(path)


def _mkdir(path):
    path.mkdir()
    return str(path)
