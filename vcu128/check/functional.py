"""verify.py's functional check, streamed: the models run one decoder layer at a time, side by side
on the same tokens, so memory follows a layer (plus one compact int4 copy of the decoder for greedy
generation), not the model. The folder is read through `format.folder.PackedFolder`.

Models: `hardware` (the folder: the board's datapath in `board` numerics, with the folder's RoPE and
SiLU tables and its int4 output layer), `checkpoint` (the GPTQ checkpoint in fp32, its own output
layer), `hardware, exact SiLU` (board numerics with exact SiLU: what the piecewise table costs) and,
with --model, `fp16 original` (the unquantized model in fp32). The bit check shows that the folder's
decoder holds the checkpoint's bits (verify uses this check's answers only when it does), so both read
the decoder from one compact copy.

Reading overlaps computing: a reader thread reads the next decoder layer while the models run through
this one, and the output layers are read and decoded on threads while the decoder runs. On a GPU the
compact copy lives on the GPU (transposed there, in a moment, where numpy takes a tenth of a second a
7B layer), so greedy decoding neither reads nor copies a weight again.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vcu128.board.datapath import (
    BOARD_EPS,
    DEFAULT_VARIANT,
    FP16_MAX,
    BoardVariant,
    Int4Weight,
    KVCache,
    LayerWeights,
    NonFinite,
    Numerics,
    Shape,
    decoder_layer,
    final_norm,
)
from vcu128.check.inputs import FunctionalInputs
from vcu128.format.checkpoint import (
    GPTQCheckpoint,
    TensorView,
    read_tensor,
    read_tensor_index,
)
from vcu128.format.family import rotary_dim
from vcu128.format.folder import PackedFolder
from vcu128.format.layout import (
    OUT_WEIGHT_STEM,
    BinFile,
    offset_binary_bytes,
    read_port_rows,
    split_linear_rows,
    transposed,
)
from vcu128.format.model import (
    EMBEDDING,
    FINAL_NORM,
    GROUP_SIZE,
    LAYER_NORMS,
    LINEARS,
    LM_HEAD,
    read_model_config,
)
from vcu128.format.rescale import RescalePlan, module_factors, scale_fp16, tensor_factor
from vcu128.format.tables import (
    ACT_FILE,
    BOARD_HEAD_DIM,
    ROPE_ORDERS_OF,
    rope_cos_sin,
    rope_inv_freq,
)
from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import get_float
from vcu128.io.parallel import in_background
from vcu128.io.progress import bar

log = logging.getLogger("vcu128")

VOCAB_SLICE = 16384  # output-layer rows a matrix product: bounds memory to a slice of the vocabulary
EXACT_SILU = "hardware, exact SiLU"
SILU_EFFECT_TOKENS = 64  # evaluation tokens the exact-SiLU comparison runs on (its cost: a quarter of a model)


# ---------------------------------------------------------------------------------------------
# Where each model's weights come from


class CompactDecoder:
    """The checkpoint's decoder layers as the board holds them: int4 (two a byte) and fp16 scales,
    an eighth of fp32, kept once read (`keep`) so that greedy decoding does not read them again.

    The int4 bytes live on `device`. A reader thread reads the next layer while the caller computes
    with this one (layers are asked for in order), so at most one layer more is in memory. On a GPU
    each layer's weights are also kept as the models use them (scales widened and rescaled, per set
    of factors): greedy decoding then runs every token from the GPU's memory."""

    def __init__(self, ckpt: GPTQCheckpoint, keep: bool = True, device="cpu"):
        self.ckpt, self.keep, self.device = ckpt, keep, torch.device(device)
        self.layers: dict[int, dict] = {}
        # A CPU builds a layer's weights in milliseconds, and its memory is better kept for the int4
        # bytes; a GPU would copy the scales again for every greedy token.
        self.keep_built = keep and self.device.type != "cpu"
        self.built: dict[tuple, LayerWeights] = {}  # (layer, factors) -> the weights, with keep_built
        self.ahead: dict[int, Future] = {}  # layers being read
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="layer-reader")

    def raw(self, layer: int) -> dict:
        if layer in self.layers:
            return self.layers[layer]
        reading = self.ahead.pop(layer, None) or self.reader.submit(self.read, layer)
        following = layer + 1
        if following < self.ckpt.dims.num_layers and following not in self.layers and following not in self.ahead:
            self.ahead[following] = self.reader.submit(self.read, following)
        out = reading.result()
        if self.keep:
            self.layers[layer] = out
        return out

    def read(self, layer: int) -> dict:
        """One layer from the checkpoint: {module: (int4 bytes on the device, fp16 scales [chout, groups],
        fp16 bias or None), norm: float32 weights}."""
        c = self.ckpt
        out = {}
        for lin in LINEARS:
            name = lin.name(layer)
            bias = c.get_fp16(f"{name}.bias") if c.has(f"{name}.bias") else None
            out[lin.module] = (int4_bytes(c.get(f"{name}.qweight"), self.device), np.ascontiguousarray(c.get(f"{name}.scales").T), bias)
        for norm, _ in LAYER_NORMS:
            out[norm] = c.get_fp16(f"model.layers.{layer}.{norm}.weight").astype(np.float32)
        return out

    def layer(self, layer: int, factors: dict | None = None) -> LayerWeights:
        """The layer's weights on the device; `factors` (module -> power of two) rescale scales and
        biases as the folder holds them (FORMAT.md 7)."""
        key = (layer, tuple(sorted((factors or {}).items())))
        if key in self.built:
            return self.built[key]
        raw = self.raw(layer)
        on_device = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        linears = {}
        for lin in LINEARS:
            nibbles, scales, bias = raw[lin.module]
            f = (factors or {}).get(lin.module, 1.0)
            s = on_device(scale_fp16(scales, f, {}).astype(np.float32))
            b = None if bias is None else on_device(scale_fp16(bias, f, {}).astype(np.float32))
            linears[lin.module] = (Int4Weight(nibbles, s), b)
        w = LayerWeights(linears, on_device(raw["input_layernorm"]), on_device(raw["post_attention_layernorm"]))
        if self.keep_built:
            self.built[key] = w
        return w


