"""Step 4: the software format to the board's layout (FORMAT.md 3), with manifest.json."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .errors import VCUError
from .formats import (
    CONFIG,
    OUT_BIAS_FILE,
    OUT_NORM_FILE,
    OUT_WEIGHT_STEM,
    BinFile,
    PackedLinearWriter,
    check_int4_range,
    hw_layer_norm_file,
    hw_linear_stems,
    pack_bias_words,
    pack_linear_rows,
    row_words,
    rows_per_port,
    sw_fp16_path,
    sw_linear_paths,
    sw_lm_head_paths,
    sw_qweight_file,
    sw_scales_file,
)
from .model import (
    FINAL_NORM,
    GROUP_SIZE,
    LAYER_NORMS,
    LINEARS,
    ModelDims,
    read_model_dims,
)
from .jsonfile import dumps
from .output import (
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    StepResult,
    folder_stats,
    manifest_owns,
    read_manifest,
    replace_file_atomically,
    staged_dir,
    write_whole_file,
)
from .provenance import compile_ids, stale_compile, warn
from .parallel import ordered_map, rows_per_block
from .progress import bar


STEP = "hardware"


def default_hardware_dir(compile_dir: Path, ports: int) -> Path:
    return Path(compile_dir) / f"QWEN_BLOCK_write_data_port{ports}"


class PackJob:
    """One packed linear: its checked input files and where its words go."""

    def __init__(self, name: str, qweight: BinFile, scales: BinFile, bias: BinFile | None, stem: str, bias_file: str):
        self.name, self.qweight, self.scales, self.bias = name, qweight, scales, bias
        self.stem, self.bias_file = stem, bias_file
        self.chout, self.chin = qweight.shape

    def run(self, root: Path, ports: int) -> list[FileRecord]:
        writer = PackedLinearWriter(root, self.stem, self.chin, self.chout, ports, source=self.name)
        step = rows_per_block(4 * self.chin, multiple=ports)

        def pack_block(start: int) -> np.ndarray:
            stop = min(start + step, self.chout)
            q = self.qweight.read_rows(start, stop)
            check_int4_range(q, str(self.qweight.path), first_row=start)
            return pack_linear_rows(q, self.scales.read_rows(start, stop))

        for rows in ordered_map(pack_block, range(0, self.chout, step)):
            writer.write(rows)
        records = writer.close()
        bias = self.bias.read() if self.bias else np.zeros(self.chout, "<f2")
        records.append(write_whole_file(root, self.bias_file, pack_bias_words(bias), f"{self.name}.bias", rows=self.chout, words_per_row=1))
        return records


def linear_job(compile_dir: Path, name: str, chin: int, chout: int, stems: tuple[str, str]) -> PackJob:
    paths = sw_linear_paths(compile_dir, name)
    return PackJob(
        name,
        sw_qweight_file(paths["qweight"], chout, chin),
        sw_scales_file(paths["scales"], chout, chin),
        BinFile(paths["bias"], "<f2", (chout,)),
        *stems,
    )


def plan(compile_dir: Path, dims: ModelDims) -> tuple[list[list[PackJob]], list[tuple[BinFile, str]], PackJob]:
    """Open (and so size-check) every input before anything is written: per layer its jobs,
    the norm copies, and the output layer."""
    layers, norms = [], []
    for layer in range(dims.num_layers):
        layers.append([linear_job(compile_dir, lin.name(layer), *dims.linear_shape(lin), hw_linear_stems(layer, lin)) for lin in LINEARS])
        for norm, board in LAYER_NORMS:
            src = sw_fp16_path(compile_dir, f"model.layers.{layer}.{norm}.weight")
            norms.append((BinFile(src, "<f2", (2 * dims.hidden,)), hw_layer_norm_file(layer, board)))
    norms.append((BinFile(sw_fp16_path(compile_dir, f"{FINAL_NORM}.weight"), "<f2", (2 * dims.hidden,)), OUT_NORM_FILE))
    lm = sw_lm_head_paths(compile_dir)
    if not lm["qweight"].is_file():
        raise VCUError(f"{lm['qweight']}: missing (run lm_head.py first)")
    out_layer = PackJob(
        "lm_head",
        sw_qweight_file(lm["qweight"], dims.vocab, dims.hidden),
        sw_scales_file(lm["scales"], dims.vocab, dims.hidden),
        None,  # the output layer has no bias: its bias words are 0x3C000000
        OUT_WEIGHT_STEM,
        OUT_BIAS_FILE,
    )
    return layers, norms, out_layer


def output_bytes(dims: ModelDims, ports: int) -> int:
    """What hardware.py writes (FORMAT.md 3), for the free-space check."""
    total = 0
    for chin, chout in [dims.linear_shape(lin) for lin in LINEARS] * dims.num_layers + [(dims.hidden, dims.vocab)]:
        total += rows_per_port(chout, ports) * ports * row_words(chin) * 4 + 4 * chout
    return total + (2 * dims.num_layers + 1) * 4 * dims.hidden


hardware_owns = manifest_owns("hardware", STEP)


def pack_hardware(compile_dir: Path, out: Path | None = None, ports: int = 32, progress: bool = True, force: bool = False) -> StepResult:
    start = time.perf_counter()
    compile_dir = Path(compile_dir)
    if not compile_dir.is_dir():
        raise VCUError(f"{compile_dir}: no such compile folder (run compile_sw.py first)")
    if ports < 1:
        raise VCUError(f"--ports {ports}: must be at least 1")
    dims = read_model_dims(compile_dir / CONFIG)
    for what, chin in (("hidden_size", dims.hidden), ("intermediate_size", dims.intermediate), ("q dim", dims.q_dim)):
        if chin % GROUP_SIZE:
            raise VCUError(f"{compile_dir / CONFIG}: {what}={chin} is not a multiple of {GROUP_SIZE}, which the board needs")
    layers, norms, out_layer = plan(compile_dir, dims)
    warn(stale_compile(compile_dir))
    out = Path(out) if out else default_hardware_dir(compile_dir, ports)
    made_from = {**compile_ids(compile_dir), "ports": ports}
    manifest = Manifest("hardware", dims.to_json(), {"ports": ports, "group_size": GROUP_SIZE, "made_from": made_from})
    with staged_dir(out, STEP, hardware_owns, [compile_dir], force, output_bytes(dims, ports)) as stage:
        for jobs in bar(layers, "hardware", "layer", enabled=progress):
            for job in jobs:
                manifest.files += job.run(stage, ports)
        manifest.files += out_layer.run(stage, ports)
        for src, rel in norms:
            manifest.files += [write_whole_file(stage, rel, src.read(), src.path.name, dtype="float16", rows=1, words_per_row=dims.hidden)]
        for f in manifest.files:
            f.step = STEP
        manifest.write(stage)
        keep_embedding_entries(out, stage)
    files, nbytes = folder_stats([out])
    return StepResult("hardware", out, files, nbytes, time.perf_counter() - start)


def keep_embedding_entries(old: Path, stage: Path) -> None:
    """A re-run keeps embedding_tokens' parts (they are carried into the new folder): keep their
    manifest entries too."""
    if hardware_owns(old) is None:
        return
    doc = read_manifest(old)
    kept = [f for f in doc["files"] if f.get("step") == "embedding_tokens" and (old / f["path"]).is_file()]
    if not kept:
        return
    new = read_manifest(stage)
    new["files"] += kept
    new["embedding_parts"] = doc.get("embedding_parts")
    replace_file_atomically(stage / MANIFEST_NAME, dumps(new).encode())
