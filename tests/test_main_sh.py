"""main.sh, the driver: run as the test's own copy with the test's own settings (VCU128_ROOT points it
at the tools), never the main.sh a user has edited, on a one-layer untrained Qwen2 built here (the
plumbing is what is tested: one layer runs every step, in a third of the time of the demo's two).

One copy runs in phases, each on what the phase before left: a run redirected to a file (the log
whole, a failing model does not stop the next, a summary), a re-run (every step up to date), a
removed output (its step runs again; the steps after it only where their inputs changed), a changed
setting (its step and the steps after it), --redo, and SIGTERM / Ctrl-C."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT

STEPS = ("quantize", "compile_sw", "lm_head", "hardware", "embedding_tokens", "verify")
START = "# ------------------------------------------------------------------ edit here\n"
END = "# ------------------------------------------------------------------ end of settings\n"


def own_main_sh(folder, **settings):
    """A copy of main.sh in `folder` whose settings block holds exactly `settings`."""
    text = (ROOT / "main.sh").read_text()
    head, rest = text.split(START)
    _, tail = rest.split(END)
    block = "".join(f"{k}={v}\n" for k, v in settings.items())
    (folder / "main.sh").write_text(head + START + block + END + tail)
    return folder / "main.sh"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from vcu128.demo.tiny_model import build_tiny_model

    base = tmp_path_factory.mktemp("main_sh")
    (base / "models").mkdir()
    build_tiny_model(base / "models" / "m", train_steps=0, progress=False, num_hidden_layers=LAYERS)
    return base


LAYERS = 1
# What verify checks in the packed folder: per layer 7 linears x (32 ports + a bias file) and 2 norms;
# the output layer's 32 ports and bias, the final norm, the RoPE and SiLU tables; 16 embedding parts.
PACKED_FILES = LAYERS * (7 * 33 + 2) + 33 + 1 + 2 + 16


def settings(base, **changes):
    s = dict(models="(missing m)", model_path=str(base / "models"), wbits=4, group_size=128, compile=1, lm_head_method='""',
             int4='""', ports=32, embedding_parts=16, device="cpu", calib=str(ROOT / "data" / "demo_corpus.txt"), nsamples=8,
             seqlen=64, extra_quantize_args="(--no_report)", extra_hardware_args="()")
    s.update(changes)
    return s


def env():
    e = {**os.environ, "VCU128_ROOT": str(ROOT)}
    e.pop("TQDM_DISABLE", None)  # the bars' final lines are part of what a log holds
    return e


def run(script, *args, redirect=None):
    """bash main.sh ARGS, optionally as `bash main.sh ARGS > FILE 2>&1` (what nohup and CI do)."""
    if redirect is None:
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env(), cwd=script.parent, timeout=300)
    quoted = " ".join(f"'{a}'" for a in args)
    r = subprocess.run(["bash", "-c", f"bash '{script}' {quoted} > '{redirect}' 2>&1"], env=env(), cwd=script.parent, timeout=300)
    r.stdout = redirect.read_text()
    return r


def ran(out, model="m"):
    """The steps that ran (not skipped) for `model`, in order."""
    return [s for s in re.findall(rf"^==> \[{model}\] (\w+)(?!: up to date)[ :(]", out, re.M)]


def skipped(out, model="m"):
    return re.findall(rf"^==> \[{model}\] (\w+): up to date, skipped", out, re.M)


def test_help_prints_usage_and_runs_nothing(tmp_path):
    script = own_main_sh(tmp_path, **settings(tmp_path))
    for flag in ("--help", "-h"):
        r = run(script, flag)
        assert r.returncode == 0 and r.stdout.startswith("usage: bash main.sh [--redo] [MODEL_FOLDER ...]"), r.stdout + r.stderr
    r = run(script, "--bogus")
    assert r.returncode == 2 and r.stderr.splitlines()[0] == "main.sh: error: unknown option --bogus"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["main.sh"]  # no log, no demo, nothing run


def test_runs_redirected_goes_on_after_a_failure_and_skips_what_is_up_to_date(work, tmp_path):
    script = own_main_sh(tmp_path, **settings(work))
    qdir = work / "models" / "m-W4A16-gptq"

    # 1. The configured models, output redirected to a file: the log is whole, from the first line.
    r = run(script, redirect=tmp_path / "run.log")
    out = r.stdout
    assert r.returncode == 1, out[-3000:]
    assert out.startswith("==> [missing] quantize (no record of an earlier run): python "), out[:500]
    assert "\0" not in out and "\r" not in out
    # the bits verdict; the tiny untrained model's board-model verdict may carry a warning
    assert ran(out) == list(STEPS) and re.search(rf"^verify: (OK|bits OK): {PACKED_FILES} files \(manifest.json lists them\)", out, re.M), out[-2000:]
    summary = out[out.index("main.sh: done") :].splitlines()
    assert re.fullmatch(r"missing +FAILED at quantize \(exit 2\): .*/models/missing: no such model folder; log: log/missing.log", summary[1]), summary
    assert re.fullmatch(r"m +ok \(quantize \d+ s, compile_sw \d+ s, lm_head \d+ s, hardware \d+ s, embedding_tokens \d+ s, verify \d+ s\); "
                        r"packed folder: .*/m-W4A16-gptq/compile/QWEN_BLOCK_write_data_port32", summary[2]), summary
    log = (tmp_path / "log" / "m.log").read_text()
    assert ran(log) == list(STEPS) and f"GPTQ: {LAYERS}/{LAYERS} layer in" in log and "\r" not in log and re.search(r"^verify: (OK|bits OK): ", log, re.M)
    report = (qdir / "compile" / "verify_report.json").stat().st_mtime_ns

    # 2. The same again, the model given as an argument: nothing to do.
    r = run(script, str(work / "models" / "m"))
    assert r.returncode == 0, r.stdout[-3000:]
    assert ran(r.stdout) == [] and skipped(r.stdout) == list(STEPS)
    assert re.search(r"^m +ok \(quantize up to date, compile_sw up to date, lm_head up to date, hardware up to date, "
                     r"embedding_tokens up to date, verify up to date\)", r.stdout, re.M), r.stdout
    assert (qdir / "compile" / "verify_report.json").stat().st_mtime_ns == report

    # 3. An output gone (the embedding parts): that step runs again; the step after it only if what it
    #    reads changed (the same parts, byte for byte: verify stays up to date).
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    shutil.rmtree(hw / "Embedding")
    r = run(script, str(work / "models" / "m"))
    assert r.returncode == 0, r.stdout[-3000:]
    assert ran(r.stdout) == ["embedding_tokens"] and skipped(r.stdout) == ["quantize", "compile_sw", "lm_head", "hardware", "verify"]
    assert re.search(r"^==> \[m\] embedding_tokens \(output .*/Embedding is missing\): ", r.stdout, re.M), r.stdout

    # 4. A changed setting runs its step again, and the steps after it.
    script = own_main_sh(tmp_path, **settings(work, embedding_parts=8))
    r = run(script, str(work / "models" / "m"))
    assert r.returncode == 0 and ran(r.stdout) == ["embedding_tokens", "verify"], r.stdout[-3000:]
    assert re.search(r"^==> \[m\] embedding_tokens \(the command line changed\): .* --parts 8$", r.stdout, re.M), r.stdout
    assert re.search(r"^==> \[m\] verify \(input .*/QWEN_BLOCK_write_data_port32 changed\): ", r.stdout, re.M), r.stdout
    assert len(list((hw / "Embedding").iterdir())) == 8

    # 4b. hardware.py's own options (extra_hardware_args): hardware runs with them, and what reads its folder.
    script = own_main_sh(tmp_path, **settings(work, embedding_parts=8, extra_hardware_args="(--silu_table fit)"))
    r = run(script, str(work / "models" / "m"))
    assert r.returncode == 0 and ran(r.stdout) == ["hardware", "embedding_tokens", "verify"], r.stdout[-3000:]
    assert re.search(r"^==> \[m\] hardware \(the command line changed\): .* --ports 32 --silu_table fit$", r.stdout, re.M), r.stdout
    assert json.loads((hw / "manifest.json").read_text())["assumptions"]["silu_table"] == "fit"

    # 5. --redo runs a step that is up to date (compile=0: quantize, skipped without it), here stopped
    #    by SIGTERM once it has started (the interrupted runs are tested below): the checkpoint is kept.
    script = own_main_sh(tmp_path, **settings(work, compile=0, embedding_parts=8))
    r = run(script, str(work / "models" / "m"))
    assert r.returncode == 0 and skipped(r.stdout) == ["quantize"] and "checkpoint: " + str(qdir) in r.stdout, r.stdout[-3000:]
    before = (qdir / "quant_report.json").read_bytes()
    code, text = interrupt(script, work / "models" / "m", "SIGTERM to main.sh", "--redo")
    assert code == 143 and ran(text) == ["quantize"] and re.search(r"^==> \[m\] quantize: python ", text, re.M), text[-3000:]
    assert (qdir / "quant_report.json").read_bytes() == before


def step_started(model: Path) -> bool:
    """quantize.py runs on `model`, started by main.sh's step runner (whose signal handlers are in place
    before it starts the step)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if len(args) > 1 and args[1].endswith(b"quantize.py") and str(model).encode() in args:  # not the runner's own command line
            return True
    return False


