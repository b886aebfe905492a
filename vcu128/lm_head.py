"""Step 3: the output layer to int4 + fp16 scales (FORMAT.md 2, "lm_head quantization").

Methods: `rtn` (default) and `trunc` quantize the float lm_head (or the tied embedding) group by
group; `checkpoint` takes the lm_head GPTQ already quantized (quantize.py --lm_head).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from .checkpoint import GPTQCheckpoint
from .direct_io import DirectWriter
from .errors import VCUError
from .formats import SW_QWEIGHT_DIR, sw_lm_head_paths
from .output import StepResult
from .parallel import ordered_map, rows_per_block
from .progress import bar
from .quant import METHODS, dequantize_rows, quantize_rows, squared_error

log = logging.getLogger("vcu128")

ALL_METHODS = (*METHODS, "checkpoint")


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


def quantize_lm_head(qdir: Path, out: Path | None = None, method: str | None = None, progress: bool = True):
    """Write lm_head_qweight.bin and lm_head_scales.bin into out/qwen2_qweight_bin.
    Returns (StepResult, method, relative error ||W - W_hat|| / ||W||, None for `checkpoint`)."""
    start = time.perf_counter()
    ckpt = GPTQCheckpoint(qdir)
    method = choose_method(ckpt, method)
    if method == "checkpoint":
        ckpt.quant.check_supported(str(ckpt.qdir))
    ckpt.validate_lm_head()
    dims = ckpt.dims
    source = ckpt.lm_head_source()
    if source == "model.embed_tokens.weight":
        log.info("lm_head: no lm_head.weight in the checkpoint (tied embeddings): quantizing model.embed_tokens.weight")
    out = Path(out) if out else ckpt.qdir / "compile"
    (out / SW_QWEIGHT_DIR).mkdir(parents=True, exist_ok=True)
    final = sw_lm_head_paths(out)
    partial = {k: p.with_name(f".{p.name}.partial-{os.getpid()}") for k, p in final.items()}
    if method == "checkpoint":  # GPTQ layout [hidden/8, vocab] and [hidden/128, vocab]: half a byte a weight
        gptq_qweight, gptq_scales = ckpt.get("lm_head.qweight"), ckpt.get("lm_head.scales")

    def quantize_block(rows: slice):
        """(int32 q, fp16 scales, squared error, squared norm) of a block of output rows."""
        if method == "checkpoint":
            q = ckpt.signed_weights(gptq_qweight[:, rows], np.dtype("<i4"))
            return q, np.ascontiguousarray(gptq_scales[:, rows].T), 0.0, 0.0
        w = ckpt.get(source, rows=rows).astype(np.float32, copy=False)
        q, scales = quantize_rows(w, method)
        return q.astype("<i4"), scales, *squared_error(w, dequantize_rows(q, scales))

    step = rows_per_block(4 * dims.hidden)
    blocks = [slice(r, min(r + step, dims.vocab)) for r in range(0, dims.vocab, step)]
    err = ref = 0.0
    try:
        with DirectWriter(partial["qweight"], background=True) as fq, DirectWriter(partial["scales"], 1 << 20) as fs:
            for q, scales, e, n in bar(ordered_map(quantize_block, blocks), f"lm_head ({method})", "block", len(blocks), progress):
                fq.write(q)
                fs.write(scales.astype("<f2"))
                err, ref = err + e, ref + n
        for k in final:
            os.replace(partial[k], final[k])
    finally:
        for p in partial.values():
            p.unlink(missing_ok=True)
    error = None if method == "checkpoint" else (err / ref) ** 0.5 if ref else 0.0
    nbytes = sum(p.stat().st_size for p in final.values())
    return StepResult("lm_head", out / SW_QWEIGHT_DIR, 2, nbytes, time.perf_counter() - start), method, error
