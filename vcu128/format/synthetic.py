"""Synthetic GPTQ checkpoints of any Qwen2/Llama shape, for tests and the benchmark.

Random integers and scales in exactly the layout GPTQModel writes (FORMAT.md 1), one safetensors
shard a decoder layer so that even a 7B-shaped checkpoint is built with a layer's worth of memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vcu128.format.checkpoint import SYMMETRIC_ZERO_WORD
from vcu128.format.family import to_source_names
from vcu128.format.model import EMBEDDING, GROUP_SIZE, LAYER_NORMS, LINEARS, ModelDims

QWEN2_7B = dict(hidden=3584, intermediate=18944, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, vocab=152064)


@dataclass
class SyntheticSpec:
    hidden: int = 256
    intermediate: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    vocab: int = 512
    tie_word_embeddings: bool = False
    biased: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # Qwen2
    checkpoint_format: str = "gptq"
    float_dtype: str = "float16"  # norms, embedding, lm_head: float16, bfloat16 or float32
    lm_head_quantized: bool = False
    model_type: str = "qwen2"
    seed: int = 0
    quant_overrides: dict = field(default_factory=dict)

    @property
    def dims(self) -> ModelDims:
        return ModelDims(
            hidden=self.hidden,
            intermediate=self.intermediate,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim or self.hidden // self.num_heads,
            vocab=self.vocab,
            tie_word_embeddings=self.tie_word_embeddings,
            model_type=self.model_type,
        )


def config_json(spec: SyntheticSpec) -> dict:
    d = spec.dims
    quant = {
        "bits": 4,
        "group_size": GROUP_SIZE,
        "sym": True,
        "desc_act": False,
        "quant_method": "gptq",
        "checkpoint_format": spec.checkpoint_format,
        **spec.quant_overrides,
    }
    if spec.model_type == "chatglm":  # ChatGLM3-6B's config.json keys (FORMAT.md 8)
        return {
            "architectures": ["ChatGLMModel"], "model_type": "chatglm",
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig", "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
            "num_layers": d.num_layers, "hidden_size": d.hidden, "ffn_hidden_size": d.intermediate, "kv_channels": d.head_dim,
            "num_attention_heads": d.num_heads, "multi_query_attention": True, "multi_query_group_num": d.num_kv_heads,
            "padded_vocab_size": d.vocab, "layernorm_epsilon": 1e-5, "rmsnorm": True, "add_qkv_bias": True, "add_bias_linear": False,
            "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "original_rope": True, "seq_length": 8192,
            "torch_dtype": "float16", "quantization_config": quant,
        }
    extra = {"partial_rotary_factor": 0.5, "attention_bias": True} if spec.model_type == "glm" else {}
    return {
        **extra,
        "architectures": [{"qwen2": "Qwen2ForCausalLM", "glm": "GlmForCausalLM"}.get(spec.model_type, "LlamaForCausalLM")],
        "model_type": spec.model_type,
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_kv_heads,
        "head_dim": d.head_dim,
        "vocab_size": d.vocab,
        "tie_word_embeddings": d.tie_word_embeddings,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "torch_dtype": "float16",
        "quantization_config": quant,
    }


def quantized_linear(rng: np.random.Generator, chin: int, chout: int, fmt: str) -> dict[str, np.ndarray]:
    groups = chin // GROUP_SIZE
    return {
        "qweight": rng.integers(0, 1 << 32, (chin // 8, chout), dtype=np.uint32).view(np.int32),
        "qzeros": np.full((groups, chout // 8), SYMMETRIC_ZERO_WORD[fmt], np.uint32).view(np.int32),
        # Positive, fp16-normal scales of the size a real checkpoint has.
        "scales": rng.uniform(0.002, 0.03, (groups, chout)).astype(np.float16),
        "g_idx": (np.arange(chin) // GROUP_SIZE).astype(np.int32),
    }


def _normal(rng: np.random.Generator, shape: tuple[int, int], std: float, dtype) -> np.ndarray:
    """Gaussian table built in row blocks: rng.normal's float64 would need 4x the table's memory."""
    out = np.empty(shape, dtype)
    step = max(1, (16 << 20) // shape[1])
    for r in range(0, shape[0], step):
        out[r : r + step] = rng.normal(0, std, (min(step, shape[0] - r), shape[1]))
    return out


def _save(tensors: dict[str, np.ndarray], path: Path, float_dtype: str) -> None:
    if float_dtype == "bfloat16":
        import torch
        from safetensors.torch import save_file

        out = {}
        for k, v in tensors.items():
            t = torch.from_numpy(np.ascontiguousarray(v))
            out[k] = t.to(torch.bfloat16) if v.dtype == np.float32 else t
        save_file(out, str(path), metadata={"format": "pt"})
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_gptq_checkpoint(qdir: Path, spec: SyntheticSpec | None = None) -> Path:
    """Write config.json, quantize_config.json and sharded safetensors (one shard a layer)."""
    spec = spec or SyntheticSpec()
    d = spec.dims
    qdir = Path(qdir)
    qdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    # bf16 is written from float32 values (torch converts); fp16/fp32 directly.
    fdt = np.float32 if spec.float_dtype in ("bfloat16", "float32") else np.float16
    weight_map: dict[str, str] = {}
    shards = d.num_layers + 1

    def shard(i: int, tensors: dict[str, np.ndarray]) -> None:
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        _save(tensors, qdir / name, spec.float_dtype)
        weight_map.update({k: name for k in tensors})

    for layer in range(d.num_layers):
        tensors = {}
        for lin in LINEARS:
            chin, chout = d.linear_shape(lin)
            prefix = lin.name(layer)
            for k, v in quantized_linear(rng, chin, chout, spec.checkpoint_format).items():
                tensors[f"{prefix}.{k}"] = v
            if lin.module in spec.biased:
                tensors[f"{prefix}.bias"] = rng.normal(0, 0.5, chout).astype(np.float16)
        for norm, _ in LAYER_NORMS:
            tensors[f"model.layers.{layer}.{norm}.weight"] = rng.uniform(0.5, 1.5, d.hidden).astype(fdt)
        shard(layer, to_source_names(tensors, d, np.concatenate))
    last = {"model.norm.weight": rng.uniform(0.5, 1.5, d.hidden).astype(fdt)}
    last[EMBEDDING] = _normal(rng, (d.vocab, d.hidden), 0.02, fdt)
    if spec.lm_head_quantized:
        last.update({f"lm_head.{k}": v for k, v in quantized_linear(rng, d.hidden, d.vocab, spec.checkpoint_format).items()})
    elif not spec.tie_word_embeddings:
        last["lm_head.weight"] = _normal(rng, (d.vocab, d.hidden), 0.02, fdt)
    shard(d.num_layers, to_source_names(last, d, np.concatenate))
    (qdir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    cfg = config_json(spec)
    (qdir / "config.json").write_text(json.dumps(cfg, indent=1))
    (qdir / "quantize_config.json").write_text(json.dumps(cfg["quantization_config"], indent=1))
    return qdir
