"""The packed folder (FORMAT.md 3 to 5) read back: the reader beside hardware.py's writer.

`PackedFolder.open` reads a folder once and strictly: its manifest.json (every value checked for
type, a damaged record is one error naming the file and key), its ports and embedding parts, what
it assumes of the board (int4 code, RoPE order and length, SiLU table), its fp16 factors and how
its output layer was quantized. A folder the original scripts made has no manifest: its ports and
parts are read from its file names, its fp16 factors from the compile folder beside it.

The manifest's writer (`Manifest`) is here too, so the record has one home; the bit check, the
functional check, embedding_tokens and every later step read the folder through this module.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vcu128 import __version__
from vcu128.format.layout import (
    BOARD_PORTS,
    CONFIG,
    EMBEDDING_DIR,
    INT4_CODES,
    OUT_BIAS_FILE,
    OUT_NORM_FILE,
    OUT_WEIGHT_STEM,
    BinFile,
    embedding_part_file,
    hw_layer_norm_file,
    hw_linear_stems,
    open_port_files,
    parse_embedding_part_file,
    port_file,
    row_words,
)
from vcu128.format.model import LAYER_NORMS, LINEARS, ModelDims, read_model_config
from vcu128.format.rescale import CONFIG_KEY as RESCALE_KEY
from vcu128.format.rescale import RescalePlan
from vcu128.format.tables import (
    ACT_FILE,
    BOARD_HEAD_DIM,
    DEFAULT_MAX_TOKEN,
    DEFAULT_ROPE_ORDER,
    ROPE_ORDERS,
    SILU_TABLES,
    SiluTable,
    rope_file_name,
    rope_from_rows,
    unpack_rope_table,
)
from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import dumps, read_json_object
from vcu128.io.output import TOOL, FileRecord, replace_file_atomically

log = logging.getLogger("vcu128")

MANIFEST_NAME = "manifest.json"
HARDWARE_KIND, EMBEDDING_KIND = "hardware", "embedding"  # a packed folder; an Embedding/ folder made alone
LM_HEAD_METHODS = ("trunc", "rtn", "checkpoint")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def default_hardware_dir(compile_dir: Path, ports: int = BOARD_PORTS) -> Path:
    return Path(compile_dir) / f"QWEN_BLOCK_write_data_port{ports}"


# ---------------------------------------------------------------------------------------------
# The manifest: writer


@dataclass
class Manifest:
    kind: str  # HARDWARE_KIND or EMBEDDING_KIND
    model: dict
    params: dict
    files: list[FileRecord] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "tool": TOOL,
            "version": __version__,
            "format": "FORMAT.md",
            "kind": self.kind,
            "model": self.model,
            **self.params,
            "files": [f.to_json() for f in self.files],
        }

    def write(self, folder: Path) -> None:
        replace_file_atomically(Path(folder) / MANIFEST_NAME, dumps(self.to_json()).encode())


# ---------------------------------------------------------------------------------------------
# The manifest: reader


class _Record:
    """Typed access to one JSON object of a record: a wrong type or a missing key is one error that
    names the file and the key's path."""

    def __init__(self, doc, where: Path, key: str = ""):
        if not isinstance(doc, dict):
            raise VCUError(f"{where}: {key or 'the file'} is {_kind(doc)}, expected an object")
        self.doc, self.where, self.key = doc, where, key

    def _name(self, key: str) -> str:
        return f"{self.key}.{key}" if self.key else key

    def _bad(self, key: str, value, expected: str) -> VCUError:
        return VCUError(f"{self.where}: {self._name(key)} is {_show(value)}, expected {expected}")

    def int(self, key: str, default=None, minimum: int = 0) -> int:
        value = self.doc.get(key)
        if value is None:
            if default is None:
                raise VCUError(f"{self.where}: {self._name(key)} is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(key, value, f"a whole number of at least {minimum}")
        return value

    def str(self, key: str, default=None, choices=None) -> str:
        value = self.doc.get(key)
        if value is None:
            if default is None:
                raise VCUError(f"{self.where}: {self._name(key)} is missing")
            return default
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self._bad(key, value, f"one of {', '.join(choices)}" if choices else "a string")
        return value

    def obj(self, key: str, required: bool = False) -> "_Record":
        value = self.doc.get(key)
        if value is None and not required:
            return _Record({}, self.where, self._name(key))
        return _Record(value, self.where, self._name(key))

    def list(self, key: str) -> list:
        value = self.doc.get(key)
        if not isinstance(value, list):
            raise self._bad(key, value, "a list")
        return value


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(type(value), "a number")


def _show(value) -> str:
    text = repr(value)
    return _kind(value) if isinstance(value, dict) or len(text) > 40 else text


@dataclass(frozen=True)
class ListedFile:
    """One file the manifest lists."""

    path: str
    bytes: int
    sha256: str
    step: str | None = None
    made_from: str | None = None


@dataclass(frozen=True)
class Assumptions:
    """What a folder assumes of the board (manifest.json's `assumptions`, hardware.py's options)."""

    int4: str = "twos"
    rope_table: str = DEFAULT_ROPE_ORDER  # ROPE_ORDERS, or "none: ..." when the heads are not the board's
    max_token: int = DEFAULT_MAX_TOKEN
    silu_table: str = "board"
    silu_fit_range: tuple[float, float] | None = None  # the `fit` table's range

    @property
    def has_rope_table(self) -> bool:
        return self.rope_table in ROPE_ORDERS


@dataclass(frozen=True)
class OutputLayerRecord:
    """How the output layer's ints and scales were made (lm_head.py's method and grid)."""

    method: str
    int4_range: int = 8


def _listed_file(entry, where: Path, i: int) -> ListedFile:
    r = _Record(entry, where, f"files[{i}]")
    path = r.str("path")
    if path.startswith("/") or ".." in Path(path).parts or not path:
        raise VCUError(f"{where}: files[{i}].path {path!r} is not a path inside the folder")
    sha = r.str("sha256")
    if not _SHA256.fullmatch(sha):
        raise VCUError(f"{where}: files[{i}].sha256 {_show(sha)} is not a sha256 (64 hex digits)")
    step = r.str("step", default="") or None
    made_from = r.str("made_from", default="") or None
    return ListedFile(path, r.int("bytes"), sha, step, made_from)


def _assumptions(r: _Record, tables: _Record) -> Assumptions:
    rope = r.str("rope_table", default=DEFAULT_ROPE_ORDER)
    if rope not in ROPE_ORDERS and not rope.startswith("none"):
        raise VCUError(f"{r.where}: assumptions.rope_table is {_show(rope)}, expected one of {', '.join(ROPE_ORDERS)}")
    silu = r.str("silu_table", default="board", choices=SILU_TABLES)
    fit = None
    if silu == "fit":
        value = tables.obj("silu").doc.get("fit_range")
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
                and value[0] < value[1]):
            raise VCUError(f"{r.where}: tables.silu.fit_range is {_show(value)}, expected [low, high] (two finite numbers)")
        fit = (float(value[0]), float(value[1]))
    return Assumptions(r.str("int4", default="twos", choices=INT4_CODES), rope, r.int("max_token", default=DEFAULT_MAX_TOKEN, minimum=1),
                       silu, fit)


