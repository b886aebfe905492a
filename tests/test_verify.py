"""verify.py: a clean folder passes; every planted fault is caught and named."""

import copy
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, export_all

from vcu128.check.verify import (
    SIDE_BY_SIDE_ENV,
    BitReport,
    bit_check,
    checks_side_by_side,
    default_side_by_side,
    verify,
)
from vcu128.format.synthetic import SyntheticSpec, write_gptq_checkpoint
from vcu128.io.errors import VCUError

HW = "compile/QWEN_BLOCK_write_data_port32"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    # vocab 1008 = 63 * 16: the output layer has 31.5 rows a port, so its last round has zero rows
    spec = SyntheticSpec(hidden=896, intermediate=384, num_layers=2, num_heads=14, num_kv_heads=2, vocab=1008, seed=3)
    qdir = write_gptq_checkpoint(tmp_path_factory.mktemp("clean") / "q", spec)
    export_all(qdir)
    return qdir


@pytest.fixture
def folder(clean, tmp_path):
    """A fresh copy of the clean checkpoint and its packed folder, to damage."""
    qdir = tmp_path / "q"
    shutil.copytree(clean, qdir)
    return qdir, qdir / HW


def flip_word(path, word, xor):
    w = np.fromfile(path, "<u4")
    w[word] ^= np.uint32(xor)
    w.tofile(path)


def differences(folder):
    qdir, hw = folder
    return bit_check(qdir, hw, progress=False).differences


def test_clean_folder_passes(folder):
    qdir, hw = folder
    report = bit_check(qdir, hw, progress=False)
    assert report.ok, report.differences
    # 2 layers x 7 x (32 + 1) + 4 norms + OutLayer (32 + 1 + 1) + 16 embedding parts + the SiLU table
    assert report.files_checked == 2 * 7 * 33 + 4 + 34 + 16 + 1


# row length for chin 896 is 8 + 112 = 120 words; for chin 384 (down_proj) 8 + 48 = 56
WEIGHT_NIBBLE = (
    "BLOCK01/MVM_BN_RES_write_to_HBM_bin/MVMBNRES2_HBM_DDR_03.bin", 56 + 20, 0x10,
    r"MVMBNRES2_HBM_DDR_03.bin: row 1 \(output channel 35\), word 20 \(weights of inputs 96..103\) is 0x[0-9a-f]{8}, expected 0x[0-9a-f]{8}",
)
SCALE_BIT = (
    "BLOCK00/MVM_BN_write_to_HBM_bin/MVMBN0_q_HBM_DDR_00.bin", 1, 1 << 16,
    r"MVMBN0_q_HBM_DDR_00.bin: row 0 \(output channel 0\), word 1 \(scales of groups 2 and 3\)",
)
HIGH_HALF_PADDING = (
    "BLOCK00/MVM_BN_write_to_HBM_bin/MVMBN1_HBM_DDR_07.bin", 3, 1 << 20,
    r"MVMBN1_HBM_DDR_07.bin: row 0 \(output channel 7\), word 3 \(scales of groups 6 \(high half must be 0\)\) is",
)
PADDING_WORD = (
    "BLOCK01/MVM_BN_RES_write_to_HBM_bin/MVMBNRES0_HBM_DDR_31.bin", 120 * 2 + 5, 1,
    r"MVMBNRES0_HBM_DDR_31.bin: row 2 \(output channel 95\), word 5 \(scale padding word \(must be 0\)\) is 0x[0-9a-f]{7}1, expected 0x00000000",
)
PADDING_ROW = (
    "OutLayer/MVM_BN_write_to_HBM_bin/MVMBN_Argmax_HBM_DDR_20.bin", 120 * 31 + 100, 1,
    r"MVMBN_Argmax_HBM_DDR_20.bin: row 31 \(output channel 1012\): padding row, word 100 is 0x00000001, expected 0",
)
OUTPUT_LAYER_WEIGHT = (  # the output layer is made again by rtn (ints), the decoder's linears taken from GPTQ's packing
    "OutLayer/MVM_BN_write_to_HBM_bin/MVMBN_Argmax_HBM_DDR_02.bin", 13, 0x100,
    r"MVMBN_Argmax_HBM_DDR_02.bin: row 0 \(output channel 2\), word 13 \(weights of inputs 40..47\) is 0x[0-9a-f]{8}, expected 0x[0-9a-f]{8}",
)
BIAS_WORD = (
    "BLOCK01/MVM_BN_DDR_bin/MVMBN0_k_wt_and_bias_in_DDR.bin", 17, 1 << 16,
    r"MVMBN0_k_wt_and_bias_in_DDR.bin: word 17 \(bias of output channel 17\) is 0x3c01[0-9a-f]{4}, expected 0x3c00[0-9a-f]{4}",
)
NORM = (
    "BLOCK00/LN_DDR_bin/LN1_wt_in_DDR.bin", 600, 1,
    r"LN1_wt_in_DDR.bin: element 1200 \(post_attention_layernorm weight, then zeros\) is 5.96\d*e-08, expected 0.0",
)


