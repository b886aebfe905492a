"""format.layout's rules as FORMAT.md writes them, byte for byte: the known answers that kill the
mutants of the full mutation run that no other test told apart (issue #23).

Every expected value here is worked out by hand from FORMAT.md (sections 2, 3.1, 3.2, 3.4 and 8),
not by calling the writer being checked."""

from pathlib import Path

import numpy as np
import pytest

from vcu128.format.layout import (
    BinFile,
    PackedLinearWriter,
    check_embedding_split,
    offset_binary_bytes,
    open_port_files,
    pack_bias_words,
    pack_nibbles,
    pack_scale_words,
    read_port_rows,
    split_linear_rows,
    sw_fp16_path,
    sw_lm_head_half_paths,
    sw_lm_head_paths,
    unpack_bias_words,
    unpack_nibbles,
)
from vcu128.io.errors import VCUError

C = Path("compile")


# ---------------------------------------------------------------------------------------------
# FORMAT.md 8: compile_glm.py's names for the output layer, its norms and its embedding


def test_the_glm_output_layer_files_by_name():
    assert sw_lm_head_paths(C, "glm") == {"qweight": C / "output_layer" / "MVM_weight.bin", "scales": C / "output_layer" / "MVM_scales.bin"}
    assert sw_lm_head_half_paths(C, "glm") == [
        {"qweight": C / "output_layer" / "MVM_weight_0.bin", "scales": C / "output_layer" / "MVM_scales_0.bin"},
        {"qweight": C / "output_layer" / "MVM_weight_1.bin", "scales": C / "output_layer" / "MVM_scales_1.bin"},
    ]
    assert sw_lm_head_half_paths(C, "qwen2") == []  # the Qwen2 layout has no halves
    assert sw_lm_head_paths(C, "qwen2") == {"qweight": C / "qwen2_qweight_bin" / "lm_head_qweight.bin",
                                            "scales": C / "qwen2_qweight_bin" / "lm_head_scales.bin"}


def test_the_glm_fp16_files_by_name():
    assert sw_fp16_path(C, "model.layers.3.input_layernorm.weight", "glm") == C / "BLOCK03" / "input_layernorm.weight.bin"
    assert sw_fp16_path(C, "model.layers.12.post_attention_layernorm.weight", "glm") == C / "BLOCK12" / "post_attention_layernorm.weight.bin"
    assert sw_fp16_path(C, "model.embed_tokens.weight", "glm") == C / "embedding" / "word_embeddings.weight.bin"
    assert sw_fp16_path(C, "model.norm.weight", "glm") == C / "output_layer" / "final_layernorm.weight.bin"
    assert sw_fp16_path(C, "model.norm.weight", "qwen2") == C / "qwen2_fp16_weight_bin" / "model.norm.weight.bin"


# ---------------------------------------------------------------------------------------------
# FORMAT.md 3.1: nibbles, scale words, rows


def test_words_are_read_by_value_whatever_their_byte_order_in_memory():
    """Input 8k+j in bits 4j..4j+3 of word k's value: a big-endian array of the same words (as
    np.fromfile(..., '>u4') gives) holds the same inputs."""
    words = np.array([[0x76543210, 0xFEDCBA98]], ">u4")
    assert unpack_nibbles(words).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1]]
    assert unpack_nibbles(words, code="sign_magnitude").tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0, -1, -2, -3, -4, -5, -6, -7]]
    # q + 8 a nibble, input 2k in the low one: (0, 1) -> 0x98, ..., (-8, -7) -> 0x10, ...
    assert offset_binary_bytes(words).tolist() == [[0x98, 0xBA, 0xDC, 0xFE, 0x10, 0x32, 0x54, 0x76]]
    # sign-magnitude 0x8..0xF are -0, -1..-7: q + 8 is 8, 7, 6, ..., 1
    assert offset_binary_bytes(words, "sign_magnitude").tolist() == [[0x98, 0xBA, 0xDC, 0xFE, 0x78, 0x56, 0x34, 0x12]]


