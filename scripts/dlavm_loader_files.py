"""Regenerate tests/data/dlavm_loader_{chatglm,qwen2}_2L.json from a dlavm-llm-public checkout.

dlavm-llm-public (github.com/gdhzyz/dlavm-llm-public) is the board's public compiler. Its
`script/main.py --model M --wt2hbm` prints the host loader (a C++ header) that opens every weight
file of the board's folder with `sprintf(real_path, "%s/<root>/<relpath>", prefix[, port])` and
`DDR_Write_bin(h2cx, real_path, addr, BYTES)`, which reads exactly BYTES bytes. This script runs
that generator and keeps the (relpath, bytes) list, relpath relative to the folder root (the
generator's `--prefix`, default `BLOCK_write_data`), which is the folder our hardware step writes.

    python scripts/dlavm_loader_files.py /path/to/dlavm-llm-public [--out tests/data]

What runs is dlavm's own code, unmodified, under this interpreter (it needs only numpy), with two
additions, both outside its files:
- its C helper `dlavm/clib/mod.so` is built with its own Makefile (`make -C dlavm/clib`) when
  missing, because `dlavm/clib/ffi.py` loads it at import; the build writes mod.so into the checkout.
- the block count: `dlavm/llm/{chatglm,qwen2}.py` hard-code `block_size = 1 if debug else 28`, so
  for 2 layers the model module's `range` is shadowed for its `for n in range(block_size)` loop
  (it refuses any other call). The 28-layer run is made without it, and the script checks that the
  2-layer list is the 28-layer list restricted to BLOCK00 and BLOCK01 plus the shared files.

Each fixture is {"header": {...}, "files": [[relpath, bytes], ...]} sorted by relpath; the header
names the commit, command, date, device and dims, and the 28-layer count, bytes and sha256. It
also checks the DDR files' sizes against the dims dlavm hard-codes. Errors exit 2 with one line.
"""

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = "BLOCK_write_data"  # main.py's default --prefix
MAX_TOKEN = 2048  # EdgeLLM (HBM1128) default; passed explicitly as --maxtoken

# The dims dlavm/llm/<model>.py hard-codes; checked below against the byte counts it prints.
MODELS = {
    "chatglm": {"module": "dlavm.llm.chatglm", "hidden": 4096, "heads": 32, "kv_heads": 2,
                "head_dim": 128, "intermediate": 13696, "vocab": 65024, "source": "dlavm/llm/chatglm.py"},
    "qwen2": {"module": "dlavm.llm.qwen2", "hidden": 3584, "heads": 28, "kv_heads": 4,
              "head_dim": 128, "intermediate": 18944, "vocab": 152064, "source": "dlavm/llm/qwen2.py"},
}

# Runs in dlavm's script/ folder, as main.py expects (it appends ".." to sys.path).
DRIVER = """
import builtins, runpy, sys
sys.path.insert(0, "..")
sys.argv = {argv!r}
layers = {layers!r}
if layers is not None:
    import importlib
    module = importlib.import_module({module!r})
    def blocks(n, *rest):
        if rest or n != 28:
            raise SystemExit(f"unexpected range{{(n,) + rest}} in {module}")
        return builtins.range(layers)
    module.range = blocks
runpy.run_path("main.py", run_name="__main__")
"""

SINGLE = re.compile(r'char real_path\[100\];\s*sprintf\(real_path, "%s/([^"]+)", prefix\);\s*'
                    r'DDR_Write_bin\(h2cx, real_path, [^;]*, (\d+)\);')
PORTED = re.compile(r'for \(uint64_t port = 0; port < (\d+); port \+= 1\) \{\s*char real_path\[100\];\s*'
                    r'sprintf\(real_path, "%s/([^"]+)", prefix, port\);\s*'
                    r'DDR_Write_bin\(h2cx, real_path, [^;]*, (\d+)\);')


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def git_commit(checkout):
    top = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--show-toplevel", "HEAD"],
                         capture_output=True, text=True)
    lines = top.stdout.split()
    if top.returncode != 0 or Path(lines[0]).resolve() != checkout:
        fail(f"{checkout} is not the top of a git checkout (the fixtures name its commit)")
    return lines[1]


def ensure_clib(checkout):
    clib = checkout / "dlavm" / "clib"
    if not (clib / "mod.so").exists():
        build = subprocess.run(["make", "-C", str(clib)], capture_output=True, text=True)
        if build.returncode != 0:
            fail(f"building dlavm's C helper failed:\n{build.stderr[-2000:]}")


def generate(checkout, model, layers):
    """Run main.py and return (argv, device version it prints, header text). layers None: its own 28."""
    with tempfile.TemporaryDirectory() as save:
        argv = ["main.py", "--model", model, "--wt2hbm", "--maxtoken", str(MAX_TOKEN), "--save", save]
        code = DRIVER.format(argv=argv, layers=layers, module=MODELS[model]["module"])
        run = subprocess.run([sys.executable, "-c", code], cwd=checkout / "script", capture_output=True, text=True)
        if run.returncode != 0:
            fail(f"dlavm main.py failed for {model} ({layers} layers):\n{run.stderr[-3000:]}")
        headers = list(Path(save).glob("*.h"))
        if len(headers) != 1:
            fail(f"expected one header from main.py, got {headers}")
        version = re.search(r"Compiler target device version: (\d+)", run.stdout)
        if not version:
            fail("main.py did not print its device version")
        return argv, version.group(1), headers[0].read_text()


