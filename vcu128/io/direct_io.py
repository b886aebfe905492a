"""Unbuffered file I/O (O_DIRECT) for the gigabyte streams of the export steps.

A buffered write or read copies every byte through the kernel's page cache. On the 2-core VM the
export runs on, that copy costs more CPU than the steps' own work (measured, cold cache: 6.7 GB
written buffered in 10-17 s, 8.5-15.5 s of it kernel time; with O_DIRECT in 2.9-3.5 s, 0.3-0.7 s of
kernel time). O_DIRECT moves data between our buffers and the disk directly, but wants buffers,
file offsets and lengths aligned to the disk's block size: so data is staged in aligned buffers,
the last block is padded and the file truncated to its true length. Where the filesystem refuses
O_DIRECT (tmpfs, some network filesystems), the same classes fall back to plain I/O.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

ALIGN = 4096  # a multiple of every disk's logical block size
O_DIRECT = getattr(os, "O_DIRECT", 0)
BUFFERED_FROM_CORES = 8


def _direct_by_default() -> bool:
    """O_DIRECT where the kernel's copy would take the steps' own cores: on fewer than 8 (the 2-core
    VM above). A larger machine has cores to spare for it, and its page cache then lets a step
    finish before the disk does and the next step read the previous one's files from memory
    (bench/results/e2e_*: on the 16-core H200 machine hardware.py read compile_sw's 27 GB from a
    1.6 GB/s disk). VCU128_DIRECT_IO=1 or 0 decides instead."""
    setting = os.environ.get("VCU128_DIRECT_IO", "")
    if setting in ("0", "1"):
        return setting == "1"
    return (os.cpu_count() or 1) < BUFFERED_FROM_CORES


ENABLED = _direct_by_default()


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer whose first byte sits on an ALIGN boundary."""
    raw = np.empty(nbytes + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + nbytes]


def _open(path: Path, flags: int, direct: bool) -> tuple[int, bool]:
    """(fd, is it O_DIRECT): O_DIRECT when asked for and the filesystem takes it."""
    if direct and O_DIRECT and ENABLED:
        try:
            return os.open(path, flags | O_DIRECT, 0o666), True
        except OSError:
            pass
    return os.open(path, flags, 0o666), False


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:  # a write may be short
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as e:
            # Some filesystems accept O_DIRECT at open and refuse it on write: go on buffered.
            if e.errno != errno.EINVAL or not _drop_direct(fd):
                raise
            continue
        view, offset = view[n:], offset + n


def _drop_direct(fd: int) -> bool:
    """Turn O_DIRECT off on an open file; False if it was not on."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & O_DIRECT:
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~O_DIRECT)
    return True


class DirectWriter:
    """A file written front to back: `write(array)` appends its bytes, like `array.tofile(f)`.

    Bytes gather in an aligned staging buffer of `stage_bytes` (a multiple of ALIGN); a full buffer
    is written with one O_DIRECT pwrite, on background threads when `background` (three buffers: two
    written at once, which a disk serves faster than one after the other, while the third fills).
    Closing writes the padded tail and truncates the file to the bytes actually given."""

    def __init__(self, path: Path, stage_bytes: int = 16 << 20, background: bool = False, direct: bool = True):
        assert stage_bytes % ALIGN == 0
        self.path = Path(path)
        self.fd, self.direct = _open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct)
        self.depth = 2 if background else 0  # writes in flight
        self.stages = [aligned_empty(stage_bytes) for _ in range(self.depth + 1)]
        self.pool = ThreadPoolExecutor(self.depth, thread_name_prefix="direct-writer") if background else None
        self.inflight: deque[Future] = deque()
        self.fill = 0  # bytes in the current stage
        self.offset = 0  # file offset of the current stage
        self.closed = False

    def write(self, array, owned: bool = False) -> None:
        """Append the array's bytes. `owned`: the caller gives the array up (it is not changed
        afterwards), so that an array in aligned memory (aligned_empty) is written from where it is,
        without the copy into a stage (for gigabytes, a second of CPU time saved for every 6 GB)."""
        data = np.frombuffer(memoryview(np.ascontiguousarray(array)).cast("B"), np.uint8)
        if owned and self.fill == 0 and (data.ctypes.data % ALIGN == 0 or not self.direct):
            whole = data.size // ALIGN * ALIGN if self.direct else data.size
            if whole:
                self._submit(data[:whole])
                self.offset += whole
                data = data[whole:]
        stage = self.stages[0]
        while data.size:
            n = min(data.size, stage.size - self.fill)
            stage[self.fill : self.fill + n] = data[:n]
            self.fill += n
            data = data[n:]
            if self.fill == stage.size:
                self._flush()
                stage = self.stages[0]

    def _flush(self) -> None:
        stage, nbytes = self.stages[0], self.fill
        length = -(-nbytes // ALIGN) * ALIGN if self.direct else nbytes
        stage[nbytes:length] = 0  # the padding of a final partial block, truncated away on close
        self._submit(stage[:length])
        if self.pool is not None:
            self.stages.append(self.stages.pop(0))  # the next stage: the one submitted longest ago, written by now
        self.offset += nbytes
        self.fill = 0

    def _submit(self, data: np.ndarray) -> None:
        """Write `data` at the current offset: now, or in the background once fewer than `depth`
        writes are in flight (a stage is reused only after two newer writes were submitted, and so
        after its own was waited for)."""
        if self.pool is None:
            _pwrite_all(self.fd, data, self.offset)
            return
        if len(self.inflight) == self.depth:
            self.inflight.popleft().result()
        self.inflight.append(self.pool.submit(_pwrite_all, self.fd, data, self.offset))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.fill:
                self._flush()
            while self.inflight:
                self.inflight.popleft().result()
            if self.direct and self.offset % ALIGN:
                os.ftruncate(self.fd, self.offset)
        finally:
            if self.pool is not None:
                self.pool.shutdown()
            os.close(self.fd)

    def __enter__(self) -> DirectWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_array(path: Path, array) -> None:
    """A small array's bytes as a whole file. (numpy's tofile reports a full disk as a short write
    without an errno; a plain write raises ENOSPC, which the error line names.)"""
    with open(path, "wb") as f:
        f.write(memoryview(np.ascontiguousarray(array)).cast("B"))


def read_bytes(path: Path, offset: int, nbytes: int, direct: bool = True) -> np.ndarray:
    """`nbytes` bytes of a file from `offset`, as uint8: with O_DIRECT, the aligned range around
    them is read into an aligned buffer and the asked-for bytes returned as a view of it."""
    fd, is_direct = _open(path, os.O_RDONLY, direct)  # a str or a Path: os.open takes either
    try:
        start = offset - offset % ALIGN if is_direct else offset
        stop = -(-(offset + nbytes) // ALIGN) * ALIGN if is_direct else offset + nbytes
        buf = aligned_empty(stop - start)
        got = 0
        while got < buf.size:
            try:
                n = os.preadv(fd, [memoryview(buf[got:])], start + got)
            except OSError as e:  # O_DIRECT accepted at open, refused on read: read buffered
                if e.errno != errno.EINVAL or not _drop_direct(fd):
                    raise
                continue
            if n == 0:  # end of file inside the aligned tail
                break
            got += n
        if got < offset - start + nbytes:
            raise EOFError(f"{path}: {nbytes} bytes at {offset} asked for, the file ends at {start + got}")
        return buf[offset - start : offset - start + nbytes]
    finally:
        os.close(fd)
