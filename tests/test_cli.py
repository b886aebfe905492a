"""What every step's command line does before any real work: --version, --help without the heavy
imports, a plain line for a missing environment, --device checked first, quantize's argument checks
before any model is opened, the option spellings; and the pieces main.sh runs between steps
(progress bars, the step runner, the up-to-date stamps) and the GPU setup's install line."""

import io
import os
import subprocess
import sys

import pytest
from conftest import ROOT

STEPS = ("quantize", "compile_sw", "lm_head", "hardware", "embedding_tokens", "verify")
HEAVY = ("torch", "transformers", "safetensors", "gptqmodel")


def cli(script, *args, python=(sys.executable,), env=None):
    return subprocess.run([*python, str(ROOT / f"{script}.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("step", STEPS)
def test_version_and_help_without_heavy_imports(step):
    r = cli(step, "--version")
    assert r.returncode == 0 and r.stdout.startswith("compiler-vcu128 0.1.0"), r.stdout + r.stderr
    # --help parses nothing heavy: -X importtime lists every module imported, on stderr.
    r = cli(step, "--help", python=(sys.executable, "-X", "importtime"))
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY), imported & set(HEAVY)


@pytest.mark.parametrize("step", STEPS)
def test_a_missing_environment_is_one_plain_line(step):
    """python3 without the venv: -S (no site-packages) and -E (no PYTHONPATH) leave only the standard library."""
    r = cli(step, "--help", python=(sys.executable, "-S", "-E"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["error: missing package 'tqdm': run 'source scripts/venv.sh' first (or bash main.sh)"]


def test_a_package_missing_inside_a_step_is_named(monkeypatch, capsys):
    from vcu128.io.errors import run_cli

    def main(argv):
        import vcu128_no_such_thing  # noqa: F401 (a third-party module that is not there)

    def our_bug(argv):
        import vcu128.no_such_module  # noqa: F401 (our own module missing: a bug)

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: missing package 'vcu128_no_such_thing': run 'source scripts/venv.sh' first (or bash main.sh)"]
    assert run_cli(our_bug, []) == 3
    assert "internal error" in capsys.readouterr().err


def test_device_is_checked_first(tmp_path):
    nope = tmp_path / "no-such-model"  # never opened: the device is checked before
    for script, args in (("quantize", ["--model", nope, "--calib", "random", "--no_report"]),
                         ("verify", ["--quantize_model", nope, "--hardware_dir", nope])):
        r = cli(script, *args, "--device", "gpu")
        assert r.returncode == 2 and r.stderr.splitlines() == [
            "error: --device gpu: expected cpu, cuda or cuda:N (N a device number, e.g. cuda:0)"], r.stderr
        import torch

        if torch.version.cuda is None:
            r = cli(script, *args, "--device", "cuda:0")
            assert r.returncode == 2, r.stderr
            assert r.stderr.splitlines()[0] == f"error: --device cuda:0: this torch ({torch.__version__}) has no CUDA; see README 'GPU setup'"
            assert r.stderr.splitlines()[1].startswith("hint: VCU128_TORCH=cuda source scripts/venv.sh")
            assert len(r.stderr.splitlines()) == 2


def test_device_numbers_past_the_count_and_no_device(monkeypatch):
    import torch

    from vcu128.io.devices import check_device
    from vcu128.io.errors import VCUError

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1" and check_device("cuda") == "cuda" and check_device("cpu") == "cpu"
    with pytest.raises(VCUError, match=r"^--device cuda:2: this machine has 2 CUDA devices \(cuda:0 \.\. cuda:1\)$"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(VCUError, match=r"^--device cuda:0: torch .* \(CUDA 13.0\) finds no CUDA device here$"):
        check_device("cuda:0")
    for bad in ("gpu", "cuda0", "cuda:", "cuda:-1", "CUDA:0", "mps"):
        with pytest.raises(VCUError, match="expected cpu, cuda or cuda:N"):
            check_device(bad)


def test_quantize_checks_its_arguments_before_opening_the_model(tmp_path):
    nope = tmp_path / "no-such-model"
    r = cli("quantize", "--model", nope, "--calib", "random")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: --calib random: pass --eval_text too, there is no held-out text to evaluate on",
        "hint: or pass --no_report: the held-out text is for the report only"]
    # --no_report needs no held-out text: the next thing checked is the model folder
    r = cli("quantize", "--model", nope, "--calib", "random", "--no_report")
    assert r.returncode == 2 and r.stderr.splitlines() == [f"error: {nope}: no such model folder"]
    r = cli("quantize", "--model", nope, "--calib", tmp_path / "nope.txt")
    assert r.returncode == 2 and r.stderr.splitlines() == [f"error: --calib {tmp_path / 'nope.txt'}: no such calibration file or dataset folder"]
    assert list(tmp_path.iterdir()) == []


def test_one_spelling_a_concept_old_ones_kept(tmp_path):
    """Each alias reaches its option: the run stops at the error that option causes (no model is opened)."""
    nope = tmp_path / "no-such-model"
    base = ["--model", nope, "--calib", "random", "--no_report"]
    for flags in (["--no_sym"], ["--no-sym"]):  # the board cannot run it: refused with --compile, naming the option
        r = cli("quantize", *base, *flags, "--compile")
        assert r.stderr.splitlines() == ["error: --no-sym with --compile: the board supports only 4-bit, group size 128, symmetric, no act-order"]
    for flags in (["--out", tmp_path / "q"], ["--quantize_model", tmp_path / "q"], ["--quantize-model", tmp_path / "q"], ["--quant", tmp_path / "q"],
                  ["--method", "rtn"], ["--lm_head_method", "rtn"], ["--parts", "8"], ["--embedding_parts", "8"]):
        r = cli("quantize", *base, *flags)
        assert r.stderr.splitlines() == [f"error: {nope}: no such model folder"], (flags, r.stderr)
    r = cli("quantize", *base, "--method", "nope")
    assert "argument --method/--lm_head_method/--lm-head-method: invalid choice: 'nope'" in r.stderr


def test_options_checks_need_no_model():
    from vcu128.io.errors import VCUError
    from vcu128.quant.options import QuantizeOptions, check_arguments

    check_arguments(QuantizeOptions(calib="random", report=False))
    with pytest.raises(VCUError, match="--calib random: pass --eval_text too"):
        check_arguments(QuantizeOptions(calib="random"))
    with pytest.raises(VCUError, match="--calib: pass a text file"):
        check_arguments(QuantizeOptions())


def test_gptqmodels_stdout_is_kept_off_unless_verbose(capfd):
    """quantize --engine gptqmodel: GPTQModel's banners and tables (print and raw writes to fd 1) are
    kept off stdout; when it fails, their last lines go to stderr with the error; --verbose shows them."""
    from vcu128.quant.quantize import quiet_stdout

    with quiet_stdout():
        print("banner", flush=True)
        os.write(1, b"table\n")
    assert capfd.readouterr().out == ""
    with pytest.raises(RuntimeError):
        with quiet_stdout():
            print("context line", flush=True)
            raise RuntimeError("boom")
    captured = capfd.readouterr()
    assert captured.out == "" and "GPTQModel's last output:\ncontext line" in captured.err
    with quiet_stdout(False):
        print("shown", flush=True)
    assert capfd.readouterr().out == "shown\n"


# --- progress bars -----------------------------------------------------------------------------


class FakeStream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_bars_in_a_file_are_one_line_each_and_live_on_a_terminal(monkeypatch):
    from vcu128.io import progress

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("VCU128_TTY", raising=False)
    for tty in (False, True):
        stream = FakeStream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(progress.bar(range(3), "layers", "layer")) == [0, 1, 2]
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        text = stream.getvalue()
        if tty:
            assert "\r" in text and "3/3" in text  # tqdm's live bar
        else:
            assert text.count("\n") == 1 and "\r" not in text and text.startswith("layers: 3/3 layer in ")
    stream = FakeStream(False)
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("VCU128_TTY", "1")  # main.sh's runner: the pipe ends on a terminal
    list(progress.bar(range(2), "x"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    list(progress.bar(range(2), "y"))
    list(progress.bar(range(2), "z", enabled=False))
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    assert "\r" in stream.getvalue() and "y" not in stream.getvalue() and "z" not in stream.getvalue()


def test_a_bar_stopped_by_an_error_prints_nothing(monkeypatch):
    from vcu128.io import progress

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    stream = FakeStream(False)
    monkeypatch.setattr(sys, "stderr", stream)
    with pytest.raises(ZeroDivisionError):
        for i in progress.bar(range(3), "x"):
            1 / (1 - i)
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    assert stream.getvalue() == ""


# --- main.sh's helpers --------------------------------------------------------------------------


def test_step_runner_passes_output_through_and_logs_each_bars_last_state(tmp_path):
    from vcu128.io.steprun import LogLines

    log = LogLines(str(tmp_path / "a.log"))
    for chunk in (b"start\n\rbar 1", b"0%\rbar 50%\rbar 1", b"00%\nCRLF line\r\n", b"no newline"):
        log.write(chunk)
    log.close()
    assert (tmp_path / "a.log").read_bytes() == b"start\nbar 100%\nCRLF line\nno newline\n"

    child = "import sys; sys.stderr.write('\\rbar 1\\rbar 2\\n'); print('out', flush=True); sys.exit(3)"
    out = tmp_path / "out"
    with open(out, "wb") as f:
        r = subprocess.run([sys.executable, "-m", "vcu128.io.steprun", str(tmp_path / "b.log"), "--", sys.executable, "-c", child],
                           stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=60)
    assert r.returncode == 3
    assert out.read_bytes() == b"\rbar 1\rbar 2\nout\n"  # as it came: a terminal would show the bar moving
    assert (tmp_path / "b.log").read_bytes() == b"bar 2\nout\n"


def test_up_to_date_stamps(tmp_path):
    from vcu128.io.uptodate import main, why_not_up_to_date

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "config.json").write_text("{}")
    (tmp_path / "in" / "big.bin").write_bytes(b"\0" * 100_000)
    (tmp_path / "in" / "compile").mkdir()
    (tmp_path / "out.json").write_text("1")
    stamp = tmp_path / "stamps" / "step.json"
    spec = ["--in", f"{tmp_path / 'in'}:!compile", "--out", str(tmp_path / "out.json"), "--made", str(tmp_path / "in" / "compile")]
    args = [str(stamp), *spec, "--", "python", "step.py", "--x", "1"]
    assert main(["check", *args]) == 1  # no record yet
    assert main(["record", *args]) == 0
    assert main(["check", *args]) == 0

    def why():
        return why_not_up_to_date(stamp, ["python", "step.py", "--x", "1"], [f"{tmp_path / 'in'}:!compile"], [str(tmp_path / "out.json")],
                                  [str(tmp_path / "in" / "compile")])

    assert why() is None
    (tmp_path / "in" / "compile" / "x").write_text("a later step's output")  # left out: no change
    assert why() is None
    assert why_not_up_to_date(stamp, ["python", "step.py", "--x", "2"], [], [], []) == "the command line changed"
    (tmp_path / "in" / "config.json").write_text('{"a": 1}')
    assert why() == f"input {tmp_path / 'in'} changed"
    main(["record", *args])
    os.utime(tmp_path / "in" / "big.bin", ns=(1, 1))  # large files by size and modification time
    assert why() == f"input {tmp_path / 'in'} changed"
    main(["record", *args])
    (tmp_path / "out.json").write_text("2")
    assert why() == f"output {tmp_path / 'out.json'} changed since"
    main(["record", *args])
    (tmp_path / "in" / "compile" / "x").unlink()
    (tmp_path / "in" / "compile").rmdir()
    assert why() == f"output {tmp_path / 'in' / 'compile'} is missing"


# --- GPU setup ----------------------------------------------------------------------------------


def venv_plan(**env):
    r = subprocess.run(["bash", "-c", f"source '{ROOT}/scripts/venv.sh'"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "VCU128_VENV_PLAN": "1", **env})
    return r.returncode, r.stdout.splitlines(), r.stderr


def test_gpu_setup_installs_torchs_cuda_build_of_the_pinned_version():
    pin = next(line.split("==")[1].strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch=="))
    venv = ROOT / ".venv" / "bin" / "python"
    rc, plain, _ = venv_plan(VCU128_TORCH="")
    assert rc == 0 and plain[-1] == f"{venv} -m pip install -q -r {ROOT / 'requirements.txt'}"
    assert not any("torch==" in line for line in plain)
    for variant, build in (("cuda", "cu130"), ("cu128", "cu128"), ("cpu", "cpu")):
        rc, lines, _ = venv_plan(VCU128_TORCH=variant)
        assert rc == 0
        # torch's build first, from PyTorch's index: requirements.txt's pin is then satisfied by it
        assert lines[-2:] == [f"{venv} -m pip install -q torch=={pin}+{build} --index-url https://download.pytorch.org/whl/{build}",
                              f"{venv} -m pip install -q -r {ROOT / 'requirements.txt'}"]
    rc, lines, _ = venv_plan(VCU128_TORCH="cuda", VCU128_TORCH_INDEX="https://mirror.example/cu130")
    assert lines[-2].endswith(f"torch=={pin}+cu130 --index-url https://mirror.example/cu130")
    rc, lines, err = venv_plan(VCU128_TORCH="gpu")
    assert rc == 2 and lines == [] and err.startswith("error: VCU128_TORCH=gpu: expected cuda, a CUDA variant")
