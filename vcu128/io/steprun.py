"""Run one step for main.sh: its output (stdout and stderr) goes to our stdout as it comes and to a
log, appended, with a progress bar's last state only (what follows the last carriage return of a line).

    python -m vcu128.io.steprun LOG -- COMMAND...

Nothing is reopened: our stdout is written through the descriptor we were given, so the output stays
whole whether it is a terminal, a pipe or a file (`bash main.sh > run.log 2>&1`, nohup, CI).

Signals: the command runs in its own process group and gets exactly one SIGINT or SIGTERM from here
when we (or main.sh) receive one, so that its staging folders are removed once; a Ctrl-C on the
terminal reaches it only through us. Its output is copied to the end, and its exit status is ours
(128 + the signal if it died of one, or failed after we passed one on).

Standard library only: main.sh runs this between steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


class LogLines:
    """Appends to the log what a terminal would show last on each line: a line's text after its last
    carriage return (a progress bar's final state), written when the line ends."""

    def __init__(self, path: str):
        self.f = open(path, "ab", buffering=0)
        self.line = bytearray()

    def write(self, data: bytes) -> None:
        out = bytearray()
        *complete, rest = data.split(b"\n")
        for piece in complete:
            self.line += piece
            if self.line.endswith(b"\r"):  # a CRLF line end
                del self.line[-1:]
            out += self.line[self.line.rfind(b"\r") + 1 :] + b"\n"
            self.line.clear()
        self.line += rest
        cut = self.line.rfind(b"\r")
        if cut >= 0:
            del self.line[: cut + 1]
        if out:
            self.f.write(bytes(out))

    def close(self) -> None:
        if self.line:
            self.f.write(bytes(self.line) + b"\n")
            self.line.clear()
        self.f.close()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        except OSError:  # our stdout went away (a closed pipe): keep the log going
            return
        view = view[n:]


def _kill_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def run(log_path: str, command: list[str]) -> int:
    env = dict(os.environ)
    if os.isatty(1):
        env["VCU128_TTY"] = "1"  # bars live on the terminal; the log keeps their last state
    else:
        env.pop("VCU128_TTY", None)
    log = LogLines(log_path)
    forwarded: list[int] = []
    running: list[subprocess.Popen] = []

    def forward(signum, frame):
        if not forwarded:  # once: a second signal would interrupt the step's own clean-up
            forwarded.append(signum)
            if running:
                _kill_group(running[0].pid, signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # before the step starts: none is lost
        signal.signal(sig, forward)
    try:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    except OSError as e:
        message = f"error: {command[0]}: {e.strerror}\n".encode()
        write_all(1, message)
        log.write(message)
        log.close()
        return 127
    running.append(child)
    if forwarded:  # came while it was starting
        _kill_group(child.pid, forwarded[0])
    fd = child.stdout.fileno()
    while True:
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not data:
            break
        write_all(1, data)
        log.write(data)
    log.close()
    code = child.wait()
    if forwarded and code != 0:  # interrupted, however it ended (a signal during its start-up: a fatal error)
        return 128 + forwarded[0]
    return 128 - code if code < 0 else code


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m vcu128.io.steprun LOG -- COMMAND...", file=sys.stderr)
        return 2
    return run(argv[0], argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
