"""The int4 code said once (vcu128/format/int4_grid.py): quantize.py --int4 sign_magnitude (or
--int4_range 7) is recorded with the checkpoint, and lm_head.py, hardware.py and quantize.py --compile
follow the record; an option that contradicts another, or that would pack -8 in sign-magnitude, is
refused before any work with one line naming the fix."""

import json

import numpy as np
import pytest
from conftest import ROOT
from test_safety import refused, run_step, tree
from test_tables import _clip_checkpoint_to_seven

from vcu128.check.verify import bit_check
from vcu128.export.compile_sw import compile_software
from vcu128.export.hardware import BoardOptions, pack_hardware
from vcu128.export.lm_head import quantize_lm_head
from vcu128.format.int4_grid import from_options, read_checkpoint_setting
from vcu128.format.layout import unpack_nibbles
from vcu128.io.errors import VCUError

HW = "QWEN_BLOCK_write_data_port32"
Q_PROJ = "BLOCK00/MVM_BN_write_to_HBM_bin/MVMBN0_q_HBM_DDR_00.bin"


def record(qdir, **meta):
    """Write quantize.py's int4 record into a checkpoint's quantize_config.json (and config.json's copy)."""
    for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        doc = json.loads((qdir / name).read_text())
        (doc[key] if key else doc).setdefault("meta", {}).update(meta)
        (qdir / name).write_text(json.dumps(doc))


def sign_magnitude_checkpoint(make_checkpoint):
    """A checkpoint on the 15-level grid, recorded as quantize.py --int4 sign_magnitude writes it."""
    qdir = make_checkpoint()
    _clip_checkpoint_to_seven(qdir)
    record(qdir, vcu128_int4="sign_magnitude", vcu128_int4_range=7)
    return qdir


def test_either_option_implies_the_other_and_a_contradiction_is_refused():
    assert [(s.code, s.grid) for s in (from_options(None, None), from_options("sign_magnitude", None), from_options(None, 7),
                                      from_options("twos", 7), from_options("twos", 8))] == [
        ("twos", 8), ("sign_magnitude", 7), ("sign_magnitude", 7), ("twos", 7), ("twos", 8)]
    with pytest.raises(VCUError) as e:
        from_options("sign_magnitude", 8)
    assert str(e.value) == ("--int4 sign_magnitude with --int4_range 8: sign-magnitude int4 has no -8, it needs the 15 levels -7..7; "
                            "pass --int4 sign_magnitude alone")