@pytest.mark.parametrize(
    "rel, word, xor, pattern",
    [WEIGHT_NIBBLE, SCALE_BIT, HIGH_HALF_PADDING, PADDING_WORD, PADDING_ROW, OUTPUT_LAYER_WEIGHT, BIAS_WORD, NORM],
    ids=["weight nibble", "scale bit", "high-half padding", "padding word", "padding row", "output layer weight", "bias word", "norm zero half"],
)
def test_one_flipped_bit_is_named(folder, rel, word, xor, pattern):
    flip_word(folder[1] / rel, word, xor)
    found = differences(folder)
    assert any(__import__("re").search(pattern, d) for d in found), found
    assert any("sha256 differs from manifest.json" in d and d.startswith(rel) for d in found), found


def test_swapped_port_files(folder):
    hw = folder[1]
    a, b = hw / "BLOCK00/MVM_BN_write_to_HBM_bin/MVMBN1_HBM_DDR_04.bin", hw / "BLOCK00/MVM_BN_write_to_HBM_bin/MVMBN1_HBM_DDR_05.bin"
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)
    found = differences(folder)
    assert any(d.startswith("BLOCK00/MVM_BN_write_to_HBM_bin/MVMBN1_HBM_DDR_04.bin: row 0 (output channel 4)") for d in found), found
    assert any(d.startswith("BLOCK00/MVM_BN_write_to_HBM_bin/MVMBN1_HBM_DDR_05.bin: sha256 differs") for d in found), found


def test_truncated_missing_and_extra_files(folder):
    hw = folder[1]
    part = hw / "Embedding/Embedding_03-of-16.bin"
    part.write_bytes(part.read_bytes()[:-2])
    (hw / "BLOCK01/LN_DDR_bin/LN0_wt_in_DDR.bin").unlink()
    (hw / "BLOCK00/notes.txt").write_text("x")
    found = differences(folder)
    assert "Embedding/Embedding_03-of-16.bin: 112894 bytes, expected 112896 (float16 [63, 896]): truncated" in found
    assert "BLOCK01/LN_DDR_bin/LN0_wt_in_DDR.bin: missing" in found
    assert "BLOCK00/notes.txt: extra file (not part of the board layout)" in found


def test_embedding_row_changed(folder):
    part = folder[1] / "Embedding/Embedding_16-of-16.bin"
    e = np.fromfile(part, "<f2")
    e[896 * 62 + 5] = 7.0
    e.tofile(part)
    assert any(d.startswith("Embedding/Embedding_16-of-16.bin: row 62, element 5 (embedding row 945+) is 7.0, expected") for d in differences(folder))


def test_cli_exits_non_zero_and_names_the_place(folder):
    qdir, hw = folder
    flip_word(hw / WEIGHT_NIBBLE[0], WEIGHT_NIBBLE[1], WEIGHT_NIBBLE[2])
    r = subprocess.run(
        [sys.executable, str(ROOT / "verify.py"), "--quantize_model", str(qdir), "--hardware_dir", str(hw), "--bits_only"],
        capture_output=True, text=True, env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.startswith(("difference:", "error:"))]
    assert lines[0].startswith("difference: BLOCK01/MVM_BN_RES_write_to_HBM_bin/MVMBNRES2_HBM_DDR_03.bin: row 1 (output channel 35), word 20")
    assert lines[-1].startswith("error: verify: 2 differences in ")