def loader_files(header):
    """The (relpath, bytes) pairs the loader reads, relpath under the folder root."""
    files = {}

    def add(path, size):
        if not path.startswith(ROOT + "/"):
            fail(f"loader path outside {ROOT}/: {path}")
        rel = path[len(ROOT) + 1:]
        if rel in files:
            fail(f"loader reads {rel} twice")
        files[rel] = int(size)

    for path, size in SINGLE.findall(header):
        add(path, size)
    for ports, path, size in PORTED.findall(header):
        for port in range(int(ports)):
            add(path % port, size)
    opened = header.count("sprintf(real_path")
    matched = len(SINGLE.findall(header)) + len(PORTED.findall(header))
    if opened != matched or header.count("DDR_Write_bin(") != opened:
        fail(f"parsed {matched} of {opened} loader reads; the header's form changed")
    return sorted(files.items())


def check_dims(files, dims):
    """The DDR files hold one 4-byte word per output channel: their sizes give the model's dims."""
    size = dict(files)
    expect = {
        "BLOCK00/LN_DDR_bin/LN0_wt_in_DDR.bin": 4 * dims["hidden"],
        "BLOCK00/MVM_BN_DDR_bin/MVMBN0_q_wt_and_bias_in_DDR.bin": 4 * dims["heads"] * dims["head_dim"],
        "BLOCK00/MVM_BN_DDR_bin/MVMBN0_k_wt_and_bias_in_DDR.bin": 4 * dims["kv_heads"] * dims["head_dim"],
        "BLOCK00/MVM_BN_DDR_bin/MVMBN1_wt_and_bias_in_DDR.bin": 4 * dims["intermediate"],
        "OutLayer/MVM_BN_DDR_bin/MVMBN_Argmax_wt_and_bias_in_DDR.bin": 4 * dims["vocab"],
    }
    for rel, want in expect.items():
        if size[rel] != want:
            fail(f"{rel} is {size[rel]} bytes, dims say {want}")


def restrict(files, layers):
    keep = {f"BLOCK{n:02d}/" for n in range(layers)}
    return [(rel, b) for rel, b in files if not rel.startswith("BLOCK") or rel[:8] in keep]


def digest(files):
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def fixture(checkout, commit, model, layers=2):
    argv, version, header = generate(checkout, model, layers)
    files = loader_files(header)
    _, _, full_header = generate(checkout, model, None)
    full = loader_files(full_header)
    if restrict(full, layers) != files:
        fail(f"{model}: the {layers}-layer list is not the 28-layer list's first blocks")
    dims = {k: v for k, v in MODELS[model].items() if k not in ("module", "source")}
    check_dims(files, dims)
    head = {
        "source": "https://github.com/gdhzyz/dlavm-llm-public",
        "commit": commit,
        "command": f"cd script && python {' '.join(argv[:-2])} (run by scripts/dlavm_loader_files.py)",
        "layers_stub": f"{MODELS[model]['source']} hard-codes 28 blocks; range() in {MODELS[model]['module']} "
                       f"shadowed to give {layers} (the 28-layer run is unpatched)",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "generator_device": f"dlavm.device.hbm_accel.EdgeLLM, version {version} (EdgeLLM = HBM1128 there)",
        "max_token": MAX_TOKEN,
        "root": ROOT,
        "loader_path": f'sprintf(real_path, "%s/{ROOT}/<relpath>", prefix) into char real_path[100]',
        "model": model,
        "dims": dims | {"layers": layers},
        "dims_source": MODELS[model]["source"],
        "files": len(files),
        "bytes": sum(b for _, b in files),
        "files_28_layers": len(full),
        "bytes_28_layers": sum(b for _, b in full),
        "sha256_28_layers": digest(full),
        "sha256_28_layers_of": "json.dumps(sorted [[relpath, bytes], ...]) of the 28-layer loader",
    }
    return {"header": head, "files": [list(f) for f in files]}


def dump(data):
    """The header indented, then one [relpath, bytes] a line, so a diff shows which file changed."""
    rows = ",\n".join("  " + json.dumps(f) for f in data["files"])
    head = json.dumps(data["header"], indent=2).replace("\n", "\n ")
    return f'{{\n "header": {head},\n "files": [\n{rows}\n ]\n}}\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a git checkout of dlavm-llm-public")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data")
    args = parser.parse_args(argv)
    checkout = args.checkout.resolve()
    if not (checkout / "script" / "main.py").is_file():
        fail(f"{checkout} has no script/main.py; is it dlavm-llm-public?")
    commit = git_commit(checkout)
    ensure_clib(checkout)
    args.out.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        data = fixture(checkout, commit, model)
        path = args.out / f"dlavm_loader_{model}_2L.json"
        path.write_text(dump(data))
        print(f"{path}: {data['header']['files']} files, {data['header']['bytes']} bytes "
              f"(28 layers: {data['header']['files_28_layers']} files)")


if __name__ == "__main__":
    main()
