"""How a step fails: one `error:` line (and at most one `hint:` line) on stderr, and an exit code.

Exit codes: 0 success; 1 only for "verify found differences"; 2 every failure a user can cause (bad
input, a refused --out, a full disk, a missing permission, a busy target); 130 / 143 interrupted by
SIGINT / SIGTERM (staging folders are removed on the way out); 3 a bug in this tool (traceback).

Only the standard library is imported here: the command lines import this first, so that a missing
environment (no torch, numpy or tqdm: run outside scripts/venv.sh) is one `error:` line, not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
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


@contextlib.contextmanager
def writing(target, need_bytes: int | None = None):
    """set_writing for the time a step writes `target`; what was set before comes back after, so a
    later failure (a report written elsewhere) is not blamed on this target."""
    saved = dict(_writing)
    set_writing(target, need_bytes)
    try:
        yield
    except BaseException:
        raise  # the error is described (naming the target) on the way out: keep it set
    else:
        _writing.clear()
        _writing.update(saved)


def one_line(text) -> str:
    """`text` with its control characters escaped (a newline in a path becomes \\n): an error stays one line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


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


def _in_staging_of(path: str, target: str) -> bool:
    """Is `path` the target, inside it, or under one of its staging paths (parent/.name.partial-..., .old-...)?"""
    t, p = os.path.abspath(target), os.path.abspath(path)
    if p == t or p.startswith(t + os.sep):
        return True
    parent, name = os.path.split(t)
    rel = os.path.relpath(p, parent)
    return not rel.startswith("..") and rel.split(os.sep, 1)[0].startswith(f".{name}.")


# A short write reported without an errno (numpy's tofile): "100 requested and 0 written".
_SHORT_WRITE = re.compile(r"requested and \d+ written")
_WRAPPED_ERRNO = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+)")


def os_error_of(e: BaseException) -> OSError | None:
    """The OSError inside another library's exception (safetensors' SafetensorError says
    "... (os error 28)"), or None."""
    if isinstance(e, OSError):
        return e
    m = _WRAPPED_ERRNO.search(str(e))
    if m:
        code = int(m.group(1) or m.group(2))
        return OSError(code, os.strerror(code))
    return None


def describe_os_error(e: OSError) -> tuple[str, str | None]:
    """(error line, hint) for a failed file operation. A disk-full error names the output being
    written (not its staging folder, which is gone by now) and the free space of its filesystem."""
    target = _writing.get("target")
    where = e.filename if e.filename is not None else target
    code = e.errno
    if code is None and _SHORT_WRITE.search(str(e)):
        code = errno.ENOSPC  # a short write: the disk filled up (the free space below says so)
    if code in (errno.ENOSPC, errno.EDQUOT):
        named = target if target and (where is None or _in_staging_of(str(where), target)) else where
        need = _writing.get("need") if named == target else None
        free = _free_bytes(str(named)) if named is not None else None
        need_s = f"; the step needs about {human_bytes(need)}" if need else ""
        free_s = f", {human_bytes(free)} are free there" if free is not None else ""
        what = "disk full (no space left on device)" if code == errno.ENOSPC else "disk quota exceeded"
        return (f"{named if named is not None else 'an output file'}: {what}{need_s}{free_s}; nothing was left behind",
                "free some space, or choose an output folder on another disk")
    where = where if where is not None else "a file"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: {(e.strerror or str(e)).lower()} (check the folder's owner and permissions)", None
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
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading / saving bars (read at its import)
    os.environ.setdefault("TORCHAO_SUPPRESS_WARNINGS", "1")


def _raise_terminated(signum, frame):
    raise Terminated()


def _fail(message: str, hint: str | None = None) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr)
    if hint:
        print(f"hint: {one_line(hint)}", file=sys.stderr)


