#!/usr/bin/env python3
"""Benchmark GPTQ quantization on a GPU: this project's quantize step next to plain GPTQModel defaults.

Builds a Qwen2-7B-shaped model with random weights (seeded, so separate runs build the same model),
quantizes it with 256 random-token samples of 512 tokens, and reports wall time, GPU peak and host
peak memory, and, per decoder layer, GPTQ's relative output error on held-out inputs (the same for
every run). Each quantization runs in its own process, so its peaks are its own.

    python bench/bench_quantize.py --layers 28 --runs defaults project
    python bench/bench_quantize.py --layers 4 --runs project:bs=16 project:bs=64,offload=0

A run is `defaults` (GPTQModel.load + quantize(batch_size=1) + save, nothing else set) or
`project[:engine=vcu128|gptqmodel,bs=N]` (vcu128.quant.quantize with this project's defaults: its own GPTQ
engine; with engine=gptqmodel also offload=0|1,pack=original|gpu|cpu,tf32=0|1,seq=0|1), `check`
(the fused Triton block solver against the eager one on the GPU and the CPU, and the whole engine in
bf16 on the GPU against the CPU) or `parts` (seconds of GPTQ's pieces at a 7B's shapes); those two
run before the runs.
Needs a CUDA GPU, GPTQModel (for `defaults`) and about 16 GB of free disk a 28-layer model. On a GPU
machine with no internet, carry GPTQModel as wheels: `bash bench/gptqmodel_offline.sh download` here
fills .whl/, `source bench/gptqmodel_offline.sh install` there builds and installs it.

Measured results: bench/results/quantize_h200_28L.json (and the older H100 files), and the table in README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN2_7B_CONFIG = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
    max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def build(model_dir: Path, layers: int, seed: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vcu128.demo.tiny_model import DEMO_CORPUS, train_tokenizer

    torch.manual_seed(seed)
    cfg = Qwen2Config(**QWEN2_7B_CONFIG, num_hidden_layers=layers, torch_dtype="float16")
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(model_dir)
    train_tokenizer(DEMO_CORPUS.read_text(), 1024).save_pretrained(model_dir)


def calibration(model_dir: Path, nsamples: int, seqlen: int):
    from transformers import AutoTokenizer

    from vcu128.demo.tiny_model import DEMO_CORPUS
    from vcu128.quant.calibration import build_calibration

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return build_calibration(tok, "random", nsamples, seqlen, seed=0, eval_text=str(DEMO_CORPUS), vocab_size=QWEN2_7B_CONFIG["vocab_size"])


def quantize(model_dir: Path, out: Path, run: str, nsamples: int, seqlen: int) -> dict:
    import torch

    calib = calibration(model_dir, nsamples, seqlen)
    name, _, opts = run.partition(":")
    settings = dict(kv.split("=") for kv in opts.split(",") if kv)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if name == "defaults":
        from gptqmodel import GPTQModel, QuantizeConfig

        gm = GPTQModel.load(str(model_dir), QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False))
        gm.quantize(calib.samples, batch_size=1)
        gm.save(str(out))
    else:
        from vcu128.quant.quantize import QuantizeOptions, run_gptq

        opts = QuantizeOptions(device="cuda:0", nsamples=nsamples, seqlen=seqlen, calib="random", report=False)
        opts.engine = settings.get("engine", opts.engine)
        if "bs" in settings:
            opts.batch_size = int(settings["bs"])
        if "offload" in settings:
            opts.offload = settings["offload"] == "1"
        if "pack" in settings:
            opts.pack_impl = settings["pack"]
        if "tf32" in settings:
            opts.tf32 = settings["tf32"] == "1"
        if "seq" in settings:
            opts.true_sequential = settings["seq"] == "1"
        run_gptq(model_dir, out, calib, opts)
    return {"run": run, "seconds": time.perf_counter() - start, "gpu_peak_gb": torch.cuda.max_memory_reserved() / 1e9}


def solver_check() -> dict:
    """The fused Triton block solver against the eager one, on one down_proj-shaped problem: both on
    the GPU from the same Hessian factor (so only the kernel differs), and the eager one on the CPU:
    how many ints differ (float rounding order only) and the output error of each."""
    import torch

    from vcu128.quant.gptq import (
        add_to_hessian,
        dequantize,
        gptq_quantize,
        solve_block_eager,
    )

    torch.manual_seed(0)
    rows, cols, n = 512, 2048, 8192
    X = (torch.randn(n, cols, device="cuda") @ (torch.eye(cols, device="cuda") + 0.05 * torch.randn(cols, cols, device="cuda"))).half()
    W = 0.02 * torch.randn(rows, cols, device="cuda")
    H = torch.zeros(cols, cols, device="cuda")
    add_to_hessian(H, X)
    H *= 2 / n
    q_kernel, s_kernel = gptq_quantize(W, H.clone(), "check")
    q_eager, s_eager = gptq_quantize(W, H.clone(), "check", solve=solve_block_eager)
    q_cpu, s_cpu = gptq_quantize(W.cpu(), H.cpu(), "check")
    Xf = X.float()

    def err(q, s):
        return float((Xf @ (dequantize(q.cuda(), s.cuda()) - W).T).norm() / (Xf @ W.T).norm())

    return {
        "model_bf16": engine_check(),
        "int_mismatch_kernel_vs_eager_gpu": float((q_kernel != q_eager).float().mean()),
        "int_mismatch_kernel_vs_eager_cpu": float((q_kernel.cpu() != q_cpu).float().mean()),
        "scale_max_rel_diff": float(((s_kernel - s_eager).abs() / s_eager).max()),
        "error_gpu_kernel": err(q_kernel, s_kernel),
        "error_gpu_eager": err(q_eager, s_eager),
        "error_cpu_eager": err(q_cpu, s_cpu),
    }


def parts() -> dict:
    """Seconds of GPTQ's pieces at a 7B's shapes: the Hessian factor (this project's route and the
    usual one), one whole solve of down_proj and of gate+up, and down_proj's Hessian over 16384 tokens
    (one product, and the blocks on and above the diagonal)."""
    import torch

    from vcu128.quant.gptq import HessianAccumulator, gptq_quantize, hessian_factor

    def hessian_inverse_factor_usual(H):  # GPTQ's usual route to U, what the engine's factor replaced
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    def timed(fn, repeat=3):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeat

    torch.manual_seed(0)
    out = {}
    for n in (3584, 18944):
        X = torch.randn(4 * n, n, device="cuda", dtype=torch.bfloat16)
        H = torch.mm(X.T, X, out_dtype=torch.float32) / (4 * n)
        out[f"factor_{n}"] = timed(lambda: hessian_factor(H.clone(), "h"))
        out[f"factor_usual_route_{n}"] = timed(lambda: hessian_inverse_factor_usual(H.clone()))
        for rows, name in ((3584, "down") if n == 18944 else (37888, "gate_up"),):
            W = 0.02 * torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
            out[f"gptq_{name}"] = timed(lambda: gptq_quantize(W, H.clone(), name), repeat=2)
    x = torch.randn(16384, 18944, device="cuda", dtype=torch.bfloat16)

    def hessian(split):
        acc = HessianAccumulator(18944, torch.device("cuda"))
        if not split:
            acc.blocks = None
        acc.add(x)
        return acc.result()

    out["hessian_down_16k_tokens_full"] = timed(lambda: hessian(False))
    out["hessian_down_16k_tokens_split"] = timed(lambda: hessian(True))
    out["hessian_split_max_rel_diff"] = float((hessian(True) - hessian(False)).abs().max() / hessian(False).abs().max())
    return {k: round(v, 6) for k, v in out.items()}


def engine_check() -> dict:
    """The whole engine on a small bf16 Qwen2 (bf16 forward and Hessians on the GPU) against the same
    run on the CPU (fp32 forward): mean layer output error of each checkpoint on held-out tokens."""
    import tempfile

    import numpy as np
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vcu128.format.checkpoint import GPTQCheckpoint
    from vcu128.quant.layerwise import quantize_checkpoint
    from vcu128.quant.report import layer_errors

    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, torch_dtype="bfloat16")
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(work / "m")
    ids = np.random.default_rng(0).integers(0, 1024, (64, 256))
    for device in ("cuda:0", "cpu"):
        quantize_checkpoint(work / "m", work / device, ids, device, progress=False)
    ref = Qwen2ForCausalLM.from_pretrained(work / "m", dtype=torch.float32).eval()
    held_out = np.random.default_rng(1).integers(0, 1024, 2 * 256)
    result = {}
    for device in ("cuda:0", "cpu"):
        errs = layer_errors(ref, GPTQCheckpoint(work / device), held_out, 256, windows=2)
        result[f"mean_layer_error_{device}"] = sum(e["gptq"] for e in errs) / len(errs)
    result["mean_layer_error_rtn"] = sum(e["rtn"] for e in errs) / len(errs)
    return result


def errors(model_dir: Path, qdir: Path, seqlen: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from vcu128.format.checkpoint import GPTQCheckpoint
    from vcu128.quant.report import layer_errors

    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float16).cuda().eval()
    calib = calibration(model_dir, 1, seqlen)
    return layer_errors(ref, GPTQCheckpoint(qdir), calib.eval_ids, seqlen=min(seqlen, len(calib.eval_ids) // 2), windows=2)


def child(args: list[str], log: Path) -> tuple[dict, float]:
    """Run this script in a child process, its stdout (GPTQModel's timing tables) saved to `log`;
    (its JSON result, its peak host memory in GB)."""
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    out = proc.stdout.read()
    log.write_bytes(out)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"failed: {' '.join(args)}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    return result, usage.ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--runs", nargs="+", default=["defaults", "project"])
    p.add_argument("--nsamples", type=int, default=256)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_quantize"))
    p.add_argument("--json", type=Path, help="write the results here too")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:  # inside a child process: one piece of work, JSON on the last line of stdout
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        kind, *rest = args.child
        if kind == "build":
            build(Path(rest[0]), int(rest[1]), 0)
            print(json.dumps({}))
        elif kind == "check":
            print(json.dumps(solver_check()))
        elif kind == "parts":
            print(json.dumps(parts()))
        elif kind == "quantize":
            print(json.dumps(quantize(Path(rest[0]), Path(rest[1]), rest[2], args.nsamples, args.seqlen)))
        else:
            print(json.dumps({"layers": errors(Path(rest[0]), Path(rest[1]), args.seqlen)}))
        return

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_quantize.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    for kind in ("check", "parts"):
        if kind in args.runs:
            r, _ = child(["--child", kind], args.work / f"{kind}.log")
            print(f"{kind}: {json.dumps(r)}", file=sys.stderr, flush=True)
            args.runs = [run for run in args.runs if run != kind]
    if not args.runs:
        return
    model_dir = args.work / f"qwen2-7b-shape-{args.layers}L"
    # the fp16 model, plus a checkpoint a run (a quarter of it), with room to spare
    need = int((args.layers * 466e6 + 2 * 1.09e9) * (1 + 0.3 * len(args.runs)) * 1.1)
    args.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    if free < need:
        raise SystemExit(f"{args.work}: {free / 1e9:.1f} GB free, this run needs about {need / 1e9:.0f} GB")
    if not (model_dir / "config.json").is_file():
        r, _ = child(["--child", "build", str(model_dir), str(args.layers)], args.work / "build.log")
        print(f"built {model_dir} in {r['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    results = []
    for i, run in enumerate(args.runs):
        qdir = args.work / f"q{i}"
        q, host = child(["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--child", "quantize", str(model_dir), str(qdir), run], args.work / f"q{i}.log")
        q["host_peak_gb"] = host
        errs, _ = child(["--seqlen", str(args.seqlen), "--child", "errors", str(model_dir), str(qdir)], args.work / f"e{i}.log")
        q["layer_errors"] = errs["layers"]
        results.append(q)
        print(json.dumps(q), file=sys.stderr, flush=True)
    gpu = torch.cuda.get_device_name(0)
    import transformers

    try:
        import gptqmodel

        gm_version = gptqmodel.__version__
    except ImportError:
        gm_version = "not installed"
    print(f"\n{args.layers} layers of Qwen2-7B shape, {args.nsamples} samples x {args.seqlen} tokens; {gpu}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, GPTQModel {gm_version}\n")
    print("| run | seconds | s / layer | GPU peak (GB) | host peak (GB) | mean layer error | max layer error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for q in results:
        e = [row["gptq"] for row in q["layer_errors"]]
        print(f"| {q['run']} | {q['seconds']:.1f} | {q['seconds'] / args.layers:.2f} | {q['gpu_peak_gb']:.1f} | {q['host_peak_gb']:.1f} | {sum(e) / len(e):.4f} | {max(e):.4f} |")
    if len(results) > 1:
        print(f"\nspeed-up of {results[-1]['run']} over {results[0]['run']}: {results[0]['seconds'] / results[-1]['seconds']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
