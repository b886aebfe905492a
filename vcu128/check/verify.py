"""Prove a packed folder is the model before it goes on the board.

Bit check: decode every file of the hardware folder (FORMAT.md 3) back to integers, scales, biases,
norm weights and embedding rows and compare them with the GPTQ checkpoint (the output layer with the
software files lm_head_*.bin), every word including padding words and rows; check the manifest
(sizes, sha256, no missing or extra file). Functional check: run the model from the hardware files
alone in PyTorch and compare it with the checkpoint's own model (and the fp16 original).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.io.errors import VCUError
from vcu128.format.layout import (
    BIAS_MULTIPLIER,
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
    pack_linear_rows,
    port_file,
    read_port_rows,
    row_words,
    rows_per_port,
    scale_word_index,
    sw_lm_head_paths,
    sw_qweight_file,
    sw_scales_file,
    unpack_bias_words,
    unpack_linear_rows,
    weight_word_index,
)
from vcu128.format.model import EMBEDDING, FINAL_NORM, GROUP_SIZE, LAYER_NORMS, LINEARS, read_model_config
from vcu128.format.tables import (
    ACT_FILE,
    BOARD_HEAD_DIM,
    DEFAULT_MAX_TOKEN,
    DEFAULT_ROPE_ORDER,
    ROPE_ORDERS,
    SILU_TABLES,
    rope_file_name,
    rope_table,
    silu_table,
)
from vcu128.io.jsonfile import dumps, get_int
from vcu128.io.output import MANIFEST_NAME, read_manifest, replace_file_atomically, sha256_file
from vcu128.check.functional import functional_check
from vcu128.check.inputs import evaluation_inputs
from vcu128.io.provenance import stale_compile, stale_hardware, warn
from vcu128.format.rescale import CONFIG_KEY as RESCALE_KEY
from vcu128.format.rescale import RescalePlan, module_factors, scale_fp16, tensor_factor
from vcu128.io.parallel import rows_per_block
from vcu128.io.progress import bar

log = logging.getLogger("vcu128")

MAX_REPORTED = 20
REPORT_NAME = "verify_report.json"


@dataclass
class BitReport:
    differences: list[str] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    more: int = 0  # differences found past MAX_REPORTED

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


# ---------------------------------------------------------------------------------------------
# Reading a packed linear back


def linear_port_files(hw: Path, stem: str, ports: int) -> list[Path]:
    return [hw / port_file(stem, p) for p in range(ports)]


def folder_layout(hw: Path) -> tuple[int, int, dict]:
    """(ports, embedding parts, assumptions) of a packed folder, from its manifest or its files."""
    doc = read_manifest(hw, required=False)
    if doc is None:
        return infer_ports(hw), infer_parts(hw), {}
    assumptions = doc.get("assumptions") if isinstance(doc.get("assumptions"), dict) else {}
    return get_int(doc, "ports", hw / MANIFEST_NAME), get_int(doc, "embedding_parts", hw / MANIFEST_NAME, default=0, minimum=0), assumptions


def _place(stem: str, row: int, ports: int) -> str:
    return f"{port_file(stem, row % ports)}: row {row // ports} (output channel {row})"


def check_packed_linear(report: BitReport, hw: Path, stem: str, chin: int, chout: int, ports: int, expected, int4: str = "twos") -> None:
    """Compare a linear's port files with `expected(start, stop) -> (int8 q, fp16 scales)`."""
    words = row_words(chin)
    try:
        files = open_port_files(linear_port_files(hw, stem, ports), chout, words)
    except VCUError as e:
        return report.add(str(e).replace(str(hw) + "/", ""))
    report.files_checked += ports
    total = rows_per_port(chout, ports) * ports
    report.bytes_checked += total * words * 4
    step = rows_per_block(4 * chin, multiple=ports)
    for start in range(0, total, step):
        stop = min(start + step, total)
        rows = read_port_rows(files, start, stop)
        real = max(0, min(stop, chout) - start)
        if real:
            q, scales, pad = unpack_linear_rows(rows[:real], chin, int4)
            want_q, want_s = expected(start, start + real)
            bad_rows = np.flatnonzero((q != want_q).any(1) | (scales.view("<u2") != want_s.view("<u2")).any(1) | pad.any(1))
            for r in bad_rows[:3]:
                _describe_row(report, stem, start + int(r), ports, rows[r], pack_linear_rows(want_q[r : r + 1], want_s[r : r + 1], int4)[0], chin)
            report.more += max(0, len(bad_rows) - 3)
        if (rows[real:] != 0).any():
            r = real + int(np.flatnonzero((rows[real:] != 0).any(1))[0])
            w = int(np.flatnonzero(rows[r])[0])
            report.add(f"{_place(stem, start + r, ports)}: padding row, word {w} is {int(rows[r, w]):#010x}, expected 0")


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


