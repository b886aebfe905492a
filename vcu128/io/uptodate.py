"""Is a step's output up to date with its inputs? main.sh asks before each step, and records after it.

    python -m vcu128.io.uptodate check  STAMP --in PATH... --out PATH... [--made PATH...] -- COMMAND...
    python -m vcu128.io.uptodate record STAMP --in PATH... --out PATH... [--made PATH...] -- COMMAND...

A stamp (a small JSON file, written by main.sh after the step succeeded) holds the command line and
a fingerprint of each input and output. `check` exits 0 when the stamp says the same command ran on
the same inputs and every output is still there, unchanged (a `--made` output, which a later step
adds to, only has to be there); else 1, printing why on one line. The command line carries every
option, so a changed setting re-runs the step; a re-run step changes its record file, which is the
next step's input, so the steps after it run again too.

A fingerprint names a path as it is now without reading gigabytes: every file under it (sorted, by
its path relative to it), JSON files and files up to 64 KiB (configs, records, manifests, tokenizers)
by their content, the others (weights, packed files) by size and modification time.

Standard library only: main.sh runs this between steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

SMALL = 1 << 16
VERSION = 1


def fingerprint(path: str | os.PathLike, exclude: tuple[str, ...] = ()) -> str | None:
    """sha256 (16 hex digits) of a file or a folder as it is now; None when it does not exist.
    `exclude`: names of files or folders directly under a folder to leave out."""
    path = Path(path)
    if not path.exists():
        return None
    sha = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] not in exclude)
    for f in files:
        st = f.stat()
        rel = "." if f == path else f.relative_to(path).as_posix()
        sha.update(f"{rel}\0{st.st_size}\0".encode())
        if st.st_size <= SMALL or f.suffix == ".json":
            sha.update(f.read_bytes())
        else:
            sha.update(f"{st.st_mtime_ns}".encode())
        sha.update(b"\0")
    return sha.hexdigest()[:16]


def _split(spec: str) -> tuple[str, tuple[str, ...]]:
    """`PATH` or `PATH:!name,name` (names directly under the folder PATH to leave out)."""
    if ":!" in spec:
        path, names = spec.split(":!", 1)
        return path, tuple(n for n in names.split(",") if n)
    return spec, ()


def _fingerprints(specs: list[str]) -> dict:
    return {spec: fingerprint(*_split(spec)) for spec in specs}


def why_not_up_to_date(stamp: Path, command: list[str], inputs: list[str], outputs: list[str], made: list[str]) -> str | None:
    """None when up to date, else the reason (one line)."""
    try:
        doc = json.loads(Path(stamp).read_text())
    except (OSError, ValueError):
        return "no record of an earlier run"
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        return "no record of an earlier run"
    if doc.get("command") != command:
        return "the command line changed"
    for spec, fp in _fingerprints(inputs).items():
        if fp is None:
            return f"input {_split(spec)[0]} is missing"
        if doc.get("inputs", {}).get(spec) != fp:
            return f"input {_split(spec)[0]} changed"
    for spec, fp in _fingerprints(outputs).items():
        if fp is None:
            return f"output {_split(spec)[0]} is missing"
        if doc.get("outputs", {}).get(spec) != fp:
            return f"output {_split(spec)[0]} changed since"
    for spec in made:
        if not Path(_split(spec)[0]).exists():
            return f"output {_split(spec)[0]} is missing"
    return None


def record(stamp: Path, command: list[str], inputs: list[str], outputs: list[str], made: list[str]) -> None:
    doc = {"version": VERSION, "command": command, "inputs": _fingerprints(inputs), "outputs": _fingerprints(outputs), "made": made}
    stamp = Path(stamp)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, stamp)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: python -m vcu128.io.uptodate check|record STAMP --in PATH... --out PATH... [--made PATH...] -- COMMAND...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m vcu128.io.uptodate")
    p.add_argument("action", choices=("check", "record"))
    p.add_argument("stamp")
    p.add_argument("--in", dest="inputs", nargs="*", default=[])
    p.add_argument("--out", dest="outputs", nargs="*", default=[])
    p.add_argument("--made", nargs="*", default=[])
    args = p.parse_args(argv[:cut])
    command = argv[cut + 1 :]
    if args.action == "record":
        record(args.stamp, command, args.inputs, args.outputs, args.made)
        return 0
    why = why_not_up_to_date(args.stamp, command, args.inputs, args.outputs, args.made)
    if why:
        print(why)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
