"""Step 4: the software format to the board's layout (FORMAT.md 3), with manifest.json."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vcu128.board.stats import read_activation_stats
from vcu128.export.packing import (
    PACKED_AHEAD_DIR,
    PackedAhead,
    PackJob,
    linear_job,
    output_layer_job,
    pack_jobs,
    packed_linear_bytes,
)
from vcu128.format.checkpoint import check_finite
from vcu128.format.folder import (
    EMBEDDING_KIND,
    HARDWARE_KIND,
    MANIFEST_NAME,
    Manifest,
    default_hardware_dir,
    holds_only_embedding_parts,
    manifest_owns,
    read_manifest,
)
from vcu128.format.gate import read_model_dims
from vcu128.format.int4_grid import hardware_code
from vcu128.format.layout import (
    BOARD_PORTS,
    CONFIG,
    EMBEDDING_DIR,
    INT4_CODES,
    OUT_NORM_FILE,
    BinFile,
    hw_layer_norm_file,
    hw_linear_stems,
    sw_dirs,
    sw_fp16_path,
)
from vcu128.format.model import (
    FINAL_NORM,
    GROUP_SIZE,
    LAYER_NORMS,
    LINEARS,
    ModelDims,
    read_model_config,
)
from vcu128.format.rescale import CONFIG_KEY as RESCALE_KEY
from vcu128.format.rescale import RescalePlan
from vcu128.format.tables import (
    ACT_FILE,
    ACT_FILE_BYTES,
    BOARD_HEAD_DIM,
    DEFAULT_FIT_RANGE,
    DEFAULT_MAX_TOKEN,
    DEFAULT_ROPE_ORDER,
    ROPE_BYTES_A_POSITION,
    ROPE_ORDERS,
    ROPE_ORDERS_OF,
    SILU_TABLES,
    check_max_token,
    rope_file_name,
    rope_parameters,
    rope_table_blocks,
    silu_table,
)
from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import dumps
from vcu128.io.output import (
    FileRecord,
    HashingWriter,
    StepResult,
    disk_bytes,
    read_step_record,
    replace_file_atomically,
    staged_dir,
    write_whole_file,
)
from vcu128.io.progress import bar
from vcu128.io.provenance import compile_ids, stale_compile, warn

log = logging.getLogger("vcu128")
STEP = "hardware"
EMBEDDING_STEP = "embedding_tokens"  # the step whose parts a packed folder holds beside hardware.py's files


def plan(compile_dir: Path, dims: ModelDims) -> tuple[list[list[PackJob]], list[tuple[BinFile, str]], PackJob]:
    """Open (and so size-check) every input before anything is written: per layer its jobs,
    the norm copies, and the output layer."""
    layers, norms = [], []
    software = dims.family.software
    for layer in range(dims.num_layers):
        layers.append([linear_job(compile_dir, lin.name(layer), *dims.linear_shape(lin), hw_linear_stems(layer, lin), software)
                       for lin in LINEARS])
        for norm, board in LAYER_NORMS:
            src = sw_fp16_path(compile_dir, f"model.layers.{layer}.{norm}.weight", software)
            norms.append((BinFile(src, "<f2", (2 * dims.hidden,)), hw_layer_norm_file(layer, board)))
    norms.append((BinFile(sw_fp16_path(compile_dir, f"{FINAL_NORM}.weight", software), "<f2", (2 * dims.hidden,)), OUT_NORM_FILE))
    return layers, norms, output_layer_job(compile_dir, dims)


def output_bytes(dims: ModelDims, ports: int, max_token: int = DEFAULT_MAX_TOKEN) -> int:
    """What hardware.py writes (FORMAT.md 3), for the free-space check."""
    tables = disk_bytes(ACT_FILE_BYTES) + (disk_bytes(ROPE_BYTES_A_POSITION * max_token) if dims.head_dim == BOARD_HEAD_DIM else 0)
    return packed_linear_bytes(dims, ports) + (2 * dims.num_layers + 1) * disk_bytes(4 * dims.hidden) + tables


_manifest_owns = manifest_owns(HARDWARE_KIND, STEP)
EMBEDDING_RECORD = f"{EMBEDDING_DIR}/{MANIFEST_NAME}"


def hardware_owns(folder: Path) -> set[str] | None:
    """The files hardware.py wrote in `folder` (its manifest lists them), or None when the folder is
    not its output. A folder holding only the Embedding/ folder that embedding_tokens.py made there on
    its own (run first) is the packed folder to be: the parts are kept, and their entries move from
    Embedding/manifest.json (which this run takes over) into the packed folder's manifest.json."""
    owned = _manifest_owns(folder)
    if owned is None and holds_only_embedding_parts(folder, EMBEDDING_STEP):
        return {EMBEDDING_RECORD}
    return owned

