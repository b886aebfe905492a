"""Step 2: a GPTQ checkpoint to the software format (FORMAT.md 2): the constant-folding step.

The zero point (8 everywhere, checked) is folded into signed ints q - 8, the scales are transposed to
one row per output channel, and a linear without bias gets an all-zero bias file.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from .checkpoint import GPTQCheckpoint
from .direct_io import DirectWriter
from .formats import (
    CONFIG,
    SW_FP16_DIR,
    SW_QWEIGHT_DIR,
    sw_fp16_path,
    sw_linear_paths,
    sw_norm_file,
)
from .model import EMBEDDING, FINAL_NORM, LAYER_NORMS, LINEARS
from .output import StepResult, files_under, folder_stats, read_step_record, record_owns, staged_dir, write_step_record
from .parallel import ordered_map, rows_per_block
from .jsonfile import dumps
from .progress import bar
from .stats import STATS_FILE, stats_from_report

log = logging.getLogger("vcu128")
STEP = "compile_sw"


def write_linear(ckpt: GPTQCheckpoint, name: str, folder: Path) -> None:
    """One quantized linear: qweight.bin int32 [chout, chin], scales.bin fp16 [chout, chin/128], bias.bin."""
    paths = sw_linear_paths(folder, name)
    qweight = ckpt.get(f"{name}.qweight")  # int32 [chin/8, chout]: half a byte a weight
    chin, chout = qweight.shape[0] * 8, qweight.shape[1]
    step = rows_per_block(4 * chin)
    with DirectWriter(paths["qweight"], background=True) as f:
        for block in ordered_map(lambda c: ckpt.signed_weights(qweight[:, c : c + step], np.dtype("<i4")), range(0, chout, step)):
            f.write(block)
    np.ascontiguousarray(ckpt.get(f"{name}.scales").T).astype("<f2").tofile(paths["scales"])
    bias_name = f"{name}.bias"
    bias = ckpt.get_fp16(bias_name) if ckpt.has(bias_name) else np.zeros(chout, "<f2")
    bias.astype("<f2").tofile(paths["bias"])


def write_embedding(ckpt: GPTQCheckpoint, folder: Path) -> None:
    vocab, hidden = ckpt.dims.vocab, ckpt.dims.hidden
    step = rows_per_block(2 * hidden)
    with DirectWriter(sw_fp16_path(folder, EMBEDDING), background=True) as f:
        for r in range(0, vocab, step):
            f.write(ckpt.get_fp16(EMBEDDING, rows=slice(r, r + step)).astype("<f2"))


def output_bytes(dims) -> int:
    """What compile_sw writes (FORMAT.md 2), for the free-space check."""
    per_layer = 0
    for lin in LINEARS:
        chin, chout = dims.linear_shape(lin)
        per_layer += chout * chin * 4 + chout * (chin // 128) * 2 + chout * 2
    per_layer += len(LAYER_NORMS) * 4 * dims.hidden
    return dims.num_layers * per_layer + 4 * dims.hidden + 2 * dims.vocab * dims.hidden


# A compile folder is compile_sw's output when it holds its record; a folder lm_head.py created
# first (record lm_head.json) is one too, with nothing of compile_sw's in it yet.
_compile_sw_owns = record_owns(STEP)


def compile_folder_owns(folder: Path) -> set[str] | None:
    owned = _compile_sw_owns(folder)
    if owned is None and read_step_record(folder, "lm_head") is not None:
        return set()
    return owned


def compile_software(qdir: Path, out: Path | None = None, progress: bool = True, force: bool = False) -> StepResult:
    start = time.perf_counter()
    ckpt = GPTQCheckpoint(qdir)
    out = Path(out) if out else ckpt.qdir / "compile"
    ckpt.validate()  # every refusal happens here, before the output folder exists
    dims = ckpt.dims
    made_from = {"checkpoint": str(ckpt.qdir.resolve()), "fingerprint": ckpt.fingerprint()}
    with staged_dir(out, STEP, compile_folder_owns, [ckpt.qdir], force, output_bytes(dims)) as stage:
        (stage / SW_QWEIGHT_DIR).mkdir()
        (stage / SW_FP16_DIR).mkdir()
        shutil.copyfile(ckpt.qdir / CONFIG, stage / CONFIG)
        for layer in bar(range(dims.num_layers), "compile_sw", "layer", enabled=progress):
            for lin in LINEARS:
                write_linear(ckpt, lin.name(layer), stage)
            for norm, _ in LAYER_NORMS:
                name = f"model.layers.{layer}.{norm}.weight"
                sw_norm_file(ckpt.get_fp16(name)).tofile(sw_fp16_path(stage, name))
        sw_norm_file(ckpt.get_fp16(f"{FINAL_NORM}.weight")).tofile(sw_fp16_path(stage, f"{FINAL_NORM}.weight"))
        write_embedding(ckpt, stage)
        stats = stats_from_report(ckpt.qdir)
        if stats is not None:  # what the SiLU fit and the fp16 rescaling need, beside the files they shape
            (stage / STATS_FILE).write_text(dumps(stats))
        write_step_record(stage, STEP, made_from, files_under(stage))
    files, nbytes = folder_stats([out])
    return StepResult("compile_sw", out, files, nbytes, time.perf_counter() - start)
