"""The transformers model a model folder is computed with, for calibration and the quality report.

A Qwen2/Llama/Mistral or native `glm` folder is what transformers builds from its config.json. A
ChatGLM2/3 folder (remote code, not available offline and never run) is built as transformers' own
`GlmForCausalLM`, the same architecture (FORMAT.md 8): its config keys are renamed here, and its
tensors are read through format.checkpoint.TensorView (query_key_value split into q/k/v,
dense_h_to_4h as gate_up_proj, ...), so the calibration forward is transformers' code either way.
"""

from __future__ import annotations

import json
from pathlib import Path

from vcu128.format.model import dims_from_config, read_model_config
from vcu128.format.tables import rope_values
from vcu128.io.jsonfile import get_bool, get_float, get_int


def glm_config_of_chatglm(cfg: dict, where: Path):
    """transformers' GlmConfig for a ChatGLM2/3 config.json (FORMAT.md 8's keys, which the gate checked)."""
    from transformers import GlmConfig

    d = dims_from_config(cfg, where)
    return GlmConfig(
        vocab_size=d.vocab, hidden_size=d.hidden, intermediate_size=d.intermediate, num_hidden_layers=d.num_layers,
        num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads, head_dim=d.head_dim, hidden_act="silu",
        max_position_embeddings=get_int(cfg, "seq_length", where, default=2048), rms_norm_eps=get_float(cfg, "layernorm_epsilon", where, 1e-5),
        tie_word_embeddings=False, attention_bias=get_bool(cfg, "add_qkv_bias", where, True),
        rope_parameters={"rope_type": "default", "rope_theta": rope_values(cfg, where)[0], "partial_rotary_factor": 0.5},
        pad_token_id=cfg.get("pad_token_id", 0), eos_token_id=cfg.get("eos_token_id"), bos_token_id=cfg.get("bos_token_id"),
    )


def hf_config(folder: Path, plain: bool = False):
    """The transformers config of a model folder or GPTQ checkpoint; `plain`: without its
    quantization_config, so that transformers builds plain nn.Linear layers."""
    from transformers import AutoConfig

    where = Path(folder) / "config.json"
    cfg = read_model_config(where)
    if cfg.get("model_type") == "chatglm":
        return glm_config_of_chatglm(cfg, where)
    if not plain:
        return AutoConfig.from_pretrained(str(folder))
    cfg = json.loads(where.read_text())
    cfg.pop("quantization_config", None)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
