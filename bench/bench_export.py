#!/usr/bin/env python3
"""Benchmark the export steps on a synthetic checkpoint of Qwen2-7B's shape.

Builds the checkpoint (random ints and scales in GPTQ layout), then runs compile_sw, lm_head,
hardware, embedding_tokens and verify's bit check, each as its own process so its peak RSS is its own. Each step is
timed until its bytes are on disk (sync), and so are two baselines: the same number of bytes written
with plain numpy in 32 MB blocks (through the page cache), and written unbuffered (O_DIRECT, as the
steps themselves write), in the same run. Run as root, the page cache is emptied before each
step and each baseline, so that they start alike. Prints a Markdown table.

    python bench/bench_export.py                 # one decoder layer (about 5 GB written)
    python bench/bench_export.py --layers 28     # the whole 7B model (about 40 GB of free disk)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vcu128.format.synthetic import QWEN2_7B, SyntheticSpec  # noqa: E402
from vcu128.io.direct_io import ALIGN, O_DIRECT, aligned_empty, read_bytes  # noqa: E402
from vcu128.io.output import folder_stats  # noqa: E402


def drop_page_cache() -> bool:
    """Flush and empty the page cache (root only), so that a step and its baseline start alike: without
    it, whichever runs second inherits the first one's gigabytes of cached output and pays for evicting
    them, and the ratio swings 2x from run to run on a small VM."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_step(args: list[str]) -> tuple[float, int]:
    """(seconds until the output is synced, peak RSS in bytes) of one step run as a child process."""
    drop_page_cache()
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    os.sync()
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step failed: {' '.join(args)}")
    return seconds, usage.ru_maxrss * 1024


def raw_write_seconds(nbytes: int, folder: Path, direct: bool = False) -> float:
    """Write `nbytes` in 32 MB blocks and sync: plain numpy `tofile` (through the page cache), or
    with `direct` unbuffered O_DIRECT pwrites of one aligned block, the fastest way to the disk."""
    block = aligned_empty(32 << 20)
    block[:] = 1
    path = folder / "raw_write.bin"
    drop_page_cache()
    start = time.perf_counter()
    if direct:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_DIRECT, 0o644)
        for offset in range(0, nbytes, block.size):
            os.pwrite(fd, block[: -(-min(block.size, nbytes - offset) // ALIGN) * ALIGN], offset)
        os.close(fd)
    else:
        with open(path, "wb") as f:
            for offset in range(0, nbytes, block.size):
                block[: min(block.size, nbytes - offset)].tofile(f)
    os.sync()
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def raw_read_seconds(paths: list[Path], direct: bool = False) -> float:
    """Read every file under `paths` in 32 MB blocks (the baseline of a step that only reads):
    plain Python reads, or with `direct` unbuffered O_DIRECT reads."""
    drop_page_cache()
    start = time.perf_counter()
    for p in paths:
        for f in [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()):
            if direct:
                size = f.stat().st_size
                for offset in range(0, size, 32 << 20):
                    read_bytes(f, offset, min(32 << 20, size - offset))
            else:
                with open(f, "rb") as fh:
                    while fh.read(32 << 20):
                        pass
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1, help="decoder layers (28 = the whole 7B model)")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out", help="scratch folder (removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args()

    spec = SyntheticSpec(**{**QWEN2_7B, "num_layers": args.layers})
    # checkpoint + software files (4 bytes a weight) + packed files (compile_sw's packed ahead, then
    # hardware's), with room to spare
    weights = args.layers * 233_000_000 + 2 * 545_000_000
    need = int(weights * (0.5 + 4 + 0.6) * 1.1)
    args.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    if free < need:
        raise SystemExit(f"{args.work}: {free / 1e9:.1f} GB free, this run needs about {need / 1e9:.0f} GB")
    qdir = args.work / "qwen2-7b-shape-W4A16-gptq"
    shutil.rmtree(qdir, ignore_errors=True)
    # Built in a child: a child's peak RSS starts from its parent's, so the parent stays small.
    seconds, _ = run_step(["-c", f"from vcu128.format.synthetic import *; write_gptq_checkpoint({str(qdir)!r}, {spec!r})"])
    print(f"synthetic checkpoint: {args.layers} layer(s) of Qwen2-7B shape in {seconds:.1f} s", file=sys.stderr)

    comp = qdir / "compile"
    hw = comp / "QWEN_BLOCK_write_data_port32"
    steps = [
        ("compile_sw", ["compile_sw.py", "--quantize_model", str(qdir)], [comp]),
        ("lm_head (rtn)", ["lm_head.py", "--quantize_model", str(qdir)], [comp / "qwen2_qweight_bin" / "lm_head_qweight.bin", comp / "qwen2_qweight_bin" / "lm_head_scales.bin"]),
        ("hardware", ["hardware.py", "--compile_dir", str(comp)], [hw]),
        ("embedding_tokens", ["embedding_tokens.py", "--compile_dir", str(comp)], [hw / "Embedding"]),
        ("verify (bit check)", ["verify.py", "--quantize_model", str(qdir), "--hardware_dir", str(hw), "--bits_only"], [hw]),
    ]
    runs = []
    for name, cmd, outputs in steps:
        before = folder_stats(outputs)[1] if name == "hardware" else 0
        seconds, rss = run_step(cmd)
        nbytes = folder_stats(outputs)[1]
        if name == "hardware":
            nbytes -= before
        # verify reads the packed folder (and the checkpoint): its baseline is a plain read, while they are there
        raw = [raw_read_seconds(outputs, direct) for direct in (False, True)] if name.startswith("verify") else None
        runs.append((name, seconds, nbytes, rss, raw))
    # The write baselines once the outputs are gone: the disk holds one of them at a time, not the
    # outputs and a copy of compile_sw's 30 GB as well
    shutil.rmtree(qdir, ignore_errors=True)
    rows = [(name, seconds, nbytes, rss, *(raw or [raw_write_seconds(nbytes, args.work, direct) for direct in (False, True)]))
            for name, seconds, nbytes, rss, raw in runs]

    cache = "page cache emptied before each step and baseline" if drop_page_cache() else "page cache NOT emptied (not root): expect noise"
    print(f"\nQwen2-7B shape, {args.layers} layer(s); {platform.node()}: {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, Python {platform.python_version()}, numpy {np.__version__}; {cache}\n")
    print("| step | seconds | GB written (verify: GB checked) | GB/s | peak RSS (GB) "
          "| plain write of the same bytes (verify: read) (s) | ratio | unbuffered write (verify: read) (s) | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    tot = [0.0, 0, 0, 0.0, 0.0]
    for name, s, b, rss, plain, direct in rows:
        print(f"| {name} | {s:.1f} | {b / 1e9:.2f} | {b / 1e9 / s:.2f} | {rss / 1e9:.2f} | {plain:.1f} | {s / plain:.2f} | {direct:.1f} | {s / direct:.2f} |")
        if not name.startswith("verify"):
            tot = [tot[0] + s, tot[1] + b, max(tot[2], rss), tot[3] + plain, tot[4] + direct]
    print(f"| **the four export steps** | {tot[0]:.1f} | {tot[1] / 1e9:.2f} | {tot[1] / 1e9 / tot[0]:.2f} | {tot[2] / 1e9:.2f} "
          f"| {tot[3]:.1f} | {tot[0] / tot[3]:.2f} | {tot[4]:.1f} | {tot[0] / tot[4]:.2f} |")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
