#!/usr/bin/env python3
"""Mutation testing of the board-facing modules (issue #23), with mutmut. Not in CI: it is slow.

    pip install -r bench/requirements-mutation.txt     # once; this script installs nothing
    python bench/mutation.py run                       # the default modules, then the report
    python bench/mutation.py run --modules layout,verify --deadline 480 --raw a.json --no-report
    python bench/mutation.py run --modules rescale --sample 40 --max-children 2   # a quick look, on 2 cores

    # every module on the 16-core GPU machine (2026-12-01): three runs of under 9 minutes each
    # (output, family and rescale ran on 2 cores instead, for about 100 minutes)
    python bench/mutation.py run --modules verify,folder --deadline 525 --raw a.json --no-report
    python bench/mutation.py run --modules tables,layout --deadline 505 --raw b.json --no-report
    python bench/mutation.py run --modules datapath --deadline 330 --raw c.json --no-report
    # what a deadline left unreached, then what survived against the tests added since
    python bench/mutation.py run --modules verify,folder --not-checked-of a.json --sample 100000 --raw d.json --no-report
    python bench/mutation.py run --modules verify --survivors-of a.json --tests tests/test_kills_verify.py --raw e.json --no-report
    python bench/mutation.py report --raw a.json b.json c.json --recheck d.json e.json   # runs and re-checks as one report
    python bench/mutation.py merge --raw run1.json --recheck re.json --out all.json   # as raw results again

Each module is mutated alone, in a copy of the repository of its own (bench/out/mutation/<module>),
against the tests that cover it (SCOPE below): mutmut then runs, for each mutant, only those of
them that call the mutated function, in a worker forked from a process that has run them all once,
stopping at the first failure. The modules run side by side, each with mutmut workers in proportion
to its work, so that they end together.

What a mutant costs, and what keeps it to a few core-seconds:
- a killed mutant: the tests up to the first that fails. mutation_plugin.py runs first the tests
  that killed the same function's earlier mutants (most mutants of a function die by the same few);
- a mutant that survives (an equivalent one, or a missing test): every test of its function. So a
  module's selection holds the tests that test it, not every test that happens to call it: slow tests
  of another module's work are left out (SCOPE's `deselect`);
- every test copies a packed folder: the tests' temporary folders are in memory (/dev/shm) and a
  passing test's folder is removed at once.
Left out of every selection: tests that run a step in a subprocess (the mutant is active only in
mutmut's own process: they could never kill one), property-based fuzzing, and the tests of the
trained tiny model (its fixture takes minutes, and would be built again for every mutant).

mutmut 3 mutates function bodies only: module-level constants and decorated functions (a
@property, fit_silu's @lru_cache) are not mutated by it. EXTRA below adds a hand-made mutant for
each of them that decides a byte or a verdict; each is run as its own pytest of the module's
selection in a patched copy.

Results: bench/results/mutation.json (every mutant's status, every survivor with its diff and its
disposition) and bench/results/mutation.md (the table). A survivor is either equivalent (its
reason in bench/mutation_dispositions.json) or a missing test: then a test is added, and the
disposition names it. The kill rate is (killed + timeout) / (mutants tested - equivalent). The raw
results also keep what each module cost (wall, CPU and start-up seconds) and which tests killed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "out" / "mutation"
RESULTS = ROOT / "bench" / "results"
DISPOSITIONS = ROOT / "bench" / "mutation_dispositions.json"
PLUGIN = ROOT / "bench" / "mutation_plugin.py"  # loaded by every pytest run of the mutants: the tests that killed a function's mutants first
MUTMUT_VERSION = "3.8.1"  # bench/requirements-mutation.txt

# Tests left out of every selection. -m: those that train or quantize the tiny model (tests/conftest.py
# marks them; its fixture takes minutes, in every mutant's forked pytest again). -k: those that run a
# step in a subprocess (a mutant is never active there), and property-based fuzzing.
MARKERS = "not trained_model"
EXCLUDE = ("cli or command_line or random_model or exits_2 or bad_arguments or concurrent or side_by_side or umask or sigterm "
           "or nan_never_prints or fuzzed or quantize_tiny or tokenizer_is_read")


@dataclass
class Scope:
    """A module's test selection: the files (or test ids) that test it, less `deselect` (a -k expression
    of test names: slow ones whose kills faster tests of the selection already make). mutmut narrows it
    further, per mutant, to the tests that call the mutated function. `cost`: core-seconds a mutant,
    measured, to share the cores out so that the modules end together."""

    tests: list[str]
    deselect: str = ""
    cost: float = 1.0
    run_by_default: bool = True
    note: str = ""

    def k(self) -> str:
        return f"not ({EXCLUDE}{' or ' + self.deselect if self.deselect else ''})"


# Slow tests (seconds each) that check another module's work: left out of the selections of the
# modules they do not test (they call most of every module, so mutmut would run them for nearly every
# mutant, and every mutant that survives runs them all).
GLM_FORWARD = "transformers_glm_compute_chatglm"  # the functional check's GLM model against transformers
GLM_NATIVE = "transformers_glm_checkpoint_exports_like_chatglm"  # transformers' glm layout read through the family view
ROPE_TRANSFORMERS = "rope_table_pairs_and_whole_table_equals_transformers"  # the RoPE table's values
SILU_FIT = "silu_fit_follows_the_recorded_gate_range or fitted_silu_table_is_exact_far_out"  # the fitted SiLU table
SILU_BOARD = "folder_silu_table_changes_the_board_model_answer"  # the board model reads the folder's table


def _tests(*names: str) -> list[str]:
    return [f"tests/test_{n}.py" for n in names]


# Each module and the tests that cover it (mutmut narrows them further, per mutated function). cost:
# CPU seconds a mutant, measured on 2 cores with these selections (40-mutant samples, 2026-12-01).
SCOPE = {
    "vcu128/format/layout.py": Scope(_tests("kills_layout", "formats", "mutation_pins", "export", "folder_reader", "verify", "chatglm", "refusals", "tables", "pins"),
                                     " or ".join((GLM_FORWARD, GLM_NATIVE, ROPE_TRANSFORMERS, SILU_FIT, SILU_BOARD)), cost=1.5),
    "vcu128/format/tables.py": Scope(_tests("kills_tables", "tables", "mutation_pins", "folder_reader", "pins", "chatglm"), " or ".join((GLM_FORWARD, GLM_NATIVE)),
                                     cost=4.0),
    "vcu128/format/folder.py": Scope(_tests("kills_folder", "folder_reader", "mutation_pins", "verify", "tables", "outputs", "pins", "chatglm"),
                                     " or ".join((GLM_FORWARD, GLM_NATIVE, ROPE_TRANSFORMERS, SILU_FIT, SILU_BOARD)), cost=3.0),
    "vcu128/format/family.py": Scope(_tests("chatglm", "mutation_pins", "export", "refusals", "strict_input"), GLM_FORWARD, cost=0.5),
    "vcu128/format/rescale.py": Scope(_tests("rescale", "mutation_pins", "folder_reader", "pins"),
                                      " or ".join((GLM_FORWARD, GLM_NATIVE, ROPE_TRANSFORMERS, SILU_FIT, SILU_BOARD)), cost=0.5),
    "vcu128/check/verify.py": Scope(_tests("kills_verify", "verify", "mutation_pins", "folder_reader", "tables"), ROPE_TRANSFORMERS, cost=3.0),
    "vcu128/board/datapath.py": Scope(_tests("kills_datapath", "board_reference", "mutation_pins", "functional", "pins", "chatglm", "verify"),
                                      " or ".join((GLM_NATIVE, ROPE_TRANSFORMERS, SILU_FIT)), cost=1.0),
    "vcu128/io/output.py": Scope(_tests("kills_output", "outputs", "mutation_pins", "safety", "export", "refusals", "pins"),
                                 " or ".join((GLM_FORWARD, GLM_NATIVE, ROPE_TRANSFORMERS, SILU_FIT, SILU_BOARD)), cost=6.0),
}


def short(module: str) -> str:
    return Path(module).stem


@dataclass
class Extra:
    """A hand-made mutant where mutmut does not reach: `old` (exactly once in the module) -> `new`."""

    module: str
    name: str
    old: str
    new: str
    file: str = ""  # where the text is, when not in `module` itself (a constant it imports)

    @property
    def key(self) -> str:
        return f"extra:{short(self.module)}:{self.name}"


EXTRA = [
    Extra("vcu128/format/layout.py", "bias multiplier 1.0 -> 1.0009765625", "BIAS_MULTIPLIER = 0x3C00", "BIAS_MULTIPLIER = 0x3C01"),
    Extra("vcu128/format/layout.py", "chunk of 2048 inputs -> 1024", "INPUTS_PER_CHUNK = 2048", "INPUTS_PER_CHUNK = 1024"),
    Extra("vcu128/format/layout.py", "sign-magnitude nibble sign", "_NIBBLES_UNSIGNED >= 8, 8 - _NIBBLES_UNSIGNED,", "_NIBBLES_UNSIGNED >= 8, _NIBBLES_UNSIGNED - 8,"),
    Extra("vcu128/format/layout.py", "two's-complement nibble range", "_NIBBLES_UNSIGNED >= 8, _NIBBLES_UNSIGNED - 16,", "_NIBBLES_UNSIGNED > 8, _NIBBLES_UNSIGNED - 16,"),
    Extra("vcu128/format/layout.py", "offset-binary flip of the low nibble only", "np.arange(256, dtype=np.uint8) ^ 0x88", "np.arange(256, dtype=np.uint8) ^ 0x08"),
    Extra("vcu128/format/layout.py", "board ports 32 -> 16", "BOARD_PORTS = 32", "BOARD_PORTS = 16", "vcu128/format/constants.py"),
    Extra("vcu128/format/layout.py", "embedding part names of any width", r'r"Embedding_(\d{2,})-of-(\d{2,})\.bin"', r'r"Embedding_(\d+)-of-(\d+)\.bin"'),
    Extra("vcu128/format/layout.py", "output layer norm file name", 'OUT_NORM_FILE = "OutLayer/LN_DDR_bin/LN_wt_in_DDR.bin"', 'OUT_NORM_FILE = "OutLayer/LN_DDR_bin/LN0_wt_in_DDR.bin"'),
    Extra("vcu128/format/tables.py", "one word of the board's SiLU table", "0x3C5C, 0x3C22", "0x3C5D, 0x3C22"),
    Extra("vcu128/format/tables.py", "SiLU beat 64 -> 32 bytes", "ACT_BEAT_BYTES = 64", "ACT_BEAT_BYTES = 32"),
    Extra("vcu128/format/tables.py", "SiLU file 8192 -> 4096 bytes", "ACT_FILE_BYTES = 8192", "ACT_FILE_BYTES = 4096"),
    Extra("vcu128/format/tables.py", "RoPE blocks of 32 -> 16 channels", "ROPE_CHANNELS_PER_BLOCK = 32", "ROPE_CHANNELS_PER_BLOCK = 16"),
    Extra("vcu128/format/tables.py", "default RoPE order pairs", 'DEFAULT_ROPE_ORDER = "halves"', 'DEFAULT_ROPE_ORDER = "pairs"'),
    Extra("vcu128/format/tables.py", "fit: slope 1 far right -> 0.5", "+ [float(s) for s, _ in rounded] + [1.0]", "+ [float(s) for s, _ in rounded] + [0.5]"),
    Extra("vcu128/format/tables.py", "fit: bisection 10 -> 2 steps", "    for _ in range(10):\n        eps = (good + bad) / 2", "    for _ in range(2):\n        eps = (good + bad) / 2"),
    Extra("vcu128/format/rescale.py", "fp16 smallest normal 2^-14 -> 2^-15", "FP16_MIN_NORMAL = 2.0**-14", "FP16_MIN_NORMAL = 2.0**-15"),
    Extra("vcu128/format/rescale.py", "largest exponent 30 -> 31", "MAX_EXPONENT = 30", "MAX_EXPONENT = 31"),
    Extra("vcu128/format/rescale.py", "is_identity ignores m", "return self.k == 0 and not any(self.m)", "return self.k == 0"),
    Extra("vcu128/format/folder.py", "has_manifest inverted", "return self.doc is not None", "return self.doc is None"),
    Extra("vcu128/format/folder.py", "has_rope_table accepts anything", "return self.rope_table in ROPE_ORDERS", "return bool(self.rope_table)"),
    Extra("vcu128/format/folder.py", "default int4 code sign-magnitude", '    int4: str = "twos"', '    int4: str = "sign_magnitude"'),
    Extra("vcu128/format/folder.py", "default output-layer grid 7", "    int4_range: int = 8", "    int4_range: int = 7"),
    Extra("vcu128/format/folder.py", "sha256 pattern any length", 'r"[0-9a-f]{64}"', 'r"[0-9a-f]+"'),
    Extra("vcu128/check/verify.py", "threshold 0.9 -> 0.8", "BOARD_TOP1_THRESHOLD = 0.9", "BOARD_TOP1_THRESHOLD = 0.8"),
    Extra("vcu128/check/verify.py", "report ok ignores differences", "        return not self.differences", "        return True"),
    Extra("vcu128/check/verify.py", "differences reported 20 -> 2", "MAX_REPORTED = 20", "MAX_REPORTED = 2"),
    Extra("vcu128/check/verify.py", "report name", 'REPORT_NAME = "verify_report.json"', 'REPORT_NAME = "verify.json"'),
]

# mutmut's exit codes (mutmut/stats.py), folded into the statuses this report counts
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious", 36: "timeout",
          37: "killed", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault", None: "not checked"}


def status_of(code) -> str:
    return STATUS.get(code, "suspicious")


# ---------------------------------------------------------------------------------------------
# Running


def require_mutmut() -> None:
    try:
        from importlib.metadata import version

        got = version("mutmut")
    except ImportError:
        sys.exit("mutmut is not installed: pip install -r bench/requirements-mutation.txt (this script installs nothing)")
    if got != MUTMUT_VERSION:
        print(f"note: mutmut {got}, the results were made with {MUTMUT_VERSION} (bench/requirements-mutation.txt)", file=sys.stderr)


def copy_tree(dest: Path) -> None:
    """What the tests need: the package, the tests, the demo data, the step scripts."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("vcu128", "tests", "data"):
        shutil.copytree(ROOT / d, dest / d, ignore=ignore)
    for f in ROOT.glob("*.py"):
        shutil.copy2(f, dest / f.name)
    shutil.copy2(PLUGIN, dest / PLUGIN.name)


def toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


def selection_args(module: str) -> list[str]:
    """pytest's options of every run of this module's tests (mutmut's, and the hand-made mutants')."""
    # a passing test's tmp_path is removed at once: a mutant that survives runs every test, each copying a
    # packed folder (tens of MB), and dozens of them run at a time in memory (TMPDIR, see scratch_dir)
    return ["-p", "no:cacheprovider", "-p", PLUGIN.stem, "-o", "tmp_path_retention_policy=failed", "-m", MARKERS, "-k", SCOPE[module].k()]


def prepare(module: str, work: Path, timeout_multiplier: float, timeout_constant: float, tests: list[str] | None = None) -> Path:
    d = work / short(module)
    copy_tree(d)
    (d / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["vcu128"]\n'
        f"only_mutate = {toml_list([module])}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(tests or SCOPE[module].tests)}\n"
        f"pytest_add_cli_args = {toml_list(selection_args(module))}\n"
        f"timeout_multiplier = {timeout_multiplier}\n"
        f"timeout_constant = {timeout_constant}\n"
        "use_git_change_detection = false\n"
        # mutmut runs the tests from its mutants/ copy: the demo corpus and the step scripts must be there too
        f"also_copy = {toml_list(['tests', 'data', PLUGIN.name, *sorted(f.name for f in ROOT.glob('*.py'))])}\n"
    )
    return d


