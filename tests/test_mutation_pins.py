"""Known answers that mutation testing (bench/mutation.py) showed missing: each test here kills
mutants that survived every other test (bench/results/mutation.md lists which). Bit-exact,
deterministic, fast: no export unless the test is about one."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import export_all

from vcu128 import __version__
from vcu128.check import verify as verify_module
from vcu128.check.verify import (
    _is_verify_report,
    _rope_place,
    _silu_place,
    judge,
    tool_version,
    verify,
    write_report,
)
from vcu128.format.layout import (
    PackedLinearWriter,
    check_int4_range,
    offset_binary_bytes,
    pack_nibbles,
    row_words,
)
from vcu128.format.rescale import (
    FP16_MAX,
    RescalePlan,
    module_factors,
    scale_fp16,
    tensor_factor,
)
from vcu128.format.synthetic import SyntheticSpec, write_gptq_checkpoint
from vcu128.format.tables import (
    BOARD_SILU,
    BOARD_SILU_WORDS,
    SiluTable,
    fit_silu,
    rope_from_rows,
)
from vcu128.io.errors import VCUError

# ---------------------------------------------------------------------------------------------
# The SiLU tables, word for word

# fit_silu's words, as this project's fit makes them (numpy float64, fp16 rounding); a change of
# the fit (segments, minimax lines, bisection, rounding) changes the board's SiLU: it must be seen.
FIT_WORDS = {
    (-16.0, 16.0): {
        "wt": [0x0000, 0xA1A7, 0xA99F, 0xADB2, 0x1403, 0x302E, 0x348C, 0x3736, 0x38F6, 0x3A42, 0x3B6B, 0x3C2C, 0x3C5B, 0x3C2D, 0x3C0B, 0x3C00],
        "bias": [0x0000, 0xAD6A, 0xB400, 0xB69B, 0xB461, 0xB07B, 0xA999, 0x14D0, 0xA192, 0xAD03, 0xB22A, 0xB55A, 0xB69A, 0xB401, 0xAD4E, 0x0000],
        "x_region": [0xC7A9, 0xC508, 0xC338, 0xBE30, 0xBC1F, 0xB905, 0xB451, 0x2C8B, 0x36A8, 0x3A4E, 0x3CE7, 0x3F64, 0x433B, 0x450A, 0x47A9, 0x0000],
    },
    (-4.0, 6.0): {
        "wt": [0x0000, 0xAC9B, 0xADD1, 0xA47E, 0x2DA5, 0x32E0, 0x35AD, 0x3802, 0x392E, 0x3A4C, 0x3B4F, 0x3C13, 0x3C5D, 0x3C35, 0x3C16, 0x3C00],
        "bias": [0x0000, 0xB5B7, 0xB6AE, 0xB4C8, 0xB1B6, 0xAD2F, 0xA4BF, 0x198E, 0xA4E9, 0xAD42, 0xB1C4, 0xB4CE, 0xB6AD, 0xB482, 0xB08C, 0x0000],
        "x_region": [0xC7FD, 0xC1CE, 0xBE77, 0xBC8F, 0xBA28, 0xB724, 0xB0A5, 0x30C8, 0x3737, 0x3A32, 0x3C95, 0x3E80, 0x42F5, 0x44A5, 0x47FD, 0x0000],
    },
    (0.0, 1.0): {
        "wt": [0x0000, 0x3842, 0x38C5, 0x3947, 0x39C6, 0x3A41, 0x3AB7, 0x3B26, 0x3B65, 0x3B65, 0x3B65, 0x3B65, 0x3B65, 0x3B65, 0x3B65, 0x3C00],
        "bias": [0x0000, 0x9041, 0xA07C, 0xA673, 0xAA55, 0xAD31, 0xAFA8, 0xB13E, 0xB22F, 0xB22F, 0xB22F, 0xB22F, 0xB22F, 0xB22F, 0xB22F, 0x0000],
        "x_region": [0xC8ED, 0x3021, 0x3425, 0x3644, 0x3838, 0x3959, 0x3A88, 0x3BCA, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x0000],
    },
    (10.0, 20.0): {
        "wt": [0x0000, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00],
        "bias": [0x0000, 0x8FF9, 0x8FF9, 0x8FF9, 0x8FF9, 0x8FF9, 0x8FF9, 0x8FF9, 0x8FF9, 0x8FF9, 0x8FF9, 0x8FF9, 0x8FF9, 0x8FF9, 0x8FF9, 0x0000],
        "x_region": [0xC8ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x0000],
    },
    (-20.0, -10.0): {
        "wt": [0x0000, 0x8001, 0x8001, 0x8001, 0x8001, 0x8001, 0x8001, 0x8001, 0x8001, 0x8001, 0x8001, 0x8001, 0x8001, 0x8001, 0x8001, 0x3C00],
        "bias": [0x0000, 0x8FFB, 0x8FFB, 0x8FFB, 0x8FFB, 0x8FFB, 0x8FFB, 0x8FFB, 0x8FFB, 0x8FFB, 0x8FFB, 0x8FFB, 0x8FFB, 0x8FFB, 0x8FFB, 0x0000],
        "x_region": [0xC8ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x48ED, 0x0000],
    },
}


@pytest.mark.parametrize("fit_range", list(FIT_WORDS), ids=["default", "narrow", "few segments", "on the identity", "on zero"])
def test_the_fitted_silu_table_word_for_word(fit_range):
    table = fit_silu.__wrapped__(*fit_range)  # past the cache: the fit itself runs
    got = {k: [int(w) for w in getattr(table, k).view("<u2")] for k in ("wt", "bias", "x_region")}
    assert got == FIT_WORDS[fit_range]


def test_the_board_silu_table_from_its_words_and_through_its_file():
    t = SiluTable.from_words(BOARD_SILU_WORDS)
    data = t.pack()
    for beat, k in enumerate(("wt", "bias", "x_region")):
        assert data[64 * beat : 64 * beat + 32].view("<u2").tolist() == BOARD_SILU_WORDS[k]
        assert not data[64 * beat + 32 : 64 * beat + 64].any()
    back = SiluTable.unpack(data)
    assert all(getattr(back, k).shape == (16,) and getattr(back, k).dtype == np.dtype("<f2") for k in ("wt", "bias", "x_region"))
    assert np.array_equal(back.pack(), BOARD_SILU.pack())


def test_the_longest_piece_when_even_the_shortest_candidate_errs_too_much():
    """The fit's piece search falls back to bisecting between the start and its first candidate."""
    from vcu128.format.tables import _line_errors, _longest_piece

    b = _longest_piece(0.0, 8.0, 1e-6)
    assert b == 0.005615234375  # 46/1024 of the first candidate, 8/64
    assert _line_errors(0.0, b)[0][0] <= 1e-6 < _line_errors(0.0, b + 8 / 64 / 1024)[0][0]
    assert _longest_piece(0.0, 8.0, 2e-6) == 0.0079345703125  # 65/1024 of it (bisecting up to the second candidate: 0.0078125)


def test_rope_values_back_from_either_order():
    rows = np.arange(3 * 128, dtype=np.float16).reshape(3, 128)
    cos, sin = rope_from_rows(rows, "pairs")
    assert np.array_equal(cos, rows[:, 0::2]) and np.array_equal(sin, rows[:, 1::2]) and cos.shape == (3, 64)
    cos, sin = rope_from_rows(rows, "halves")
    assert np.array_equal(cos, rows[:, :64]) and np.array_equal(sin, rows[:, 64:])


# ---------------------------------------------------------------------------------------------
# fp16 rescaling: the exact multiplication and the plan's record


