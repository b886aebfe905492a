"""Step 2: a GPTQ checkpoint to the software format (FORMAT.md 2): the constant-folding step.

The zero point (8 everywhere, checked) is folded into signed ints q - 8, the scales are transposed to
one row per output channel, and a linear without bias gets an all-zero bias file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import stat
import time
from pathlib import Path

import numpy as np

from vcu128.board.rescale import parse_mode, plan_from_stats
from vcu128.board.stats import STATS_FILE, stats_from_report
from vcu128.export.packing import (
    PACKED_AHEAD_DIR,
    LinearPacker,
    PackedAhead,
    free_bytes,
    packed_linear_bytes,
)
from vcu128.format.checkpoint import GPTQCheckpoint, offset_words, signed_of_words
from vcu128.format.int4_grid import RECORD_KEY as INT4_KEY
from vcu128.format.int4_grid import read_checkpoint_setting
from vcu128.format.layout import (
    BOARD_PORTS,
    CONFIG,
    hw_linear_stems,
    sw_dirs,
    sw_fp16_path,
    sw_linear_paths,
    sw_norm_file,
)
from vcu128.format.model import EMBEDDING, FINAL_NORM, LAYER_NORMS, LINEARS
from vcu128.format.rescale import CONFIG_KEY as RESCALE_KEY
from vcu128.format.rescale import RescalePlan, scale_fp16, tensor_factor
from vcu128.io.direct_io import DirectWriter, aligned_empty, write_array
from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import dumps, read_json_object
from vcu128.io.output import (
    StepResult,
    check_out,
    disk_bytes,
    files_under,
    read_step_record,
    record_owns,
    staged_dir,
    write_step_record,
)
from vcu128.io.parallel import ordered_map, rows_per_block
from vcu128.io.progress import bar

log = logging.getLogger("vcu128")
STEP = "compile_sw"


def write_qweight(qweight: np.ndarray, path: Path, packer: LinearPacker | None = None) -> None:
    """qweight.bin: a GPTQ qweight, int32 [chin/8, chout] (half a byte a weight), as int32 q - 8
    [chout, chin]. The same whatever the fp16 rescaling (its factors touch scales, biases and the
    embedding only): what pipeline.ExportPrewriter writes during GPTQ. `packer`: the linear packed
    for the board from the same ints, as they are written."""
    chin, chout = qweight.shape[0] * 8, qweight.shape[1]
    # Blocks of 16 MB (memory the allocator reuses; 32 MB would be new, kernel-zeroed pages each time),
    # of a multiple of 8 rows: whole 4 kB pages (and of the ports, when packing: the board's rows
    # go round the ports)
    step = rows_per_block(8 * chin, multiple=math.lcm(8, packer.ahead.ports) if packer else 8)

    def block(c: int) -> np.ndarray:  # unpacked into aligned memory, written from there (no copy)
        n = min(step, chout - c)
        words = offset_words(qweight[:, c : c + n])
        rows = signed_of_words(words, np.dtype("<i4"), out=aligned_empty(4 * n * chin).view("<i4").reshape(n, chin))
        if packer is not None:
            packer.rows(c, rows, words)
        return rows

    with DirectWriter(path, background=True) as f:
        for rows in ordered_map(block, range(0, chout, step)):
            f.write(rows, owned=True)
    if packer is not None:
        packer.finish(path)


def write_linear(ckpt: GPTQCheckpoint, name: str, folder: Path, factor: float = 1.0, counter: dict | None = None,
                 qweight_from: Path | None = None, ahead: PackedAhead | None = None, stems: tuple[str, str] | None = None) -> None:
    """One quantized linear: qweight.bin int32 [chout, chin], scales.bin fp16 [chout, chin/128], bias.bin;
    scales and bias times `factor` (a power of two: fp16 rescaling). `qweight_from`: its qweight.bin
    written ahead (prewritten_qweights checked it), renamed into place instead of written. `ahead`:
    where the linear is packed for the board (`stems`: its files there) from what is written here."""
    counter = {} if counter is None else counter
    paths = sw_linear_paths(folder, name, ckpt.dims.family.software)
    bias_name = f"{name}.bias"
    scales, bias = write_scales_and_bias(ckpt.get(f"{name}.scales"), ckpt.get_fp16(bias_name) if ckpt.has(bias_name) else None, paths, factor, counter)
    if qweight_from is None:
        packer = LinearPacker(ahead, name, stems, scales, bias, (str(paths["qweight"]), str(paths["scales"]))) if ahead is not None else None
        write_qweight(ckpt.get(f"{name}.qweight"), paths["qweight"], packer)
    else:
        os.rename(qweight_from, paths["qweight"])


def write_scales_and_bias(scales: np.ndarray, bias: np.ndarray | None, paths: dict[str, Path], factor: float = 1.0,
                          counter: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scales.bin: a GPTQ scales tensor [chin/128, chout] as fp16 [chout, chin/128]; bias.bin: the fp16
    bias, zeros for a linear without one; both times `factor`. What pipeline.ExportPrewriter packs
    ahead from (factor 1), and hardware.py compares before taking what it packed. Returns the two
    arrays as written."""
    counter = {} if counter is None else counter
    scales = scale_fp16(np.ascontiguousarray(scales.T), factor, counter).astype("<f2")
    write_array(paths["scales"], scales)
    bias = np.zeros(scales.shape[0], "<f2") if bias is None else bias
    bias = scale_fp16(bias, factor, counter).astype("<f2")
    write_array(paths["bias"], bias)
    return scales, bias


