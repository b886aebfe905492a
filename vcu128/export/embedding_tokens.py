"""Step 5: the fp16 embedding table cut into K equal parts in row order (FORMAT.md 3.4)."""

from __future__ import annotations

import time
from pathlib import Path

from vcu128.format.checkpoint import check_finite
from vcu128.format.folder import (
    EMBEDDING_KIND,
    HARDWARE_KIND,
    MANIFEST_NAME,
    Manifest,
    PackedFolder,
    default_hardware_dir,
    embedding_folder_owned,
    packed_folders_in,
    read_manifest,
)
from vcu128.format.gate import read_model_dims
from vcu128.format.layout import (
    BOARD_EMBEDDING_PARTS,
    CONFIG,
    EMBEDDING_DIR,
    BinFile,
    check_embedding_split,
    embedding_part_file,
    sw_fp16_path,
)
from vcu128.format.model import EMBEDDING
from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import dumps
from vcu128.io.output import (
    StepResult,
    folder_lock,
    out_path,
    replace_file_atomically,
    staged_dir,
    write_whole_file,
)
from vcu128.io.parallel import ordered_map
from vcu128.io.progress import bar
from vcu128.io.provenance import compile_ids, warn

STEP = "embedding_tokens"


def embedding_owns(folder: Path) -> set[str] | None:
    """The parts embedding_tokens wrote: listed in the packed folder's manifest (the usual place)
    or in the folder's own manifest (an --out outside a packed folder)."""
    return embedding_folder_owned(folder, STEP)


def split_embedding(compile_dir: Path, out: Path | None = None, parts: int = BOARD_EMBEDDING_PARTS, progress: bool = True, force: bool = False) -> StepResult:
    """Write the parts into `out` (default <compile>/QWEN_BLOCK_write_data_port32/Embedding). When `out`
    sits in a hardware folder, its manifest.json gets the parts' entries; otherwise `out` gets its own."""
    start = time.perf_counter()
    compile_dir = Path(compile_dir)
    if not compile_dir.is_dir():
        raise VCUError(f"{compile_dir}: no such compile folder (run compile_sw.py first)")
    dims = read_model_dims(compile_dir / CONFIG)
    rows = check_embedding_split(dims.vocab, parts)
    table = BinFile(sw_fp16_path(compile_dir, EMBEDDING, dims.family.software), "<f2", (dims.vocab, dims.hidden))
    given = out if out else default_embedding_dir(compile_dir)
    out = out_path(given)  # its folder with symlinks resolved: where the packed folder's manifest is
    made_from = compile_ids(compile_dir)["compile_sw"]
    parent_manifest = read_manifest(out.parent)
    in_packed_folder = parent_manifest is not None and parent_manifest["kind"] == HARDWARE_KIND
    if in_packed_folder:
        made = PackedFolder.open(out.parent).made_from.get("compile_sw")
        if made and made_from and made != made_from:
            warn([f"{out.parent} was packed from an earlier compile_sw run than the one in {compile_dir} (re-run hardware.py)"])
    records = []
    inputs = [compile_dir, table.path, compile_dir / CONFIG]
    with staged_dir(given, STEP, embedding_owns, inputs, force, 2 * dims.vocab * dims.hidden) as stage:
        def write_part(i: int):
            part = table.read_rows(i * rows, (i + 1) * rows)
            check_finite(str(table.path), part, first_row=i * rows)
            rel = embedding_part_file(i + 1, parts)
            return write_whole_file(stage, rel, part, f"{EMBEDDING}[{i * rows}:{(i + 1) * rows}]", dtype="float16", rows=rows, words_per_row=dims.hidden // 2)

        # The parts are read, checked and written side by side (the disk serves two at once faster);
        # their records come back in order
        for record in bar(ordered_map(write_part, range(parts)), "embedding", "part", parts, enabled=progress):
            records.append(record)
        for r in records:
            r.step, r.made_from = STEP, made_from
        if not in_packed_folder:
            Manifest(EMBEDDING_KIND, dims.to_json(), {"embedding_parts": parts}, records).write(stage)
    if in_packed_folder:
        # Entries are relative to the packed folder: replace this folder's entries there.
        with folder_lock(out.parent):
            doc = read_manifest(out.parent)
            prefix = f"{out.name}/"
            doc["files"] = [f for f in doc["files"] if not f["path"].startswith(prefix)]
            for r in records:
                r.path = prefix + r.path
            doc["files"] += [r.to_json() for r in records]
            doc["embedding_parts"] = parts
            replace_file_atomically(out.parent / MANIFEST_NAME, dumps(doc).encode())
    note = f"{out.parent.name}/{MANIFEST_NAME} lists them" if in_packed_folder else f"{MANIFEST_NAME} beside them lists them"
    return StepResult("embedding", out, len(records), sum(r.bytes for r in records), time.perf_counter() - start, note=note)


def default_embedding_dir(compile_dir: Path) -> Path:
    """Where the parts go without --out: into the packed folder hardware.py wrote in the compile folder
    (found by its manifest, whatever its --ports or --out there); with none yet, where the default
    packed folder goes (hardware.py keeps them when it runs later). Of several packed folders, the one
    made from the compile folder's present compile_sw run; more than one such: refused, naming them."""
    found = packed_folders_in(compile_dir)
    if len(found) > 1:
        current = compile_ids(compile_dir)["compile_sw"]
        fresh = [p for p in found if current and PackedFolder.open(p).made_from.get("compile_sw") == current]
        if len(fresh) != 1:
            names = ", ".join(p.name for p in (fresh or found))
            raise VCUError(f"{compile_dir} holds {len(fresh or found)} packed folders made from it ({names}): which one gets the "
                           f"embedding parts is not clear; pass --out {found[0]}/{EMBEDDING_DIR} (or the other's)")
        found = fresh
    return (found[0] if found else default_hardware_dir(compile_dir)) / EMBEDDING_DIR
