"""vcu128/io/direct_io.py: O_DIRECT writes and reads give back exactly the bytes, aligned or not."""

import numpy as np
import pytest

from vcu128.io.direct_io import ALIGN, DirectWriter, aligned_empty, read_bytes


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("background", [True, False])
def test_writer_appends_exactly_the_bytes(tmp_path, direct, background):
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in (1, 4095, 4096, 10000, 3, 20000, 0, 8192)]
    pieces.append(rng.integers(-8, 8, (7, 33), dtype=np.int32))  # any array, written as its bytes
    path = tmp_path / "f.bin"
    with DirectWriter(path, stage_bytes=2 * ALIGN, background=background, direct=direct) as w:
        for p in pieces:
            w.write(p)
    assert w.direct <= direct  # direct=False is the plain-I/O path (the fallback where O_DIRECT is refused)
    want = b"".join(p.tobytes() for p in pieces)
    assert path.stat().st_size == len(want) and path.read_bytes() == want


def test_writer_of_whole_stages_needs_no_truncation(tmp_path):
    data = np.arange(4 * ALIGN, dtype=np.uint8)
    with DirectWriter(tmp_path / "f.bin", stage_bytes=ALIGN) as w:
        w.write(data)
    assert (tmp_path / "f.bin").read_bytes() == data.tobytes()


@pytest.mark.parametrize("direct", [True, False])
def test_read_bytes_at_any_offset(tmp_path, direct):
    data = np.random.default_rng(1).integers(0, 256, 3 * ALIGN + 123, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    for offset, n in [(0, len(data)), (1, 10), (ALIGN - 1, 2), (ALIGN, ALIGN), (5000, len(data) - 5000), (len(data), 0)]:
        got = read_bytes(path, offset, n, direct=direct)
        assert got.dtype == np.uint8 and got.tobytes() == data[offset : offset + n], (offset, n)
    with pytest.raises(EOFError, match=f"f.bin: 10 bytes at {len(data) - 5} asked for, the file ends at {len(data)}"):
        read_bytes(path, len(data) - 5, 10, direct=direct)


def test_aligned_buffers():
    for n in (1, ALIGN, 3 * ALIGN + 7):
        b = aligned_empty(n)
        assert b.size == n and b.ctypes.data % ALIGN == 0


def test_a_filesystem_that_refuses_direct_writes_gets_buffered_ones(tmp_path, monkeypatch):
    import errno
    import os

    import vcu128.io.direct_io as dio

    real = os.pwrite
    calls = []

    def refuse_direct(fd, data, offset):  # as some filesystems do: O_DIRECT accepted at open, EINVAL on write
        calls.append(offset)
        if dio.fcntl.fcntl(fd, dio.fcntl.F_GETFL) & dio.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(dio.os, "pwrite", refuse_direct)
    data = np.arange(3 * ALIGN + 5, dtype=np.uint8)
    with DirectWriter(tmp_path / "f.bin", stage_bytes=ALIGN) as w:
        w.write(data)
    assert (tmp_path / "f.bin").read_bytes() == data.tobytes() and len(calls) > 4


@pytest.mark.parametrize("direct", [True, False])
def test_owned_arrays_are_written_where_they_are(tmp_path, direct):
    """write(owned=True): an array in aligned memory is written from there (no copy), its whole pages
    at once and the rest staged; unaligned ones and ones after a staged tail go through the stage.
    Two writes are in flight at a time: every byte lands where it belongs."""
    rng = np.random.default_rng(6)

    def aligned(n):
        a = aligned_empty(n)
        a[:] = rng.integers(0, 256, n, dtype=np.uint8)
        return a

    pieces = [aligned(3 * ALIGN), aligned(ALIGN), aligned(2 * ALIGN + 100), aligned(ALIGN), rng.integers(0, 256, 5000, dtype=np.uint8),
              aligned(5 * ALIGN), aligned(7 * ALIGN)]
    path = tmp_path / "f.bin"
    with DirectWriter(path, stage_bytes=2 * ALIGN, background=True, direct=direct) as w:
        for p in pieces:
            w.write(p, owned=True)
    want = b"".join(p.tobytes() for p in pieces)
    assert path.stat().st_size == len(want) and path.read_bytes() == want