def test_quantize_refuses_contradicting_int4_options_before_the_model(tmp_path):
    nope = tmp_path / "no-such-model"  # never opened
    base = ["--model", nope, "--calib", "random", "--no_report"]
    assert refused(*run_step("quantize", *base, "--int4", "sign_magnitude", "--int4_range", "8")) == (
        "error: --int4 sign_magnitude with --int4_range 8: sign-magnitude int4 has no -8, it needs the 15 levels -7..7; "
        "pass --int4 sign_magnitude alone")
    assert refused(*run_step("quantize", *base, "--int4", "sign_magnitude", "--engine", "gptqmodel")) == (
        "error: --int4 sign_magnitude needs --engine vcu128 (GPTQModel has no 15-level grid)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("said", [["--int4", "sign_magnitude"], ["--int4_range", "7"]])
def test_said_once_to_quantize_carries_through_compile(tiny_untrained_model, tmp_path, said):
    """quantize.py --int4 sign_magnitude --compile (or --int4_range 7): the layers and the output layer
    on -7..7, the folder in sign-magnitude nibbles, every step from the record."""
    out = tmp_path / "q"
    code, err = run_step("quantize", "--model", tiny_untrained_model, "--out", out, "--calib", ROOT / "data" / "demo_corpus.txt",
                         "--nsamples", "8", "--seqlen", "64", "--no_report", *said, "--compile")
    assert code == 0, err
    meta = json.loads((out / "quantize_config.json").read_text())["meta"]
    assert (meta["vcu128_int4"], meta["vcu128_int4_range"]) == ("sign_magnitude", 7)
    compile_dir, hw = out / "compile", out / "compile" / HW
    assert json.loads((compile_dir / "compile_sw.json").read_text())["int4"] == {
        "code": "sign_magnitude", "int4_range": 7, "from": str(out / "quantize_config.json")}
    assert json.loads((compile_dir / "lm_head.json").read_text())["made_from"]["int4_range"] == 7
    lm = np.fromfile(compile_dir / "qwen2_qweight_bin" / "lm_head_qweight.bin", "<i4")
    assert lm.min() == -7 and lm.max() == 7
    manifest = json.loads((hw / "manifest.json").read_text())
    assert manifest["assumptions"]["int4"] == "sign_magnitude" and manifest["lm_head"] == {"method": "rtn", "int4_range": 7}
    # the bytes: q_proj's first row, port 0, read as sign-magnitude nibbles, is the software format's row
    words = np.fromfile(hw / Q_PROJ, "<u4")
    q_row = np.fromfile(compile_dir / "qwen2_qweight_bin" / "model.layers.0.self_attn.q_proj.qweight.bin", "<i4")[:8]
    assert [(int(words[8]) >> 4 * j) & 0xF for j in range(8)] == [int(v) if v >= 0 else 8 - int(v) for v in q_row]
    assert bit_check(out, hw, progress=False).ok


def test_lm_head_and_hardware_follow_the_checkpoints_record(make_checkpoint):
    qdir = sign_magnitude_checkpoint(make_checkpoint)
    comp = qdir / "compile"
    compile_software(qdir, progress=False)
    quantize_lm_head(qdir, progress=False)  # no --int4_range: the recorded grid
    assert json.loads((comp / "lm_head.json").read_text())["made_from"]["int4_range"] == 7
    assert np.fromfile(comp / "qwen2_qweight_bin" / "lm_head_qweight.bin", "<i4").min() == -7
    result = pack_hardware(comp, progress=False)  # no --int4: the recorded code
    assert result.details["int4_from"] == f"recorded by quantize.py: {qdir / 'quantize_config.json'}"
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["assumptions"]["int4"] == "sign_magnitude" and manifest["made_from"]["int4"] == "sign_magnitude"
    words = np.fromfile(result.out / Q_PROJ, "<u4").reshape(-1, 1)
    q_row = np.fromfile(comp / "qwen2_qweight_bin" / "model.layers.0.self_attn.q_proj.qweight.bin", "<i4")[:8]
    assert unpack_nibbles(words[8:9], code="sign_magnitude").ravel().tolist() == q_row.tolist()
    assert unpack_nibbles(words[8:9], code="twos").ravel().tolist() != q_row.tolist()  # a twos reader would get other ints
    # --int4 twos overrides the record (the -7..7 ints fit two's complement too), and says so
    twos = pack_hardware(comp, qdir / "hw-twos", progress=False, opts=BoardOptions(int4="twos"))
    assert twos.details["int4_from"] == "given: --int4"
    words = np.fromfile(twos.out / Q_PROJ, "<u4").reshape(-1, 1)
    assert unpack_nibbles(words[8:9], code="twos").ravel().tolist() == q_row.tolist()


def test_an_output_layer_that_cannot_be_packed_is_refused_by_lm_head(make_checkpoint):
    qdir = sign_magnitude_checkpoint(make_checkpoint)
    compile_software(qdir, progress=False)
    before = tree(qdir)
    qc = qdir / "quantize_config.json"
    assert refused(*run_step("lm_head", "--quantize_model", qdir, "--int4_range", "8")) == (
        f"error: --int4_range 8: the checkpoint is quantized for a sign-magnitude board ({qc}: vcu128_int4 sign_magnitude), and "
        "sign-magnitude int4 has no -8; leave --int4_range out: lm_head.py follows the checkpoint's record")
    assert refused(*run_step("lm_head", "--quantize_model", qdir, "--method", "trunc")) == (
        f"error: --method trunc (the original rule, on -8..7): the checkpoint is quantized for a sign-magnitude board ({qc}: "
        "vcu128_int4 sign_magnitude), and sign-magnitude int4 has no -8; use --method rtn")
    assert tree(qdir) == before


def test_sign_magnitude_over_the_8_grid_is_refused_before_any_work(make_checkpoint):
    qdir = make_checkpoint()
    record(qdir, vcu128_int4="twos", vcu128_int4_range=8)  # what quantize.py records by default
    comp = qdir / "compile"
    compile_software(qdir, progress=False)
    quantize_lm_head(qdir, progress=False, int4_range=7)  # the output layer could go; the layers cannot
    before = tree(qdir)
    assert refused(*run_step("hardware", "--compile_dir", comp, "--int4", "sign_magnitude")) == (
        f"error: --int4 sign_magnitude: the checkpoint was quantized on the -8..7 grid ({qdir / 'quantize_config.json'}: twos, "
        "int4_range 8), and sign-magnitude int4 has no -8; quantize with quantize.py --int4 sign_magnitude (the later steps "
        "follow its record), or pack with hardware.py --int4 twos")
    assert tree(qdir) == before
    # without the option the record's code is used: two's complement
    assert json.loads((pack_hardware(comp, progress=False).out / "manifest.json").read_text())["assumptions"]["int4"] == "twos"


def test_records_are_read_strictly_and_an_earlier_versions_grid_means_sign_magnitude(make_checkpoint):
    qdir = make_checkpoint()
    assert read_checkpoint_setting(qdir) is None  # no record: GPTQModel's, another tool's
    record(qdir, vcu128_int4_range=7)  # an earlier quantize.py recorded the grid only
    s = read_checkpoint_setting(qdir)
    assert (s.code, s.grid, s.source) == ("sign_magnitude", 7, str(qdir / "quantize_config.json"))
    for meta, message in (({"vcu128_int4": "ones"}, "'meta.vcu128_int4' is 'ones', expected one of twos, sign_magnitude"),
                          ({"vcu128_int4_range": 9}, "'meta.vcu128_int4_range' is 9, expected at most 8"),
                          ({"vcu128_int4": "sign_magnitude", "vcu128_int4_range": 8},
                           "records sign-magnitude int4 on the -8..7 grid, but sign-magnitude int4 has no -8")):
        record(qdir, **{"vcu128_int4": None, "vcu128_int4_range": None, **meta})
        assert refused(*run_step("compile_sw", "--quantize_model", qdir)) == f"error: {qdir / 'quantize_config.json'}: {message}"
        assert not (qdir / "compile").exists()
    record(qdir, vcu128_int4="sign_magnitude", vcu128_int4_range=7)
    compile_software(qdir, progress=False)
    doc = json.loads((qdir / "compile" / "compile_sw.json").read_text())
    doc["int4"]["code"] = 4
    (qdir / "compile" / "compile_sw.json").write_text(json.dumps(doc))
    with pytest.raises(VCUError) as e:
        pack_hardware(qdir / "compile", progress=False)
    assert str(e.value) == f"{qdir / 'compile' / 'compile_sw.json'}: 'int4.code' is 4, expected a string"
