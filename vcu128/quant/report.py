"""PyTorch views of a quantized model, for quantize's quality report (verify's functional check
streams the model itself: check/functional.py).

`load_checkpoint_model` builds a plain transformers model from a GPTQ checkpoint by dequantizing
its int4 weights (no GPU kernels needed). `perplexity` and `layer_errors` measure it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.model import GROUP_SIZE, LINEARS
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
    from transformers import AutoConfig

    cfg = json.loads((Path(qdir) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


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
    params = dict(model.named_parameters())
    for name in ckpt.names():
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            params[f"{prefix}.weight"].copy_(checkpoint_linear(ckpt, prefix, device))
        elif name in params:
            params[name].copy_(torch.from_numpy(ckpt.get(name)))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
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

    for layer in range(ckpt.dims.num_layers):
        for lin in LINEARS:
            module = model.get_submodule(lin.name(layer))
            hooks.append(module.register_forward_hook(hook(layer, lin.name(layer))))
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
