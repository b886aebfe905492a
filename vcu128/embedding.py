"""Step 5: the fp16 embedding table cut into K equal parts in row order (FORMAT.md 3.4)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .formats import (
    CONFIG,
    EMBEDDING_DIR,
    BinFile,
    check_embedding_split,
    embedding_part_file,
    sw_fp16_path,
)
from .model import EMBEDDING, read_model_dims
from .output import (
    MANIFEST_NAME,
    Manifest,
    StepResult,
    folder_stats,
    replace_file_atomically,
    staged_dir,
    write_whole_file,
)
from .pack import default_hardware_dir
from .progress import bar


def split_embedding(compile_dir: Path, out: Path | None = None, parts: int = 16, progress: bool = True) -> StepResult:
    """Write the parts into `out` (default <compile>/QWEN_BLOCK_write_data_port32/Embedding). When `out`
    sits in a hardware folder, its manifest.json gets the parts' entries; otherwise `out` gets its own."""
    start = time.perf_counter()
    compile_dir = Path(compile_dir)
    dims = read_model_dims(compile_dir / CONFIG)
    rows = check_embedding_split(dims.vocab, parts)
    table = BinFile(sw_fp16_path(compile_dir, EMBEDDING), "<f2", (dims.vocab, dims.hidden))
    out = Path(out) if out else default_hardware_dir(compile_dir, 32) / EMBEDDING_DIR
    records = []
    with staged_dir(out) as stage:
        for i in bar(range(parts), "embedding", "part", enabled=progress):
            part = table.read_rows(i * rows, (i + 1) * rows)
            rel = embedding_part_file(i + 1, parts)
            records.append(write_whole_file(stage, rel, part, f"{EMBEDDING}[{i * rows}:{(i + 1) * rows}]", dtype="float16", rows=rows, words_per_row=dims.hidden // 2))
    parent_manifest = out.parent / MANIFEST_NAME
    if parent_manifest.is_file():
        # Entries are relative to the hardware folder: replace this folder's entries there.
        doc = json.loads(parent_manifest.read_text())
        prefix = f"{out.name}/"
        doc["files"] = [f for f in doc["files"] if not f["path"].startswith(prefix)]
        for r in records:
            r.path = prefix + r.path
        doc["files"] += [r.to_json() for r in records]
        doc["embedding_parts"] = parts
        replace_file_atomically(parent_manifest, (json.dumps(doc, indent=1) + "\n").encode())
    else:
        Manifest("embedding", dims.to_json(), {"embedding_parts": parts}, records).write(out)
    files, nbytes = folder_stats([out])
    return StepResult("embedding", out, files, nbytes, time.perf_counter() - start)