def mutant_names(d: Path) -> list[str]:
    """Every mutant mutmut makes of the module, by name (made here as mutmut makes them: for a sample,
    and to share the cores out by the work)."""
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_names"], cwd=d, capture_output=True, text=True, env=child_env(), check=False)
    try:
        return json.loads(r.stdout)
    except ValueError:
        sys.exit(f"{d}: mutmut could not list the mutants: {r.stderr.strip()[-500:]}")


def _print_names() -> None:
    from mutmut.configuration import config
    from mutmut.mutation.file_mutation import mutate_file_contents
    from mutmut.utils.format_utils import get_mutant_name

    path = Path(config().only_mutate[0])
    print(json.dumps([get_mutant_name(path, n) for n in mutate_file_contents(str(path), path.read_text()).mutant_names]))


def share_cores(work: dict[str, float], total: int) -> dict[str, int]:
    """mutmut's workers for each module, in proportion to its work (mutants x cost), at least one."""
    whole = sum(work.values()) or 1.0
    return {m: max(1, round(total * w / whole)) for m, w in work.items()}


def scratch_dir(work: Path) -> Path:
    """Where the tests' temporary folders go: memory (/dev/shm) where it has room, else beside the work
    copies. Every test copies a packed folder; in memory that costs a fifth less CPU."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 16 << 30:
        return shm / f"vcu128-mutation-{os.getpid()}"
    return work / "tmp"


SCRATCH: Path | None = None  # set by cmd_run
KILL_ORDER = True  # --no-kill-order: mutmut's own order (to measure what mutation_plugin.py's saves)


def child_env(d: Path | None = None) -> dict:
    env = dict(os.environ)
    for key in ("MUTATION_KILLS", "MUTATION_COSTS"):
        env.pop(key, None)
    if d is not None:  # mutation_plugin.py: which test killed which function's mutants; what each mutant cost
        if KILL_ORDER:
            env["MUTATION_KILLS"] = str(d / "kills.tsv")
        env["MUTATION_COSTS"] = str(d / "costs.tsv")
    if SCRATCH is not None:
        env["TMPDIR"] = str(SCRATCH)
    # the repository itself off the path (scripts/venv.sh puts it there): the copy's package must be the one imported
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(TQDM_DISABLE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def run_mutmut(module: str, d: Path, max_children: int, deadline: float, patterns: list[str]) -> dict:
    """mutmut on one module until it ends or the deadline; what it cost: wall seconds, seconds before
    its first mutant (its stats and clean-test runs, one core), CPU seconds of it and its workers."""
    start = time.time()
    stopped, first_mutant, status, usage = False, None, None, None

    def reap(block: bool) -> bool:
        nonlocal status, usage
        pid, st, ru = os.wait4(p.pid, 0 if block else os.WNOHANG)
        if pid:
            status, usage = st, ru
        return bool(pid)

    with open(d / "mutmut.log", "w") as log:
        p = subprocess.Popen([sys.executable, "-c", "from mutmut.__main__ import cli; cli()", "run", "--max-children", str(max_children), *patterns],
                             cwd=d, env=child_env(d), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        seen = 0
        while not reap(False):
            if first_mutant is None:
                with open(d / "mutmut.log", "rb") as f:
                    f.seek(max(0, seen - 64))  # the new part, and enough before it for a line cut in two
                    tail = f.read()
                    seen = f.tell()
                if b"Running mutation testing" in tail:
                    first_mutant = time.time() - start
            if time.time() > deadline:
                # to mutmut alone: it stops its workers (SIGTERM) without recording them; every finished mutant is
                # already saved. (To the whole group, a worker's pytest could end first as 'interrupted'.)
                os.kill(p.pid, signal.SIGINT)
                stopped = True
                for _ in range(30):
                    if reap(False):
                        break
                    time.sleep(1)
                else:
                    os.killpg(p.pid, signal.SIGKILL)
                    reap(True)
                break
            time.sleep(2)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return {"rc": p.returncode, "seconds": round(time.time() - start, 1), "stopped_at_deadline": stopped,
            "seconds_before_first_mutant": None if first_mutant is None else round(first_mutant, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)}


def killing_tests(d: Path) -> dict[str, int]:
    """How many mutants each test killed (mutation_plugin.py's notes; a mutant may count for several
    tests when mutmut ran it again): what a tighter selection would keep."""
    counts: dict[str, int] = {}
    path = d / "kills.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        test = line.partition("\t")[2]
        counts[test] = counts.get(test, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def mutant_costs(d: Path) -> dict[str, list]:
    """[CPU seconds, tests run] of each mutant's worker (mutation_plugin.py's notes)."""
    costs = {}
    path = d / "costs.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, _, cpu, ran = line.split("\t")
        costs[name] = [float(cpu), int(ran)]
    return costs


def read_meta(module: str, d: Path) -> dict:
    meta = d / "mutants" / (module + ".meta")
    if not meta.is_file():
        return {}
    doc = json.loads(meta.read_text())
    return {"codes": doc.get("exit_code_by_key", {}), "durations": doc.get("durations_by_key", {})}


def diffs(d: Path, names: list[str]) -> dict:
    """mutmut's diff of each named mutant (read in the module's copy, where its config is)."""
    if not names:
        return {}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_diffs", *names], cwd=d, capture_output=True, text=True, env=child_env(),
                       check=False)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {n: f"(diff unavailable: {r.stderr.strip()[-300:]})" for n in names}


def _print_diffs(names: list[str]) -> None:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    out = {}
    for n in names:
        try:
            out[n] = get_diff_for_mutant(n)
        except Exception as e:  # noqa: BLE001 - one unreadable diff must not lose the others
            out[n] = f"(diff unavailable: {e})"
    print(json.dumps(out))


def run_extra(extra: Extra, work: Path, deadline: float, timeout: float, tests: list[str] | None = None) -> dict:
    d = work / "extra" / re.sub(r"[^A-Za-z0-9]+", "-", extra.key)
    copy_tree(d)
    path = d / (extra.file or extra.module)
    text = path.read_text()
    if text.count(extra.old) != 1:
        return {"status": "stale", "why": f"the text to change occurs {text.count(extra.old)} times in {extra.file or extra.module}"}
    path.write_text(text.replace(extra.old, extra.new))
    left = deadline - time.time()
    if left < 10:
        return {"status": "not checked"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", *selection_args(extra.module), *(tests or SCOPE[extra.module].tests)]
    start = time.time()
    try:
        r = subprocess.run(cmd, cwd=d, env=child_env(), capture_output=True, text=True, timeout=min(timeout, left), check=False)
    except subprocess.TimeoutExpired:  # its own time limit: a timeout (detected); the run's deadline: not checked
        return {"status": "timeout" if timeout <= left else "not checked", "seconds": round(time.time() - start, 1)}
    failed = re.findall(r"^FAILED (\S+)", r.stdout, re.MULTILINE) or re.findall(r"^ERROR (\S+)", r.stdout, re.MULTILINE)
    status = {0: "survived", 1: "killed", 5: "no tests"}.get(r.returncode, "killed" if failed else "suspicious")
    out = {"status": status, "seconds": round(time.time() - start, 1)}
    if failed:
        out["killed_by"] = failed[0]
    if status == "suspicious":
        out["output"] = r.stdout[-1500:] + r.stderr[-1500:]
    shutil.rmtree(d, ignore_errors=True)
    return out


def cmd_run(args) -> None:
    require_mutmut()
    names = [m for m in SCOPE if SCOPE[m].run_by_default] if not args.modules else \
        [m for m in SCOPE if short(m) in args.modules.split(",")]
    if not names:
        sys.exit(f"--modules: expected some of {', '.join(short(m) for m in SCOPE)}")
    # absolute: mutmut runs each module's tests from inside its copy, where a relative path names
    # nothing (the plugin's notes then fail every mutant's pytest, and mutmut counts that a kill)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2  # the cores this process may use
    start = time.time()
    deadline = start + args.deadline
    global SCRATCH, KILL_ORDER
    SCRATCH = Path(args.tmp).resolve() if args.tmp else scratch_dir(work)
    KILL_ORDER = not args.no_kill_order
    SCRATCH.mkdir(parents=True, exist_ok=True)
    raw = {"machine": {"cpus": cores, "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor()},
           "mutmut": MUTMUT_VERSION, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "modules": {},
           "excluded_from_this_run": {m: SCOPE[m].note or "not in --modules" for m in SCOPE if m not in names},
           "test_selection_filter": {m: f"-m '{MARKERS}' -k '{SCOPE[m].k()}'" for m in names}}
    tests = args.tests.split(",") if args.tests else None
    dirs = {m: prepare(m, work, args.timeout_multiplier, args.timeout_constant, tests) for m in names}
    with ThreadPoolExecutor(max(1, len(names))) as pool:
        every = dict(zip(names, pool.map(lambda m: mutant_names(dirs[m]), names)))
    patterns = {m: args.mutants or [] for m in names}
    extras = [e for e in EXTRA if e.module in names] if not (args.mutants or args.sample) else []
    if args.sample and not (args.survivors_of or args.not_checked_of):  # a random sample of each module's mutants
        import random

        rng = random.Random(args.seed)
        patterns = {m: sorted(rng.sample(every[m], min(args.sample, len(every[m])))) for m in names}
        raw["sample"] = {"seed": args.seed, "sampled": {m: len(patterns[m]) for m in names}, "mutants": {m: len(every[m]) for m in names}}
    if args.survivors_of:  # a re-check: only what an earlier run left alive, usually against the added tests alone
        earlier = json.loads(Path(args.survivors_of).read_text())
        alive = lambda code: status_of(code) in ("survived", "no tests", "suspicious", "segfault")
        patterns = {m: [n for n, c in earlier["modules"].get(m, {}).get("codes", {}).items() if alive(c)] for m in names}
        names = [m for m in names if patterns[m]]
        extras = [e for e in extras if (earlier.get("extra") or {}).get(e.key, {}).get("status") in ("survived", "no tests", "suspicious", "stale")]
        raw["recheck_of"] = {"raw": str(args.survivors_of), "started": earlier.get("started"), "tests": tests}
    if args.not_checked_of:  # a random sample of what an earlier run did not reach (its deadline), with the full selection
        import random

        earlier = json.loads(Path(args.not_checked_of).read_text())
        rng = random.Random(args.seed)
        pool_ = {m: sorted(n for n, c in earlier["modules"].get(m, {}).get("codes", {}).items() if status_of(c) == "not checked") for m in names}
        patterns = {m: rng.sample(pool_[m], min(args.sample or 100, len(pool_[m]))) for m in names}
        names = [m for m in names if patterns[m]]
        extras = [e for e in extras if (earlier.get("extra") or {}).get(e.key, {}).get("status") == "not checked"]
        raw["sample_of"] = {"raw": str(args.not_checked_of), "started": earlier.get("started"), "seed": args.seed,
                            "sampled": {m: len(patterns[m]) for m in names}, "not_checked_before": {m: len(v) for m, v in pool_.items()}}
    # The cores shared out: the hand-made mutants' few workers, and each module's mutmut workers in
    # proportion to its work (mutants to run x its measured cost), so that the modules end together.
    # A quarter more workers than cores covers each mutmut's serial start (its stats and clean runs);
    # more would stretch the wall clock that mutmut's timeouts are measured in.
    extra_workers = 0 if not extras else max(1, args.extra_workers or round(cores / 16))
    total = args.workers or max(len(names), round(1.25 * cores) - extra_workers)
    todo = {m: len([n for n in every[m] if not patterns[m] or any(fnmatch.fnmatchcase(n, p) for p in patterns[m])]) for m in names}
    children = {m: args.max_children for m in names} if args.max_children else share_cores({m: todo[m] * SCOPE[m].cost for m in names}, total)
    raw["workers"] = {"mutmut": children, "hand_made": extra_workers}
    raw["scratch"] = str(SCRATCH)
    extra_pool = ThreadPoolExecutor(max(1, extra_workers))
    extra_futures = [extra_pool.submit(run_extra, e, work, deadline, args.extra_timeout, tests) for e in extras]
    with ThreadPoolExecutor(max(1, len(names))) as pool:
        runs = dict(zip(names, pool.map(lambda m: run_mutmut(m, dirs[m], children[m], deadline, patterns[m]), names)))
    for m in names:
        meta = read_meta(m, dirs[m])
        codes = meta.get("codes", {})
        not_killed = [n for n, c in codes.items() if status_of(c) not in ("killed", "timeout", "not checked", "skipped")]
        tail = (dirs[m] / "mutmut.log").read_text(errors="replace")[-3000:] if (dirs[m] / "mutmut.log").is_file() else ""
        raw["modules"][m] = {**runs[m], "tests": tests or SCOPE[m].tests, "children": children[m], "killing_tests": killing_tests(dirs[m]),
                             "mutant_costs": mutant_costs(dirs[m]),
                             "codes": codes, "durations": meta.get("durations", {}),
                             "diffs": diffs(dirs[m], not_killed), "log_tail": tail if not codes or runs[m]["rc"] not in (0, None) else ""}
    extra_pool.shutdown(wait=True)
    if extras:
        raw["extra"] = {e.key: {"module": e.module, "name": e.name, "change": f"{e.old!r} -> {e.new!r}", **f.result()}
                        for e, f in zip(extras, extra_futures)}
    raw["seconds"] = round(time.time() - start, 1)
    path = Path(args.raw or work / "raw.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw, indent=1))
    if not args.tmp:
        shutil.rmtree(SCRATCH, ignore_errors=True)  # the tests' leftovers (a killed mutant's folders are kept by pytest)
    print(f"raw results: {path}")
    if not args.no_report:
        report(raw, Path(args.results))


# ---------------------------------------------------------------------------------------------
# The report


def checked(module_raw: dict) -> int:
    return sum(1 for c in module_raw.get("codes", {}).values() if status_of(c) not in ("not checked", "skipped"))


def combine(raws: list[dict]) -> dict:
    """Full runs of different modules (or machines) as one: each module from the run that checked most
    of its mutants (a run where a module failed to start checks none), each hand-made mutant from
    the run that checked it. Every run's machine and time stay recorded under "runs"."""
    if len(raws) == 1:
        return raws[0]
    out = {**raws[0], "modules": {}, "extra": {}, "runs": []}
    for raw in raws:
        run = {"started": raw.get("started"), "machine": raw.get("machine"), "seconds": raw.get("seconds"),
               "max_children_per_module": raw.get("max_children_per_module"), "modules": []}
        out["runs"].append(run)
        for m, r in raw["modules"].items():
            if m not in out["modules"] or checked(r) > checked(out["modules"][m]):
                out["modules"][m] = {**r, "run": raw.get("started")}
        for key, e in (raw.get("extra") or {}).items():
            if key not in out["extra"] or out["extra"][key]["status"] == "not checked":
                out["extra"][key] = {**e, "run": raw.get("started")}
    for run in out["runs"]:
        run["modules"] = [m for m, r in out["modules"].items() if r["run"] == run["started"]]
    out["excluded_from_this_run"] = {m: why for raw in raws for m, why in raw.get("excluded_from_this_run", {}).items() if m not in out["modules"]}
    out["seconds"] = sum(raw.get("seconds") or 0 for raw in raws)
    return out