def test_scale_fp16_known_answers_and_what_it_counts():
    values = np.array([1.0, -2.0, 2.0**-14, 2.0**-13, 3e-5, 60000.0, 0.0, -65504.0], np.float16)
    counter: dict = {}
    down = scale_fp16(values, 2.0**-2, counter)
    assert down.dtype == np.float16
    assert down.tolist() == [0.25, -0.5, float(np.float16(2.0**-16)), float(np.float16(2.0**-15)), float(np.float16(3e-5 / 4)), 15000.0, 0.0, -16376.0]
    assert counter == {"out_of_normal_range": 2}  # 2^-14 and 2^-13 leave the normal range; 3e-5 was already subnormal
    up = scale_fp16(values, 2.0**3, counter)
    assert up.tolist() == [8.0, -16.0, 2.0**-11, 2.0**-10, float(np.float16(np.float32(np.float16(3e-5)) * 8)), FP16_MAX, 0.0, -FP16_MAX]
    assert counter == {"out_of_normal_range": 4}  # 60000 and -65504 saturate
    exact = np.array([2.0**-14, 65504.0], np.float16)
    assert scale_fp16(exact, 1.0 / 1, counter) is exact and counter == {"out_of_normal_range": 4}  # factor 1: untouched, not counted
    fresh: dict = {}
    scale_fp16(np.array([2.0**-14, 2.0**15], np.float16), 0.5, fresh)
    scale_fp16(np.array([2.0**15], np.float16), 1.0, fresh)
    assert fresh == {"out_of_normal_range": 1}
    assert scale_fp16(np.array([32768.0], np.float16), 2.0).tolist() == [FP16_MAX]  # 65536 saturates (and no counter is fine)
    edges: dict = {}
    assert scale_fp16(np.array([2.0**-13], np.float16), 0.5, edges).tolist() == [2.0**-14]  # the smallest normal: nothing lost
    assert scale_fp16(np.array([32752.0], np.float16), 2.0, edges).tolist() == [FP16_MAX]  # the largest finite: nothing lost
    assert edges == {"out_of_normal_range": 0}


def test_the_plans_record_and_its_copies():
    plan = RescalePlan(2, (0, 1), ("why",), "quant_report.json", {"kept": "with_k"}, 3)
    assert plan.to_record() == {"k": 2, "m": [0, 1], "why": ["why"], "statistics": "quant_report.json", "k_choice": {"kept": "with_k"},
                                "out_of_normal_range": 3}
    assert RescalePlan(1, ()).to_record() == {"k": 1, "m": [], "why": []}
    assert RescalePlan.from_record(plan.to_record(), "x", "key", num_layers=2) == plan
    assert plan.with_k(5) == RescalePlan(5, (0, 1), ("why",), "quant_report.json", {"kept": "with_k"}, 3)
    assert plan.with_report(out_of_normal_range=7).out_of_normal_range == 7
    assert plan.factors_record() == {"k": 2, "m": [0, 1]} and plan.describe() == "k=2, m=[0, 1]"
    assert plan.layer_m(1) == 1 and plan.layer_m(2) == 0 and plan.layer_m(7) == 0
    assert not plan.is_identity and RescalePlan(0, (0, 0)).is_identity and not RescalePlan(0, (0, 1)).is_identity
    assert RescalePlan(30, (30,)).k == 30
    for bad in (True, 31, -1, 2.0):
        with pytest.raises(VCUError, match="expected a whole number from 0 to 30"):
            RescalePlan(bad, ())
    with pytest.raises(VCUError, match=r"m\[0\]=True"):
        RescalePlan(0, (True,))
    with pytest.raises(VCUError, match=r"key.why is not a list of strings"):
        RescalePlan.from_record({"k": 1, "m": [], "why": [1]}, "x", "key")
    with pytest.raises(VCUError, match=r"key.why is not a list of strings"):
        RescalePlan.from_record({"k": 1, "m": [], "why": "text"}, "x", "key")
    assert RescalePlan.from_record({"k": 1}, "x", "key") == RescalePlan(1, ())


def test_every_factor_the_plan_gives_and_none_without_a_plan():
    plan = RescalePlan(0, (1,))  # down_proj 2^(1 - 0) = 2: a factor above 1 is a factor too
    assert module_factors(plan, 0) == {"mlp.up_proj": 0.5, "mlp.down_proj": 2.0}
    assert module_factors(plan, 1) == {} and module_factors(None, 0) == {}
    assert tensor_factor(None, "model.layers.0.mlp.up_proj") == 1.0 and tensor_factor(None, "model.embed_tokens.weight") == 1.0
    assert tensor_factor(RescalePlan(3, ()), "model.embed_tokens.weight") == 2.0**-3
    assert tensor_factor(plan, "model.layers.0.mlp.up_proj.bias") == 0.5


# ---------------------------------------------------------------------------------------------
# The packing helpers' edges


def test_int4_range_edges_and_messages():
    check_int4_range(np.array([[-8, 7]]), "w")  # two's complement is the default
    check_int4_range(np.zeros((0, 8), np.int8), "w")
    for bad, value in ((np.array([[8]]), 8), (np.array([[-9]]), -9), (np.array([[0, 0], [0, 8]]), 8)):
        with pytest.raises(VCUError) as e:
            check_int4_range(bad, "lin", first_row=10)
        r, c = np.argwhere(bad == value)[0]
        assert str(e.value) == f"lin: row {10 + r}, input {c} holds {value}, outside the int4 range -8..7"
    with pytest.raises(VCUError) as e:
        check_int4_range(np.array([[0, 1], [2, -8]]), "lin", first_row=4, code="sign_magnitude")
    assert str(e.value).startswith("lin: row 5, input 1 holds -8, which sign-magnitude int4 cannot hold (-7..7)")
    assert e.value.hint == "quantize with quantize.py --int4 sign_magnitude (lm_head.py and hardware.py follow its record), or pack with --int4 twos"
    with pytest.raises(VCUError, match=r"lin: row 0, input 0 holds 9, outside the int4 range -7..7"):
        check_int4_range(np.array([[9]]), "lin", code="sign_magnitude")


