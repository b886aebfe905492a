#!/usr/bin/env python3
"""sha256 of every file the export steps write, for two synthetic models, and the stderr of a set of
refusals: run it before and after a refactor and diff the two outputs (no byte, message or exit code
may move). Runs the step scripts as a user does, so it does not depend on the package's layout.

    python scripts/output_fingerprint.py > before.txt   # ... refactor ...
    python scripts/output_fingerprint.py > after.txt && diff before.txt after.txt
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:  # the package's layout changes under this script; the synthetic writer is found either way
    from vcu128.format.synthetic import SyntheticSpec, write_gptq_checkpoint
except ImportError:
    from vcu128.synthetic import SyntheticSpec, write_gptq_checkpoint

MODELS = {
    "qwen": dict(hidden=896, intermediate=2432, num_layers=2, num_heads=14, num_kv_heads=2, vocab=1056, seed=1),
    "llama_tied": dict(hidden=256, intermediate=384, num_layers=2, num_heads=4, num_kv_heads=2, vocab=256, seed=2,
                       tie_word_embeddings=True, biased=(), model_type="llama"),
}


def run(args: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    return p.returncode, p.stderr


def normalise(text: str, tmp: Path) -> str:
    """Drop the run-dependent parts of a message: the temporary folder and timings."""
    import re

    text = text.replace(str(tmp), "<tmp>")
    text = re.sub(r"\d+\.\d+ s\b", "<s>", text)
    text = re.sub(r"\d+(\.\d+)? (GB|MB|kB)/s", "<rate>", text)
    return text


def sha256_of(path: Path, block: int = 16 << 20) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            sha.update(chunk)
    return sha.hexdigest()


def file_hashes(folder: Path, skip=("manifest.json", "compile_sw.json", "lm_head.json", "verify_report.json")) -> list[str]:
    """`sha256  path` of every file under `folder` but `skip`, in path order; hashed on threads
    (hashlib and reads release the GIL), so a 40 GB folder takes seconds on a many-core machine."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return [f"{sha}  {p.relative_to(folder)}" for sha, p in zip(pool.map(sha256_of, paths), paths)]


def main() -> int:
    out = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for name, spec in MODELS.items():
            qdir = write_gptq_checkpoint(tmp / name, SyntheticSpec(**spec))
            steps = [
                ["compile_sw.py", "--quantize_model", str(qdir)],
                ["lm_head.py", "--quantize_model", str(qdir), "--method", "trunc"],
                ["hardware.py", "--compile_dir", str(qdir / "compile")],
                ["embedding_tokens.py", "--compile_dir", str(qdir / "compile")],
                ["verify.py", "--quantize_model", str(qdir), "--hardware_dir", str(qdir / "compile" / "QWEN_BLOCK_write_data_port32"),
                 "--bits_only"],
            ]
            for args in steps:
                rc, err = run([str(ROOT / args[0]), *args[1:]], ROOT)
                out.append(f"## {name}: {args[0]} exit {rc}")
                if rc:
                    out.append(normalise(err, tmp))
            out += [f"# {name}"] + file_hashes(qdir / "compile")
            refusals = [
                ["embedding_tokens.py", "--compile_dir", str(qdir / "compile"), "--parts", "7"],
                ["hardware.py", "--compile_dir", str(tmp / "nowhere")],
                ["compile_sw.py", "--quantize_model", str(qdir), "--out", str(qdir)],
                ["verify.py", "--quantize_model", str(qdir), "--hardware_dir", str(tmp / "nowhere")],
            ]
            for args in refusals:
                rc, err = run([str(ROOT / args[0]), *args[1:]], ROOT)
                out.append(f"## refusal {args[0]} {' '.join(a for a in args[1:] if not a.startswith('/'))}: exit {rc}")
                out.append(normalise(err, tmp).strip())
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
