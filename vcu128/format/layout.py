"""Every layout rule of FORMAT.md, written once, with its reader beside its writer.

Software format (section 2): `compile/qwen2_qweight_bin`, `compile/qwen2_fp16_weight_bin`.
Hardware format (section 3): rows of 32-bit words spread over HBM ports, bias words, norm files,
embedding parts. All little-endian.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import numpy as np

from vcu128.format.constants import BOARD_EMBEDDING_PARTS, BOARD_PORTS, INT4_CODES  # noqa: F401 (the layout's counts, FORMAT.md 3.1's codes)
from vcu128.format.model import EMBEDDING, GROUP_SIZE, Linear
from vcu128.io.direct_io import read_bytes
from vcu128.io.errors import VCUError
from vcu128.io.output import write_whole_file

# ---------------------------------------------------------------------------------------------
# Nibbles: 8 four-bit values a little-endian word, value j in bits 4j..4j+3.
# Little-endian means byte b of word k holds values 8k+2b (low nibble) and 8k+2b+1 (high nibble),
# so packing and unpacking are byte operations with no shifts across bytes.

# One table look-up a 16-bit half-word gives its four values. The table holds each entry's four values
# as one item (4, 8 or 16 bytes: int8, int16 or int32 values), so np.take copies whole items from a
# 1-D table: several times faster than gathering rows of a 2-D one.
_HALF = np.arange(1 << 16)
_NIBBLES_UNSIGNED = np.stack([(_HALF >> 4 * j) & 0xF for j in range(4)], axis=1)  # 0..15
_NIBBLES_TWOS = np.where(_NIBBLES_UNSIGNED >= 8, _NIBBLES_UNSIGNED - 16, _NIBBLES_UNSIGNED)  # -8..7
_NIBBLES_SIGN_MAGNITUDE = np.where(_NIBBLES_UNSIGNED >= 8, 8 - _NIBBLES_UNSIGNED, _NIBBLES_UNSIGNED)  # -7..7 (0x8: -0)

_ITEM_OF_FOUR = {1: np.dtype("<u4"), 2: np.dtype("<u8"), 4: np.dtype("<c16")}  # carriers, bits untouched
_LUTS: dict = {}


def _nibble_table(unsigned_offset: int | None, dtype: np.dtype, code: str = "twos") -> np.ndarray:
    key = (unsigned_offset, dtype, code)
    if key not in _LUTS:
        signed = _NIBBLES_TWOS if code == "twos" else _NIBBLES_SIGN_MAGNITUDE
        lut = signed if unsigned_offset is None else _NIBBLES_UNSIGNED - unsigned_offset
        _LUTS[key] = np.ascontiguousarray(lut.astype(dtype)).view(_ITEM_OF_FOUR[dtype.itemsize]).ravel()
    return _LUTS[key]


def transposed(a: np.ndarray, tile: int = 128) -> np.ndarray:
    """a.T as a new C-contiguous array (GPTQ's qweight [chin/8, chout] to one row of words an output
    channel), copied a tile of 128 x 128 at a time, which stays in the cache: numpy's copy of a.T
    walks `a` a column at a time across the whole array, 2-3 times slower for a layer's qweight."""
    rows, cols = a.shape
    out = np.empty((cols, rows), a.dtype)
    for r in range(0, rows, tile):  # a few dozen tiles a block
        for c in range(0, cols, tile):
            out[c : c + tile, r : r + tile] = a[r : r + tile, c : c + tile].T
    return out