def test_offset_binary_bytes_default_is_twos_complement():
    q = np.arange(-8, 8, dtype=np.int8).reshape(1, 16)
    words = pack_nibbles(q)
    assert np.array_equal(offset_binary_bytes(words), offset_binary_bytes(words, "twos"))
    assert offset_binary_bytes(words).tolist() == [[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]


def test_the_port_writer_records_each_files_shape(tmp_path):
    w = PackedLinearWriter(tmp_path, "x/y", chin=256, chout=5, ports=2, source="s")
    w.write(np.zeros((5, row_words(256)), "<u4"))
    records = w.close()
    assert [(r.path, r.rows, r.words_per_row, r.bytes) for r in records] == \
        [("x/y_HBM_DDR_00.bin", 3, 40, 480), ("x/y_HBM_DDR_01.bin", 3, 40, 480)]


# ---------------------------------------------------------------------------------------------
# verify's report, verdict and messages


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    qdir = write_gptq_checkpoint(tmp_path_factory.mktemp("report") / "q", SyntheticSpec(hidden=256, intermediate=384, num_layers=1,
                                                                                       num_heads=2, num_kv_heads=1, vocab=256, seed=9))
    export_all(qdir, lm_method="rtn")
    return qdir


def test_verify_report_with_the_defaults(exported, tmp_path):
    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    result = verify(qdir, hw, progress=False)
    bits = result["bit_check"]
    assert set(result) == {"tool", "version", "time", "checkpoint", "hardware_dir", "bit_check", "source", "functional", "timeline", "verdict",
                           "report_path"}
    assert result["tool"] == "compiler-vcu128" and result["version"] == tool_version()
    assert len(result["time"]) == 24 and result["time"][4] == "-" and result["time"][10] == "T"  # 2026-11-30T22:40:14+0000
    assert result["checkpoint"] == str(qdir.resolve()) and result["hardware_dir"] == str(hw.resolve())
    assert bits == {"ok": True, "files": 7 * 33 + 2 + 34 + 16 + 2, "bytes": bits["bytes"], "seconds": bits["seconds"], "differences": [],
                    "more_differences": 0, "stale_inputs": []}
    assert bits["bytes"] == sum(p.stat().st_size for p in hw.rglob("*.bin")) and 0 < bits["seconds"] < 600
    assert result["source"] == {"checkpoint": str(exported.resolve())}  # where the folder was made (copied since)
    f = result["functional"]
    # the defaults: board numerics, the folder's int4 output layer, 256 evaluation tokens, 8 greedy tokens
    assert (f["numerics"], f["centred_variance"], f["lm_head_from_checkpoint"], f["device"]) == ("board", True, False, "cpu")
    assert f["eval"]["tokens"] == 256 and len(f["greedy"]["hardware"]["tokens"]) == 8 and 0 < f["seconds"] < 600
    # on a CPU one check after the other, each span its seconds
    (b0, b1), (f0, f1) = result["timeline"]["bit_check"], result["timeline"]["functional"]
    assert result["timeline"]["side_by_side"] is False and 0 <= b0 < b1 <= f0 < f1
    assert b1 - b0 == bits["seconds"] and f1 - f0 == f["seconds"]
    assert result["verdict"]["strict"] is False and result["verdict"]["bits"] == "match"
    assert result["report_path"] == str(hw.parent / "verify_report.json")
    assert json.loads((hw.parent / "verify_report.json").read_text()) == {k: v for k, v in result.items() if k != "report_path"}
    bits_only = verify(qdir, hw, progress=False, functional=False, strict=True)
    assert "functional" not in bits_only and bits_only["verdict"]["board_model"] == "not run" and bits_only["verdict"]["strict"] is True


def test_verify_does_not_run_the_board_model_when_the_bits_differ(exported, tmp_path):
    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    part = hw / "Embedding" / "Embedding_01-of-16.bin"
    data = np.fromfile(part, "<u2")
    data[0] ^= 1
    data.tofile(part)
    result = verify(qdir, hw, progress=False)
    assert not result["bit_check"]["ok"] and "functional" not in result and result["verdict"]["exit_code"] == 1


def test_a_cuda_device_without_cuda_is_refused(exported, tmp_path, monkeypatch):
    import torch

    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VCUError, match=r"--device cuda:0: no CUDA device here \(torch "):
        verify(qdir, qdir / "compile" / "QWEN_BLOCK_write_data_port32", progress=False, device="cuda:0")


def _result(bits_ok=True, top1=0.97, saturated=0, finite=True, functional=True):
    f = {"ok": finite, "against_hardware": {"checkpoint": {"top1_agreement": top1}},
         "saturation": [{"layer": 0, "site": "down", "count": 1}] * saturated}
    return {"bit_check": {"ok": bits_ok}, **({"functional": f} if functional else {})}


THRESHOLD = {"top1_agreement": 0.9, "saturated_sites": 0}


def test_the_verdicts_word_for_word():
    assert judge(_result()) == {"bits": "match", "threshold": THRESHOLD, "strict": False, "top1_agreement": 0.97, "saturated_sites": 0,
                                "board_model": "answers like the checkpoint", "ok": True, "exit_code": 0}
    assert judge(_result(bits_ok=False, functional=False)) == {"bits": "differ", "threshold": THRESHOLD, "strict": False,
                                                               "board_model": "not run", "ok": False, "exit_code": 1}
    assert judge(_result(finite=False), True) == {
        "bits": "match", "threshold": THRESHOLD, "strict": True, "board_model": "non-finite", "ok": False, "exit_code": 1,
        "next_step": "the board would compute NaN or inf: see where above; --fp16_rescale measure at compile_sw.py if it is an overflow"}
    assert judge(_result(saturated=3)) == {
        "bits": "match", "threshold": THRESHOLD, "strict": False, "top1_agreement": 0.97, "saturated_sites": 3, "board_model": "below the threshold",
        "next_step": "fp16 sites saturate on the board: compile_sw.py --fp16_rescale measure, then hardware.py and embedding_tokens.py, "
                     "rescales the folder (docs/FORMAT.md 7)", "ok": True, "exit_code": 0}
    assert judge(_result(top1=0.5)) == {
        "bits": "match", "threshold": THRESHOLD, "strict": False, "top1_agreement": 0.5, "saturated_sites": 0, "board_model": "below the threshold",
        "next_step": "verify.py --model <the fp16 original> shows whether quantization or the board's arithmetic costs it; "
                     "more calibration (quantize.py --nsamples) or lm_head.py --method rtn may recover it", "ok": True, "exit_code": 0}


def test_where_a_table_difference_is():
    assert _rope_place(0, 2048, "halves") == "position 0, channel 0 (cos of frequency 0)"
    assert _rope_place(2 * 2048 * 32 + 5 * 32 + 1, 2048, "halves") == "position 5, channel 65 (sin of frequency 1)"
    assert _rope_place(2048 * 32 + 31, 2048, "halves") == "position 0, channel 63 (cos of frequency 63)"
    assert _rope_place(2 * 2048 * 32, 2048, "halves") == "position 0, channel 64 (sin of frequency 0)"
    assert _rope_place(3 * 16 * 32 + 7 * 32 + 31, 16, "pairs") == "position 7, channel 127 (sin of frequency 63)"
    assert _rope_place(3 * 16 * 32 + 7 * 32 + 30, 16, "pairs") == "position 7, channel 126 (cos of frequency 63)"
    assert _rope_place(4, 16, "pairs") == "position 0, channel 4 (cos of frequency 2)"
    assert [_silu_place(i) for i in (0, 15, 16, 32, 47, 64, 79, 80, 96, 4000)] == [
        "slope 0", "slope 15", "byte 32 (must be 0)", "offset 0", "offset 15", "breakpoint 0", "breakpoint 15", "byte 160 (must be 0)",
        "byte 192 (must be 0)", "byte 8000 (must be 0)"]


def test_the_version_names_the_checkout():
    here = Path(verify_module.__file__).resolve().parent
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except OSError:
        described = ""
    assert tool_version() == (f"{__version__} ({described})" if described else __version__)


@pytest.mark.parametrize("content", ['{"a": 1}', "[1, 2]", '"text"', '{"bit_check": [1]}', "not json", "", '{"bit_check": {"ok": true}}'],
                         ids=["object", "list", "string", "bit_check not an object", "not json", "empty", "too few keys"])
def test_a_users_verify_report_json_is_never_replaced(tmp_path, content, caplog):
    path = tmp_path / "verify_report.json"
    path.write_text(content)
    assert not write_report(path, {"tool": "compiler-vcu128", "bit_check": {}})
    assert path.read_text() == content
    assert f"warning: {path} exists and is not a verify report: not replacing it (the result is above)" in caplog.text
    assert not _is_verify_report(json.loads(content)) if content.strip() and content != "not json" else True


