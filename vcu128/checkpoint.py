"""Reading and checking a GPTQ checkpoint (FORMAT.md section 1).

`GPTQCheckpoint.open()` reads config.json / quantize_config.json and the safetensors index;
`validate()` checks every tensor against what the board supports before a single byte is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from .errors import VCUError
from .model import EMBEDDING, FINAL_NORM, GROUP_SIZE, LAYER_NORMS, LINEARS, ModelDims, read_model_dims

# Symmetric 4-bit: every stored zero-point nibble is 8 (v2) or 8 - 1 (v1 stores zero - 1).
SYMMETRIC_ZERO_WORD = {"gptq": 0x77777777, "gptq_v2": 0x88888888}
FLOAT_DTYPES = ("F16", "BF16", "F32")


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str

    def check_supported(self, where: str) -> None:
        """The board runs exactly W4, G=128, symmetric, no act-order (FORMAT.md 1)."""
        rules = [
            (self.bits == 4, f"bits={self.bits}: the board supports 4-bit weights only"),
            (self.group_size == GROUP_SIZE, f"group_size={self.group_size}: the board supports group size {GROUP_SIZE} only"),
            (self.sym, "sym=false: asymmetric quantization; the board needs symmetric (zero point 8)"),
            (not self.desc_act, "desc_act=true: act-order checkpoints are not supported by the board (quantize with desc_act off)"),
            (self.checkpoint_format in SYMMETRIC_ZERO_WORD, f"checkpoint_format={self.checkpoint_format!r}: expected 'gptq' or 'gptq_v2'"),
        ]
        for ok, why in rules:
            if not ok:
                raise VCUError(f"{where}: {why}")


def read_quant_config(qdir: Path) -> QuantConfig:
    """Merge quantization_config of config.json with quantize_config.json; they must not disagree."""
    sources = {}
    cfg = json.loads((qdir / "config.json").read_text())
    if "quantization_config" in cfg:
        sources["config.json quantization_config"] = cfg["quantization_config"]
    if (qdir / "quantize_config.json").is_file():
        sources["quantize_config.json"] = json.loads((qdir / "quantize_config.json").read_text())
    if not sources:
        raise VCUError(f"{qdir}: no quantization_config in config.json and no quantize_config.json: not a GPTQ checkpoint")
    merged: dict = {}
    for where, qc in sources.items():
        for key in ("bits", "group_size", "sym", "desc_act", "checkpoint_format", "quant_method"):
            if key in qc:
                if key in merged and merged[key][0] != qc[key]:
                    raise VCUError(f"{qdir}: {key} is {merged[key][0]!r} in {merged[key][1]} but {qc[key]!r} in {where}")
                merged[key] = (qc[key], where)
    values = {k: v for k, (v, _) in merged.items()}
    method = values.get("quant_method", "gptq")
    if method != "gptq":
        raise VCUError(f"{qdir}: quant_method={method!r}: only GPTQ checkpoints are supported")
    for key in ("bits", "group_size"):
        if key not in values:
            raise VCUError(f"{qdir}: quantization config has no '{key}'")
    return QuantConfig(
        bits=int(values["bits"]),
        group_size=int(values["group_size"]),
        sym=bool(values.get("sym", True)),
        desc_act=bool(values.get("desc_act", False)),
        checkpoint_format=values.get("checkpoint_format") or "gptq",
    )


def _safetensors_files(qdir: Path) -> dict[str, Path]:
    """Map every tensor name to the shard that holds it."""
    index = qdir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = {name: qdir / shard for name, shard in weight_map.items()}
        for shard in set(shards.values()):
            if not shard.is_file():
                raise VCUError(f"{shard}: listed in {index.name} but missing")
        return shards
    single = qdir / "model.safetensors"
    if single.is_file():
        with safe_open(single, "np") as f:
            return {name: single for name in f.keys()}
    raise VCUError(f"{qdir}: no model.safetensors or model.safetensors.index.json")


class GPTQCheckpoint:
    """A GPTQ checkpoint folder, read one tensor at a time."""

    def __init__(self, qdir: Path):
        self.qdir = Path(qdir)
        if not self.qdir.is_dir():
            raise VCUError(f"{self.qdir}: no such checkpoint folder")
        self.dims: ModelDims = read_model_dims(self.qdir / "config.json")
        self.quant: QuantConfig = read_quant_config(self.qdir)
        self._where = _safetensors_files(self.qdir)
        self._handles: dict[Path, object] = {}

    # --- tensor access -------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._where

    def _open(self, name: str):
        if name not in self._where:
            raise VCUError(f"{name}: missing from the checkpoint {self.qdir}")
        path = self._where[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "np")
        return self._handles[path]

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        s = self._open(name).get_slice(name)
        return s.get_dtype(), tuple(s.get_shape())

    def get(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or a block of its rows); bf16 goes through torch, which numpy lacks."""
        dtype, shape = self.info(name)
        if rows is not None:  # safetensors refuses a slice that runs past the end
            rows = slice(*rows.indices(shape[0]))
        if dtype == "BF16":
            with safe_open(self._where[name], "pt") as f:
                t = f.get_slice(name)[rows] if rows is not None else f.get_tensor(name)
                return t.float().numpy()
        s = self._open(name).get_slice(name)
        return s[rows] if rows is not None else self._open(name).get_tensor(name)

    def get_fp16(self, name: str, rows: slice | None = None) -> np.ndarray:
        dtype, _ = self.info(name)
        if dtype not in FLOAT_DTYPES:
            raise VCUError(f"{name}: dtype {dtype}, expected one of fp16, bf16, fp32")
        return self.get(name, rows).astype(np.float16, copy=False)

    # --- what the output layer is ---------------------------------------------------------------
    def lm_head_source(self) -> str:
        """'lm_head' (quantized in the checkpoint), 'lm_head.weight', or the tied embedding."""
        if self.has("lm_head.qweight"):
            return "lm_head"
        if self.has("lm_head.weight"):
            return "lm_head.weight"
        return EMBEDDING

    # --- validation ------------------------------------------------------------------------------
    def expect(self, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> None:
        dtype, got = self.info(name)
        if dtype not in dtypes:
            raise VCUError(f"{name}: dtype {dtype}, expected {' or '.join(dtypes)}")
        if got != shape:
            raise VCUError(f"{name}: shape {list(got)}, expected {list(shape)} from config.json")

    def validate_linear(self, prefix: str, chin: int, chout: int) -> None:
        """Check one quantized linear: shapes, symmetric zero points, no act-order."""
        if chin % GROUP_SIZE:
            raise VCUError(f"{prefix}: chin={chin} is not a multiple of {GROUP_SIZE}, which the board needs")
        if chout % 8:
            raise VCUError(f"{prefix}: chout={chout} is not a multiple of 8 (GPTQ packs 8 zero points a word)")
        groups = chin // GROUP_SIZE
        self.expect(f"{prefix}.qweight", ("I32",), (chin // 8, chout))
        self.expect(f"{prefix}.qzeros", ("I32",), (groups, chout // 8))
        self.expect(f"{prefix}.scales", ("F16",), (groups, chout))
        if self.has(f"{prefix}.bias"):
            self.expect(f"{prefix}.bias", FLOAT_DTYPES, (chout,))
        zeros = self.get(f"{prefix}.qzeros").view(np.uint32)
        want = SYMMETRIC_ZERO_WORD[self.quant.checkpoint_format]
        bad = np.flatnonzero(zeros != want)
        if bad.size:
            g, w = divmod(int(bad[0]), zeros.shape[1])
            word = int(zeros[g, w])
            nib = next(j for j in range(8) if (word >> 4 * j) & 0xF != want & 0xF)
            stored = (word >> 4 * nib) & 0xF
            zero = stored + (1 if self.quant.checkpoint_format == "gptq" else 0)
            raise VCUError(
                f"{prefix}.qzeros: asymmetric: group {g}, column {8 * w + nib} has zero point {zero} "
                f"(stored {stored:#x}, format {self.quant.checkpoint_format}); the board needs 8 everywhere"
            )
        if self.has(f"{prefix}.g_idx"):
            self.expect(f"{prefix}.g_idx", ("I32", "I64"), (chin,))
            g_idx = self.get(f"{prefix}.g_idx")
            bad = np.flatnonzero(g_idx != np.arange(chin) // GROUP_SIZE)
            if bad.size:
                r = int(bad[0])
                raise VCUError(
                    f"{prefix}.g_idx: act-order: input row {r} is in group {int(g_idx[r])}, "
                    f"expected {r // GROUP_SIZE} (row // {GROUP_SIZE}); the board needs desc_act off"
                )

    def validate(self) -> None:
        """Every check of FORMAT.md section 1, for every tensor the export reads."""
        d = self.dims
        self.quant.check_supported(str(self.qdir))
        for layer in range(d.num_layers):
            for lin in LINEARS:
                self.validate_linear(lin.name(layer), *d.linear_shape(lin))
            for norm, _ in LAYER_NORMS:
                self.expect(f"model.layers.{layer}.{norm}.weight", FLOAT_DTYPES, (d.hidden,))
        if self.has(f"model.layers.{d.num_layers}.self_attn.q_proj.qweight"):
            raise VCUError(f"model.layers.{d.num_layers}: the checkpoint has more layers than config.json's num_hidden_layers={d.num_layers}")
        self.expect(f"{FINAL_NORM}.weight", FLOAT_DTYPES, (d.hidden,))
        self.expect(EMBEDDING, FLOAT_DTYPES, (d.vocab, d.hidden))
        self.validate_lm_head()

    def validate_lm_head(self) -> None:
        d = self.dims
        src = self.lm_head_source()
        if src == "lm_head":
            self.validate_linear("lm_head", d.hidden, d.vocab)
        else:
            self.expect(src, FLOAT_DTYPES, (d.vocab, d.hidden))
            if d.hidden % GROUP_SIZE:
                raise VCUError(f"{src}: hidden={d.hidden} is not a multiple of {GROUP_SIZE}, which the board needs")

    # --- decoding ----------------------------------------------------------------------------------
    def signed_weights(self, qweight: np.ndarray, dtype=np.int8) -> np.ndarray:
        """GPTQ qweight [chin/8, chout] (or a block of its columns) to signed ints q - 8, [chout, chin]."""
        from .formats import unpack_nibbles

        # Transposed, word k of a row holds inputs 8k..8k+7 of one output channel, low nibble first.
        return unpack_nibbles(np.ascontiguousarray(qweight.T).view(np.uint32), unsigned_offset=8, dtype=dtype)
