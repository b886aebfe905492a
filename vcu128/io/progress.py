"""Progress bars on stderr: live tqdm bars on a terminal; in a file or a pipe (a log, CI, nohup), one
plain line per bar when it ends, with no carriage returns.

TQDM_DISABLE=1 in the environment turns them off (both kinds). VCU128_TTY=1 says that stderr ends up on
a terminal although it is a pipe here: main.sh's step runner (vcu128/io/steprun.py) sets it when its own
output is a terminal, copies the bars there as they come, and keeps their last state only for the log.
"""

from __future__ import annotations

import os
import sys
import time


def on_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    if os.environ.get("VCU128_TTY") == "1":
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def disabled_by_environment() -> bool:
    return os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false", "no")


class FinalLine:
    """A bar for a file: counts what passes through and prints one line when the iteration ends
    (`desc: 28/28 layer in 12.3 s`); nothing if it stops early (the error says why)."""

    def __init__(self, iterable=None, desc: str = "", unit: str = "it", total=None, stream=None):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.stream = total, 0, stream or sys.stderr
        self.start = time.perf_counter()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        name = f"{self.desc}: " if self.desc else ""
        print(f"{name}{done} {self.unit} in {time.perf_counter() - self.start:.1f} s", file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.close()
        else:
            self.closed = True


class _Off(FinalLine):
    def close(self) -> None:
        self.closed = True


def bar(iterable=None, desc: str = "", unit: str = "it", total=None, enabled: bool = True):
    """A progress bar over `iterable` on stderr (see the module's docstring)."""
    if not enabled or disabled_by_environment():
        return _Off(iterable, desc, unit, total)
    if not on_terminal():
        return FinalLine(iterable, desc, unit, total)
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, mininterval=0.5, dynamic_ncols=True, disable=False)