def test_only_a_report_of_this_tool_is_taken_for_one():
    assert _is_verify_report({"tool": "compiler-vcu128", "bit_check": {}})
    assert not _is_verify_report({"tool": "other", "bit_check": {}})
    assert _is_verify_report({"bit_check": {"ok": True, "files": 1, "bytes": 2, "differences": []}})
    assert not _is_verify_report(None) and not _is_verify_report({"tool": "compiler-vcu128"})


# ---------------------------------------------------------------------------------------------
# The folder's record: defaults and what is refused


def test_the_folders_assumptions_and_output_layer_defaults():
    from vcu128.format.folder import Assumptions, OutputLayerRecord

    a = Assumptions()
    assert (a.int4, a.rope_table, a.max_token, a.silu_table, a.silu_fit_range) == ("twos", "halves", 2048, "board", None)
    assert a.has_rope_table and Assumptions(rope_table="pairs").has_rope_table
    assert not Assumptions(rope_table="none: head_dim 64 is not the board's 128").has_rope_table
    assert OutputLayerRecord("rtn").int4_range == 8


def test_a_manifest_without_the_optional_keys_reads_as_the_defaults(exported, tmp_path):
    from vcu128.format.folder import PackedFolder

    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    doc = json.loads((hw / "manifest.json").read_text())
    doc["lm_head"].pop("int4_range", None)
    for key in ("int4", "rope_table", "max_token", "silu_table"):
        doc["assumptions"].pop(key, None)
    (hw / "manifest.json").write_text(json.dumps(doc))
    f = PackedFolder.open(hw)
    assert f.output_layer.int4_range == 8 and f.output_layer.method == "rtn"
    assert (f.assumptions.int4, f.assumptions.rope_table, f.assumptions.max_token, f.assumptions.silu_table) == ("twos", "halves", 2048, "board")