def read_manifest(folder: Path, kinds=(HARDWARE_KIND, EMBEDDING_KIND)) -> dict | None:
    """A folder's manifest.json, checked to be this tool's and its file list well formed; None when
    there is none."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    r = _Record(read_json_object(path), path)
    if r.doc.get("tool") != TOOL:
        raise VCUError(f"{path}: not a compiler-vcu128 manifest (its 'tool' is {_show(r.doc.get('tool'))})")
    r.str("kind", choices=kinds)
    for i, entry in enumerate(r.list("files")):
        _listed_file(entry, path, i)
    return r.doc


def manifest_owns(kind: str, step: str):
    """The files `step` listed in a folder's manifest.json of `kind` (plus the manifest itself), or
    None when the folder is not such an output."""

    def owns(folder: Path) -> set[str] | None:
        try:
            doc = read_manifest(folder)
        except VCUError:
            return None
        if doc is None or doc.get("kind") != kind:
            return None
        return {f["path"] for f in doc["files"] if f.get("step", step) == step} | {MANIFEST_NAME}

    return owns


# ---------------------------------------------------------------------------------------------
# The folder


class PackedFolder:
    """A packed folder, read once. Paths it hands out are built here, from FORMAT.md's names."""

    def __init__(self, path: Path, doc: dict | None, ports: int, parts: int, assumptions: Assumptions,
                 rescale: RescalePlan | None, files: dict[str, ListedFile], output_layer: OutputLayerRecord | None,
                 made_from: dict, model: dict, source: dict):
        self.path, self.doc, self.ports, self.parts = Path(path), doc, ports, parts
        self.assumptions, self.rescale, self.files, self.output_layer = assumptions, rescale, files, output_layer
        self.made_from, self.model, self.source = made_from, model, source

    @property
    def has_manifest(self) -> bool:
        return self.doc is not None

    @classmethod
    def open(cls, path: Path, compile_hints=()) -> "PackedFolder":
        """Read `path`; `compile_hints` are folders that may hold the compile folder it came from
        (read only for a folder without a manifest: its fp16 factors)."""
        path = Path(path)
        if not path.is_dir():
            raise VCUError(f"{path}: no such hardware folder")
        doc = read_manifest(path, kinds=(HARDWARE_KIND,))
        if doc is None:
            ports, parts = infer_ports(path), infer_parts(path)
            compile_dir = find_compile_dir(compile_hints, CONFIG)
            rescale = None
            if compile_dir is not None:
                where = compile_dir / CONFIG
                rescale = RescalePlan.from_record(read_model_config(where).get(RESCALE_KEY), where, RESCALE_KEY)
            return cls(path, None, ports, parts, Assumptions(), rescale, {}, None, {}, {}, {})
        where = path / MANIFEST_NAME
        r = _Record(doc, where)
        files = {}
        for i, entry in enumerate(r.list("files")):
            f = _listed_file(entry, where, i)
            files[f.path] = f
        assumptions = _assumptions(r.obj("assumptions"), r.obj("tables"))
        rescale = RescalePlan.from_record(doc.get("fp16_rescale"), where, "fp16_rescale")
        lm = r.obj("lm_head")
        output_layer = OutputLayerRecord(lm.str("method", choices=LM_HEAD_METHODS), lm.int("int4_range", default=8, minimum=7)) if lm.doc else None
        if output_layer and output_layer.int4_range not in (7, 8):
            raise VCUError(f"{where}: lm_head.int4_range is {output_layer.int4_range}, expected 7 or 8")
        return cls(path, doc, r.int("ports", minimum=1), r.int("embedding_parts", default=0), assumptions, rescale, files,
                   output_layer, r.obj("made_from").doc, r.obj("model", required=True).doc, r.obj("source").doc)

    # --- names ------------------------------------------------------------------------------------
    def port_paths(self, stem: str) -> list[Path]:
        return [self.path / port_file(stem, p) for p in range(self.ports)]

    def open_linear(self, stem: str, chin: int, chout: int) -> list[BinFile]:
        return open_port_files(self.port_paths(stem), chout, row_words(chin))

    def embedding_part_names(self) -> list[str]:
        return [f"{EMBEDDING_DIR}/{embedding_part_file(i + 1, self.parts)}" for i in range(self.parts)]

    @property
    def rope_name(self) -> str:
        return rope_file_name(self.assumptions.max_token)

    def expected_files(self, dims: ModelDims) -> set[str]:
        """Every file the layout gives a folder of these dimensions, ports and parts (its tables
        included where its heads are the board's)."""
        files = set()
        for layer in range(dims.num_layers):
            for lin in LINEARS:
                stem, bias = hw_linear_stems(layer, lin)
                files.update(port_file(stem, p) for p in range(self.ports))
                files.add(bias)
            files.update(hw_layer_norm_file(layer, board) for _, board in LAYER_NORMS)
        files.update(port_file(OUT_WEIGHT_STEM, p) for p in range(self.ports))
        files.update({OUT_BIAS_FILE, OUT_NORM_FILE, ACT_FILE})
        files.update(self.embedding_part_names())
        if dims.head_dim == BOARD_HEAD_DIM:
            files.add(self.rope_name)
        return files

    def on_disk(self) -> set[str]:
        return {str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}

    # --- contents -----------------------------------------------------------------------------------
    def rope_order(self, default: str = DEFAULT_ROPE_ORDER) -> str:
        """The RoPE table's value order: the manifest's, else `default` (the model family's first)."""
        return self.assumptions.rope_table if self.has_manifest else default

    def rope_cos_sin(self, positions: int, default: str = DEFAULT_ROPE_ORDER) -> tuple[np.ndarray, np.ndarray] | None:
        """cos, sin [positions, 64] ([positions, 32] for GLM) as the folder's RoPE table holds them,
        or None without one."""
        path = self.path / self.rope_name
        order = self.rope_order(default)
        if order not in ROPE_ORDERS or not path.is_file():
            return None
        max_token = self.assumptions.max_token
        if positions > max_token:
            raise VCUError(f"{positions} positions asked for, the folder's RoPE table holds {max_token}")
        rows = unpack_rope_table(BinFile(path, "<f2", (2 * max_token * 64,)).read(), max_token)
        cos, sin = rope_from_rows(rows, order)
        return cos[:positions], sin[:positions]

    def silu_table(self) -> SiluTable | None:
        path = self.path / ACT_FILE
        return SiluTable.unpack(np.fromfile(path, np.uint8)) if path.is_file() else None

    def describe_rope(self, default: str = DEFAULT_ROPE_ORDER) -> str:
        return f"{self.rope_name} ({self.rope_order(default)})"


