"""vcu128/io/output.py in process, rule by rule: what the swap into place keeps, moves and says,
which paths count as "something already there", and the exact words of its refusals and summaries.

Mutation testing (bench/mutation.py) showed each of these rules could change and every other test
still pass: most of output's tests run a step's command line in a subprocess, where a mutant of
this module is never active.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from vcu128 import __version__
from vcu128.io import output
from vcu128.io.errors import VCUError


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


# ---------------------------------------------------------------------------------------------
# What counts as "already there"


def test_something_under_a_path_is_a_file_or_symlink_where_one_of_its_folders_would_go(tmp_path, monkeypatch):
    root = tmp_path / "out"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "file").write_bytes(b"x")
    (root / "dir" / "plain").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths must be taken under `root`, never the working folder
    assert output._lexists_under(root, "file")
    assert output._lexists_under(root, "file/below")  # a file where a folder would go
    assert output._lexists_under(root, "dir/plain/below/deeper")  # ... two levels up
    assert output._lexists_under(root, "link/x.bin")  # a symlinked folder on the way
    assert not output._lexists_under(root, "dir/sub/new.bin")
    assert not output._lexists_under(root, "dir/new/deeper.bin")
    assert not output._lexists_under(root, "missing/x")


def test_a_symlinked_output_folder_itself_is_not_something_under_it(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    assert not output._lexists_under(tmp_path / "alias", "a/b.bin")


def test_refusing_a_file_the_step_did_not_write_names_it_and_says_what_to_do(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(VCUError) as e:
        output.check_not_theirs(tmp_path, {"a.bin"}, ["a.bin", "notes.txt"], "compile_sw", force=False)
    assert str(e.value) == f"{tmp_path / 'notes.txt'}: exists and was not written by compile_sw.py (its records do not list it); not replacing it"
    assert e.value.hint == "move it away, or pass --force to replace it"
    output.check_not_theirs(tmp_path, {"a.bin"}, ["a.bin", "notes.txt"], "compile_sw", force=True)  # --force: no refusal


def test_an_output_reached_through_a_symlink_is_shown_as_named_and_as_it_is(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    assert output._shown(tmp_path / "real" / "hw") == str(tmp_path / "real" / "hw")
    assert output._shown(tmp_path / "alias" / "hw") == f"{tmp_path / 'alias' / 'hw'} (that is {tmp_path / 'real' / 'hw'})"


# ---------------------------------------------------------------------------------------------
# Folders a failed run created, and the names of staging paths


def test_a_failed_run_removes_only_the_empty_folders_it_created(tmp_path):
    created = output.make_parents(tmp_path / "a" / "b")
    assert created == [tmp_path / "a" / "b", tmp_path / "a"]
    (tmp_path / "a" / "user.txt").write_text("mine")  # put there meanwhile: `a` is no longer empty
    output.remove_created(created)  # an error removing `a` is not raised: the user's folder stays
    assert not (tmp_path / "a" / "b").exists()
    assert (tmp_path / "a" / "user.txt").read_text() == "mine"


def test_a_staging_path_names_its_run_or_nothing(tmp_path):
    assert output._staging_run(tmp_path / ".hw.partial-123@host@abc", "hw") == (123, "host")
    assert output._staging_run(tmp_path / ".hw.partial-123@host", "hw") == (123, "host")
    assert output._staging_run(tmp_path / ".hw.partial-123-done", "hw") is None  # an earlier version's: no run to name
    assert output._staging_run(tmp_path / ".hw.partial-123", "hw") is None


# ---------------------------------------------------------------------------------------------
# Putting a killed run's `.old` files back


def test_moving_back_a_file_onto_a_later_runs_folder_keeps_the_folder(tmp_path):
    src, dst = tmp_path / "old" / "x", tmp_path / "new" / "x"
    _write(tmp_path, {"old/x": b"user", "new/x/later.bin": b"later"})
    output._move_back(src, dst)
    assert _tree(tmp_path / "new") == {"x/later.bin": b"later"}


def test_moving_back_a_folder_onto_a_later_runs_file_keeps_the_file(tmp_path):
    _write(tmp_path, {"old/x/inner.txt": b"user", "new/x": b"later"})
    output._move_back(tmp_path / "old" / "x", tmp_path / "new" / "x")
    assert _tree(tmp_path / "new") == {"x": b"later"}


def test_moving_back_merges_folders_file_by_file(tmp_path):
    _write(tmp_path, {"old/d/mine.txt": b"user", "old/d/both.bin": b"old", "new/d/both.bin": b"later"})
    output._move_back(tmp_path / "old" / "d", tmp_path / "new" / "d")
    assert _tree(tmp_path / "new") == {"d/both.bin": b"later", "d/mine.txt": b"user"}


# ---------------------------------------------------------------------------------------------
# What a step carries over from its earlier output


def test_what_is_carried_over_is_every_path_the_step_does_not_own_folders_whole(tmp_path):
    _write(tmp_path, {"a.bin": b"", "layers/0/q.bin": b"", "layers/0/user.txt": b"", "layers/notes/x.txt": b"",
                      "user/deep/y.txt": b"", "top.txt": b""})
    owned = {"a.bin", "layers/0/q.bin"}
    assert output._carried(tmp_path, owned) == ["layers/0/user.txt", "layers/notes", "top.txt", "user"]


def test_a_symlink_where_an_owned_folder_was_is_carried_whole_never_walked(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x.bin").write_bytes(b"")
    root = tmp_path / "out"
    root.mkdir()
    (root / "layers").symlink_to(tmp_path / "theirs", target_is_directory=True)
    assert output._carried(root, {"layers/x.bin"}) == ["layers"]


# ---------------------------------------------------------------------------------------------
# The swap into place


def _swap(tmp_path: Path, old: dict, new: dict, owned: set | None, carry: bool, force: bool = False):
    target, stage = tmp_path / "out", tmp_path / "stage"
    _write(target, old)
    stage.mkdir()
    _write(stage, new)
    trash = output._swap_in(stage, target, owned, carry, "hardware", force)
    return target, trash


def test_a_user_file_in_a_folder_the_new_output_lacks_is_carried_with_its_folders(tmp_path):
    target, trash = _swap(tmp_path, {"a/b/owned.bin": b"old", "a/b/user.txt": b"mine"}, {"other.bin": b"new"},
                          {"a/b/owned.bin"}, carry=True)
    assert _tree(target) == {"a/b/user.txt": b"mine", "other.bin": b"new"}
    assert _tree(trash) == {"a/b/owned.bin": b"old"}  # the old output's own file goes to the trash, nothing else


def test_a_clash_with_a_file_the_step_did_not_write_is_refused_naming_it(tmp_path):
    with pytest.raises(VCUError) as e:
        _swap(tmp_path, {"own.bin": b"old", "notes.txt": b"mine"}, {"own.bin": b"new", "notes.txt": b"new"}, {"own.bin"}, carry=True)
    assert str(e.value) == f"{tmp_path / 'out' / 'notes.txt'}: exists and was not written by hardware.py (its records do not list it); not replacing it"
    assert e.value.hint == "move it away, or pass --force to replace it"
    assert (tmp_path / "out" / "notes.txt").read_bytes() == b"mine"


def _force_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "--force" in r.getMessage()]


def test_force_over_a_clash_replaces_and_names_the_one_file(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "vcu128")
    target, _ = _swap(tmp_path, {"own.bin": b"old", "notes.txt": b"mine", "keep.txt": b"kept"},
                      {"own.bin": b"new", "notes.txt": b"new"}, {"own.bin"}, carry=True, force=True)
    assert _tree(target) == {"keep.txt": b"kept", "notes.txt": b"new", "own.bin": b"new"}
    assert _force_warnings(caplog) == [f"warning: --force: removed 1 file that hardware.py did not write from {target}: notes.txt"]


@pytest.mark.parametrize("count, shown", [
    (2, "f0.txt, f1.txt"),
    (3, "f0.txt, f1.txt, f2.txt"),
    (4, "f0.txt, f1.txt, f2.txt and 1 more"),
    (6, "f0.txt, f1.txt, f2.txt and 3 more"),
])
def test_force_over_a_folder_not_the_steps_names_what_it_removed(tmp_path, caplog, count, shown):
    caplog.set_level(logging.WARNING, "vcu128")
    old = {f"f{i}.txt": b"mine" for i in range(count)}
    target, trash = _swap(tmp_path, old, {"own.bin": b"new"}, None, carry=False, force=True)
    assert _tree(target) == {"own.bin": b"new"}
    assert _force_warnings(caplog) == [f"warning: --force: removed {count} files that hardware.py did not write from {target}: {shown}"]


def test_no_warning_when_nothing_of_anyone_elses_goes(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "vcu128")
    _swap(tmp_path, {"own.bin": b"old", "notes.txt": b"mine"}, {"own.bin": b"new"}, {"own.bin"}, carry=True, force=True)
    assert _force_warnings(caplog) == []


# ---------------------------------------------------------------------------------------------
# Records and summaries


def test_a_step_record_holds_the_tool_version_and_an_id_of_what_it_was_made_from(tmp_path):
    made_from = {"checkpoint": "/m", "fingerprint": "ab", "method": "x"}
    doc = output.write_step_record(tmp_path, "compile_sw", made_from, ["b.bin", "a.bin"], extra_key=1)
    on_disk = json.loads((tmp_path / "compile_sw.json").read_text())
    assert on_disk == doc
    assert list(doc) == ["tool", "version", "step", "id", "made_from", "extra_key", "files"]
    assert (doc["tool"], doc["version"], doc["step"], doc["files"]) == ("compiler-vcu128", __version__, "compile_sw", ["a.bin", "b.bin"])
    assert output.read_step_record(tmp_path, "compile_sw")["version"] == __version__


def test_the_made_from_id_is_the_sorted_json_sha256_prefix(tmp_path):
    expected = hashlib.sha256(b'{"a": 2, "b": 1}').hexdigest()[:16]
    assert output.made_from_id({"b": 1, "a": 2}) == expected
    assert output.made_from_id({"a": 2, "b": 1}) == expected


def test_a_step_summary_line(tmp_path):
    r = output.StepResult("compile_sw", Path("/x/compile"), 3, 1_500_000_000, 2.04, note="compile_sw.json lists them")
    assert r.line() == "compile_sw: 3 files (compile_sw.json lists them), 1.500 GB in 2.0 s -> /x/compile"
    r = output.StepResult("hardware", Path("/x/hw"), 7, 123_456_789, 0.25)
    assert r.line() == "hardware: 7 files, 0.123 GB in 0.2 s -> /x/hw"
    r = output.StepResult("compile_sw", Path("/x/compile"), 1, 1_234_567_500_500, 1.0)  # 1234.5675005 GB: decimal gigabytes, rounded
    assert r.line() == "compile_sw: 1 files, 1234.568 GB in 1.0 s -> /x/compile"


def test_a_whole_file_without_a_shape_is_written_and_recorded(tmp_path):
    data = np.arange(10, dtype="<u4")
    rec = output.write_whole_file(tmp_path, "sub/x.bin", data, "made here")
    assert (tmp_path / "sub" / "x.bin").read_bytes() == data.tobytes()
    assert rec.to_json() == {"path": "sub/x.bin", "bytes": 40, "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
                             "source": "made here", "dtype": "uint32"}


def test_the_recorded_umask_is_the_processes_and_is_left_as_it_was():
    old = os.umask(0o027)
    try:
        assert output._umask() == 0o027
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------
# Parents, staging folders, disk space


def test_make_parents_names_only_the_folders_it_created(tmp_path):
    (tmp_path / "exists").mkdir()
    assert output.make_parents(tmp_path / "exists" / "new" / "deeper") == [tmp_path / "exists" / "new" / "deeper", tmp_path / "exists" / "new"]
    assert output.make_parents(tmp_path / "exists") == []


def test_make_parents_under_a_file_fails_with_the_systems_error(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError):  # NotADirectoryError or FileExistsError, never the clean-up's own failure
        output.make_parents(tmp_path / "file" / "a" / "b")


def test_a_stage_is_beside_its_target_and_names_this_run(tmp_path):
    stage = output.make_stage(tmp_path, "hw")
    assert stage.parent == tmp_path
    assert stage.name.startswith(f".hw.partial-{output.stage_tag()}@")
    assert output._staging_run(stage, "hw") == (os.getpid(), output.HOST)
    assert output.staging_paths(tmp_path, "hw") == [stage]
    assert stage.stat().st_mode & 0o777 == output.FOLDER_MODE


def test_disk_bytes_are_whole_4096_byte_blocks():
    assert [output.disk_bytes(n) for n in (0, 1, 4096, 4097, 8192)] == [0, 4096, 4096, 8192, 8192]
    assert isinstance(output.disk_bytes(1), int)


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(output.os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 0, 0, free // 4096, 0, 0, 0, 0, 255)))


def test_free_space_is_enough_when_it_is_exactly_what_the_step_needs(tmp_path, monkeypatch):
    _free(monkeypatch, 8192)
    output.check_free_space(tmp_path / "out", 8192)
    output.check_free_space(tmp_path / "out", None)


def test_too_little_free_space_is_refused_with_both_sizes_and_what_to_do(tmp_path, monkeypatch):
    _free(monkeypatch, 4096)
    with pytest.raises(VCUError) as e:
        output.check_free_space(tmp_path / "out", 2_500_000)
    assert str(e.value) == f"{tmp_path / 'out'}: not enough disk space: the step needs about 2.50 MB, 4.10 kB are free there"
    assert e.value.hint == "free some space, or choose an output folder on another disk"


# ---------------------------------------------------------------------------------------------
# Reading a step record back: each refusal's exact words


def _record(tmp_path: Path, **change) -> Path:
    made_from = {"checkpoint": "/m", "fingerprint": "ab", "method": "x"}
    output.write_step_record(tmp_path, "compile_sw", made_from, ["a.bin"])
    path = tmp_path / "compile_sw.json"
    doc = json.loads(path.read_text())
    for key, value in change.items():
        if key.startswith("made_from_"):
            doc["made_from"][key.removeprefix("made_from_")] = value
        elif value is None:
            del doc[key]
        else:
            doc[key] = value
    path.write_text(json.dumps(doc))
    return path


def _refusal(tmp_path: Path) -> str:
    with pytest.raises(VCUError) as e:
        output.read_step_record(tmp_path, "compile_sw")
    return str(e.value)


def test_a_step_record_that_is_a_folder_is_refused_as_not_a_file(tmp_path):
    (tmp_path / "compile_sw.json").mkdir()
    assert _refusal(tmp_path) == f"{tmp_path / 'compile_sw.json'}: not a file (the record compile_sw.py writes is a JSON file)"


def test_a_step_record_of_another_tool_names_the_value_found(tmp_path):
    path = _record(tmp_path, tool="someone-else")
    assert _refusal(tmp_path) == f"{path}: 'tool' is 'someone-else', expected 'compiler-vcu128' (not the record compile_sw.py writes)"


@pytest.mark.parametrize("key", ["version", "id"])
def test_a_step_records_version_and_id_must_be_strings(tmp_path, key):
    path = _record(tmp_path, **{key: 5})
    assert _refusal(tmp_path) == f"{path}: '{key}' is 5, expected a string"


def test_a_step_record_without_an_id_is_refused(tmp_path):
    path = _record(tmp_path, id=None)
    assert _refusal(tmp_path) == f"{path}: missing 'id'"


@pytest.mark.parametrize("key", ["checkpoint", "fingerprint", "method"])
def test_what_a_step_record_was_made_from_must_be_strings(tmp_path, key):
    path = _record(tmp_path, **{f"made_from_{key}": 5})
    assert _refusal(tmp_path) == f"{path}: 'made_from.{key}' is 5, expected a string"


# ---------------------------------------------------------------------------------------------
# Writing a file whole or not at all: the error names the file asked for, in the system's words


def test_a_failed_atomic_write_names_the_target_with_the_systems_words(tmp_path):
    target = tmp_path / "missing" / "x.json"
    with pytest.raises(FileNotFoundError) as e:
        output.replace_file_atomically(target, b"data")
    assert (e.value.errno, e.value.strerror, e.value.filename) == (2, os.strerror(2), str(target))
    assert not (tmp_path / "missing").exists()


def test_a_failed_atomic_write_without_the_systems_words_keeps_the_errors_own(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError("the disk went away")

    monkeypatch.setattr(output.os, "replace", refuse)
    target = tmp_path / "x.json"
    with pytest.raises(OSError) as e:
        output.replace_file_atomically(target, b"data")
    assert (e.value.errno, e.value.strerror, e.value.filename) == (None, "the disk went away", str(target))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# What a killed run left: staging paths and `.old` folders (remove_stale)


DEAD_PID = 2**22 + 4243  # above any pid the kernel hands out here: a run that is gone


def test_this_runs_own_staging_path_is_removed_not_refused(tmp_path):
    own = tmp_path / f".t.partial-{output.stage_tag()}@x"
    own.mkdir()
    output.remove_stale(tmp_path, "t")
    assert not own.exists()


def test_a_live_other_runs_staging_path_is_refused_and_kept(tmp_path):
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".t.partial-{other.pid}@{output.HOST}@x"
        live.mkdir()
        with pytest.raises(VCUError) as e:
            output.remove_stale(tmp_path, "t")
        assert str(e.value) == f"{tmp_path / 't'}: another run (pid {other.pid} on {output.HOST}) is writing it right now; wait for it to finish"
        assert e.value.hint == f"if that run is gone, remove {live}"
        assert live.is_dir()
    finally:
        other.kill()
        other.wait()


def test_stale_staging_files_and_links_are_removed_never_followed(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "vcu128")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "keep.bin").write_bytes(b"k")
    a_file = tmp_path / f".t.partial-{DEAD_PID}@{output.HOST}"
    a_file.write_bytes(b"x")
    a_link = tmp_path / f".t.partial-{DEAD_PID + 1}@{output.HOST}@x"
    a_link.symlink_to(tmp_path / "theirs", target_is_directory=True)
    output.remove_stale(tmp_path, "t")
    assert not os.path.lexists(a_file) and not os.path.lexists(a_link)
    assert (tmp_path / "theirs" / "keep.bin").read_bytes() == b"k"
    assert f"warning: removed {a_file}: a staging folder left by a killed run" in caplog.text


def _stuck_files_cannot_be_removed(monkeypatch) -> None:
    """Every file named stuck.bin refuses to be unlinked (as a file a user made immutable would)."""
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fspath(path).endswith("stuck.bin"):
            raise PermissionError(1, "Operation not permitted", os.fspath(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)


def test_a_stale_folder_that_cannot_be_removed_whole_does_not_stop_the_run(tmp_path, monkeypatch):
    stale = tmp_path / f".t.partial-{DEAD_PID}@{output.HOST}@x"
    old = tmp_path / ".t.old-4242"
    for folder in (stale, old):
        folder.mkdir()
        (folder / "stuck.bin").write_bytes(b"x")
    (tmp_path / "t").mkdir()
    _stuck_files_cannot_be_removed(monkeypatch)
    output.remove_stale(tmp_path, "t")  # what cannot be removed stays; the run goes on


def test_a_killed_swaps_old_folder_comes_back_when_the_target_is_gone(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "vcu128")
    _write(tmp_path / ".t.old-111", {"a.bin": b"first", "notes.txt": b"mine"})
    _write(tmp_path / ".t.old-222", {"b.bin": b"second", "deep/user.txt": b"mine too"})
    output.remove_stale(tmp_path, "t")
    target = tmp_path / "t"
    # the first is restored whole; from the second, what the step does not own (all of it: no owner given) is carried in
    assert _tree(target) == {"a.bin": b"first", "b.bin": b"second", "deep/user.txt": b"mine too", "notes.txt": b"mine"}
    assert not (tmp_path / ".t.old-111").exists() and not (tmp_path / ".t.old-222").exists()
    assert f"warning: restored {target} from .t.old-111, left by a run killed while replacing it" in caplog.text


def test_a_killed_swaps_old_folder_gives_back_only_what_the_step_did_not_write(tmp_path):
    _write(tmp_path / ".t.old-111", {"a.bin": b"old output", "layers/0/q.bin": b"old output", "layers/0/user/deep.txt": b"mine",
                                     "notes.txt": b"mine"})
    _write(tmp_path / "t", {"b.bin": b"new output"})  # a later run's output, without the old run's files
    owns = lambda folder: {"a.bin", "layers/0/q.bin"}  # noqa: E731
    output.remove_stale(tmp_path, "t", owns)
    assert _tree(tmp_path / "t") == {"b.bin": b"new output", "layers/0/user/deep.txt": b"mine", "notes.txt": b"mine"}
    assert not (tmp_path / ".t.old-111").exists()


def test_without_an_owner_every_file_of_an_old_folder_is_kept(tmp_path):
    _write(tmp_path / ".t.old-111", {"a.bin": b"old", "notes.txt": b"mine"})
    _write(tmp_path / "t", {"a.bin": b"new"})
    output.remove_stale(tmp_path, "t")
    assert _tree(tmp_path / "t") == {"a.bin": b"new", "notes.txt": b"mine"}


def test_an_old_folder_that_cannot_be_removed_whole_does_not_stop_the_run(tmp_path, monkeypatch):
    _write(tmp_path / ".t.old-111", {"stuck.bin": b"old output", "notes.txt": b"mine"})
    _write(tmp_path / "t", {"new.bin": b"new"})
    _stuck_files_cannot_be_removed(monkeypatch)
    output.remove_stale(tmp_path, "t", lambda folder: {"stuck.bin"})
    assert _tree(tmp_path / "t") == {"new.bin": b"new", "notes.txt": b"mine"}


def test_only_this_tools_names_are_staging_or_old_paths(tmp_path):
    names = [".t.partial-12@host@abc", ".t.partial-12@host", ".t.partial-12-abc", ".t.partial-12", ".t.partial-x",
             ".t.old-12", ".t.old-12-abc", ".t.old-12@host", ".t.old-", ".u.old-12"]
    for name in names:
        (tmp_path / name).mkdir()
    assert [p.name for p in output.staging_paths(tmp_path, "t")] == [".t.partial-12", ".t.partial-12-abc", ".t.partial-12@host", ".t.partial-12@host@abc"]
    assert [p.name for p in output.staging_paths(tmp_path, "t", "old")] == [".t.old-12"]


def test_merging_an_old_folder_into_a_later_output_says_so(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "vcu128")
    _write(tmp_path / ".t.old-111", {"notes.txt": b"mine"})
    _write(tmp_path / "t", {"b.bin": b"new"})
    output.remove_stale(tmp_path, "t")
    assert caplog.messages == [f"warning: removed {tmp_path / '.t.old-111'}, left by a run killed while replacing {tmp_path / 't'} "
                               "(other steps' files kept)"]


def test_an_interrupted_atomic_write_leaves_nothing_and_stays_an_interrupt(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(output.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        output.replace_file_atomically(tmp_path / "r.json", b"{}")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# check_out: what an --out may be


def _never_owned(folder):
    return None


def test_check_out_answers_new_own_or_force(tmp_path):
    assert output.check_out(tmp_path / "new", "hardware", _never_owned) == "new"
    (tmp_path / "empty").mkdir()
    assert output.check_out(tmp_path / "empty", "hardware", _never_owned) == "new"
    assert output.check_out(tmp_path / "empty", "hardware", lambda folder: set()) == "own"
    _write(tmp_path / "theirs", {"x.txt": b"theirs"})
    assert output.check_out(tmp_path / "theirs", "hardware", _never_owned, force=True) == "force"

    def damaged(folder):
        raise VCUError(f"{folder}/hardware.json: damaged")

    assert output.check_out(tmp_path / "theirs", "hardware", damaged, force=True) == "force"
    with pytest.raises(VCUError) as e:
        output.check_out(tmp_path / "theirs", "hardware", damaged, flag="--hw_out")
    assert (str(e.value), e.value.hint) == (f"{tmp_path / 'theirs'}/hardware.json: damaged", "choose another --hw_out, or pass --force to replace that folder")


def test_check_out_refuses_the_root_a_symlink_and_an_input_in_the_flags_words(tmp_path):
    with pytest.raises(VCUError) as e:
        output.check_out(Path("/"), "hardware", _never_owned)
    assert str(e.value) == "/: not a folder the step can write (pass --out with a folder name)"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(VCUError) as e:
        output.check_out(tmp_path / "link", "hardware", _never_owned, flag="--hw_out")
    assert str(e.value) == (f"--hw_out {tmp_path / 'link'} (that is {tmp_path / 'real'}): exists and is a symbolic link; "
                            "not replacing it (choose another --hw_out)")
    with pytest.raises(VCUError) as e:
        output.check_out(tmp_path / "real", "hardware", _never_owned, inputs=[tmp_path / "real"], flag="--hw_out")
    assert str(e.value) == f"--hw_out {tmp_path / 'real'}: is or contains the input {tmp_path / 'real'}; choose another folder"


def test_an_output_that_is_an_input_is_refused_with_the_default_flag_and_a_hint(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(VCUError) as e:
        output.check_inputs(tmp_path, [tmp_path / "model"])  # as lm_head.py asks: the default flag
    assert str(e.value) == f"--out {tmp_path}: is or contains the input {tmp_path / 'model'}; choose another folder"
    assert e.value.hint == "choose a new folder (one inside an input folder is fine)"
    output.check_inputs(tmp_path / "model" / "new", [tmp_path / "model"])  # inside an input folder: fine


def test_an_output_ending_in_dotdot_is_the_resolved_folder(tmp_path):
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub", target_is_directory=True)
    assert output.out_path(tmp_path / "a" / "..") == tmp_path
    assert output.out_path(tmp_path / "link" / "..") == tmp_path / "real"  # the link's target's parent, as the system goes
