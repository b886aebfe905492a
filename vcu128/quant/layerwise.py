"""GPTQ over a whole model, one decoder layer at a time, written as a GPTQ (v1) checkpoint.

Only one layer's weights are on the device (and in host memory) at a time: the model is built
on the meta device and each layer is read from the safetensors files when its turn comes, then
written to its own checkpoint shard by a background thread while the next layer is quantized.

Inside a layer the calibration activations stay on the device, and each group of linears that
reads the same input sees the outputs of the groups quantized before it (GPTQ's "true
sequential" order, as GPTQModel runs it):

    q, k, v   <- input_layernorm(x)
    o         <- attention(quantized q, k, v)      (kept: it also gives the residual below)
    gate, up  <- post_attention_layernorm(x + o(attention))
    down      <- act(gate(.)) * up(.)
    x         <- the layer's output with every linear quantized: the next layer's input
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vcu128.board.stats import LINEAR_SITES
from vcu128.format.checkpoint import TensorView, check_finite, read_tensor_index
from vcu128.format.family import to_source_names
from vcu128.format.model import GROUP_SIZE, parse_model_dims
from vcu128.io.errors import VCUError, os_error_of
from vcu128.io.progress import bar
from vcu128.quant.gptq import (
    DAMP_PERCENT,
    DAMP_STEP,
    HessianAccumulator,
    dequantize,
    gptq_quantize,
    gptq_tensors,
)
from vcu128.quant.heldout import HeldOutReport, eval_windows

log = logging.getLogger("vcu128")

TOKENS_A_CHUNK = 16384  # calibration tokens a forward pass: large enough to fill a GPU, small enough for its memory

# Linears that read the same input, quantized together, in the order their inputs become known.
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
GATE_UP_FUSED = ("mlp.gate_up_proj",)  # transformers' glm: gate rows, then up rows
O_PROJ = ("self_attn.o_proj",)
DOWN = ("mlp.down_proj",)

TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


@dataclass
class GPTQRun:
    """Where a run's time went (seconds), for the log and the benchmark."""

    seconds: dict = field(default_factory=lambda: dict.fromkeys(("setup", "load", "forward_hessian", "gptq", "write_wait", "finish"), 0.0))
    dtype: object = None
    retried: list = field(default_factory=list)  # layers re-run in float32 after an fp16 overflow
    layer_seconds: list = field(default_factory=list)
    activation_stats: list = field(default_factory=list)  # per layer: {site: largest |value|}, gate range
    quality: dict | None = None  # the held-out report (quant/report.py HeldOutReport), when asked for

    def stats_report(self, dtype) -> dict:
        """quant_report.json's `activation_stats`: fp16 headroom per layer and site, the gate range."""
        gate = [s["gate_range"] for s in self.activation_stats if "gate_range" in s]
        return {
            "measured_on": "calibration samples, the quantized layers' outputs", "dtype": str(dtype).replace("torch.", ""),
            "layers": [{"layer": i, "max_abs": s["max_abs"]} for i, s in enumerate(self.activation_stats)],
            "gate_range": [min(g[0] for g in gate), max(g[1] for g in gate)] if gate else None,
        }


