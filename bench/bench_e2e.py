#!/usr/bin/env python3
"""End to end, as a user runs it: `quantize.py --compile` then `verify.py`, each started from the
shell with its defaults, on a random HF model of Qwen2-7B's shape built here (nothing is downloaded).

Wall clock of each command, and a timeline by phase from the lines the steps print (each line is
time-stamped as it arrives): start-up before GPTQ, GPTQ's own parts (its `quantize: setup ...` line),
the quality report, compile_sw, lm_head, hardware, embedding_tokens, then verify's start-up, bit check
and functional check (its verify_report.json). Prints a table and writes
bench/results/e2e_<machine>_<layers>L.json.

On the GPU machine (one line; about 2 minutes, 45 GB of disk and the 15 GB model in memory for 28 layers):

    python bench/bench_e2e.py --layers 28 --device cuda:0 --model_in /dev/shm/e2e --pycache /tmp/pyc --fingerprint e2e.sha256

`--export_only` starts from a synthetic GPTQ checkpoint (random ints and scales, vcu128/format/synthetic.py)
and times the four export steps, each run by hand as its own command, then `verify.py --bits_only`
(on 2 CPU cores: about 4 minutes and 45 GB of disk for 28 layers):

    python bench/bench_e2e.py --export_only --layers 28 --fingerprint before.sha256

`--fingerprint FILE` writes the sha256 of every output file (the records that hold times and paths
left out, as scripts/output_fingerprint.py does): run it before and after a change and diff the two.
`--cold` empties the page cache before each command (root only), so that each starts alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_export import drop_page_cache  # noqa: E402
from bench.bench_quantize import QWEN2_7B_CONFIG  # noqa: E402

# A small model of the same kind (heads of 128, the board's), for trying the script on a CPU.
TINY_CONFIG = dict(vocab_size=1024, hidden_size=256, intermediate_size=640, num_attention_heads=2, num_key_value_heads=1,
                   max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
SHAPES = {"qwen2-7b": QWEN2_7B_CONFIG, "tiny": TINY_CONFIG}
# The records whose bytes hold times, paths or run ids: left out of the fingerprint.
RECORDS = ("manifest.json", "compile_sw.json", "lm_head.json", "verify_report.json", "quant_report.json")


# ---------------------------------------------------------------------------------------------
# Inputs, built in a child process (not timed)


def write_random_model(model_dir: Path, layers: int, shape: str, device: str, seed: int = 0) -> None:
    """An fp16 Qwen2 with HF's initialisation (linear weights and embedding normal(0, 0.02), biases 0,
    norms 1), written one safetensors shard a layer with its tokenizer: a 7B's shape never needs
    the model in memory. Generated on `device`."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    from vcu128.check.inputs import DEMO_CORPUS
    from vcu128.demo.tiny_model import train_tokenizer

    cfg = Qwen2Config(**SHAPES[shape], num_hidden_layers=layers, torch_dtype="float16")
    cfg.architectures = ["Qwen2ForCausalLM"]
    model_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    head = cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head

    def normal(*size):
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * 0.02).half().cpu()

    shards = layers + 1
    weight_map = {}

    def save(index: int, tensors: dict) -> None:
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(model_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    for layer in range(layers):
        p = f"model.layers.{layer}."
        t = {p + "self_attn.q_proj.weight": normal(h, h), p + "self_attn.k_proj.weight": normal(kv, h),
             p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, h),
             p + "mlp.gate_proj.weight": normal(i, h), p + "mlp.up_proj.weight": normal(i, h), p + "mlp.down_proj.weight": normal(h, i),
             p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16), p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)}
        for proj, n in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            t[f"{p}self_attn.{proj}.bias"] = torch.zeros(n, dtype=torch.float16)
        save(layer, t)
    save(layers, {"model.embed_tokens.weight": normal(v, h), "model.norm.weight": torch.ones(h, dtype=torch.float16), "lm_head.weight": normal(v, h)})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    cfg.to_json_file(str(model_dir / "config.json"))
    train_tokenizer(DEMO_CORPUS.read_text(), min(1024, v)).save_pretrained(str(model_dir))


