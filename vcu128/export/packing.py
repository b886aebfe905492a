"""Packing linears into the board's layout (FORMAT.md 3): hardware.py's engine, and the linears packed
before it runs, which it takes where they are what it would pack.

A linear packed ahead (PackedAhead) is packed by a step that has its inputs at hand: compile_sw.py as
it writes each qweight.bin (the ints are in memory then; hardware.py alone would read the 27 GB of a
7B's qweight.bin files back), and quantize.py --compile during GPTQ (every linear, the output layer
too, pipeline.ExportPrewriter). Each is recorded with what it was packed from (`inputs`: the qweight.bin file itself, by
device, inode, size and modification time, which a rename keeps, and the bytes of its scales and bias
files); hardware.py takes it only where its own job reads those very inputs with the same ports and
int4 code, so that the words are the ones it would write, and packs every other linear itself.
On disk (compile_sw.py's) they wait in the compile folder's packed_ahead/, listed in its
packed_ahead.json; hardware.py moves the ones it takes into its folder (docs/FORMAT.md,
"compile/packed_ahead/").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from vcu128.format.checkpoint import check_finite
from vcu128.format.layout import (
    OUT_BIAS_FILE,
    OUT_WEIGHT_STEM,
    BinFile,
    PackedLinearWriter,
    check_int4_range,
    linear_rows,
    pack_bias_words,
    pack_linear_rows,
    row_words,
    rows_per_port,
    sw_linear_paths,
    sw_lm_head_paths,
    sw_qweight_file,
    sw_scales_file,
)
from vcu128.format.model import GROUP_SIZE, LINEARS, ModelDims
from vcu128.io.errors import VCUError, one_line
from vcu128.io.output import (
    FileRecord,
    disk_bytes,
    replace_file_atomically,
    write_whole_file,
)
from vcu128.io.parallel import ordered_map, rows_per_block

log = logging.getLogger("vcu128")
OUTPUT_LAYER = "lm_head"  # the output layer's PackJob name
PACKED_AHEAD_DIR = "packed_ahead"  # in the compile folder
PACKED_AHEAD_INDEX = "packed_ahead.json"
PACKED_AHEAD_KIND = "vcu128 linears packed ahead"


def pack_rows(q: np.ndarray, scales: np.ndarray, int4: str, where: tuple[str, str], first_row: int = 0) -> np.ndarray:
    """The board's rows of signed ints [rows, chin] and their fp16 scales, the ints checked first (a
    strip of rows at a time, so that the check's passes and the packing's find the strip's ints in the
    cache: 1.6 times faster). `where`: the files the ints and scales come from, for the refusals."""
    out = np.empty((q.shape[0], row_words(q.shape[1])), "<u4")
    strip = max(1, (1 << 20) // (4 * q.shape[1]))
    for r in range(0, q.shape[0], strip):
        check_int4_range(q[r : r + strip], where[0], first_row=first_row + r, code=int4)
        out[r : r + strip] = pack_linear_rows(q[r : r + strip], scales[r : r + strip], int4)
    check_finite(where[1], scales, first_row=first_row)
    return out


def pack_offset_words(words: np.ndarray, scales: np.ndarray, where: str, first_row: int = 0) -> np.ndarray:
    """The board's rows, two's-complement code, from words of q + 8 nibbles [rows, chin/8] (GPTQ's,
    checkpoint.offset_words): each nibble with its top bit flipped (layout._OFFSET_BYTES' rule), on
    whole words. Every offset nibble 0..15 is an int of -8..7: only the scales (from `where`) are checked."""
    check_finite(where, scales, first_row=first_row)
    return linear_rows(np.bitwise_xor(words, np.uint32(0x88888888)), scales)


def bias_words_file(root: Path, rel: str, bias: np.ndarray, name: str, where: str) -> FileRecord:
    """A linear's bias words (FORMAT.md 3.2), its fp16 bias checked first."""
    check_finite(where, bias)
    return write_whole_file(root, rel, pack_bias_words(bias), f"{name}.bias", rows=bias.shape[0], words_per_row=1)


def input_identity(qweight: Path, scales: bytes, bias: bytes | None) -> tuple:
    """What a packed linear follows from: its qweight.bin, the file itself (device, inode, size and
    modification time, which a rename keeps), and the bytes of its scales and bias files."""
    st = Path(qweight).stat()
    digest = lambda data: None if data is None else hashlib.sha256(data).hexdigest()  # noqa: E731
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, digest(scales), digest(bias)


class PackJob:
    """One packed linear: its checked input files and where its words go."""

    def __init__(self, name: str, qweight: BinFile, scales: BinFile, bias: BinFile | None, stem: str, bias_file: str):
        self.name, self.qweight, self.scales, self.bias = name, qweight, scales, bias
        self.stem, self.bias_file = stem, bias_file
        self.chout, self.chin = qweight.shape

    def run(self, root: Path, ports: int, int4: str = "twos") -> list[FileRecord]:
        return pack_jobs([self], root, ports, int4)[0]

    def inputs(self) -> tuple:
        """input_identity of its input files."""
        return input_identity(self.qweight.path, self.scales.path.read_bytes(), self.bias.path.read_bytes() if self.bias else None)

    def blocks(self, ports: int) -> list[tuple[int, int]]:
        """(start, stop) of its blocks of rows, about 16 MB of ints each (a size the allocator reuses;
        a buffer of 32 MB is new memory every time, zeroed by the kernel), starting at multiples of
        `ports`."""
        step = rows_per_block(8 * self.chin, multiple=ports)
        return [(start, min(start + step, self.chout)) for start in range(0, self.chout, step)]

    def read_block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.qweight.read_rows(start, stop), self.scales.read_rows(start, stop)

    def pack_block(self, start: int, q: np.ndarray, scales: np.ndarray, int4: str) -> np.ndarray:
        return pack_rows(q, scales, int4, (str(self.qweight.path), str(self.scales.path)), first_row=start)

    def finish(self, root: Path, writer: PackedLinearWriter) -> list[FileRecord]:
        """Its port files closed, and its bias words written."""
        records = writer.close()
        bias = self.bias.read() if self.bias else np.zeros(self.chout, "<f2")
        records.append(bias_words_file(root, self.bias_file, bias, self.name, str(self.bias.path if self.bias else self.name)))
        return records


def pack_jobs(jobs: list[PackJob], root: Path, ports: int, int4: str = "twos", done=None) -> list[list[FileRecord]]:
    """Every job's files: each job's records, in job order (the manifest reads the same whatever the timing).

    One stream of blocks through all the jobs, so that no linear starts or ends with the disk idle:
    the int32 rows (4 bytes a weight) are read ahead on threads of their own, checked, packed and
    placed in their linear's port files on the worker threads (each linear's files gather in memory,
    half a byte a weight), and each linear's files are hashed and written whole on threads of their
    own while the next linears' blocks flow. `done(i)` is called, in order, as job i's files are
    complete (the progress bar)."""
    writers: dict[int, PackedLinearWriter] = {}
    last = {i: job.blocks(ports)[-1][0] for i, job in enumerate(jobs)}

    def blocks():
        for i, job in enumerate(jobs):
            writers[i] = PackedLinearWriter(root, job.stem, job.chin, job.chout, ports, source=job.name)
            for start, stop in job.blocks(ports):
                yield i, start, stop

    def read(block):
        i, start, stop = block
        return (i, start, *jobs[i].read_block(start, stop))

    def pack(block):
        i, start, q, scales = block
        writers[i].place(start, jobs[i].pack_block(start, q, scales, int4))
        return i, start

    records: list[list[FileRecord]] = []
    finishing: deque = deque()

    def collect(keep: int) -> None:
        """The records of finished jobs, in order, waiting until at most `keep` are left unfinished."""
        while finishing and (len(finishing) > keep or finishing[0][1].done()):
            i, future = finishing.popleft()
            records.append(future.result())
            if done is not None:
                done(i)

    # A linear's files are small (32 of them, 30 kB to 9 MB each), each written in one synchronous
    # write: a few linears are written at once, so that the disk has several writes to work on.
    writing = 4
    with ThreadPoolExecutor(writing, thread_name_prefix="pack-finish") as closer:
        for i, start in ordered_map(pack, ordered_map(read, blocks(), ahead=6, workers=4)):
            if start == last[i]:  # every block of job i is placed (results come in order)
                finishing.append((i, closer.submit(jobs[i].finish, root, writers.pop(i))))
                collect(keep=writing)
        collect(keep=0)
    return records


def linear_job(compile_dir: Path, name: str, chin: int, chout: int, stems: tuple[str, str], software: str = "qwen2") -> PackJob:
    paths = sw_linear_paths(compile_dir, name, software)
    return PackJob(
        name,
        sw_qweight_file(paths["qweight"], chout, chin),
        sw_scales_file(paths["scales"], chout, chin),
        BinFile(paths["bias"], "<f2", (chout,)),
        *stems,
    )


def output_layer_job(compile_dir: Path, dims: ModelDims) -> PackJob:
    lm = sw_lm_head_paths(compile_dir, dims.family.software)
    if not lm["qweight"].is_file():
        raise VCUError(f"{lm['qweight']}: missing (run lm_head.py first)")
    return PackJob(
        OUTPUT_LAYER,
        sw_qweight_file(lm["qweight"], dims.vocab, dims.hidden),
        sw_scales_file(lm["scales"], dims.vocab, dims.hidden),
        None,  # the output layer has no bias: its bias words are 0x3C000000
        OUT_WEIGHT_STEM,
        OUT_BIAS_FILE,
    )


@dataclass
class PackedAhead:
    """Linears packed before hardware.py runs: each one's files under `root`, at the paths its records
    name, and what it was packed from (input_identity). pack_hardware takes a linear's files only
    where its own job reads those very inputs, with the same ports and int4 code: the words are then
    the ones it would write."""

    root: Path
    ports: int
    int4: str
    linears: dict[str, tuple[tuple, list[FileRecord]]] = field(default_factory=dict)  # name: (inputs, records)
    on_disk: bool = False  # loaded from packed_ahead.json: what hardware.py takes leaves its list
    _finishing: list = field(default_factory=list, repr=False)  # LinearPacker.finish's work, on _pool
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    @contextlib.contextmanager
    def writing(cls, root: Path, ports: int, int4: str) -> Iterator[PackedAhead]:
        """A PackedAhead that LinearPackers fill (compile_sw.py); at the end of the block its linears'
        files are written and packed_ahead.json lists them. Where the block fails, no thread writes
        into `root` once it is left."""
        ahead = cls(Path(root), ports, int4)
        try:
            yield ahead
        except BaseException:
            if ahead._pool is not None:
                ahead._pool.shutdown(wait=True, cancel_futures=True)
            raise
        try:
            for future in ahead._finishing:
                future.result()
        finally:
            if ahead._pool is not None:
                ahead._pool.shutdown(wait=True, cancel_futures=True)
        ahead.save()

    def finish_later(self, fn, *args) -> None:
        """fn(*args) on a thread of its own (two at the most): a linear's port files are written and
        hashed while the next linears' ints flow."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="pack-ahead-finish")
            self._finishing.append(self._pool.submit(fn, *args))

    def pack(self, jobs: list[PackJob]) -> None:
        for job, records in zip(jobs, pack_jobs(jobs, self.root, self.ports, self.int4), strict=True):
            self.linears[job.name] = (job.inputs(), records)

    def add(self, name: str, inputs: tuple, records: list[FileRecord]) -> None:
        self.linears[name] = (inputs, records)

    def adoptable(self, jobs: list[PackJob], ports: int, int4: str, out: Path) -> dict[int, list[FileRecord]]:
        """{index in `jobs`: records} of the jobs packed here from their very inputs, with `ports` and
        `int4`, whose files are all here at their sizes, where they can be renamed into `out` (the same
        filesystem)."""
        if not self.linears or (self.ports, self.int4) != (ports, int4) or device_of(out) != device_of(self.root):
            return {}
        found = {}
        for i, job in enumerate(jobs):
            inputs, records = self.linears.get(job.name, (None, []))
            if inputs is not None and inputs == job.inputs() and all(self._whole(r) for r in records):
                found[i] = records
        return found

    def _whole(self, record: FileRecord) -> bool:
        """Its file is here, a plain file of its size, inside the folder once links are resolved (a
        folder linked to elsewhere in packed_ahead/ is never taken from)."""
        path = self.root / record.path
        inside = os.path.realpath(path).startswith(os.path.realpath(self.root) + os.sep)
        return inside and not path.is_symlink() and path.is_file() and path.stat().st_size == record.bytes

    def adopt(self, found: dict[int, list[FileRecord]], stage: Path) -> dict[int, list[FileRecord]]:
        """Move the files of `found` (adoptable's) into `stage`: {index: records} of the jobs moved
        whole. Where a file will not move, nothing more is taken (that job's files moved so far go back):
        pack_hardware packs the rest itself."""
        adopted = {}
        for i, records in found.items():
            moved = []
            try:
                for r in records:
                    (stage / r.path).parent.mkdir(parents=True, exist_ok=True)
                    os.rename(self.root / r.path, stage / r.path)
                    moved.append(r.path)
            except OSError as e:
                for rel in moved:
                    os.rename(stage / rel, self.root / rel)
                log.warning(one_line(f"warning: the board's files packed ahead in {self.root} could not be moved into place ({e}); "
                                     "hardware packs the rest itself"))
                break
            adopted[i] = records
        return adopted

    def give_back(self, adopted: dict[int, list[FileRecord]], stage: Path) -> None:
        """The files `adopt` moved into `stage` moved back (the step failed: its stage goes)."""
        for records in adopted.values():
            for r in records:
                with contextlib.suppress(OSError):
                    os.rename(stage / r.path, self.root / r.path)

    @contextlib.contextmanager
    def taken(self, found: dict[int, list[FileRecord]], stage: Path) -> Iterator[dict[int, list[FileRecord]]]:
        """adopt(found, stage) for the block, given back where the block fails."""
        adopted = self.adopt(found, stage) if found else {}
        try:
            yield adopted
        except BaseException:
            self.give_back(adopted, stage)
            raise

    # -- on disk: the compile folder's packed_ahead/ (compile_sw.py writes it, hardware.py takes from it)

    def save(self) -> None:
        """packed_ahead.json: the ports, the int4 code, and each linear's inputs and files."""
        doc = {"kind": PACKED_AHEAD_KIND, "ports": self.ports, "int4": self.int4,
               "linears": {name: {"inputs": list(inputs), "files": [r.to_json() for r in records]}
                           for name, (inputs, records) in sorted(self.linears.items())}}
        self.root.mkdir(parents=True, exist_ok=True)
        replace_file_atomically(self.root / PACKED_AHEAD_INDEX, (json.dumps(doc, indent=1) + "\n").encode())

    @classmethod
    def load(cls, root: Path) -> PackedAhead | None:
        """The linears a step packed ahead into `root`, or None where it holds no list. A list that
        cannot be read is said in one warning and not used: hardware.py then packs everything."""
        path = Path(root) / PACKED_AHEAD_INDEX
        if Path(root).is_symlink() or not path.is_file():  # a link to elsewhere is never taken from, nor tidied
            return None
        try:
            doc = json.loads(path.read_bytes())
            if doc.get("kind") != PACKED_AHEAD_KIND:
                raise ValueError(f"kind is not {PACKED_AHEAD_KIND!r}")
            linears = {name: (tuple(entry["inputs"]), [FileRecord(**f) for f in entry["files"]]) for name, entry in doc["linears"].items()}
            for _, records in linears.values():
                for r in records:
                    if Path(r.path).is_absolute() or ".." in Path(r.path).parts:
                        raise ValueError(f"file {r.path!r} is not inside the folder")
            return cls(Path(root), int(doc["ports"]), str(doc["int4"]), linears, on_disk=True)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning(one_line(f"warning: {path}: not a list of linears packed ahead ({e}); hardware packs every linear itself"))
            return None

    @staticmethod
    def files_listed(root: Path) -> set[str]:
        """The files packed_ahead.json in `root` lists, and itself (relative to `root`); none where
        there is no such list (or `root` is a link: not this step's folder)."""
        if Path(root).is_symlink():
            return set()
        try:
            doc = json.loads((Path(root) / PACKED_AHEAD_INDEX).read_bytes())
            return {PACKED_AHEAD_INDEX} | {f["path"] for entry in doc["linears"].values() for f in entry["files"] if isinstance(f["path"], str)}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return set()

    def settle(self, taken: list[str]) -> None:
        """After hardware.py took the linears `taken`: the list names the rest (those with a file still
        here: what compile_sw.py owns), and the folders they emptied go; with nothing left, the list
        goes too, and the folder."""
        if not self.on_disk:
            return
        self.linears = {name: entry for name, entry in self.linears.items()
                        if name not in taken and any((self.root / r.path).exists() for r in entry[1])}
        if self.linears:
            self.save()
            log.info(f"hardware: {len(self.linears)} linears packed ahead in {self.root} were not taken (packed from other inputs, "
                     "or for other ports or another int4 code); compile_sw.py replaces them when it runs again")
        else:
            (self.root / PACKED_AHEAD_INDEX).unlink(missing_ok=True)
        for folder in sorted((p for p in self.root.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)):
            remove_if_empty(folder)
        remove_if_empty(self.root)


def remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


class LinearPacker:
    """One linear packed for the board from the ints a step has in memory as it writes them to
    qweight.bin (compile_sw.py): `rows` is called with each block of them (from any
    thread; blocks start at multiples of the ports), `finish` once the file is written. A linear whose
    ints or scales hardware.py would refuse is left out: hardware.py packs it, and refuses it there.
    `bias`: the bytes of its bias.bin (None: the output layer, which has no bias file)."""

    def __init__(self, ahead: PackedAhead, name: str, stems: tuple[str, str], scales: np.ndarray, bias: np.ndarray | None, where: tuple[str, str]):
        self.ahead, self.name, self.stem, self.bias_file = ahead, name, *stems
        self.scales, self.bias, self.where = scales, bias, where
        chout, groups = scales.shape
        self.writer = PackedLinearWriter(ahead.root, self.stem, groups * GROUP_SIZE, chout, ahead.ports, source=name)
        self.failed = False

    def rows(self, start: int, q: np.ndarray, offset_words: np.ndarray | None = None) -> None:
        """Rows start.. of its ints q; `offset_words`: the same as GPTQ stores them (q + 8 nibbles,
        checkpoint.offset_words), from which two's-complement words are one XOR away."""
        if self.failed:
            return
        scales = self.scales[start : start + q.shape[0]]
        try:
            if offset_words is not None and self.ahead.int4 == "twos":
                self.writer.place(start, pack_offset_words(offset_words, scales, self.where[1], first_row=start))
            else:
                self.writer.place(start, pack_rows(q, scales, self.ahead.int4, self.where, first_row=start))
        except VCUError:
            self.failed = True

    def finish(self, qweight: Path) -> None:
        """Once `qweight` is whole: its files written (port files and bias words) and listed with its
        inputs, on a thread of the PackedAhead's (PackedAhead.writing waits for it)."""
        if not self.failed:
            self.ahead.finish_later(self._finish, qweight)

    def _finish(self, qweight: Path) -> None:
        """Its files, and its entry: `qweight`'s identity and the bytes of its scales and bias files
        (the arrays given)."""
        bias = np.zeros(self.scales.shape[0], "<f2") if self.bias is None else self.bias
        if not np.isfinite(bias).all():  # hardware.py refuses it (checked before any file is written: none is left unlisted)
            return
        records = self.writer.close()
        records.append(bias_words_file(self.ahead.root, self.bias_file, bias, self.name, self.name))
        scales = np.ascontiguousarray(self.scales, "<f2").tobytes()
        self.ahead.add(self.name, input_identity(qweight, scales, None if self.bias is None else np.ascontiguousarray(bias, "<f2").tobytes()), records)


def packed_linear_bytes(dims: ModelDims, ports: int, layers: bool = True, output_layer: bool = True) -> int:
    """The disk the board's files of a model's linears take (port files and bias words)."""
    shapes = ([dims.linear_shape(lin) for lin in LINEARS] * dims.num_layers if layers else []) + ([(dims.hidden, dims.vocab)] if output_layer else [])
    return sum(ports * disk_bytes(rows_per_port(chout, ports) * row_words(chin) * 4) + disk_bytes(4 * chout) for chin, chout in shapes)


def device_of(path: Path) -> int:
    """The filesystem `path` is on, or would be made on."""
    return os.stat(nearest_existing(path)).st_dev


def free_bytes(path: Path) -> int:
    """Free space on the disk `path` is on, or would be made on."""
    st = os.statvfs(nearest_existing(path))
    return st.f_bavail * st.f_frsize


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest existing folder."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