def test_functional_check_matches_the_checkpoint_model(quantized):
    qdir, _ = quantized
    hw = export_all(qdir)["hw"]
    exact = verify(qdir, hw, tokens=8, lm_head_from_checkpoint=True, numerics="fp32", progress=False)
    assert exact["bit_check"]["ok"]
    f = exact["functional"]["against_hardware"]["checkpoint"]
    assert f["greedy_tokens_equal"] and f["top1_agreement"] == 1.0 and f["relative_logit_error"] < 1e-6
    # In the board's fp16 arithmetic with the int4 lm_head the board runs, it still answers like the checkpoint.
    board = verify(qdir, hw, tokens=8, progress=False)["functional"]
    assert board["numerics"] == "board" and board["ok"] and board["saturation"] == []
    r = board["against_hardware"]["checkpoint"]
    assert r["top1_agreement"] > 0.9 and r["relative_logit_error"] < 0.1  # measured 0.957 and 0.035
    assert (hw.parent / "verify_report.json").is_file()


# ---------------------------------------------------------------------------------------------
# Both checks side by side (the default with a GPU): the report, messages and exit code of the
# checks run one after the other

QUICK = dict(eval_tokens=16, tokens=2, progress=False)


def steady(result: dict) -> dict:
    """A verify result without what depends on when and how fast it ran."""
    out = copy.deepcopy(result)
    for key in ("time", "timeline", "report_path"):
        out.pop(key, None)
    out["bit_check"].pop("seconds")
    if "functional" in out:
        out["functional"].pop("seconds")
    return out


def test_side_by_side_reports_what_one_after_the_other_reports(folder):
    qdir, hw = folder
    apart = verify(qdir, hw, side_by_side=False, **QUICK)
    beside = verify(qdir, hw, side_by_side=True, **QUICK)
    assert apart["bit_check"]["ok"] and apart["functional"]["ok"] and apart["verdict"]["exit_code"] == 0
    assert steady(beside) == steady(apart)
    assert steady(json.loads((hw.parent / "verify_report.json").read_text())) == steady(beside)
    first, second = apart["timeline"], beside["timeline"]
    assert not first["side_by_side"] and first["functional"][0] >= first["bit_check"][1]
    assert second["side_by_side"] and second["functional"][0] < second["bit_check"][1]


def test_side_by_side_a_flipped_word_is_the_answer_alone(folder):
    qdir, hw = folder
    flip_word(hw / WEIGHT_NIBBLE[0], WEIGHT_NIBBLE[1], WEIGHT_NIBBLE[2])
    apart = verify(qdir, hw, side_by_side=False, **QUICK)
    beside = verify(qdir, hw, side_by_side=True, **QUICK)
    assert not beside["bit_check"]["ok"] and beside["verdict"]["exit_code"] == 1
    assert "functional" not in beside and "source" not in beside and "functional" not in beside["timeline"]
    assert steady(beside) == steady(apart)


def test_side_by_side_cli_exits_1_and_names_the_file(folder):
    qdir, hw = folder
    flip_word(hw / WEIGHT_NIBBLE[0], WEIGHT_NIBBLE[1], WEIGHT_NIBBLE[2])
    r = subprocess.run(
        [sys.executable, str(ROOT / "verify.py"), "--quantize_model", str(qdir), "--hardware_dir", str(hw), "--eval_tokens", "16",
         "--tokens", "2"],
        capture_output=True, text=True, env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin", SIDE_BY_SIDE_ENV: "1"},
    )
    assert r.returncode == 1, r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith(("difference:", "warning:", "error:"))]
    one_after_the_other = [f"difference: {d}" for d in bit_check(qdir, hw, progress=False).differences]
    assert said == one_after_the_other + [f"error: verify: 2 differences in {hw}; do not load it on the board"]
    assert said[0].startswith("difference: BLOCK01/MVM_BN_RES_write_to_HBM_bin/MVMBNRES2_HBM_DDR_03.bin: row 1 (output channel 35), word 20")


def test_side_by_side_errors_come_in_the_order_of_the_checks(folder, tmp_path):
    qdir, hw = folder
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 5000")  # past the vocabulary (1008)
    with pytest.raises(VCUError, match=r"ids.txt: needs at least 2 token ids, each in 0\.\.1007"):
        verify(qdir, hw, eval_ids=ids, side_by_side=True, **QUICK)
    # where the bits differ, that is the answer: the functional check's inputs are not judged
    flip_word(hw / WEIGHT_NIBBLE[0], WEIGHT_NIBBLE[1], WEIGHT_NIBBLE[2])
    result = verify(qdir, hw, eval_ids=ids, side_by_side=True, **QUICK)
    assert not result["bit_check"]["ok"] and "functional" not in result
    # the bit check's own error first
    manifest = json.loads((hw / "manifest.json").read_text())
    manifest["model"]["hidden"] = 1024
    (hw / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VCUError, match=r"manifest.json: model hidden=1024, but the checkpoint's config.json says 896"):
        verify(qdir, hw, eval_ids=ids, side_by_side=True, **QUICK)