def write_synthetic_checkpoint(qdir: Path, layers: int, shape: str) -> None:
    from vcu128.format.synthetic import QWEN2_7B, SyntheticSpec, write_gptq_checkpoint

    dims = QWEN2_7B if shape == "qwen2-7b" else dict(hidden=256, intermediate=640, num_heads=2, num_kv_heads=1, head_dim=128, vocab=1024)
    write_gptq_checkpoint(qdir, SyntheticSpec(**{**dims, "num_layers": layers}, seed=0))


# ---------------------------------------------------------------------------------------------
# Running a command as a user does


def run_command(name: str, args: list[str], log, cold: bool = False) -> dict:
    """Run `python args...` from the repository root; every line of its output (stdout and stderr,
    a progress bar's carriage returns split too) with the seconds since the start. Returns the
    command, its exit code, wall seconds, CPU seconds and peak RSS, and the lines."""
    if cold:
        drop_page_cache()
    cmd = [sys.executable, *args]
    print(f"$ {' '.join(cmd)}", file=log, flush=True)
    started_at, start = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, pending = [], b""
    while True:
        data = os.read(proc.stdout.fileno(), 65536)
        if not data:
            break
        now = time.perf_counter() - start
        *done, pending = re.split(rb"[\r\n]", pending + data)
        for raw in done:
            if raw.strip():
                text = raw.decode(errors="replace")
                lines.append((round(now, 3), text))
                print(f"{now:8.2f}  {text}", file=log, flush=True)
    if pending.strip():
        lines.append((round(time.perf_counter() - start, 3), pending.decode(errors="replace")))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    return {"name": name, "command": " ".join(args), "started_at": started_at, "exit_code": os.waitstatus_to_exitcode(status), "seconds": round(wall, 3),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
            "disk_read_gb": round(usage.ru_inblock * 512 / 1e9, 2), "disk_written_gb": round(usage.ru_oublock * 512 / 1e9, 2), "lines": lines}


def first_line(run: dict, pattern: str) -> tuple[float, str] | None:
    for t, text in run["lines"]:
        if re.search(pattern, text):
            return t, text
    return None


