"""verify.py's parts with known answers, in this process (bench/mutation.py found them untested):
a linear's port files read in blocks, each difference placed and counted; the bias, fp16 and table
files; the manifest check; the output layer's rows; how verify wires its two checks together.
Small hand-made folders: no export unless the test is about verify as a whole."""

import hashlib
import json
import logging
import shutil
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import export_all

from vcu128 import __version__
from vcu128.check import verify as verify_module
from vcu128.check.verify import (
    SIDE_BY_SIDE_ENV,
    BitReport,
    bit_check,
    check_bias_words,
    check_fp16_file,
    check_manifest,
    check_packed_linear,
    check_tables,
    checks_side_by_side,
    functional_part,
    output_layer_record,
    output_layer_rows,
    tool_version,
    variant_set,
    verify,
)
from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.folder import Assumptions, OutputLayerRecord
from vcu128.format.layout import (
    offset_binary_bytes,
    open_port_files,
    pack_linear_rows,
    pack_nibbles,
    port_file,
    row_words,
)
from vcu128.format.synthetic import SyntheticSpec, write_gptq_checkpoint
from vcu128.format.tables import ACT_FILE, BOARD_SILU, rope_file_name
from vcu128.format.tables import rope_table as make_rope_table
from vcu128.io.errors import VCUError
from vcu128.quant.rtn import quantize_rows

# ---------------------------------------------------------------------------------------------
# One linear's port files: 70 output channels on 4 ports (18 rows a port, the last 2 rows padding),
# 256 inputs (2 groups: a row is 8 scale words, then 32 weight words)

CHIN, CHOUT, PORTS, STEM = 256, 70, 4, "L/W"
WORDS = row_words(CHIN)  # 40


class LinearFolder:
    """The part of PackedFolder that check_packed_linear reads."""

    def __init__(self, path: Path, int4: str = "twos"):
        self.path, self.ports, self.assumptions = path, PORTS, SimpleNamespace(int4=int4)

    def open_linear(self, stem, chin, chout):
        return open_port_files([self.path / port_file(stem, p) for p in range(PORTS)], chout, row_words(chin))