def test_int8_inputs_in_any_memory_order_pack_by_value():
    """pack_nibbles reads int8 inputs as bytes in place: one laid out column-major (a transposed
    view, as q.T of a checkpoint's [chin, chout] ints is) packs as its row-major copy does."""
    q = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [-8, -7, -6, -5, -4, -3, -2, -1]], np.int8)
    for laid_out in (np.asfortranarray(q), np.ascontiguousarray(q.T).T):
        assert not laid_out.flags.c_contiguous
        got = pack_nibbles(laid_out)
        assert got.dtype == np.dtype("<u4") and got.tolist() == [[0x76543210], [0xFEDCBA98]]
    # sign-magnitude: w, or 8 + |w| for w < 0 (0x8 never written: -0 is 0)
    sm = np.asfortranarray(np.array([[-7, -6, -5, -4, -3, -2, -1, 0], [1, 2, 3, 4, 5, 6, 7, 7]], np.int8))
    assert pack_nibbles(sm, "sign_magnitude").tolist() == [[0x09ABCDEF], [0x77654321]]


def test_scale_words_of_three_groups():
    """Scale 2m in bits 0..15 of word m, 2m+1 in bits 16..31, a missing partner 0, then zero words up
    to a multiple of 8: 1.0 (0x3C00), 2.0 (0x4000), -0.5 (0xB800)."""
    words = pack_scale_words(np.array([[1.0, 2.0, -0.5]], np.float16))
    assert words.dtype == np.dtype("<u4")
    assert words.tolist() == [[0x40003C00, 0x0000B800, 0, 0, 0, 0, 0, 0]]


def test_a_row_split_into_weight_and_scale_words():
    # chin 128: 8 scale words then 16 weight words (8 + 128/8 = 24)
    row = np.arange(24, dtype="<u4")[None]
    weight, halves = split_linear_rows(row, 128)
    assert weight.dtype == np.dtype("<u4") and weight.tolist() == [list(range(8, 24))]
    assert halves.dtype == np.dtype("<u2") and halves.tolist() == [[k for w in range(8) for k in (w, 0)]]
    # chin 2176: chunk 0 is 8 scale words and 256 weight words, chunk 1 8 scale words and 16 weight words
    row = np.arange(8 + 256 + 8 + 16, dtype="<u4")[None]
    weight, halves = split_linear_rows(row, 2176)
    assert weight.tolist() == [list(range(8, 264)) + list(range(272, 288))]
    assert halves.view("<u4").tolist() == [list(range(8)) + list(range(264, 272))]


def test_a_row_of_the_wrong_length_is_refused_naming_both_lengths():
    with pytest.raises(ValueError) as e:
        split_linear_rows(np.zeros((2, 23), "<u4"), 128)
    assert str(e.value) == "rows of 23 words, expected 24 for chin=128"


# ---------------------------------------------------------------------------------------------
# FORMAT.md 3.2: bias words


def test_bias_words_and_back():
    words = pack_bias_words(np.array([1.0, -2.0, 0.0], np.float16))
    assert words.tolist() == [0x3C003C00, 0x3C00C000, 0x3C000000]
    mult, bias = unpack_bias_words(np.array([0x3C00ABCD, 0x12345678], "<u4"))
    assert mult.dtype == np.dtype("<u2") and mult.tobytes() == bytes([0x00, 0x3C, 0x34, 0x12])
    assert bias.dtype == np.dtype("<f2") and bias.view("<u2").tolist() == [0xABCD, 0x5678]


# ---------------------------------------------------------------------------------------------
# FORMAT.md 3.1 step 4: rows over ports


def _rows(start: int, n: int, words: int = 24) -> np.ndarray:
    """Row r all words r + 1 (a zero row is padding)."""
    return np.repeat(np.arange(start + 1, start + n + 1, dtype="<u4")[:, None], words, axis=1)


def test_rows_written_in_blocks_go_round_the_ports(tmp_path):
    w = PackedLinearWriter(tmp_path, "BLOCK00/x/S", chin=128, chout=6, ports=2, source="model.layers.0.mlp.down_proj")
    for start in (0, 2, 4):
        w.write(_rows(start, 2))
    records = w.close()
    assert [r.path for r in records] == ["BLOCK00/x/S_HBM_DDR_00.bin", "BLOCK00/x/S_HBM_DDR_01.bin"]
    assert [r.source for r in records] == ["model.layers.0.mlp.down_proj"] * 2
    assert [(r.rows, r.words_per_row, r.bytes) for r in records] == [(3, 24, 3 * 24 * 4)] * 2
    # port 0: rows 0, 2, 4; port 1: rows 1, 3, 5
    assert np.fromfile(tmp_path / records[0].path, "<u4").reshape(3, 24)[:, 0].tolist() == [1, 3, 5]
    assert np.fromfile(tmp_path / records[1].path, "<u4").reshape(3, 24)[:, 0].tolist() == [2, 4, 6]


