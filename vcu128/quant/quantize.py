"""Step 1: GPTQ quantization, W4A16, group 128, symmetric, no act-order (this project's engine,
quant/layerwise.py, or GPTQModel itself with --engine gptqmodel), then a quality report (perplexity of fp16 and quantized model; per layer, GPTQ's output error next to
plain round-to-nearest on the same inputs) saved as quant_report.json in the checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vcu128.board.rescale import TRIGGER  # half the fp16 range
from vcu128.board.stats import read_quant_report
from vcu128.format.checkpoint import scan_finite
from vcu128.format.gate import (
    check_board_tensors,
    check_float_model_shapes,
    read_model_dims,
)
from vcu128.format.model import LINEARS, read_model_config
from vcu128.io.errors import VCUError, human_bytes
from vcu128.io.jsonfile import dumps, get_int
from vcu128.io.output import TOOL, check_out, files_under, staged_dir
from vcu128.io.uptodate import fingerprint
from vcu128.quant.calibration import Calibration, build_calibration, load_tokenizer
from vcu128.quant.options import (  # noqa: F401 (the options' home)
    ENGINES,
    QuantizeOptions,
    check_arguments,
    check_board_settings,
    check_engine_settings,
)

log = logging.getLogger("vcu128")

REPORT_NAME = "quant_report.json"
CALIBRATION_META_KEY = "vcu128_calibration"
GPU_BATCH = 16  # calibration samples a forward pass on a GPU (plain GPTQModel: 1); see bench/bench_quantize.py


def default_output(model: Path, wbits: int) -> Path:
    model = Path(model)
    return model.parent / f"{model.name}-W{wbits}A16-gptq"


def check_model_folder(model: Path) -> dict:
    """A local HuggingFace causal-LM folder that the board runs (board.py's gate)."""
    model = Path(model)
    if not model.is_dir():
        raise VCUError(f"{model}: no such model folder")
    if not (model / "config.json").is_file():
        raise VCUError(f"{model}: no config.json: not a HuggingFace model folder")
    cfg = read_model_config(model / "config.json")
    if "quantization_config" in cfg:
        qc = cfg["quantization_config"]
        raise VCUError(f"{model}: already quantized ({qc.get('quant_method', '?') if isinstance(qc, dict) else qc}); pass the fp16/bf16 model")
    archs = cfg.get("architectures") or []
    causal = ("ForCausalLM", "ChatGLMModel", "ForConditionalGeneration")  # ChatGLM2/3 call their causal LM ChatGLMModel
    if not isinstance(archs, list) or not any(isinstance(a, str) and a.endswith(causal) for a in archs):
        raise VCUError(f"{model}: architectures {archs} has no *ForCausalLM: not a causal language model")
    dims = read_model_dims(model / "config.json")  # the board's gate: model type, activation, heads
    from vcu128.format.checkpoint import TensorView, read_tensor_index

    tensors = read_tensor_index(model)
    view = TensorView(tensors, dims, model)

    def shape_of(name: str) -> tuple[int, ...]:
        return view.info(name)[1]

    check_board_tensors(tensors, dims, quantized=False, shape_of=shape_of)
    biases = {f"{lin.name(layer)}.bias" for layer in range(dims.num_layers) for lin in LINEARS}
    check_float_model_shapes(shape_of, dims, dims.tie_word_embeddings, {name for name in biases if view.has(name)})
    return cfg


def memory_needed(dims, opts: "QuantizeOptions") -> int:
    """About the least memory GPTQ needs, whatever the engine: the calibration activations of every
    sample at one layer's input (fp32 on the CPU, 16-bit on a GPU) and the Hessian of the widest
    linear input (chin x chin in fp32) with the two matrices of that size its solve keeps beside it."""
    act = 4 if opts.device == "cpu" else 2
    widest = max(max(dims.linear_shape(lin)[0] for lin in LINEARS), dims.hidden)
    return opts.nsamples * opts.seqlen * dims.hidden * act + 3 * widest * widest * 4


def machine_memory(device: str) -> int | None:
    """The memory of the device quantize runs on (host RAM for the CPU), or None when unknown."""
    try:
        if device == "cpu":
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        import torch

        if device.startswith("cuda") and torch.cuda.is_available():
            return torch.cuda.get_device_properties(torch.device(device)).total_memory
    except (ValueError, OSError, RuntimeError, AssertionError):
        return None
    return None


def check_memory(dims, opts: "QuantizeOptions", where: Path) -> None:
    """Refused before anything is loaded: a model and calibration set that cannot fit in the
    machine's memory at all (the allocator would fail mid-run with a traceback)."""
    need, have = memory_needed(dims, opts), machine_memory(opts.device)
    if have is not None and need > have:
        raise VCUError(f"{where}: quantizing needs at least {human_bytes(need)} of memory on {opts.device} (hidden_size {dims.hidden}, "
                       f"widest linear input {max(max(dims.linear_shape(lin)[0] for lin in LINEARS), dims.hidden)}, --nsamples "
                       f"{opts.nsamples} x --seqlen {opts.seqlen}); the machine has {human_bytes(have)}",
                       "fewer --nsamples or a shorter --seqlen shrink the activations; the Hessian is the model's own")


def check_seqlen(cfg: dict, seqlen: int, where: Path) -> None:
    """Refused: --seqlen past the positions the model was trained on. Calibration samples that long
    put the last positions' activations (and so the Hessians GPTQ fits, and the report's perplexity)
    where the model has never been: the checkpoint would be tuned on inputs it will not see, and the
    report would not say so. A refusal costs one re-run with a smaller --seqlen; a warning would
    scroll past and leave that checkpoint behind."""
    trained = get_int(cfg, "max_position_embeddings", where) if cfg.get("max_position_embeddings") is not None else None
    if trained is not None and seqlen > trained:
        raise VCUError(f"--seqlen {seqlen}: the model was trained on at most {trained} positions ({where}: max_position_embeddings)",
                       f"pass --seqlen {trained} or less")


def _redirect_gptqmodel_logs(folder: Path) -> None:
    """GPTQModel writes its per-run logs to ./logs; send them into the checkpoint instead."""
    try:
        from gptqmodel.looper import loop_processor

        loop_processor._PROJECT_LOG_DIR = folder
    except (ImportError, AttributeError):  # another GPTQModel version: its default stays
        log.warning("warning: could not redirect GPTQModel's logs; they go to ./logs")


def _add_calibration_meta(folder: Path, meta: dict) -> None:
    for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        path = folder / name
        if path.is_file():
            doc = json.loads(path.read_text())
            section = doc[key] if key else doc
            section.setdefault("meta", {})[CALIBRATION_META_KEY] = meta
            path.write_text(json.dumps(doc, indent=2) + "\n")


def run_gptq(model: Path, out: Path, calib: Calibration, opts: QuantizeOptions, tokenizer=None,
             on_shard=None) -> tuple[float, dict | None, dict | None]:
    """Quantize `model` into the empty folder `out` with the chosen engine; returns (seconds, the
    fp16 headroom statistics, the quality report measured in GPTQ's own walk): only this project's
    engine measures the last two, and hands each shard's tensors to `on_shard` (layerwise.ShardSink)."""
    if opts.engine == "gptqmodel":
        return run_gptqmodel(model, out, calib, opts), None, None
    from vcu128.quant.layerwise import quantize_checkpoint

    start = time.perf_counter()
    ids = np.array([s["input_ids"] for s in calib.samples], dtype=np.int64)
    run = quantize_checkpoint(model, out, ids, opts.device, lm_head=opts.lm_head, samples_a_chunk=opts.batch_size, qmin=-opts.int4_range,
                              int4=opts.int4, eval_ids=calib.eval_ids if opts.report else None, on_shard=on_shard)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    seconds = time.perf_counter() - start
    layers = sorted(run.layer_seconds) or [0.0]
    log.info("quantize: " + ", ".join(f"{k} {v:.1f} s" for k, v in run.seconds.items()) + f"; total {seconds:.1f} s; "
             f"a layer: first {run.layer_seconds[0] if run.layer_seconds else 0:.2f} s, median {layers[len(layers) // 2]:.2f} s, longest {layers[-1]:.2f} s")
    return seconds, run.stats_report(run.dtype), run.quality


def run_gptqmodel(model: Path, out: Path, calib: Calibration, opts: QuantizeOptions) -> float:
    """Quantize `model` into `out` with GPTQModel; returns seconds. Its stdout (banner, progress,
    tables) is kept off ours unless --verbose."""
    with quiet_stdout(not opts.verbose):
        return _run_gptqmodel(model, out, calib, opts)


def _run_gptqmodel(model: Path, out: Path, calib: Calibration, opts: QuantizeOptions) -> float:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    _redirect_gptqmodel_logs(out / "quant_logs")
    cpu = opts.device == "cpu"
    qc = QuantizeConfig(
        bits=opts.wbits,
        group_size=opts.group_size,
        sym=opts.sym,
        desc_act=opts.desc_act,
        lm_head=opts.lm_head,
        true_sequential=opts.true_sequential,
        # GPTQModel quantizes lm_head at 8 bits, group 32 unless told otherwise; the board needs 4 / 128.
        dynamic={"lm_head": {"bits": opts.wbits, "group_size": opts.group_size, "sym": opts.sym, "desc_act": opts.desc_act}} if opts.lm_head else None,
        # On the CPU, "original" avoids a 30 s extension build on first use; on a GPU, pack there.
        pack_impl=opts.pack_impl or ("original" if cpu else "gpu"),
        # Offloading finished modules to disk saves host memory on a CPU box and costs time on a GPU one.
        offload_to_disk=opts.offload if opts.offload is not None else cpu,
    )
    batch = opts.batch_size or (1 if cpu else GPU_BATCH)
    if not cpu:
        # The Hessian X^T X of down_proj over 256 x 512 tokens is ~94 TFLOP: TF32 cuts it several-fold.
        torch.backends.cuda.matmul.allow_tf32 = opts.tf32 if opts.tf32 is not None else True
    start = time.perf_counter()
    torch.manual_seed(opts.seed)
    cfg = read_model_config(Path(model) / "config.json")
    saved = cfg.get("torch_dtype") or cfg.get("dtype") or ""
    dtype = {"float16": torch.float16, "float32": torch.float32}.get(saved, torch.bfloat16)  # the model's own; never a narrower range
    gm = GPTQModel.load(str(model), qc, dtype=dtype, device=opts.device)
    with FallbackWatch() as watch:
        gm.quantize(calib.samples, batch_size=batch)
    watch.check()
    gm.save(str(out))
    seconds = time.perf_counter() - start
    del gm
    return seconds


@contextlib.contextmanager
def quiet_stdout(quiet: bool = True, keep_lines: int = 40):
    """GPTQModel prints hundreds of lines of banners, progress and tables on stdout: keep them off it
    (file descriptor 1, so that C-level and cached-stream writes are caught too) unless `quiet` is
    False (quantize.py --verbose). If the block fails, its last `keep_lines` lines go to stderr, so
    the error keeps its context."""
    if not quiet:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink, open(sink.fileno(), "w", closefd=False) as text:
        os.dup2(sink.fileno(), 1)
        try:
            with contextlib.redirect_stdout(text):  # sys.stdout too, where it is not file descriptor 1
                yield
        except BaseException:
            text.flush()
            sys.stdout.flush()
            os.dup2(saved, 1)
            sink.seek(0)
            tail = sink.read().decode(errors="replace").splitlines()[-keep_lines:]
            if tail:
                print("\n".join(["GPTQModel's last output:"] + tail), file=sys.stderr)
            raise
        finally:
            text.flush()
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


class FallbackWatch(logging.Handler):
    """GPTQModel falls back to round-to-nearest for a module whose Hessian is not finite, logs it and
    carries on (exit 0, error near RTN's): watch its log for that and fail loudly instead."""

    PATTERNS = ("non-finite", "nonfinite", "fallback", "fall back", "falling back")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen: list[str] = []
        self.last: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record is self.last:  # watched at GPTQModel's logger and at the root: the same record twice in a row
            return
        self.last = record
        message = record.getMessage()
        if any(p in message.lower() for p in self.PATTERNS):
            self.seen.append(message.splitlines()[0][:200])

    def __enter__(self) -> "FallbackWatch":
        # The CLI quiets GPTQModel's logger to errors; its warnings are what this watches for.
        self.logger = logging.getLogger("gptqmodel")
        self.saved_level = self.logger.level
        self.logger.setLevel(min(self.saved_level or logging.WARNING, logging.WARNING))
        logging.getLogger().addHandler(self)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved_level)

    def check(self) -> None:
        if self.seen:
            raise VCUError(f"GPTQModel fell back from GPTQ for {len(self.seen)} module(s): {self.seen[0]}",
                           "the calibration forward overflowed: use --engine vcu128 (it retries a layer in float32)")


