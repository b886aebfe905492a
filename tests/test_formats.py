"""FORMAT.md 3.1 / 3.2 / 3.4 rule by rule: literal words from the text, and a literal reference."""

import numpy as np
import pytest
import reference as ref

from vcu128.format.layout import (
    BinFile,
    PackedLinearWriter,
    check_embedding_split,
    open_port_files,
    pack_bias_words,
    pack_linear_rows,
    pack_nibbles,
    read_port_rows,
    row_words,
    rows_per_port,
    scale_word_index,
    unpack_bias_words,
    unpack_linear_rows,
    unpack_nibbles,
    weight_word_index,
)
from vcu128.io.errors import VCUError


def test_nibble_order_and_twos_complement():
    # Inputs 0..7 then -8..-1: input 8k+j in bits 4j..4j+3; -1 is 0xF, -8 is 0x8.
    q = np.array([[0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1]], np.int32)
    assert pack_nibbles(q).tolist() == [[0x76543210, 0xFEDCBA98]]
    assert unpack_nibbles(np.array([[0x76543210, 0xFEDCBA98]], np.uint32)).tolist() == q.tolist()


def test_gptq_nibbles_are_unsigned_minus_zero_point():
    # FORMAT.md 1: nibble j of qweight[i, c] is input 8i + j; signed weight is q - 8.
    words = np.array([[0x76543210, 0xFEDCBA98]], np.uint32)
    assert unpack_nibbles(words, unsigned_offset=8).tolist() == [list(range(-8, 8))]


@pytest.mark.parametrize(
    "chin, words",
    # FORMAT.md 4: 8 * ceil(chin / 2048) + chin / 8
    [(896, 8 + 112), (2048, 8 + 256), (2176, 16 + 272), (3584, 464), (18944, 2448)],
)
def test_row_length(chin, words):
    assert row_words(chin) == words


@pytest.mark.parametrize(
    "chout, rows",  # FORMAT.md 4, P = 32
    [(3584, 112), (512, 16), (18944, 592), (152064, 4752), (70, 3), (1, 1)],
)
def test_rows_per_port(chout, rows):
    assert rows_per_port(chout, 32) == rows


def test_scale_pairing_and_padding_literal():
    # hidden 896: 7 scales, 4 pair words (the last with a zero partner), then 4 zero words.
    scales = np.array([[1.0, 2.0, -0.5, 0.25, 3.0, 0.125, 65504.0]], np.float16)
    q = np.zeros((1, 896), np.int8)
    row = pack_linear_rows(q, scales)[0]
    assert row[:8].tolist() == [0x40003C00, 0x3400B800, 0x30004200, 0x00007BFF, 0, 0, 0, 0]
    assert not row[8:].any()


