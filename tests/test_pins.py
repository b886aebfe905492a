"""Pins for the mistakes that matter (issue #23): each test here fails when one plausible single
mistake is made in what reaches the board or in what happens to a user's files.

- a NaN, not only an inf, in the folder's model fails verify (never "OK", never exit 0);
- the board model reads the folder's SiLU table: another (valid) table gives another answer;
- a run killed during the swap (target and its .old both there) loses none of a user's files.

Known-answer values of the emulator's constants live with the emulator's tests; every field of
every packed word and report ownership are in test_folder_reader.py."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, export_all, rewrite_manifest
from safetensors.numpy import load_file, save_file

from vcu128.check.functional import functional_check
from vcu128.check.inputs import FunctionalInputs, seeded_ids
from vcu128.check.verify import verify
from vcu128.export.compile_sw import compile_folder_owns, compile_software
from vcu128.export.hardware import pack_hardware
from vcu128.export.lm_head import quantize_lm_head
from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.folder import PackedFolder
from vcu128.format.synthetic import SyntheticSpec, write_gptq_checkpoint
from vcu128.format.tables import ACT_FILE, BOARD_SILU, SiluTable, fit_silu
from vcu128.io import output
from vcu128.io.errors import VCUError

HW = "compile/QWEN_BLOCK_write_data_port32"
SPEC = {"hidden": 256, "intermediate": 384, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "vocab": 512, "seed": 7}
NORM = "model.layers.1.post_attention_layernorm.weight"
NORM_FILE = "BLOCK01/LN_DDR_bin/LN1_wt_in_DDR.bin"
ENV = {"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    qdir = write_gptq_checkpoint(tmp_path_factory.mktemp("pins") / "q", SyntheticSpec(**SPEC))
    export_all(qdir, lm_method="rtn")
    return qdir


@pytest.fixture
def folder(clean, tmp_path):
    qdir = tmp_path / "q"
    shutil.copytree(clean, qdir)
    return qdir, qdir / HW


# ---------------------------------------------------------------------------------------------
# NaN and inf: both fail verify


def plant(qdir, hw, value, channel=3):
    """`value` in channel 3 of layer 1's post-attention norm weight, in the checkpoint and in the
    folder alike (manifest rewritten to agree): the bits match, the model is not finite."""
    shard = qdir / json.loads((qdir / "model.safetensors.index.json").read_text())["weight_map"][NORM]
    tensors = load_file(shard)
    w = tensors[NORM].copy()
    w[channel] = value
    tensors[NORM] = w
    save_file(tensors, shard)
    words = np.fromfile(hw / NORM_FILE, "<f2")
    words[channel] = np.float16(value)
    words.tofile(hw / NORM_FILE)
    rewrite_manifest(hw)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_a_non_finite_norm_weight_fails_verify(folder, value):
    qdir, hw = folder
    plant(qdir, hw, value)
    try:
        result = verify(qdir, hw, tokens=1, eval_tokens=16, progress=False)
    except VCUError as e:  # a refusal of non-finite checkpoint tensors when they are read is as good
        assert re.search(r"NaN|inf|non-finite", str(e)), str(e)
        return
    assert result["bit_check"]["ok"], result["bit_check"]["differences"]  # the folder is faithfully the checkpoint
    f = result["functional"]
    assert f["ok"] is False and f["nonfinite"] == {"model": "hardware", "layer": 1, "site": "post_attention_norm"}
    v = result["verdict"]
    assert (v["ok"], v["exit_code"], v["board_model"]) == (False, 1, "non-finite")


def test_a_nan_never_prints_ok_on_the_command_line(folder):
    qdir, hw = folder
    plant(qdir, hw, np.nan)
    r = subprocess.run([sys.executable, str(ROOT / "verify.py"), "--quantize_model", str(qdir), "--hardware_dir", str(hw),
                        "--eval_tokens", "16", "--tokens", "1"], capture_output=True, text=True, env=ENV, check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "OK" not in last, r.stderr
    assert re.search(r"NaN|non-finite", last), last


# ---------------------------------------------------------------------------------------------
# The folder's SiLU table is what the board model computes with


def run_board_model(qdir, hw):
    ckpt = GPTQCheckpoint(qdir)
    inputs = FunctionalInputs(seeded_ids(SPEC["vocab"], 24, seed=3), seeded_ids(SPEC["vocab"], 3, seed=4), "seeded")
    return functional_check(ckpt, PackedFolder.open(hw), inputs, tokens=1, progress=False)


def test_the_folder_silu_table_changes_the_board_model_answer(folder):
    qdir, hw = folder
    board = run_board_model(qdir, hw)
    assert board["ok"] and board["silu"] == f"table {ACT_FILE}"
    assert np.array_equal(np.fromfile(hw / ACT_FILE, np.uint8), BOARD_SILU.pack())
    # the board's table is not exact SiLU: what it costs is measured, and is not nothing
    assert 0 < board["silu_effect"]["relative_logit_error"] < 0.5

    other = fit_silu(-2.0, 2.0)  # a valid table (hardware.py --silu_table fit over a narrow range), another answer
    assert not np.array_equal(other.pack(), BOARD_SILU.pack())
    other.pack().tofile(hw / ACT_FILE)
    rewrite_manifest(hw)
    fitted = run_board_model(qdir, hw)
    assert fitted["ok"]
    assert fitted["silu_effect"]["relative_logit_error"] != board["silu_effect"]["relative_logit_error"]
    a, b = board["against_hardware"]["checkpoint"], fitted["against_hardware"]["checkpoint"]
    assert a["relative_logit_error"] != b["relative_logit_error"]
    # the exact-SiLU run beside them does not read the table: its own error to the checkpoint is
    # the same whichever table the folder holds (silu_effect = table against exact moves alone)


def test_the_board_model_computes_silu_through_the_table():
    """datapath.silu with a table is wt[i] * x + bias[i] of the segment x falls in: a table whose
    segments are all the line 2x + 1 gives exactly that, whatever exact SiLU would say."""
    import torch

    from vcu128.board.datapath import Numerics, silu

    line = SiluTable(np.full(16, 2.0, "<f2"), np.full(16, 1.0, "<f2"), BOARD_SILU.x_region)
    num = Numerics(name="board", board=True, eps=1e-6, cos=torch.zeros(1, 1), sin=torch.zeros(1, 1), silu_table=line)
    x = torch.tensor([-20.0, -1.0, 0.0, 0.5, 3.0, 30.0])
    assert silu(x, num).tolist() == [-39.0, -1.0, 1.0, 2.0, 7.0, 61.0]


# ---------------------------------------------------------------------------------------------
# A run killed during the swap: the target and its .old both there


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def killed_mid_swap(comp, pid=4242):
    """The state a SIGKILL leaves between _swap_in's second rename and its carrying: the old output
    at .compile.old-PID, the new one (compile_sw's own files only) at the target."""
    owned = compile_folder_owns(comp)
    new = comp.parent / ".new"
    for rel in owned:
        (new / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(comp / rel, new / rel)
    old = comp.parent / f".{comp.name}.old-{pid}"
    os.replace(comp, old)
    os.replace(new, comp)
    return old


def test_a_run_killed_mid_swap_keeps_a_users_file_left_in_old(make_checkpoint):
    exported = export_all(make_checkpoint())
    comp, qdir = exported["compile"], exported["qdir"]
    (comp / "notes.txt").write_text("my notes")
    (comp / "mine").mkdir()
    (comp / "mine" / "data.json").write_text('{"a": 1}')
    (comp / "qwen2_qweight_bin" / "my_experiment.bin").write_bytes(b"\x01\x02")  # beside compile_sw's own files
    before = tree(comp)
    old = killed_mid_swap(comp)
    assert comp.is_dir() and old.is_dir() and not (comp / "notes.txt").exists()

    compile_software(qdir, progress=False, fp16_rescale="off")  # the next run recovers, then replaces its own files
    after = tree(comp)
    for rel in ("notes.txt", "mine/data.json", "qwen2_qweight_bin/my_experiment.bin"):
        assert after.get(rel) == before[rel], f"{rel}: the user's file was lost in the recovery"
    # the other steps' outputs carried too: the packed folder and lm_head's files
    assert {rel: b for rel, b in before.items() if rel.startswith("QWEN_BLOCK_write_data_port32/")} == \
        {rel: b for rel, b in after.items() if rel.startswith("QWEN_BLOCK_write_data_port32/")}
    assert "qwen2_qweight_bin/lm_head_qweight.bin" in after and "lm_head.json" in after
    assert sorted(p.name for p in qdir.iterdir() if p.name.startswith(".")) == []


# The other steps went on between the kill and the next compile_sw run (a user running the steps one
# by one: lm_head.py, then hardware.py, which makes a new packed folder): the target then holds a
# packed folder of the same name as the one in .old. The user's file inside the old one must come
# back into the new one (remove_stale once deleted the old folder whole, with the file).
def test_a_run_killed_mid_swap_then_the_later_steps_keep_a_users_file_in_the_packed_folder(make_checkpoint):
    exported = export_all(make_checkpoint())
    comp, qdir = exported["compile"], exported["qdir"]
    (exported["hw"] / "board_notes.txt").write_text("loaded on board 3, 2026-11-20")
    killed_mid_swap(comp)
    quantize_lm_head(qdir, comp, progress=False)  # the user goes on with the next steps
    pack_hardware(comp, progress=False)
    compile_software(qdir, progress=False, fp16_rescale="off")
    kept = [p.read_text() for p in qdir.rglob("board_notes.txt")]
    assert kept == ["loaded on board 3, 2026-11-20"], "the user's file in the packed folder left in .compile.old-PID was deleted"


def test_recovery_keeps_a_users_file_in_a_folder_the_new_target_also_has(tmp_path):
    """remove_stale alone, the same state in miniature: .old holds packed/notes.txt (the user's) and
    packed/made.bin (another step's), the target a new packed/made.bin."""
    (tmp_path / "out" / "packed").mkdir(parents=True)
    (tmp_path / "out" / "packed" / "made.bin").write_bytes(b"new")
    old = tmp_path / ".out.old-4242"
    (old / "packed").mkdir(parents=True)
    (old / "packed" / "made.bin").write_bytes(b"old")
    (old / "packed" / "notes.txt").write_text("the user's only copy")
    output.remove_stale(tmp_path, "out", lambda f: set())
    kept = [p.read_text() for p in tmp_path.rglob("notes.txt")]
    assert kept == ["the user's only copy"], "remove_stale deleted a user's file left in .old"
