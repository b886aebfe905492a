"""Writing outputs safely: a staging folder renamed into place, files hashed as they are written,
and the manifest that lists every file of a packed folder (name, bytes, sha256, source, shape)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from vcu128 import __version__
from vcu128.io.direct_io import ALIGN, DirectWriter, read_bytes
from vcu128.io.errors import VCUError, human_bytes, one_line, writing
from vcu128.io.jsonfile import (
    dumps,
    get_float,
    get_object,
    get_str,
    get_str_list,
    read_json_object,
)

log = logging.getLogger("vcu128")
TOOL = "compiler-vcu128"

STEP_RECORD_SUFFIX = ".json"  # compile_sw.json, lm_head.json: what a step wrote into a shared folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()
FOLDER_MODE = 0o777 & ~UMASK  # outputs follow the umask (0755 under 022), as mkdir would


# ---------------------------------------------------------------------------------------------
# Who may replace what. A step replaces an existing output only when that output is its own
# (it wrote a record or manifest there); it never touches its inputs or a folder holding them.

Owns = Callable[[Path], "set[str] | None"]  # folder -> the files a step wrote there, or None if not its output


def real_path(path) -> Path:
    """`path` with every symlink and `..` resolved (as far as it exists; the rest appended): what
    inputs and outputs are compared as."""
    return Path(os.path.realpath(os.fspath(path)))


def out_path(target) -> Path:
    """Where an output really goes: its parent folder with symlinks and `..` resolved, its own name
    kept (a symlink there is refused by check_out, never followed)."""
    t = Path(os.path.join(os.getcwd(), os.fspath(target)))  # not normalised: `link/..` is the link's target's parent
    if t.name in ("", ".."):
        return real_path(t)
    return real_path(t.parent) / t.name


def _shown(target) -> str:
    """The output as the user named it, and what it really is where that differs (a symlink on the way)."""
    shown, real = Path(os.path.abspath(os.fspath(target))), real_path(target)
    return f"{shown}" if shown == real else f"{shown} (that is {real})"


def check_inputs(target, inputs, flag: str = "--out") -> None:
    """Refuse an output that is one of the step's inputs, or holds one, compared after resolving
    symlinks and `..` (a new folder inside an input folder is fine: it holds no input)."""
    real = real_path(target)
    for inp in inputs:
        inp = real_path(inp)
        if inp == real or real in inp.parents:
            raise VCUError(f"{flag} {_shown(target)}: is or contains the input {inp}; choose another folder",
                           "choose a new folder (one inside an input folder is fine)")


def check_out(target: Path, step: str, owns: Owns, inputs=(), force: bool = False, flag: str = "--out") -> str:
    """Refuse an --out that would destroy something the step did not write. Returns 'new' (nothing
    there, or an empty folder), 'own' (the step's earlier output) or 'force'."""
    phys = out_path(target)
    if not phys.name or phys == phys.parent:
        raise VCUError(f"{target}: not a folder the step can write (pass --out with a folder name)")
    check_inputs(target, inputs, flag)
    if not phys.exists() and not phys.is_symlink():
        return "new"
    if phys.is_symlink():
        raise VCUError(f"{flag} {_shown(target)}: exists and is a symbolic link; not replacing it (choose another {flag})")
    if not phys.is_dir():
        raise VCUError(f"{flag} {_shown(target)}: exists and is not a folder; not replacing it (choose another {flag})")
    try:
        owned = owns(phys)
    except VCUError as e:  # its record is damaged: not replaced on that record's word
        if force:
            return "force"
        raise VCUError(str(e), f"choose another {flag}, or pass --force to replace that folder") from None
    if owned is not None:
        return "own"
    if not any(phys.iterdir()):
        return "new"
    if force:
        return "force"
    raise VCUError(f"{flag} {_shown(target)}: exists and was not written by {step}.py; not replacing it",
                   f"choose another {flag}, or pass --force to replace that folder")


def check_not_theirs(folder: Path, owned: set[str], names, step: str, force: bool) -> None:
    """A step overwrites a file only where its records say it wrote that file: any of `names`
    (relative to `folder`) that is there and not in `owned` is refused, unless --force."""
    if force:
        return
    for rel in names:
        if rel not in owned and _lexists_under(folder, rel):
            raise VCUError(f"{Path(folder) / rel}: exists and was not written by {step}.py (its records do not list it); not replacing it",
                           "move it away, or pass --force to replace it")


def _lexists_under(folder: Path, rel: str) -> bool:
    """Is there something at folder/rel, or a non-folder where one of rel's parent folders would go?"""
    if os.path.lexists(Path(folder) / rel):
        return True
    parts = Path(rel).parts
    for i in range(1, len(parts)):
        p = Path(folder, *parts[:i])
        if os.path.lexists(p) and (p.is_symlink() or not p.is_dir()):
            return True
    return False


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it created (deepest first), for remove_created."""
    missing, p = [], Path(folder)
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except BaseException:
        remove_created(missing)
        raise
    return missing


def remove_created(created: list[Path]) -> None:
    """Remove the folders make_parents created, where they are still empty (a failed run leaves no trace)."""
    for p in created:
        with contextlib.suppress(OSError):
            p.rmdir()


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """A short lock on one folder while a step looks at, creates or swaps the staging folders of its
    targets there (held for renames, not for the step's work: other targets in the folder go on)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


HOST = socket.gethostname()


def stage_tag() -> str:
    """What names a run in its staging paths: `pid@host`, so a later run can tell a live run's
    staging folder from a killed one's."""
    return f"{os.getpid()}@{HOST}"


# What follows `.{name}.partial-` in a staging path of this tool: `pid@host@random` (a run's staging
# folder), `pid@host` (lm_head's staging files); earlier versions' `pid-random`, `pid-done` (trash) and
# `pid` (a file being replaced). Anything else is not ours, whatever its name starts with.
_RUN_TAG = re.compile(r"([0-9]+)@([^@/]+)(?:@\w+)?")
_EARLIER_TAG = re.compile(r"[0-9]+(?:-\w+)?")
_OLD_TAG = re.compile(r"[0-9]+")


def staging_paths(parent: Path, name: str, kind: str = "partial") -> list[Path]:
    """The staging (`partial`) or swapped-aside (`old`) paths of target `name` in `parent`, matched
    literally (a name such as `hw [v2]` is not a glob pattern)."""
    prefix = f".{name}.{kind}-"
    pattern = _OLD_TAG if kind == "old" else None
    found = []
    with os.scandir(parent) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            rest = entry.name[len(prefix):]
            if (pattern.fullmatch(rest) if pattern else (_RUN_TAG.fullmatch(rest) or _EARLIER_TAG.fullmatch(rest))):
                found.append(Path(entry.path))
    return sorted(found)


def _staging_run(path: Path, name: str) -> tuple[int, str] | None:
    """(pid, host) of the run a staging path belongs to; None for one this version cannot name
    (an earlier version's, or a finished run's trash)."""
    m = _RUN_TAG.fullmatch(path.name[len(f".{name}.partial-"):])
    return (int(m.group(1)), m.group(2)) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(parent: Path, name: str, owns: Owns | None = None) -> None:
    """With the folder locked: a staging path of `name` whose run is alive means another run is
    writing the same target (refused); one whose run is gone was left by a killed run (removed,
    and said: it only ever holds what the step wrote). A `.old` folder (a run killed while swapping,
    a window of a few renames) may hold other steps' files: they go back where they were."""
    for p in staging_paths(parent, name):
        run = _staging_run(p, name)
        if run is not None and run[0] != os.getpid() and (run[1] != HOST or _alive(run[0])):
            raise VCUError(f"{parent / name}: another run (pid {run[0]} on {run[1]}) is writing it right now; wait for it to finish",
                           f"if that run is gone, remove {p}")
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        log.warning(f"warning: removed {p}: a staging folder left by a killed run")
    for old in staging_paths(parent, name, "old"):
        target = parent / name
        if not target.exists():
            os.replace(old, target)
            log.warning(f"warning: restored {target} from {old.name}, left by a run killed while replacing it")
            continue
        owned = (owns(old) if owns else None) or set()
        for rel in _carried(old, owned):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            _move_back(old / rel, target / rel)
        shutil.rmtree(old, ignore_errors=True)
        log.warning(f"warning: removed {old}, left by a run killed while replacing {target} (other steps' files kept)")


def _move_back(src: Path, dst: Path) -> None:
    """Put `src` back at `dst`. Where a later run made `dst` meanwhile (a folder of the same name),
    what only `src` holds goes into it, folder by folder: a user's file there is kept; a file both
    hold stays as the later run wrote it."""
    if not dst.exists() and not dst.is_symlink():
        os.replace(src, dst)
    elif src.is_dir() and not src.is_symlink() and dst.is_dir() and not dst.is_symlink():
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            _move_back(Path(entry.path), dst / entry.name)


def _carried(root: Path, owned: set[str]) -> list[str]:
    """Paths under `root` (relative) that a step does not own: other steps' outputs and anything a
    user put there. Folders holding owned files are walked into; others move as a whole."""
    owned_dirs = {str(Path(p).parent) for p in owned} - {"."}
    owned_dirs |= {str(parent) for p in owned_dirs for parent in Path(p).parents} - {"."}
    out = []

    def walk(folder: Path, rel: str) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            r = f"{rel}{entry.name}"
            if r in owned:
                continue
            if r in owned_dirs and entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path), r + "/")
            else:
                out.append(r)

    walk(root, "")
    return out


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait while a few renames swap an output into place."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def make_stage(parent: Path, name: str) -> Path:
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{stage_tag()}@", dir=parent))
    os.chmod(stage, FOLDER_MODE)  # mkdtemp makes it 0700; the board's loader may run as another user
    return stage