def seconds_in(text: str, key: str) -> float | None:
    m = re.search(rf"\b{key} ([0-9.]+) s\b", text)
    return float(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# Phases from the lines


def quantize_phases(run: dict) -> list[tuple[str, float]]:
    """Phases of `quantize.py --compile` from its lines: each export step ends with its summary line;
    GPTQ's line (`quantize: setup 1.0 s, load ..., total T s; ...`) splits the time before it."""
    phases = []
    gptq = first_line(run, r"^quantize: setup ")
    at = 0.0
    if gptq:
        t, text = gptq
        total = seconds_in(text, "total") or 0.0
        setup = seconds_in(text, "setup") or 0.0
        phases.append(("start-up: imports, model check, tokenizer, calibration", t - total))
        phases.append(("GPTQ set-up (model skeleton, embedding, first use of the device)", setup))
        phases.append(("GPTQ: layers (forward + Hessians, GPTQ, reading and writing)", total - setup))
        at = t
    marks = [(r"^perplexity on ", "quality report (perplexity fp16 and GPTQ, layer errors)"), (r"^compile_sw: \d+ files", "compile_sw"),
             (r"^lm_head: \d+ files", "lm_head"), (r"^hardware: \d+ files", "hardware"), (r"^embedding: \d+ files", "embedding_tokens")]
    for pattern, name in marks:
        hit = first_line(run, pattern)
        if hit:
            phases.append((name, hit[0] - at))
            at = hit[0]
    phases.append(("exit", run["seconds"] - at))
    return phases


def verify_phases(run: dict, report: dict | None) -> list[tuple[str, float]]:
    """verify's time by phase, from its report: what lies outside the two checks (start-up, imports,
    writing the report, exit), then the checks. With --device cuda they run side by side: their wall
    clock together is one phase, each check's own seconds are shown inside it (indented: not added)."""
    report = report or {}
    bits = report.get("bit_check", {}).get("seconds")
    func = (report.get("functional") or {}).get("seconds")
    timeline = report.get("timeline") or {}
    spans = [timeline[k] for k in ("bit_check", "functional") if k in timeline]
    checks = max(end for _, end in spans) - min(begin for begin, _ in spans) if spans else (bits or 0) + (func or 0)
    phases = [("verify: start-up, imports, exit", run["seconds"] - checks)]
    if timeline.get("side_by_side"):
        phases.append(("verify: bit check and functional check, side by side", checks))
        phases.append(("verify:   (bit check, beside)", bits))
        if func is not None:
            phases.append(("verify:   (functional check, beside)", func))
    else:
        if bits is not None:
            phases.append(("verify: bit check", bits))
        if func is not None:
            phases.append(("verify: functional check", func))
    if func is not None:
        phases += functional_parts(run, func, timeline)
    return phases


def functional_parts(run: dict, func: float, timeline: dict) -> list[tuple[str, float]]:
    """The functional check's parts (indented: inside it), from its progress lines, each stamped as it
    came (`functional: 28/28 layer in 7.8 s`: the evaluation tokens through the decoder layers;
    `greedy: 8/8 token in 9.1 s`) and from when the check began (the report's timeline, against the
    command's own start): its set-up (inputs, tokenizer, the GPU's start, the models), the decoder
    layers, the output layers and comparisons, greedy decoding."""
    bars = {}
    for key in ("functional", "greedy"):
        hit = first_line(run, rf"^{key}: \d+/\d+ ")
        seconds = seconds_in(hit[1], "in") if hit else None
        if seconds is not None:
            bars[key] = (hit[0] - seconds, hit[0])  # (began, ended) in the command's seconds
    if "functional" not in bars:
        return []
    layers, greedy = bars["functional"], bars.get("greedy")
    parts = []
    if "started_at" in run and "started_at" in timeline and "functional" in timeline:
        began = timeline["started_at"] - run["started_at"] + timeline["functional"][0]
        parts.append(("verify:   (functional: set-up: inputs, tokenizer, GPU start, models)", layers[0] - began))
    parts.append(("verify:   (functional: decoder layers, evaluation tokens)", layers[1] - layers[0]))
    if greedy:
        parts.append(("verify:   (functional: output layers, comparisons)", greedy[0] - layers[1]))
        parts.append(("verify:   (functional: greedy tokens)", greedy[1] - greedy[0]))
    parts.append(("verify:   (functional: the rest)", func - sum(s for _, s in parts)))
    return parts


# ---------------------------------------------------------------------------------------------
# Fingerprint and machine


def fill_bytecode_cache(work: Path, device: str, quantize_args: list[str], verify_args: list[str]) -> bool:
    """Run the timed commands once, untimed, on a tiny 1-layer model (with the same extra arguments):
    every module they import (modeling_qwen2, the tokenizer's, the export's, verify's) has its
    bytecode cached first. Returns whether every command ran; a failure is shown, and the timed run
    then pays for what was not compiled."""
    model, qdir = work / "model", work / "model-W4A16-gptq"
    shutil.rmtree(work, ignore_errors=True)
    gen_device = "cuda" if device.startswith("cuda") else "cpu"
    steps = [["-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.bench_e2e import *; "
                    f"write_random_model(Path({str(model)!r}), 1, 'tiny', {gen_device!r})"],
             ["quantize.py", "--model", str(model), "--quantize_model", str(qdir), "--device", device, "--calib", "random",
              "--eval_text", str(ROOT / "data" / "demo_corpus.txt"), "--compile", *quantize_args],
             ["verify.py", "--quantize_model", str(qdir), "--hardware_dir", str(qdir / "compile" / "QWEN_BLOCK_write_data_port32"),
              "--device", gen_device, *verify_args]]
    start, ok = time.perf_counter(), True
    for args in steps:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if done.returncode not in (0, 1):  # verify's 1: a tiny random model may miss its threshold
            print(f"filling the bytecode cache: {args[0]} exited {done.returncode}:\n{done.stderr[-2000:]}", file=sys.stderr)
            ok = False
            break
    shutil.rmtree(work, ignore_errors=True)
    print(f"bytecode cache {'filled' if ok else 'NOT filled'} in {time.perf_counter() - start:.1f} s (untimed)", file=sys.stderr)
    return ok


def fingerprint(folders: list[Path], out: Path) -> int:
    """sha256 of every file under `folders` but the records, one `sha  folder/path` line each, sorted."""
    from scripts.output_fingerprint import file_hashes

    lines = []
    for folder in folders:
        lines += [f"{sha}  {folder.name}/{rel}" for sha, rel in (line.split("  ", 1) for line in file_hashes(folder, skip=RECORDS))]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return len(lines)


def machine(device: str) -> dict:
    """The machine and the library versions (asked of a child process: the benchmark itself stays
    small, since a child's peak RSS counts what it inherits from here)."""
    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "load_average_at_start": os.getloadavg()}
    probe = ("import json, numpy, torch, transformers; d = dict(torch=torch.__version__, transformers=transformers.__version__, "
             f"numpy=numpy.__version__); d.update(gpu=torch.cuda.get_device_name(0)) if {device.startswith('cuda')!r} and torch.cuda.is_available() else None; "
             "print(json.dumps(d))")
    try:
        info.update(json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300).stdout))
    except (ValueError, subprocess.SubprocessError):
        pass
    return info