def unpack_nibbles(words: np.ndarray, unsigned_offset: int | None = None, dtype=np.int8, code: str = "twos",
                   out: np.ndarray | None = None) -> np.ndarray:
    """uint32 [rows, n] to signed ints [rows, 8n] of `dtype` (int8, int16 or int32, little-endian).
    With `unsigned_offset`, nibbles are unsigned and the offset is subtracted (GPTQ's q - zero);
    without, they are signed in the board's `code` (two's complement, or sign-magnitude). `out`: a
    C-contiguous array of that shape and dtype to write them into (aligned memory a file is written from)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    rows = words.shape[0]
    halves = np.ascontiguousarray(words, dtype="<u4").view("<u2")
    table = _nibble_table(unsigned_offset, dtype, code)
    items = np.take(table, halves, mode="clip", out=None if out is None else out.view(table.dtype).reshape(halves.shape))  # every index is in range
    return items.view(dtype).reshape(rows, -1)


def pack_nibbles(q: np.ndarray, code: str = "twos") -> np.ndarray:
    """Signed ints [rows, 8n] to uint32 [rows, n]: two's-complement nibbles (-8..7), or
    sign-magnitude ones (-7..7: w, or 8 + |w| for w < 0)."""
    if code == "sign_magnitude":
        q = np.where(q < 0, 8 - q.astype(np.int16), q).astype(np.int8)
    # The low byte of a two's-complement int holds its nibble: cast first (wrapping), then work on
    # bytes, a quarter of the memory traffic of masking the int32s. Inputs 2k and 2k+1 are then the
    # two bytes of one little-endian uint16: its bits 0-3 and 8-11 are the output byte's two nibbles
    # (contiguous passes, 1.8 times faster than gathering every other byte).
    low = q.astype(np.uint8) if q.dtype.itemsize > 1 else np.ascontiguousarray(q).view(np.uint8)
    pairs = low.view("<u2")
    as_bytes = (pairs & 0xF).astype(np.uint8)
    as_bytes |= (pairs >> 4).astype(np.uint8) & 0xF0
    return as_bytes.view("<u4")


# ---------------------------------------------------------------------------------------------
# Software format (FORMAT.md 2)

SW_QWEIGHT_DIR = "qwen2_qweight_bin"
SW_FP16_DIR = "qwen2_fp16_weight_bin"
SW_LM_HEAD_QWEIGHT = "lm_head_qweight.bin"
SW_LM_HEAD_SCALES = "lm_head_scales.bin"
CONFIG = "config.json"

# FORMAT.md 8: the original compile_glm.py's names for ChatGLM, per layer and linear (weights, scales,
# bias), its q/k/v in step1_6 and the rest in step7_12; dense_h_to_4h's halves _0 (gate) and _1 (up).
# Biases where ChatGLM has none, the norms and the embedding (which it never wrote) follow its names.
_GLM_LINEAR_FILES = {
    "self_attn.q_proj": ("step1_6", "MVM_BN_Wq", "MVM_BN_Scaleq", "MVM_BN_Biasq"),
    "self_attn.k_proj": ("step1_6", "MVM_BN_Wk", "MVM_BN_Scalek", "MVM_BN_Biask"),
    "self_attn.v_proj": ("step1_6", "MVM_BN_Wv", "MVM_BN_Scalev", "MVM_BN_Biasv"),
    "self_attn.o_proj": ("step7_12", "MVM_BN_RES_weight", "MVM_BN_RES_scales", "MVM_BN_RES_bias"),
    "mlp.gate_proj": ("step7_12", "MVMBNRES1_weight_0", "MVMBNRES1_scales_0", "MVMBNRES1_bias_0"),
    "mlp.up_proj": ("step7_12", "MVMBNRES1_weight_1", "MVMBNRES1_scales_1", "MVMBNRES1_bias_1"),
    "mlp.down_proj": ("step7_12", "MVMBNRES2_weight", "MVMBNRES2_scales", "MVMBNRES2_bias"),
}
GLM_OUTPUT_DIR = "output_layer"
GLM_EMBEDDING_DIR = "embedding"
SOFTWARE_LAYOUTS = ("qwen2", "glm")
_SW_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def sw_dirs(software: str = "qwen2") -> list[str]:
    """The compile folder's subfolders that hold tensors (the rest is records): what hardware.py reads."""
    return [SW_QWEIGHT_DIR, SW_FP16_DIR] if software == "qwen2" else [GLM_OUTPUT_DIR, GLM_EMBEDDING_DIR]


def _glm_block(layer: int) -> str:
    return f"BLOCK{layer:02d}"


def sw_linear_paths(compile_dir: Path, name: str, software: str = "qwen2") -> dict[str, Path]:
    """The three files of a pipeline linear (`model.layers.N.self_attn.q_proj`)."""
    if software == "qwen2":
        d = Path(compile_dir) / SW_QWEIGHT_DIR
        return {part: d / f"{name}.{part}.bin" for part in ("qweight", "scales", "bias")}
    layer, module = _SW_LAYER.fullmatch(name).groups()
    step, *stems = _GLM_LINEAR_FILES[module]
    d = Path(compile_dir) / _glm_block(int(layer)) / step
    return {part: d / f"{stem}.bin" for part, stem in zip(("qweight", "scales", "bias"), stems, strict=True)}


