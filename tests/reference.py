"""Slow, literal implementations of FORMAT.md, written from its wording with plain Python ints.

Tests compare the fast vectorised code against these on sampled rows; nothing here calls vcu128.
"""

import math
import struct

import numpy as np

G = 128


def fp16_bits(x) -> int:
    return struct.unpack("<H", struct.pack("<e", float(x)))[0]


def gptq_int(qweight: np.ndarray, r: int, c: int) -> int:
    """FORMAT.md 1: input row r = 8i + j of column c is nibble j of qweight[i, c]."""
    return (int(qweight[r // 8, c]) >> (4 * (r % 8))) & 0xF


def gptq_signed_column(qweight: np.ndarray, c: int) -> list[int]:
    return [gptq_int(qweight, r, c) - 8 for r in range(qweight.shape[0] * 8)]


def weight_words(q_row) -> list[int]:
    """3.1 step 1: word k holds inputs 8k..8k+7, input 8k+j in bits 4j..4j+3, two's complement nibble."""
    words = []
    for k in range(len(q_row) // 8):
        w = 0
        for j in range(8):
            w |= (int(q_row[8 * k + j]) & 0xF) << (4 * j)
        words.append(w)
    return words


def scale_words(scale_row) -> list[int]:
    """3.1 step 2: scales in pairs, 2m low, 2m+1 high, a missing partner 0, padded to a multiple of 8."""
    bits = [fp16_bits(s) for s in scale_row]
    words = []
    for m in range(math.ceil(len(bits) / 2)):
        lo = bits[2 * m]
        hi = bits[2 * m + 1] if 2 * m + 1 < len(bits) else 0
        words.append(lo | (hi << 16))
    while len(words) % 8:
        words.append(0)
    return words


def packed_row(q_row, scale_row) -> list[int]:
    """3.1 step 3: per chunk of 2048 inputs, scale words 8i..8i+7 then weight words 256i..256i+255."""
    chin = len(q_row)
    ww, sw = weight_words(q_row), scale_words(scale_row)
    row = []
    for i in range(math.ceil(chin / 2048)):
        row += sw[8 * i : 8 * i + 8]
        row += ww[256 * i : 256 * i + 256]
    assert len(row) == 8 * math.ceil(chin / 2048) + chin // 8
    return row


def port_of_row(r: int, ports: int) -> tuple[int, int]:
    """3.1 step 4: port p gets rows p, p+P, ...: (port, position in that port's file)."""
    return r % ports, r // ports


def bias_word(b) -> int:
    return (0x3C00 << 16) | fp16_bits(b)


def trunc_group(group) -> tuple[float, list[int]]:
    """FORMAT.md 2, method trunc, one group, with numpy float32 scalars: (float32 scale, ints)."""
    w = [np.float32(x) for x in group]
    mx, mn = max(w), min(w)
    scale = mx / np.float32(7) if mx >= abs(mn) else abs(mn) / np.float32(8)
    if scale == 0:
        return scale, [0] * len(w)
    return scale, [int(np.trunc(np.float32(x) / scale)) for x in w]


def words_of(path, offset_words: int, count: int) -> list[int]:
    with open(path, "rb") as f:
        f.seek(4 * offset_words)
        data = f.read(4 * count)
    return list(struct.unpack(f"<{count}I", data))