def int4_bytes(qweight: np.ndarray, device) -> torch.Tensor:
    """GPTQ's qweight [chin/8, chout] as Int4Weight's bytes [chout, chin/2] on `device`, transposed
    there (a GPU does it in a moment): row c's bytes hold its inputs 2k, 2k+1 as q + 8 nibbles."""
    if torch.device(device).type == "cpu":  # numpy's one thread: torch's would be a second team on the models' cores
        return torch.from_numpy(transposed(qweight).view(np.uint8))
    return torch.from_numpy(qweight).to(device).T.contiguous().view(torch.uint8)


def float32_rows(entry, rows: slice | None = None, device="cpu") -> torch.Tensor:
    """A float tensor (fp16, bf16 or fp32 in its file), or a block of its rows, as float32 on `device`
    (a GPU gets fp16 and fp32 as stored and widens them there); read buffered: on a CPU the same rows
    are read again for every greedy token, from the page cache."""
    data = read_tensor(entry, rows=rows, direct=False)
    if entry.dtype == "BF16":  # bf16 is the top half of a float32
        data = (data.astype(np.uint32) << 16).view(np.float32)
    if torch.device(device).type == "cpu":
        return torch.from_numpy(data.astype(np.float32, copy=False))
    return torch.from_numpy(data).to(device).float()


class OriginalDecoder:
    """The unquantized model's layers (fp16/bf16/fp32 safetensors), read per use, under the pipeline's
    names (the checkpoint's dimensions and family)."""

    def __init__(self, model_dir: Path, dims):
        self.view = TensorView(read_tensor_index(Path(model_dir)), dims, Path(model_dir))

    def get(self, name: str) -> torch.Tensor:
        if not self.view.has(name):
            raise VCUError(f"{self.view.source_name(name)}: missing from the --model folder")
        dtype, _ = self.view.info(name)
        data = self.view.read(name, direct=False)
        if dtype == "BF16":
            return torch.from_numpy((data.astype(np.uint32) << 16).view(np.float32))
        return torch.from_numpy(data.astype(np.float32))

    def has(self, name: str) -> bool:
        return self.view.has(name)

    def entry(self, name: str):
        return self.view.entry(name)

    def layer(self, layer: int, factors=None) -> LayerWeights:
        linears = {}
        for lin in LINEARS:
            name = lin.name(layer)
            linears[lin.module] = (self.get(f"{name}.weight"), self.get(f"{name}.bias") if self.has(f"{name}.bias") else None)
        return LayerWeights(linears, self.get(f"model.layers.{layer}.input_layernorm.weight"),
                            self.get(f"model.layers.{layer}.post_attention_layernorm.weight"))