def merge(raw: dict, rechecks: list[dict]) -> dict:
    """A full run's results with the kills of later re-checks of its survivors (tests were only
    added since, so what was killed stays killed): each such mutant is marked with the re-check."""
    for re_ in rechecks:
        whole_selection = not (re_.get("recheck_of") or {}).get("tests")  # each module's own tests, not only those added
        for m, r in re_.get("modules", {}).items():
            base = raw["modules"][m]
            base["diffs"].update(r.get("diffs", {}))
            for name, code in r["codes"].items():
                if name not in base["codes"] or status_of(code) == "not checked":
                    continue
                if status_of(base["codes"][name]) == "not checked":  # a sample of what the full run did not reach
                    base["codes"][name] = code
                    base.setdefault("sampled", []).append(name)
                elif (status_of(code), status_of(base["codes"][name])) != ("timeout", "timeout") and status_of(code) in ("killed", "timeout") \
                        and status_of(base["codes"][name]) != "killed":  # a kill, or a timeout where it had survived
                    base["codes"][name] = code
                    base.setdefault("killed_in_recheck", []).append(name)
                elif status_of(base["codes"][name]) == "timeout" and status_of(code) == "survived" and whole_selection:
                    # a timeout of a loaded machine: run again against the module's whole selection,
                    # with a longer limit, no test failed. It survived (a later re-check may kill it).
                    base["codes"][name] = code
                    base.setdefault("timeout_then_survived", []).append(name)
        for key, e in (re_.get("extra") or {}).items():
            before = raw.get("extra", {}).get(key)
            if before is None or e["status"] == "not checked":
                continue
            if before["status"] == "not checked" or (e["status"] == "killed" and before["status"] != "killed") or \
                    (e["status"] == "timeout" and before["status"] not in ("killed", "timeout")):
                raw["extra"][key] = {**before, **e, "killed_in_recheck": before["status"] != "not checked"}
        raw.setdefault("rechecks", []).append({"started": re_.get("started"), "machine": re_.get("machine"), "seconds": re_.get("seconds"),
                                               "survivors_of": re_.get("recheck_of"), "sample_of": re_.get("sample_of")})
    return raw