def sw_lm_head_paths(compile_dir: Path, software: str = "qwen2") -> dict[str, Path]:
    if software == "qwen2":
        d = Path(compile_dir) / SW_QWEIGHT_DIR
        return {"qweight": d / SW_LM_HEAD_QWEIGHT, "scales": d / SW_LM_HEAD_SCALES}
    d = Path(compile_dir) / GLM_OUTPUT_DIR
    return {"qweight": d / "MVM_weight.bin", "scales": d / "MVM_scales.bin"}


def sw_lm_head_half_paths(compile_dir: Path, software: str = "qwen2") -> list[dict[str, Path]]:
    """compile_glm.py's output layer also in two halves of the vocabulary (rows vocab/2 and up in
    `_1`), copies of the whole file's rows; none in the Qwen2 layout."""
    if software == "qwen2":
        return []
    d = Path(compile_dir) / GLM_OUTPUT_DIR
    return [{"qweight": d / f"MVM_weight_{i}.bin", "scales": d / f"MVM_scales_{i}.bin"} for i in (0, 1)]


def sw_fp16_path(compile_dir: Path, name: str, software: str = "qwen2") -> Path:
    """`name` is a tensor name such as model.norm.weight or model.embed_tokens.weight."""
    if software == "qwen2":
        return Path(compile_dir) / SW_FP16_DIR / f"{name}.bin"
    m = _SW_LAYER.fullmatch(name)
    if m:  # a layer's norm
        return Path(compile_dir) / _glm_block(int(m.group(1))) / f"{m.group(2)}.bin"
    if name == EMBEDDING:
        return Path(compile_dir) / GLM_EMBEDDING_DIR / "word_embeddings.weight.bin"
    return Path(compile_dir) / GLM_OUTPUT_DIR / "final_layernorm.weight.bin"


def sw_norm_file(weight: np.ndarray) -> np.ndarray:
    """The norm weight then as many zeros: the board's norm unit is LayerNorm-shaped (weight, bias)."""
    return np.concatenate([weight.astype("<f2"), np.zeros(weight.shape[0], "<f2")])


class BinFile:
    """A software-format .bin of known dtype and shape, read in blocks of rows.
    Opening it checks its size, so a truncated or wrong file is refused before anything is written."""

    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), tuple(shape)
        self.row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        expected = self.row_bytes * self.shape[0]
        if not self.path.is_file():
            raise VCUError(f"{self.path}: missing")
        size = self.path.stat().st_size
        if size != expected:
            what = "truncated" if size < expected else "too long"
            raise VCUError(
                f"{self.path}: {size} bytes, expected {expected} ({self.dtype.name} {list(self.shape)}): {what}"
            )

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        out = read_bytes(self.path, start * self.row_bytes, (stop - start) * self.row_bytes).view(self.dtype)
        return out.reshape((stop - start, *self.shape[1:]))

    def read(self) -> np.ndarray:
        return self.read_rows(0, self.shape[0])


def sw_qweight_file(path: Path, chout: int, chin: int) -> BinFile:
    return BinFile(path, "<i4", (chout, chin))