class SourceWeights:
    """The fp16/bf16 model's tensors under transformers' names (a ChatGLM folder's through its
    TensorView), read one at a time with positioned reads (no mmap). A decoder layer's tensors are
    read on a background thread while the layer before it is quantized (`prefetch`), into pinned
    host memory on a GPU machine, so the copy to the device is a DMA."""

    def __init__(self, model_dir: Path, pin: bool = False):
        self.dims = parse_model_dims(Path(model_dir) / "config.json")
        self.view = TensorView(read_tensor_index(Path(model_dir)), self.dims, Path(model_dir))
        self.pin = pin
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="weights-reader")

    def host(self, name: str, pin: bool | None = None) -> torch.Tensor:
        """One tensor on the host, in its stored dtype (pinned for a copy to the GPU)."""
        source = self.view.source_name(name)
        if not self.view.has(name):
            raise VCUError(f"{source}: missing from the model's safetensors files")
        dtype, _ = self.view.info(name)
        if dtype not in TORCH_DTYPES:
            raise VCUError(f"{source}: dtype {dtype}, expected fp16, bf16 or fp32")
        # Buffered: a model folder is often still in the page cache (just downloaded or converted),
        # and a GPU machine has the memory to keep it there.
        data = self.view.read(name, direct=False)
        check_finite(source, data, dtype)  # a NaN or inf in the model: refused by name, not quantized into garbage
        t = torch.from_numpy(data).view(TORCH_DTYPES[dtype])
        return t.pin_memory() if (self.pin if pin is None else pin) else t

    def get(self, name: str, device, dtype) -> torch.Tensor:
        return self.host(name).to(device=device, non_blocking=True).to(dtype)

    def prefetch(self, module: torch.nn.Module, prefix: str):
        """Start reading a module's tensors; the future gives {name: host tensor}."""
        names = [name for name, _ in module.named_parameters(prefix=prefix)]
        return self.reader.submit(lambda: {name: self.host(name) for name in names})

    def load_module(self, module: torch.nn.Module, prefix: str, device, dtype, host: dict | None = None) -> None:
        """Give a meta-device module real storage on `device` and fill it from `host` (a prefetch's
        result) or from the files."""
        module.to_empty(device=device)
        module.to(dtype)  # a retry in float32 reloads a layer built for a 16-bit type
        for name, p in module.named_parameters(prefix=prefix):
            t = host[name] if host is not None else self.host(name)
            p.copy_(t.to(device=device, non_blocking=True))
        if list(module.buffers()):
            raise VCUError(f"{prefix}: module has buffers this loader does not fill")

    def close(self) -> None:
        self.reader.shutdown(wait=True, cancel_futures=True)


def _save_shard(save_file, make, path: Path) -> None:
    """safetensors' save_file, its errors as an OSError naming the shard (a full disk is
    SafetensorError "... (os error 28)" there)."""
    try:
        save_file(make(), str(path), {"format": "pt"})
    except Exception as e:
        wrapped = os_error_of(e)
        if wrapped is None:
            raise
        raise OSError(wrapped.errno, wrapped.strerror, str(path)) from None


# A shard's tensors, handed to a caller's consumer as they are written: on_shard(index, {name: host
# tensor}), names and tensors exactly as in the shard. Index i < L (the model's layer count): decoder
# layer i; index L: the model's other tensors (embedding, final norm, float output layer), where they
# are written before the layers (not with the output layer quantized by GPTQ).
ShardSink = Callable[[int, dict[str, torch.Tensor]], None]
SINK_AHEAD = 4  # shards a consumer may be behind before GPTQ waits for it (host memory: a 7B layer's is 0.12 GB)


def _once(make):
    """make(), called once whoever asks first (the shard's writer or the consumer), its result shared."""
    lock, result = threading.Lock(), []

    def once():
        with lock:
            if not result:
                result.append(make())
        return result[0]

    return once


