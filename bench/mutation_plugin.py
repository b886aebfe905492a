"""pytest plugin of bench/mutation.py's mutmut runs: the tests that killed earlier mutants of the
same function run first.

mutmut runs a mutant's tests fastest first and stops at the first failure. Mutants of one function
are mostly killed by the same few tests, and mutmut takes a function's mutants one after another: so
each failure is noted (function and test, one line appended to $MUTATION_KILLS), and a later mutant of
that function runs the tests that killed most of its siblings first, the rest in mutmut's order. Only
the order changes: a mutant that survives still runs every test.

The worker is forked from mutmut's process, which has run the tests once with the original code: a
cache the mutated module filled then would hand the worker the original's answers, and a mutant of
the code behind it would survive. So the worker empties the mutated module's caches first (its
functools caches, and the dict caches named in MODULE_CACHES).
"""

import os
import resource
import sys

MODULE_CACHES = {"vcu128.format.layout": ("_LUTS",)}  # module-level dicts that memoise a mutated function's work

KILLS = os.environ.get("MUTATION_KILLS")
COSTS = os.environ.get("MUTATION_COSTS")  # what each mutant's run cost: CPU seconds and tests run
_ran = [0]


def _function() -> str | None:
    """The mutated function of this run (mutmut names the mutant in MUTANT_UNDER_TEST), or None."""
    name = os.environ.get("MUTANT_UNDER_TEST", "")
    return name.partition("__mutmut_")[0] if "__mutmut_" in name else None


def pytest_collection_modifyitems(items):
    function = _function()
    if not (KILLS and function and os.path.isfile(KILLS)):
        return
    kills: dict[str, int] = {}
    with open(KILLS) as f:
        for line in f:
            fn, _, test = line.rstrip("\n").partition("\t")
            if fn == function:
                kills[test] = kills.get(test, 0) + 1
    if kills:
        items.sort(key=lambda item: -kills.get(item.nodeid, 0))  # stable: mutmut's order otherwise


def _append(path: str, line: str) -> None:
    """One short line, appended in one write: the forked workers of a module share the file."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def pytest_sessionstart(session):
    _ran[0] = 0  # the worker is forked from mutmut's process, which ran pytest before
    function = _function()
    module = sys.modules.get(function.rsplit(".", 1)[0]) if function else None
    if module is not None:
        for obj in list(vars(module).values()):
            if callable(getattr(obj, "cache_clear", None)) and getattr(obj, "__module__", None) == module.__name__:
                obj.cache_clear()
        for name in MODULE_CACHES.get(module.__name__, ()):
            getattr(module, name).clear()


def pytest_runtest_logreport(report):
    function = _function()
    if report.when == "call" or (report.when == "setup" and report.failed):
        _ran[0] += 1
    if KILLS and function and report.failed:
        _append(KILLS, f"{function}\t{report.nodeid}\n")


def pytest_sessionfinish(session, exitstatus):
    if COSTS and _function():
        # a worker is forked for one mutant: its own CPU time is this mutant's (its subprocesses' apart)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        _append(COSTS, f"{os.environ['MUTANT_UNDER_TEST']}\t{int(exitstatus)}\t{usage.ru_utime + usage.ru_stime:.2f}\t{_ran[0]}\n")