def quality_report(model: Path, qdir: Path, calib: Calibration, opts: QuantizeOptions) -> dict:
    """The report from whole transformers models built from the two folders (a second read of the
    model): for GPTQModel's checkpoints, which this project's walk does not make."""
    import torch

    from vcu128.format.checkpoint import GPTQCheckpoint
    from vcu128.quant.report import (
        layer_errors,
        load_checkpoint_model,
        load_float_model,
        perplexity,
    )

    ref = load_float_model(model, opts.device, torch.float16 if opts.device != "cpu" else torch.float32)
    ppl_ref = perplexity(ref, calib.eval_ids, opts.seqlen)
    layers = layer_errors(ref, GPTQCheckpoint(qdir), calib.eval_ids, opts.seqlen)
    del ref
    quant = load_checkpoint_model(qdir, opts.device, torch.float16 if opts.device != "cpu" else torch.float32)
    ppl_q = perplexity(quant, calib.eval_ids, opts.seqlen)
    return {"perplexity": {"fp16": ppl_ref, "gptq": ppl_q}, "layers": layers}


def format_report(report: dict) -> str:
    p = report["perplexity"]
    lines = [
        f"perplexity on {report['eval_tokens']} held-out tokens: fp16 {p['fp16']:.3f}, GPTQ W4 {p['gptq']:.3f} ({p['gptq'] / p['fp16'] - 1:+.2%})",
        "layer | relative output error, GPTQ | plain RTN | GPTQ / RTN",
    ]
    for row in report["layers"]:
        lines.append(f"{row['layer']:5d} | {row['gptq']:26.4f} | {row['rtn']:9.4f} | {row['gptq'] / row['rtn']:10.2f}")
    return "\n".join(lines)