@pytest.mark.parametrize("chin", [896, 2048, 2432, 3584, 4864, 18944])
def test_packed_rows_match_the_literal_reference(chin):
    rng = np.random.default_rng(chin)
    q = rng.integers(-8, 8, (3, chin)).astype(np.int8)
    scales = rng.uniform(-1, 1, (3, chin // 128)).astype(np.float16)
    rows = pack_linear_rows(q, scales)
    assert rows.dtype == np.dtype("<u4") and rows.shape == (3, row_words(chin))
    for r in range(3):
        assert rows[r].tolist() == ref.packed_row(q[r], scales[r])


def test_partial_last_chunk_positions():
    # chin 3584 (Qwen2-7B hidden): chunk 0 = 8 scale words + 256 weight words, chunk 1 = 8 + 192.
    chin = 3584
    q = np.zeros((1, chin), np.int8)
    q[0, 2047] = 7  # last input of chunk 0: word 255, nibble 7
    q[0, 2048] = -1  # first input of chunk 1: word 256, nibble 0
    q[0, 3583] = -8  # last input: word 447, nibble 7
    scales = np.zeros((1, 28), np.float16)
    scales[0, 15] = 1.0  # last scale of chunk 0: word 7, high half
    scales[0, 16] = 2.0  # first scale of chunk 1: word 8, low half
    scales[0, 27] = -2.0  # last scale: word 13, high half; words 14, 15 are padding
    row = pack_linear_rows(q, scales)[0]
    expect = np.zeros(464, np.uint32)
    expect[7] = 0x3C00 << 16
    expect[8 + 255] = 0x7 << 28
    expect[264] = 0x4000  # chunk 1 starts at word 8 + 256 = 264 with its scale words
    expect[264 + 5] = 0xC000 << 16
    expect[264 + 8] = 0xF
    expect[264 + 8 + 191] = 0x8 << 28
    assert row.tolist() == expect.tolist()


def test_unpack_inverts_pack_every_int_and_scale():
    rng = np.random.default_rng(3)
    for chin in (896, 2432, 3584, 18944):
        q = rng.integers(-8, 8, (5, chin)).astype(np.int8)
        s = rng.standard_normal((5, chin // 128)).astype(np.float16)
        q2, s2, pad = unpack_linear_rows(pack_linear_rows(q, s), chin)
        assert np.array_equal(q2, q)
        assert np.array_equal(s2.view(np.uint16), s.view(np.uint16))
        assert not pad.any()


def test_bias_words_literal():
    bias = np.array([0.0, 1.0, -2.0, 0.5], np.float16)
    assert pack_bias_words(bias).tolist() == [0x3C000000, 0x3C003C00, 0x3C00C000, 0x3C003800]
    mult, b = unpack_bias_words(pack_bias_words(bias))
    assert mult.tolist() == [0x3C00] * 4 and b.tolist() == bias.tolist()


@pytest.mark.parametrize("chout, ports", [(70, 32), (64, 32), (5, 4), (3, 8)])
def test_port_split_order_and_zero_rows(tmp_path, chout, ports):
    chin = 256
    rows = np.arange(chout * row_words(chin), dtype=np.uint32).reshape(chout, -1) + 1  # no row is zero
    w = PackedLinearWriter(tmp_path, "X", chin, chout, ports, source="x")
    step = ports * 2
    for r in range(0, chout, step):
        w.write(rows[r : r + step])
    records = w.close()
    per_port = rows_per_port(chout, ports)
    assert [r.bytes for r in records] == [per_port * row_words(chin) * 4] * ports
    for r in range(per_port * ports):
        port, pos = ref.port_of_row(r, ports)
        got = ref.words_of(tmp_path / f"X_HBM_DDR_{port:02d}.bin", pos * row_words(chin), row_words(chin))
        assert got == (rows[r].tolist() if r < chout else [0] * row_words(chin)), (r, port, pos)
    files = open_port_files([tmp_path / f"X_HBM_DDR_{p:02d}.bin" for p in range(ports)], chout, row_words(chin))
    back = read_port_rows(files, 0, per_port * ports)
    assert np.array_equal(back[:chout], rows) and not back[chout:].any()
    if 2 * ports <= chout:  # a block that starts past the first round of rows
        assert np.array_equal(read_port_rows(files, ports, 2 * ports), rows[ports : 2 * ports])


def test_embedding_split_refuses_uneven_vocab_and_names_working_counts():
    assert check_embedding_split(152064, 16) == 9504
    with pytest.raises(VCUError, match=r"vocab 1000 does not split into 16 equal parts.*: 1, 2, 4, 5, 8, 10, 20, 25, 40, 50"):
        check_embedding_split(1000, 16)


def test_binfile_refuses_truncated_and_long_files(tmp_path):
    p = tmp_path / "x.qweight.bin"
    np.zeros((4, 128), "<i4").tofile(p)
    assert BinFile(p, "<i4", (4, 128)).read_rows(1, 3).shape == (2, 128)
    with pytest.raises(VCUError, match=r"x.qweight.bin: 2048 bytes, expected 2560 \(int32 \[5, 128\]\): truncated"):
        BinFile(p, "<i4", (5, 128))
    with pytest.raises(VCUError, match="too long"):
        BinFile(p, "<i4", (3, 128))
    with pytest.raises(VCUError, match="missing"):
        BinFile(tmp_path / "nope.bin", "<i4", (3, 128))


@pytest.mark.parametrize("chin", [896, 3584, 18944])
def test_word_index_helpers_agree_with_the_layout(chin):
    rng = np.random.default_rng(chin)
    for col in sorted(c for c in {0, 7, 8, 2047, 2048, chin - 1, *rng.integers(0, chin, 20).tolist()} if c < chin):
        q = np.zeros((1, chin), np.int8)
        q[0, col] = 1
        row = pack_linear_rows(q, np.zeros((1, chin // 128), np.float16))[0]
        assert np.flatnonzero(row).tolist() == [weight_word_index(col)], col
        assert row[weight_word_index(col)] == 1 << 4 * (col % 8)
    for g in range(chin // 128):
        s = np.zeros((1, chin // 128), np.float16)
        s[0, g] = 1.0
        row = pack_linear_rows(np.zeros((1, chin), np.int8), s)[0]
        assert np.flatnonzero(row).tolist() == [scale_word_index(g)], g
        assert row[scale_word_index(g)] == 0x3C00 << (16 * (g % 2))


@pytest.mark.parametrize("code", ["twos", "sign_magnitude"])
def test_board_words_to_offset_binary_bytes(code):
    """The emulator reads a packed output layer byte for byte: q + 8 nibbles, input 2k low."""
    from vcu128.format.layout import offset_binary_bytes, split_linear_rows

    rng = np.random.default_rng(4)
    q = rng.integers(-7, 8, (3, 2048 + 896)).astype(np.int8)
    s = rng.uniform(0.01, 0.1, (3, (2048 + 896) // 128)).astype(np.float16)
    words, halves = split_linear_rows(pack_linear_rows(q, s, code), q.shape[1])
    b = offset_binary_bytes(words, code)
    assert np.array_equal(np.stack([(b & 15).astype(int) - 8, (b >> 4).astype(int) - 8], -1).reshape(3, -1), q)
    assert np.array_equal(halves[:, : s.shape[1]].view("<f2"), s)


@pytest.mark.parametrize("chout, ports", [(70, 32), (5, 4), (96, 8)])
def test_port_writer_takes_blocks_in_any_order(tmp_path, chout, ports):
    """`place` (hardware.py's packing threads) fills the same files as `write` in order, whatever
    order the blocks come in; a block must start at a multiple of the port count."""
    chin = 256
    rows = np.arange(chout * row_words(chin), dtype=np.uint32).reshape(chout, -1) + 1
    in_order = PackedLinearWriter(tmp_path / "a", "X", chin, chout, ports, source="x")
    in_order.write(rows)
    placed = PackedLinearWriter(tmp_path / "b", "X", chin, chout, ports, source="x")
    starts = list(range(0, chout, ports))
    for start in reversed(starts):  # the last, partial round of rows first
        placed.place(start, rows[start : start + ports])
    with pytest.raises(ValueError, match="multiple of the port count"):
        placed.place(1, rows[1:2])
    a, b = in_order.close(), placed.close()
    assert [(r.path, r.bytes, r.sha256) for r in a] == [(r.path, r.bytes, r.sha256) for r in b]
    for p in range(ports):
        name = f"X_HBM_DDR_{p:02d}.bin"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_port_writer_refuses_to_close_with_rows_missing(tmp_path):
    w = PackedLinearWriter(tmp_path, "X", 256, 70, 32, source="x")
    w.place(32, np.ones((32, row_words(256)), np.uint32))
    with pytest.raises(ValueError, match="wrote 32 rows of 70"):
        w.close()


@pytest.mark.parametrize("shape", [(1, 1), (3, 500), (300, 7), (130, 257), (256, 128)])
def test_transposed_is_the_transpose(shape):
    from vcu128.format.layout import transposed

    a = np.random.default_rng(3).integers(0, 1 << 32, shape, dtype=np.uint32)
    t = transposed(a[:, 1:] if shape[1] > 1 else a)  # a column slice, as GPTQ's qweight is taken in blocks
    want = (a[:, 1:] if shape[1] > 1 else a).T
    assert t.flags.c_contiguous and t.dtype == a.dtype and np.array_equal(t, want)


@pytest.mark.parametrize("code", ["twos", "sign_magnitude"])
@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
def test_pack_nibbles_any_int_dtype_and_strided_input(code, dtype):
    lo = -8 if code == "twos" else -7
    q = np.random.default_rng(4).integers(lo, 8, (9, 512)).astype(dtype)
    for x in (q, q[:, ::2], q[::3]):  # contiguous, every other column, every third row
        assert np.array_equal(unpack_nibbles(pack_nibbles(x, code), code=code), x)


def test_unpack_nibbles_into_given_memory():
    words = np.random.default_rng(5).integers(0, 1 << 32, (6, 16), dtype=np.uint32)
    out = np.empty((6, 128), "<i4")
    got = unpack_nibbles(words, unsigned_offset=8, dtype="<i4", out=out)
    assert np.shares_memory(got, out) and np.array_equal(got, unpack_nibbles(words, unsigned_offset=8, dtype="<i4"))