class OutputLayer:
    """An output layer: logits [N, vocab] for hidden [N, hidden], an int4 one through Int4Weight,
    a float one from `rows_fn(start, stop, device)` (float32 rows): a GPU holds it once as fp16, a
    CPU reads a slice of the vocabulary at a time (its fp16 copy stays on disk). What it holds may
    still be loading on a thread (`loading`: a Future of it), until its first use."""

    def __init__(self, vocab: int, int4: Int4Weight | None = None, rows_fn=None, loading: Future | None = None):
        self.vocab, self.int4, self.rows_fn, self.loading = vocab, int4, rows_fn, loading
        self.dense = None

    def load_on(self, device) -> None:
        """Start loading what a GPU holds of a float output layer, on a thread, beside the decoder's work."""
        if self.rows_fn is not None and self.loading is None and self.dense is None and torch.device(device).type == "cuda":
            self.loading = in_background(self.fp16_table, device)

    def fp16_table(self, device) -> torch.Tensor:
        return torch.cat([self.rows_fn(a, min(a + VOCAB_SLICE, self.vocab), device).half() for a in range(0, self.vocab, VOCAB_SLICE)])

    def wait(self) -> None:
        """What is loading (an int4 layer's Int4Weight, or the fp16 table a GPU holds of a float one),
        in place; its error, if it failed, raised here."""
        if self.loading is not None:
            held = self.loading.result()
            if isinstance(held, Int4Weight):
                self.int4 = held
            else:
                self.dense = held
            self.loading = None

    def logits(self, h: torch.Tensor, group_rounding: str | None = None) -> torch.Tensor:
        """h [N, hidden] @ W.T, fp32 (the caller stores them as its numerics do); an int4 layer in
        the grouped accumulation where `group_rounding` is set (Numerics.group_rounding)."""
        self.wait()
        if self.int4 is not None:
            self.int4 = self.int4.to(h.device)  # moved once: greedy decoding uses it every token
            return self.int4.apply(h, group_rounding)
        if h.is_cuda:  # a GPU holds the fp16 table once, instead of reading it again for every token
            if self.dense is None:
                self.dense = self.fp16_table(h.device)
            return h @ self.dense.float().T
        out = torch.empty(h.shape[0], self.vocab, device=h.device)
        for start in range(0, self.vocab, VOCAB_SLICE):
            stop = min(start + VOCAB_SLICE, self.vocab)
            out[:, start:stop] = h @ self.rows_fn(start, stop, h.device).T
        return out