@pytest.mark.parametrize("sha", ["abc", "A" * 64, "0" * 63, "0" * 65], ids=["short", "upper case", "63 digits", "65 digits"])
def test_a_manifest_sha256_that_is_not_one_is_refused(exported, tmp_path, sha):
    from vcu128.format.folder import PackedFolder

    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    doc = json.loads((hw / "manifest.json").read_text())
    doc["files"][2]["sha256"] = sha
    (hw / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(VCUError, match=r"files\[2\].sha256 .* is not a sha256 \(64 hex digits\)"):
        PackedFolder.open(hw)


def test_verify_passes_its_evaluation_ids_and_its_model_on(exported, tmp_path):
    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    ids = tmp_path / "ids.txt"
    ids.write_text("5 6 7 8 9")
    f = verify(qdir, hw, progress=False, eval_ids=ids, tokens=1)["functional"]
    assert f["eval"] == {"tokens": 5, "source": f"ids from {ids}"}
    # --model names the unquantized original: a GPTQ checkpoint is not one, and is refused as such
    with pytest.raises(VCUError, match=r"model.layers.0.self_attn.q_proj.weight: missing from the --model folder"):
        verify(qdir, hw, progress=False, model=qdir, tokens=1, eval_tokens=8)


def test_verify_reads_the_compile_folder_it_is_given(exported, tmp_path):
    """--compile_dir: its records are what the stale-input warnings are about."""
    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    other = tmp_path / "other"
    other.mkdir()
    record = json.loads((qdir / "compile" / "compile_sw.json").read_text())
    record["made_from"]["fingerprint"] = "0" * 16
    (other / "compile_sw.json").write_text(json.dumps(record))
    result = verify(qdir, qdir / "compile" / "QWEN_BLOCK_write_data_port32", compile_dir=other, progress=False, functional=False)
    assert f"{other}: made from another checkpoint, or the checkpoint changed since (re-run compile_sw.py)" in result["bit_check"]["stale_inputs"]
    plain = verify(qdir, qdir / "compile" / "QWEN_BLOCK_write_data_port32", progress=False, functional=False)
    assert plain["bit_check"]["stale_inputs"] == []


def test_a_folder_without_manifest_or_ports_and_a_wrong_kind_of_record(exported, tmp_path):
    from vcu128.format.folder import PackedFolder

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VCUError) as e:
        PackedFolder.open(empty)
    assert str(e.value) == f"{empty}: no manifest.json and no BLOCK00/MVM_BN_write_to_HBM_bin/MVMBN0_q_HBM_DDR_00.bin: not a packed folder"
    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    doc = json.loads((hw / "manifest.json").read_text())
    doc["assumptions"] = True
    (hw / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(VCUError, match=r"assumptions is a boolean, expected an object"):
        PackedFolder.open(hw)


def test_layer_reports_merge_their_counts():
    from vcu128.check.verify import MAX_REPORTED, BitReport

    a, b = BitReport(files_checked=2, bytes_checked=10, more=1), BitReport(files_checked=3, bytes_checked=5, more=4)
    for i in range(MAX_REPORTED):
        b.add(f"d{i}")
    a.add("first")
    a.merge(b)
    assert (a.files_checked, a.bytes_checked) == (5, 15)
    assert a.differences == ["first"] + [f"d{i}" for i in range(MAX_REPORTED - 1)]
    assert a.more == 1 + 4 + 1  # its own, the other's, and the one past MAX_REPORTED in the merge


def test_a_bad_llama3_scaling_value_names_the_config():
    from vcu128.format.tables import rope_inv_freq

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "x", "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    with pytest.raises(VCUError) as e:
        rope_inv_freq({"rope_scaling": scaling}, 128, Path("model/config.json"))
    assert str(e.value) == "model/config.json: 'rope_scaling.low_freq_factor' is 'x', expected a finite number"


def test_verify_passes_its_numerics_options_on(exported, tmp_path):
    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    f = verify(qdir, hw, progress=False, tokens=1, eval_tokens=16, numerics="fp32", lm_head_from_checkpoint=True)["functional"]
    assert (f["numerics"], f["lm_head_from_checkpoint"], f["centred_variance"]) == ("fp32", True, False)
    f = verify(qdir, hw, progress=False, tokens=1, eval_tokens=16, variant="truncate+fp32+mean_square", variants="none")["functional"]
    assert (f["numerics"], f["lm_head_from_checkpoint"], f["centred_variance"], f["variant"]) == ("board", False, False, "truncate+fp32+mean_square")
    assert f["variant_set"] == ["truncate+fp32+mean_square"] and list(f["variants"]) == ["truncate+fp32+mean_square"]


def test_verify_runs_the_board_model_of_a_folder_without_manifest(exported, tmp_path):
    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    (hw / "manifest.json").unlink()
    result = verify(qdir, hw, progress=False, tokens=1, eval_tokens=16)
    assert result["bit_check"]["ok"], result["bit_check"]["differences"]
    assert result["functional"]["ok"] and result["source"] == {}


def test_an_older_folder_takes_its_output_layer_method_from_the_compile_record(exported, tmp_path):
    """No lm_head in the manifest: lm_head.json's method, with the default grid (8) when it names none."""
    from vcu128.check.verify import output_layer_record
    from vcu128.format.checkpoint import GPTQCheckpoint
    from vcu128.format.folder import PackedFolder
    from vcu128.io.output import write_step_record

    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    doc = json.loads((hw / "manifest.json").read_text())
    doc.pop("lm_head")
    (hw / "manifest.json").write_text(json.dumps(doc))
    write_step_record(qdir / "compile", "lm_head", {"method": "rtn"}, [])
    record = output_layer_record(PackedFolder.open(hw), GPTQCheckpoint(qdir), qdir / "compile")
    assert (record.method, record.int4_range) == ("rtn", 8)


def test_an_unknown_silu_table_is_refused_with_the_choices():
    from vcu128.format.tables import silu_table

    with pytest.raises(VCUError) as e:
        silu_table("exact")
    assert str(e.value) == "--silu_table exact: expected one of board, fit"


def test_a_manifest_for_another_model_is_refused_naming_the_key(exported, tmp_path):
    from vcu128.check.verify import bit_check

    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    doc = json.loads((hw / "manifest.json").read_text())
    doc["model"]["hidden"] = 512
    (hw / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(VCUError) as e:
        bit_check(qdir, hw, progress=False)
    assert str(e.value) == f"{hw / 'manifest.json'}: model hidden=512, but the checkpoint's config.json says 256"


# ---------------------------------------------------------------------------------------------
# Survivors of the runs of 2026-12-01 (bench/results/mutation.md): the folder's ownership, its
# tables, the families' names, the recorded plan's messages, the emulator's pieces, output.py


def test_who_owns_the_packed_folder_and_its_embedding_parts(exported, tmp_path):
    from vcu128.format.folder import (
        EMBEDDING_KIND,
        HARDWARE_KIND,
        default_hardware_dir,
        embedding_folder_owned,
        manifest_owns,
        packed_folders_in,
    )

    compile_dir = tmp_path / "compile"
    shutil.copytree(exported / "compile", compile_dir)
    hw = compile_dir / "QWEN_BLOCK_write_data_port32"
    doc = json.loads((hw / "manifest.json").read_text())
    hardware = {f["path"] for f in doc["files"] if f["step"] == "hardware"}
    parts = {f"Embedding_{i:02d}-of-16.bin" for i in range(1, 17)}
    assert len(hardware) == 269 and "BLOCK00/MVM_BN_write_to_HBM_bin/MVMBN0_q_HBM_DDR_00.bin" in hardware
    assert manifest_owns(HARDWARE_KIND, "hardware")(hw) == hardware | {"manifest.json"}
    assert manifest_owns(HARDWARE_KIND, "embedding_tokens")(hw) == {f"Embedding/{p}" for p in parts} | {"manifest.json"}
    assert manifest_owns(EMBEDDING_KIND, "hardware")(hw) is None
    assert manifest_owns(HARDWARE_KIND, "hardware")(compile_dir) is None  # no manifest there
    assert embedding_folder_owned(hw / "Embedding", "embedding_tokens") == parts
    assert embedding_folder_owned(hw / "Embedding", "hardware") is None
    assert embedding_folder_owned(compile_dir / "Embedding", "embedding_tokens") is None  # no manifest around it either
    # an Embedding/ folder made alone has a manifest of its own
    alone = {**doc, "kind": EMBEDDING_KIND, "files": [{**f, "path": f["path"][len("Embedding/"):]} for f in doc["files"] if f["step"] == "embedding_tokens"]}
    (hw / "Embedding" / "manifest.json").write_text(json.dumps(alone))
    assert embedding_folder_owned(hw / "Embedding", "embedding_tokens") == parts | {"manifest.json"}
    (hw / "Embedding" / "manifest.json").unlink()
    # an entry without its step is every step's (a manifest before the steps were recorded)
    for f in doc["files"]:
        f.pop("step")
    (hw / "manifest.json").write_text(json.dumps(doc))
    assert manifest_owns(HARDWARE_KIND, "lm_head")(hw) == hardware | {f"Embedding/{p}" for p in parts} | {"manifest.json"}
    # packed folders: directories with a hardware manifest, not hidden, not symlinks
    shutil.copytree(hw, compile_dir / ".hidden")
    (compile_dir / "link").symlink_to(hw)
    (compile_dir / "plain").mkdir()
    assert packed_folders_in(compile_dir) == [hw]
    assert default_hardware_dir(compile_dir) == hw  # 32 ports unless told
    assert packed_folders_in(compile_dir / "missing") == []


def test_ports_and_parts_of_a_folder_without_manifest(exported, tmp_path):
    from vcu128.format.folder import infer_parts, infer_ports

    hw = tmp_path / "hw"
    shutil.copytree(exported / "compile" / "QWEN_BLOCK_write_data_port32", hw)
    assert (infer_ports(hw), infer_parts(hw)) == (32, 16)
    (hw / "BLOCK00" / "MVM_BN_write_to_HBM_bin" / "MVMBN0_q_HBM_DDR_31.bin").unlink()
    assert infer_ports(hw) == 31  # counted one by one: an odd count is seen
    (hw / "Embedding" / "Embedding_03-of-16.bin").rename(hw / "Embedding" / "Embedding_03-of-08.bin")
    with pytest.raises(VCUError) as e:
        infer_parts(hw)
    assert str(e.value) == f"{hw / 'Embedding'}: embedding part names not all of the form Embedding_01-of-16.bin for one part count"
    shutil.rmtree(hw / "Embedding")
    assert infer_parts(hw) == 0
    (hw / "Embedding").mkdir()
    (hw / "Embedding" / "Embedding_01-of-04.bin").write_bytes(b"")
    assert infer_parts(hw) == 4


def test_the_folders_rope_and_silu_tables_as_read(exported, tmp_path):
    from vcu128.format.folder import Manifest, PackedFolder
    from vcu128.format.tables import rope_cos_sin

    hw = tmp_path / "hw"
    shutil.copytree(exported / "compile" / "QWEN_BLOCK_write_data_port32", hw)
    f = PackedFolder.open(hw)
    assert f.rope_order("pairs") == "halves" and f.describe_rope("pairs") == "pos_in_4_token2048_ch32.bin (halves)"
    assert json.loads((hw / "manifest.json").read_text())["format"] == "FORMAT.md"
    assert Manifest("hardware", {}, {"ports": 32}).to_json() == {"tool": "compiler-vcu128", "version": __version__, "format": "FORMAT.md",
                                                                 "kind": "hardware", "model": {}, "ports": 32, "files": []}
    cfg = json.loads((exported / "config.json").read_text())
    want_cos, want_sin = rope_cos_sin(cfg, 128, 5, exported / "config.json")
    cos, sin = f.rope_cos_sin(5, "pairs")
    assert cos.shape == (5, 64) and np.array_equal(cos.view("<u2"), want_cos.astype("<f2").view("<u2"))
    assert np.array_equal(sin.view("<u2"), want_sin.astype("<f2").view("<u2"))
    assert f.rope_cos_sin(2048)[0].shape == (2048, 64)  # every position the table holds
    with pytest.raises(VCUError) as e:
        f.rope_cos_sin(2049)
    assert str(e.value) == "2049 positions asked for, the folder's RoPE table holds 2048"
    assert f.silu_table() is not None
    (hw / "ACT_parameter_in_DDR.bin").unlink()
    (hw / "pos_in_4_token2048_ch32.bin").unlink()
    assert f.silu_table() is None and f.rope_cos_sin(5) is None
    # without a manifest, the order is the caller's
    shutil.copy2(exported / "compile" / "QWEN_BLOCK_write_data_port32" / "pos_in_4_token2048_ch32.bin", hw)
    (hw / "manifest.json").unlink()
    bare = PackedFolder.open(hw)
    assert bare.rope_order("pairs") == "pairs" and bare.describe_rope("pairs").endswith(" (pairs)")
    assert np.array_equal(bare.rope_cos_sin(5, "halves")[0].view("<u2"), want_cos.astype("<f2").view("<u2"))


def test_a_folder_whose_manifest_has_no_rope_table_gives_none(exported, tmp_path):
    from vcu128.format.folder import PackedFolder

    hw = tmp_path / "hw"
    shutil.copytree(exported / "compile" / "QWEN_BLOCK_write_data_port32", hw)
    doc = json.loads((hw / "manifest.json").read_text())
    doc["assumptions"]["rope_table"] = "none: head_dim 64 is not the board's 128"
    (hw / "manifest.json").write_text(json.dumps(doc))
    assert PackedFolder.open(hw).rope_cos_sin(5) is None  # the file is there, the order says there is no table


def test_the_glm_order_of_the_rope_rows():
    rows = np.arange(3 * 128, dtype=np.float32).reshape(3, 128)
    cos, sin = rope_from_rows(rows, "glm")
    assert np.array_equal(cos, rows[:, np.arange(0, 64, 2)]) and np.array_equal(sin, rows[:, np.arange(1, 64, 2)])
    assert _rope_place(16 * 32 * 2 + 3 * 32, 16, "glm") == "position 3, channel 64 (zero padding of the GLM table)"
    assert _rope_place(16 * 32 + 3 * 32 + 31, 16, "glm") == "position 3, channel 63 (sin of frequency 31)"


def test_the_silu_tables_segments_and_error_bounds():
    x = np.array([[-100.0, 0.0], [100.0, -0.5]])
    assert BOARD_SILU.segment(x).tolist() == [[0, 8], [15, 7]]  # any shape: the last axis is the breakpoints'
    assert BOARD_SILU.error(-16, 16) == (0.010964202346253588, -0.77783203125)
    assert BOARD_SILU.error(0.5, 1.5) == (0.005925322793596921, 0.991695)
    # the largest error is at a breakpoint: an end of the range on it counts it
    assert BOARD_SILU.error(-0.77783203125, -0.5) == (0.010964202346253588, -0.77783203125)
    assert BOARD_SILU.error(-1.0, -0.77783203125) == (0.010964202346253588, -0.77783203125)


def test_the_families_names_and_places():
    from vcu128.format.family import (
        CHATGLM,
        GLM,
        QWEN2,
        ModelDims,
        fused_name,
        module_alias,
        rotary_dim,
        tensor_places,
        to_source_names,
    )

    assert [fused_name(s) for s in CHATGLM.linears] == ["self_attn.q_proj+self_attn.k_proj+self_attn.v_proj", "self_attn.o_proj",
                                                         "mlp.gate_up_proj", "mlp.down_proj"]
    assert [fused_name(s) for s in GLM.linears][-1] == "mlp.gate_up_proj"
    qwen = ModelDims(256, 384, 1, 2, 1, 128, 256, False, "qwen2")
    glm = ModelDims(256, 384, 1, 2, 1, 128, 256, False, "chatglm")
    assert (rotary_dim(qwen), rotary_dim(glm)) == (128, 64) and isinstance(rotary_dim(glm), int)
    assert module_alias(QWEN2, qwen, "model.layers.0.self_attn.nothing") is None and module_alias(QWEN2, qwen, "model.nothing") is None
    places = tensor_places(QWEN2, False)
    assert places.fullmatch("model.layers.0.self_attn.q_proj.weight") and not places.fullmatch("model.layers.0.self_attn.q_proj.qweight")
    q, k, v = (np.full((1, n), i, np.int32) for i, n in ((1, 256), (2, 128), (3, 128)))
    g = [np.full(256, i, np.int32) for i in (1, 2, 3)]
    pre = "model.layers.0.self_attn"
    tensors = {f"{pre}.v_proj.qweight": v, f"{pre}.k_proj.qweight": k, f"{pre}.q_proj.qweight": q,  # given out of order
               f"{pre}.v_proj.g_idx": g[2], f"{pre}.q_proj.g_idx": g[0], f"{pre}.k_proj.g_idx": g[1], "other.buffer": g[2]}
    out = to_source_names(tensors, glm, np.concatenate)
    qkv = "transformer.encoder.layers.0.self_attention.query_key_value"
    assert sorted(out) == ["other.buffer", f"{qkv}.g_idx", f"{qkv}.qweight"]
    assert out[f"{qkv}.qweight"].tolist() == [[1] * 256 + [2] * 128 + [3] * 128]
    assert out[f"{qkv}.g_idx"] is g[0] and out["other.buffer"] is g[2]  # one g_idx for the fused tensor: its first part's
    del tensors[f"{pre}.k_proj.qweight"]
    with pytest.raises(ValueError) as e:
        to_source_names(tensors, glm, np.concatenate)
    assert str(e.value) == f"{qkv}.qweight: 2 of its 3 parts given"


@pytest.mark.parametrize("name,value,message", [
    ("statistics", 5, "x: key.statistics is 5, expected a string (or null)"),
    ("k_choice", [1], "x: key.k_choice is [1], expected an object (or null)"),
    ("out_of_normal_range", True, "x: key.out_of_normal_range is True, expected a whole number (or null)"),
    ("out_of_normal_range", 2.5, "x: key.out_of_normal_range is 2.5, expected a whole number (or null)"),
])
def test_a_recorded_plans_optional_keys_of_the_wrong_type(name, value, message):
    with pytest.raises(VCUError) as e:
        RescalePlan.from_record({"k": 1, "m": [], name: value}, "x", "key")
    assert str(e.value) == message


def test_a_recorded_plan_without_k():
    with pytest.raises(VCUError) as e:
        RescalePlan.from_record({"m": []}, "x", "key")
    assert str(e.value) == "x: key.k is missing (the residual stream's factor, a whole number from 0 to 30)"


def test_the_worst_variant_decides_the_verdict():
    result = _result()
    result["functional"]["variants"] = {"a": {"top1_agreement": 0.95, "saturated_sites": 0}, "b": {"top1_agreement": 0.95, "saturated_sites": 2},
                                        "c": {"top1_agreement": 0.99, "saturated_sites": 0}}
    assert judge(result) == {
        "bits": "match", "threshold": THRESHOLD, "strict": False, "variants": ["a", "b", "c"], "worst_variant": "b", "top1_agreement": 0.95,
        "saturated_sites": 2, "board_model": "below the threshold", "ok": True, "exit_code": 0,
        "next_step": "fp16 sites saturate on the board: compile_sw.py --fp16_rescale measure, then hardware.py and embedding_tokens.py, "
                     "rescales the folder (docs/FORMAT.md 7)"}


def test_model_must_have_the_checkpoints_dimensions(exported, tmp_path):
    from types import SimpleNamespace

    from vcu128.check.verify import check_same_shape
    from vcu128.format.model import parse_model_dims

    ckpt = SimpleNamespace(dims=parse_model_dims(exported / "config.json"))
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(VCUError) as e:
        check_same_shape(model, ckpt)
    assert str(e.value) == f"--model {model}: no config.json there (the fp16 original's folder)"
    cfg = json.loads((exported / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "tie_word_embeddings": True}))
    check_same_shape(model, ckpt)  # another family's name for the same model, tied or not: the same dimensions
    (model / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 512}))
    with pytest.raises(VCUError) as e:
        check_same_shape(model, ckpt)
    assert str(e.value) == f"--model {model}: intermediate 512, the checkpoint's is 384: not the model it was quantized from"


