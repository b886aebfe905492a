"""A user's files are sacred: what each step may replace, what a re-run keeps, what a killed or
concurrent run leaves, and the permissions outputs get."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, export_all

from vcu128.check.verify import bit_check
from vcu128.export.compile_sw import compile_software
from vcu128.export.embedding_tokens import split_embedding
from vcu128.export.hardware import pack_hardware
from vcu128.export.lm_head import quantize_lm_head
from vcu128.io import output
from vcu128.io.errors import VCUError, describe_os_error, run_cli, set_writing

HW = "QWEN_BLOCK_write_data_port32"


def tree(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(script, *args, umask=None):
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True, env=env, preexec_fn=pre)


def run_here(script, *args):
    """What `run` gives, of the step's command line run in this process (test_safety.run_step): where
    the point is the step's own refusal, a mutant of the code that refuses is active here, and not in
    a subprocess (bench/mutation.py)."""
    from types import SimpleNamespace

    from test_safety import run_step

    code, err = run_step(script.removesuffix(".py"), *args)
    return SimpleNamespace(returncode=code, stderr=err)


def error_lines(r):
    """The error and hint lines (warnings before them, such as a stale input, are not errors)."""
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert lines and lines[0].startswith("error: "), r.stderr
    assert len(lines) <= 2 and all(line.startswith("hint: ") for line in lines[1:]), r.stderr
    assert "Traceback" not in r.stderr
    return lines


@pytest.fixture
def exported(make_checkpoint):
    return export_all(make_checkpoint())


# ---------------------------------------------------------------------------------------------
# --out


def test_an_unrelated_folder_is_refused_and_left_as_it_was(make_checkpoint, tmp_path):
    qdir = make_checkpoint()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("three years of work")
    for script, args in [
        ("compile_sw.py", ["--quantize_model", qdir]),
        ("lm_head.py", ["--quantize_model", qdir]),
    ]:
        r = run_here(script, *args, "--out", theirs)
        assert r.returncode == 2
        assert error_lines(r)[0].startswith(f"error: --out {theirs}: ")
    export_all(qdir)
    for script, args in [
        ("hardware.py", ["--compile_dir", qdir / "compile"]),
        ("embedding_tokens.py", ["--compile_dir", qdir / "compile"]),
    ]:
        r = run_here(script, *args, "--out", theirs)
        assert r.returncode == 2
        assert error_lines(r) == [f"error: --out {theirs}: exists and was not written by {script}; not replacing it",
                                  "hint: choose another --out, or pass --force to replace that folder"]
    assert tree(theirs) == {"thesis.tex": b"three years of work"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "theirs"]


def test_force_replaces_a_folder_but_never_a_file_or_an_input(make_checkpoint, tmp_path):
    qdir = make_checkpoint()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "old.txt").write_text("x")
    compile_software(qdir, scratch, progress=False, force=True)
    assert not (scratch / "old.txt").exists() and (scratch / "compile_sw.json").is_file()
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for out in (a_file, qdir, tmp_path):
        with pytest.raises(VCUError, match="exists and is not a folder|is or contains the input"):
            compile_software(qdir, out, progress=False, force=True)
    assert a_file.read_text() == "keep me" and (qdir / "model-00001-of-00003.safetensors").is_file()


@pytest.mark.parametrize("where", ["input", "parent of the input"])
def test_out_may_not_be_or_contain_the_input(exported, where):
    comp = exported["compile"]
    out = comp if where == "input" else comp.parent
    before = tree(comp)
    r = run_here("hardware.py", "--compile_dir", comp, "--out", out)
    assert r.returncode == 2
    assert error_lines(r)[0] == f"error: --out {out}: is or contains the input {comp}; choose another folder"
    assert tree(comp) == before


def test_out_dot_is_refused_with_one_line(make_checkpoint, tmp_path, monkeypatch):
    qdir = make_checkpoint()
    (tmp_path / "mine.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    r = run_here("compile_sw.py", "--quantize_model", qdir, "--out", ".")
    assert r.returncode == 2
    assert error_lines(r)[0] == f"error: --out {tmp_path}: is or contains the input {qdir}; choose another folder"


def test_lm_head_out_a_file(make_checkpoint, tmp_path):
    qdir = make_checkpoint()
    f = tmp_path / "f"
    f.write_text("x")
    r = run_here("lm_head.py", "--quantize_model", qdir, "--out", f)
    assert r.returncode == 2 and error_lines(r) == [f"error: --out {f}: exists and is not a folder; not writing into it"]


# ---------------------------------------------------------------------------------------------
# Re-runs: each step replaces exactly its own files


def test_rerunning_compile_sw_keeps_later_steps_outputs_and_warns_they_are_stale(exported, caplog):
    qdir, comp, hw = exported["qdir"], exported["compile"], exported["hw"]
    assert bit_check(qdir, hw, progress=False).ok
    (comp / "verify_report.json").write_text('{"bit_check": {}}')
    later = {k: v for k, v in tree(comp).items() if k.startswith((HW, "lm_head.json", "verify_report.json")) or "lm_head_" in k}
    assert len(later) > 500
    # the checkpoint changes (re-quantized): its shards are rewritten
    shard = qdir / "model-00001-of-00003.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    compile_software(qdir, progress=False)
    assert {k: v for k, v in tree(comp).items() if k in later} == later
    caplog.clear()
    report = bit_check(qdir, hw, progress=False)
    assert report.ok  # the bits did not change; only the provenance did
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warning:")]
    assert warnings == [f"warning: {comp}: lm_head_*.bin were made from another checkpoint than the rest of the folder (re-run lm_head.py)",
                        f"warning: the packed folder was made from an earlier compile_sw run than the one in {comp} (re-run hardware.py)",
                        f"warning: Embedding/ was made from an earlier compile_sw run than the one in {comp} (re-run embedding_tokens.py)"]


def test_an_identical_rerun_is_not_stale(exported, caplog):
    qdir, hw = exported["qdir"], exported["hw"]
    compile_software(qdir, progress=False)
    caplog.clear()
    assert bit_check(qdir, hw, progress=False).ok
    assert not [r for r in caplog.records if r.getMessage().startswith("warning:")]


def test_rerunning_hardware_keeps_the_embedding_parts_and_their_manifest_entries(exported):
    qdir, comp, hw = exported["qdir"], exported["compile"], exported["hw"]
    parts = tree(hw / "Embedding")
    pack_hardware(comp, progress=False)
    assert tree(hw / "Embedding") == parts
    assert bit_check(qdir, hw, progress=False).ok
    doc = json.loads((hw / "manifest.json").read_text())
    assert doc["embedding_parts"] == 16 and sum(f["path"].startswith("Embedding/") for f in doc["files"]) == 16


def test_rerunning_embedding_tokens_replaces_only_its_parts(exported):
    qdir, comp, hw = exported["qdir"], exported["compile"], exported["hw"]
    before = {k: v for k, v in tree(hw).items() if not k.startswith("Embedding/") and k != "manifest.json"}
    (hw / "Embedding" / "Embedding_02-of-16.bin").write_bytes(b"damaged")
    split_embedding(comp, progress=False)
    assert {k: v for k, v in tree(hw).items() if not k.startswith("Embedding/") and k != "manifest.json"} == before
    assert bit_check(qdir, hw, progress=False).ok


def test_lm_head_refuses_files_it_did_not_write(exported):
    qdir, comp = exported["qdir"], exported["compile"]
    (comp / "lm_head.json").unlink()  # as the original scripts leave a compile folder: no records
    (comp / "compile_sw.json").unlink()
    with pytest.raises(VCUError, match="not a compile folder"):
        quantize_lm_head(qdir, progress=False)
    quantize_lm_head(qdir, progress=False, force=True)


# ---------------------------------------------------------------------------------------------
# Killed, interrupted and concurrent runs


def test_sigterm_cleans_up_like_sigint(make_checkpoint, capsys):
    qdir = make_checkpoint()
    target = qdir / "compile"

    def main(argv):
        with output.staged_dir(target, "test", None, [qdir]) as stage:
            (stage / "big.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the step")

    assert run_cli(main, []) == 143
    assert capsys.readouterr().err.strip() == "error: terminated by SIGTERM (no output was left behind)"
    assert not target.exists() and not list(qdir.glob(".compile.*"))


def test_a_later_run_removes_what_a_killed_run_left_and_says_so(make_checkpoint, caplog):
    qdir = make_checkpoint()
    left = qdir / f".compile.partial-{2**22 + 4242}@{output.HOST}@abc"  # as SIGKILL leaves it: its pid is gone
    (left / "qwen2_qweight_bin").mkdir(parents=True)
    (left / "qwen2_qweight_bin" / "x.bin").write_bytes(b"x" * 100)
    compile_software(qdir, progress=False)
    assert not left.exists()
    assert f"warning: removed {left}: a staging folder left by a killed run" in caplog.text
    assert sorted(p.name for p in qdir.iterdir() if p.name.startswith(".")) == []


def test_a_run_killed_while_swapping_loses_nothing(exported):
    comp = exported["compile"]
    before = tree(comp)
    old = comp.parent / ".compile.old-4242"
    os.replace(comp, old)  # killed right after moving the old output aside
    compile_software(exported["qdir"], progress=False, ports=None)  # (hardware.py took what the first run packed ahead)
    assert tree(comp) == before and not old.exists()


def test_a_concurrent_run_on_the_same_target_is_refused(make_checkpoint):
    qdir = make_checkpoint()
    live = qdir / f".compile.partial-{output.stage_tag()}@abc"  # a live run's staging folder (this process)
    live.mkdir()
    r = run("compile_sw.py", "--quantize_model", qdir, "--fp16_rescale", "off")
    assert r.returncode == 2
    assert error_lines(r) == [f"error: {qdir / 'compile'}: another run (pid {os.getpid()} on {output.HOST}) is writing it right now; "
                              "wait for it to finish", f"hint: if that run is gone, remove {live}"]
    assert live.is_dir() and not (qdir / "compile").exists()  # the other run's folder is not ours to remove


def test_runs_on_other_targets_in_one_folder_go_on_side_by_side(make_checkpoint):
    """The folder lock is held for renames only: a long step does not block its neighbours."""
    qdir = make_checkpoint()
    live = qdir / f".other-target.partial-{output.stage_tag()}@abc"
    live.mkdir()
    with output.staged_dir(qdir / "compile", "test", None, [qdir]) as stage:
        r = run("compile_sw.py", "--quantize_model", qdir, "--out", qdir / "compile2", "--fp16_rescale", "off")
        assert r.returncode == 0, r.stderr
        (stage / "x").write_text("x")
    assert (qdir / "compile" / "x").is_file() and (qdir / "compile2" / "compile_sw.json").is_file() and live.is_dir()


# ---------------------------------------------------------------------------------------------
# Permissions and full disks


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_follow_the_umask(make_checkpoint, umask, folder_mode, file_mode):
    qdir = make_checkpoint()
    assert run("compile_sw.py", "--quantize_model", qdir, umask=umask).returncode == 0
    assert run("lm_head.py", "--quantize_model", qdir, umask=umask).returncode == 0
    assert run("hardware.py", "--compile_dir", qdir / "compile", umask=umask).returncode == 0
    assert run("embedding_tokens.py", "--compile_dir", qdir / "compile", umask=umask).returncode == 0
    comp = qdir / "compile"
    folders = [comp, *(p for p in comp.rglob("*") if p.is_dir())]
    files = [p for p in comp.rglob("*") if p.is_file()]
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {oct(folder_mode)}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(file_mode)}


def test_not_enough_space_is_refused_before_writing(make_checkpoint, monkeypatch):
    qdir = make_checkpoint()

    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(output.os, "statvfs", lambda path: Full())
    with pytest.raises(VCUError, match=r"/compile: not enough disk space: the step needs about [\d.]+ MB, 40.96 kB are free there"):
        compile_software(qdir, progress=False)
    assert not (qdir / "compile").exists()


def test_disk_full_and_permission_messages_name_the_target():
    set_writing("/data/q/compile", 27_300_000_000)
    line, hint = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/data/q/.compile.partial-1/x.bin"))
    assert line.startswith("/data/q/compile: disk full (no space left on device); the step needs about 27.30 GB")
    assert hint == "free some space, or choose an output folder on another disk"
    line, _ = describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/data/q/compile"))
    assert line == "/data/q/compile: permission denied (check the folder's owner and permissions)"