def sw_scales_file(path: Path, chout: int, chin: int) -> BinFile:
    return BinFile(path, "<f2", (chout, chin // GROUP_SIZE))


def check_int4_range(q: np.ndarray, where: str, first_row: int = 0, code: str = "twos") -> None:
    """Ints outside -8..7 (-7..7 in sign-magnitude) would silently lose bits in a nibble: refuse them."""
    lo = -8 if code == "twos" else -7
    if q.size == 0 or (q.min() >= lo and q.max() <= 7):  # two fast reductions; locate only on failure
        return
    bad = np.flatnonzero((q < lo) | (q > 7))
    r, c = divmod(int(bad[0]), q.shape[1])
    if code == "sign_magnitude" and q[r, c] == -8:
        raise VCUError(f"{where}: row {first_row + r}, input {c} holds -8, which sign-magnitude int4 cannot hold (-7..7)",
                       "quantize with quantize.py --int4 sign_magnitude (lm_head.py and hardware.py follow its record), or pack with --int4 twos")
    raise VCUError(f"{where}: row {first_row + r}, input {c} holds {int(q[r, c])}, outside the int4 range {lo}..7")


# ---------------------------------------------------------------------------------------------
# Hardware format (FORMAT.md 3.1): one row of words per output channel

INPUTS_PER_CHUNK = 2048  # 16 groups of 128
SCALE_WORDS_PER_CHUNK = 8  # 16 fp16 scales, two a word
WEIGHT_WORDS_PER_CHUNK = INPUTS_PER_CHUNK // 8


def chunk_count(chin: int) -> int:
    return -(-chin // INPUTS_PER_CHUNK)


def row_words(chin: int) -> int:
    return SCALE_WORDS_PER_CHUNK * chunk_count(chin) + chin // 8


def pack_scale_words(scales: np.ndarray) -> np.ndarray:
    """fp16 [rows, groups] to uint32 [rows, 8 * chunks]: scale 2m in bits 0..15 of word m, scale 2m+1
    in bits 16..31, zero after the last scale."""
    rows, groups = scales.shape
    halves = np.zeros((rows, 2 * SCALE_WORDS_PER_CHUNK * chunk_count(groups * GROUP_SIZE)), "<u2")
    halves[:, :groups] = scales.astype("<f2", copy=False).view("<u2")
    return halves.view("<u4")


def pack_linear_rows(q: np.ndarray, scales: np.ndarray, code: str = "twos") -> np.ndarray:
    """Signed ints [rows, chin] and fp16 scales [rows, chin/128] to the board's rows, uint32
    [rows, row_words(chin)]: per chunk of 2048 inputs, its 8 scale words then its weight words."""
    return linear_rows(pack_nibbles(q, code), scales)


def linear_rows(weight_words: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The board's rows from their weight words [rows, chin/8] (pack_nibbles') and fp16 scales
    [rows, chin/128]: per chunk of 2048 inputs, its 8 scale words then its weight words."""
    rows, chin = weight_words.shape[0], 8 * weight_words.shape[1]
    scale_words = pack_scale_words(scales)
    out = np.empty((rows, row_words(chin)), "<u4")
    pos = 0
    for i in range(chunk_count(chin)):  # a handful of chunks; each copy is a whole column block
        out[:, pos : pos + SCALE_WORDS_PER_CHUNK] = scale_words[:, SCALE_WORDS_PER_CHUNK * i : SCALE_WORDS_PER_CHUNK * (i + 1)]
        pos += SCALE_WORDS_PER_CHUNK
        w = weight_words[:, WEIGHT_WORDS_PER_CHUNK * i : WEIGHT_WORDS_PER_CHUNK * (i + 1)]
        out[:, pos : pos + w.shape[1]] = w
        pos += w.shape[1]
    return out


def split_linear_rows(words: np.ndarray, chin: int) -> tuple[np.ndarray, np.ndarray]:
    """The board's rows, uint32 [rows, row_words(chin)], split into their weight words [rows, chin/8]
    and their scale half-words [rows, 16 * chunks] (the scales, then the zero padding)."""
    rows = words.shape[0]
    if words.shape[1] != row_words(chin):
        raise ValueError(f"rows of {words.shape[1]} words, expected {row_words(chin)} for chin={chin}")
    weight_words = np.empty((rows, chin // 8), "<u4")
    scale_words = np.empty((rows, SCALE_WORDS_PER_CHUNK * chunk_count(chin)), "<u4")
    pos = 0
    for i in range(chunk_count(chin)):
        scale_words[:, SCALE_WORDS_PER_CHUNK * i : SCALE_WORDS_PER_CHUNK * (i + 1)] = words[:, pos : pos + SCALE_WORDS_PER_CHUNK]
        pos += SCALE_WORDS_PER_CHUNK
        n = min(WEIGHT_WORDS_PER_CHUNK, chin // 8 - WEIGHT_WORDS_PER_CHUNK * i)
        weight_words[:, WEIGHT_WORDS_PER_CHUNK * i : WEIGHT_WORDS_PER_CHUNK * i + n] = words[:, pos : pos + n]
        pos += n
    return weight_words, scale_words.view("<u2")


def unpack_linear_rows(words: np.ndarray, chin: int, code: str = "twos") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of pack_linear_rows: (int8 [rows, chin], fp16 [rows, chin/128], uint32 padding
    half-words after the last scale, which must be zero)."""
    weight_words, halves = split_linear_rows(words, chin)
    groups = chin // GROUP_SIZE
    return unpack_nibbles(weight_words, code=code), halves[:, :groups].view("<f2"), halves[:, groups:]


# A byte of weight words holds two nibbles, input 2k low: as offset-binary (q + 8, what GPTQ and
# the emulator's Int4Weight store), a two's-complement nibble is the same bits with the top one flipped.
_OFFSET_BYTES = {
    "twos": np.arange(256, dtype=np.uint8) ^ 0x88,
    "sign_magnitude": np.array([((_NIBBLES_SIGN_MAGNITUDE[b, 0] + 8) | ((_NIBBLES_SIGN_MAGNITUDE[b, 1] + 8) << 4)) for b in range(256)], np.uint8),
}


def offset_binary_bytes(weight_words: np.ndarray, code: str = "twos") -> np.ndarray:
    """Weight words [rows, chin/8] to bytes [rows, chin/2] of q + 8 nibbles (input 2k in the low one)."""
    words = np.ascontiguousarray(weight_words, dtype="<u4")
    if code == "twos":  # the table's rule, b ^ 0x88, on whole words: one vectorised pass, not a gather
        return np.bitwise_xor(words, np.uint32(0x88888888)).view(np.uint8)
    return _OFFSET_BYTES[code][words.view(np.uint8)]


def weight_word_index(col: int) -> int:
    """Word of a packed row holding input `col` (in nibble col % 8)."""
    chunk = col // INPUTS_PER_CHUNK
    return chunk * (SCALE_WORDS_PER_CHUNK + WEIGHT_WORDS_PER_CHUNK) + SCALE_WORDS_PER_CHUNK + col // 8 - chunk * WEIGHT_WORDS_PER_CHUNK


def scale_word_index(group: int) -> int:
    """Word of a packed row holding the scale of `group` (low half if even, high half if odd)."""
    pair = group // 2
    chunk = pair // SCALE_WORDS_PER_CHUNK
    return chunk * (SCALE_WORDS_PER_CHUNK + WEIGHT_WORDS_PER_CHUNK) + pair - chunk * SCALE_WORDS_PER_CHUNK


# FORMAT.md 3.2: the accelerator's affine unit computes x * hi + lo; hi is always fp16 1.0.
BIAS_MULTIPLIER = 0x3C00


def pack_bias_words(bias: np.ndarray) -> np.ndarray:
    return (np.uint32(BIAS_MULTIPLIER) << 16) | bias.astype("<f2").view("<u2").astype("<u4")


def unpack_bias_words(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the multiplier half-words, which must be 0x3C00; the bias as fp16)."""
    return (words >> 16).astype("<u2"), (words & 0xFFFF).astype("<u2").view("<f2")


def rows_per_port(chout: int, ports: int) -> int:
    return -(-chout // ports)


def port_file(stem: str, port: int) -> str:
    return f"{stem}_HBM_DDR_{port:02d}.bin"


class PackedLinearWriter:
    """A linear's port files: row r goes to port r % P, after that port's earlier rows, and every
    port file is ceil(chout / P) rows long, zero rows after the last. The rows gather in memory (the
    packed linear, half a byte a weight), from `write` (blocks in order) or `place` (a block at any
    start that is a multiple of P, from any thread: blocks fill rows of their own); close() writes
    each port file whole, with its sha256."""

    def __init__(self, root: Path, stem: str, chin: int, chout: int, ports: int, source: str):
        self.root, self.stem, self.source = Path(root), stem, source
        self.chin, self.chout, self.ports = chin, chout, ports
        self.rows_written = 0  # by write()
        self.words = row_words(chin)
        self.by_port = np.zeros((ports, rows_per_port(chout, ports), self.words), "<u4")
        self._placed = 0
        self._lock = threading.Lock()

    def place(self, start: int, rows: np.ndarray) -> None:
        if start % self.ports:
            raise ValueError("row blocks must start at a multiple of the port count")
        n, ports = rows.shape[0], self.ports
        if start + n > self.chout:
            raise ValueError(f"rows {start}..{start + n} of {self.chout}")
        first, whole = start // ports, n // ports
        # [k*P, words] -> [P, k, words]: port p gets rows p, p+P, ...; then the last, partial round
        self.by_port[:, first : first + whole] = rows[: whole * ports].reshape(whole, ports, self.words).transpose(1, 0, 2)
        if n > whole * ports:
            self.by_port[: n - whole * ports, first + whole] = rows[whole * ports :]
        with self._lock:
            self._placed += n

    def write(self, rows: np.ndarray) -> None:
        if self.rows_written % self.ports:
            raise ValueError("row blocks must start at a multiple of the port count")
        self.place(self.rows_written, rows)
        self.rows_written += rows.shape[0]

    def close(self) -> list:
        if self._placed != self.chout:
            raise ValueError(f"wrote {self._placed} rows of {self.chout}")
        shape = dict(rows=self.by_port.shape[1], words_per_row=self.words)
        return [write_whole_file(self.root, port_file(self.stem, p), self.by_port[p], self.source, **shape) for p in range(self.ports)]


def open_port_files(port_files: list[Path], chout: int, words: int) -> list[BinFile]:
    per_port = rows_per_port(chout, len(port_files))
    return [BinFile(path, "<u4", (per_port, words)) for path in port_files]


def read_port_rows(ports: list[BinFile], start: int, stop: int, on_read=None) -> np.ndarray:
    """Inverse of the port split: rows start..stop (multiples of the port count; padding rows
    included) in channel order, reading rows start/P..stop/P of every port file. `on_read(p, rows)`,
    if given, sees each port file's rows as read (consecutive blocks: the file's bytes in order)."""
    n = len(ports)
    first, last = start // n, -(-stop // n)
    words = ports[0].shape[1]
    out = np.empty((last - first, n, words), "<u4")
    for p, f in enumerate(ports):
        rows = f.read_rows(first, last)
        if on_read is not None:
            on_read(p, rows)
        out[:, p, :] = rows
    return out.reshape(-1, words)[: stop - start]


# ---------------------------------------------------------------------------------------------
# Hardware folder layout (FORMAT.md 3.3, 3.4)

def hw_block(layer: int) -> str:
    return f"BLOCK{layer:02d}"


def hw_linear_stems(layer: int, lin: Linear) -> tuple[str, str]:
    """(weights stem, bias file) of a decoder-layer linear, relative to the hardware folder."""
    block = hw_block(layer)
    return (
        f"{block}/{lin.unit}_write_to_HBM_bin/{lin.stem}",
        f"{block}/{lin.unit}_DDR_bin/{lin.stem}_wt_and_bias_in_DDR.bin",
    )


def hw_layer_norm_file(layer: int, board_name: str) -> str:
    return f"{hw_block(layer)}/LN_DDR_bin/{board_name}_wt_in_DDR.bin"


OUT_WEIGHT_STEM = "OutLayer/MVM_BN_write_to_HBM_bin/MVMBN_Argmax"
OUT_BIAS_FILE = "OutLayer/MVM_BN_DDR_bin/MVMBN_Argmax_wt_and_bias_in_DDR.bin"
OUT_NORM_FILE = "OutLayer/LN_DDR_bin/LN_wt_in_DDR.bin"
EMBEDDING_DIR = "Embedding"


def embedding_part_file(i: int, parts: int) -> str:
    """i counts from 1."""
    return f"Embedding_{i:02d}-of-{parts:02d}.bin"


_EMBEDDING_PART = re.compile(r"Embedding_(\d{2,})-of-(\d{2,})\.bin")


def parse_embedding_part_file(name: str) -> tuple[int, int] | None:
    """(i, parts) of a name embedding_part_file wrote, else None."""
    m = _EMBEDDING_PART.fullmatch(name)
    return (int(m.group(1)), int(m.group(2))) if m and f"{int(m.group(1)):02d}" == m.group(1) and f"{int(m.group(2)):02d}" == m.group(2) else None


def check_embedding_split(vocab: int, parts: int) -> int:
    """Rows a part; a vocab that does not split evenly is refused (the original dropped the rest)."""
    if parts < 1 or vocab % parts:
        working = [k for k in range(1, 65) if vocab % k == 0]
        raise VCUError(
            f"{EMBEDDING}: vocab {vocab} does not split into {parts} equal parts; part counts up to 64 that do: "
            + ", ".join(map(str, working))
        )
    return vocab // parts