def test_the_emulators_pieces():
    import torch

    from vcu128.board.datapath import (
        BoardVariant,
        NonFinite,
        Numerics,
        group_sum,
        pessimistic_variants,
    )

    tiny = 0.75 * 2.0**-13  # 1 + tiny: between two 1-6-13 values, nearer the upper
    assert group_sum(torch.tensor([[1.0], [tiny]]), "nearest").tolist() == [1.0 + 2.0**-13]
    assert group_sum(torch.tensor([[1.0], [tiny]]), "truncate").tolist() == [1.0]
    assert group_sum(torch.tensor([[1.0, 2.0], [3.0, 0.5], [4.0, 0.25]]), "nearest").tolist() == [8.0, 2.75]
    e = NonFinite("board", 3, "down")
    assert str(e) == "board: non-finite value (NaN or inf) first at layer 3, down" and (e.model, e.layer, e.site) == ("board", 3, "down")
    assert [v.name for v in pessimistic_variants()] == ["truncate+grouped+centred", "truncate+grouped+mean_square"]
    with pytest.raises(VCUError) as err:
        BoardVariant.from_name("fast")
    assert str(err.value).startswith("board variant 'fast': not one of nearest+fp32+centred, nearest+fp32+mean_square, ")
    n = Numerics("board", True, 1e-6, torch.zeros(1, 64), torch.zeros(1, 64))
    n.stats.saturated[(0, "down")] = 1
    other = n.with_variant(BoardVariant("truncate"))
    assert other.stats.saturated == {} and other.name == "board" and n.stats.saturated == {(0, "down"): 1}


