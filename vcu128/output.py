"""Writing outputs safely: a staging folder renamed into place, files hashed as they are written,
and the manifest that lists every file of a packed folder (name, bytes, sha256, source, shape)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import __version__
from .direct_io import DirectWriter, read_bytes
from .errors import VCUError

MANIFEST_NAME = "manifest.json"


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success it replaces `target`, on any error it is
    removed, so a failed step leaves nothing behind (and an older good output stays as it was)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(stage, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def replace_file_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


@dataclass
class Manifest:
    kind: str  # "hardware" or "embedding"
    model: dict
    params: dict
    files: list[FileRecord] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "tool": "compiler-vcu128",
            "version": __version__,
            "format": "FORMAT.md",
            "kind": self.kind,
            "model": self.model,
            **self.params,
            "files": [f.to_json() for f in self.files],
        }

    def write(self, folder: Path) -> None:
        replace_file_atomically(Path(folder) / MANIFEST_NAME, (json.dumps(self.to_json(), indent=1) + "\n").encode())


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise VCUError(f"{path}: no manifest (was this folder written by hardware.py?)")
    return json.loads(path.read_text())


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

    def line(self) -> str:
        return f"{self.step}: {self.files} files, {self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s -> {self.out}"


def folder_stats(paths: list[Path]) -> tuple[int, int]:
    """(files, bytes) under the given files and folders."""
    files = total = 0
    for p in map(Path, paths):
        for f in [p] if p.is_file() else (x for x in p.rglob("*") if x.is_file()):
            files += 1
            total += f.stat().st_size
    return files, total