def linear(code="twos"):
    rng = np.random.default_rng(5)
    low = -7 if code == "sign_magnitude" else -8
    q = rng.integers(low, 8, (CHOUT, CHIN)).astype(np.int8)
    q[5, 40] = -3  # a negative weight in word 13 of row 5: its nibble differs between the two codes
    scales = rng.uniform(0.01, 0.1, (CHOUT, CHIN // 128)).astype(np.float16)
    return q, scales


def write_linear(path: Path, q, scales, code="twos") -> np.ndarray:
    """The port files of the board's rows (channel r in port r % 4, row r // 4); the rows, padding included."""
    rows = np.zeros((72, WORDS), "<u4")
    rows[:CHOUT] = pack_linear_rows(q, scales, code)
    (path / "L").mkdir(parents=True, exist_ok=True)
    for p in range(PORTS):
        rows[p::PORTS].tofile(path / port_file(STEM, p))
    return rows


def flip(path: Path, rel: str, word: int, xor: int) -> None:
    w = np.fromfile(path / rel, "<u4")
    w[word] ^= np.uint32(xor)
    w.tofile(path / rel)


@pytest.fixture
def blocks_of_16_rows(monkeypatch):
    """Blocks of 16 rows (18 rows' worth of bytes, down to a multiple of the 4 ports): a 7B's linears
    are read in blocks; a small one in several only with a smaller block."""
    monkeypatch.setattr("vcu128.io.parallel.BLOCK_BYTES", 18 * 2 * CHIN)


@pytest.mark.parametrize("form", ["ints", "gptq bytes"])
def test_a_linear_read_in_blocks_matches_and_hashes_every_port_file(tmp_path, blocks_of_16_rows, form):
    q, scales = linear()
    write_linear(tmp_path, q, scales)
    if form == "ints":
        expected = lambda a, b: (q[a:b], scales[a:b])  # noqa: E731
    else:  # as a checkpoint's qweight gives them: q + 8 nibbles, input 2k in the low one
        expected = lambda a, b: (offset_binary_bytes(pack_nibbles(q[a:b])), scales[a:b])  # noqa: E731
    report = BitReport()
    check_packed_linear(report, LinearFolder(tmp_path), STEM, CHIN, CHOUT, expected)
    assert (report.differences, report.more, report.files_checked, report.bytes_checked) == ([], 0, 4, 72 * WORDS * 4)
    assert report.sha256 == {port_file(STEM, p): hashlib.sha256((tmp_path / port_file(STEM, p)).read_bytes()).hexdigest() for p in range(4)}


def test_differences_in_several_blocks_are_placed_and_counted(tmp_path, blocks_of_16_rows):
    q, scales = linear()
    rows = write_linear(tmp_path, q, scales)
    for r in (0, 1, 2, 12, 13):  # five rows of the first block: three described, two counted
        flip(tmp_path, port_file(STEM, r % 4), (r // 4) * WORDS + 13, 1)
    flip(tmp_path, port_file(STEM, 1), 9 * WORDS + 0, 1 << 16)  # channel 37, in the third block: the scale of group 1
    flip(tmp_path, port_file(STEM, 3), 17 * WORDS + 7, 1)  # channel 71: padding, in the last block
    report = BitReport()
    check_packed_linear(report, LinearFolder(tmp_path), STEM, CHIN, CHOUT, lambda a, b: (q[a:b], scales[a:b]))

    def weights(r):
        return (f"L/W_HBM_DDR_{r % 4:02d}.bin: row {r // 4} (output channel {r}), word 13 (weights of inputs 40..47) is "
                f"{int(rows[r, 13]) ^ 1:#010x}, expected {int(rows[r, 13]):#010x}")

    assert report.differences == [
        weights(0), weights(1), weights(2),
        f"L/W_HBM_DDR_01.bin: row 9 (output channel 37), word 0 (scales of groups 0 and 1) is {int(rows[37, 0]) ^ 1 << 16:#010x}, "
        f"expected {int(rows[37, 0]):#010x}",
        "L/W_HBM_DDR_03.bin: row 17 (output channel 71): padding row, word 7 is 0x00000001, expected 0",
    ]
    assert report.more == 2


def test_a_sign_magnitude_folders_expected_word_is_in_its_code(tmp_path):
    q, scales = linear("sign_magnitude")
    rows = write_linear(tmp_path, q, scales, "sign_magnitude")
    flip(tmp_path, port_file(STEM, 1), 1 * WORDS + 13, 1 << 28)  # channel 5
    report = BitReport()
    check_packed_linear(report, LinearFolder(tmp_path, "sign_magnitude"), STEM, CHIN, CHOUT, lambda a, b: (q[a:b], scales[a:b]))
    want = int(rows[5, 13])
    assert want != int(pack_linear_rows(q[5:6], scales[5:6], "twos")[0, 13])  # the codes differ here
    assert report.differences == [f"L/W_HBM_DDR_01.bin: row 1 (output channel 5), word 13 (weights of inputs 40..47) is "
                                  f"{want ^ 1 << 28:#010x}, expected {want:#010x}"]


def test_a_missing_port_file_is_one_difference_named_in_the_folder(tmp_path):
    q, scales = linear()
    write_linear(tmp_path, q, scales)
    (tmp_path / port_file(STEM, 2)).unlink()
    report = BitReport()
    check_packed_linear(report, LinearFolder(tmp_path), STEM, CHIN, CHOUT, lambda a, b: (q[a:b], scales[a:b]))
    assert (report.differences, report.files_checked, report.bytes_checked, report.sha256) == (["L/W_HBM_DDR_02.bin: missing"], 0, 0, {})


# ---------------------------------------------------------------------------------------------
# Bias words, fp16 files, the manifest


def test_a_bias_words_difference_names_the_word_it_expected(tmp_path):
    bias = np.array([0.5, -1.25, 3.0, 0.1, 7.5, -0.75, 2.0, 1.0], np.float16)
    words = (np.uint32(0x3C00) << np.uint32(16)) | bias.view("<u2").astype("<u4")
    words[3] ^= 1
    words.tofile(tmp_path / "b.bin")
    report = BitReport()
    check_bias_words(report, SimpleNamespace(path=tmp_path), "b.bin", bias)
    assert report.differences == ["b.bin: word 3 (bias of output channel 3) is 0x3c002e67, expected 0x3c002e66"]
    assert (report.files_checked, report.bytes_checked) == (1, 32)
    assert report.sha256 == {"b.bin": hashlib.sha256((tmp_path / "b.bin").read_bytes()).hexdigest()}


def test_an_fp16_files_difference_names_the_fp16_value_it_expected(tmp_path):
    expected = np.full((2, 3), 0.1, np.float32)  # not an fp16 value: the file holds its nearest, 0.0999755859375
    got = expected.astype(np.float16)
    got[1, 1] = 2.0
    got.tofile(tmp_path / "n.bin")
    report = BitReport()
    check_fp16_file(report, SimpleNamespace(path=tmp_path), "n.bin", expected, "norm", 3)
    assert report.differences == ["n.bin: row 1, element 1 (norm) is 2.0, expected 0.0999755859375"]


def test_the_manifest_check_names_each_kind_of_difference(tmp_path):
    content = {"a.bin": b"aaaa", "b.bin": b"bbb", "c.bin": b"cccc", "d.bin": b"dddd", "e.bin": b"eeee", "x.txt": b"x"}
    for rel, data in content.items():
        (tmp_path / rel).write_bytes(data)

    def listed(data):
        return SimpleNamespace(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    files = {"0.bin": listed(b"0000"), "a.bin": listed(b"aaaa"), "b.bin": listed(b"bbbb"), "c.bin": listed(b"CCCC"), "d.bin": listed(b"dddd")}
    folder = SimpleNamespace(path=tmp_path, has_manifest=True, files=files, on_disk=lambda: set(content))
    report = BitReport()
    # d.bin was read whole by the bit check, and changed since: the manifest is checked against the bytes that were compared
    report.sha256["d.bin"] = hashlib.sha256(b"DDDD").hexdigest()
    check_manifest(report, folder, {"0.bin", "a.bin", "b.bin", "c.bin", "d.bin", "e.bin"})
    assert report.differences == [
        "0.bin: missing",
        "x.txt: extra file (not part of the board layout)",
        "e.bin: not listed in manifest.json",
        "b.bin: 3 bytes, manifest.json says 4",
        "c.bin: sha256 differs from manifest.json (content changed or files swapped)",
        "d.bin: sha256 differs from manifest.json (content changed or files swapped)",
    ]


# ---------------------------------------------------------------------------------------------
# The RoPE and SiLU tables


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    """A Qwen2 checkpoint with the board's 128-wide heads, no export."""
    spec = SyntheticSpec(hidden=256, intermediate=384, num_layers=1, num_heads=2, num_kv_heads=1, vocab=256, seed=9)
    return write_gptq_checkpoint(tmp_path_factory.mktemp("tables") / "q", spec)


def table_folder(path: Path, assumptions: Assumptions, has_manifest=True):
    BOARD_SILU.pack().tofile(path / ACT_FILE)
    return SimpleNamespace(path=path, assumptions=assumptions, has_manifest=has_manifest, rope_name=rope_file_name(assumptions.max_token))


def tables_differences(ckpt_dir, folder, expected_files=None) -> list:
    report = BitReport()
    check_tables(report, folder, GPTQCheckpoint(ckpt_dir), set() if expected_files is None else expected_files)
    return report.differences


@pytest.mark.parametrize("order, message", [
    ("none: x", "manifest.json: assumptions.rope_table is 'none: x', but the model's heads are the board's 128"),
    ("glm", "manifest.json: assumptions.rope_table is 'glm', but a qwen2 model's table is halves or pairs (its RoPE is rotate_half)"),
], ids=["no table", "the glm order"])
def test_a_rope_table_the_model_cannot_have_is_named(qwen_ckpt, tmp_path, order, message):
    assert tables_differences(qwen_ckpt, table_folder(tmp_path, Assumptions(rope_table=order, max_token=4))) == [message]


def test_the_rope_table_in_the_order_the_manifest_records(qwen_ckpt, tmp_path):
    cfg = json.loads((qwen_ckpt / "config.json").read_text())
    folder = table_folder(tmp_path, Assumptions(rope_table="pairs", max_token=4))
    make_rope_table(cfg, 4, "pairs", qwen_ckpt / "config.json").view("<u2").tofile(tmp_path / folder.rope_name)
    assert tables_differences(qwen_ckpt, folder) == []
    halves = table_folder(tmp_path, Assumptions(rope_table="halves", max_token=4))
    words = make_rope_table(cfg, 4, "halves", qwen_ckpt / "config.json").view("<u2").copy()
    want = int(words[1])
    words[1] ^= 1
    words.tofile(tmp_path / halves.rope_name)
    assert tables_differences(qwen_ckpt, halves) == [
        f"pos_in_4_token4_ch32.bin: fp16 word 1, position 0, channel 1 (cos of frequency 1), is {want ^ 1:#06x}, expected {want:#06x}"]


def test_a_glm_folder_without_manifest_or_rope_table_is_not_a_difference(tmp_path):
    spec = SyntheticSpec(hidden=256, intermediate=384, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=128, vocab=256, model_type="chatglm")
    qdir = write_gptq_checkpoint(tmp_path / "g", spec)
    hw = tmp_path / "hw"
    hw.mkdir()
    expected = {"x.bin", rope_file_name(2048), ACT_FILE}
    assert tables_differences(qdir, table_folder(hw, Assumptions(), has_manifest=False), expected) == []
    assert expected == {"x.bin", ACT_FILE}  # the board loads the RoPE table too: a line says it is missing, no difference


def test_a_bad_rope_scaling_names_the_checkpoints_config(qwen_ckpt, tmp_path):
    qdir = tmp_path / "q"
    shutil.copytree(qwen_ckpt, qdir)
    ckpt = GPTQCheckpoint(qdir)
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "x", "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}
    (qdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VCUError) as e:
        check_tables(BitReport(), table_folder(tmp_path, Assumptions(max_token=4)), ckpt, set())
    assert str(e.value) == f"{qdir / 'config.json'}: 'rope_scaling.low_freq_factor' is 'x', expected a finite number"


# ---------------------------------------------------------------------------------------------
# The output layer made again from the checkpoint


def test_the_output_layers_rows_are_those_of_the_whole_matrix(qwen_ckpt):
    ckpt = GPTQCheckpoint(qwen_ckpt)
    rows = output_layer_rows(ckpt, OutputLayerRecord("rtn"))
    q, s = rows(16, 48)
    whole_q, whole_s = quantize_rows(ckpt.get("lm_head.weight"), "rtn", -8)
    assert q.shape == (32, 256) and np.array_equal(q, whole_q[16:48]) and np.array_equal(s, whole_s[16:48])


def test_an_older_folder_with_no_compile_folder_is_checked_as_trunc(qwen_ckpt, caplog):
    caplog.set_level(logging.INFO, logger="vcu128")
    folder = SimpleNamespace(output_layer=None, path=Path("hw"))
    assert output_layer_record(folder, GPTQCheckpoint(qwen_ckpt), None) == OutputLayerRecord("trunc")
    assert caplog.messages == ["verify: hw does not record how its output layer was quantized: checking it as method trunc"]


# ---------------------------------------------------------------------------------------------
# verify's options, its two checks, its version


def test_the_variant_sets_and_the_message_for_another():
    from vcu128.board.datapath import VARIANTS

    assert variant_set("none") == () and variant_set("all") == tuple(VARIANTS.values())
    with pytest.raises(VCUError) as e:
        variant_set("most")
    assert str(e.value) == "--variants most: expected one of none, pessimistic, all"


def test_the_version_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(verify_module.subprocess, "run", no_git)
    assert tool_version() == __version__
    monkeypatch.setattr(verify_module.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout="\n"))
    assert tool_version() == __version__

    def git_that_hangs(cmd, timeout=None, **kwargs):
        assert timeout is not None, "git describe without a time limit: verify would hang with it"
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(verify_module.subprocess, "run", git_that_hangs)
    assert tool_version() == __version__


def test_the_version_is_the_packages_checkout_from_any_folder(tmp_path, monkeypatch):
    here = Path(verify_module.__file__).resolve().parent
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:  # no git here
        described = ""
    monkeypatch.chdir(tmp_path)  # not a checkout
    assert tool_version() == (f"{__version__} ({described})" if described else __version__)


OK_BITS = BitReport()


def differing() -> BitReport:
    report = BitReport()
    report.add("x.bin: word 0 is 0x00000001, expected 0x00000000")
    return report


def test_the_functional_checks_stop_answers_whether_the_bits_failed():
    asked = []

    def functional(stop):
        asked.append(stop)
        return "functional"

    assert checks_side_by_side(lambda: (OK_BITS, (0, 1)), functional) == ((OK_BITS, (0, 1)), "functional")
    assert asked[0]() is False  # the bit check is done, and found nothing
    bad = differing()
    assert checks_side_by_side(lambda: (bad, (0, 1)), functional) == ((bad, (0, 1)), None)
    assert asked[1]() is True

    def bits_fail():
        raise VCUError("bits")

    with pytest.raises(VCUError, match="^bits$"):
        checks_side_by_side(bits_fail, functional)
    assert asked[2]() is True


def test_the_functional_checks_stop_does_not_wait_for_the_bit_check():
    go, waited = threading.Event(), []

    def bits():
        waited.append(go.wait(3))  # until the functional check has asked once
        return OK_BITS, (0, 1)

    def functional(stop):
        answer = stop()
        go.set()
        return answer

    assert checks_side_by_side(bits, functional) == ((OK_BITS, (0, 1)), False)
    assert waited == [True]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    qdir = write_gptq_checkpoint(tmp_path_factory.mktemp("wiring") / "q", SyntheticSpec(hidden=256, intermediate=384, num_layers=1,
                                                                                       num_heads=2, num_kv_heads=1, vocab=256, seed=9))
    export_all(qdir, lm_method="rtn")
    return qdir


FINE = {"ok": True, "against_hardware": {"checkpoint": {"top1_agreement": 1.0}}, "saturation": []}


def test_verify_runs_the_bit_check_apart_with_a_gpu_and_tells_the_functional_check_when_to_stop(exported, tmp_path, monkeypatch):
    from vcu128.board.datapath import DEFAULT_VARIANT

    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    hw, compile_dir = qdir / "compile" / "QWEN_BLOCK_write_data_port32", qdir / "compile"
    apart, functional = [], []

    def in_this_process(fn, *args):  # the process of its own, here: what it is given is what matters
        apart.append((fn, args))
        return fn(*args)

    def functional_stub(q, h, c, *, stop=None, **options):
        functional.append(dict(options, stop=stop, args=(q, h, c)))
        return None, dict(FINE)

    monkeypatch.setattr(verify_module, "in_a_process", in_this_process)
    monkeypatch.setattr(verify_module, "functional_part", functional_stub)
    monkeypatch.delenv(SIDE_BY_SIDE_ENV, raising=False)
    result = verify(qdir, hw, compile_dir=compile_dir, device="cuda:0", variants="all", progress=False)
    assert apart == [(bit_check, (qdir, hw, compile_dir, False))]
    f = functional.pop()
    assert callable(f["stop"]) and f["args"] == (qdir, hw, compile_dir)
    assert (f["device"], f["variant"], f["variants"]) == ("cuda:0", DEFAULT_VARIANT, variant_set("all"))
    assert set(result["timeline"]) == {"side_by_side", "started_at", "bit_check", "functional"} and result["timeline"]["side_by_side"] is True
    assert isinstance(result["timeline"]["started_at"], float) and result["verdict"]["exit_code"] == 0
    # told to: on a CPU too
    monkeypatch.setenv(SIDE_BY_SIDE_ENV, "1")
    assert verify(qdir, hw, progress=False)["timeline"]["side_by_side"] is True and len(apart) == 2 and callable(functional.pop()["stop"])
    # one after the other: in this process, and nothing to stop
    monkeypatch.delenv(SIDE_BY_SIDE_ENV)
    result = verify(qdir, hw, device="cuda:0", side_by_side=False, progress=False)
    assert result["timeline"]["side_by_side"] is False and len(apart) == 2 and functional.pop()["stop"] is None


def test_functional_part_starts_the_gpu_early_and_hands_on_device_and_stop(exported, monkeypatch):
    import torch

    import vcu128.check.functional as functional_module

    started, checks = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(verify_module, "in_background", lambda fn, *args, **kwargs: started.append((fn, args, kwargs)))
    monkeypatch.setattr(functional_module, "functional_check", lambda ckpt, folder, inputs, **kw: checks.append(kw) or "checked")

    def stop():
        return False

    hw = exported / "compile" / "QWEN_BLOCK_write_data_port32"
    answer = functional_part(exported, hw, None, model=None, text=None, eval_ids=None, prompt="The accelerator", eval_tokens=8, device="cuda:1",
                             stop=stop, tokens=1)
    assert answer == ({"checkpoint": str(exported.resolve())}, "checked")
    assert started == [(torch.zeros, (1,), {"device": "cuda:1"})]  # the GPU's context, made while the tokenizer loads
    assert checks == [dict(model=None, device="cuda:1", stop=stop, tokens=1)]


# ---------------------------------------------------------------------------------------------
# The whole bit check on an exported folder: stale inputs, the final norm, a folder of the
# original scripts (no manifest) and its embedding parts


def exported_copy(exported, tmp_path):
    qdir = tmp_path / "q"
    shutil.copytree(exported, qdir)
    return qdir, qdir / "compile" / "QWEN_BLOCK_write_data_port32"


def without_manifest(exported, tmp_path):
    """The packed folder as the original scripts left it: no manifest.json, beside nothing (its
    compile folder is the checkpoint's, found by that hint alone)."""
    qdir, hw = exported_copy(exported, tmp_path)
    bare = tmp_path / "boards" / "hw"
    shutil.copytree(hw, bare)
    (bare / "manifest.json").unlink()
    return qdir, bare


def test_a_folder_made_from_an_earlier_compile_run_is_stale_but_still_the_model(exported, tmp_path, caplog):
    qdir, hw = exported_copy(exported, tmp_path)
    record = json.loads((qdir / "compile" / "compile_sw.json").read_text())
    record["id"] = "0123456789abcdef"  # compile_sw.py run again since: the same checkpoint, a new run
    (qdir / "compile" / "compile_sw.json").write_text(json.dumps(record))
    report = bit_check(qdir, hw, progress=False)
    compile_dir = qdir / "compile"
    assert report.stale == [
        f"the packed folder was made from an earlier compile_sw run than the one in {compile_dir} (re-run hardware.py)",
        f"Embedding/ was made from an earlier compile_sw run than the one in {compile_dir} (re-run embedding_tokens.py)",
    ]
    assert report.ok and [m for m in caplog.messages if m.startswith("warning:")] == [f"warning: {line}" for line in report.stale]


def test_a_final_norm_difference_is_named_as_the_final_norm(exported, tmp_path):
    from vcu128.format.layout import OUT_NORM_FILE

    qdir, hw = exported_copy(exported, tmp_path)
    words = np.fromfile(hw / OUT_NORM_FILE, "<u2")
    want = float(words[3:4].view("<f2")[0])
    words[3] ^= 0x0400  # the exponent's lowest bit: the value doubled or halved
    words.tofile(hw / OUT_NORM_FILE)
    got = float(words[3:4].view("<f2")[0])
    assert got in (2 * want, want / 2)
    assert bit_check(qdir, hw, progress=False).differences == [
        f"{OUT_NORM_FILE}: element 3 (model.norm weight, then zeros) is {got!r}, expected {want!r}",
        f"{OUT_NORM_FILE}: sha256 differs from manifest.json (content changed or files swapped)",
    ]


def test_a_folder_without_manifest_takes_the_output_layers_method_from_the_checkpoints_compile_folder(exported, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vcu128")
    qdir, hw = without_manifest(exported, tmp_path)
    report = bit_check(qdir, hw, progress=False)
    assert report.ok and report.files_checked == len(report.sha256) > 0
    assert (f"verify: {hw} does not record how its output layer was quantized: taking {qdir / 'compile'}/lm_head.json's "
            "method rtn (the values are still made again from the checkpoint)") in caplog.messages


def test_a_folder_without_any_record_of_its_output_layer_is_checked_as_trunc(exported, tmp_path, caplog):
    """Exported with rtn: as trunc, the output layer's port files differ, and nothing else."""
    from vcu128.format.layout import OUT_WEIGHT_STEM

    caplog.set_level(logging.INFO, logger="vcu128")
    qdir, hw = without_manifest(exported, tmp_path)
    (qdir / "compile" / "lm_head.json").unlink()
    report = bit_check(qdir, hw, progress=False)
    assert f"verify: {hw} does not record how its output layer was quantized: checking it as method trunc" in caplog.messages
    assert report.differences[0].startswith(f"{OUT_WEIGHT_STEM}_HBM_DDR_00.bin: row 0 (output channel 0), word 8 (weights of inputs 0..7) is ")
    assert all(d.startswith(f"{OUT_WEIGHT_STEM}_HBM_DDR_") for d in report.differences) and report.more > 0


def test_a_folder_without_embedding_parts_says_so(exported, tmp_path):
    qdir, hw = without_manifest(exported, tmp_path)
    shutil.rmtree(hw / "Embedding")
    assert bit_check(qdir, hw, progress=False).differences == [
        "Embedding/: no embedding parts recorded in manifest.json (run embedding_tokens.py)"]


def test_embedding_parts_that_do_not_split_the_vocab_are_one_difference(exported, tmp_path):
    """3 parts of a 256-token vocabulary: named by its first part, and no part compared."""
    qdir, hw = without_manifest(exported, tmp_path)
    parts = sorted((hw / "Embedding").iterdir())
    for i, part in enumerate(parts):
        if i < 3:
            part.rename(hw / "Embedding" / f"Embedding_{i + 1:02d}-of-03.bin")
        else:
            part.unlink()
    report = bit_check(qdir, hw, progress=False)
    assert report.differences == ["Embedding/Embedding_01-of-03.bin: vocab 256 does not split into 3 parts"]
    assert not any(rel.startswith("Embedding/") for rel in report.sha256)