def test_output_helpers_in_process(tmp_path):
    import hashlib
    import os

    from vcu128.io.output import (
        UMASK,
        _umask,
        folder_stats,
        record_owns,
        sha256_file,
        write_step_record,
    )

    data = bytes(range(10))
    (tmp_path / "a.bin").write_bytes(data)
    assert sha256_file(tmp_path / "a.bin", block=3) == sha256_file(tmp_path / "a.bin") == hashlib.sha256(data).hexdigest()
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "b.bin").write_bytes(b"12345")
    (tmp_path / "d" / "e" / "c.bin").write_bytes(b"1234567")
    assert folder_stats([tmp_path / "a.bin", str(tmp_path / "d")]) == (3, 22) and folder_stats([]) == (0, 0)
    assert record_owns("compile_sw")(tmp_path) is None
    write_step_record(tmp_path, "compile_sw", {"x": 1}, ["a.bin", "d/b.bin"])
    assert record_owns("compile_sw")(tmp_path) == {"a.bin", "d/b.bin", "compile_sw.json"}
    assert record_owns("lm_head")(tmp_path) is None
    before = os.umask(0o022)
    os.umask(before)
    assert _umask() == UMASK == before and os.umask(before) == before  # read, and left as it was


def test_whether_a_run_is_alive_is_asked_with_signal_0(monkeypatch):
    """os.kill(pid, 0) only asks; any other number would signal the other run."""
    from vcu128.io import output

    asked = []

    def kill(pid, sig):
        asked.append((pid, sig))
        if pid == 2:
            raise ProcessLookupError
        if pid == 3:
            raise PermissionError  # another user's live process

    monkeypatch.setattr(output.os, "kill", kill)
    assert [output._alive(pid) for pid in (1, 2, 3)] == [True, False, True]
    assert asked == [(1, 0), (2, 0), (3, 0)]


def test_unpacking_rows_reads_the_code_it_is_given():
    from vcu128.format.layout import pack_linear_rows, unpack_linear_rows

    q = np.arange(-7, 8, dtype=np.int8)[np.arange(2 * 256) % 15].reshape(2, 256)
    scales = np.array([[1.0, 0.5], [2.0, 0.25]], np.float16)
    words = pack_linear_rows(q, scales, "sign_magnitude")
    got, got_scales, padding = unpack_linear_rows(words, 256, "sign_magnitude")
    assert np.array_equal(got, q) and np.array_equal(got_scales, scales) and not padding.any()
    assert not np.array_equal(unpack_linear_rows(words, 256)[0], q)  # read as two's complement, the negative values differ


# ---------------------------------------------------------------------------------------------
# verify's survivors that were accepted before: what it passes on (the default prompt, --eval_text,
# the progress flag) and where it finds a manifest-less folder's fp16 plan


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A checkpoint with a byte-level BPE tokenizer (vocab 288: 256 bytes, one special token, 31 merges
    learnt from the text below) and its packed folder; the tokenizer's ids are pinned in the test."""
    from vcu128.demo.tiny_model import train_tokenizer

    qdir = write_gptq_checkpoint(tmp_path_factory.mktemp("tok") / "q", SyntheticSpec(hidden=256, intermediate=384, num_layers=1,
                                                                                    num_heads=2, num_kv_heads=1, vocab=288, seed=9))
    train_tokenizer("The accelerator runs the model. The accelerator reads its folder.", 288).save_pretrained(qdir)
    export_all(qdir, lm_method="rtn")
    return qdir


def test_verify_greedy_prompt_and_eval_text_through_the_tokenizer(with_tokenizer, tmp_path):
    qdir = with_tokenizer
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    f = verify(qdir, hw, progress=False, tokens=1)["functional"]
    assert f["prompt_tokens"] == [260, 270]  # "The", " accelerator" (not "the": 280; "THE" would be bytes)
    assert f["eval"]["source"] == "the last tokens of demo_corpus.txt" and f["eval"]["tokens"] == 256
    text = tmp_path / "held_out.txt"
    text.write_text("the accelerator reads the model.")
    f = verify(qdir, hw, progress=False, tokens=1, text=text, prompt="the model")["functional"]
    assert f["prompt_tokens"] == [280, 285, 272]  # "the", " mo", "del"
    # "the", " accelerator", " read", "s", " the", " mo", "del", "." (the default corpus would give 256)
    assert f["eval"] == {"tokens": 8, "source": "the last tokens of held_out.txt"}


def test_verify_draws_its_bars_as_asked(exported, tmp_path, monkeypatch, capsys):
    """A bar is one line on stderr when that is not a terminal; progress=False (--quiet) draws none."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("VCU128_TTY", raising=False)
    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    capsys.readouterr()
    verify(qdir, hw, functional=False)  # the default: the bit check's bar
    assert re.fullmatch(r"verify: 1/1 layer in \d+\.\d s\n", capsys.readouterr().err)
    verify(qdir, hw, functional=False, progress=True)
    assert re.fullmatch(r"verify: 1/1 layer in \d+\.\d s\n", capsys.readouterr().err)
    verify(qdir, hw, functional=False, progress=False)
    assert capsys.readouterr().err == ""
    verify(qdir, hw, tokens=2, eval_tokens=16)  # the board model's bars too: its layers, then the greedy tokens
    assert re.fullmatch(r"verify: 1/1 layer in \d+\.\d s\nfunctional: 1/1 layer in \d+\.\d s\ngreedy: 2/2 token in \d+\.\d s\n",
                        capsys.readouterr().err)
    verify(qdir, hw, tokens=2, eval_tokens=16, progress=False)
    assert capsys.readouterr().err == ""


def test_a_folder_without_manifest_takes_its_fp16_plan_from_the_compile_folder(tmp_path):
    """The plan of a folder without manifest is in its compile folder's config.json, wherever
    --compile_dir says it is: the board model must run with it, as with the manifest's copy."""
    spec = SyntheticSpec(hidden=256, intermediate=384, num_layers=1, num_heads=2, num_kv_heads=1, vocab=256, seed=9)
    results = {}
    for mode in ("off", "k=14,m=3"):  # 2^-14: most of the residual stream is near or below fp16's smallest normal
        qdir = write_gptq_checkpoint(tmp_path / mode.replace("=", "").replace(",", "_") / "q", spec)
        hw = export_all(qdir, lm_method="rtn", fp16_rescale=mode)["hw"]
        results[mode] = verify(qdir, hw, progress=False, tokens=2, eval_tokens=16)
    assert json.loads((qdir / "compile" / "config.json").read_text())["vcu128_fp16_rescale"]["k"] == 14
    # the folder moved away from its compile folder, which is elsewhere again, and its manifest gone
    board, elsewhere = tmp_path / "board", tmp_path / "elsewhere"
    board.mkdir()
    elsewhere.mkdir()
    shutil.move(hw, board / hw.name)
    shutil.move(qdir / "compile", elsewhere / "compile")
    (board / hw.name / "manifest.json").unlink()
    result = verify(qdir, board / hw.name, compile_dir=elsewhere / "compile", progress=False, tokens=2, eval_tokens=16)
    assert result["bit_check"]["ok"], result["bit_check"]["differences"]
    with_plan, without = results["k=14,m=3"]["functional"], results["off"]["functional"]
    f = result["functional"]
    assert f["against_hardware"] == with_plan["against_hardware"] and f["greedy"] == with_plan["greedy"]
    assert f["against_hardware"] != without["against_hardware"]  # the plan changes the board's answers