def read_checked(report: BitReport, hw: Path, rel: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """A whole file of the folder, counted as checked; a missing or wrongly sized one is a difference
    (and None)."""
    try:
        data = BinFile(hw / rel, dtype, shape).read()
    except VCUError as e:
        report.add(str(e).replace(str(hw) + "/", ""))
        return None
    report.files_checked += 1
    report.bytes_checked += data.nbytes
    return data


def check_bias_words(report: BitReport, hw: Path, rel: str, expected: np.ndarray) -> None:
    words = read_checked(report, hw, rel, "<u4", (expected.shape[0],))
    if words is None:
        return
    mult, bias = unpack_bias_words(words)
    bad = np.flatnonzero((mult != BIAS_MULTIPLIER) | (bias.view("<u2") != expected.astype("<f2").view("<u2")))
    if bad.size:
        i = int(bad[0])
        want = (BIAS_MULTIPLIER << 16) | int(expected.astype("<f2").view("<u2")[i])
        report.add(f"{rel}: word {i} (bias of output channel {i}) is {int(words[i]):#010x}, expected {want:#010x}")


def check_fp16_file(report: BitReport, hw: Path, rel: str, expected: np.ndarray, what: str, row_len: int | None = None) -> None:
    got = read_checked(report, hw, rel, "<f2", expected.shape)
    if got is None:
        return
    bad = np.flatnonzero(got.view("<u2").ravel() != expected.astype("<f2").view("<u2").ravel())
    if bad.size:
        i = int(bad[0])
        where = f"row {i // row_len}, element {i % row_len}" if row_len else f"element {i}"
        report.add(f"{rel}: {where} ({what}) is {float(got.ravel()[i])!r}, expected {float(expected.astype('<f2').ravel()[i])!r}")


def check_manifest(report: BitReport, hw: Path, expected_files: set[str]) -> None:
    """Sizes and sha256 against manifest.json; missing and extra files against the layout."""
    try:
        doc = read_manifest(hw)
    except VCUError as e:
        return report.add(str(e))
    listed = {f["path"]: f for f in doc.get("files", [])}
    on_disk = {str(p.relative_to(hw)) for p in hw.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    for rel in sorted(expected_files - on_disk):
        report.add(f"{rel}: missing")
    for rel in sorted(on_disk - expected_files):
        report.add(f"{rel}: extra file (not part of the board layout)")
    for rel in sorted(expected_files - set(listed)):
        report.add(f"{rel}: not listed in {MANIFEST_NAME}")
    for rel, f in sorted(listed.items()):
        path = hw / rel
        if not path.is_file():
            continue
        size = path.stat().st_size
        if size != f.get("bytes"):
            report.add(f"{rel}: {size} bytes, {MANIFEST_NAME} says {f.get('bytes')}")
        elif sha256_file(path) != f.get("sha256"):
            report.add(f"{rel}: sha256 differs from {MANIFEST_NAME} (content changed or files swapped)")


# ---------------------------------------------------------------------------------------------
# The whole folder


def find_compile_dir(qdir: Path, hw: Path, compile_dir: Path | None) -> Path:
    for cand in [compile_dir, hw.parent, hw.parent / "compile", qdir / "compile"]:
        if cand and sw_lm_head_paths(cand)["qweight"].is_file():
            return Path(cand)
    raise VCUError(f"lm_head_qweight.bin not found beside {hw} or in {qdir / 'compile'}: pass --compile_dir")


def bit_check(qdir: Path, hw: Path, compile_dir: Path | None = None, progress: bool = True) -> BitReport:
    ckpt = GPTQCheckpoint(qdir)
    ckpt.validate()
    d = ckpt.dims
    hw = Path(hw)
    if not hw.is_dir():
        raise VCUError(f"{hw}: no such hardware folder")
    doc = read_manifest(hw, required=False)
    if doc is None:
        ports, parts = infer_ports(hw), infer_parts(hw)
        assumptions = {}
        log.info(f"verify: {hw} has no {MANIFEST_NAME} (made by the original scripts?): {ports} ports and {parts} embedding parts "
                 "inferred from the files; sizes and sha256 not checked against a manifest")
    else:
        ports = get_int(doc, "ports", hw / MANIFEST_NAME)
        parts = get_int(doc, "embedding_parts", hw / MANIFEST_NAME, default=0, minimum=0)
        assumptions = doc.get("assumptions") if isinstance(doc.get("assumptions"), dict) else {}
        for key, value in d.to_json().items():
            if doc.get("model", {}).get(key) != value:
                raise VCUError(f"{hw / MANIFEST_NAME}: model {key}={doc.get('model', {}).get(key)!r}, but the checkpoint's config.json says {value!r}")
    int4 = assumptions.get("int4", "twos")
    rescale = RescalePlan.from_record((doc or {}).get("fp16_rescale") if doc is not None else _compile_rescale(ckpt.qdir, hw, compile_dir), hw, "fp16_rescale")
    if int4 not in INT4_CODES:
        raise VCUError(f"{hw / MANIFEST_NAME}: assumptions.int4 is {int4!r}, expected one of {', '.join(INT4_CODES)}")
    compile_dir = find_compile_dir(ckpt.qdir, hw, compile_dir)
    warn(stale_compile(compile_dir, ckpt.fingerprint()) + (stale_hardware(doc, compile_dir) if doc else []))
    report = BitReport()
    expected_files: set[str] = set()

    def check_layer(layer: int) -> tuple[BitReport, set[str]]:
        """One decoder layer's files, into a report of its own (layers are checked side by side)."""
        part, files = BitReport(), set()
        factors = module_factors(rescale, layer)
        for lin in LINEARS:
            f = factors.get(lin.module, 1.0)
            name = lin.name(layer)
            chin, chout = d.linear_shape(lin)
            stem, bias_file = hw_linear_stems(layer, lin)
            files.update(port_file(stem, p) for p in range(ports))
            files.add(bias_file)
            qweight, scales = ckpt.get(f"{name}.qweight"), ckpt.get(f"{name}.scales")
            check_packed_linear(
                part, hw, stem, chin, chout, ports,
                lambda a, b, qw=qweight, sc=scales, f=f: (ckpt.signed_weights(qw[:, a:b]), scale_fp16(np.ascontiguousarray(sc[:, a:b].T), f, {})),
                int4,
            )
            bias = ckpt.get_fp16(f"{name}.bias") if ckpt.has(f"{name}.bias") else np.zeros(chout, np.float16)
            check_bias_words(part, hw, bias_file, scale_fp16(bias, f, {}))
        for norm, board in LAYER_NORMS:
            rel = hw_layer_norm_file(layer, board)
            files.add(rel)
            w = ckpt.get_fp16(f"model.layers.{layer}.{norm}.weight")
            check_fp16_file(part, hw, rel, np.concatenate([w, np.zeros_like(w)]), f"{norm} weight, then zeros")
        return part, files

    # numpy and file reads release the GIL: on a many-core host the layers check side by side; the
    # reports are merged in layer order, so the differences read the same on any machine.
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for part, files in bar(pool.map(check_layer, range(d.num_layers)), "verify", "layer", d.num_layers, progress):
            report.merge(part)
            expected_files |= files

    # The output layer: ints and scales as lm_head.py wrote them, bias words of a zero bias.
    lm = sw_lm_head_paths(compile_dir)
    lm_q = sw_qweight_file(lm["qweight"], d.vocab, d.hidden)
    lm_s = sw_scales_file(lm["scales"], d.vocab, d.hidden)
    expected_files.update(port_file(OUT_WEIGHT_STEM, p) for p in range(ports))
    expected_files.update({OUT_BIAS_FILE, OUT_NORM_FILE})
    check_packed_linear(report, hw, OUT_WEIGHT_STEM, d.hidden, d.vocab, ports, lambda a, b: (lm_q.read_rows(a, b), lm_s.read_rows(a, b)), int4)
    check_bias_words(report, hw, OUT_BIAS_FILE, np.zeros(d.vocab, np.float16))
    w = ckpt.get_fp16(f"{FINAL_NORM}.weight")
    check_fp16_file(report, hw, OUT_NORM_FILE, np.concatenate([w, np.zeros_like(w)]), "model.norm weight, then zeros")

    if parts:
        rows = d.vocab // parts
        for i in range(parts):
            rel = f"{EMBEDDING_DIR}/{embedding_part_file(i + 1, parts)}"
            expected_files.add(rel)
            want = scale_fp16(ckpt.get_fp16(EMBEDDING, rows=slice(i * rows, (i + 1) * rows)), tensor_factor(rescale, EMBEDDING), {})
            check_fp16_file(report, hw, rel, want, f"embedding row {i * rows}+", d.hidden)
    else:
        report.add(f"{EMBEDDING_DIR}/: no embedding parts recorded in {MANIFEST_NAME} (run embedding_tokens.py)")
    check_tables(report, hw, ckpt, doc, assumptions, expected_files)
    if doc is not None:
        check_manifest(report, hw, expected_files)
    else:
        check_files_present(report, hw, expected_files)
    return report


def _compile_rescale(qdir: Path, hw: Path, compile_dir: Path | None) -> dict | None:
    """A folder without a manifest: the factors its compile folder's config.json records."""
    for cand in [compile_dir, hw.parent, qdir / "compile"]:
        if cand and (Path(cand) / "config.json").is_file():
            return read_model_config(Path(cand) / "config.json").get(RESCALE_KEY)
    return None


def infer_ports(hw: Path) -> int:
    """Ports of a folder without a manifest: the port files of layer 0's q_proj."""
    stem, _ = hw_linear_stems(0, LINEARS[0])
    found = sorted((hw / stem).parent.glob(f"{Path(stem).name}_HBM_DDR_*.bin"))
    if not found:
        raise VCUError(f"{hw}: no manifest.json and no {stem}_HBM_DDR_*.bin files: not a packed folder")
    return len(found)


def infer_parts(hw: Path) -> int:
    """Embedding parts of a folder without a manifest, from the names Embedding_01-of-K.bin."""
    names = sorted(p.name for p in (hw / EMBEDDING_DIR).glob("Embedding_*-of-*.bin"))
    if not names:
        return 0
    try:
        return int(names[0].split("-of-")[1].split(".")[0])
    except (IndexError, ValueError):
        raise VCUError(f"{hw / EMBEDDING_DIR}: embedding part names not of the form Embedding_01-of-16.bin") from None


def check_files_present(report: BitReport, hw: Path, expected_files: set[str]) -> None:
    on_disk = {str(p.relative_to(hw)) for p in hw.rglob("*") if p.is_file()}
    for rel in sorted(on_disk - expected_files):
        report.add(f"{rel}: extra file (not part of the board layout)")


def check_tables(report: BitReport, hw: Path, ckpt: GPTQCheckpoint, doc: dict | None, assumptions: dict, expected_files: set[str]) -> None:
    """The RoPE and SiLU tables, regenerated from config.json and the recorded options and compared
    word for word. A folder from the original scripts (no manifest) may lack them: one line says so."""
    cfg = read_model_config(ckpt.qdir / "config.json")
    where = ckpt.qdir / "config.json"
    max_token = get_int(assumptions, "max_token", hw / MANIFEST_NAME, default=DEFAULT_MAX_TOKEN)
    order = assumptions.get("rope_table", DEFAULT_ROPE_ORDER)
    rope = rope_file_name(max_token)
    missing = []
    if ckpt.dims.head_dim == BOARD_HEAD_DIM:
        if order not in ROPE_ORDERS:
            report.add(f"{MANIFEST_NAME}: assumptions.rope_table is {order!r}, expected one of {', '.join(ROPE_ORDERS)}")
        elif doc is not None or (hw / rope).is_file():
            expected_files.add(rope)
            want = rope_table(cfg, max_token, order, where)
            check_table_words(report, hw, rope, want, lambda i: _rope_place(i, max_token, order))
        else:
            missing.append(rope)
    kind = assumptions.get("silu_table", "board")
    if kind not in SILU_TABLES:
        report.add(f"{MANIFEST_NAME}: assumptions.silu_table is {kind!r}, expected one of {', '.join(SILU_TABLES)}")
    elif doc is not None or (hw / ACT_FILE).is_file():
        expected_files.add(ACT_FILE)
        fit_range = ((doc or {}).get("tables", {}).get("silu", {}).get("fit_range")) if kind == "fit" else None
        want = silu_table(kind, tuple(fit_range) if fit_range else None).pack()
        check_table_words(report, hw, ACT_FILE, want.view("<u2"), _silu_place)
    else:
        missing.append(ACT_FILE)
    if missing:
        log.info(f"verify: {' and '.join(missing)} missing: the board also loads them (hardware.py writes them)")


def _rope_place(i: int, max_token: int, order: str) -> str:
    block, rest = divmod(i, max_token * 32)
    t, c = divmod(rest, 32)
    channel = block * 32 + c
    value = (("cos" if channel < 64 else "sin") + f" of frequency {channel % 64}") if order == "halves" else \
        (("cos" if channel % 2 == 0 else "sin") + f" of frequency {channel // 2}")
    return f"position {t}, channel {channel} ({value})"


def _silu_place(i: int) -> str:
    beat, k = divmod(i, 32)
    if beat < 3 and k < 16:
        return f"{('slope', 'offset', 'breakpoint')[beat]} {k}"
    return f"byte {2 * i} (must be 0)"


def check_table_words(report: BitReport, hw: Path, rel: str, want: np.ndarray, place) -> None:
    got = read_checked(report, hw, rel, "<u2", want.shape)
    if got is None:
        return
    bad = np.flatnonzero(got.view("<u2") != want.view("<u2"))
    if bad.size:
        i = int(bad[0])
        report.add(f"{rel}: fp16 word {i}, {place(i)}, is {int(got.view('<u2')[i]):#06x}, expected {int(want.view('<u2')[i]):#06x}")


def verify(qdir: Path, hw: Path, compile_dir=None, model=None, text=None, prompt="The accelerator", tokens=8,
           device="cpu", functional=True, lm_head_from_checkpoint=False, progress=True, eval_tokens: int = 256,
           eval_ids=None, numerics: str = "board", centred_variance: bool = False) -> dict:
    start = time.perf_counter()
    hw = Path(hw)
    report = bit_check(qdir, hw, compile_dir, progress)
    seconds = time.perf_counter() - start
    result = {
        "bit_check": {
            "ok": report.ok,
            "files": report.files_checked,
            "bytes": report.bytes_checked,
            "seconds": seconds,
            "differences": report.differences,
            "more_differences": report.more,
        }
    }
    if report.ok and functional:
        start = time.perf_counter()
        ckpt = GPTQCheckpoint(qdir)
        ports, parts, assumptions = folder_layout(hw)
        doc = read_manifest(hw, required=False) or {}
        inputs = evaluation_inputs(ckpt.qdir, ckpt.dims.vocab, text, eval_ids, prompt, eval_tokens)
        if str(device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise VCUError(f"--device {device}: no CUDA device here (torch {torch.__version__})")
        result["functional"] = functional_check(
            qdir, hw, ports, parts, assumptions, inputs, tokens, numerics, model, centred_variance,
            lm_head_from_checkpoint, RescalePlan.from_record(doc.get("fp16_rescale") if doc else _compile_rescale(ckpt.qdir, hw, compile_dir), hw, "fp16_rescale"), progress,
            device,
        )
        result["functional"]["seconds"] = time.perf_counter() - start
    path = Path(hw).parent / REPORT_NAME
    if write_report(path, result):
        result["report_path"] = str(path)
    return result


def write_report(path: Path, result: dict) -> bool:
    """verify_report.json is verify's own file: replaced when it is an earlier report, never when
    it is something else."""
    if path.exists():
        try:
            earlier = json.loads(path.read_bytes())
        except (OSError, ValueError):
            earlier = None
        if not isinstance(earlier, dict) or "bit_check" not in earlier:
            log.warning(f"warning: {path} exists and is not a verify report: not replacing it (the result is above)")
            return False
    replace_file_atomically(path, dumps(result).encode())
    return True
