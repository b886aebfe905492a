"""What each output was made from, and one `warning:` line when an input has changed since.

compile_sw.json and lm_head.json (in the compile folder) record the checkpoint's fingerprint;
manifest.json records the ids of the compile_sw and lm_head runs the packed folder (and, per
file, its embedding parts) came from. A re-run of an earlier step leaves the later outputs in
place; the next step and verify.py then say which of them are stale. Warnings never change an
exit code: the bit check is what decides.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vcu128.io.output import read_step_record

log = logging.getLogger("vcu128")


def compile_ids(compile_dir: Path) -> dict:
    """{'compile_sw': id or None, 'lm_head': id or None} of a compile folder."""
    return {step: (doc or {}).get("id") for step in ("compile_sw", "lm_head") for doc in [read_step_record(compile_dir, step)]}


def stale_compile(compile_dir: Path, fingerprint: str | None = None) -> list[str]:
    """Warnings for a compile folder: lm_head files from another checkpoint than the rest, or the
    whole folder from another (or since-changed) checkpoint than `fingerprint`."""
    out = []
    cs, lm = read_step_record(compile_dir, "compile_sw"), read_step_record(compile_dir, "lm_head")
    cs_fp = (cs or {}).get("made_from", {}).get("fingerprint")
    lm_fp = (lm or {}).get("made_from", {}).get("fingerprint")
    if cs_fp and lm_fp and cs_fp != lm_fp:
        out.append(f"{compile_dir}: lm_head_*.bin were made from another checkpoint than the rest of the folder (re-run lm_head.py)")
    if fingerprint and cs_fp and cs_fp != fingerprint:
        out.append(f"{compile_dir}: made from another checkpoint, or the checkpoint changed since (re-run compile_sw.py)")
    elif fingerprint and lm_fp and lm_fp != fingerprint and not cs_fp:
        out.append(f"{compile_dir}: lm_head_*.bin were made from another checkpoint (re-run lm_head.py)")
    return out


def stale_hardware(manifest: dict, compile_dir: Path) -> list[str]:
    """Warnings for a packed folder made from an earlier compile_sw / lm_head run."""
    out = []
    now = compile_ids(compile_dir)
    made = manifest.get("made_from") or {}
    for step in ("compile_sw", "lm_head"):
        if made.get(step) and now[step] and made[step] != now[step]:
            out.append(f"the packed folder was made from an earlier {step} run than the one in {compile_dir} (re-run hardware.py)")
    emb = {f.get("made_from") for f in manifest.get("files", []) if f.get("step") == "embedding_tokens"} - {None}
    if now["compile_sw"] and emb and emb != {now["compile_sw"]}:
        out.append(f"Embedding/ was made from an earlier compile_sw run than the one in {compile_dir} (re-run embedding_tokens.py)")
    return out


def warn(lines: list[str]) -> None:
    for line in lines:
        log.warning(f"warning: {line}")