def test_a_chout_the_ports_do_not_divide_ends_in_zero_rows(tmp_path):
    w = PackedLinearWriter(tmp_path, "S", chin=128, chout=5, ports=2, source="s")
    w.write(_rows(0, 5))
    records = w.close()
    assert np.fromfile(tmp_path / records[0].path, "<u4").reshape(3, 24)[:, 0].tolist() == [1, 3, 5]
    assert np.fromfile(tmp_path / records[1].path, "<u4").reshape(3, 24).tolist() == [[2] * 24, [4] * 24, [0] * 24]


def test_the_port_writers_refusals_word_for_word(tmp_path):
    w = PackedLinearWriter(tmp_path, "S", chin=128, chout=5, ports=2, source="s")
    with pytest.raises(ValueError) as e:
        w.place(1, _rows(1, 2))
    assert str(e.value) == "row blocks must start at a multiple of the port count"
    with pytest.raises(ValueError) as e:
        w.place(0, _rows(0, 6))
    assert str(e.value) == "rows 0..6 of 5"
    with pytest.raises(ValueError) as e:
        w.place(4, _rows(4, 2))
    assert str(e.value) == "rows 4..6 of 5"
    w.write(_rows(0, 3))
    with pytest.raises(ValueError) as e:  # write's own check: 3 rows written, the next block would start mid-round
        w.write(_rows(3, 2))
    assert str(e.value) == "row blocks must start at a multiple of the port count"
    with pytest.raises(ValueError) as e:
        w.close()
    assert str(e.value) == "wrote 3 rows of 5"


def _port_files(folder: Path, ports: int, per_port: int, words: int = 2) -> list[Path]:
    """Port p's row k is channel k * ports + p, every word 10 * channel + word."""
    paths = []
    for p in range(ports):
        ch = np.arange(per_port)[:, None] * ports + p
        path = folder / f"S_HBM_DDR_{p:02d}.bin"
        (10 * ch + np.arange(words)).astype("<u4").tofile(path)
        paths.append(path)
    return paths


def test_rows_read_back_in_channel_order(tmp_path):
    files = open_port_files(_port_files(tmp_path, 2, 3), chout=6, words=2)
    got = read_port_rows(files, 2, 5)
    assert got.dtype == np.dtype("<u4")
    assert got.tolist() == [[20, 21], [30, 31], [40, 41]]
    seen = []
    assert read_port_rows(files, 0, 6, on_read=lambda p, rows: seen.append((p, rows[:, 0].tolist()))).tolist() == [
        [10 * c, 10 * c + 1] for c in range(6)]
    assert seen == [(0, [0, 20, 40]), (1, [10, 30, 50])]
    # one port (P = 1): its file is the rows in order
    one = open_port_files(_port_files(tmp_path, 1, 3), chout=3, words=2)
    assert read_port_rows(one, 1, 3).tolist() == [[10, 11], [20, 21]]


# ---------------------------------------------------------------------------------------------
# FORMAT.md 3.4: the embedding's parts


def test_the_embedding_split_into_parts():
    assert check_embedding_split(512, 1) == 512  # one part: the whole table
    assert check_embedding_split(512, 16) == 32
    with pytest.raises(VCUError) as e:
        check_embedding_split(130, 3)
    assert str(e.value) == "model.embed_tokens.weight: vocab 130 does not split into 3 equal parts; part counts up to 64 that do: 1, 2, 5, 10, 13, 26"
    with pytest.raises(VCUError) as e:
        check_embedding_split(6, 0)
    assert str(e.value) == "model.embed_tokens.weight: vocab 6 does not split into 0 equal parts; part counts up to 64 that do: 1, 2, 3, 6"


# ---------------------------------------------------------------------------------------------
# FORMAT.md 2: a software-format file's size checked on opening


def test_a_bin_file_of_the_wrong_size_is_refused_saying_which_way(tmp_path):
    path = tmp_path / "x.bin"
    np.zeros(5, "<f2").tofile(path)
    with pytest.raises(VCUError) as e:
        BinFile(path, "<f2", (2, 3))
    assert str(e.value) == f"{path}: 10 bytes, expected 12 (float16 [2, 3]): truncated"
    np.zeros(7, "<f2").tofile(path)
    with pytest.raises(VCUError) as e:
        BinFile(path, "<f2", (2, 3))
    assert str(e.value) == f"{path}: 14 bytes, expected 12 (float16 [2, 3]): too long"
    np.arange(6, dtype="<f2").tofile(path)
    assert BinFile(path, "<f2", (2, 3)).read_rows(1, 2).tolist() == [[3.0, 4.0, 5.0]]
