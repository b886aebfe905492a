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

    @property
    def family(self) -> "Family":
        return family_of(self.model_type)

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
    return dims_from_config(read_model_config(config_path), config_path)


def dims_from_config(cfg: dict, config_path: Path) -> ModelDims:
    """parse_model_dims of a config already read (`config_path` names it in errors)."""
    if cfg.get("model_type") == "chatglm":
        return _chatglm_dims(cfg, config_path)
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


def _chatglm_dims(cfg: dict, path: Path) -> ModelDims:
    """ChatGLM2/3's remote-code config keys (FORMAT.md 8): kv_channels is the head size,
    multi_query_group_num the key/value heads (when multi_query_attention is on), padded_vocab_size
    the rows of the embedding and the output layer, which are never tied."""
    heads = get_int(cfg, "num_attention_heads", path)
    grouped = get_bool(cfg, "multi_query_attention", path, False)
    return ModelDims(
        hidden=get_int(cfg, "hidden_size", path),
        intermediate=get_int(cfg, "ffn_hidden_size", path),
        num_layers=get_int(cfg, "num_layers", path),
        num_heads=heads,
        num_kv_heads=get_int(cfg, "multi_query_group_num", path) if grouped else heads,
        head_dim=get_int(cfg, "kv_channels", path),
        vocab=get_int(cfg, "padded_vocab_size", path),
        tie_word_embeddings=False,
        model_type="chatglm",
    )


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
LM_HEAD = "lm_head"
# These names (HF Qwen2/Llama's) are the pipeline's own for every family: a checkpoint of another
# family (ChatGLM's fused query_key_value, ...) is read through format.family's view of it.


# ---------------------------------------------------------------------------------------------
# Model families (format.family reads a checkpoint through them)

ROTATE_HALF = "rotate_half"  # HF Qwen2/Llama: channel i with i + head_dim/2, every channel
GLM_INTERLEAVED = "glm_interleaved"  # ChatGLM: pairs (2j, 2j+1) of the first half of each head; the rest passes through


@dataclass(frozen=True)
class SourceLinear:
    """A linear as a checkpoint stores it: its module inside a layer, and the board linears
    (`Linear.module`) whose output rows it holds, in order (one, or several fused)."""

    module: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layer_prefix: str  # decoder layer N is `{layer_prefix}.N`
    linears: tuple[SourceLinear, ...]
    final_norm: str  # module names
    embedding: str  # tensor name
    output_layer: str
    rope: str  # ROTATE_HALF or GLM_INTERLEAVED
    software: str  # the compile folder's layout: "qwen2" (FORMAT.md 2) or "glm" (compile_glm.py's names, FORMAT.md 8)
    buffers: tuple[str, ...] = ()  # regexes of tensors a checkpoint may hold that are recomputed, never read

    def layer(self, layer: int) -> str:
        return f"{self.layer_prefix}.{layer}"

    @property
    def fused(self) -> bool:
        return any(len(s.parts) > 1 for s in self.linears)


_ONE_EACH = tuple(SourceLinear(lin.module, (lin.module,)) for lin in LINEARS)

QWEN2 = Family("qwen2", ("qwen2", "llama", "mistral"), "model.layers", _ONE_EACH, FINAL_NORM, EMBEDDING, LM_HEAD, ROTATE_HALF,
               "qwen2", (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))
# transformers' GlmForCausalLM (THUDM/glm-4-9b's layout, and ChatGLM renamed): Qwen2's names but
# one gate_up_proj (gate rows, then up rows).
GLM = Family("glm", ("glm",), "model.layers",
             tuple(s for s in _ONE_EACH if s.module not in ("mlp.gate_proj", "mlp.up_proj"))
             + (SourceLinear("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),),
             FINAL_NORM, EMBEDDING, LM_HEAD, GLM_INTERLEAVED, "glm")
CHATGLM = Family("chatglm", ("chatglm",), "transformer.encoder.layers",
                 (SourceLinear("self_attention.query_key_value", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  SourceLinear("self_attention.dense", ("self_attn.o_proj",)),
                  SourceLinear("mlp.dense_h_to_4h", ("mlp.gate_proj", "mlp.up_proj")),
                  SourceLinear("mlp.dense_4h_to_h", ("mlp.down_proj",))),
                 "transformer.encoder.final_layernorm", "transformer.embedding.word_embeddings.weight", "transformer.output_layer",
                 GLM_INTERLEAVED, "glm", (r"transformer\.rotary_pos_emb\.inv_freq",))
FAMILIES = (QWEN2, GLM, CHATGLM)


def family_of(model_type: str) -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    return QWEN2  # what the gate refuses is refused there, by model_type; the layout names are Qwen2's