def packed_output_layer(folder: PackedFolder, hidden: int, vocab: int, device="cpu") -> OutputLayer:
    """The folder's int4 output layer, taken once from its port words into Int4Weight form (byte for
    byte: its nibbles are already in input order) on `device`: read and decoded on a thread (the files
    are opened, and their sizes checked, here)."""
    files = folder.open_linear(OUT_WEIGHT_STEM, hidden, vocab)
    ports, code = folder.ports, folder.assumptions.int4

    def decode() -> Int4Weight:
        nibbles = np.empty((vocab, hidden // 2), np.uint8)
        scales = np.empty((vocab, hidden // GROUP_SIZE), np.float32)
        step = max(ports, VOCAB_SLICE // ports * ports)
        for start in range(0, vocab, step):
            stop = min(start + step, vocab)
            weight_words, halves = split_linear_rows(read_port_rows(files, start, stop), hidden)
            nibbles[start:stop] = offset_binary_bytes(weight_words, code)
            scales[start:stop] = halves[:, : hidden // GROUP_SIZE].view("<f2")
        return Int4Weight(torch.from_numpy(nibbles), torch.from_numpy(scales)).to(device)

    return OutputLayer(vocab, loading=in_background(decode))


def checkpoint_output_layer(ckpt: GPTQCheckpoint, device="cpu") -> OutputLayer:
    """The checkpoint's own output layer: GPTQ's int4 one (read and transposed on a thread), or its
    float lm_head or tied embedding."""
    src, vocab = ckpt.lm_head_source(), ckpt.dims.vocab
    if src == "lm_head":
        def decode() -> Int4Weight:
            scales = torch.from_numpy(np.ascontiguousarray(ckpt.get("lm_head.scales").T).astype(np.float32))
            return Int4Weight(int4_bytes(ckpt.get("lm_head.qweight"), device), scales.to(device))

        return OutputLayer(vocab, loading=in_background(decode))
    entry = ckpt._entry(src)
    return OutputLayer(vocab, rows_fn=lambda start, stop, on="cpu": float32_rows(entry, slice(start, stop), on))


def original_output_layer(orig: OriginalDecoder, tied: bool, vocab: int) -> OutputLayer:
    name = EMBEDDING if tied or not orig.has(f"{LM_HEAD}.weight") else f"{LM_HEAD}.weight"
    entry = orig.entry(name)
    return OutputLayer(vocab, rows_fn=lambda start, stop, on="cpu": float32_rows(entry, slice(start, stop), on))


def hardware_embedding(folder: PackedFolder, vocab: int, hidden: int):
    rows_a_part = vocab // folder.parts
    files = [BinFile(folder.path / rel, "<f2", (rows_a_part, hidden)) for rel in folder.embedding_part_names()]

    def embed(ids: np.ndarray) -> torch.Tensor:
        flat = ids.reshape(-1)
        out = np.empty((flat.size, hidden), np.float32)
        for j, t in enumerate(flat):  # a few hundred tokens: one row read each
            part, r = divmod(int(t), rows_a_part)
            out[j] = files[part].read_rows(r, r + 1)[0]
        return torch.from_numpy(out).view(*ids.shape, hidden)

    return embed


def checkpoint_embedding(get_rows, hidden: int):
    def embed(ids: np.ndarray) -> torch.Tensor:
        flat = ids.reshape(-1)
        out = np.stack([get_rows(int(t)) for t in flat]).astype(np.float32)
        return torch.from_numpy(out).view(*ids.shape, hidden)

    return embed


# ---------------------------------------------------------------------------------------------
# The models, run side by side


@dataclass
class ModelRun:
    name: str
    numerics: Numerics
    decoder: object  # CompactDecoder or OriginalDecoder
    embed: object
    output: OutputLayer
    final_norm: torch.Tensor
    factors: dict = field(default_factory=dict)  # layer -> {module: power of two}


class Stopped(Exception):
    """The caller no longer wants the answer (verify: the bit check, run beside, found a difference)."""


def check_stop(stop: Callable[[], bool] | None) -> None:
    if stop is not None and stop():
        raise Stopped


def forward(models: list[ModelRun], ids: dict, shape: Shape, num_layers: int, start: int = 0,
            caches: dict | None = None, progress: bool = False, desc: str = "", device="cpu",
            stop: Callable[[], bool] | None = None) -> dict:
    """Every model's logits [B, T, vocab] for its ids [B, T] at positions start.., one decoder layer at
    a time: each layer's weights are made once, and models that share them run through it together
    (an int4 weight decoded once for all). `stop() -> True` between layers raises Stopped."""
    x = {m.name: m.embed(ids[m.name]).to(device) for m in models}
    for layer in bar(range(num_layers), desc, "layer", enabled=progress):
        check_stop(stop)
        groups: dict = {}
        for m in models:
            key = (id(m.decoder), tuple(sorted(m.factors.get(layer, {}).items())))
            groups.setdefault(key, []).append(m)
        for group in groups.values():
            w = group[0].decoder.layer(layer, group[0].factors.get(layer)).to(device)
            cs = [caches[m.name][layer] for m in group] if caches is not None else None
            outs = decoder_layer([x[m.name] for m in group], w, shape, [m.numerics for m in group], layer, start, cs)
            for m, out in zip(group, outs, strict=True):
                x[m.name] = out
            del w
    out = {}
    by_output: dict = {}
    for m in models:
        by_output.setdefault((id(m.output), m.numerics.group_rounding), []).append(m)
    for group in by_output.values():
        hs = [final_norm(x[m.name], m.final_norm.to(device), m.numerics) for m in group]
        logits = group[0].output.logits(torch.cat([h.reshape(-1, h.shape[-1]) for h in hs]), group[0].numerics.group_rounding)
        row = 0
        for m, h in zip(group, hs, strict=True):
            n = h.shape[0] * h.shape[1]
            out[m.name] = m.numerics.store(logits[row : row + n], "final", "logits").view(h.shape[0], h.shape[1], -1)
            row += n
    return out


def greedy(models: list[ModelRun], prompt: np.ndarray, tokens: int, shape: Shape, num_layers: int, progress: bool,
           device="cpu", stop: Callable[[], bool] | None = None) -> dict:
    """Each model's greedy continuation of the prompt, with a KV cache per model and layer."""
    caches = {m.name: [KVCache() for _ in range(num_layers)] for m in models}
    ids = {m.name: prompt[None, :] for m in models}
    generated = {m.name: [] for m in models}
    pos = 0
    for _ in bar(range(tokens), "greedy", "token", enabled=progress):
        logits = forward(models, ids, shape, num_layers, pos, caches, device=device, stop=stop)
        pos += next(iter(ids.values())).shape[1]
        for m in models:
            nxt = int(logits[m.name][0, -1].argmax())
            generated[m.name].append(nxt)
            ids[m.name] = np.array([[nxt]])
    return generated


# ---------------------------------------------------------------------------------------------
# The check


def folder_tables(folder: PackedFolder, cfg: dict, dims, positions: int, where: Path):
    """cos, sin [positions, rotary_dim/2] and the SiLU table the folder holds, for the board-numerics
    model; computed when absent."""
    head_dim, order = dims.head_dim, ROPE_ORDERS_OF[dims.family.rope][0]
    held = folder.rope_cos_sin(positions, order) if head_dim == BOARD_HEAD_DIM else None
    if held is not None:
        cos, sin = held
        source = folder.describe_rope(order)
    else:
        cos, sin = rope_cos_sin(cfg, rotary_dim(dims), positions, where)
        source = "computed (no table in the folder)" if head_dim == BOARD_HEAD_DIM else f"computed (head_dim {head_dim})"
    return torch.from_numpy(cos[:positions].astype(np.float32)), torch.from_numpy(sin[:positions].astype(np.float32)), folder.silu_table(), source


@dataclass
class CheckpointSetup:
    """What every run of the checkpoint's model needs: its dimensions, fp32 RoPE, one compact copy of
    the decoder, its embedding, output layer and final norm (shared by verify and the k search)."""

    ckpt: GPTQCheckpoint
    cfg: dict
    shape: Shape
    eps: float
    cos32: torch.Tensor
    sin32: torch.Tensor
    decoder: CompactDecoder
    embed: object
    output: OutputLayer
    final_norm: torch.Tensor

    @classmethod
    def build(cls, ckpt: GPTQCheckpoint, positions: int, device="cpu", keep: bool = True) -> "CheckpointSetup":
        d = ckpt.dims
        where = ckpt.qdir / "config.json"
        cfg = read_model_config(where)
        cos32, sin32 = (torch.from_numpy(a.astype(np.float32)).to(device) for a in _fp32_rope(cfg, rotary_dim(d), positions, where))
        embed = checkpoint_embedding(lambda t: ckpt.get_fp16(EMBEDDING, rows=slice(t, t + 1))[0], d.hidden)
        return cls(ckpt, cfg, Shape(d.num_heads, d.num_kv_heads, d.head_dim, d.family.rope), model_eps(cfg, where), cos32, sin32,
                   CompactDecoder(ckpt, keep, device), embed, checkpoint_output_layer(ckpt, device),
                   torch.from_numpy(ckpt.get_fp16(f"{FINAL_NORM}.weight").astype(np.float32)))

    def run(self, name: str) -> ModelRun:
        """The checkpoint's own model in fp32."""
        return ModelRun(name, Numerics(name, False, self.eps, self.cos32, self.sin32), self.decoder, self.embed, self.output, self.final_norm)

    def board_run(self, name: str, cos: torch.Tensor, sin: torch.Tensor, rescale: RescalePlan | None, *, silu=None,
                  variant: BoardVariant = DEFAULT_VARIANT, embed=None, output: OutputLayer | None = None) -> ModelRun:
        """The checkpoint's decoder as a folder holds it (its fp16 factors), in board numerics."""
        d = self.ckpt.dims
        factors = {i: module_factors(rescale, i) for i in range(d.num_layers)}
        numerics = Numerics(name, True, BOARD_EPS, cos, sin, silu, variant)
        return ModelRun(name, numerics, self.decoder, embed or _scaled_embed(self.embed, tensor_factor(rescale, EMBEDDING)),
                        output or self.output, self.final_norm, factors)


def functional_check(ckpt: GPTQCheckpoint, folder: PackedFolder, inputs: FunctionalInputs, *, tokens: int, numerics: str = "board",
                     model: Path | None = None, variant: BoardVariant = DEFAULT_VARIANT, variants: tuple[BoardVariant, ...] = (),
                     lm_head_from_checkpoint: bool = False, progress: bool = True, device: str = "cpu",
                     stop: Callable[[], bool] | None = None) -> dict:
    """The folder's model (board numerics in `variant`, and in each of `variants` beside it, on the
    same tokens) next to the checkpoint's model in fp32 (and the fp16 original with `model`).
    `stop() -> True`, asked between layers, abandons the check (Stopped)."""
    d = ckpt.dims
    positions = max(len(inputs.eval_ids), len(inputs.prompt_ids) + tokens)
    setup = CheckpointSetup.build(ckpt, positions, device)
    cos_b, sin_b, silu, rope_source = folder_tables(folder, setup.cfg, d, positions, ckpt.qdir / "config.json")
    cos_b, sin_b = cos_b.to(device), sin_b.to(device)
    hw_out = setup.output if lm_head_from_checkpoint else packed_output_layer(folder, d.hidden, d.vocab, device)
    hw_embed = hardware_embedding(folder, d.vocab, d.hidden) if folder.parts else None

    board = numerics == "board"
    if board:
        hardware = setup.board_run("hardware", cos_b, sin_b, folder.rescale, silu=silu, variant=variant, embed=hw_embed, output=hw_out)
    else:
        hardware = setup.run("hardware")
        hardware.embed, hardware.output = hw_embed or _scaled_embed(setup.embed, tensor_factor(folder.rescale, EMBEDDING)), hw_out
        hardware.factors = {i: module_factors(folder.rescale, i) for i in range(d.num_layers)}
    hw_num = hardware.numerics
    models = [hardware, setup.run("checkpoint")]
    if board and silu is not None:
        models.append(setup.board_run(EXACT_SILU, cos_b, sin_b, folder.rescale, variant=variant, embed=hw_embed, output=hw_out))
    others = [v for v in variants if v != variant] if board else []
    for v in others:
        models.append(setup.board_run(variant_model(v), cos_b, sin_b, folder.rescale, silu=silu, variant=v, embed=hw_embed, output=hw_out))
    if model:
        orig = OriginalDecoder(model, d)
        tied = bool(read_model_config(Path(model) / "config.json").get("tie_word_embeddings", False))
        models.append(ModelRun("fp16 original", Numerics("fp16 original", False, setup.eps, setup.cos32, setup.sin32), orig,
                               checkpoint_embedding(lambda t: _orig_row(orig, t), d.hidden),
                               original_output_layer(orig, tied, d.vocab), orig.get(f"{FINAL_NORM}.weight")))
    shape = setup.shape
    for out in {id(m.output): m.output for m in models}.values():
        out.load_on(device)

    result: dict = {"numerics": numerics, "device": str(device), "eval": {"tokens": int(len(inputs.eval_ids)), "source": inputs.source},
                    "rope": rope_source, "silu": "table " + ACT_FILE if board and silu is not None else "exact",
                    "norm_eps": hw_num.eps, "centred_variance": hw_num.centred_variance,
                    "variant": variant.name if board else None, "variant_set": [variant.name] + [v.name for v in others] if board else [],
                    "lm_head_from_checkpoint": lm_head_from_checkpoint}
    try:
        with torch.no_grad():
            ids = {m.name: inputs.eval_ids[None, :] for m in models}
            if EXACT_SILU in ids:  # what the table costs needs fewer tokens: causal, so they are the first ones
                ids[EXACT_SILU] = ids[EXACT_SILU][:, :SILU_EFFECT_TOKENS]
            logits = forward(models, ids, shape, d.num_layers, progress=progress, desc="functional", device=device, stop=stop)
            if EXACT_SILU in logits:
                exact = logits.pop(EXACT_SILU)
                result["silu_effect"] = compare({"exact": exact, "table": logits["hardware"][:, : exact.shape[1]]}, "exact")["table"]
                result["silu_effect"]["tokens"] = int(exact.shape[1])
            result["against_hardware"] = compare(logits, "hardware")
            result["against_checkpoint"] = {"hardware": result["against_hardware"]["checkpoint"]}
            board_runs = [m for m in models if m is hardware or m.name.startswith("hardware [")] if board else []
            on_checkpoint = compare({m.name: logits[m.name] for m in board_runs} | {"checkpoint": logits["checkpoint"]}, "checkpoint")
            del logits
            generated = greedy([m for m in models if m.name != EXACT_SILU], inputs.prompt_ids, tokens, shape, d.num_layers, progress, device,
                               stop)
    except NonFinite as e:
        result.update(ok=False, nonfinite={"model": e.model, "layer": e.layer, "site": e.site}, error=str(e))
        result["saturation"] = hw_num.stats.saturation_list()
        return result
    hw_tokens = generated["hardware"]
    result["greedy"] = {name: {"tokens": g, "text": inputs.decode(g) if inputs.decode else None} for name, g in generated.items()}
    result["prompt_tokens"] = [int(t) for t in inputs.prompt_ids]
    for name, r in result["against_hardware"].items():
        gen = generated[name]
        r["greedy_tokens_equal"] = gen == hw_tokens
        r["greedy_common_prefix"] = next((i for i, (a, b) in enumerate(zip(gen, hw_tokens, strict=True)) if a != b), len(gen))
    result["saturation"] = hw_num.stats.saturation_list() if board else []
    if board:
        result["variants"] = {m.numerics.variant.name: {**on_checkpoint[m.name], "greedy_tokens_equal": generated[m.name] == generated["checkpoint"],
                                                        "saturated_sites": len(m.numerics.stats.saturation_list())}
                              for m in board_runs}
        result["unknowns"] = unknowns(d)
    result["headroom"] = headroom(models[1].numerics.stats)
    result["ok"] = True
    return result


# What no variant covers (docs/FORMAT.md 6): said with every result that names variants.
UNKNOWNS = ("softmax internals (the precision of its exp and divider)", "whether the RTL saturates and flushes as the references do",
            "the Qwen-mode RoPE pairing (rotate-half assumed)")


def unknowns(dims) -> list[str]:
    """UNKNOWNS for this model: GLM's RoPE pairing is the reference's own (tasks_EMB.vh), Qwen's is not."""
    return [u for u in UNKNOWNS if dims.family.rope == "rotate_half" or "Qwen-mode" not in u]


def variant_model(v: BoardVariant) -> str:
    return f"hardware [{v.name}]"


def _orig_row(orig: OriginalDecoder, t: int) -> np.ndarray:
    return float32_rows(orig.entry(EMBEDDING), slice(t, t + 1))[0].numpy()


def _scaled_embed(embed, factor: float):
    return embed if factor == 1.0 else (lambda ids: (embed(ids) * factor).half().float())


def model_eps(cfg: dict, where: Path) -> float:
    """The RMSNorm eps the model was trained with (ChatGLM calls it layernorm_epsilon), read strictly."""
    key = "layernorm_epsilon" if "rms_norm_eps" not in cfg and "layernorm_epsilon" in cfg else "rms_norm_eps"
    return get_float(cfg, key, where, 1e-6)


def _fp32_rope(cfg: dict, head_dim: int, positions: int, where: Path):
    """transformers' cos/sin in fp32 (not rounded): the checkpoint model's."""
    inv = torch.from_numpy(rope_inv_freq(cfg, head_dim, where))
    freqs = torch.arange(positions, dtype=torch.int64).float()[:, None] * inv[None, :]
    return freqs.cos().numpy(), freqs.sin().numpy()


def compare(logits: dict, ref_name: str) -> dict:
    """Top-1 agreement and relative logit error of every model against `ref_name`."""
    ref = logits[ref_name].float()
    out = {}
    for name, lg in logits.items():
        if name == ref_name:
            continue
        lg = lg.float()
        out[name] = {
            "top1_agreement": float((lg.argmax(-1) == ref.argmax(-1)).float().mean()),
            "relative_logit_error": float((lg - ref).norm() / lg.norm()),
        }
    return out


def headroom(stats) -> dict:
    """The fp32 model's largest |value| per site, and the sites above half the fp16 range."""
    rows = [r for r in stats.headroom_list() if isinstance(r["layer"], int)]
    flagged = [r for r in rows if r["max_abs"] > FP16_MAX / 2]
    by_site: dict = {}
    for r in rows:
        by_site[r["site"]] = max(by_site.get(r["site"], 0.0), r["max_abs"])
    return {"max_abs_by_site": by_site, "above_half_fp16_range": flagged}


def format_functional(result: dict) -> str:
    lines = []
    if not result.get("ok", False):
        return f"functional check FAILED: {result.get('error')}"
    p = result.get("prompt_tokens")
    lines.append(f"greedy continuation ({len(p)} prompt tokens; hardware models in {result['numerics']} numerics, checkpoint and fp16 original in fp32):")
    for name, g in result["greedy"].items():
        lines.append(f"  {name:>22}: {g['text']!r}" if g["text"] is not None else f"  {name:>22}: {g['tokens']}")
    lines.append(f"against the hardware model, on {result['eval']['tokens']} evaluation tokens ({result['eval']['source']}):")
    lines.append("  model                  | top-1 agreement | relative logit error | same greedy tokens")
    for name, r in result["against_hardware"].items():
        same = "yes" if r["greedy_tokens_equal"] else f"first {r['greedy_common_prefix']}"
        lines.append(f"  {name:<22} | {r['top1_agreement']:15.4f} | {r['relative_logit_error']:20.5f} | {same}")
    variants = result.get("variants") or {}
    if len(variants) > 1:
        lines.append("each board-model variant against the checkpoint (what public code cannot tell; docs/FORMAT.md, The emulator):")
        lines.append("  variant                              | top-1 agreement | relative logit error | same greedy tokens | saturated sites")
        for name, r in variants.items():
            lines.append(f"  {name:<36} | {r['top1_agreement']:15.4f} | {r['relative_logit_error']:20.5f} | "
                         f"{'yes' if r['greedy_tokens_equal'] else 'no':>18} | {r['saturated_sites']}")
        lines.append("  not covered by any variant: " + "; ".join(result.get("unknowns") or []))
    if "silu_effect" in result:
        e = result["silu_effect"]
        lines.append(f"the folder's piecewise SiLU against exact SiLU, on the first {e['tokens']} tokens: top-1 agreement "
                     f"{e['top1_agreement']:.4f}, relative logit error {e['relative_logit_error']:.5f}")
    sat = result.get("saturation") or []
    if sat:
        worst = ", ".join(f"layer {s['layer']} {s['site']} ({s['count']})" for s in sat[:6])
        lines.append(f"fp16 saturation in the board model at {len(sat)} sites: {worst}" + (" ..." if len(sat) > 6 else ""))
    flagged = result.get("headroom", {}).get("above_half_fp16_range") or []
    if flagged:
        worst = ", ".join(f"layer {f['layer']} {f['site']} ({f['max_abs']:.0f})" for f in flagged[:6])
        lines.append(f"sites above half the fp16 range in the fp32 model: {worst}")
    return "\n".join(lines)