def interrupt(script: Path, model: Path, how: str, *args) -> tuple[int, str]:
    """Start `bash main.sh ARGS MODEL` (output to a file), interrupt it once quantize.py runs on `model`;
    (exit status, output)."""
    out = script.parent / "run.log"
    with open(out, "w") as f:
        # as from a terminal, SIGINT not ignored (a test run in the background inherits it ignored); or ignored
        # (a background job of a script): bash cannot trap it then, and knows the step's exit status instead
        sigint = signal.SIG_IGN if "ignored" in how else signal.SIG_DFL
        p = subprocess.Popen(["bash", str(script), *args, str(model)], stdout=f, stderr=subprocess.STDOUT,
                             env=env(), cwd=script.parent, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    deadline = time.monotonic() + 120
    while not step_started(model) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    if how.startswith("Ctrl-C"):
        os.killpg(p.pid, signal.SIGINT)  # what a terminal sends: to every process of the foreground group
    else:
        p.send_signal(signal.SIGTERM)  # what kill and batch schedulers send: to main.sh alone
    p.wait(timeout=120)
    return p.returncode, out.read_text()


@pytest.mark.parametrize("how", ["SIGTERM to main.sh", "Ctrl-C", "Ctrl-C, main.sh started with SIGINT ignored"])
def test_an_interrupted_run_says_interrupted(work, tmp_path, how):
    script = own_main_sh(tmp_path, **settings(work, compile=0, nsamples=64, seqlen=128))
    code, text = interrupt(script, work / "models" / "m", how, "--redo")
    assert code == (130 if how.startswith("Ctrl-C") else 143), text[-3000:]
    assert "main.sh: interrupted (SIG" in text and "FAILED" not in text and "failed" not in text, text[-3000:]
    assert re.search(r"^m +interrupted during quantize", text, re.M), text[-3000:]
    assert "\0" not in text and text.startswith("==> [m] quantize")
    log = (tmp_path / "log" / "m.log").read_text()
    assert log.startswith("==> [m] quantize") and "\0" not in log
    leftovers = [p.name for p in (work / "models").iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert leftovers == []  # the step's staging folder was removed
