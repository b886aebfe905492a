"""The one gate for what the board runs, used by every step (quantize, the four exports, verify).

The accelerator runs a Llama-style decoder: RMSNorm, rotary attention with grouped key/value heads,
a SiLU-gated MLP, seven linears a layer (FORMAT.md 3.3) and nothing else. A model outside these
rules would be exported into files that load and then compute something else, so it is refused
here, with the key or tensor and the rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from vcu128.format.family import CHATGLM, GLM, tensor_places, top_tensors
from vcu128.format.model import (
    EMBEDDING,
    FINAL_NORM,
    LAYER_NORMS,
    LINEARS,
    LM_HEAD,
    ModelDims,
    dims_from_config,
    read_model_config,
)
from vcu128.format.tables import BOARD_HEAD_DIM, rope_values
from vcu128.io.errors import VCUError, human_bytes

BOARD_CONTEXT = 2048  # tokens the board's context buffer holds; it has no sliding window
BOARD_MODEL_TYPES = ("qwen2", "llama", "mistral", "glm", "chatglm")
# GLM models the board has no place for, and why (named, so a user sees the key, not a shape error).
OTHER_GLM = {
    "glm4": "GLM-4-0414 adds post_self_attn_layernorm and post_mlp_layernorm after attention and the MLP; "
            "the board's layer has two norms, before each",
    "glm4_moe": "a mixture of experts (n_routed_experts); the board runs one dense MLP a layer",
    "glm4v": "a vision-language model; the board runs the text decoder of glm or chatglm only",
    "glm4v_moe": "a vision-language mixture of experts; the board runs dense text decoders only",
}
# Where the packed weights live: the VCU128's XCVU37P has two 4 GiB HBM2 stacks, 32 pseudo-channels
# of 256 MiB, the 32 ports hardware.py spreads every linear (and the output layer) over.
BOARD_HBM_BYTES = 8 << 30
BOARD_PORTS = 32


def packed_weight_bytes(dims: ModelDims, ports: int = BOARD_PORTS) -> int:
    """Bytes of the packed linears and output layer (FORMAT.md 3.1: int4 weights and fp16 scales in
    rows of words, spread over the ports): what must fit in the board's HBM."""
    from vcu128.format.layout import row_words, rows_per_port

    packed = lambda chin, chout: rows_per_port(chout, ports) * ports * row_words(chin) * 4  # noqa: E731
    return dims.num_layers * sum(packed(*dims.linear_shape(lin)) for lin in LINEARS) + packed(dims.hidden, dims.vocab)


def check_board_memory(dims: ModelDims, where: Path) -> None:
    """A model whose packed weights do not fit in the board's HBM cannot run there (and its
    dimensions are past what the export's own memory plans for): refused from config.json alone,
    before a byte of it is read."""
    need = packed_weight_bytes(dims)
    if need > BOARD_HBM_BYTES:
        raise VCUError(f"{where}: the model's packed int4 weights need {human_bytes(need)} (hidden_size {dims.hidden}, intermediate_size "
                       f"{dims.intermediate}, {dims.num_layers} layers, vocab_size {dims.vocab}); the board's HBM holds "
                       f"{human_bytes(BOARD_HBM_BYTES)} (8 GiB: VCU128's two HBM2 stacks)")


def _require(cfg: dict, key: str, want, where: Path, why: str, default=None) -> None:
    value = cfg.get(key, default)
    if value != want or isinstance(value, bool) != isinstance(want, bool):
        raise VCUError(f"{where}: {key} {value!r}: the board needs {json_value(want)} ({why})")


def json_value(v) -> str:
    return {True: "true", False: "false", None: "null"}.get(v, repr(v)) if isinstance(v, (bool, type(None))) else repr(v)


def check_glm_config(cfg: dict, where: Path) -> None:
    """ChatGLM2/3 (remote-code keys) and transformers' glm: the shapes the board's GLM mode runs
    (FORMAT.md 8): heads of 128 channels, RoPE on the first half of each, RMSNorm before attention
    and before the MLP, no bias but on q/k/v."""
    if cfg["model_type"] == "chatglm":
        _require(cfg, "kv_channels", BOARD_HEAD_DIM, where, "the board's heads are 128 channels")
        _require(cfg, "rmsnorm", True, where, "the board's norm unit runs RMSNorm for ChatGLM", default=False)
        _require(cfg, "add_bias_linear", False, where, "only q/k/v have a bias in ChatGLM2/3; the board has none elsewhere", default=True)
        _require(cfg, "apply_residual_connection_post_layernorm", False, where, "the residual is the layer's input, not the normed one",
                 default=False)
        _require(cfg, "post_layer_norm", True, where, "the output layer reads the final norm's output", default=True)
        for key in ("ffn_hidden_size", "padded_vocab_size", "num_layers", "kv_channels"):
            if key not in cfg:
                raise VCUError(f"{where}: missing '{key}' (a ChatGLM2/3 config.json has it)")
        return
    _require(cfg, "head_dim", BOARD_HEAD_DIM, where, "the board's heads are 128 channels", default=None)
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if factor != 0.5:
        raise VCUError(f"{where}: partial_rotary_factor {factor!r}: the board's GLM mode rotates half of each head (0.5)")


