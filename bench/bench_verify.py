#!/usr/bin/env python3
"""Benchmark verify.py (bit check + streamed functional check, its defaults) on a synthetic
checkpoint of Qwen2-7B's shape (hidden 3584, intermediate 18944, vocab 152064, no tokenizer, so the
functional check runs on seeded ids), exported with the four steps first (not timed).

Each verify runs as its own process: wall seconds and peak RSS are its own. Several layer counts show
how memory grows with the model (the goal: one compact int4 copy, about 0.12 GB, a layer).

    python bench/bench_verify.py --layers 2 4            # a few minutes, about 6 GB of disk
    python bench/bench_verify.py --layers 28 --json bench/results/verify_cpu_28L.json   # about 40 GB of disk

`--existing QDIR` times verify alone on a checkpoint already exported (its compile/QWEN_BLOCK_write_data_port32),
e.g. the one `bench/bench_e2e.py --keep` leaves, and prints verify's phases as bench_e2e.py does (start-up, each
check, the functional check's parts); `--repeat N` runs it N times, `--side_by_side 0 1` once each way
(VCU128_VERIFY_SIDE_BY_SIDE; default: by the device). On the GPU machine, after
`python bench/bench_e2e.py --layers 28 --device cuda:0 --keep`:

    python bench/bench_verify.py --existing bench/out/e2e/model-qwen2-7b-28L-W4A16-gptq --side_by_side 1 0 --verify_args --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_e2e import run_command, verify_phases  # noqa: E402
from vcu128.export.pipeline import export_all  # noqa: E402
from vcu128.format.synthetic import QWEN2_7B, SyntheticSpec, write_gptq_checkpoint  # noqa: E402


def run_verify(qdir: Path, hw: Path, extra: list[str]) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "verify.py"), "--quantize_model", str(qdir), "--hardware_dir", str(hw), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    report = json.loads((hw.parent / "verify_report.json").read_text())
    return {"seconds": seconds, "exit_code": proc.returncode, "log_tail": out.splitlines()[-12:],
            "bit_check_seconds": report["bit_check"]["seconds"],
            "functional_seconds": report.get("functional", {}).get("seconds"),
            "functional_ok": report.get("functional", {}).get("ok"),
            "top1_agreement": report.get("functional", {}).get("against_hardware", {}).get("checkpoint", {}).get("top1_agreement")}


def peak_rss(qdir: Path, hw: Path, extra: list[str]) -> tuple[dict, float]:
    """Run verify and read its peak RSS: children's ru_maxrss is the largest of any child so far, so
    layer counts go smallest first."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = run_verify(qdir, hw, extra)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return result, max(after, before) * 1024 / 1e9


def time_existing(qdir: Path, hw: Path, extra: list[str], modes: list[str], repeat: int) -> list[dict]:
    """verify on a folder already made, as a user runs it (its own process, from the shell), `repeat`
    times in each of `modes` (VCU128_VERIFY_SIDE_BY_SIDE: '' by the device, '0', '1'); its phases each time."""
    rows = []
    for mode in modes:
        for i in range(repeat):
            os.environ["VCU128_VERIFY_SIDE_BY_SIDE"] = mode
            run = run_command(f"verify (side by side: {mode or 'by device'}, run {i + 1})",
                              ["verify.py", "--quantize_model", str(qdir), "--hardware_dir", str(hw), *extra], sys.stderr)
            report = json.loads((hw.parent / "verify_report.json").read_text())
            phases = verify_phases(run, report)
            print(f"\n{run['name']}: exit {run['exit_code']}, {run['seconds']:.1f} s, CPU {run['cpu_seconds']:.1f} s, "
                  f"peak RSS {run['peak_rss_gb']:.2f} GB, disk read {run['disk_read_gb']:.2f} GB")
            print("| phase | seconds |\n| --- | ---: |")
            for name, seconds in phases:
                print(f"| {name} | {seconds:.1f} |")
            rows.append({k: v for k, v in run.items() if k != "lines"} | {"phases": [{"phase": n, "seconds": round(s, 2)} for n, s in phases],
                                                                       "timeline": report.get("timeline"), "log": run["lines"]})
    os.environ.pop("VCU128_VERIFY_SIDE_BY_SIDE", None)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--work", default=str(ROOT / "bench" / "out"), help="scratch folder (removed per layer count)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--existing", type=Path, metavar="QDIR", help="time verify alone on this exported checkpoint (nothing is built or removed)")
    p.add_argument("--hw", type=Path, help="with --existing: the packed folder (default QDIR/compile/QWEN_BLOCK_write_data_port32)")
    p.add_argument("--repeat", type=int, default=1, help="with --existing: runs of each mode")
    p.add_argument("--side_by_side", nargs="+", choices=("auto", "0", "1"), default=["auto"],
                   help="with --existing: the modes to run (auto: by the device)")
    p.add_argument("--verify_args", nargs=argparse.REMAINDER, default=[], help="extra verify.py arguments")
    args = p.parse_args()
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    if args.existing:
        hw = args.hw or args.existing / "compile" / "QWEN_BLOCK_write_data_port32"
        modes = ["" if m == "auto" else m for m in args.side_by_side]
        rows = time_existing(args.existing, hw, args.verify_args, modes, args.repeat)
        if args.json:
            doc = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "checkpoint": str(args.existing), "runs": rows}
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        return
    rows = []
    for layers in args.layers:
        work = Path(args.work) / f"verify_{layers}L"
        shutil.rmtree(work, ignore_errors=True)
        spec = SyntheticSpec(**{**QWEN2_7B, "num_layers": layers}, seed=0)
        t = time.perf_counter()
        qdir = write_gptq_checkpoint(work / "q", spec)
        exp = export_all(qdir, progress=False)
        prep = time.perf_counter() - t
        result, rss = peak_rss(qdir, exp["hw"], args.verify_args)
        rows.append({"layers": layers, "peak_rss_gb": rss, "prepare_seconds": prep, **result})
        print(f"{layers} layers: verify {result['seconds']:.1f} s (bit check {result['bit_check_seconds']:.1f} s, functional "
              f"{result['functional_seconds']:.1f} s), peak RSS {rss:.2f} GB, exit {result['exit_code']}", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    print("\n| layers | verify (s) | bit check (s) | functional (s) | peak RSS (GB) | exit |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['layers']} | {r['seconds']:.1f} | {r['bit_check_seconds']:.1f} | {r['functional_seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['exit_code']} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"\npeak RSS grows {(b['peak_rss_gb'] - a['peak_rss_gb']) / (b['layers'] - a['layers']):.3f} GB a layer")
    doc = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "shape": QWEN2_7B, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
