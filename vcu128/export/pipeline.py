"""The export steps chained, each handing its folder to the next (what quantize.py --compile runs)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

from vcu128.export.compile_sw import QweightPrewriter, compile_software
from vcu128.export.embedding_tokens import split_embedding
from vcu128.export.hardware import format_assumptions, pack_hardware
from vcu128.export.lm_head import quantize_lm_head
from vcu128.format.layout import BOARD_EMBEDDING_PARTS, BOARD_PORTS, EMBEDDING_DIR

log = logging.getLogger("vcu128")


@contextlib.contextmanager
def compiling_during_gptq(checkpoint: Path, model: Path) -> Iterator[QweightPrewriter]:
    """quantize.py --compile: a consumer for quantize_model's `on_layer` that writes compile_sw's
    qweight.bin files (27 GB of a 7B's 31) while GPTQ quantizes the next layer; export_all's
    `qweights_from=prewriter.written()` adopts them. Its folder is gone when the block ends, whatever
    happened in it."""
    prewriter = QweightPrewriter(checkpoint, model)
    try:
        yield prewriter
    finally:
        prewriter.remove()


def export_all(qdir: Path, lm_head_method: str | None = None, ports: int = BOARD_PORTS, parts: int = BOARD_EMBEDDING_PARTS, progress: bool = True,
               fp16_rescale: str = "auto", qweights_from: Path | None = None) -> dict:
    """compile_sw -> lm_head -> hardware -> embedding_tokens; returns the folders. `qweights_from`:
    compile_sw's qweight.bin files written during GPTQ (compiling_during_gptq)."""
    qdir = Path(qdir)
    compile_dir = qdir / "compile"
    log.info(compile_software(qdir, compile_dir, progress=progress, fp16_rescale=fp16_rescale, qweights_from=qweights_from).line())
    result, method, error = quantize_lm_head(qdir, compile_dir, lm_head_method, progress=progress)
    if error is not None:
        log.info(f"lm_head ({method}): relative error ||W - W_hat|| / ||W|| = {error:.5f}")
    log.info(result.line())
    hw = pack_hardware(compile_dir, None, ports, progress=progress)  # the int4 code: as quantize.py recorded it
    log.info(format_assumptions(hw.details))
    log.info(hw.line())
    log.info(split_embedding(compile_dir, hw.out / EMBEDDING_DIR, parts, progress=progress).line())
    return {"qdir": qdir, "compile": compile_dir, "hw": hw.out}