@pytest.fixture(scope="module")
def gptq_lm_head(tmp_path_factory):
    """A checkpoint whose lm_head GPTQ quantized (lm_head.qweight), exported: the folder's output layer
    is the checkpoint's own int4 lm_head (method checkpoint)."""
    qdir = write_gptq_checkpoint(tmp_path_factory.mktemp("lmq") / "q", SyntheticSpec(hidden=256, intermediate=384, num_layers=1, num_heads=2,
                                                                                    num_kv_heads=1, vocab=256, lm_head_quantized=True, seed=5))
    export_all(qdir)
    return qdir


def test_verify_reads_an_output_layer_taken_from_the_checkpoints_gptq_lm_head(gptq_lm_head, tmp_path):
    from conftest import rewrite_manifest

    from vcu128.check.verify import bit_check

    qdir = tmp_path / "q"
    shutil.copytree(gptq_lm_head, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    doc = json.loads((hw / "manifest.json").read_text())
    assert doc["lm_head"] == {"method": "checkpoint", "int4_range": 8}
    assert bit_check(qdir, hw, progress=False).ok
    part = hw / "OutLayer" / "MVM_BN_write_to_HBM_bin" / "MVMBN_Argmax_HBM_DDR_05.bin"  # rows 5, 37, ...: weights then scales
    words = np.fromfile(part, "<u4")
    words[8 + 3] ^= 0x10  # its first row (output channel 5): after 8 scale words, inputs 24..31, one nibble
    words.tofile(part)
    rewrite_manifest(hw)
    report = bit_check(qdir, hw, progress=False)
    assert report.differences == ["OutLayer/MVM_BN_write_to_HBM_bin/MVMBN_Argmax_HBM_DDR_05.bin: row 0 (output channel 5), word 11 "
                                  "(weights of inputs 24..31) is 0xdc42fe18, expected 0xdc42fe08"]
    doc["lm_head"]["method"] = "trunc"  # a record that does not match the checkpoint
    (hw / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(VCUError) as e:
        bit_check(qdir, hw, progress=False)
    assert str(e.value) == f"{qdir}: the output layer is GPTQ-quantized (lm_head.qweight), but the folder records method trunc"


def test_a_folder_recording_the_checkpoints_lm_head_for_a_checkpoint_without_one_is_refused(exported, tmp_path):
    from vcu128.check.verify import bit_check

    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    doc = json.loads((hw / "manifest.json").read_text())
    doc["lm_head"]["method"] = "checkpoint"
    (hw / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(VCUError) as e:
        bit_check(qdir, hw, progress=False)
    want = f"{qdir}: the folder's output layer was taken from the checkpoint's lm_head.qweight, which it does not have"
    assert str(e.value) == want
    # an older folder (no lm_head in its manifest) whose lm_head.json says so: taken at its word, refused the same way
    from vcu128.check.verify import output_layer_record
    from vcu128.format.checkpoint import GPTQCheckpoint
    from vcu128.format.folder import PackedFolder
    from vcu128.io.output import write_step_record

    doc.pop("lm_head")
    (hw / "manifest.json").write_text(json.dumps(doc))
    write_step_record(qdir / "compile", "lm_head", {"method": "checkpoint"}, [])
    record = output_layer_record(PackedFolder.open(hw), GPTQCheckpoint(qdir), qdir / "compile")
    assert (record.method, record.int4_range) == ("checkpoint", 8)
    with pytest.raises(VCUError) as e:
        bit_check(qdir, hw, progress=False)
    assert str(e.value) == want


@pytest.mark.parametrize("made, want", [({"method": "trunc", "int4_range": 7}, ("trunc", 7)), ({"method": "checkpoint"}, ("checkpoint", 8)),
                                        ({"method": "gptq"}, ("checkpoint", 8)), ({"method": "rtn", "int4_range": 6}, ("checkpoint", 8))],
                         ids=["trunc on the 15-level grid", "checkpoint", "an unknown method", "a grid out of range"])
def test_an_older_folders_output_layer_from_its_record_or_else_from_the_checkpoint(gptq_lm_head, tmp_path, made, want):
    """No lm_head in the manifest: lm_head.json's method and grid where they are ones lm_head.py
    writes; else what the checkpoint holds decides (its GPTQ lm_head here: checkpoint)."""
    from vcu128.check.verify import output_layer_record
    from vcu128.format.checkpoint import GPTQCheckpoint
    from vcu128.format.folder import PackedFolder
    from vcu128.io.output import write_step_record

    qdir = tmp_path / "q"
    shutil.copytree(gptq_lm_head, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    doc = json.loads((hw / "manifest.json").read_text())
    doc.pop("lm_head")
    (hw / "manifest.json").write_text(json.dumps(doc))
    write_step_record(qdir / "compile", "lm_head", made, [])
    record = output_layer_record(PackedFolder.open(hw), GPTQCheckpoint(qdir), qdir / "compile")
    assert (record.method, record.int4_range) == want


@pytest.mark.parametrize("silu, fit_range, message", [
    ("fit", [-4, 6.5], None),
    ("fit", [-4.0, 6.0, 8.0], "tables.silu.fit_range is [-4.0, 6.0, 8.0], expected [low, high] (two finite numbers)"),
    ("fit", [6.0, -4.0], "tables.silu.fit_range is [6.0, -4.0], expected [low, high] (two finite numbers)"),
    ("fit", [-4.0, True], "tables.silu.fit_range is [-4.0, True], expected [low, high] (two finite numbers)"),
    ("fit", [-4.0, "6"], "tables.silu.fit_range is [-4.0, '6'], expected [low, high] (two finite numbers)"),
    ("exact", None, "assumptions.silu_table is 'exact', expected one of board, fit"),
], ids=["read", "three numbers", "high below low", "a boolean", "a string", "an unknown table"])
def test_the_fitted_silu_tables_range_as_the_manifest_records_it(exported, tmp_path, silu, fit_range, message):
    from vcu128.format.folder import PackedFolder

    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    doc = json.loads((hw / "manifest.json").read_text())
    doc["assumptions"]["silu_table"] = silu
    doc.setdefault("tables", {}).setdefault("silu", {})["fit_range"] = fit_range
    (hw / "manifest.json").write_text(json.dumps(doc))
    if message is None:
        a = PackedFolder.open(hw).assumptions
        assert (a.silu_table, a.silu_fit_range) == ("fit", (-4.0, 6.5)) and all(type(v) is float for v in a.silu_fit_range)
        return
    with pytest.raises(VCUError) as e:
        PackedFolder.open(hw)
    assert str(e.value) == f"{hw / 'manifest.json'}: {message}"
