"""Prove a packed folder is the model before it goes on the board.

Bit check: decode every file of the packed folder (FORMAT.md 3 to 5) back to ints, scales, biases,
norm weights, embedding rows and tables, and compare each word, padding included, with what the
GPTQ checkpoint itself gives: the decoder's linears decoded from its tensors, the output layer made
again from the checkpoint's lm_head (or tied embedding) by the method and grid the folder records,
the tables from its config.json. No intermediate file is trusted: the compile folder is read only
for warnings and, for a folder without a manifest, its fp16 factors. Then sizes and sha256 against
manifest.json, and no missing or extra file.

Functional check (check/functional.py): the folder's model in the board's fp16 arithmetic next to
the checkpoint's model in fp32, on held-out tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vcu128 import __version__
from vcu128.check.inputs import evaluation_inputs
from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.folder import (
    MANIFEST_NAME,
    OutputLayerRecord,
    PackedFolder,
    find_compile_dir,
)
from vcu128.format.layout import (
    BIAS_MULTIPLIER,
    OUT_BIAS_FILE,
    OUT_NORM_FILE,
    OUT_WEIGHT_STEM,
    BinFile,
    hw_layer_norm_file,
    hw_linear_stems,
    offset_binary_bytes,
    pack_linear_rows,
    pack_nibbles,
    port_file,
    read_port_rows,
    row_words,
    rows_per_port,
    scale_word_index,
    split_linear_rows,
    sw_norm_file,
    transposed,
    unpack_bias_words,
    unpack_nibbles,
    weight_word_index,
)
from vcu128.format.model import (
    EMBEDDING,
    FINAL_NORM,
    GROUP_SIZE,
    LAYER_NORMS,
    LINEARS,
    parse_model_dims,
    read_model_config,
)
from vcu128.format.rescale import scale_fp16, tensor_factor
from vcu128.format.tables import (
    ACT_FILE,
    BOARD_HEAD_DIM,
    ROPE_ORDERS_OF,
    rope_table,
    silu_table,
)
from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import dumps
from vcu128.io.output import (
    TOOL,
    read_step_record,
    replace_file_atomically,
    sha256_file,
)
from vcu128.io.parallel import (
    import_in_background,
    in_background,
    ordered_map,
    rows_per_block,
)
from vcu128.io.progress import bar
from vcu128.io.provenance import stale_compile, stale_hardware, warn
from vcu128.quant.rtn import quantize_rows

log = logging.getLogger("vcu128")

MAX_REPORTED = 20
REPORT_NAME = "verify_report.json"
# The board model answers like the checkpoint when it agrees on the next token this often, with no
# fp16 site saturated. The tiny demo model measures 0.96; a 7B measures 0.98 or more.
BOARD_TOP1_THRESHOLD = 0.9


@dataclass
class BitReport:
    differences: list[str] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    more: int = 0  # differences found past MAX_REPORTED
    stale: list[str] = field(default_factory=list)  # warnings that may explain the differences
    sha256: dict[str, str] = field(default_factory=dict)  # files read whole while checked: their sha256, from those bytes

    def add(self, message: str) -> None:
        if len(self.differences) < MAX_REPORTED:
            self.differences.append(message)
        else:
            self.more += 1

    @property
    def ok(self) -> bool:
        return not self.differences

    def merge(self, other: "BitReport") -> None:
        for d in other.differences:
            self.add(d)
        self.more += other.more
        self.files_checked += other.files_checked
        self.bytes_checked += other.bytes_checked
        self.sha256.update(other.sha256)


# ---------------------------------------------------------------------------------------------
# One file, one linear


def _place(stem: str, row: int, ports: int) -> str:
    return f"{port_file(stem, row % ports)}: row {row // ports} (output channel {row})"


def check_packed_linear(report: BitReport, folder: PackedFolder, stem: str, chin: int, chout: int, expected) -> None:
    """Compare a linear's port files with `expected(start, stop) -> (weights, fp16 scales)`: the
    weights as signed ints [rows, chin] (int8), or as GPTQ packs them, uint8 [rows, chin/2] of q + 8
    nibbles, input 2k in the low one (a checkpoint's qweight, transposed: nothing to decode).
    The folder's weight words are compared in that form, every word of every row; each port file is
    read once, and its sha256 taken from those bytes for the manifest check."""
    int4, ports = folder.assumptions.int4, folder.ports
    words = row_words(chin)
    try:
        files = folder.open_linear(stem, chin, chout)
    except VCUError as e:
        return report.add(str(e).replace(str(folder.path) + "/", ""))
    report.files_checked += ports
    total = rows_per_port(chout, ports) * ports
    report.bytes_checked += total * words * 4
    # Blocks of 16 MB of int8 weights: 8 MB of packed rows, read a quarter MB a port file.
    step = rows_per_block(2 * chin, multiple=ports)
    groups = chin // GROUP_SIZE

    def compare(start: int):
        """(rows read, each port's rows as read, real rows, rows that differ, expected ints and scales of those)."""
        stop = min(start + step, total)
        pieces: list = [None] * ports
        rows = read_port_rows(files, start, stop, on_read=pieces.__setitem__)
        real = max(0, min(stop, chout) - start)
        bad_rows, want = np.zeros(0, np.int64), None
        if real:
            weight_words, halves = split_linear_rows(rows[:real], chin)
            want_w, want_s = expected(start, start + real)
            want_b = want_w if want_w.dtype == np.uint8 else offset_binary_bytes(pack_nibbles(want_w))
            # compared 16 nibbles at a time (chin/2 bytes a row: a multiple of 8)
            same = offset_binary_bytes(weight_words, int4).view("<u8") == np.ascontiguousarray(want_b).view("<u8")
            bad_rows = np.flatnonzero(~same.all(1) | (halves[:, :groups] != want_s.view("<u2")).any(1) | halves[:, groups:].any(1))
            if bad_rows.size:  # the expected ints of the first few, to describe them
                shown = bad_rows[:3]
                q = want_w[shown] if want_w.dtype != np.uint8 else unpack_nibbles(np.ascontiguousarray(want_b[shown]).view("<u4"), unsigned_offset=8)
                want = (q, want_s[shown])
        return rows, pieces, real, bad_rows, want

    hashes = [hashlib.sha256() for _ in range(ports)]
    for start, (rows, pieces, real, bad_rows, want) in zip(range(0, total, step), ordered_map(compare, range(0, total, step))):
        for sha, piece in zip(hashes, pieces):
            sha.update(piece)
        for i, r in enumerate(bad_rows[:3]):
            _describe_row(report, stem, start + int(r), ports, rows[r], pack_linear_rows(want[0][i : i + 1], want[1][i : i + 1], int4)[0], chin)
        report.more += max(0, len(bad_rows) - 3)
        if (rows[real:] != 0).any():
            r = real + int(np.flatnonzero((rows[real:] != 0).any(1))[0])
            w = int(np.flatnonzero(rows[r])[0])
            report.add(f"{_place(stem, start + r, ports)}: padding row, word {w} is {int(rows[r, w]):#010x}, expected 0")
    for p, sha in enumerate(hashes):
        report.sha256[port_file(stem, p)] = sha.hexdigest()


def _describe_row(report: BitReport, stem: str, row: int, ports: int, got: np.ndarray, want: np.ndarray, chin: int) -> None:
    w = int(np.flatnonzero(got != want)[0])
    groups = chin // GROUP_SIZE
    scale_words = {scale_word_index(g): g for g in range(0, groups, 2)}
    weight_words = {weight_word_index(c): c for c in range(0, chin, 8)}
    if w in weight_words:
        c = weight_words[w]
        what = f"weights of inputs {c}..{c + 7}"
    elif w in scale_words:
        g = scale_words[w]
        what = f"scales of groups {g}" + (f" and {g + 1}" if g + 1 < groups else " (high half must be 0)")
    else:
        what = "scale padding word (must be 0)"
    report.add(f"{_place(stem, row, ports)}, word {w} ({what}) is {int(got[w]):#010x}, expected {int(want[w]):#010x}")


def read_checked(report: BitReport, folder: PackedFolder, rel: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """A whole file of the folder, counted as checked; a missing or wrongly sized one is a difference
    (and None)."""
    try:
        data = BinFile(folder.path / rel, dtype, shape).read()
    except VCUError as e:
        report.add(str(e).replace(str(folder.path) + "/", ""))
        return None
    report.files_checked += 1
    report.bytes_checked += data.nbytes
    report.sha256[rel] = hashlib.sha256(data).hexdigest()  # the whole file (its size was checked): read once
    return data


def check_bias_words(report: BitReport, folder: PackedFolder, rel: str, expected: np.ndarray) -> None:
    """Both halves of every word: the multiplier 1.0 and the bias value."""
    words = read_checked(report, folder, rel, "<u4", (expected.shape[0],))
    if words is None:
        return
    mult, bias = unpack_bias_words(words)
    bad = np.flatnonzero((mult != BIAS_MULTIPLIER) | (bias.view("<u2") != expected.astype("<f2").view("<u2")))
    if bad.size:
        i = int(bad[0])
        want = (BIAS_MULTIPLIER << 16) | int(expected.astype("<f2").view("<u2")[i])
        report.add(f"{rel}: word {i} (bias of output channel {i}) is {int(words[i]):#010x}, expected {want:#010x}")


def check_fp16_file(report: BitReport, folder: PackedFolder, rel: str, expected: np.ndarray, what: str, row_len: int | None = None) -> None:
    got = read_checked(report, folder, rel, "<f2", expected.shape)
    if got is None:
        return
    bad = np.flatnonzero(got.view("<u2").ravel() != expected.astype("<f2", copy=False).view("<u2").ravel())
    if bad.size:
        i = int(bad[0])
        where = f"row {i // row_len}, element {i % row_len}" if row_len else f"element {i}"
        report.add(f"{rel}: {where} ({what}) is {float(got.ravel()[i])!r}, expected {float(expected.astype('<f2').ravel()[i])!r}")


def check_manifest(report: BitReport, folder: PackedFolder, expected_files: set[str]) -> None:
    """Missing and extra files against the layout; with a manifest, sizes and sha256 against it."""
    on_disk = folder.on_disk()
    for rel in sorted(expected_files - on_disk):
        report.add(f"{rel}: missing")
    for rel in sorted(on_disk - expected_files):
        report.add(f"{rel}: extra file (not part of the board layout)")
    if not folder.has_manifest:
        return
    for rel in sorted(expected_files - set(folder.files)):
        report.add(f"{rel}: not listed in {MANIFEST_NAME}")
    for rel, f in sorted(folder.files.items()):
        path = folder.path / rel
        if not path.is_file():
            continue
        size = path.stat().st_size
        if size != f.bytes:
            report.add(f"{rel}: {size} bytes, {MANIFEST_NAME} says {f.bytes}")
        elif (report.sha256.get(rel) or sha256_file(path)) != f.sha256:
            report.add(f"{rel}: sha256 differs from {MANIFEST_NAME} (content changed or files swapped)")


# ---------------------------------------------------------------------------------------------
# The output layer, made again from the checkpoint


def output_layer_record(folder: PackedFolder, ckpt: GPTQCheckpoint, compile_dir: Path | None) -> OutputLayerRecord:
    """How the folder's output layer was made: its manifest says; an older folder's compile folder
    may; a folder of the original scripts used their rule, trunc."""
    if folder.output_layer is not None:
        return folder.output_layer
    record = read_step_record(compile_dir, "lm_head") if compile_dir else None
    made = (record or {}).get("made_from") or {}
    if made.get("method") in ("trunc", "rtn", "checkpoint") and made.get("int4_range", 8) in (7, 8):
        log.info(f"verify: {folder.path} does not record how its output layer was quantized: taking {compile_dir}/lm_head.json's "
                 f"method {made['method']} (the values are still made again from the checkpoint)")
        return OutputLayerRecord(made["method"], made.get("int4_range", 8))
    method = "checkpoint" if ckpt.lm_head_source() == "lm_head" else "trunc"
    log.info(f"verify: {folder.path} does not record how its output layer was quantized: checking it as method {method}")
    return OutputLayerRecord(method)


def gptq_bytes(qweight: np.ndarray) -> np.ndarray:
    """A block of columns of GPTQ's qweight [chin/8, rows] as the rows' bytes [rows, chin/2] of q + 8
    nibbles, input 2k in the low one (word k of a column holds inputs 8k..8k+7, the low nibble first)."""
    return transposed(qweight).view(np.uint8)


def output_layer_rows(ckpt: GPTQCheckpoint, record: OutputLayerRecord):
    """`(start, stop) -> (weights, fp16 scales)` of the output layer's rows, from the checkpoint (the
    weights as check_packed_linear takes them)."""
    source = ckpt.lm_head_source()
    if record.method == "checkpoint":
        if source != "lm_head":
            raise VCUError(f"{ckpt.qdir}: the folder's output layer was taken from the checkpoint's lm_head.qweight, which it does not have")
        qweight, scales = ckpt.get("lm_head.qweight"), ckpt.get("lm_head.scales")
        return lambda a, b: (gptq_bytes(qweight[:, a:b]), np.ascontiguousarray(scales[:, a:b].T))
    if source == "lm_head":
        raise VCUError(f"{ckpt.qdir}: the output layer is GPTQ-quantized (lm_head.qweight), but the folder records method {record.method}")

    def rows(a: int, b: int):  # fp16 rows are widened to float32 inside, a strip at a time: the same values
        return quantize_rows(ckpt.get(source, rows=slice(a, b)), record.method, -record.int4_range)

    return rows


# ---------------------------------------------------------------------------------------------
# The whole folder


def compile_hints(qdir: Path, hw: Path, compile_dir: Path | None) -> list:
    """Where the compile folder a packed folder came from may be: given, beside it, or the checkpoint's."""
    return [compile_dir, Path(hw).parent, Path(qdir) / "compile"]


def bit_check(qdir: Path, hw: Path, compile_dir: Path | None = None, progress: bool = True) -> BitReport:
    ckpt = GPTQCheckpoint(qdir)
    ckpt.validate()
    d = ckpt.dims
    hints = compile_hints(ckpt.qdir, hw, compile_dir)
    folder = PackedFolder.open(hw, hints)
    report = BitReport()
    if not folder.has_manifest:
        log.info(f"verify: {hw} has no {MANIFEST_NAME} (made by the original scripts?): {folder.ports} ports and {folder.parts} embedding parts "
                 "inferred from the files; sizes and sha256 not checked against a manifest")
    else:
        for key, value in d.to_json().items():
            if folder.model.get(key) != value:
                raise VCUError(f"{hw / MANIFEST_NAME}: model {key}={folder.model.get(key)!r}, but the checkpoint's config.json says {value!r}")
    found = find_compile_dir(hints, "compile_sw.json")
    if found is not None:
        report.stale = stale_compile(found, ckpt.fingerprint()) + (stale_hardware(folder.doc, found) if folder.has_manifest else [])
        warn(report.stale)
    lm_record = output_layer_record(folder, ckpt, find_compile_dir(hints, "lm_head.json"))
    expected_output = output_layer_rows(ckpt, lm_record)
    rescale = folder.rescale

    def check_layer(layer: int) -> BitReport:
        """One decoder layer's files, into a report of its own (layers are checked side by side)."""
        part = BitReport()
        for lin in LINEARS:
            name = lin.name(layer)
            f = tensor_factor(rescale, name)
            chin, chout = d.linear_shape(lin)
            stem, bias_file = hw_linear_stems(layer, lin)
            qweight, scales = ckpt.get(f"{name}.qweight"), ckpt.get(f"{name}.scales")
            check_packed_linear(
                part, folder, stem, chin, chout,
                lambda a, b, qw=qweight, sc=scales, f=f: (gptq_bytes(qw[:, a:b]), scale_fp16(np.ascontiguousarray(sc[:, a:b].T), f)),
            )
            bias = ckpt.get_fp16(f"{name}.bias") if ckpt.has(f"{name}.bias") else np.zeros(chout, np.float16)
            check_bias_words(part, folder, bias_file, scale_fp16(bias, f))
        for norm, board in LAYER_NORMS:
            w = ckpt.get_fp16(f"model.layers.{layer}.{norm}.weight")
            check_fp16_file(part, folder, hw_layer_norm_file(layer, board), sw_norm_file(w), f"{norm} weight, then zeros")
        return part

    def check_embedding_part(i: int) -> BitReport:
        part, rows = BitReport(), d.vocab // folder.parts
        want = scale_fp16(ckpt.get_fp16(EMBEDDING, rows=slice(i * rows, (i + 1) * rows)), tensor_factor(rescale, EMBEDDING))
        check_fp16_file(part, folder, folder.embedding_part_names()[i], want, f"embedding row {i * rows}+", d.hidden)
        return part

    # numpy and file reads release the GIL: the layers check side by side, beside the output layer
    # (made again from the checkpoint: the longest part, so it starts first), and the embedding's parts
    # after them (a 7B's 1 GB: alone at the end, the last seconds of the check); the reports are merged
    # in order, layers, output layer, embedding, so the differences read the same on any machine.
    output_part = BitReport()
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        output_done = pool.submit(check_packed_linear, output_part, folder, OUT_WEIGHT_STEM, d.hidden, d.vocab, expected_output)
        layers = pool.map(check_layer, range(d.num_layers))
        splits = folder.parts and d.vocab % folder.parts == 0
        embedding = pool.map(check_embedding_part, range(folder.parts)) if splits else []
        for part in bar(layers, "verify", "layer", d.num_layers, progress):
            report.merge(part)
        output_done.result()
        report.merge(output_part)
        check_bias_words(report, folder, OUT_BIAS_FILE, np.zeros(d.vocab, np.float16))
        check_fp16_file(report, folder, OUT_NORM_FILE, sw_norm_file(ckpt.get_fp16(f"{FINAL_NORM}.weight")), "model.norm weight, then zeros")
        for part in embedding:
            report.merge(part)
    if not folder.parts:
        report.add(f"Embedding/: no embedding parts recorded in {MANIFEST_NAME} (run embedding_tokens.py)")
    elif not splits:
        report.add(f"{folder.embedding_part_names()[0]}: vocab {d.vocab} does not split into {folder.parts} parts")
    expected_files = folder.expected_files(d)
    check_tables(report, folder, ckpt, expected_files)
    check_manifest(report, folder, expected_files)
    return report


def check_tables(report: BitReport, folder: PackedFolder, ckpt: GPTQCheckpoint, expected_files: set[str]) -> None:
    """The RoPE and SiLU tables, regenerated from config.json and the recorded options and compared
    word for word. A folder from the original scripts (no manifest) may lack them: one line says so."""
    cfg = read_model_config(ckpt.qdir / "config.json")
    a = folder.assumptions
    missing = []
    rope = folder.rope_name
    orders = ROPE_ORDERS_OF[ckpt.dims.family.rope]
    order = a.rope_table if folder.has_manifest else orders[0]
    if ckpt.dims.head_dim == BOARD_HEAD_DIM:
        if not a.has_rope_table:
            report.add(f"{MANIFEST_NAME}: assumptions.rope_table is {a.rope_table!r}, but the model's heads are the board's {BOARD_HEAD_DIM}")
        elif order not in orders:
            report.add(f"{MANIFEST_NAME}: assumptions.rope_table is {order!r}, but a {ckpt.dims.model_type} model's table is "
                       f"{' or '.join(orders)} (its RoPE is {ckpt.dims.family.rope})")
        elif folder.has_manifest or (folder.path / rope).is_file():
            want = rope_table(cfg, a.max_token, order, ckpt.qdir / "config.json")
            check_table_words(report, folder, rope, want, lambda i: _rope_place(i, a.max_token, order))
        else:
            missing.append(rope)
            expected_files.discard(rope)
    if folder.has_manifest or (folder.path / ACT_FILE).is_file():
        want = silu_table(a.silu_table, a.silu_fit_range).pack()
        check_table_words(report, folder, ACT_FILE, want.view("<u2"), _silu_place)
    else:
        missing.append(ACT_FILE)
        expected_files.discard(ACT_FILE)
    if missing:
        log.info(f"verify: {' and '.join(missing)} missing: the board also loads them (hardware.py writes them)")


def _rope_place(i: int, max_token: int, order: str) -> str:
    block, rest = divmod(i, max_token * 32)
    t, c = divmod(rest, 32)
    channel = block * 32 + c
    if order == "halves":
        value = ("cos" if channel < 64 else "sin") + f" of frequency {channel % 64}"
    elif order == "glm" and channel >= 64:
        value = "zero padding of the GLM table"
    else:
        value = ("cos" if channel % 2 == 0 else "sin") + f" of frequency {channel // 2}"
    return f"position {t}, channel {channel} ({value})"


def _silu_place(i: int) -> str:
    beat, k = divmod(i, 32)
    if beat < 3 and k < 16:
        return f"{('slope', 'offset', 'breakpoint')[beat]} {k}"
    return f"byte {2 * i} (must be 0)"


def check_table_words(report: BitReport, folder: PackedFolder, rel: str, want: np.ndarray, place) -> None:
    got = read_checked(report, folder, rel, "<u2", want.shape)
    if got is None:
        return
    bad = np.flatnonzero(got.view("<u2") != want.view("<u2"))
    if bad.size:
        i = int(bad[0])
        report.add(f"{rel}: fp16 word {i}, {place(i)}, is {int(got.view('<u2')[i]):#06x}, expected {int(want.view('<u2')[i]):#06x}")


# ---------------------------------------------------------------------------------------------
# verify: both checks and the report


def verify(qdir: Path, hw: Path, *, compile_dir=None, model=None, text=None, prompt="The accelerator", tokens=8,
           device="cpu", functional=True, lm_head_from_checkpoint=False, progress=True, eval_tokens: int = 256,
           eval_ids=None, numerics: str = "board", variant: str | None = None, variants: str = "pessimistic",
           strict: bool = False, side_by_side: bool | None = None) -> dict:
    """Both checks and the verdict; `variant` is the board model's main variant (default: the
    emulator's, datapath.DEFAULT_VARIANT), `variants` the set run beside it: 'none', 'pessimistic'
    (truncate + grouped, either variance; the default) or 'all'. `side_by_side`: run the functional
    check while the bit check runs (default: with a GPU; see checks_side_by_side); the report, the
    messages and the exit code are those of the checks run one after the other."""
    # The board model (torch) is imported on a thread, beside the cheap checks of the inputs: a wrong
    # path is one line at once, not after the seconds torch takes to load.
    import_in_background("vcu128.check.functional")
    GPTQCheckpoint(qdir)
    hw = Path(hw)
    if not hw.is_dir():
        raise VCUError(f"{hw}: no such hardware folder")
    from vcu128.board.datapath import DEFAULT_VARIANT, BoardVariant

    chosen = BoardVariant.from_name(variant or DEFAULT_VARIANT.name)
    extra = variant_set(variants)
    if side_by_side is None:
        side_by_side = default_side_by_side(device)
    origin = time.perf_counter()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run_bits = lambda: timed(origin, bit_check, qdir, hw, compile_dir, progress)  # noqa: E731

    def run_functional(stop=None):
        return timed(origin, functional_part, qdir, hw, compile_dir, model=model, text=text, eval_ids=eval_ids, prompt=prompt,
                     eval_tokens=eval_tokens, device=device, stop=stop, tokens=tokens, numerics=numerics, variant=chosen,
                     variants=extra, lm_head_from_checkpoint=lm_head_from_checkpoint, progress=progress)

    if functional and side_by_side:
        (report, bits_span), func = checks_side_by_side(run_bits, run_functional)
    else:
        report, bits_span = run_bits()
        func = run_functional() if report.ok and functional else None
    result = {
        "tool": TOOL,
        "version": tool_version(),
        "time": stamp,
        "checkpoint": str(Path(qdir).resolve()),
        "hardware_dir": str(hw.resolve()),
        "bit_check": {
            "ok": report.ok,
            "files": report.files_checked,
            "bytes": report.bytes_checked,
            "seconds": bits_span[1] - bits_span[0],
            "differences": report.differences,
            "more_differences": report.more,
            "stale_inputs": report.stale,
        },
    }
    # When each check ran, in seconds from here: bench/bench_e2e.py splits verify's time by it.
    timeline = {"side_by_side": bool(functional and side_by_side), "bit_check": list(bits_span)}
    if func is not None:
        (source, outcome), func_span = func
        result["source"] = source
        result["functional"] = outcome
        result["functional"]["seconds"] = func_span[1] - func_span[0]
        timeline["functional"] = list(func_span)
    result["timeline"] = timeline
    result["verdict"] = judge(result, strict)
    path = hw.parent / REPORT_NAME
    if write_report(path, result):
        result["report_path"] = str(path)
    return result


SIDE_BY_SIDE_ENV = "VCU128_VERIFY_SIDE_BY_SIDE"


def default_side_by_side(device) -> bool:
    """Side by side with a GPU: the functional check then leaves the cores to the bit check, and the
    two take the time of the longer. On a CPU both want every core (torch's threads, the bit check's
    pool): side by side they would only take turns, and the functional check is the one that must
    then stop when the bits differ. VCU128_VERIFY_SIDE_BY_SIDE=1 or 0 decides instead (to measure)."""
    chosen = os.environ.get(SIDE_BY_SIDE_ENV, "")
    if chosen not in ("", "0", "1"):
        raise VCUError(f"{SIDE_BY_SIDE_ENV}={chosen}: expected 1 (side by side), 0 (one after the other) or nothing (by the device)")
    return chosen == "1" if chosen else str(device).startswith("cuda")


def timed(origin: float, fn, *args, **kwargs):
    """(fn's result, (start, end) in seconds from `origin`)."""
    began = time.perf_counter() - origin
    value = fn(*args, **kwargs)
    return value, (began, time.perf_counter() - origin)


def functional_part(qdir: Path, hw: Path, compile_dir, *, model, text, eval_ids, prompt: str, eval_tokens: int, device,
                    stop=None, **options) -> tuple[str | None, dict]:
    """The functional check's own inputs checked (--model's shape, the evaluation ids, the device),
    then the check: (the folder's source, its result). `options` go to functional_check."""
    ckpt = GPTQCheckpoint(qdir)
    if model is not None:
        check_same_shape(Path(model), ckpt)
    folder = PackedFolder.open(hw, compile_hints(ckpt.qdir, hw, compile_dir))
    inputs = evaluation_inputs(ckpt.qdir, ckpt.dims.vocab, text, eval_ids, prompt, eval_tokens)
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise VCUError(f"--device {device}: no CUDA device here (torch {torch.__version__})")
    from vcu128.check.functional import functional_check

    return folder.source, functional_check(ckpt, folder, inputs, model=model, device=device, stop=stop, **options)


def checks_side_by_side(run_bits, run_functional):
    """The bit check on a thread while the functional check runs on this one: (run_bits(), and
    run_functional(stop) or None). The bit check reads and compares with numpy on the CPU's cores;
    the functional check, on a GPU, mostly waits for it. The answer is the one the checks give one
    after the other: the bit check's error is raised first; where the bits differ there is no
    functional result (the functional check stops at its next layer once they are known to differ,
    whatever it had found); only then is the functional check's own error raised."""
    from vcu128.check.functional import Stopped

    bits = in_background(run_bits)

    def bits_failed() -> bool:
        return bits.done() and (bits.exception() is not None or not bits.result()[0].ok)

    func, failure = None, None
    try:
        func = run_functional(bits_failed)
    except Stopped:
        pass
    except Exception as e:  # noqa: BLE001 - kept until the bit check has spoken: its answer comes first
        failure = e
    report, span = bits.result()
    if not report.ok:
        return (report, span), None
    if failure is not None:
        raise failure
    return (report, span), func


VARIANT_SETS = ("none", "pessimistic", "all")


def variant_set(name: str) -> tuple:
    """The board-model variants (datapath.BoardVariant) of --variants `name`."""
    if name not in VARIANT_SETS:
        raise VCUError(f"--variants {name}: expected one of {', '.join(VARIANT_SETS)}")
    from vcu128.board.datapath import VARIANTS, pessimistic_variants

    return {"none": (), "pessimistic": pessimistic_variants(), "all": tuple(VARIANTS.values())}[name]


def check_same_shape(model: Path, ckpt: GPTQCheckpoint) -> None:
    """--model must be the model the checkpoint was quantized from: the same dimensions."""
    if not (model / "config.json").is_file():
        raise VCUError(f"--model {model}: no config.json there (the fp16 original's folder)")
    theirs, ours = parse_model_dims(model / "config.json").to_json(), ckpt.dims.to_json()
    for key, value in ours.items():
        if key not in ("model_type", "tie_word_embeddings") and theirs.get(key) != value:
            raise VCUError(f"--model {model}: {key} {theirs.get(key)}, the checkpoint's is {value}: not the model it was quantized from")


def judge(result: dict, strict: bool = False) -> dict:
    """The verdict in two parts: the bits (the folder is the checkpoint) and the board model (it
    answers like the checkpoint: top-1 agreement at least BOARD_TOP1_THRESHOLD, no fp16 site
    saturated). Exit code 1 for differing bits or a non-finite value, and with `strict` for a board
    model below the threshold; else 0, with a warning and the next step."""
    bits_ok = result["bit_check"]["ok"]
    f = result.get("functional")
    out = {"bits": "match" if bits_ok else "differ", "threshold": {"top1_agreement": BOARD_TOP1_THRESHOLD, "saturated_sites": 0},
           "strict": strict}
    if f is None:
        out["board_model"] = "not run"
    elif not f.get("ok"):
        out["board_model"] = "non-finite"
        out["next_step"] = "the board would compute NaN or inf: see where above; --fp16_rescale measure at compile_sw.py if it is an overflow"
    else:
        top1 = f["against_hardware"]["checkpoint"]["top1_agreement"]
        saturated = len(f.get("saturation") or [])
        variants = f.get("variants") or {}
        if variants:  # the worst variant decides: the board may round more than the default model
            worst = min(variants, key=lambda name: (variants[name]["top1_agreement"], -variants[name]["saturated_sites"]))
            top1, saturated = variants[worst]["top1_agreement"], max(v["saturated_sites"] for v in variants.values())
            out.update(variants=list(variants), worst_variant=worst)
        out.update(top1_agreement=top1, saturated_sites=saturated)
        good = top1 >= BOARD_TOP1_THRESHOLD and not saturated
        out["board_model"] = "answers like the checkpoint" if good else "below the threshold"
        if saturated:
            out["next_step"] = ("fp16 sites saturate on the board: compile_sw.py --fp16_rescale measure, then hardware.py and "
                                "embedding_tokens.py, rescales the folder (docs/FORMAT.md 7)")
        elif not good:
            out["next_step"] = ("verify.py --model <the fp16 original> shows whether quantization or the board's arithmetic costs it; "
                                "more calibration (quantize.py --nsamples) or lm_head.py --method rtn may recover it")
    failed = not bits_ok or out["board_model"] == "non-finite" or (strict and out["board_model"] == "below the threshold")
    out["ok"] = not failed
    out["exit_code"] = 1 if failed else 0
    return out


def tool_version() -> str:
    """The package version, with `git describe` where the tool runs from a checkout."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent, capture_output=True,
                                   text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = ""
    return f"{__version__} ({described})" if described else __version__


def write_report(path: Path, result: dict) -> bool:
    """verify_report.json is verify's own file: replaced when it is an earlier report of this tool,
    never when it is something else."""
    if path.exists():
        try:
            earlier = json.loads(path.read_bytes())
        except (OSError, ValueError):
            earlier = None
        if not _is_verify_report(earlier):
            log.warning(f"warning: {path} exists and is not a verify report: not replacing it (the result is above)")
            return False
    replace_file_atomically(path, dumps(result).encode())
    return True


def _is_verify_report(doc) -> bool:
    """A report this tool wrote (reports before 0.2 carry no `tool`, but all of bit_check's keys)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("bit_check"), dict):
        return False
    return doc.get("tool") == TOOL or {"ok", "files", "bytes", "differences"} <= set(doc["bit_check"])