@contextlib.contextmanager
def staged_dir(target: Path, step: str = "this step", owns: Owns | None = None, inputs=(), force: bool = False,
               need_bytes: int | None = None, flag: str = "--out", writes=()) -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success it takes `target`'s place, on any error
    (SIGINT and SIGTERM included) it is removed, so a failed step leaves nothing behind (no parent
    folder it created either) and an older good output stays as it was. What the older output held
    that the step does not own (other steps' files, a user's notes) is moved into the new one:
    re-running a step replaces only its own files, and refuses to overwrite one it did not write
    (`writes`: names the step knows it will write, checked before any work; every file is checked
    again at the swap). `owns(folder)` names the step's files in an earlier output (None: not its
    output). Paths are compared after resolving symlinks and `..`."""
    owns = owns or (lambda folder: None)
    given = target
    target = out_path(target)
    mode = check_out(given, step, owns, inputs, force, flag)  # before anything is created
    if mode == "own":
        check_not_theirs(target, owns(target), writes, step, force)
    created = make_parents(target.parent)
    stage = None
    try:
        with writing(target, need_bytes):
            with folder_lock(target.parent):
                remove_stale(target.parent, target.name, owns)
                mode = check_out(given, step, owns, inputs, force, flag)  # again: a killed run's output may be back
                check_free_space(target, need_bytes)
                stage = make_stage(target.parent, target.name)  # from here on, a second run on this target is refused
            yield stage
            with folder_lock(target.parent):
                trash = _swap_in(stage, target, owns(target) if mode == "own" else None, mode == "own", step, force)
            stage = None
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        remove_created(created)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _swap_in(stage: Path, target: Path, owned: set[str] | None, carry: bool, step: str = "this step", force: bool = False) -> Path | None:
    """Renames only: the old output aside, the stage in, what it does not own carried over. Returns
    the old output's remains to delete (after the lock is released: deleting gigabytes takes time).
    A file the step did not write where the stage has one refuses the swap (unless --force)."""
    with signals_deferred():
        if not target.exists():
            os.replace(stage, target)
            return None
        carried = _carried(target, owned or set()) if carry else []
        clash = [rel for rel in carried if _lexists_under(stage, rel)]  # theirs, where this run wrote a file
        if clash and not force:
            raise VCUError(f"{target / clash[0]}: exists and was not written by {step}.py (its records do not list it); not replacing it",
                           "move it away, or pass --force to replace it")
        removed = clash if carry else files_under(target)  # --force: what the step did not write goes, and is named
        if removed:
            shown = ", ".join(removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
            log.warning(one_line(f"warning: --force: removed {len(removed)} file{'s' if len(removed) > 1 else ''} that {step}.py "
                                 f"did not write from {target}: {shown}"))
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(stage, target)
        for rel in carried:
            if not _lexists_under(target, rel):
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(old / rel, target / rel)
        trash = target.parent / f".{target.name}.partial-{os.getpid()}-done"
        os.replace(old, trash)
    return trash


def disk_bytes(nbytes: int, block: int = 4096) -> int:
    """What a file of `nbytes` takes on disk: whole blocks (a folder of many small files needs more than their sum)."""
    return -(-nbytes // block) * block


def check_free_space(target: Path, need_bytes: int | None) -> None:
    """Refuse before writing a byte when the disk cannot hold the output."""
    if not need_bytes:
        return
    st = os.statvfs(target.parent)
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise VCUError(f"{target}: not enough disk space: the step needs about {human_bytes(need_bytes)}, "
                       f"{human_bytes(free)} are free there", "free some space, or choose an output folder on another disk")


def replace_file_atomically(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a file beside it renamed into place. On any failure (a full
    disk included) the partial file is removed and the error names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and (e.filename is None or e.filename == str(tmp)):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def read_step_record(folder: Path, step: str) -> dict | None:
    """The record `step` wrote into a shared folder (compile_sw.json, lm_head.json), or None when
    there is none. Read strictly: a record that is not this tool's, or has a key of the wrong
    type, is one error naming the file and the key."""
    path = Path(folder) / f"{step}{STEP_RECORD_SUFFIX}"
    if not path.is_file():
        if os.path.lexists(path):
            raise VCUError(f"{path}: not a file (the record {step}.py writes is a JSON file)")
        return None
    doc = read_json_object(path)
    for key, want in (("tool", TOOL), ("step", step)):
        if doc.get(key) != want:
            raise VCUError(f"{path}: '{key}' is {doc.get(key)!r}, expected {want!r} (not the record {step}.py writes)")
    get_str(doc, "version", path)
    if not isinstance(get_str(doc, "id", path), str):
        raise VCUError(f"{path}: missing 'id'")
    made_from = get_object(doc, "made_from", path, required=True)
    for key in ("checkpoint", "fingerprint", "method"):
        get_str(made_from, key, path, name=f"made_from.{key}")
    get_str_list(doc, "files", path, relative_paths=True)
    get_object(doc, "fp16_rescale", path)  # compile_sw's plan (its factors are read from compile/config.json)
    get_float(doc, "relative_error", path)  # lm_head's
    return doc


def write_step_record(folder: Path, step: str, made_from: dict, files: list[str], **extra) -> dict:
    """What a step wrote and what it was made from; `id` names the inputs, so an identical re-run
    keeps it and a later step can tell when what it was made from has changed."""
    doc = {"tool": TOOL, "version": __version__, "step": step, "id": made_from_id(made_from),
           "made_from": made_from, **extra, "files": sorted(files)}
    replace_file_atomically(Path(folder) / f"{step}{STEP_RECORD_SUFFIX}", dumps(doc).encode())
    return doc


def made_from_id(made_from: dict) -> str:
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16]


def record_owns(step: str) -> Owns:
    def owns(folder: Path) -> set[str] | None:
        doc = read_step_record(folder, step)
        if doc is None:
            return None
        return set(doc["files"]) | {f"{step}{STEP_RECORD_SUFFIX}"}

    return owns


@dataclass
class FileRecord:
    """One manifest entry: what a file is, how big, and its checksum."""

    path: str
    bytes: int = 0
    sha256: str = ""
    source: str = ""
    dtype: str = "uint32"
    rows: int | None = None
    words_per_row: int | None = None
    step: str | None = None  # the step that wrote it, where a folder holds more than one step's files
    made_from: str | None = None  # id of the compile_sw run it came from (embedding parts)

    def to_json(self) -> dict:
        # asdict's deep copy, for flat fields: vars() gives the same keys in the same order, 10x faster
        # (a 7B's manifest has 6576 entries)
        return {k: v for k, v in vars(self).items() if v is not None}


# A file up to this size goes through the page cache; a bigger one is written unbuffered. A packed
# folder is thousands of small files (6561 for a 7B, most under 1 MB): written unbuffered, each one's
# synchronous write waits behind the gigabytes its step reads; buffered, the kernel gathers them into
# large writes in the background (hardware.py on 2 cores: 26 s against 30-33 s, the same kernel time).
SMALL_FILE_BYTES = 16 << 20


class HashingWriter:
    """A binary file that counts and hashes what is written, for the manifest."""

    def __init__(self, root: Path, rel: str, source: str, **shape):
        self.path = Path(root) / rel
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Its size, where the shape tells it (rows of 4-byte words): a small file is staged whole (up
        # to 4 MB: a packed linear has 32 open at once) and goes through the page cache
        size = shape.get("rows", 0) * shape.get("words_per_row", 0) * 4
        stage = min(4 << 20, -(-size // ALIGN) * ALIGN) if size else 1 << 20
        self._f = DirectWriter(self.path, stage_bytes=stage, direct=not 0 < size <= SMALL_FILE_BYTES)
        self._sha = hashlib.sha256()
        self.record = FileRecord(path=rel, source=source, **shape)

    def write(self, array: np.ndarray) -> None:
        buf = memoryview(np.ascontiguousarray(array)).cast("B")
        self._f.write(buf)
        self._sha.update(buf)
        self.record.bytes += buf.nbytes

    def close(self) -> FileRecord:
        self._f.close()
        self.record.sha256 = self._sha.hexdigest()
        return self.record


def write_whole_file(root: Path, rel: str, array: np.ndarray, source: str, **shape) -> FileRecord:
    w = HashingWriter(root, rel, source, **shape)
    w.write(array)
    return w.close()


def sha256_file(path: Path, block: int = 16 << 20) -> str:
    sha = hashlib.sha256()
    size = Path(path).stat().st_size
    for offset in range(0, size, block):
        sha.update(read_bytes(path, offset, min(block, size - offset)))
    return sha.hexdigest()


@dataclass
class StepResult:
    """What a step wrote, for its one-line summary and for the benchmark."""

    step: str
    out: Path
    files: int
    bytes: int
    seconds: float
    details: dict = field(default_factory=dict)
    note: str = ""  # which files `files` counts (the record that lists them), so that a re-run says the same

    def line(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{self.step}: {self.files} files{note}, {self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s -> {self.out}"


def files_under(folder: Path) -> list[str]:
    """Every file under `folder`, as paths relative to it."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def folder_stats(paths: list[Path]) -> tuple[int, int]:
    """(files, bytes) under the given files and folders."""
    files = total = 0
    for p in map(Path, paths):
        for f in [p] if p.is_file() else (x for x in p.rglob("*") if x.is_file()):
            files += 1
            total += f.stat().st_size
    return files, total
