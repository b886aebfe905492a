"""Reading and checking a GPTQ checkpoint (FORMAT.md section 1).

`GPTQCheckpoint(qdir)` reads config.json / quantize_config.json and the safetensors headers;
`validate()` checks every tensor against what the board supports before a single byte is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vcu128.format.family import OUTPUT_AXIS, QWEN2, module_alias, source_linears
from vcu128.format.gate import check_board_tensors, read_model_dims
from vcu128.format.model import (
    EMBEDDING,
    FINAL_NORM,
    GROUP_SIZE,
    LAYER_NORMS,
    LINEARS,
    LM_HEAD,
    ModelDims,
)
from vcu128.io.direct_io import read_bytes
from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import get_bool, get_int, get_object, get_str, read_json_object

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
    dynamic: dict | None = None  # GPTQModel's per-module overrides: {pattern: {bits, group_size, ...}}

    def check_supported(self, where: str) -> None:
        """The board runs exactly W4, G=128, symmetric, no act-order (FORMAT.md 1), for every module:
        GPTQModel's `dynamic` overrides (it quantizes lm_head at 8 bits, group 32 by default) included."""
        for pattern, override in (self.dynamic or {}).items():
            if pattern.startswith("-:") or not isinstance(override, dict):
                continue  # a module left unquantized: its missing tensors are reported by name
            for key, want in (("bits", 4), ("group_size", GROUP_SIZE), ("sym", True), ("desc_act", False)):
                if key in override and override[key] != want:
                    raise VCUError(
                        f"{where}: quantization_config.dynamic[{pattern!r}] sets {key}={override[key]!r}; "
                        f"the board needs bits=4, group_size={GROUP_SIZE}, sym, no act-order for every module"
                    )
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


_QUANT_KEYS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format", "quant_method", "dynamic")


def _quant_values(qc: dict, path: Path, prefix: str) -> dict:
    """One quantization config's keys, each checked for its type (the error names the file and key)."""
    out = {}
    for key in _QUANT_KEYS:
        if qc.get(key) is None:
            continue
        name = prefix + key
        if key in ("bits", "group_size"):
            out[key] = get_int(qc, key, path, minimum=1 if key == "bits" else -1, name=name)
        elif key in ("sym", "desc_act"):
            out[key] = get_bool(qc, key, path, False, name=name)
        elif key == "dynamic":
            out[key] = get_object(qc, key, path, name=name)
        else:
            out[key] = get_str(qc, key, path, name=name)
    return out


def read_quant_config(qdir: Path) -> QuantConfig:
    """Merge quantization_config of config.json with quantize_config.json: each read strictly (a
    value of the wrong type is one error naming the file and key), and they must not disagree."""
    sources = []  # (file, key prefix, values)
    cfg_path, qc_path = qdir / "config.json", qdir / "quantize_config.json"
    cfg = read_json_object(cfg_path)
    if "quantization_config" in cfg:
        qc = cfg["quantization_config"]
        if not isinstance(qc, dict):
            raise VCUError(f"{cfg_path}: 'quantization_config' is {qc!r:.60}, expected a JSON object")
        sources.append((cfg_path, "quantization_config.", _quant_values(qc, cfg_path, "quantization_config.")))
    if qc_path.is_file():
        sources.append((qc_path, "", _quant_values(read_json_object(qc_path), qc_path, "")))
    if not sources:
        raise VCUError(f"{qdir}: no quantization_config in config.json and no quantize_config.json: not a GPTQ checkpoint")
    merged: dict = {}
    for path, prefix, values in sources:
        for key, value in values.items():
            if key in merged and merged[key][0] != value:
                first, first_path, first_prefix = merged[key]
                raise VCUError(f"{path}: '{prefix}{key}' is {value!r}, but {first_path} has '{first_prefix}{key}' {first!r}; they must agree")
            merged.setdefault(key, (value, path, prefix))
    values = {k: v for k, (v, _, _) in merged.items()}
    last = sources[-1][0]
    method = values.get("quant_method", "gptq")
    if method != "gptq":
        raise VCUError(f"{qdir}: quant_method={method!r}: only GPTQ checkpoints are supported")
    for key in ("bits", "group_size"):
        if key not in values:
            raise VCUError(f"{last}: missing '{key}' (the quantization config has none)")
    return QuantConfig(
        bits=values["bits"],
        group_size=values["group_size"],
        sym=values.get("sym", True),
        desc_act=values.get("desc_act", False),
        checkpoint_format=values.get("checkpoint_format") or "gptq",
        dynamic=values.get("dynamic"),
    )


