"""How a step fails: one `error:` line (and at most one `hint:` line) on stderr, and an exit code.

Exit codes: 0 success; 1 only for "verify found differences"; 2 every failure a user can cause (bad
input, a refused --out, a full disk, a missing permission, a busy target); 130 / 143 interrupted by
SIGINT / SIGTERM (staging folders are removed on the way out); 3 a bug in this tool (traceback).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import traceback
from typing import Callable


class VCUError(Exception):
    """Bad input: the message is one line naming the file or tensor and the rule it breaks.
    `hint` is an optional second line saying what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class Terminated(BaseException):
    """SIGTERM (what a batch scheduler sends), raised like KeyboardInterrupt so that every staging
    folder on the stack is removed before the process exits."""


# What the running step is writing and about how many bytes it needs, for the disk-full message.
_writing: dict = {}


def set_writing(target, need_bytes: int | None = None) -> None:
    _writing.update(target=str(target), need=need_bytes)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def _free_bytes(path: str) -> int | None:
    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def describe_os_error(e: OSError) -> tuple[str, str | None]:
    """(error line, hint) for a failed file operation."""
    where = e.filename or _writing.get("target") or "?"
    if e.errno == errno.ENOSPC:
        target = _writing.get("target") or where
        need, free = _writing.get("need"), _free_bytes(target)
        need_s = f"; the step needs about {human_bytes(need)}" if need else ""
        free_s = f", {human_bytes(free)} are free there" if free is not None else ""
        return f"{target}: disk full (no space left on device){need_s}{free_s}; nothing was left behind", "free some space or pass --out on another disk"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: {e.strerror.lower()} (check the folder's owner and permissions)", None
    return f"{where}: {e.strerror or e}", None


def quiet_third_party() -> None:
    """Third-party import chatter (torchao's optional kernels, Triton detection, torch's _pytree
    deprecations) is not the user's business: keep it off the terminal and out of the logs."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*_pytree.*")
    for name in ("torchao", "torch._inductor", "torch.utils._pytree", "gptqmodel", "transformers.modeling_utils", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCHAO_SUPPRESS_WARNINGS", "1")


def _raise_terminated(signum, frame):
    raise Terminated()


def _fail(message: str, hint: str | None = None) -> None:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a step's main() (its return value is the exit code, None meaning 0)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    quiet_third_party()
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (a test calling main() from a worker): leave it
        old_term = None
    try:
        return main(argv) or 0
    except VCUError as e:
        _fail(str(e), e.hint)
        return 2
    except OSError as e:
        _fail(*describe_os_error(e))
        return 2
    except KeyboardInterrupt:
        _fail("interrupted (no output was left behind)")
        return 130
    except Terminated:
        _fail("terminated by SIGTERM (no output was left behind)")
        return 143
    except MemoryError:
        _fail("out of memory", "close other programs or use a machine with more memory")
        return 2
    except Exception:
        traceback.print_exc()
        _fail("internal error (a bug in compiler-vcu128, not in your input): please report the traceback above")
        return 3
    finally:
        _writing.clear()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with this project's error convention: one `error:` line, one `hint:` line, exit 2."""

    def __init__(self, description: str | None = None, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kw)

    def error(self, message: str):
        _fail(message, f"{self.prog} --help lists the options")
        sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value