# What the folder's RoPE table assumes the board's unit does (manifest.json `assumptions.rope_rotation`).
ROPE_ROTATIONS = {
    "rotate_half": "rotate-half: channel i with i + 64, as HF Qwen2/Llama (q_proj, k_proj rows as in the checkpoint)",
    "glm_interleaved": "GLM mode: channel pairs (2j, 2j+1) of the first 64 of each head rotated by frequency j, channels 64-127 "
                       "passed through, as ChatGLM computes and as the testbench reference tasks_EMB.vh does (FORMAT.md 8); the table "
                       "holds cos, sin of the 32 frequencies interleaved, then 64 zeros (HBM_emb_test.cpp's zero padding)",
}


@dataclass(frozen=True)
class BoardOptions:
    """What a packed folder assumes about the board (recorded in manifest.json's `assumptions`)."""

    ports: int = BOARD_PORTS
    int4: str | None = None  # None: the code quantize.py recorded (compile_sw.json), else twos (format/int4_grid.py)
    rope_table: str | None = None  # None: the family's (DEFAULT_ROPE_ORDER, or GLM's)
    silu_table: str = "board"
    max_token: int = DEFAULT_MAX_TOKEN

    def check(self) -> None:
        for flag, value, allowed in (("--int4", self.int4, INT4_CODES), ("--rope_table", self.rope_table or DEFAULT_ROPE_ORDER, ROPE_ORDERS),
                                     ("--silu_table", self.silu_table, SILU_TABLES)):
            if value not in allowed and not (flag == "--int4" and value is None):
                raise VCUError(f"{flag} {value}: expected one of {', '.join(allowed)}")
        if self.ports < 1:
            raise VCUError(f"--ports {self.ports}: must be at least 1")
        check_max_token(self.max_token)

    def for_model(self, dims: ModelDims) -> "BoardOptions":
        """The options with the RoPE table's layout settled for the model's family (FORMAT.md 5, 8):
        a Qwen/Llama model's `halves` or `pairs`; a GLM model's only `glm`."""
        allowed = ROPE_ORDERS_OF[dims.family.rope]
        order = self.rope_table or allowed[0]
        if order not in allowed:
            raise VCUError(f"--rope_table {order}: a {dims.model_type} model's RoPE table is {' or '.join(allowed)} "
                           f"({'GLM mode: pairs of the first 64 channels' if dims.family.rope == 'glm_interleaved' else 'rotate-half'})")
        return replace(self, rope_table=order)