def disposition(disp: dict, name: str) -> dict:
    """A mutant's disposition: by its name, else by the first pattern (fnmatch) that matches it."""
    import fnmatch

    if name in disp:
        return disp[name]
    return next((d for pattern, d in disp.items() if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern)), {})


def survivor_disposition(disp: dict, name: str, diff: str) -> dict:
    """What a live mutant is: equivalent (with why), or open; a 'killed' pattern does not cover a mutant still alive.
    mutmut numbers a function's mutants afresh when the function changes: a disposition that records
    its `change` holds only for a mutant whose change is still that one (else it is open, and says so)."""
    d = disposition(disp, name)
    if d.get("change") and d["change"] != _change_line(diff):
        return {"disposition": "open", "why": f"**open** (the disposition of this name was for another change: `{d['change']}`)"}
    return d if d.get("disposition") == "equivalent" or name in disp else {}


def report(raw: dict, results: Path) -> None:
    disp = {k: v for k, v in (json.loads(DISPOSITIONS.read_text()) if DISPOSITIONS.is_file() else {}).items() if not k.startswith("_")}
    out = {"tool": f"mutmut {raw['mutmut']}", "machine": raw["machine"], "started": raw["started"], "seconds": raw.get("seconds"),
           "runs": raw.get("runs", []),
           "test_selection_filter": raw.get("test_selection_filter"), "excluded_from_this_run": raw.get("excluded_from_this_run", {}),
           "modules": {}, "survivors": []}
    rows = []
    for m, r in raw["modules"].items():
        counts = {"total": 0, "killed": 0, "timeout": 0, "survived": 0, "no tests": 0, "suspicious": 0, "not checked": 0, "equivalent": 0}
        for name, code in sorted(r["codes"].items()):
            s = status_of(code)
            counts["total"] += 1
            if s in ("killed", "timeout", "survived", "no tests", "not checked"):
                counts[s] += 1
            elif s == "skipped":
                counts["not checked"] += 1
            else:
                counts["suspicious"] += 1
            if s in ("survived", "no tests", "suspicious", "segfault"):
                d = survivor_disposition(disp, name, r["diffs"].get(name, ""))
                if d.get("disposition") == "equivalent":
                    counts["equivalent"] += 1
                out["survivors"].append({"mutant": name, "module": m, "status": s, "diff": r["diffs"].get(name, ""), **d})
        _add_extra(raw, m, counts, out, disp)
        tested = counts["total"] - counts["not checked"]
        detected = counts["killed"] + counts["timeout"]
        non_eq = tested - counts["equivalent"]
        counts["kill_rate_non_equivalent"] = round(detected / non_eq, 4) if non_eq else None
        counts["seconds"] = r.get("seconds")
        counts["stopped_at_deadline"] = r.get("stopped_at_deadline")
        for key in ("cpu_seconds", "seconds_before_first_mutant", "children", "rc"):
            counts[key] = r.get(key)
        if r.get("mutant_costs"):  # the workers' own CPU seconds (mutation_plugin.py), mutmut's start-up apart
            counts["cpu_seconds_a_mutant"] = round(sum(c[0] for c in r["mutant_costs"].values()) / len(r["mutant_costs"]), 2)
        out["modules"][m] = counts
        rows.append((m, counts))
    for m, r in raw["modules"].items():  # survivors of the full run that the added tests kill (the re-check)
        for name in r.get("killed_in_recheck", []):
            out.setdefault("killed_by_added_tests", []).append({"mutant": name, "module": m, "diff": r["diffs"].get(name, ""),
                                                                "test": disposition(disp, name).get("test", "")})
    for key, e in (raw.get("extra") or {}).items():
        if e.get("killed_in_recheck"):
            out.setdefault("killed_by_added_tests", []).append({"mutant": key, "module": e["module"], "diff": e["change"],
                                                                "test": e.get("killed_by") or disposition(disp, key).get("test", "")})
    out["rechecks"] = raw.get("rechecks", [])
    sampled = [n for r in raw["modules"].values() for n in r.get("sampled", [])]
    if sampled:  # what the random sample of unreached mutants says about them
        alive = {s["mutant"]: s for s in out["survivors"]}
        eq = sum(1 for n in sampled if alive.get(n, {}).get("disposition") == "equivalent")
        left = sum(1 for n in sampled if n in alive) - eq
        out["sample"] = {"mutants": len(sampled), "killed": len(sampled) - eq - left, "equivalent": eq, "survived": left}
    total = {k: sum(c[k] for _, c in rows) for k in ("total", "killed", "timeout", "survived", "no tests", "suspicious", "not checked", "equivalent")}
    non_eq = total["total"] - total["not checked"] - total["equivalent"]
    total["kill_rate_non_equivalent"] = round((total["killed"] + total["timeout"]) / non_eq, 4) if non_eq else None
    out["total"] = total
    results.mkdir(parents=True, exist_ok=True)
    (results / "mutation.json").write_text(json.dumps(out, indent=1) + "\n")
    (results / "mutation.md").write_text(markdown(out))
    print((results / "mutation.md").read_text())