# safetensors dtype names to numpy; BF16 is read as its bits and widened to float32 below.
NUMPY_DTYPES = {"F16": "<f2", "BF16": "<u2", "F32": "<f4", "I32": "<i4", "I64": "<i8", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: str  # safetensors name: F16, BF16, F32, I32, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor in its file


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _header_entry(path: Path, name: str, meta) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field checked."""
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
        raise VCUError(f"{path}: damaged header: entry {name!r} needs dtype, shape and data_offsets")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise VCUError(f"{path}: damaged header: {name} has dtype {dtype!r}")
    ints = lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)  # noqa: E731
    if not ints(shape) or not ints(offsets) or len(offsets) != 2:
        raise VCUError(f"{path}: damaged header: {name} has shape {shape!r}, data_offsets {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise VCUError(f"{path}: damaged header: {name} has data_offsets [{begin}, {end}] (begin after end)")
    want = DTYPE_BYTES[dtype] * math.prod(shape)
    if end - begin != want:
        raise VCUError(f"{path}: damaged header: {name} is {dtype} {shape}, {want} bytes, but its data_offsets span {end - begin}")
    return dtype, tuple(shape), begin, end


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """A safetensors file is an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the data. The header is checked as strictly as the
    format itself does (the safetensors library then validates it too); tensors are read later with
    positioned reads (not mmap), so resident memory stays what the step holds."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise VCUError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise VCUError(f"{path}: damaged safetensors file: header length {n} is over the format's limit of {MAX_HEADER_BYTES}")
        if 8 + n > size:
            raise VCUError(f"{path}: truncated: the header needs {8 + n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise VCUError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise VCUError(f"{path}: not a safetensors file (the header is not a JSON object)")
    data_bytes = size - 8 - n
    out, spans = {}, []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _header_entry(path, name, meta)
        if end > data_bytes:
            raise VCUError(f"{path}: truncated: {name} ends at byte {8 + n + end}, the file has {size}")
        spans.append((begin, end, name))
        out[name] = TensorEntry(path, dtype, shape, 8 + n + begin)
    pos, last = 0, None
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = f"overlaps {last}" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            raise VCUError(f"{path}: damaged header: the data of {name} (bytes {begin}..{end}) {what}")
        pos, last = end, name
    if pos != data_bytes:
        raise VCUError(f"{path}: damaged file: the tensors hold {pos} bytes of data, the file has {data_bytes} after the header")
    _library_check(path)
    return out


def _library_check(path: Path) -> None:
    """Let the safetensors library validate the header too (opening a file reads only its header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as e:  # SafetensorError, or whatever a damaged file provokes
        raise VCUError(f"{path}: the safetensors library refuses it: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_tensor_index(qdir: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint, single file or sharded with model.safetensors.index.json."""
    index = qdir / "model.safetensors.index.json"
    if index.is_file():
        doc = read_json_object(index)
        weight_map = doc.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise VCUError(f"{index}: 'weight_map' must be an object of tensor name -> shard file name")
        entries = {}
        for shard in sorted(set(weight_map.values())):
            if shard in ("", ".", "..") or "/" in shard or "\\" in shard or Path(shard).is_absolute():
                raise VCUError(f"{index}: shard {shard!r} is not a plain file name inside {qdir}")
            if not (qdir / shard).is_file():
                raise VCUError(f"{qdir / shard}: listed in {index.name} but missing")
            for name, e in read_safetensors_header(qdir / shard).items():
                if name in entries:
                    raise VCUError(f"{name}: in two shards, {entries[name].path.name} and {shard}")
                entries[name] = e
        missing = sorted(set(weight_map) - set(entries))
        if missing:
            raise VCUError(f"{missing[0]}: listed in {index.name} but not in its shard {weight_map[missing[0]]}")
        misplaced = sorted(n for n in weight_map if entries[n].path.name != weight_map[n])
        if misplaced:
            n = misplaced[0]
            raise VCUError(f"{n}: {index.name} puts it in {weight_map[n]}, but it is in {entries[n].path.name}")
        return entries
    single = qdir / "model.safetensors"
    if single.is_file():
        return read_safetensors_header(single)
    raise VCUError(f"{qdir}: no model.safetensors or model.safetensors.index.json")


def read_tensor(e: TensorEntry, rows: slice | None = None, direct: bool = True) -> np.ndarray:
    """A tensor, or a block of its rows (dim 0), as stored (bf16 as its uint16 bits). `direct`:
    unbuffered (direct_io.py); off where the file is likely still in the page cache."""
    if e.dtype not in NUMPY_DTYPES:
        raise VCUError(f"{e.path}: dtype {e.dtype} is not supported")
    dtype = np.dtype(NUMPY_DTYPES[e.dtype])
    start, stop = (0, e.shape[0]) if rows is None or not e.shape else rows.indices(e.shape[0])[:2]
    stop = max(start, stop)
    row_bytes = int(np.prod(e.shape[1:], dtype=np.int64)) * dtype.itemsize
    data = read_bytes(e.path, e.offset + start * row_bytes, (stop - start) * row_bytes, direct).view(dtype)
    return data.reshape((stop - start, *e.shape[1:]) if e.shape else ())


def check_finite(name: str, data: np.ndarray, dtype: str | None = None, first_row: int = 0) -> None:
    """Refuse a block of a float tensor (its rows from `first_row`) that holds a NaN or an inf, naming
    the tensor, row and column: one vectorised pass, the position found only on failure. `dtype` is
    the safetensors name where the data is as stored (BF16 arrives as its uint16 bits); integer
    data is not checked. Every step reads float tensors through here (checkpoint, source model,
    compile folder), so a non-finite value is refused where it is read, not computed with."""
    if dtype == "BF16" and data.dtype == np.uint16:
        bad = (data & 0x7F80) == 0x7F80  # exponent all ones: inf or NaN
        if not bad.any():
            return
        values = (data.astype(np.uint32) << 16).view(np.float32)
    elif data.dtype == np.float16:  # exponent all ones, on the bits: faster than isfinite on halves
        bad = (data.view(np.uint16) & 0x7C00) == 0x7C00
        if not bad.any():
            return
        values = data
    elif data.dtype.kind == "f":
        if data.size == 0 or np.isfinite(data).all():
            return
        bad, values = ~np.isfinite(data), data
    else:
        return
    at = np.unravel_index(int(np.flatnonzero(bad.reshape(-1))[0]), data.shape) if data.ndim else ()
    value = float(values[at])
    if data.ndim == 0:
        where = ""
    elif data.ndim == 1:
        where = f" element {first_row + int(at[0])}"
    else:
        where = f" row {first_row + int(at[0])}, column {', '.join(str(int(i)) for i in at[1:])}"
    raise VCUError(f"{name}:{where} is {value} (not a finite number): the board would compute NaN or inf from it")


def check_fp16_range(name: str, source: np.ndarray, fp16: np.ndarray, first_row: int = 0) -> None:
    """A finite value that rounds to inf in fp16 (|x| >= 65520) would reach the board as inf: refused."""
    if fp16.size == 0 or np.isfinite(fp16).all():
        return
    at = np.unravel_index(int(np.flatnonzero(~np.isfinite(fp16).reshape(-1))[0]), fp16.shape)
    where = f"element {first_row + int(at[0])}" if fp16.ndim == 1 else f"row {first_row + int(at[0])}, column {', '.join(str(int(i)) for i in at[1:])}"
    raise VCUError(f"{name}: {where} is {float(source[at])}, outside fp16's range (largest 65504), in which the board stores it")


def scan_finite(folder: Path, tensors: dict[str, TensorEntry] | None = None, block_bytes: int = 64 << 20) -> None:
    """check_finite over every float tensor of a folder, streamed in blocks of rows (a model a
    library will load whole, where this tool does not read it itself)."""
    tensors = read_tensor_index(Path(folder)) if tensors is None else tensors
    for name, e in sorted(tensors.items()):
        if e.dtype not in FLOAT_DTYPES or not e.shape:
            continue
        row_bytes = max(1, DTYPE_BYTES[e.dtype] * math.prod(e.shape[1:]))
        step = max(1, block_bytes // row_bytes)
        for r in range(0, e.shape[0], step):
            check_finite(name, read_tensor(e, slice(r, r + step), direct=False), e.dtype, r)


class TensorView:
    """A model folder's tensors under the pipeline's names (format.family): a fused tensor's part is
    read as its rows (or, GPTQ-transposed, its columns), so no step needs to know the family. A name
    the family does not map is the checkpoint's own."""

    def __init__(self, entries: dict[str, TensorEntry], dims: ModelDims, where: Path):
        self.entries, self.dims, self.where = entries, dims, Path(where)
        self.family = dims.family

    def locate(self, name: str) -> tuple[str, int | None, int, int]:
        """(the checkpoint's tensor, axis of the rows, first, past last) of a pipeline name."""
        if self.family is QWEN2:
            return name, None, 0, 0
        module, _, part = name.rpartition(".")
        alias = module_alias(self.family, self.dims, module)
        if alias is None:
            return name, None, 0, 0
        source = f"{alias.module}.{part}"
        axis = OUTPUT_AXIS.get(part)
        if alias.start is None or axis is None:
            return source, None, 0, 0
        per = 8 if part == "qzeros" else 1  # eight zero points a word
        return source, axis, alias.start // per, alias.stop // per

    def has(self, name: str) -> bool:
        return self.locate(name)[0] in self.entries

    def source_name(self, name: str) -> str:
        return self.locate(name)[0]

    def entry(self, name: str) -> TensorEntry:
        """The checkpoint's tensor of a pipeline name that is a whole tensor (an embedding, a norm)."""
        source, axis, _, _ = self.locate(name)
        if source not in self.entries:
            raise VCUError(f"{source}: missing from {self.where}")
        if axis is not None:
            raise ValueError(f"{name} is part of {source}, not a tensor of its own")
        return self.entries[source]

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        source, axis, start, stop = self.locate(name)
        if source not in self.entries:
            raise VCUError(f"{source}: missing from {self.where}")
        e = self.entries[source]
        if axis is None:
            return e.dtype, e.shape
        if len(e.shape) <= axis or e.shape[axis] < stop:
            raise VCUError(f"{source}: shape {list(e.shape)} has no room for {name} (its rows {start}..{stop - 1}) "
                           "at the dimensions config.json gives")
        shape = list(e.shape)
        shape[axis] = stop - start
        return e.dtype, tuple(shape)

    def read(self, name: str, rows: slice | None = None, direct: bool = True) -> np.ndarray:
        """The tensor, or a block of its rows (dim 0), as stored."""
        source, axis, start, stop = self.locate(name)
        self.info(name)  # present, and wide enough
        e = self.entries[source]
        if axis is None:
            return read_tensor(e, rows, direct)
        if axis == 0:
            first, last = (0, stop - start) if rows is None else rows.indices(stop - start)[:2]
            return read_tensor(e, slice(start + first, start + max(first, last)), direct)
        return np.ascontiguousarray(self.part_of(name, read_tensor(e, rows, direct)))

    def part_of(self, name: str, whole):
        """The part of its checkpoint tensor `whole` (an array, or a torch tensor in memory) that the
        pipeline name `name` is (a view: rows, or GPTQ-transposed columns)."""
        _, axis, start, stop = self.locate(name)
        if axis is None:
            return whole
        return whole[start:stop] if axis == 0 else whole[:, start:stop]


class GPTQCheckpoint:
    """A GPTQ checkpoint folder, read one tensor at a time, under the pipeline's names (TensorView)."""

    def __init__(self, qdir: Path):
        self.qdir = Path(qdir)
        if not self.qdir.is_dir():
            raise VCUError(f"{self.qdir}: no such checkpoint folder")
        self.dims: ModelDims = read_model_dims(self.qdir / "config.json")
        self.quant: QuantConfig = read_quant_config(self.qdir)
        self._tensors = read_tensor_index(self.qdir)
        self.view = TensorView(self._tensors, self.dims, self.qdir)

    def fingerprint(self) -> str:
        """Names this checkpoint as it is now: its JSON files, and each shard's name, size,
        modification time and header. Changes when the checkpoint is re-quantized or edited, so
        later steps can tell that what they were made from has changed (without reading 4 GB)."""
        sha = hashlib.sha256()
        for name in ("config.json", "quantize_config.json", "model.safetensors.index.json"):
            p = self.qdir / name
            sha.update(name.encode() + (p.read_bytes() if p.is_file() else b"-"))
        for path in sorted({e.path for e in self._tensors.values()}):
            st = path.stat()
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                sha.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode() + f.read(n))
        return sha.hexdigest()[:16]

    # --- tensor access -------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return self.view.has(name)

    def describe(self, name: str) -> str:
        """A pipeline name as the checkpoint has it, for messages (`...query_key_value.qweight, its
        k_proj part`)."""
        source, axis, _, _ = self.view.locate(name)
        return source if axis is None else f"{source}, its {name.rpartition('.')[0].rpartition('.')[2]} part"

    def names(self) -> list[str]:
        """The checkpoint's own tensor names."""
        return list(self._tensors)

    def _entry(self, name: str) -> TensorEntry:
        if self.view.family is QWEN2 and name not in self._tensors:
            raise VCUError(f"{name}: missing from the checkpoint {self.qdir}")
        return self.view.entry(name)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        if self.view.family is QWEN2:
            e = self._entry(name)
            return e.dtype, e.shape
        return self.view.info(name)

    def get(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor, or a block of its rows (dim 0), read from disk; bf16 comes back as float32.
        A float tensor holding a NaN or an inf is refused here, naming the row."""
        dtype, shape = self.info(name)
        data = self.view.read(name, rows)
        if dtype == "BF16":  # bf16 is the top half of a float32
            data = (data.astype(np.uint32) << 16).view(np.float32)
        if dtype in FLOAT_DTYPES:
            check_finite(self.view.source_name(name), data, first_row=rows.indices(shape[0])[0] if rows is not None and shape else 0)
        return data

    def get_fp16(self, name: str, rows: slice | None = None) -> np.ndarray:
        """A float tensor (or a block of its rows) as fp16; a value past fp16's range is refused."""
        dtype, shape = self.info(name)
        if dtype not in FLOAT_DTYPES:
            raise VCUError(f"{name}: dtype {dtype}, expected one of fp16, bf16, fp32")
        data = self.get(name, rows)
        with np.errstate(over="ignore"):
            fp16 = data.astype(np.float16, copy=False)
        if dtype != "F16":
            check_fp16_range(name, data, fp16, rows.indices(shape[0])[0] if rows is not None and shape else 0)
        return fp16

    # --- what the output layer is ---------------------------------------------------------------
    def lm_head_source(self) -> str:
        """The output layer as HF computes with it: 'lm_head' (GPTQ-quantized in the checkpoint),
        the embedding when config.json ties them (whatever lm_head.weight may hold), else
        lm_head.weight, which an untied model must have."""
        if self.has(f"{LM_HEAD}.qweight"):
            return LM_HEAD
        if self.dims.tie_word_embeddings:
            return EMBEDDING
        if self.has(f"{LM_HEAD}.weight"):
            return f"{LM_HEAD}.weight"
        weight = self.view.source_name(f"{LM_HEAD}.weight")
        raise VCUError(f"{self.qdir}: no {weight}, and config.json's tie_word_embeddings is false: the output layer is missing",
                       "a model whose output layer is its embedding says tie_word_embeddings: true")

    # --- validation ------------------------------------------------------------------------------
    def expect(self, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> None:
        dtype, got = self.info(name)
        shown = self.describe(name)
        if dtype not in dtypes:
            raise VCUError(f"{shown}: dtype {dtype}, expected {' or '.join(dtypes)}")
        if got != shape:
            raise VCUError(f"{shown}: shape {list(got)}, expected {list(shape)} from config.json")

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
        check_board_tensors(self.names(), d, quantized=True, shape_of=lambda name: self.info(name)[1])
        self.validate_fused()
        for layer in range(d.num_layers):
            for lin in LINEARS:
                self.validate_linear(lin.name(layer), *d.linear_shape(lin))
            for norm, _ in LAYER_NORMS:
                self.expect(f"model.layers.{layer}.{norm}.weight", FLOAT_DTYPES, (d.hidden,))
        self.expect(f"{FINAL_NORM}.weight", FLOAT_DTYPES, (d.hidden,))
        self.expect(EMBEDDING, FLOAT_DTYPES, (d.vocab, d.hidden))
        self.validate_lm_head()

    def validate_fused(self) -> None:
        """A fused tensor holds exactly its parts' rows (a wider one would have rows no board file takes)."""
        if not self.view.family.fused:
            return
        for layer in range(self.dims.num_layers):
            for prefix, rows, parts in source_linears(self.view.family, self.dims, layer):
                for part, axis in (("qweight", 1), ("scales", 1), ("qzeros", 1), ("bias", 0)):
                    name = f"{prefix}.{part}"
                    if name in self._tensors:
                        shape = self._tensors[name].shape
                        want = rows // 8 if part == "qzeros" else rows
                        if len(shape) <= axis or shape[axis] != want:
                            raise VCUError(f"{name}: shape {list(shape)}, but its parts ({', '.join(p.rpartition('.')[2] for p in parts)}) "
                                           f"hold {want} {'columns' if axis else 'rows'} at the dimensions config.json gives")

    def validate_lm_head(self) -> None:
        d = self.dims
        src = self.lm_head_source()
        if src == LM_HEAD:
            self.validate_linear(LM_HEAD, d.hidden, d.vocab)
        else:
            self.expect(src, FLOAT_DTYPES, (d.vocab, d.hidden))
            if d.hidden % GROUP_SIZE:
                raise VCUError(f"{src}: hidden={d.hidden} is not a multiple of {GROUP_SIZE}, which the board needs")

    # --- decoding ----------------------------------------------------------------------------------
    def signed_weights(self, qweight: np.ndarray, dtype=np.int8, out: np.ndarray | None = None) -> np.ndarray:
        return signed_weights(qweight, dtype, out)


def signed_weights(qweight: np.ndarray, dtype=np.int8, out: np.ndarray | None = None) -> np.ndarray:
    """GPTQ qweight [chin/8, chout] (or a block of its columns) to signed ints q - 8, [chout, chin]
    (into `out`, if given: unpack_nibbles). The zero point 8 is the checkpoint's (validate_linear)."""
    return signed_of_words(offset_words(qweight), dtype, out)


def offset_words(qweight: np.ndarray) -> np.ndarray:
    """GPTQ qweight [chin/8, chout] (or a block of its columns) as uint32 [chout, chin/8]: word k of a
    row holds inputs 8k..8k+7 of one output channel, low nibble first, each q + 8."""
    from vcu128.format.layout import transposed

    return transposed(qweight).view(np.uint32)


def signed_of_words(words: np.ndarray, dtype=np.int8, out: np.ndarray | None = None) -> np.ndarray:
    """offset_words' words to signed ints q - 8, [chout, chin] (into `out`, if given)."""
    from vcu128.format.layout import unpack_nibbles

    return unpack_nibbles(words, unsigned_offset=8, dtype=dtype, out=out)
