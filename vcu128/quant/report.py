"""quantize's quality report: perplexity of the fp16 model and of the GPTQ model on held-out text,
and per decoder layer GPTQ's output error next to plain round-to-nearest's.

quant/heldout.py's `HeldOutReport` measures it inside GPTQ's own walk through the model
(quant/layerwise.py), a layer at a time, on the layer already in device memory: no second read of
the model. The whole-model functions here measure the same from transformers models built from the folders
(`load_float_model`, `load_checkpoint_model`): GPTQModel's checkpoints are measured so, and the
tests hold the walk's numbers to them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.quant.gptq import dequantize
from vcu128.quant.heldout import rtn_symmetric


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