def check_model_type(cfg: dict, where: Path) -> None:
    """First of all, before the dimensions are read (another model's keys are not these)."""
    model_type = cfg.get("model_type")
    if model_type in OTHER_GLM:
        raise VCUError(f"{where}: model_type {model_type!r}: {OTHER_GLM[model_type]}")
    if model_type not in BOARD_MODEL_TYPES:
        raise VCUError(f"{where}: model_type {model_type!r}: the board runs {', '.join(BOARD_MODEL_TYPES)} "
                       "(decoder layers with q/k/v/o_proj, gate/up/down_proj and RMSNorm)")


def check_board_config(cfg: dict, dims: ModelDims, where: Path) -> None:
    check_model_type(cfg, where)
    model_type = cfg["model_type"]
    if model_type in GLM.model_types + CHATGLM.model_types:
        check_glm_config(cfg, where)
    if model_type == "mistral":
        window = cfg.get("sliding_window")
        if window is not None and (not isinstance(window, int) or window < BOARD_CONTEXT):
            raise VCUError(f"{where}: sliding_window {window!r}: the board has no sliding window "
                           f"(it attends to all of its {BOARD_CONTEXT} tokens); null or at least {BOARD_CONTEXT} is needed")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise VCUError(f"{where}: hidden_act {act!r}: the board's MLP computes SiLU(gate) * up only")
    if dims.num_heads % dims.num_kv_heads:
        raise VCUError(f"{where}: num_attention_heads {dims.num_heads} is not a multiple of num_key_value_heads "
                       f"{dims.num_kv_heads}: each key/value head must serve a whole number of query heads")
    rope_values(cfg, where)  # rope_theta and the scaling factors: a table (and the model) computed from them must be finite
    check_board_memory(dims, where)


def check_board_tensors(names: Iterable[str], dims: ModelDims, quantized: bool, shape_of=None) -> None:
    """Every tensor (the checkpoint's names) has a place in the board's layout (FORMAT.md 1, 3.3, 8:
    anything else, Qwen3's q_norm and k_norm, a bias on the output layer, would be silently dropped);
    q/k/v agree with heads x head_dim. `shape_of(name)` gives a tensor's shape under the pipeline's
    names (for the head_dim rule)."""
    family = dims.family
    pattern, top = tensor_places(family, quantized), top_tensors(family)
    layers_key = "num_layers" if family is CHATGLM else "num_hidden_layers"
    for name in sorted(names):
        if name in top:
            continue
        m = pattern.match(name)
        if not m:
            raise VCUError(f"{name}: the board's layout has no place for this tensor (FORMAT.md 3.3); "
                           "the board cannot run this model as it is")
        layer = next((int(g) for g in m.groups() if g is not None), None)
        if layer is not None and layer >= dims.num_layers:
            raise VCUError(f"{family.layer(layer)}: the checkpoint has more layers than config.json's {layers_key}={dims.num_layers}")
    if shape_of is None:
        return
    for proj, heads in (("q_proj", dims.num_heads), ("k_proj", dims.num_kv_heads), ("v_proj", dims.num_kv_heads)):
        name = f"model.layers.0.self_attn.{proj}." + ("qweight" if quantized else "weight")
        try:
            shape = shape_of(name)
        except VCUError:
            continue  # a missing tensor is reported, by name, where it is read
        outputs = shape[1] if quantized else shape[0]
        if outputs != heads * dims.head_dim:
            raise VCUError(f"{name}: {outputs} outputs, but {heads} heads x head_dim {dims.head_dim} = {heads * dims.head_dim} "
                           "(config.json): head_dim does not match the checkpoint")


def check_float_model_shapes(shape_of, dims: ModelDims, tied: bool, names: Iterable[str] = ()) -> None:
    """Every tensor an fp16/bf16 model must have (and the biases among `names`), at the shape
    config.json gives (the quantized checkpoint's are checked by GPTQCheckpoint.validate).
    `shape_of(name)` raises for a missing one."""
    want = {EMBEDDING: (dims.vocab, dims.hidden), f"{FINAL_NORM}.weight": (dims.hidden,)}
    if not tied:
        want[f"{LM_HEAD}.weight"] = (dims.vocab, dims.hidden)
    for layer in range(dims.num_layers):
        for lin in LINEARS:
            chin, chout = dims.linear_shape(lin)
            want[f"{lin.name(layer)}.weight"] = (chout, chin)
            if f"{lin.name(layer)}.bias" in names:
                want[f"{lin.name(layer)}.bias"] = (chout,)
        for norm, _ in LAYER_NORMS:
            want[f"model.layers.{layer}.{norm}.weight"] = (dims.hidden,)
    for name, shape in want.items():
        got = tuple(shape_of(name))
        if got != shape:
            raise VCUError(f"{name}: shape {list(got)}, expected {list(shape)} from config.json")


def read_model_dims(config_path: Path) -> ModelDims:
    """The model's dimensions from config.json, refused unless the board runs the model."""
    config_path = Path(config_path)
    cfg = read_model_config(config_path)
    check_model_type(cfg, config_path)
    dims = dims_from_config(cfg, config_path)
    check_board_config(cfg, dims, config_path)
    return dims