def output_folder(model: Path, out: Path | None, wbits: int) -> Path:
    """Where quantize_model writes: `out`, or <model>-W<bits>A16-gptq beside the model."""
    return Path(out) if out else default_output(Path(model).resolve(), wbits)


def quantize_model(model: Path, out: Path | None, opts: QuantizeOptions, on_shard=None) -> tuple[Path, dict]:
    """Quantize into `out` (default <model>-W<bits>A16-gptq), atomically; returns (out, report).
    `on_shard`: a consumer of each checkpoint shard's tensors (layerwise.ShardSink; this project's
    engine only), called while the next layer is quantized."""
    check_arguments(opts)  # before the model is opened
    model = Path(model).resolve()
    cfg = check_model_folder(model)  # before transformers' import (seconds)
    check_seqlen(cfg, opts.seqlen, model / "config.json")
    check_memory(read_model_dims(model / "config.json"), opts, model / "config.json")
    out = output_folder(model, out, opts.wbits)
    if opts.lm_head and cfg.get("tie_word_embeddings"):
        raise VCUError(f"{model}: --lm_head with tie_word_embeddings: the output layer is the embedding "
                       "(leave --lm_head off; lm_head.py quantizes the tied embedding)")
    inputs = [model] + [Path(p) for p in (opts.calib, opts.eval_text) if p and p != "random"]
    check_out(out, "quantize", checkpoint_owns, inputs, opts.force, "--quantize_model")
    tokenizer = load_tokenizer(model)
    calib = build_calibration(tokenizer, opts.calib, opts.nsamples, opts.seqlen, opts.seed, opts.eval_text,
                              read_model_dims(model / "config.json").vocab,
                              evaluate=opts.report)
    if opts.engine == "gptqmodel":  # GPTQModel loads the model whole: look at every float first (this engine reads each tensor itself)
        scan_finite(model)
    # What the checkpoint was made from and how: the source model (its path and fingerprint, see
    # vcu128/io/uptodate.py), the calibration and every option (main.sh's stamps compare these too).
    report: dict = {"tool": TOOL, "step": "quantize", "model": str(model),
                    "made_from": {"model": str(model), "fingerprint": fingerprint(model)}, "calibration": calib.meta,
                    "settings": {k: v for k, v in vars(opts).items() if k not in ("calib", "eval_text", "force", "verbose")}}
    with staged_dir(out, "quantize", checkpoint_owns, inputs, opts.force, flag="--quantize_model") as stage:
        report["seconds_quantize"], stats, quality = run_gptq(model, stage, calib, opts, tokenizer, on_shard)
        if stats:
            report["activation_stats"] = stats
            warn_headroom(stats)
        _add_calibration_meta(stage, calib.meta)
        if opts.report:
            report.update(quality or quality_report(model, stage, calib, opts), eval_tokens=int(len(calib.eval_ids)))
        report["files"] = files_under(stage) + [REPORT_NAME]
        (stage / REPORT_NAME).write_text(dumps(report))
    return out, report