def write_embedding(ckpt: GPTQCheckpoint, folder: Path, factor: float = 1.0, counter: dict | None = None) -> None:
    vocab, hidden = ckpt.dims.vocab, ckpt.dims.hidden
    step = rows_per_block(2 * hidden)

    def block(r: int) -> tuple[np.ndarray, dict]:  # read (and scaled) ahead, on the worker threads
        counts: dict = {}
        return scale_fp16(ckpt.get_fp16(EMBEDDING, rows=slice(r, r + step)), factor, counts).astype("<f2", copy=False), counts

    with DirectWriter(sw_fp16_path(folder, EMBEDDING, ckpt.dims.family.software), background=True) as f:
        for rows, counts in ordered_map(block, range(0, vocab, step)):
            f.write(rows)
            if counter is not None:
                for key, n in counts.items():
                    counter[key] = counter.get(key, 0) + n


def rescale_plan(ckpt: GPTQCheckpoint, mode: str, text: Path | None) -> RescalePlan | None:
    """The fp16 rescaling factors for --fp16_rescale `mode`, or None."""
    kind, explicit = parse_mode(mode)
    d = ckpt.dims
    if kind == "off":
        return None
    if kind == "explicit":
        plan = RescalePlan(explicit["k"], (explicit["m"],) * d.num_layers, (f"given: --fp16_rescale {mode}",))
        return None if plan.is_identity else plan
    if kind == "auto":
        stats = stats_from_report(ckpt.qdir, d.num_layers)
        if stats is None:
            log.warning(f"warning: {ckpt.qdir}: no fp16 statistics (quant_report.json has none): not rescaled; "
                        "--fp16_rescale measure measures them")
            return None
        source = "quant_report.json"
    else:
        from vcu128.check.rescale_search import (  # torch: only where a model runs
            evaluation_tokens,
            measure_stats,
        )

        tokens, where = evaluation_tokens(ckpt.qdir, d.vocab, text)
        stats = measure_stats(ckpt.qdir, tokens)
        source = f"measured on {where}"
    plan = plan_from_stats(stats, d.num_layers, source)
    if plan.is_identity:
        return None
    if plan.k:
        from vcu128.check.rescale_search import (  # torch: only where a model runs
            choose_k,
            evaluation_tokens,
        )

        k = plan.k
        tokens, _ = evaluation_tokens(ckpt.qdir, d.vocab, text)
        plan = choose_k(ckpt.qdir, tokens, plan)
        report = plan.k_choice
        log.info(f"compile_sw: residual stream times 2^-{k}: board-numerics relative logit error {report['with_k']['relative_logit_error']:.4f}; "
                 f"saturating instead: {report['saturating_instead']['relative_logit_error']:.4f}; kept {report['kept'].replace('_', ' ')}")
    return None if plan.is_identity else plan


def source_model(qdir: Path) -> dict:
    """{"model": the folder quantize.py read}, where its report names one (the packed folder's
    manifest carries it on)."""
    try:
        doc = json.loads((Path(qdir) / "quant_report.json").read_bytes())
    except (OSError, ValueError):
        return {}
    model = doc.get("model") if isinstance(doc, dict) else None
    return {"model": model} if isinstance(model, str) else {}