def machine_tag(info: dict, device: str) -> str:
    if "gpu" in info:
        return info["gpu"].split()[-1].lower()
    return f"{info['cpus']}core"


def disk_speed(folder: Path, nbytes: int = 8 << 30, block: int = 16 << 20) -> dict:
    """The disk's speed for the steps' own pattern: unbuffered (O_DIRECT) writes of 16 MB blocks, two
    at a time, into 8 files, synced; then the same bytes read back, four 16 MB reads at a time
    (page cache emptied first, where root may)."""
    from concurrent.futures import ThreadPoolExecutor

    from vcu128.io.direct_io import O_DIRECT, aligned_empty, read_bytes

    buf = aligned_empty(block)
    buf[:] = np.frombuffer(os.urandom(block), np.uint8)
    files = [folder / f"disk_probe_{i}.bin" for i in range(8)]
    jobs = [(f, off) for f in files for off in range(0, nbytes // len(files), block)]
    drop_page_cache()
    start = time.perf_counter()
    fds = {f: os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_DIRECT) for f in files}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: os.pwrite(fds[job[0]], buf, job[1]), jobs))
    for fd in fds.values():
        os.close(fd)
    os.sync()
    write = time.perf_counter() - start
    drop_page_cache()
    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: read_bytes(job[0], job[1], block).size, jobs))
    read = time.perf_counter() - start
    for f in files:
        f.unlink()
    total = len(jobs) * block
    return {"write_gb_s": round(total / 1e9 / write, 2), "read_gb_s": round(total / 1e9 / read, 2), "probe_gb": round(total / 1e9, 1)}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28, help="decoder layers (28: the whole 7B shape)")
    p.add_argument("--device", default="cuda:0", help="quantize.py --device (cuda:N or cpu); verify.py gets cuda or cpu")
    p.add_argument("--export_only", action="store_true", help="from a synthetic GPTQ checkpoint: the four export steps and verify --bits_only")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-7b", help="qwen2-7b (default) or tiny (to try the script on a CPU)")
    p.add_argument("--calib", default="random", help="quantize.py --calib (default random, with --eval_text data/demo_corpus.txt)")
    p.add_argument("--quantize_args", default="", help="more quantize.py arguments, one string (e.g. '--nsamples 16 --seqlen 128')")
    p.add_argument("--verify_args", default="", help="more verify.py arguments, one string")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "e2e", help="scratch folder (removed at the end unless --keep)")
    p.add_argument("--model_in", type=Path, help="where the random model is kept (default: the scratch folder); /dev/shm keeps "
                                                 "a 7B's 15 GB off a small disk (the one-GPU machine's 64 GB)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (the model is then reused by the next run)")
    p.add_argument("--cold", action="store_true", help="empty the page cache before each command (root only)")
    p.add_argument("--fingerprint", type=Path, help="write the sha256 of every output file here")
    p.add_argument("--disk", action="store_true", help="first measure the disk's unbuffered write and read speed (8 GB), and give each command's floor")
    p.add_argument("--json", type=Path, help="default: bench/results/e2e_<machine>_<layers>L[_export].json")
    p.add_argument("--pycache", type=Path, help="PYTHONPYCACHEPREFIX for the commands, filled first by an untimed run of the same "
                                                "commands on a tiny model, with bytecode writing allowed: an environment without "
                                                "compiled bytecode (the GPU machine's, which also sets PYTHONDONTWRITEBYTECODE=1) "
                                                "compiles torch's and transformers' sources in every process, which a pip install does once")
    args = p.parse_args()

    bytecode_env, filled = os.environ.get("PYTHONDONTWRITEBYTECODE"), False
    if args.pycache:
        # A pip install compiles every module's bytecode; an environment without it (the GPU machine's
        # site-packages have none, and it sets PYTHONDONTWRITEBYTECODE, so nothing is ever cached)
        # compiles torch's and transformers' sources again in every process: 10-15 s a command there.
        # So writing is allowed, into a prefix of our own, filled by the same commands on a tiny model.
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = str(args.pycache.resolve())
        filled = fill_bytecode_cache(args.work / "bytecode-fill", args.device, args.quantize_args.split(), args.verify_args.split())
    info = machine(args.device)
    info["PYTHONDONTWRITEBYTECODE"] = bytecode_env
    args.work.mkdir(parents=True, exist_ok=True)
    log = sys.stderr
    env_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["PYTHONPATH"] = env_path
    tag = f"{args.shape}-{args.layers}L"
    model = (args.model_in or args.work) / f"model-{tag}"
    qdir = args.work / (f"synthetic-{tag}-W4A16-gptq" if args.export_only else f"model-{tag}-W4A16-gptq")
    shutil.rmtree(qdir, ignore_errors=True)  # a kept run's outputs
    weights = args.layers * 233_000_000 + 2 * 545_000_000 if args.shape == "qwen2-7b" else 1_000_000
    model_here = not args.export_only and args.model_in is None and not (model / "config.json").is_file()
    need = int(weights * (2 if model_here else 0) + weights * (0.5 + 4 + 0.6) * 1.1)
    free = shutil.disk_usage(args.work).free
    if free < need:
        raise SystemExit(f"{args.work}: {free / 1e9:.1f} GB free, this run needs about {need / 1e9:.0f} GB")
    t = time.perf_counter()
    if args.export_only:
        build = ["-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.bench_e2e import *; "
                       f"write_synthetic_checkpoint(Path({str(qdir)!r}), {args.layers}, {args.shape!r})"]
        made = run_command("synthetic checkpoint", build, log)
    elif not (model / "config.json").is_file():
        gen_device = "cuda" if args.device.startswith("cuda") else "cpu"
        build = ["-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.bench_e2e import *; "
                       f"write_random_model(Path({str(model)!r}), {args.layers}, {args.shape!r}, {gen_device!r})"]
        made = run_command("random model", build, log)
    else:
        made = {"exit_code": 0}
    if made["exit_code"]:
        raise SystemExit("building the input failed (its output is above)")
    print(f"input ready in {time.perf_counter() - t:.1f} s", file=log)
    disk = disk_speed(args.work) if args.disk else None  # before the steps: their outputs are not yet there to crowd the disk
    if disk:
        print(f"disk: unbuffered write {disk['write_gb_s']} GB/s, read {disk['read_gb_s']} GB/s", file=log)

    compile_dir = qdir / "compile"
    hw = compile_dir / "QWEN_BLOCK_write_data_port32"
    verify_device = "cuda" if args.device.startswith("cuda") else "cpu"
    runs, phases = [], []
    if args.export_only:
        steps = [("compile_sw", ["compile_sw.py", "--quantize_model", str(qdir)]),
                 ("lm_head", ["lm_head.py", "--quantize_model", str(qdir)]),
                 ("hardware", ["hardware.py", "--compile_dir", str(compile_dir)]),
                 ("embedding_tokens", ["embedding_tokens.py", "--compile_dir", str(compile_dir)]),
                 ("verify --bits_only", ["verify.py", "--quantize_model", str(qdir), "--hardware_dir", str(hw), "--bits_only", *args.verify_args.split()])]
        for name, cmd in steps:
            run = run_command(name, cmd, log, args.cold)
            runs.append(run)
            if run["exit_code"]:
                break
            if name.startswith("verify"):
                phases += verify_phases(run, json.loads((compile_dir / "verify_report.json").read_text()))
            else:
                phases.append((name, run["seconds"]))
    else:
        calib = ["--calib", args.calib] + (["--eval_text", str(ROOT / "data" / "demo_corpus.txt")] if args.calib == "random" else [])
        run = run_command("quantize --compile", ["quantize.py", "--model", str(model), "--quantize_model", str(qdir), "--device", args.device,
                                                 *calib, "--compile", *args.quantize_args.split()], log, args.cold)
        runs.append(run)
        phases += quantize_phases(run)
        if not run["exit_code"]:
            run = run_command("verify", ["verify.py", "--quantize_model", str(qdir), "--hardware_dir", str(hw), "--device", verify_device,
                                         *args.verify_args.split()], log, args.cold)
            runs.append(run)
            report = compile_dir / "verify_report.json"
            phases += verify_phases(run, json.loads(report.read_text()) if report.is_file() else None)
    failed = [r for r in runs if r["exit_code"] not in (0,)]
    total = sum(r["seconds"] for r in runs)

    print(f"\n{tag}, {'export only (synthetic checkpoint)' if args.export_only else 'quantize.py --compile, then verify.py'}, "
          f"{'' if args.export_only else f'device {args.device}; '}{info['host']}: {info['cpus']} cores, load average at start {info['load_average_at_start'][0]:.2f}\n")
    # A command's disk floor: its bytes read and written at the disk's own speed, one after the other.
    for r in runs:
        r["disk_floor_seconds"] = round(r["disk_read_gb"] / disk["read_gb_s"] + r["disk_written_gb"] / disk["write_gb_s"], 2) if disk else None
    floor = lambda r: f"{r['disk_floor_seconds']:.1f}" if disk else "-"  # noqa: E731
    print("| command | exit | seconds | CPU seconds | peak RSS (GB) | disk read (GB) | disk written (GB) | disk floor (s) |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        print(f"| `{r['name']}` | {r['exit_code']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['disk_read_gb']:.2f} "
              f"| {r['disk_written_gb']:.2f} | {floor(r)} |")
    print(f"| **all** | | **{total:.1f}** | {sum(r['cpu_seconds'] for r in runs):.1f} | | {sum(r['disk_read_gb'] for r in runs):.2f} "
          f"| {sum(r['disk_written_gb'] for r in runs):.2f} | {sum(r['disk_floor_seconds'] for r in runs) if disk else 0:.1f} |\n")
    if disk:
        print(f"disk (measured before the commands): unbuffered write {disk['write_gb_s']} GB/s, read {disk['read_gb_s']} GB/s\n")
    print("| phase | seconds |\n| --- | ---: |")
    for name, s in phases:
        print(f"| {name} | {s:.1f} |")

    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": info, "layers": args.layers, "shape": args.shape, "device": args.device,
           "mode": "export_only" if args.export_only else "quantize --compile, verify", "cold_cache": args.cold,
           "bytecode_cache": (("PYTHONPYCACHEPREFIX, filled first by the same commands on a tiny model, bytecode writing allowed"
                               if filled else "PYTHONPYCACHEPREFIX, but filling it failed (its output above): the commands compiled what they import")
                              if args.pycache else "the environment's own"),
           "total_seconds": round(total, 2), "phases": [{"phase": n, "seconds": round(s, 2)} for n, s in phases],
           "commands": [{k: v for k, v in r.items() if k != "lines"} | {"log": r["lines"]} for r in runs]}
    if disk:
        doc["disk"] = disk
    if args.fingerprint:
        n = fingerprint([qdir], args.fingerprint)
        digest = hashlib.sha256(args.fingerprint.read_bytes()).hexdigest()
        doc["fingerprint"] = {"files": n, "sha256_of_list": digest,
                              "list": "the output of --fingerprint (sha256 and path of every output file, records with times left out); "
                                      "kept out of git: re-run the same command and compare this digest"}
        print(f"\nsha256 of {n} output files -> {args.fingerprint} (sha256 of the list {digest})")
    out = args.json or ROOT / "bench" / "results" / f"e2e_{machine_tag(info, args.device)}_{args.layers}L{'_export' if args.export_only else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"results -> {out}")
    if not args.keep:
        shutil.rmtree(qdir, ignore_errors=True)
        if not args.export_only:
            shutil.rmtree(model, ignore_errors=True)
    if failed:
        raise SystemExit(f"{failed[0]['name']} exited {failed[0]['exit_code']}")


if __name__ == "__main__":
    main()