class CheckpointWriter:
    """Writes one safetensors shard a decoder layer (plus one for the rest) on a background thread,
    then the index; at most two shards are in flight, so host memory stays about two layers. With
    `on_shard`, the shards written with `to_sink` also go to that consumer, on a thread of its own
    (the GPU goes on with the next layer; quantize.py --compile writes compile_sw's files there)."""

    def __init__(self, out: Path, shards: int, on_shard: ShardSink | None = None):
        self.out = Path(out)
        self.shards = shards
        self.weight_map: dict[str, str] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-writer")
        self.pending = []
        self.on_shard = on_shard
        self.sink = ThreadPoolExecutor(1, thread_name_prefix="shard-sink") if on_shard is not None else None
        self.sinking = []  # the consumer's calls in flight

    def write(self, index: int, tensors: dict[str, torch.Tensor] | None = None, names: list[str] | None = None, make=None,
              to_sink: bool = False) -> float:
        """Queue a shard: `tensors` (may be on the device: copied to pinned memory without stopping
        the GPU's queue, and waited for on the writer thread), or the tensors `names` that `make()`
        returns on the writer thread; `to_sink`: for the consumer too.
        Returns seconds spent waiting for room."""
        from safetensors.torch import save_file

        name = f"model-{index + 1:05d}-of-{self.shards:05d}.safetensors"
        if tensors is not None:
            host = {k: self._to_host(v) for k, v in tensors.items()}
            copied = None
            if any(v.is_cuda for v in tensors.values()):
                copied = torch.cuda.Event()
                copied.record()
            names = list(host)

            def make():
                if copied is not None:
                    copied.synchronize()
                return host
        self.weight_map.update({k: name for k in names})
        start = time.perf_counter()
        while len(self.pending) >= 2:
            self.pending.pop(0).result()
        while len(self.sinking) >= SINK_AHEAD:
            self.sinking.pop(0).result()
        waited = time.perf_counter() - start
        if to_sink and self.sink is not None:
            make = _once(make)
            self.sinking.append(self.sink.submit(lambda: self.on_shard(index, make())))
        self.pending.append(self.pool.submit(_save_shard, save_file, make, self.out / name))
        return waited

    @staticmethod
    def _to_host(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().contiguous()
        if not t.is_cuda:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    def close(self) -> None:
        """Wait for every shard, then write the index."""
        self.drain()
        index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")

    def drain(self, raise_errors: bool = True) -> None:
        """Wait for the shards and the consumer's calls in flight (also when a run fails, so that no
        thread writes into a folder that is being removed; then the consumer's calls that have not
        started are dropped)."""
        pending, self.pending = self.pending + self.sinking, []
        self.sinking = []
        try:
            if raise_errors:
                for f in pending:
                    f.result()
            else:
                if self.sink is not None:
                    self.sink.shutdown(wait=False, cancel_futures=True)
                wait(pending)
        finally:
            self.pool.shutdown(wait=True)
            if self.sink is not None:
                self.sink.shutdown(wait=True)


def build_meta_model(model_dir: Path, dtype):
    from transformers import AutoModelForCausalLM

    from vcu128.quant.hfmodel import hf_config

    config = hf_config(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def compute_dtype(model_dir: Path, device: torch.device) -> torch.dtype:
    """The dtype the calibration forward runs in: on a GPU bf16 unless the config says float16 (models
    trained in bf16, or saved in fp32, can pass fp16's 65504: Qwen2-7B's massive activations do); on
    the CPU fp32 (it has no fast 16-bit matmul)."""
    if device.type != "cuda":
        return torch.float32
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return torch.float16 if (cfg.get("torch_dtype") or cfg.get("dtype")) == "float16" else torch.bfloat16


class Overflow(Exception):
    """A calibration forward produced a NaN or inf: where, and in which dtype."""

    def __init__(self, where: str, dtype: torch.dtype):
        super().__init__(f"{where} overflowed in {str(dtype).replace('torch.', '')}")
        self.where, self.dtype = where, dtype


def sliding_window_mask(cfg, seqlen: int, device, dtype=torch.float32):
    """A causal mask limited to the model's sliding window (Mistral), or None for plain causal
    attention: calibration must see what the model sees."""
    window = getattr(cfg, "sliding_window", None)
    use = getattr(cfg, "use_sliding_window", cfg.model_type == "mistral")
    if not use or window is None or window >= seqlen:
        return None
    i = torch.arange(seqlen, device=device)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return torch.where(allowed, 0.0, float("-inf")).to(dtype)[None, None]


def chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class LayerQuantizer:
    """GPTQ of one decoder layer's linears over activations x [samples, seqlen, hidden] (on the
    device, replaced in place by the quantized layer's output)."""

    def __init__(self, layer, x: torch.Tensor, position_embeddings, samples_a_chunk: int, run: GPTQRun, qmin: int = -8,
                 mask=None):
        self.layer, self.x, self.pos, self.mask = layer, x, position_embeddings, mask
        self.prefix = ""
        self.parts = chunks(x.shape[0], samples_a_chunk)
        self.run, self.qmin = run, qmin
        self.stats: dict[str, list[torch.Tensor]] = {}  # site -> per chunk [max |value|] or, for the gate, [.., min, max]
        self.results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def buffer(self, width: int) -> torch.Tensor | None:
        """An activation buffer [samples, seqlen, width] where the device has room for it twice over,
        else None. (Whether it is kept changes no result: the same values are computed either way.)"""
        x = self.x
        if x.is_cuda:
            free, _ = torch.cuda.mem_get_info(x.device)
            free += torch.cuda.memory_reserved(x.device) - torch.cuda.memory_allocated(x.device)
        else:
            try:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):  # no such query (macOS): recompute, as without room
                free = 0
        need = x.shape[0] * x.shape[1] * width * x.element_size()
        return torch.empty(*x.shape[:2], width, dtype=x.dtype, device=x.device) if 2 * need <= free else None

    def _sync(self) -> float:
        if self.x.is_cuda:
            torch.cuda.synchronize(self.x.device)
        return time.perf_counter()

    def hessian(self, inputs, what: str = "") -> torch.Tensor:
        """2/N sum x^T x over every chunk's input to a linear group, N the number of tokens; a
        non-finite Hessian (the forward overflowed) raises Overflow, naming the input."""
        start = self._sync()
        acc = None
        for part in self.parts:
            a = inputs(part)
            if acc is None:
                acc = HessianAccumulator(a.shape[-1], a.device)
            acc.add(a)
        H = acc.result()
        self.run.seconds["forward_hessian"] += self._sync() - start
        if not bool(torch.isfinite(H).all()):
            raise Overflow(f"{self.prefix}: the input of {what}", self.x.dtype)
        return H

    def quantize(self, names: tuple[str, ...], H: torch.Tensor, prefix: str) -> None:
        """GPTQ the linears `names` (one input, so one Hessian) as one matrix, then put their
        dequantized weights in place so that later groups see the quantized layer."""
        start = self._sync()
        mods = [self.layer.get_submodule(n) for n in names]
        W = torch.cat([m.weight for m in mods]) if len(mods) > 1 else mods[0].weight
        parent = names[0].rpartition(".")[0]  # "self_attn.q_proj+k_proj+v_proj", for messages
        label = f"{prefix}.{parent}.{'+'.join(n.rpartition('.')[2] for n in names)}"
        q, scales = gptq_quantize(W, H, label, self.qmin)
        row = 0
        for name, m in zip(names, mods, strict=True):
            rows = m.weight.shape[0]
            qs, ss = q[row : row + rows], scales[row : row + rows]
            m.weight.data.copy_(dequantize(qs, ss, m.weight.dtype))
            self.results[name] = (qs, ss)
            row += rows
        self.run.seconds["gptq"] += self._sync() - start

    def record(self, site: str, t: torch.Tensor) -> None:
        """The largest |value| a site took (what the board stores in fp16), and the gate's range. Kept
        on the device until the layer is done: reading each value back would stall the GPU."""
        t = t.detach()
        values = [torch.linalg.vector_norm(t, float("inf"))]  # max |value|, without an |t| copy
        if site == "gate":
            values += torch.aminmax(t)
        self.stats.setdefault(site, []).append(torch.stack(values).float())

    def summary(self) -> dict:
        """{"max_abs": {site: value}, "gate_range": [min, max]} over every chunk the layer saw."""
        sites = {site: torch.stack(v) for site, v in self.stats.items()}
        out = {"max_abs": {site: float(v[:, 0].max()) for site, v in sites.items()}}
        if "gate" in sites:
            out["gate_range"] = [float(sites["gate"][:, 1].min()), float(sites["gate"][:, 2].max())]
        return out

    def _hooks(self) -> list:
        hooks = []
        for name, site in LINEAR_SITES.items():
            if name in GATE_UP and fused_mlp(self.layer):
                continue
            module = self.layer.get_submodule(name)
            hooks.append(module.register_forward_hook(lambda m, inp, out, site=site: self.record(site, out)))
        if fused_mlp(self.layer):  # one product holds both sites: gate's columns, then up's
            def both(m, inp, out):
                gate, up = out.chunk(2, dim=-1)
                self.record("gate", gate)
                self.record("up", up)

            hooks.append(self.layer.mlp.gate_up_proj.register_forward_hook(both))
        down = self.layer.get_submodule("mlp.down_proj")
        hooks.append(down.register_forward_hook(lambda m, inp, out: self.record("mlp_product", inp[0])))
        return hooks

    def run_layer(self, prefix: str) -> None:
        hooks = self._hooks()
        try:
            self._run_layer(prefix)
        finally:
            for h in hooks:
                h.remove()

    def _run_layer(self, prefix: str) -> None:
        layer, x = self.layer, self.x
        self.prefix = prefix
        attn, mlp = layer.self_attn, layer.mlp
        self.quantize(QKV, self.hessian(lambda p: layer.input_layernorm(x[p]), "q/k/v_proj"), prefix)

        # The attention output before o_proj, for every sample: o_proj's input, and after o_proj
        # the residual stream, so attention runs once a layer. Its width is heads x head_dim, which
        # need not be hidden (Mistral-Nemo): then it gets a buffer of its own.
        q_dim = attn.o_proj.in_features
        h = torch.empty_like(x)
        a = h if q_dim == x.shape[-1] else torch.empty(*x.shape[:2], q_dim, dtype=x.dtype, device=x.device)
        o_proj = attn.o_proj
        attn.o_proj = torch.nn.Identity()
        try:
            def attention(p):
                a[p] = attn(hidden_states=layer.input_layernorm(x[p]), position_embeddings=self.pos, attention_mask=self.mask)[0]
                return a[p]

            H = self.hessian(attention, "o_proj")
        finally:
            attn.o_proj = o_proj
        self.quantize(O_PROJ, H, prefix)

        def residual(p):
            h[p] = x[p] + o_proj(a[p])
            self.record("residual_attention", h[p])
            return layer.post_attention_layernorm(h[p])

        self.quantize(GATE_UP_FUSED if fused_mlp(layer) else GATE_UP, self.hessian(residual, "gate/up_proj"), prefix)
        a = None  # the attention buffer is not needed past here (when it is not h)

        # down_proj's input act(gate) * up is the same before and after down_proj is quantized: kept
        # where the device has room (5 GB for a 7B's 256 x 512 tokens), it is not computed twice
        # (gate and up are a third of a layer's forward).
        product = self.buffer(mlp.down_proj.in_features)

        def mlp_inner(p):
            m = layer.post_attention_layernorm(h[p])
            if fused_mlp(layer):
                gate, up = mlp.gate_up_proj(m).chunk(2, dim=-1)
                y = up * mlp.activation_fn(gate)
            else:
                y = mlp.act_fn(mlp.gate_proj(m)) * mlp.up_proj(m)
            if product is not None:
                product[p] = y
            return y

        self.quantize(DOWN, self.hessian(mlp_inner, "down_proj"), prefix)
        start = self._sync()
        for p in self.parts:
            x[p] = h[p] + (mlp.down_proj(product[p]) if product is not None else mlp(layer.post_attention_layernorm(h[p])))
            self.record("residual_mlp", x[p])
        product = None  # free it before the next layer
        self.run.seconds["forward_hessian"] += self._sync() - start
        if not bool(torch.isfinite(x).all()):
            raise Overflow(f"{prefix}: its output (the residual stream)", x.dtype)


def fused_mlp(layer) -> bool:
    """transformers' glm keeps gate and up in one linear (their rows one after the other)."""
    return hasattr(layer.mlp, "gate_up_proj")


def warm_up(device: torch.device):
    """On a GPU, a thread that runs a tiny GPTQ while the model is being read: the first use of the
    Triton kernel (its compilation) and of the GPU's linear algebra libraries costs seconds."""
    if device.type != "cuda":
        return None

    def tiny_gptq():
        with torch.no_grad():
            x = torch.randn(512, 2 * GROUP_SIZE, device=device, dtype=torch.bfloat16)
            acc = HessianAccumulator(x.shape[1], device)
            acc.add(x)
            gptq_quantize(torch.randn(16, 2 * GROUP_SIZE, device=device), acc.result(), "warm-up")

    thread = threading.Thread(target=tiny_gptq, name="gptq-warm-up", daemon=True)
    thread.start()
    return thread


def layer_tensors(prefix: str, results: dict, source: dict[str, torch.Tensor], dims=None) -> dict[str, torch.Tensor]:
    """A layer's checkpoint tensors: GPTQ form for the linears; norms and biases in fp16 from the
    model's own values (`source`, as stored), not from the calibration's bf16 copies. Under the
    source model's own names (`dims`' family: ChatGLM's fused query_key_value, ...), as GPTQModel
    writes them, so that a user's other tools recognise the checkpoint."""
    out = {}
    for name, (q, scales) in results.items():
        for key, t in gptq_tensors(q, scales).items():
            out[f"{prefix}.{name}.{key}"] = t
    quantized = {f"{prefix}.{name}.weight" for name in results}
    out.update({name: t.half() for name, t in source.items() if name not in quantized})
    return out if dims is None else source_names(out, dims)


def source_names(tensors: dict[str, torch.Tensor], dims) -> dict[str, torch.Tensor]:
    """transformers' names to the source model's (format.family.to_source_names), torch tensors."""
    return to_source_names(tensors, dims, lambda parts, axis: torch.cat(parts, axis))


def quantization_config(lm_head: bool, qmin: int = -8, run: dict | None = None, int4: str | None = None) -> dict:
    """The checkpoint's quantization_config; `run` (torch version, device, threads, chunk size, dtype)
    says what a bit-identical re-run needs (README: Reproducibility); `int4`, the board's int4 code
    the grid was chosen for, is what the later steps follow (vcu128/format/int4_grid.py)."""
    from vcu128 import __version__
    from vcu128.format.int4_grid import META_CODE, META_GRID

    return {
        "bits": 4, "group_size": GROUP_SIZE, "sym": True, "desc_act": False, "static_groups": False,
        "true_sequential": True, "act_group_aware": True, "lm_head": lm_head,
        "damp_percent": DAMP_PERCENT, "damp_auto_increment": DAMP_STEP,
        "quant_method": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32",
        "meta": {"quantizer": [f"vcu128:{__version__}"], META_GRID: -qmin,
                 META_CODE: int4 or ("sign_magnitude" if qmin == -7 else "twos"), **({"vcu128_run": run} if run else {})},
    }


@torch.no_grad()
def quantize_checkpoint(model_dir: Path, out: Path, ids: np.ndarray, device: str, lm_head: bool = False,
                        samples_a_chunk: int | None = None, progress: bool = True, qmin: int = -8, int4: str | None = None,
                        eval_ids: np.ndarray | None = None, on_shard: ShardSink | None = None) -> GPTQRun:
    """GPTQ-quantize the model in `model_dir` on calibration token ids [samples, seqlen] into the
    folder `out`: safetensors shards, index, config.json, quantize_config.json. With held-out
    `eval_ids`, the quality report is measured in the same walk (run.quality). `on_shard(i, tensors)`
    (ShardSink) is called with each shard's tensors on a thread of its own, in the order they are
    written; an error it raises fails the run; every call has returned when this function returns."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    dtype = compute_dtype(model_dir, device)
    run = GPTQRun()
    start = time.perf_counter()
    warming = warm_up(device)  # the GPU's first GPTQ, the embedding's read and transformers' import overlap
    weights = SourceWeights(model_dir, pin=device.type == "cuda")
    writer = None
    try:
        reading = weights.reader.submit(weights.host, "model.embed_tokens.weight", False)  # copied once: not worth pinning
        model = build_meta_model(model_dir, dtype)
        inner, cfg = model.model, model.config
        n, seqlen = ids.shape
        samples_a_chunk = samples_a_chunk or max(1, TOKENS_A_CHUNK // seqlen)
        num_layers = cfg.num_hidden_layers
        writer = CheckpointWriter(out, num_layers + 1, on_shard)
        rest = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if cfg.tie_word_embeddings or lm_head else ["lm_head.weight"])
        if not lm_head:  # the shard of everything but the layers is the model's own: written while the GPU works
            writer.write(num_layers, names=[weights.view.source_name(n) for n in rest],
                         make=lambda: source_names({name: weights.host(name, pin=False).half() for name in rest}, weights.dims), to_sink=True)
        embed_host = reading.result()
        embed = embed_host.to(device).to(dtype)
        x = torch.empty(n, seqlen, cfg.hidden_size, dtype=dtype, device=device)
        tokens = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(device)
        for p in chunks(n, samples_a_chunk):
            x[p] = torch.nn.functional.embedding(tokens[p], embed)
        with device:  # a fresh rotary embedding: its inv_freq buffer is computed, not loaded
            rotary = type(inner.rotary_emb)(config=cfg)
        position_embeddings = rotary(x[:1], torch.arange(seqlen, device=device)[None])
        report = None
        if eval_ids is not None:
            windows = eval_windows(eval_ids, seqlen)
            length = windows.shape[1]
            report = HeldOutReport(windows, embed, rotary(x[:1], torch.arange(length, device=device)[None]),
                                   sliding_window_mask(cfg, length, device, dtype))
        del embed
        if not (report is not None and cfg.tie_word_embeddings):
            del embed_host  # else the output layer of the report's last step
        if warming is not None:
            warming.join()
        run.seconds["setup"] += time.perf_counter() - start

        mask = sliding_window_mask(cfg, seqlen, device, dtype)
        reading = weights.prefetch(inner.layers[0], "model.layers.0")
        for i in bar(range(num_layers), desc="GPTQ", unit="layer", enabled=progress):
            t0 = time.perf_counter()
            prefix = f"model.layers.{i}"
            layer = inner.layers[i]
            source = reading.result()
            if i + 1 < num_layers:  # the next layer is read while this one is quantized
                reading = weights.prefetch(inner.layers[i + 1], f"model.layers.{i + 1}")
            weights.load_module(layer, prefix, device, dtype, source)
            run.seconds["load"] += time.perf_counter() - t0
            if report is not None:
                report.before(layer)
            # fp16 can overflow where the model was trained in bf16: keep the layer's input to retry it
            kept = x.clone() if dtype == torch.float16 else None
            try:
                lq = LayerQuantizer(layer, x, position_embeddings, samples_a_chunk, run, qmin, mask)
                lq.run_layer(prefix)
            except Overflow as e:
                if kept is None:
                    raise VCUError(f"{e}: the model's own activations are not finite (check the model's weights)") from None
                log.warning(f"warning: {e}; retrying layer {i} and the rest of the model in float32")
                dtype = torch.float32
                x = kept.to(dtype)
                weights.load_module(layer, prefix, device, dtype, source)
                position_embeddings = tuple(t.to(dtype) for t in position_embeddings)
                mask = None if mask is None else mask.to(dtype)
                if report is not None:
                    report.to(dtype)
                    report.before(layer)
                lq = LayerQuantizer(layer, x, position_embeddings, samples_a_chunk, run, qmin, mask)
                lq.run_layer(prefix)
                run.retried.append({"layer": i, "where": e.where, "from": str(e.dtype).replace("torch.", ""), "to": "float32"})
            del kept
            if report is not None:
                report.after(layer, i, lq.results, source, prefix)
            run.activation_stats.append(lq.summary())
            run.seconds["write_wait"] += writer.write(i, layer_tensors(prefix, lq.results, source, weights.dims), to_sink=True)
            inner.layers[i] = torch.nn.Identity()  # drop the layer's device memory
            del layer, lq, source
            run.layer_seconds.append(time.perf_counter() - t0)

        if lm_head or report is not None:
            weights.load_module(inner.norm, "model.norm", device, dtype)
        output_layer = q = None
        if lm_head:  # the output layer sees the final norm of the last layer's (quantized) output
            acc = HessianAccumulator(cfg.hidden_size, device)
            for p in chunks(n, samples_a_chunk):
                acc.add(inner.norm(x[p]))
            output_layer = weights.get("lm_head.weight", device, dtype)
            q, scales = gptq_quantize(output_layer, acc.result(), "lm_head", qmin)
            last = {name: weights.host(name, pin=False).half() for name in rest}
            last.update({f"lm_head.{k}": v for k, v in gptq_tensors(q, scales).items()})
            writer.write(num_layers, source_names(last, weights.dims))
        del x
        if report is not None:
            if output_layer is None:
                output_layer = (embed_host if cfg.tie_word_embeddings else weights.host("lm_head.weight", pin=False)).to(device)
            run.quality = report.finish(inner.norm, output_layer, None if q is None else dequantize(q, scales))
            del report, output_layer
        t0 = time.perf_counter()
        writer.close()
        run.seconds["finish"] += time.perf_counter() - t0
    except BaseException:
        if writer is not None:
            writer.drain(raise_errors=False)
        raise
    finally:
        weights.close()
        if warming is not None:
            warming.join()

    config = json.loads((Path(model_dir) / "config.json").read_text())
    run_meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "threads": torch.get_num_threads(), "samples_a_chunk": samples_a_chunk,
                "dtype": str(dtype).replace("torch.", ""), "retried_in_float32": run.retried}
    config.update({"torch_dtype": "float16", "quantization_config": quantization_config(lm_head, qmin, run_meta, int4)})
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "quantize_config.json").write_text(json.dumps(quantization_config(lm_head, qmin, run_meta, int4), indent=2) + "\n")
    run.dtype = dtype
    for extra in ("generation_config.json",):
        if (Path(model_dir) / extra).is_file():
            (out / extra).write_bytes((Path(model_dir) / extra).read_bytes())
    return run
