"""quantize's quality report: perplexity of the fp16 model and of the GPTQ model on held-out text,
and per decoder layer GPTQ's output error next to plain round-to-nearest's.

`HeldOutReport` measures it inside GPTQ's own walk through the model (quant/layerwise.py), a layer
at a time, on the layer already in device memory: no second read of the model. The whole-model
functions below measure the same from transformers models built from the folders
(`load_float_model`, `load_checkpoint_model`): GPTQModel's checkpoints are measured so, and the
tests hold the walk's numbers to them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.model import GROUP_SIZE
from vcu128.quant.gptq import dequantize


def rtn_symmetric(w: torch.Tensor) -> torch.Tensor:
    """Plain round-to-nearest on GPTQ's own symmetric 4-bit grid (scale = 2 max|w| / 15, zero 8),
    per group of 128 inputs: the baseline GPTQ has to beat."""
    chout, chin = w.shape
    g = w.float().view(chout, -1, GROUP_SIZE)
    scale = (g.abs().amax(-1, keepdim=True) * 2 / 15).clamp_min(1e-10)
    q = (torch.round(g / scale) + 8).clamp(0, 15)
    return ((q - 8) * scale).view(chout, chin)


def checkpoint_linear(ckpt: GPTQCheckpoint, prefix: str, device) -> torch.Tensor:
    q = torch.from_numpy(ckpt.signed_weights(ckpt.get(f"{prefix}.qweight")))
    scales = torch.from_numpy(np.ascontiguousarray(ckpt.get(f"{prefix}.scales").T))
    return dequantize(q.to(device), scales.to(device))


def plain_config(qdir: Path):
    """The model's config without quantization_config, so transformers builds plain nn.Linear."""
    from vcu128.quant.hfmodel import hf_config

    return hf_config(qdir, plain=True)


def build_empty_model(config, device, dtype=torch.float16):
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@torch.no_grad()
def load_checkpoint_model(qdir: Path, device="cpu", dtype=torch.float16):
    """A transformers model whose linears hold the checkpoint's dequantized GPTQ weights."""
    ckpt = GPTQCheckpoint(qdir)
    model = build_empty_model(plain_config(qdir), device, dtype)
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, param in model.named_parameters():  # transformers' names, read through the checkpoint's view
        prefix = name.rpartition(".")[0]
        if name.endswith(".weight") and ckpt.has(f"{prefix}.qweight"):
            param.copy_(checkpoint_linear(ckpt, prefix, device))
        elif ckpt.has(name):
            param.copy_(torch.from_numpy(ckpt.get(name)))
        elif not (tied and name == "lm_head.weight"):
            raise ValueError(f"{name}: the checkpoint has no tensor for it")
    if tied:
        model.tie_weights()
    return model


@torch.no_grad()
def load_float_model(model_dir: Path, device="cpu", dtype=torch.float16):
    """The fp16/bf16 model as transformers computes it; a ChatGLM folder as transformers' glm."""
    from vcu128.format.model import parse_model_dims
    from vcu128.quant.layerwise import SourceWeights

    if parse_model_dims(Path(model_dir) / "config.json").family.name == "qwen2":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    from vcu128.quant.hfmodel import hf_config

    model = build_empty_model(hf_config(model_dir, plain=True), device, dtype)
    weights = SourceWeights(model_dir)
    try:
        for name, param in model.named_parameters():
            param.copy_(weights.host(name, pin=False).to(dtype))
    finally:
        weights.close()
    return model