def _add_extra(raw: dict, module: str, counts: dict, out: dict, disp: dict) -> None:
    for key, e in (raw.get("extra") or {}).items():
        if e["module"] != module:
            continue
        s = e["status"]
        counts["total"] += 1
        if s in ("killed", "timeout", "survived", "no tests", "not checked"):
            counts[s] += 1
        else:
            counts["suspicious"] += 1
        if s not in ("killed", "timeout", "not checked"):
            d = survivor_disposition(disp, key, e["change"])
            if d.get("disposition") == "equivalent":
                counts["equivalent"] += 1
            out["survivors"].append({"mutant": key, "module": module, "status": s, "diff": e["change"], **d})


def markdown(out: dict) -> str:
    m = out["machine"]
    where = (f"started {out['started']}, {out.get('seconds')} s on {m['cpus']} cores ({m['platform']}, Python {m['python']})" if not out.get("runs")
             else f"{len(out['runs'])} runs: " + "; ".join(
                 f"{', '.join(short(x) for x in r['modules'])} started {r['started']}, {r['seconds']} s on {r['machine']['cpus']} cores "
                 f"({r['machine']['platform']}, Python {r['machine']['python']})" for r in out["runs"]))
    lines = ["# Mutation testing (issue #23)", "",
             (f"{out['tool']}, {where}. "
              "Made by `python bench/mutation.py run`; mutants in function bodies by mutmut, module-level constants and decorated "
              "functions by the script's hand-made EXTRA list. Kill rate = (killed + timeout) / (tested - equivalent)."), "",
             "| module | mutants | killed | timeout | survived | no tests | equivalent | not checked | kill rate (non-equivalent) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mod, c in out["modules"].items():
        rate = f"{100 * c['kill_rate_non_equivalent']:.1f}%" if c["kill_rate_non_equivalent"] is not None else "-"
        lines.append(f"| {mod} | {c['total']} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['no tests']} | {c['equivalent']} | "
                     f"{c['not checked']} | {rate} |")
    t = out["total"]
    rate = f"{100 * t['kill_rate_non_equivalent']:.1f}%" if t["kill_rate_non_equivalent"] is not None else "-"
    lines.append(f"| **all** | {t['total']} | {t['killed']} | {t['timeout']} | {t['survived']} | {t['no tests']} | {t['equivalent']} | "
                 f"{t['not checked']} | **{rate}** |")
    costs = [(mod, c) for mod, c in out["modules"].items() if c.get("cpu_seconds")]
    if costs:
        lines += ["", "What each module's mutmut cost: " + "; ".join(
            f"{short(mod)} {c['seconds']:.0f} s on {c['children']} worker{'s' if c['children'] != 1 else ''} "
            f"({c['seconds_before_first_mutant'] or 0:.0f} s before its first mutant), {c['cpu_seconds']:.0f} CPU s"
            + (f", {c['cpu_seconds_a_mutant']} a mutant" if c.get("cpu_seconds_a_mutant") else "")
            + (" (stopped at the deadline)" if c.get("stopped_at_deadline") else "") + (f" (mutmut's exit code {c['rc']})" if c.get("rc") else "")
            for mod, c in costs) + "."]
    for r in out.get("rechecks", []):
        where = f"{r['machine']['cpus']} cores, Python {r['machine']['python']}" if r.get("machine") else ""
        if r.get("survivors_of"):
            tests = ", ".join(r["survivors_of"].get("tests") or ["the full selection"])
            lines += ["", f"Re-check ({r['started']}, {r.get('seconds')} s, {where}): the survivors so far against {tests}; their kills are counted above."]
        if r.get("sample_of"):
            s = r["sample_of"]
            lines += ["", f"Sample ({r['started']}, {r.get('seconds')} s, {where}, seed {s['seed']}): of the mutants the full run did not reach, "
                          + ", ".join(f"{n} of {s['not_checked_before'].get(m)} in `{m}`" for m, n in s["sampled"].items())
                          + ", run with the full selection; counted above, the rest stays 'not checked'."
                          + (f" Of the sample, now: {out['sample']['killed']} killed, {out['sample']['equivalent']} equivalent, "
                             f"{out['sample']['survived']} survived." if out.get("sample") else "")]
    if out.get("excluded_from_this_run"):
        lines += ["", "Not in this run: " + "; ".join(f"`{k}` ({v})" for k, v in out["excluded_from_this_run"].items()) + "."]
    lines += ["", "## Every survivor", "", "| mutant | status | change | disposition |", "| --- | --- | --- | --- |"]
    for s in out["survivors"]:
        change = _change_line(s["diff"])
        why = s.get("why") or s.get("test") or "**open**"
        what = s.get("disposition", "open")
        lines.append(f"| `{s['mutant']}` | {s['status']} | `{change}` | {what}: {why} |")
    if out.get("killed_by_added_tests"):
        groups: dict = {}
        for s in out["killed_by_added_tests"]:
            function = s["mutant"].rsplit("__mutmut_", 1)[0] if "__mutmut_" in s["mutant"] else s["mutant"]
            g = groups.setdefault(function, {"n": 0, "tests": set()})
            g["n"] += 1
            if s.get("test"):
                g["tests"].add(s["test"])
        lines += ["", f"## Survivors of the full run killed by the added tests ({len(out['killed_by_added_tests'])}; each listed in mutation.json)", "",
                  "| function (mutants) | killed by |", "| --- | --- |"]
        for function, g in groups.items():
            lines.append(f"| `{function}` ({g['n']}) | {', '.join(sorted(g['tests'])) or 'tests/test_mutation_pins.py'} |")
    return "\n".join(lines) + "\n"


def _change_line(diff: str) -> str:
    """The diff's first changed line pair, shortened, for the table."""
    minus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    text = f"{minus[0]} -> {plus[0]}" if minus and plus else diff.strip().splitlines()[0] if diff.strip() else ""
    text = text.replace("|", "\\|").replace("`", "'")
    return text if len(text) <= 160 else text[:157] + "..."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run mutmut on the modules, then write the report")
    r.add_argument("--modules", help=f"comma-separated, of {', '.join(short(m) for m in SCOPE)} (default: those not being rewritten)")
    r.add_argument("--max-children", type=int, help="mutmut workers of every module (default: --workers shared out by each module's work)")
    r.add_argument("--workers", type=int, help="mutmut workers in all (default: 1.25 x the cores, less the hand-made mutants' workers)")
    r.add_argument("--deadline", type=float, default=3600, help="seconds; mutmut is stopped then and what finished is reported (default 3600)")
    r.add_argument("--extra-workers", type=int, help="workers for the hand-made mutants (default: a sixteenth of the cores)")
    r.add_argument("--extra-timeout", type=float, default=240, help="seconds one hand-made mutant may take")
    r.add_argument("--timeout-multiplier", type=float, default=2.0,
                   help="mutmut's timeout_multiplier: a mutant's CPU limit is (its tests' time + the constant) x 2 x this")
    r.add_argument("--timeout-constant", type=float, default=20.0,
                   help="mutmut's timeout_constant, seconds: large enough for the fixtures (an export), which mutmut does not time")
    r.add_argument("--mutants", nargs="*", help="only these mutmut mutant names or patterns (a quick look; no hand-made mutants)")
    r.add_argument("--survivors-of", help="raw results of an earlier run: run only what it left alive (mutmut's and the hand-made ones)")
    r.add_argument("--not-checked-of", help="raw results of an earlier run: run a random sample (--sample) of what it did not reach")
    r.add_argument("--sample", type=int, help="a random sample of this many mutants a module (no hand-made ones); "
                                               "with --not-checked-of, of what that run did not reach (default 100 there)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--tests", help="comma-separated test files instead of each module's selection (with --survivors-of: the tests added since)")
    r.add_argument("--no-kill-order", action="store_true", help="mutmut's own test order, not the tests that killed a function's mutants first")
    r.add_argument("--work", default=str(WORK))
    r.add_argument("--tmp", help="the tests' temporary folders (default: in /dev/shm where it has 16 GiB free, else WORK/tmp)")
    r.add_argument("--raw", help="where the raw results go (default WORK/raw.json)")
    r.add_argument("--results", default=str(RESULTS))
    r.add_argument("--no-report", action="store_true")
    q = sub.add_parser("report", help="the report again, from raw results (after editing the dispositions)")
    q.add_argument("--raw", nargs="+", default=[str(WORK / "raw.json")],
                   help="raw results; several full runs (of other modules, or other machines) are combined: each module from the run that checked most")
    q.add_argument("--recheck", nargs="*", default=[], help="raw results of --survivors-of runs: their kills count")
    q.add_argument("--results", default=str(RESULTS))
    g = sub.add_parser("merge", help="a full run's raw results with re-checks and samples merged, as raw results (for another --survivors-of)")
    g.add_argument("--raw", nargs="+", required=True)
    g.add_argument("--recheck", nargs="*", default=[])
    g.add_argument("--out", required=True)
    d = sub.add_parser("_diffs")
    d.add_argument("names", nargs="*")
    sub.add_parser("_names")
    args = p.parse_args()
    if args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "report":
        full = combine([json.loads(Path(r).read_text()) for r in args.raw])
        report(merge(full, [json.loads(Path(r).read_text()) for r in args.recheck]), Path(args.results))
    elif args.cmd == "merge":
        full = combine([json.loads(Path(r).read_text()) for r in args.raw])
        merged = merge(full, [json.loads(Path(r).read_text()) for r in args.recheck])
        Path(args.out).write_text(json.dumps(merged, indent=1))
    elif args.cmd == "_names":
        _print_names()
    else:
        _print_diffs(args.names)


if __name__ == "__main__":
    main()
