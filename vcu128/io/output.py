"""Writing outputs safely: a staging folder renamed into place, files hashed as they are written,
and the manifest that lists every file of a packed folder (name, bytes, sha256, source, shape)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from vcu128 import __version__
from vcu128.io.direct_io import DirectWriter, read_bytes
from vcu128.io.errors import VCUError, human_bytes, set_writing
from vcu128.io.jsonfile import dumps

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


def check_out(target: Path, step: str, owns: Owns, inputs=(), force: bool = False, flag: str = "--out") -> str:
    """Refuse an --out that would destroy something the step did not write. Returns 'new' (nothing
    there, or an empty folder), 'own' (the step's earlier output) or 'force'."""
    if not target.name or target == target.parent:
        raise VCUError(f"{target}: not a folder the step can write (pass --out with a folder name)")
    for inp in inputs:
        inp = Path(inp).resolve()
        if inp == target or target in inp.parents:
            raise VCUError(f"{flag} {target}: is or contains the input {inp}; choose another folder",
                           "a new folder inside the input folder is fine (the default is)")
    if not target.exists() and not target.is_symlink():
        return "new"
    if not target.is_dir() or target.is_symlink():
        raise VCUError(f"{flag} {target}: exists and is not a folder; not replacing it (choose another {flag})")
    if owns(target) is not None:
        return "own"
    if not any(target.iterdir()):
        return "new"
    if force:
        return "force"
    raise VCUError(f"{flag} {target}: exists and was not written by {step}.py; not replacing it",
                   f"choose another {flag}, or pass --force to replace that folder")


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


def _staging_run(path: Path, name: str) -> tuple[int, str] | None:
    """(pid, host) of the run a staging path belongs to; None for one this version cannot name
    (an earlier version's, or a finished run's trash)."""
    rest = path.name[len(f".{name}.partial-"):]
    pid, _, host = rest.partition("@")
    if not host or not pid.isdigit():
        return None
    return int(pid), host.split("@")[0]


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
    for p in sorted(parent.glob(f".{name}.partial-*")):
        run = _staging_run(p, name)
        if run is not None and run[0] != os.getpid() and (run[1] != HOST or _alive(run[0])):
            raise VCUError(f"{parent / name}: another run (pid {run[0]} on {run[1]}) is writing it right now; wait for it to finish",
                           f"if that run is gone, remove {p}")
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        log.warning(f"warning: removed {p}: a staging folder left by a killed run")
    for old in sorted(parent.glob(f".{name}.old-*")):
        target = parent / name
        if not target.exists():
            os.replace(old, target)
            log.warning(f"warning: restored {target} from {old.name}, left by a run killed while replacing it")
            continue
        owned = (owns(old) if owns else None) or set()
        for rel in _carried(old, owned):
            if not (target / rel).exists():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(old / rel, target / rel)
        shutil.rmtree(old, ignore_errors=True)
        log.warning(f"warning: removed {old}, left by a run killed while replacing {target} (other steps' files kept)")


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
               need_bytes: int | None = None, flag: str = "--out") -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success it takes `target`'s place, on any error
    (SIGINT and SIGTERM included) it is removed, so a failed step leaves nothing behind and an older
    good output stays as it was. What the older output held that the step does not own (other
    steps' files, a user's notes) is moved into the new one: re-running a step replaces only its
    own files. `owns(folder)` names the step's files in an earlier output (None: not its output)."""
    owns = owns or (lambda folder: None)
    target = Path(os.path.abspath(target))
    check_out(target, step, owns, inputs, force, flag)  # before anything is created
    target.parent.mkdir(parents=True, exist_ok=True)
    set_writing(target, need_bytes)
    with folder_lock(target.parent):
        remove_stale(target.parent, target.name, owns)
        mode = check_out(target, step, owns, inputs, force, flag)  # again: a killed run's output may be back
        check_free_space(target, need_bytes)
        stage = make_stage(target.parent, target.name)  # from here on, a second run on this target is refused
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    with folder_lock(target.parent):
        trash = _swap_in(stage, target, owns(target) if mode == "own" else None, carry=mode == "own")
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _swap_in(stage: Path, target: Path, owned: set[str] | None, carry: bool) -> Path | None:
    """Renames only: the old output aside, the stage in, what it does not own carried over. Returns
    the old output's remains to delete (after the lock is released: deleting gigabytes takes time)."""
    with signals_deferred():
        if not target.exists():
            os.replace(stage, target)
            return None
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(stage, target)
        if carry:
            for rel in _carried(old, owned or set()):
                if not (target / rel).exists():
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(old / rel, target / rel)
        trash = target.parent / f".{target.name}.partial-{os.getpid()}-done"
        os.replace(old, trash)
    return trash


def check_free_space(target: Path, need_bytes: int | None) -> None:
    """Refuse before writing a byte when the disk cannot hold the output."""
    if not need_bytes:
        return
    st = os.statvfs(target.parent)
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise VCUError(f"{target}: not enough disk space: the step needs about {human_bytes(need_bytes)}, "
                       f"{human_bytes(free)} are free there", "free some space or pass --out on another disk")


def replace_file_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_step_record(folder: Path, step: str) -> dict | None:
    """The record `step` wrote into a shared folder (compile_sw.json, lm_head.json), or None."""
    path = Path(folder) / f"{step}{STEP_RECORD_SUFFIX}"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("tool") != TOOL or doc.get("step") != step:
        return None
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
        if doc is None or not isinstance(doc.get("files"), list):
            return None
        return {str(f) for f in doc["files"]} | {f"{step}{STEP_RECORD_SUFFIX}"}

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
        return {k: v for k, v in asdict(self).items() if v is not None}


class HashingWriter:
    """A binary file that counts and hashes what is written, for the manifest."""

    def __init__(self, root: Path, rel: str, source: str, **shape):
        self.path = Path(root) / rel
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = DirectWriter(self.path, stage_bytes=1 << 20)  # a packed linear has 32 open at once
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

    def line(self) -> str:
        return f"{self.step}: {self.files} files, {self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s -> {self.out}"


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
