"""Step 3: the output layer to int4 + fp16 scales (FORMAT.md 2, "lm_head quantization").

Methods: `rtn` (default) and `trunc` quantize the float lm_head (or the tied embedding) group by
group; `checkpoint` takes the lm_head GPTQ already quantized (quantize.py --lm_head).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.constants import LM_HEAD_METHODS
from vcu128.format.int4_grid import lm_head_grid, read_checkpoint_setting
from vcu128.format.layout import sw_lm_head_half_paths, sw_lm_head_paths
from vcu128.io.direct_io import DirectWriter, aligned_empty
from vcu128.io.errors import VCUError, set_writing
from vcu128.io.output import (
    StepResult,
    check_free_space,
    check_inputs,
    folder_lock,
    make_parents,
    out_path,
    read_step_record,
    remove_created,
    remove_stale,
    signals_deferred,
    stage_tag,
    write_step_record,
)
from vcu128.io.parallel import ordered_map, rows_per_block
from vcu128.io.progress import bar
from vcu128.quant.rtn import dequantize_rows, quantize_rows, squared_error

log = logging.getLogger("vcu128")
STEP = "lm_head"

ALL_METHODS = LM_HEAD_METHODS  # rtn.METHODS and checkpoint, said in constants.py for the command line


def choose_method(ckpt: GPTQCheckpoint, method: str | None) -> str:
    quantized = ckpt.lm_head_source() == "lm_head"
    if method is None:
        return "checkpoint" if quantized else "rtn"
    if method not in ALL_METHODS:
        raise VCUError(f"--method {method}: expected one of {', '.join(ALL_METHODS)}")
    if method == "checkpoint" and not quantized:
        raise VCUError(f"{ckpt.qdir}: --method checkpoint, but the checkpoint has no lm_head.qweight (quantize with --lm_head)")
    if method != "checkpoint" and quantized:
        raise VCUError(f"{ckpt.qdir}: lm_head is already GPTQ-quantized (lm_head.qweight); use --method checkpoint")
    return method


def lm_head_files(out: Path, software: str) -> dict[str, Path]:
    """What lm_head writes into a compile folder: the output layer's ints and scales, and in the GLM
    layout the same rows again in two halves of the vocabulary (`qweight_0`, ... `scales_1`)."""
    files = dict(sw_lm_head_paths(out, software))
    for i, half in enumerate(sw_lm_head_half_paths(out, software)):
        files.update({f"{k}_{i}": p for k, p in half.items()})
    return files


def check_lm_head_out(out: Path, qdir: Path, force: bool, created: bool = False, software: str = "qwen2") -> None:
    """lm_head adds two files to a compile folder: refuse a target that is a file, the checkpoint
    (or holds it), or a folder of someone else's (`created`: this run made it); and lm_head files
    it did not write itself."""
    shown = Path(os.path.abspath(out))
    try:
        check_inputs(out, [qdir])
    except VCUError as e:
        raise VCUError(f"{e}; lm_head writes into a compile folder", "the default, QDIR/compile, is the one compile_sw.py writes") from None
    out = out_path(out)
    if out.is_symlink() and out.resolve().is_dir():
        out = out.resolve()  # a link to a compile folder: written into, never replaced
    if out.exists() and not out.is_dir():
        raise VCUError(f"--out {shown}: exists and is not a folder; not writing into it")
    if force or not out.is_dir() or not any(out.iterdir()):
        return
    record = read_step_record(out, STEP)
    if record is None and read_step_record(out, "compile_sw") is None and not created:
        raise VCUError(f"--out {out}: not a compile folder (no compile_sw.json or lm_head.json); not writing into it",
                       "run compile_sw.py first, or pass --force")
    owned = set(record["files"]) if record else set()
    for p in lm_head_files(out, software).values():
        rel = str(p.relative_to(out))
        if p.exists() and rel not in owned:
            raise VCUError(f"{p}: exists and was not written by lm_head.py; not replacing it", "pass --force to replace it")


def rtn_blocks(rows_of, method: str, int4_range: int, hidden: int, source: str):
    """quantize_block for `method` (rtn, trunc) on the grid -int4_range..7 of the float output layer
    whose blocks of rows `rows_of(rows)` gives (`source`: its name, for messages): (int32 q, fp16
    scales, squared error, squared norm) of a block of output rows."""

    def quantize_block(rows: slice):
        n = rows.stop - rows.start
        q32 = aligned_empty(4 * n * hidden).view("<i4").reshape(n, hidden)  # written from there, without a copy
        w = rows_of(rows).astype(np.float32, copy=False)  # a NaN or inf is refused there, by row
        q, scales = quantize_rows(w, method, -int4_range)
        if not np.isfinite(scales).all():  # finite weights whose group scale (largest |w| / 7) fp16 cannot hold
            r, g = (int(i) for i in np.argwhere(~np.isfinite(scales))[0])
            raise VCUError(f"{source}: row {rows.start + r}, group {g}: largest |weight| {float(np.abs(w[r, g * 128:(g + 1) * 128]).max())} "
                           "gives a scale outside fp16's range (65504), in which the board stores it")
        np.copyto(q32, q)
        return q32, scales, *squared_error(w, dequantize_rows(q, scales))

    return quantize_block


def write_lm_head(quantize_block, vocab: int, hidden: int, paths: dict[str, Path], label: str = "lm_head", progress: bool = False) -> tuple[float, float]:
    """The output layer's files at `paths` (lm_head_files' keys) from quantize_block(rows) of each
    block of output rows, computed on threads, written in order; returns the sums of the blocks'
    squared errors and squared norms, in block order."""
    step = rows_per_block(4 * hidden)
    blocks = [slice(r, min(r + step, vocab)) for r in range(0, vocab, step)]
    err = ref = 0.0
    with contextlib.ExitStack() as files:
        writers = {k: files.enter_context(DirectWriter(p, background=True) if k.startswith("qweight") else DirectWriter(p, 1 << 20))
                   for k, p in paths.items()}
        half = vocab // 2
        for block, (q, scales, e, n) in zip(blocks, bar(ordered_map(quantize_block, blocks), label, "block", len(blocks), progress), strict=True):
            scales = scales.astype("<f2")
            writers["qweight"].write(q, owned=True)
            writers["scales"].write(scales)
            if "qweight_0" in writers:  # rows below vocab/2 to the _0 copies, the rest to _1
                cut = min(max(half - block.start, 0), q.shape[0])
                for i, rows in ((0, slice(0, cut)), (1, slice(cut, None))):
                    writers[f"qweight_{i}"].write(np.ascontiguousarray(q[rows]))
                    writers[f"scales_{i}"].write(np.ascontiguousarray(scales[rows]))
            err, ref = err + e, ref + n
    return err, ref


@dataclass
class WrittenAhead:
    """The output layer's files written during GPTQ from the checkpoint's own float tensor
    (pipeline.ExportPrewriter), and what they were made with."""

    paths: dict[str, Path]  # lm_head_files' keys
    method: str
    int4_range: int
    source: str  # the pipeline name of the tensor quantized: lm_head.weight, or the tied embedding
    squared_error: float  # write_lm_head's sums
    squared_norm: float

    def fits(self, method: str, int4_range: int, source: str, dims) -> bool:
        """Made as this run makes them, and every file whole."""
        if (self.method, self.int4_range, self.source) != (method, int4_range, source):
            return False
        groups, half = dims.hidden // 128, dims.vocab // 2
        rows = {"": dims.vocab, "_0": half, "_1": dims.vocab - half}
        for key, path in self.paths.items():
            kind, _, part = key.partition("_")
            want = rows["_" + part if part else ""] * (4 * dims.hidden if kind == "qweight" else 2 * groups)
            if path.is_symlink() or not path.is_file() or path.stat().st_size != want:
                return False
        return True


def quantize_lm_head(qdir: Path, out: Path | None = None, method: str | None = None, progress: bool = True, force: bool = False,
                     int4_range: int | None = None, ahead: WrittenAhead | None = None):
    """Write lm_head_qweight.bin and lm_head_scales.bin into out/qwen2_qweight_bin, and lm_head.json.
    `int4_range` None: the grid quantize.py recorded in the checkpoint (format/int4_grid.py), else 8.
    `ahead`: the files written during GPTQ, renamed into place where they are what this run would
    write (the same method, grid and tensor; each file whole), else left alone.
    Returns (StepResult, method, relative error ||W - W_hat|| / ||W||, None for `checkpoint`)."""
    start = time.perf_counter()
    ckpt = GPTQCheckpoint(qdir)
    method = choose_method(ckpt, method)
    if int4_range not in (None, 7, 8) or (int4_range == 7 and method == "trunc"):
        raise VCUError(f"--int4_range {int4_range} with --method {method}: 7 (the 15 levels -7..7) goes with rtn; trunc is the original rule, kept as it was")
    int4_range = lm_head_grid(read_checkpoint_setting(ckpt.qdir), method, int4_range)
    # The checkpoint as compile_sw and verify see it (bits, group size, symmetric zero points, no
    # act-order, every tensor's place and shape): an output layer is only of use beside its layers.
    ckpt.validate()
    dims = ckpt.dims
    source = ckpt.lm_head_source()
    if source == "model.embed_tokens.weight":
        log.info("lm_head: no lm_head.weight in the checkpoint (tied embeddings): quantizing model.embed_tokens.weight")
    out = out_path(out) if out else ckpt.qdir / "compile"
    software = dims.family.software
    check_lm_head_out(out, ckpt.qdir, force, software=software)
    if out.is_symlink():
        out = out.resolve()
    made_from = {"checkpoint": str(ckpt.qdir.resolve()), "fingerprint": ckpt.fingerprint(), "method": method, "int4_range": int4_range}
    final = lm_head_files(out, software)
    folder = final["qweight"].parent
    created = make_parents(folder)
    nbytes = (dims.vocab * dims.hidden * 4 + dims.vocab * (dims.hidden // 128) * 2) * (2 if len(final) > 2 else 1)
    adopt = ahead is not None and set(ahead.paths) == set(final) and ahead.fits(method, int4_range, source, dims)
    if adopt:
        nbytes = 0  # on the disk already
    set_writing(folder, nbytes)
    if method == "checkpoint":  # GPTQ layout [hidden/8, vocab] and [hidden/128, vocab]: half a byte a weight
        gptq_qweight, gptq_scales = ckpt.get("lm_head.qweight"), ckpt.get("lm_head.scales")

        def quantize_block(rows: slice):
            q32 = aligned_empty(4 * (rows.stop - rows.start) * dims.hidden).view("<i4").reshape(-1, dims.hidden)
            q = ckpt.signed_weights(gptq_qweight[:, rows], np.dtype("<i4"), out=q32)
            return q, np.ascontiguousarray(gptq_scales[:, rows].T), 0.0, 0.0
    else:
        quantize_block = rtn_blocks(lambda rows: ckpt.get(source, rows=rows), method, int4_range, dims.hidden, source)
    ok = False
    partial = {k: p.with_name(f".{p.name}.partial-{stage_tag()}") for k, p in final.items()}
    try:
        with folder_lock(out):
            for name in final.values():
                remove_stale(folder, name.name)
            check_lm_head_out(out, ckpt.qdir, force, created=out in created, software=software)  # again, with the folder locked
            check_free_space(folder / "x", nbytes)
            for p in partial.values():  # claimed now: a second run on these files sees a live one
                p.touch()
        if adopt:
            for k, p in partial.items():
                os.replace(ahead.paths[k], p)
            err, ref = ahead.squared_error, ahead.squared_norm
        else:
            err, ref = write_lm_head(quantize_block, dims.vocab, dims.hidden, partial, f"lm_head ({method})", progress)
        error = None if method == "checkpoint" else (err / ref) ** 0.5 if ref else 0.0
        with folder_lock(out), signals_deferred():
            for k in final:
                os.replace(partial[k], final[k])
            write_step_record(out, STEP, made_from, [str(p.relative_to(out)) for p in final.values()], relative_error=error)
        ok = True
    finally:
        for p in partial.values():  # this run's own (its pid and host are in the names)
            with contextlib.suppress(OSError):
                p.unlink()
        if not ok:
            remove_created(created)
    nbytes = sum(p.stat().st_size for p in final.values())
    result = StepResult("lm_head", folder, len(final), nbytes, time.perf_counter() - start, note=f"{STEP}.json lists them")
    result.details = {"adopted": adopt}
    return result, method, error