def differing_report() -> BitReport:
    report = BitReport()
    report.add("x.bin: word 0 is 0x00000001, expected 0x00000000")
    return report


def test_beside_the_bit_check_the_functional_check_stops_once_the_bits_differ():
    from vcu128.check.functional import Stopped

    asked = []

    def functional(stop):
        deadline = time.monotonic() + 60
        while not stop():  # functional_check asks before every layer
            assert time.monotonic() < deadline, "stop() never said the bits differ"
            time.sleep(0.001)
        asked.append("stopped")
        raise Stopped

    report = differing_report()
    assert checks_side_by_side(lambda: (report, (0.0, 0.1)), functional) == ((report, (0.0, 0.1)), None)
    assert asked == ["stopped"]


def test_beside_the_bit_check_stubbed_order_of_answers():
    def fails(message):
        def run(*args):
            raise VCUError(message)

        return run

    ok = BitReport()
    # the bits match: the functional check's result, or its error
    assert checks_side_by_side(lambda: (ok, (0, 1)), lambda stop: "functional") == ((ok, (0, 1)), "functional")
    with pytest.raises(VCUError, match="^functional$"):
        checks_side_by_side(lambda: (ok, (0, 1)), fails("functional"))
    # the bits differ: no functional result, whatever it was
    bad = differing_report()
    assert checks_side_by_side(lambda: (bad, (0, 1)), fails("functional")) == ((bad, (0, 1)), None)
    assert checks_side_by_side(lambda: (bad, (0, 1)), lambda stop: "functional") == ((bad, (0, 1)), None)
    # the bit check failed to run: its error, not the functional check's
    with pytest.raises(VCUError, match="^bits$"):
        checks_side_by_side(fails("bits"), fails("functional"))


def test_the_checks_run_beside_each_other_with_a_gpu_unless_told(monkeypatch):
    monkeypatch.delenv(SIDE_BY_SIDE_ENV, raising=False)
    assert default_side_by_side("cuda") and default_side_by_side("cuda:1") and not default_side_by_side("cpu")
    monkeypatch.setenv(SIDE_BY_SIDE_ENV, "0")
    assert not default_side_by_side("cuda")
    monkeypatch.setenv(SIDE_BY_SIDE_ENV, "1")
    assert default_side_by_side("cpu")
    monkeypatch.setenv(SIDE_BY_SIDE_ENV, "yes")
    with pytest.raises(VCUError, match=r"^VCU128_VERIFY_SIDE_BY_SIDE=yes: expected 1 \(side by side\), 0"):
        default_side_by_side("cpu")


def test_the_bit_check_beside_runs_in_a_nicer_process_that_logs_here(caplog):
    from vcu128.io.parallel import in_a_process
    from vcu128.io.provenance import warn

    # a process of its own (no interpreter lock shared), 10 steps nicer (the functional check's thread first)
    assert in_a_process(os.getpid) != os.getpid()
    assert in_a_process(os.getpriority, os.PRIO_PROCESS, 0) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    # its log records reach this process's loggers, as if logged here
    with caplog.at_level("INFO", logger="vcu128"):
        assert in_a_process(warn, ["compile_sw.json: made from another checkpoint"]) is None
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("vcu128", "WARNING", "warning: compile_sw.json: made from another checkpoint")]
    # its errors are raised here, hint and all
    with pytest.raises(VCUError, match="^x.bin: missing$") as error:
        in_a_process(fails_with_a_hint)
    assert error.value.hint == "run hardware.py"


def test_where_no_process_can_start_the_bit_check_runs_in_this_one(monkeypatch):
    import multiprocessing

    from vcu128.io.parallel import in_a_process

    def no_semaphores(self, *args, **kwargs):
        raise OSError(38, "Function not implemented")  # what a container without /dev/shm says

    monkeypatch.setattr(type(multiprocessing.get_context("spawn")), "Queue", no_semaphores)
    assert in_a_process(os.getpid) == os.getpid()


def fails_with_a_hint():
    raise VCUError("x.bin: missing", "run hardware.py")
