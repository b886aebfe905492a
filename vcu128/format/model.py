"""Model dimensions from config.json and the table of quantized linears (FORMAT.md 3.3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import get_bool, get_int, get_str, read_json_object

GROUP_SIZE = 128



@dataclass(frozen=True)
class ModelDims:
    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    tie_word_embeddings: bool
    model_type: str

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shape(self, linear: "Linear") -> tuple[int, int]:
        """(chin, chout) of one decoder-layer linear."""
        return getattr(self, linear.chin_dim), getattr(self, linear.chout_dim)

    def to_json(self) -> dict:
        return {**asdict(self), "q_dim": self.q_dim, "kv_dim": self.kv_dim}


def read_model_config(config_path: Path) -> dict:
    """config.json as a dict (a multimodal wrapper's text_config), checked to be a JSON object."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise VCUError(f"{config_path}: no such file (every step needs the model's config.json)")
    cfg = read_json_object(config_path)
    text = cfg.get("text_config")  # multimodal wrappers keep the language model's config here
    if text is not None:
        if not isinstance(text, dict):
            raise VCUError(f"{config_path}: 'text_config' is not a JSON object")
        cfg = text
    return cfg


def parse_model_dims(config_path: Path) -> ModelDims:
    """The model's dimensions from config.json, whatever the model (the gate, `format.gate.read_model_dims`,
    decides whether the board runs it)."""
    config_path = Path(config_path)
    cfg = read_model_config(config_path)
    hidden = get_int(cfg, "hidden_size", config_path)
    heads = get_int(cfg, "num_attention_heads", config_path)
    dims = ModelDims(
        hidden=hidden,
        intermediate=get_int(cfg, "intermediate_size", config_path),
        num_layers=get_int(cfg, "num_hidden_layers", config_path),
        num_heads=heads,
        num_kv_heads=get_int(cfg, "num_key_value_heads", config_path, default=heads),
        head_dim=get_int(cfg, "head_dim", config_path, default=max(1, hidden // heads)),
        vocab=get_int(cfg, "vocab_size", config_path),
        tie_word_embeddings=get_bool(cfg, "tie_word_embeddings", config_path, False),
        model_type=get_str(cfg, "model_type", config_path, "unknown"),
    )
    return dims


@dataclass(frozen=True)
class Linear:
    """One quantized linear of a decoder layer and where the board expects it."""

    module: str  # name inside the layer, e.g. "self_attn.q_proj"
    chin_dim: str  # ModelDims attribute giving chin
    chout_dim: str  # ModelDims attribute giving chout
    unit: str  # "MVM_BN" or "MVM_BN_RES": the accelerator unit that runs it
    stem: str  # file stem on the board, e.g. "MVMBN0_q"

    def name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.module}"


# FORMAT.md 3.3. up_proj runs on the RES unit: that unit multiplies its product with SiLU(gate).
LINEARS = (
    Linear("self_attn.q_proj", "hidden", "q_dim", "MVM_BN", "MVMBN0_q"),
    Linear("self_attn.k_proj", "hidden", "kv_dim", "MVM_BN", "MVMBN0_k"),
    Linear("self_attn.v_proj", "hidden", "kv_dim", "MVM_BN", "MVMBN0_v"),
    Linear("mlp.gate_proj", "hidden", "intermediate", "MVM_BN", "MVMBN1"),
    Linear("self_attn.o_proj", "q_dim", "hidden", "MVM_BN_RES", "MVMBNRES0"),
    Linear("mlp.up_proj", "hidden", "intermediate", "MVM_BN_RES", "MVMBNRES1"),
    Linear("mlp.down_proj", "intermediate", "hidden", "MVM_BN_RES", "MVMBNRES2"),
)

# (norm name inside a layer, board file) for FORMAT.md 3.3.
LAYER_NORMS = (("input_layernorm", "LN0"), ("post_attention_layernorm", "LN1"))
FINAL_NORM = "model.norm"
EMBEDDING = "model.embed_tokens.weight"