def warn_headroom(stats: dict) -> None:
    """One line when a site the board stores in fp16 passed half its range on the calibration data."""
    over = [(row["layer"], site, v) for row in stats["layers"] for site, v in row["max_abs"].items() if not v < TRIGGER]
    if over:
        layer, site, v = max(over, key=lambda o: float("inf") if o[2] != o[2] else o[2])
        log.warning(f"warning: {len(over)} sites pass half the fp16 range on the calibration data (largest: layer {layer}, "
                    f"{site}, {v:.4g}); compile_sw.py --fp16_rescale auto rescales the folder (quant_report.json lists them)")



def checkpoint_owns(folder: Path) -> set[str] | None:
    """A checkpoint quantize.py wrote: its quant_report.json lists the files (compile/ and whatever
    else is in the folder is carried over to a re-run's checkpoint). The report is read strictly:
    a damaged one is an error naming the file and key (--force replaces the folder anyway)."""
    doc = read_quant_report(folder)
    if doc is None:
        return None
    if doc.get("tool") == TOOL and "files" in doc:
        return set(doc["files"])
    if {"calibration", "settings", "seconds_quantize"} <= set(doc):  # an earlier version's report: its files are the top level ones
        return {p.name for p in Path(folder).iterdir() if p.is_file()}
    return None
