"""The one error type the steps raise for bad input, and the command-line wrapper that prints it."""

from __future__ import annotations

import logging
import sys
from typing import Callable


class VCUError(Exception):
    """Bad input: the message is one line naming the file or tensor and the rule it breaks."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a step's main() (its return value is the exit code, None meaning 0); bad input becomes
    one 'error:' line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return main(argv) or 0
    except VCUError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (no output was left behind)", file=sys.stderr)
        return 130