def find_compile_dir(candidates, marker: str) -> Path | None:
    """The first candidate folder that holds `marker` (a compile folder's config.json or step record)."""
    for cand in candidates:
        if cand and (Path(cand) / marker).is_file():
            return Path(cand)
    return None


def infer_ports(hw: Path) -> int:
    """Ports of a folder without a manifest: the port files of layer 0's q_proj, counted."""
    stem, _ = hw_linear_stems(0, LINEARS[0])
    folder, name = (hw / stem).parent, Path(stem).name
    ports = 0
    while (folder / Path(port_file(name, ports)).name).is_file():
        ports += 1
    if not ports:
        raise VCUError(f"{hw}: no {MANIFEST_NAME} and no {port_file(stem, 0)}: not a packed folder")
    return ports


def infer_parts(hw: Path) -> int:
    """Embedding parts of a folder without a manifest, from their names (Embedding_01-of-K.bin)."""
    folder = hw / EMBEDDING_DIR
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    parsed = [parse_embedding_part_file(n) for n in names if n.endswith(".bin")]
    if not parsed:
        return 0
    if None in parsed or len({parts for _, parts in parsed}) != 1:
        raise VCUError(f"{folder}: embedding part names not all of the form Embedding_01-of-16.bin for one part count")
    return parsed[0][1]