@torch.no_grad()
def perplexity(model, ids: np.ndarray, seqlen: int, max_windows: int = 64, batch: int = 4) -> float:
    """exp(mean next-token loss) over consecutive windows of `seqlen` tokens."""
    device = next(model.parameters()).device
    n = min(max_windows, max(1, len(ids) // seqlen))
    seqlen = min(seqlen, len(ids) // n)
    windows = torch.from_numpy(np.asarray(ids[: n * seqlen])).view(n, seqlen)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x = windows[i : i + batch].to(device)
        logits = model(x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += x[:, 1:].numel()
    return float(np.exp(total / count))


@torch.no_grad()
def layer_errors(model, ckpt: GPTQCheckpoint, ids: np.ndarray, seqlen: int, windows: int = 4) -> list[dict]:
    """Per decoder layer, ||X W_q^T - X W^T|| / ||X W^T|| of GPTQ's weights and of plain RTN, with X
    the inputs each linear of the fp16 `model` sees on held-out text (the same X for both)."""
    device = next(model.parameters()).device
    sums: dict[int, dict[str, float]] = {}
    hooks = []

    def hook(layer: int, prefix: str):
        def fn(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            ref = output.reshape(-1, output.shape[-1]).float()
            if module.bias is not None:
                ref = ref - module.bias.float()
            acc = sums.setdefault(layer, {"ref": 0.0, "gptq": 0.0, "rtn": 0.0})
            acc["ref"] += float(ref.square().sum())
            for key, w in (("gptq", checkpoint_linear(ckpt, prefix, device)), ("rtn", rtn_symmetric(module.weight))):
                acc[key] += float((x @ w.T - ref).square().sum())

        return fn

    for layer in range(ckpt.dims.num_layers):  # every linear as transformers has it (glm: gate_up_proj whole)
        for rel, module in model.get_submodule(f"model.layers.{layer}").named_modules():
            if isinstance(module, torch.nn.Linear):
                hooks.append(module.register_forward_hook(hook(layer, f"model.layers.{layer}.{rel}")))
    try:
        n = max(1, min(windows, len(ids) // seqlen))
        seqlen = min(seqlen, len(ids) // n)
        model(torch.from_numpy(np.asarray(ids[: n * seqlen])).view(n, seqlen).to(device))
    finally:
        for h in hooks:
            h.remove()
    return [
        {"layer": layer, "gptq": (s["gptq"] / s["ref"]) ** 0.5, "rtn": (s["rtn"] / s["ref"]) ** 0.5}
        for layer, s in sorted(sums.items())
    ]


def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """X W^T in float32, X [tokens, chin] as the stream holds it, W [chout, chin]. On a GPU a 16-bit
    X meets W in its dtype on the tensor cores with a float32 output (add_to_hessian's reasoning);
    an error is measured as X (W_q - W)^T, not as a difference of two products, so that rounding W_q - W
    to 16 bits costs its own 2^-9 relative, not that of the product it is taken from."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(x, w.to(x.dtype).T, out_dtype=torch.float32)
    return x.float() @ w.float().T


def eval_windows(ids: np.ndarray, seqlen: int, max_windows: int = 64) -> np.ndarray:
    """The held-out ids as consecutive windows [n, length]: at most `max_windows` of `seqlen` tokens,
    shorter ones when the text has fewer than one window's worth (`perplexity`'s windows)."""
    n = min(max_windows, max(1, len(ids) // seqlen))
    length = min(seqlen, len(ids) // n)
    return np.asarray(ids[: n * length], dtype=np.int64).reshape(n, length)


class HeldOutReport:
    """The quality report as a pass of GPTQ's layer walk. Two streams of held-out windows run
    beside the calibration samples: the fp16 model's (each layer with its own weights) and the
    GPTQ model's (each layer once quantized). For every layer:

    - `before` runs the fp16 stream through the layer as loaded, keeping each linear's input on the
      first `ERROR_WINDOWS` windows (the X of `layer_errors`);
    - GPTQ quantizes the layer (a float32 retry calls `before` again);
    - `after` measures ||X W_q^T - X W^T|| / ||X W^T|| for GPTQ's and RTN's weights in float32,
      with W the model's own stored values, and runs the GPTQ stream through the quantized layer;
    - `finish` applies the final norm and the output layer to both streams: their perplexities.

    Both streams run in the walk's compute dtype (bf16 or fp16 on a GPU, float32 on the CPU)."""

    ERROR_WINDOWS = 4  # layer_errors' windows: the first chunk of windows

    def __init__(self, windows: np.ndarray, embed: torch.Tensor, position_embeddings, mask=None):
        self.tokens = torch.from_numpy(windows).to(embed.device)
        self.fp16 = torch.nn.functional.embedding(self.tokens, embed)
        self.gptq = self.fp16.clone()
        self.pos, self.mask = position_embeddings, mask
        chunk = self.ERROR_WINDOWS
        self.parts = [slice(i, min(i + chunk, len(windows))) for i in range(0, len(windows), chunk)]
        self.layers: list[dict] = []
        self.pending = None

    def to(self, dtype) -> None:
        """The streams in another dtype (GPTQ's float32 retry of a layer and the rest of the model)."""
        self.fp16, self.gptq = self.fp16.to(dtype), self.gptq.to(dtype)
        self.pos = tuple(t.to(dtype) for t in self.pos)
        self.mask = None if self.mask is None else self.mask.to(dtype)

    def _forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for p in self.parts:
            y = layer(x[p], attention_mask=self.mask, position_embeddings=self.pos)
            out[p] = y[0] if isinstance(y, tuple) else y
        return out

    @torch.no_grad()
    def before(self, layer) -> None:
        """The fp16 stream through the layer as loaded; each linear's input on the first chunk of
        windows (the error windows) kept."""
        inputs: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(module, args, output) -> None:  # returns None: a hook's return value would replace the output
                inputs.setdefault(name, args[0])
            return hook

        hooks = [module.register_forward_hook(keep(name)) for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)]
        try:
            self.pending = (self._forward(layer, self.fp16), inputs)
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def after(self, layer, layer_index: int, quantized: dict, source: dict[str, torch.Tensor], prefix: str) -> None:
        """GPTQ's and RTN's errors on the kept inputs (`quantized`: name -> (q, scales) of every linear;
        `source`: the layer's stored tensors), then the GPTQ stream through the quantized layer."""
        fp16_next, inputs = self.pending
        self.pending = None
        sums = []  # per linear: ||X W^T||^2, ||X (W_gptq - W)^T||^2, ||X (W_rtn - W)^T||^2, summed on the device
        for name, (q, scales) in quantized.items():
            x = inputs[name].reshape(-1, inputs[name].shape[-1])
            w = source[f"{prefix}.{name}.weight"].to(x.device).float()
            sums.append(torch.stack([product(x, v).square().sum() for v in (w, dequantize(q, scales) - w, rtn_symmetric(w) - w)]))
        ref, gptq, rtn = torch.stack(sums).sum(0).tolist()
        self.layers.append({"layer": layer_index, "gptq": (gptq / ref) ** 0.5, "rtn": (rtn / ref) ** 0.5})
        self.fp16 = fp16_next
        self.gptq = self._forward(layer, self.gptq)

    @torch.no_grad()
    def finish(self, norm, lm_head: torch.Tensor, lm_head_gptq: torch.Tensor | None = None) -> dict:
        """The report's perplexities and layers; `lm_head` [vocab, hidden] the output layer's weights
        (the GPTQ stream's own where quantize.py --lm_head quantized it)."""
        def perplexity_of(x: torch.Tensor, weight: torch.Tensor) -> float:
            total = 0.0
            for p in self.parts:
                logits = (norm(x[p]) @ weight.to(x.dtype).T).float()
                ids = self.tokens[p]
                total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                                 reduction="sum"))
            return float(np.exp(total / self.tokens[:, 1:].numel()))

        return {"perplexity": {"fp16": perplexity_of(self.fp16, lm_head),
                               "gptq": perplexity_of(self.gptq, lm_head if lm_head_gptq is None else lm_head_gptq)},
                "layers": self.layers}