class _OneLineWarnings(logging.Formatter):
    """Warnings and errors are one line each, whatever a path in them holds."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return one_line(text) if record.levelno >= logging.WARNING else text


# What every step needs (requirements.txt), by import name; GPTQModel is needed by --engine gptqmodel only.
REQUIRED_PACKAGES = ("tqdm", "numpy", "safetensors", "torch", "transformers")
SETUP_HINT = "run 'source scripts/venv.sh' first (or bash main.sh)"


def missing_package_message(name: str) -> str:
    return f"missing package '{name}': {SETUP_HINT}"


def check_environment(packages=REQUIRED_PACKAGES) -> None:
    """One `error:` line and exit 2 when a package the steps need is not installed (found without
    importing it: a few milliseconds)."""
    import importlib.util

    for name in packages:
        if importlib.util.find_spec(name) is None:
            _fail(missing_package_message(name))
            sys.exit(2)


def _third_party(e: ModuleNotFoundError) -> str | None:
    """The top-level name of a missing package that is not this project's own module."""
    name = (e.name or "").split(".")[0]
    return name if name and name != "vcu128" else None


def version_line() -> str:
    """`compiler-vcu128 <version> (<git describe>)`; the part in parentheses where git and the
    checkout's history are there."""
    import subprocess

    from vcu128 import __version__

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        r = subprocess.run(["git", "-C", root, "describe", "--always", "--tags", "--dirty"], capture_output=True, text=True, timeout=5)
        described = r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        described = ""
    return f"compiler-vcu128 {__version__}" + (f" ({described})" if described else "")


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help="print the version and exit"):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def _internal_error() -> int:
    traceback.print_exc()
    _fail("internal error (a bug in compiler-vcu128, not in your input): please report the traceback above")
    return 3


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a step's main() (its return value is the exit code, None meaning 0). The step's heavy
    imports belong inside main(), after its arguments are parsed: `--help` stays fast, and a package
    missing there is named on one line."""
    check_environment()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if type(handler.formatter) is logging.Formatter and handler.formatter._fmt == "%(message)s":
            handler.setFormatter(_OneLineWarnings("%(message)s"))
    quiet_third_party()
    old_term = signal.getsignal(signal.SIGTERM)
    old_int = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
        # Ctrl-C is KeyboardInterrupt even where SIGINT came in ignored (a background job of a script)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread (a test calling main() from a worker): leave it
        old_term = old_int = None
    try:
        return main(argv) or 0
    except VCUError as e:
        _fail(str(e), e.hint)
        return 2
    except OSError as e:
        _fail(*describe_os_error(e))
        return 2
    except ModuleNotFoundError as e:
        if _third_party(e) is None:
            return _internal_error()
        _fail(missing_package_message(_third_party(e)))
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
    except Exception as e:
        wrapped = os_error_of(e)
        if wrapped is not None:  # a library's own wrapper around a file error (disk full while saving)
            _fail(*describe_os_error(wrapped))
            return 2
        return _internal_error()
    finally:
        _writing.clear()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with this project's error convention: one `error:` line, one `hint:` line, exit 2."""

    def __init__(self, description: str | None = None, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kw)
        self.add_argument("--version", action=_VersionAction)

    def error(self, message: str):
        _fail(message, f"{self.prog} --help lists the options")
        sys.exit(2)

    def _get_option_tuples(self, option_string):
        """An abbreviation that matches several spellings of one option (--quant: --quantize_model and
        --quantize-model) means that option, not an ambiguity."""
        seen, unique = set(), []
        for t in super()._get_option_tuples(option_string):
            if id(t[0]) not in seen:
                seen.add(id(t[0]))
                unique.append(t)
        return unique


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def exit_process(code: int) -> None:
    """End a step's process with `code`. Where torch was imported, Python's own teardown of it (its
    modules, the CUDA context, the thread pools) takes 1-2 s a run (bench/bench_e2e.py's "exit"
    phase) and changes nothing: every output is closed and renamed into place by now, so the
    streams are flushed and the process ends at once. Without torch, a plain exit."""
    if "torch" not in sys.modules:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