def holds_only_embedding_parts(folder: Path, step: str) -> bool:
    """Does `folder` hold nothing but an Embedding/ folder that `step` (embedding_tokens) made on its
    own, run before hardware.py made the packed folder around it (its own manifest lists its parts)?"""
    try:
        entries = os.listdir(folder)
    except OSError:
        return False
    return entries == [EMBEDDING_DIR] and manifest_owns(EMBEDDING_KIND, step)(Path(folder) / EMBEDDING_DIR) is not None


def packed_folders_in(folder: Path) -> list[Path]:
    """The packed folders (a hardware manifest.json, whatever their --ports or --out) directly in `folder`."""
    try:
        children = sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
    except OSError:
        return []
    return [p for p in children if manifest_owns(HARDWARE_KIND, "hardware")(p) is not None]


def embedding_folder_owned(out: Path, step: str) -> set[str] | None:
    """The parts `step` wrote into `out`: listed in its own manifest (an Embedding/ folder made
    alone) or in the packed folder's around it."""
    own = manifest_owns(EMBEDDING_KIND, step)(out)
    if own is not None:
        return own
    try:
        doc = read_manifest(out.parent)
    except VCUError:
        return None
    prefix = f"{out.name}/"
    listed = {f["path"][len(prefix):] for f in (doc or {}).get("files", []) if f["path"].startswith(prefix) and f.get("step") == step}
    return listed or None