def write_tables(stage: Path, cfg: dict, dims: ModelDims, opts: BoardOptions, compile_dir: Path) -> tuple[list[FileRecord], dict, dict]:
    """The RoPE and SiLU tables at the folder's root (FORMAT.md 5): (records, assumptions, table report)."""
    where = compile_dir / CONFIG
    records, report = [], {}
    assumptions = {"int4": opts.int4, "silu_table": opts.silu_table, "max_token": opts.max_token}
    trained = cfg.get("max_position_embeddings")
    if dims.head_dim != BOARD_HEAD_DIM:
        assumptions["rope_table"] = f"none: head_dim {dims.head_dim} is not the board's {BOARD_HEAD_DIM}"
        log.info(f"hardware: no RoPE table: head_dim is {dims.head_dim}, the board's RoPE unit rotates heads of {BOARD_HEAD_DIM}")
    else:
        assumptions["rope_table"] = opts.rope_table
        assumptions["rope_rotation"] = ROPE_ROTATIONS[dims.family.rope]
        name = rope_file_name(opts.max_token)
        writer = HashingWriter(stage, name, f"RoPE cos/sin, {opts.rope_table}", dtype="float16", rows=opts.max_token, words_per_row=BOARD_HEAD_DIM // 2)
        for piece in rope_table_blocks(cfg, opts.max_token, opts.rope_table, where):  # a few MB at a time, whatever --max_token
            writer.write(piece)
        records.append(writer.close())
        theta, scaling = rope_parameters(cfg, where)
        report["rope"] = {"file": name, "theta": theta, "scaling": scaling["rope_type"], "positions": opts.max_token}
        if isinstance(trained, int) and trained < opts.max_token:
            log.info(f"hardware: the model was trained on {trained} positions; the RoPE table covers the board's {opts.max_token}")
    fit_range = read_gate_range(compile_dir, dims.num_layers) if opts.silu_table == "fit" else None
    silu = silu_table(opts.silu_table, fit_range)
    error, at = silu.error(*DEFAULT_FIT_RANGE)
    report["silu"] = {"file": ACT_FILE, "table": opts.silu_table, "max_error_on_-16_16": error, "at": at}
    if fit_range:
        report["silu"]["fit_range"] = list(fit_range)
        report["silu"]["max_error_on_fit_range"], report["silu"]["at_on_fit_range"] = silu.error(*fit_range)
    records.append(write_whole_file(stage, ACT_FILE, silu.pack(), f"SiLU table, {opts.silu_table}", dtype="uint8", rows=1, words_per_row=ACT_FILE_BYTES // 4))
    return records, assumptions, report


def read_gate_range(compile_dir: Path, num_layers: int | None = None) -> tuple[float, float]:
    """The range the model's gate outputs take, from the statistics compile_sw copied (strictly
    read: a damaged record is one error naming the file and key), else [-16, 16]."""
    stats = read_activation_stats(compile_dir, num_layers)
    if stats and stats.get("gate_range"):
        lo, hi = stats["gate_range"]
        return float(lo), float(hi)
    log.info(f"hardware: no gate statistics in {compile_dir}: the SiLU fit covers [-16, 16]")
    return DEFAULT_FIT_RANGE


def pack_hardware(compile_dir: Path, out: Path | None = None, ports: int = BOARD_PORTS, progress: bool = True, force: bool = False,
                  opts: BoardOptions | None = None, ahead: PackedAhead | None = None) -> StepResult:
    """`ahead`: linears packed during GPTQ (PackedAhead), taken where they are what this run packs;
    None: those compile_sw.py packed as it wrote them (the compile folder's packed_ahead/), if any."""
    start = time.perf_counter()
    opts = opts or BoardOptions(ports=ports)
    ports = opts.ports
    compile_dir = Path(compile_dir)
    if not compile_dir.is_dir():
        raise VCUError(f"{compile_dir}: no such compile folder (run compile_sw.py first)")
    opts.check()
    sources = recorded_sources(compile_dir)
    lm = sources.get("lm_head")
    code, int4_from = hardware_code(compile_dir, opts.int4, (lm["method"], lm["int4_range"]) if lm else None)  # refused before any work
    opts = replace(opts, int4=code)
    dims = read_model_dims(compile_dir / CONFIG)
    opts = opts.for_model(dims)
    cfg = read_model_config(compile_dir / CONFIG)
    for what, chin in (("hidden_size", dims.hidden), ("intermediate_size", dims.intermediate), ("q dim", dims.q_dim)):
        if chin % GROUP_SIZE:
            raise VCUError(f"{compile_dir / CONFIG}: {what}={chin} is not a multiple of {GROUP_SIZE}, which the board needs")
    if dims.head_dim == BOARD_HEAD_DIM:
        rope_parameters(cfg, compile_dir / CONFIG)  # a scaling the table cannot hold is refused before writing
    rescale = RescalePlan.from_record(cfg.get(RESCALE_KEY), compile_dir / CONFIG, RESCALE_KEY, dims.num_layers)  # strictly, before any work
    layers, norms, out_layer = plan(compile_dir, dims)
    warn(stale_compile(compile_dir))
    out = Path(out) if out else default_hardware_dir(compile_dir, ports)
    made_from = {**compile_ids(compile_dir), "ports": ports, **asdict(opts)}
    manifest = Manifest(HARDWARE_KIND, dims.to_json(), {"ports": ports, "group_size": GROUP_SIZE, "made_from": made_from,
                                                        **sources})
    # What it reads (a new folder inside the compile folder is fine; one holding these is not) and
    # the names it knows it writes (a file of someone else's there is refused before any work).
    inputs = [compile_dir, *(compile_dir / sub for sub in sw_dirs(dims.family.software)), compile_dir / CONFIG]
    tables = [ACT_FILE, MANIFEST_NAME] + ([rope_file_name(opts.max_token)] if dims.head_dim == BOARD_HEAD_DIM else [])
    jobs = [job for layer in layers for job in layer] + [out_layer]
    if ahead is None:  # what compile_sw.py packed as it wrote the ints (none: an empty list)
        ahead = PackedAhead.load(compile_dir / PACKED_AHEAD_DIR) or PackedAhead(compile_dir / PACKED_AHEAD_DIR, ports, opts.int4)
    found = ahead.adoptable(jobs, ports, opts.int4, out)
    need = output_bytes(dims, ports, opts.max_token) - sum(disk_bytes(r.bytes) for records in found.values() for r in records)
    with staged_dir(out, STEP, hardware_owns, inputs, force, need, writes=tables) as stage, ahead.taken(found, stage) as adopted:
        rest = [i for i in range(len(jobs)) if i not in adopted]
        with bar(None, "hardware", "layer", len(layers), progress) as shown:
            left = [len(layer) for layer in layers]  # a layer is shown once its last linear is written

            def written(i: int) -> None:  # job i of `jobs`
                layer = i // len(LINEARS)
                if layer < len(left):
                    left[layer] -= 1
                    if left[layer] == 0:
                        shown.update(1)

            for i in adopted:
                written(i)
            packed = dict(zip(rest, pack_jobs([jobs[i] for i in rest], stage, ports, opts.int4, done=lambda k: written(rest[k])), strict=True))
        for i in range(len(jobs)):
            manifest.files += adopted[i] if i in adopted else packed[i]
        for src, rel in norms:
            weights = src.read()
            check_finite(str(src.path), weights)
            manifest.files += [write_whole_file(stage, rel, weights, src.path.name, dtype="float16", rows=1, words_per_row=dims.hidden)]
        records, assumptions, tables = write_tables(stage, cfg, dims, opts, compile_dir)
        manifest.files += records
        # compile_sw applied it to the scales and embedding rows: record it
        assumptions["fp16_rescale"] = rescale.describe() if rescale else "none"
        manifest.params.update(assumptions=assumptions, tables=tables, fp16_rescale=rescale_entry(rescale))
        for f in manifest.files:
            f.step = STEP
        manifest.write(stage)
        kept, rehomed = keep_embedding_entries(out, stage)
    ahead.settle([jobs[i].name for i in adopted])
    if rehomed:
        log.info(f"hardware: kept {out / EMBEDDING_DIR}: the {kept} files embedding_tokens.py wrote there first (their entries "
                 f"moved from {EMBEDDING_RECORD} into {MANIFEST_NAME})")
    files, nbytes = len(manifest.files), sum(f.bytes for f in manifest.files)
    note = f"{MANIFEST_NAME} lists them" + (f"; {EMBEDDING_DIR}/'s {kept} files kept" if kept else "")
    result = StepResult("hardware", out, files, nbytes, time.perf_counter() - start, note=note)
    result.details = {"assumptions": assumptions, "tables": tables, "int4_from": int4_from, "packed_ahead": len(adopted)}
    return result


def rescale_entry(plan: RescalePlan | None) -> dict | None:
    """The manifest's fp16_rescale: the factors, and the board-model variants k was weighed under."""
    if plan is None:
        return None
    weighed = (plan.k_choice or {}).get("with_k", {}).get("variants") if isinstance(plan.k_choice, dict) else None
    return {**plan.factors_record(), **({"weighed_under": weighed} if isinstance(weighed, list) else {})}


def recorded_sources(compile_dir: Path) -> dict:
    """What the manifest names as its sources: the checkpoint (and the model it was quantized from,
    where quantize recorded it), and how lm_head.py made the output layer (verify makes it again)."""
    out = {}
    cs, lm = read_step_record(compile_dir, "compile_sw"), read_step_record(compile_dir, "lm_head")
    made = (cs or {}).get("made_from") if isinstance((cs or {}).get("made_from"), dict) else {}
    source = {key: made[key] for key in ("checkpoint", "model") if isinstance(made.get(key), str)}
    if source:
        out["source"] = source
    made = (lm or {}).get("made_from") if isinstance((lm or {}).get("made_from"), dict) else {}
    if made.get("method") in ("trunc", "rtn", "checkpoint"):
        out["lm_head"] = {"method": made["method"], "int4_range": made.get("int4_range", 8)}
    return out


def keep_embedding_entries(old: Path, stage: Path) -> tuple[int, bool]:
    """A re-run keeps embedding_tokens' parts (they are carried into the new folder): keep their
    manifest entries too. Parts embedding_tokens wrote before there was a packed folder are listed in
    Embedding/manifest.json: their entries move into the packed folder's manifest, where
    embedding_tokens puts them when it runs second. Returns (parts kept, whether they moved)."""
    if hardware_owns(old) is None:
        return 0, False
    doc, rehomed = read_manifest(old), False
    if doc is None:  # embedding_tokens ran first (hardware_owns: nothing else is there)
        doc, rehomed = read_manifest(old / EMBEDDING_DIR, kinds=(EMBEDDING_KIND,)), True
        doc["files"] = [{**f, "path": f"{EMBEDDING_DIR}/{f['path']}"} for f in doc["files"]]
    kept = [f for f in doc["files"] if f.get("step") == EMBEDDING_STEP and (old / f["path"]).is_file()]
    if not kept:
        return 0, False
    new = read_manifest(stage, kinds=(HARDWARE_KIND,))
    new["files"] += kept
    new["embedding_parts"] = doc.get("embedding_parts")
    replace_file_atomically(stage / MANIFEST_NAME, dumps(new).encode())
    return len(kept), rehomed


def format_assumptions(details: dict) -> str:
    """hardware.py's summary of what the folder assumes about the board."""
    a, t = details["assumptions"], details["tables"]
    silu = t["silu"]
    lines = ["assumptions (recorded in manifest.json; docs/FORMAT.md 5 gives the evidence):",
             f"  RoPE table: {a['rope_table']}" + (f", {t['rope']['positions']} positions, theta {t['rope']['theta']:g}, scaling {t['rope']['scaling']}" if "rope" in t else ""),
             f"  SiLU table: {a['silu_table']}, largest error {silu['max_error_on_-16_16']:.4f} on [-16, 16] (at x = {silu['at']:.3f})"
             + (f"; {silu['max_error_on_fit_range']:.4f} on the fitted range [{silu['fit_range'][0]:.2f}, {silu['fit_range'][1]:.2f}]" if "fit_range" in silu else ""),
             f"  int4 code: {a['int4']}" + (f" ({details['int4_from']})" if details.get("int4_from") else ""),
             f"  fp16 rescaling: {a.get('fp16_rescale', 'none')}"]
    return "\n".join(lines)