def output_bytes(dims) -> int:
    """What compile_sw writes (FORMAT.md 2), for the free-space check."""
    per_layer = 0
    for lin in LINEARS:
        chin, chout = dims.linear_shape(lin)
        per_layer += disk_bytes(chout * chin * 4) + disk_bytes(chout * (chin // 128) * 2) + disk_bytes(chout * 2)
    per_layer += len(LAYER_NORMS) * disk_bytes(4 * dims.hidden)
    return dims.num_layers * per_layer + disk_bytes(4 * dims.hidden) + disk_bytes(2 * dims.vocab * dims.hidden)


def prewritten_qweights(folder: Path, dims) -> dict[str, Path]:
    """{linear: its qweight.bin} under `folder` (written ahead, in the compile folder's layout):
    every linear's, each a plain file of its exact size, or refused, naming the first that is not."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        raise VCUError(f"{folder}: not a folder of qweight.bin files written ahead (compile_sw's qweights_from)")
    found = {}
    for layer in range(dims.num_layers):
        for lin in LINEARS:
            name = lin.name(layer)
            chin, chout = dims.linear_shape(lin)
            path = sw_linear_paths(folder, name, dims.family.software)["qweight"]
            try:
                st = path.lstat()
            except FileNotFoundError:
                raise VCUError(f"{path}: missing: the qweight.bin files written ahead are incomplete") from None
            if not stat.S_ISREG(st.st_mode):
                raise VCUError(f"{path}: not a plain file (a qweight.bin written ahead is one)")
            if st.st_size != 4 * chin * chout:
                raise VCUError(f"{path}: {st.st_size} bytes, expected {4 * chin * chout} (int32 [{chout}, {chin}]): "
                               "a qweight.bin written ahead that is not whole")
            found[name] = path
    return found


# A compile folder is compile_sw's output when it holds its record; a folder lm_head.py created
# first (record lm_head.json) is one too, with nothing of compile_sw's in it yet. Its own files are
# the ones its record lists, and what packed_ahead.json lists (what hardware.py has not taken yet).
_compile_sw_owns = record_owns(STEP)


def compile_folder_owns(folder: Path) -> set[str] | None:
    owned = _compile_sw_owns(folder)
    if owned is None and read_step_record(folder, "lm_head") is not None:
        return set()
    if owned is not None:
        owned |= {f"{PACKED_AHEAD_DIR}/{rel}" for rel in PackedAhead.files_listed(Path(folder) / PACKED_AHEAD_DIR)}
    return owned


def compile_software(qdir: Path, out: Path | None = None, progress: bool = True, force: bool = False,
                     fp16_rescale: str = "auto", text: Path | None = None, qweights_from: Path | None = None,
                     ports: int | None = BOARD_PORTS) -> StepResult:
    """`qweights_from`: a folder of this checkpoint's qweight.bin files written ahead
    (pipeline.ExportPrewriter), on the output's filesystem: renamed into the output instead of written.
    `ports`: every linear whose ints are written here is also packed for a board of that many HBM
    ports, in the int4 code quantize.py recorded (packed_ahead/, which hardware.py takes from instead
    of reading the ints back: 27 GB for a 7B); None: not."""
    start = time.perf_counter()
    parse_mode(fp16_rescale)  # options first: one line, before anything is read
    ckpt = GPTQCheckpoint(qdir)
    out = Path(out) if out else ckpt.qdir / "compile"
    inputs = [ckpt.qdir] + ([Path(text)] if text else [])
    check_out(out, STEP, compile_folder_owns, inputs, force)  # before any reading or measuring
    ckpt.validate()  # every refusal happens here, before the output folder exists
    dims = ckpt.dims
    adopted = prewritten_qweights(qweights_from, dims) if qweights_from is not None else {}
    stats = stats_from_report(ckpt.qdir, dims.num_layers)  # strictly read: a damaged record is refused now
    int4 = read_checkpoint_setting(ckpt.qdir)  # the board's int4 code quantize.py recorded: hardware.py follows it
    plan = rescale_plan(ckpt, fp16_rescale, text)
    made_from = {"checkpoint": str(ckpt.qdir.resolve()), **source_model(ckpt.qdir), "fingerprint": ckpt.fingerprint(),
                 "fp16_rescale": plan.factors_record() if plan else None}
    counter: dict = {}
    need = output_bytes(dims) - sum(disk_bytes(path.stat().st_size) for path in adopted.values())
    packing = packed_linear_bytes(dims, ports, output_layer=False) if ports is not None and qweights_from is None else 0
    if packing and free_bytes(out) < need + packing:
        log.info(f"compile_sw: no room to pack the linears for the board as well (another {packing / 1e9:.1f} GB): hardware.py packs them from the files")
        packing = 0
    with contextlib.ExitStack() as steps:
        stage = steps.enter_context(staged_dir(out, STEP, compile_folder_owns, inputs, force, need + packing, writes=[CONFIG, f"{STEP}.json"]))
        # its linears' files written, and listed in packed_ahead.json, before the stage takes the output's place
        ahead = steps.enter_context(PackedAhead.writing(stage / PACKED_AHEAD_DIR, ports, int4.code if int4 else "twos")) if packing else None
        software = dims.family.software
        for sub in sw_dirs(software):
            (stage / sub).mkdir()
        shutil.copyfile(ckpt.qdir / CONFIG, stage / CONFIG)
        def linear(item: tuple[int, object]) -> dict:
            layer, lin = item
            name = lin.name(layer)
            sw_linear_paths(stage, name, software)["qweight"].parent.mkdir(parents=True, exist_ok=True)
            counts: dict = {}
            write_linear(ckpt, name, stage, tensor_factor(plan, name), counts, adopted.get(name), ahead, hw_linear_stems(layer, lin))
            return counts

        # Two linears at a time, each read, unpacked and written on threads of its own: while one
        # starts (its qweight read) or ends (its last write), the other keeps the disk busy. Results
        # come back in order: a layer's norms are written, and an error raised, as one after another would.
        linears = [(layer, lin) for layer in range(dims.num_layers) for lin in LINEARS]
        with bar(None, "compile_sw", "layer", dims.num_layers, progress) as shown:
            for i, counts in enumerate(ordered_map(linear, linears, ahead=2, workers=2)):
                for key, n in counts.items():
                    counter[key] = counter.get(key, 0) + n
                layer, _ = linears[i]
                if i + 1 == len(linears) or linears[i + 1][0] != layer:
                    for norm, _ in LAYER_NORMS:
                        name = f"model.layers.{layer}.{norm}.weight"
                        write_array(sw_fp16_path(stage, name, software), sw_norm_file(ckpt.get_fp16(name)))
                    shown.update(1)
        write_array(sw_fp16_path(stage, f"{FINAL_NORM}.weight", software), sw_norm_file(ckpt.get_fp16(f"{FINAL_NORM}.weight")))
        write_embedding(ckpt, stage, tensor_factor(plan, EMBEDDING), counter)
        if plan:  # config.json says so: every later step reads its factors from there
            plan = plan.with_report(out_of_normal_range=counter.get("out_of_normal_range", 0))
            config = read_json_object(ckpt.qdir / CONFIG)
            config[RESCALE_KEY] = plan.to_record()
            write_array(stage / CONFIG, np.frombuffer((json.dumps(config, indent=2) + "\n").encode(), np.uint8))
            log.info(f"compile_sw: fp16 rescaling k = {plan.k}, m = {list(plan.m)} ({'; '.join(plan.why)}); "
                     f"{plan.out_of_normal_range} values pushed out of fp16's normal range")
        if stats is not None:  # what the SiLU fit and the fp16 rescaling need, beside the files they shape
            write_array(stage / STATS_FILE, np.frombuffer(dumps(stats).encode(), np.uint8))
        # packed_ahead/ is listed in packed_ahead.json, not in compile_sw.json: hardware.py takes its files away
        written = [rel for rel in files_under(stage) if not rel.startswith(f"{PACKED_AHEAD_DIR}/")]
        write_step_record(stage, STEP, made_from, written, fp16_rescale=plan.to_record() if plan else None,
                          **({INT4_KEY: int4.to_record()} if int4 else {}))
    # What this step wrote, not what the folder holds (lm_head's files, the packed folder): the same on a re-run
    nbytes = sum((out / rel).stat().st_size for rel in written)
    result = StepResult("compile_sw", out, len(written), nbytes, time.perf_counter() - start, note=f"{STEP}.json lists them")
    result.details = {"fp16_rescale": plan.to_record() if plan else None, "qweights_adopted": len(adopted),
                      "packed_ahead": len(ahead.linears) if ahead is not None else 0}
    if ahead is not None:
        log.info(f"compile_sw: {len(ahead.linears)} of {len(linears)} linears also packed for the board ({ahead.ports} ports, "
                 f"int4 {ahead.int4}) in {out / PACKED_AHEAD_DIR}: hardware.py takes them from there")
    return result
