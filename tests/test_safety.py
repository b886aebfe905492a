"""Issue #18: what a new user's bad input must never do. Each class of bad input: a symlinked or
`..` path that reaches an input, glob characters and newlines in names, a file of the user's at a
name a step writes, a full disk, a damaged record, an option out of range, a model the gate let
through, a NaN or inf in a tensor. Every refusal is exit 2 and one `error:` line (and at most one
`hint:`), names the file, key or tensor, and leaves nothing behind: no staging folder, no partial
file, no parent folder the run created, the inputs and earlier outputs as they were."""

import contextlib
import errno
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, export_all
from safetensors.numpy import load_file, save_file
from test_refusals import edit_quant_config, edit_tensor, set_nibble

from vcu128.export.compile_sw import compile_software
from vcu128.export.hardware import pack_hardware
from vcu128.export.lm_head import quantize_lm_head
from vcu128.io import direct_io, output
from vcu128.io.errors import VCUError, describe_os_error, one_line, run_cli

HW = "QWEN_BLOCK_write_data_port32"
STEPS = ["compile_sw", "lm_head", "hardware", "embedding_tokens", "verify", "quantize"]


def _main(name):
    spec = importlib.util.spec_from_file_location(f"safety_cli_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


MAINS = {name: _main(name) for name in STEPS}


def run_step(name, *args):
    """(exit code, stderr) of a step's command line, run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_cli(MAINS[name], [str(a) for a in args])
    return code, err.getvalue()


def refused(code, err):
    """The one error line of a refusal (exit 2, at most a hint after it, no traceback)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert lines and lines[0].startswith("error: "), err
    assert len(lines) <= 2 and all(line.startswith("hint: ") for line in lines[1:]), err
    return lines[0]


def tree(folder):
    """{relative path: bytes} of every file under folder (symlinks not followed)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = b"link" if os.path.islink(p) else open(p, "rb").read()
    return out


def leftovers(*folders):
    """Staging and swapped-aside paths anywhere under the folders."""
    return [str(p) for f in folders for p in f.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture
def exported(make_checkpoint):
    return export_all(make_checkpoint())


def step_args(step, qdir):
    comp = qdir / "compile"
    return {"compile_sw": ["--quantize_model", qdir, "--fp16_rescale", "off"], "lm_head": ["--quantize_model", qdir],
            "hardware": ["--compile_dir", comp], "embedding_tokens": ["--compile_dir", comp]}[step]


# ---------------------------------------------------------------------------------------------
# Paths compared after resolving symlinks and `..`


@pytest.mark.parametrize("step", ["compile_sw", "lm_head", "hardware", "embedding_tokens"])
@pytest.mark.parametrize("how", ["link to its parent", "link to it", "link/..", "folder holding it"])
def test_an_out_that_reaches_an_input_through_a_symlink_is_refused_even_with_force(exported, tmp_path, step, how):
    qdir, comp = exported["qdir"], exported["compile"]
    inp = qdir if step in ("compile_sw", "lm_head") else comp
    link = tmp_path / "link"
    if how == "link to its parent":
        link.symlink_to(inp.parent)
        out = link / inp.name
    elif how == "link to it":
        link.symlink_to(inp)
        out = link
    elif how == "link/..":
        link.symlink_to(inp / ("compile" if inp == qdir else "qwen2_qweight_bin"))
        out = link / ".."
    else:
        link.symlink_to(inp.parent.parent)
        out = link
    before = tree(qdir)
    line = refused(*run_step(step, *step_args(step, qdir), "--out", out, "--force"))
    assert "is or contains the input" in line or "is or contains the checkpoint" in line, line
    assert tree(qdir) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("step", ["hardware", "embedding_tokens"])
def test_an_out_that_is_a_folder_the_step_reads_is_refused_even_with_force(exported, step):
    comp = exported["compile"]
    before = tree(comp)
    for sub in ("qwen2_qweight_bin", "qwen2_fp16_weight_bin") if step == "hardware" else ("qwen2_fp16_weight_bin",):
        line = refused(*run_step(step, "--compile_dir", comp, "--out", comp / sub, "--force"))
        assert f"is or contains the input {comp / sub}" in line
    assert tree(comp) == before


def test_a_new_folder_inside_an_input_through_a_symlink_is_fine_and_touches_nothing_else(exported, tmp_path):
    qdir = exported["qdir"]
    (tmp_path / "link").symlink_to(qdir)
    before = tree(qdir)
    code, err = run_step("compile_sw", "--quantize_model", qdir, "--fp16_rescale", "off", "--out", tmp_path / "link" / "compile2")
    assert code == 0, err
    assert {k: v for k, v in tree(qdir).items() if not k.startswith("compile2/")} == before
    assert (qdir / "compile2" / "compile_sw.json").is_file()


@pytest.mark.parametrize("how", ["link to its parent", "link to it", "link/.."])
def test_quantize_model_through_a_symlink_never_deletes_the_model(tiny_model, tmp_path, how):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    (model / "sub").mkdir()
    link = tmp_path / "link"
    link.symlink_to({"link to its parent": tmp_path, "link to it": model, "link/..": model / "sub"}[how])
    out = {"link to its parent": link / "m", "link to it": link, "link/..": link / ".."}[how]
    before = tree(model)
    line = refused(*run_step("quantize", "--model", model, "--calib", ROOT / "data" / "demo_corpus.txt", "--nsamples", 8, "--seqlen", 64,
                             "--quantize_model", out, "--force"))
    assert f"is or contains the input {model}" in line
    assert tree(model) == before


# ---------------------------------------------------------------------------------------------
# A step overwrites a file only where its records say it wrote it


def test_a_users_file_at_a_table_name_is_not_overwritten(make_checkpoint):
    qdir = make_checkpoint(num_heads=2, num_kv_heads=1)  # head_dim 128: the folder gets a RoPE table
    hw = export_all(qdir)["hw"]
    mine = hw / "pos_in_4_token4096_ch32.bin"
    mine.write_bytes(b"my own table")
    before = tree(hw)
    line = refused(*run_step("hardware", "--compile_dir", qdir / "compile", "--max_token", 4096))
    assert line == f"error: {mine}: exists and was not written by hardware.py (its records do not list it); not replacing it"
    assert tree(hw) == before and not leftovers(qdir)
    code, err = run_step("hardware", "--compile_dir", qdir / "compile", "--max_token", 4096, "--force")  # asked for: replaced
    assert code == 0, err
    assert mine.stat().st_size == 4096 * 256


def test_a_users_file_at_a_name_the_step_writes_is_refused_at_the_swap(exported):
    """Names not known before the work (here: 8 parts where there were 16) are checked at the swap."""
    comp, hw = exported["compile"], exported["hw"]
    mine = hw / "Embedding" / "Embedding_01-of-08.bin"
    mine.write_bytes(b"mine")
    before = tree(hw)
    line = refused(*run_step("embedding_tokens", "--compile_dir", comp, "--parts", 8))
    assert line == f"error: {mine}: exists and was not written by embedding_tokens.py (its records do not list it); not replacing it"
    assert tree(hw) == before and not leftovers(comp)


def test_lm_head_never_replaces_lm_head_files_it_did_not_write(exported):
    qdir, comp = exported["qdir"], exported["compile"]
    (comp / "lm_head.json").unlink()
    before = tree(comp)
    line = refused(*run_step("lm_head", "--quantize_model", qdir))
    assert line == f"error: {comp / 'qwen2_qweight_bin' / 'lm_head_qweight.bin'}: exists and was not written by lm_head.py; not replacing it"
    assert tree(comp) == before


# ---------------------------------------------------------------------------------------------
# Staging names are literal; a failed run leaves no parent folder; one error stays one line


@pytest.fixture
def other_run():
    """A live process that stands for another run of the tool: a child of this test, never a process
    outside it such as the parent (under mutation testing, a mutant of output._alive that sends a real
    signal instead of probing with 0 would kill the mutation runner itself)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield p
    p.kill()
    p.wait()


def test_staging_names_are_matched_literally(tmp_path, caplog, other_run):
    name = "hw [v2]"
    dead = tmp_path / f".{name}.partial-{2**22 + 4242}@{output.HOST}@abc"  # left by a killed run
    dead.mkdir()
    # another target's live staging folder that the glob `.hw [v2].partial-*` would have matched
    neighbour = tmp_path / f".hw v.partial-{other_run.pid}@{output.HOST}@abc"
    neighbour.mkdir()
    with output.staged_dir(tmp_path / name, "test") as stage:
        (stage / "x").write_text("x")
    assert not dead.exists() and neighbour.is_dir() and (tmp_path / name / "x").is_file()
    assert f"warning: removed {dead}" in caplog.text
    shutil.rmtree(tmp_path / name)
    live = tmp_path / f".{name}.partial-{other_run.pid}@{output.HOST}@abc"  # a live run on the same target
    live.mkdir()
    with pytest.raises(VCUError, match=rf"another run \(pid {other_run.pid} on .*\) is writing it right now"):
        with output.staged_dir(tmp_path / name, "test"):
            pass
    assert live.is_dir() and neighbour.is_dir()


def test_a_glob_named_target_end_to_end(exported, tmp_path, other_run):
    comp = exported["compile"]
    out = tmp_path / "hw [v2]*?"
    dead = tmp_path / f".{out.name}.partial-{2**22 + 4242}@{output.HOST}@abc"
    dead.mkdir()
    code, err = run_step("hardware", "--compile_dir", comp, "--out", out)
    assert code == 0, err
    assert not dead.exists() and (out / "manifest.json").is_file() and not leftovers(tmp_path)
    live = tmp_path / f".{out.name}.partial-{other_run.pid}@{output.HOST}@abc"
    live.mkdir()
    assert "another run" in refused(*run_step("hardware", "--compile_dir", comp, "--out", out))


def nan_in(qdir, name, row=0, col=0, value=np.nan):
    def change(t):
        t[row, col] = value
        return t

    edit_tensor(qdir, name, change)


@pytest.mark.parametrize("step", ["compile_sw", "lm_head", "hardware", "embedding_tokens"])
def test_a_failed_run_removes_the_parent_folders_it_created(exported, tmp_path, step):
    qdir, comp = exported["qdir"], exported["compile"]
    if step in ("compile_sw", "lm_head"):
        nan_in(qdir, "lm_head.weight" if step == "lm_head" else "model.embed_tokens.weight", 3, 2)
    else:
        emb = comp / "qwen2_fp16_weight_bin" / "model.embed_tokens.weight.bin"
        scales = comp / "qwen2_qweight_bin" / "model.layers.0.mlp.up_proj.scales.bin"
        target = scales if step == "hardware" else emb
        data = np.fromfile(target, "<f2")
        data[5] = np.inf
        data.tofile(target)
    line = refused(*run_step(step, *step_args(step, qdir), "--out", tmp_path / "a" / "b" / "c"))
    assert "is inf" in line or "is nan" in line, line
    assert not (tmp_path / "a").exists() and not leftovers(qdir)


def test_a_newline_in_a_path_keeps_every_line_one_line(make_checkpoint):
    qdir = make_checkpoint("q\nx [1]")
    cfg = json.loads((qdir / "config.json").read_text())
    (qdir / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    r = subprocess.run([sys.executable, str(ROOT / "compile_sw.py"), "--quantize_model", str(qdir)], capture_output=True, text=True)
    assert r.returncode == 2
    escaped = str(qdir).replace("\n", "\\n")
    assert r.stderr.splitlines() == [f"error: {escaped}/config.json: hidden_act 'gelu': the board's MLP computes SiLU(gate) * up only"]
    assert one_line("a\nb\rc\td\x1b") == "a\\nb\\rc\\td\\x1b"
    (qdir / "config.json").write_text(json.dumps(cfg))  # and a warning naming the path: one line too
    r = subprocess.run([sys.executable, str(ROOT / "compile_sw.py"), "--quantize_model", str(qdir), "--out", str(qdir / "c\nd")],
                       capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning" in line or "fp16" in line]
    assert warnings == [f"warning: {escaped}: no fp16 statistics (quant_report.json has none): not rescaled; --fp16_rescale measure measures them"]


# ---------------------------------------------------------------------------------------------
# A full disk: the real path, its filesystem's free space, nothing left


def full_disk(monkeypatch):
    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io, "_pwrite_all", no_space)


@pytest.mark.parametrize("step", ["compile_sw", "lm_head", "hardware", "embedding_tokens"])
def test_disk_full_names_the_output_and_leaves_nothing(exported, tmp_path, monkeypatch, step):
    qdir = exported["qdir"]
    before = tree(qdir)
    full_disk(monkeypatch)
    out = tmp_path / "a" / "b" / "c"
    line = refused(*run_step(step, *step_args(step, qdir), "--out", out))
    named = out / "qwen2_qweight_bin" if step == "lm_head" else out
    assert line.startswith(f"error: {named}: disk full (no space left on device); the step needs about "), line
    assert line.endswith(" are free there; nothing was left behind"), line
    assert not (tmp_path / "a").exists() and tree(qdir) == before and not leftovers(qdir)


def full_disk_open(monkeypatch):
    """open() in io/output (replace_file_atomically's) creates the file, then every write fails: a full disk."""
    real_open = open

    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *a, **k):
        if "w" in mode:
            real_open(path, mode).close()  # the partial file exists, as a real short write leaves it
            return Full()
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(output, "open", fake_open, raising=False)


def test_replace_file_atomically_on_a_full_disk_names_the_file_and_leaves_no_partial(tmp_path, monkeypatch):
    full_disk_open(monkeypatch)
    path = tmp_path / "verify_report.json"
    with pytest.raises(OSError) as e:
        output.replace_file_atomically(path, b"{}")
    assert e.value.filename == str(path) and e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    line, _ = describe_os_error(e.value)
    assert line.startswith(f"{path}: disk full (no space left on device), ") and line.endswith(" are free there; nothing was left behind")


def test_verify_report_on_a_full_disk_is_one_line_naming_it(exported, monkeypatch):
    qdir, hw = exported["qdir"], exported["hw"]
    full_disk_open(monkeypatch)
    line = refused(*run_step("verify", "--quantize_model", qdir, "--hardware_dir", hw, "--bits_only"))
    assert line.startswith(f"error: {hw.parent / 'verify_report.json'}: disk full (no space left on device), "), line
    assert not leftovers(hw.parent) and not (hw.parent / "verify_report.json").exists()


def test_quantize_disk_full_while_saving_the_checkpoint(tiny_model, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "a" / "b" / "q"
    line = refused(*run_step("quantize", "--model", tiny_model, "--calib", ROOT / "data" / "demo_corpus.txt", "--nsamples", 8,
                             "--seqlen", 64, "--no_report", "--quantize_model", out))
    assert line.startswith(f"error: {out}: disk full (no space left on device), ") and line.endswith("; nothing was left behind"), line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Records read strictly: one error naming the file and the key


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """An export whose checkpoint has a quant_report.json with statistics (copied into the compile
    folder) and whose compile folder carries an fp16 rescaling record."""
    from vcu128.format.synthetic import SyntheticSpec, write_gptq_checkpoint

    qdir = write_gptq_checkpoint(tmp_path_factory.mktemp("recorded") / "q", SyntheticSpec(hidden=128, intermediate=256, num_layers=1,
                                                                                          num_heads=2, num_kv_heads=1, vocab=64, seed=3))
    stats = {"measured_on": "test", "dtype": "float32", "layers": [{"layer": 0, "max_abs": {"q": 3.0, "gate": 7.0, "residual_mlp": 9.0}}],
             "gate_range": [-6.0, 7.0]}
    files = sorted(p.name for p in qdir.iterdir()) + ["quant_report.json"]
    (qdir / "quant_report.json").write_text(json.dumps({"tool": output.TOOL, "step": "quantize", "files": files, "activation_stats": stats}))
    export_all(qdir, fp16_rescale="k=1,m=1")
    return qdir


def damage_json(path, edit):
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(edit(doc)) if callable(edit) else edit)


def setitem(doc, keys, value):
    d = doc
    for k in keys[:-1]:
        d = d[k]
    if value is KeyError:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value
    return doc


RECORDS = [
    # (file, damage, step, what the error names)
    ("compile/compile_sw.json", ("made_from",), [], "hardware", "'made_from' is [], expected an object"),
    ("compile/compile_sw.json", ("made_from",), None, "embedding_tokens", "missing 'made_from'"),
    ("compile/compile_sw.json", ("made_from", "fingerprint"), 5, "hardware", "'made_from.fingerprint' is 5, expected a string"),
    ("compile/compile_sw.json", ("files",), "x", "compile_sw", "'files' is 'x', expected a list"),
    ("compile/compile_sw.json", ("files",), ["../../etc/passwd"], "compile_sw", "'files[0]' is '../../etc/passwd', expected a relative path"),
    ("compile/compile_sw.json", ("tool",), KeyError, "hardware", "'tool' is None, expected 'compiler-vcu128'"),
    ("compile/compile_sw.json", ("id",), ["x"], "embedding_tokens", "'id' is ['x'], expected a string"),
    ("compile/compile_sw.json", ("fp16_rescale",), "k=1", "hardware", "'fp16_rescale' is 'k=1', expected an object"),
    ("compile/compile_sw.json", None, "[1, 2]", "hardware", "expected a JSON object, found a JSON list"),
    ("compile/compile_sw.json", None, "{nope", "embedding_tokens", "not valid JSON"),
    ("compile/lm_head.json", ("files",), None, "lm_head", "missing 'files' (expected a list)"),
    ("compile/lm_head.json", ("relative_error",), "small", "hardware", "'relative_error' is 'small', expected a finite number"),
    ("compile/lm_head.json", ("made_from",), "q", "embedding_tokens", "'made_from' is 'q', expected an object"),
    ("quant_report.json", ("activation_stats",), [], "compile_sw", "'activation_stats' is [], expected an object"),
    ("quant_report.json", ("activation_stats",), "big", "compile_sw", "'activation_stats' is 'big', expected an object"),
    ("quant_report.json", ("activation_stats", "layers", 0, "max_abs"), KeyError, "compile_sw", "missing 'activation_stats.layers[0].max_abs'"),
    ("quant_report.json", ("activation_stats", "layers", 0), None, "compile_sw", "'activation_stats.layers[0]' is None, expected an object"),
    ("quant_report.json", ("activation_stats", "layers", 0, "max_abs", "q"), "3", "compile_sw", "'activation_stats.layers[0].max_abs.q' is '3', expected a number"),
    ("quant_report.json", ("activation_stats", "layers", 0, "max_abs", "q"), -1, "compile_sw", "'activation_stats.layers[0].max_abs.q' is -1, expected a number >= 0"),
    ("quant_report.json", ("activation_stats", "layers", 0, "layer"), 7, "compile_sw", "'activation_stats.layers[0].layer' is 7, expected at most 0"),
    ("quant_report.json", ("activation_stats", "layers"), {"0": 1}, "compile_sw", "'activation_stats.layers' is {'0': 1}, expected a list"),
    ("quant_report.json", ("activation_stats", "gate_range"), 5, "compile_sw", "'activation_stats.gate_range' is 5, expected [low, high]"),
    ("quant_report.json", ("activation_stats", "gate_range"), [5], "compile_sw", "'activation_stats.gate_range' is [5], expected [low, high]"),
    ("quant_report.json", ("activation_stats", "gate_range"), [5, -5], "compile_sw", "'activation_stats.gate_range' is [5, -5], expected [low, high]"),
    ("quant_report.json", ("files",), {"a": 1}, "quantize_owns", "'files' is {'a': 1}, expected a list"),
    ("quant_report.json", None, "{", "compile_sw", "quant_report.json: not valid JSON"),
    ("compile/activation_stats.json", ("gate_range",), [3], "hardware_fit", "'gate_range' is [3], expected [low, high]"),
    ("compile/activation_stats.json", ("layers",), "all", "hardware_fit", "'layers' is 'all', expected a list"),
    ("compile/activation_stats.json", None, "null", "hardware_fit", "expected a JSON object, found a JSON NoneType"),
    ("quantize_config.json", ("bits",), "4", "lm_head", "'bits' is '4', expected an integer"),
    ("quantize_config.json", ("sym",), "yes", "lm_head", "'sym' is 'yes', expected true or false"),
    ("quantize_config.json", ("desc_act",), 0, "compile_sw", "'desc_act' is 0, expected true or false"),
    ("quantize_config.json", ("group_size",), 64, "lm_head", "'group_size' is 64, but"),
    ("quantize_config.json", ("dynamic",), [1], "compile_sw", "'dynamic' is [1], expected an object"),
    ("compile/config.json", ("vcu128_fp16_rescale",), [], "hardware", "vcu128_fp16_rescale is list, expected an object"),
    ("compile/config.json", ("vcu128_fp16_rescale", "k"), "one", "hardware", "vcu128_fp16_rescale: fp16 rescaling k='one'"),
    ("compile/config.json", ("vcu128_fp16_rescale", "k"), KeyError, "hardware", "vcu128_fp16_rescale.k is missing"),
    ("compile/config.json", ("vcu128_fp16_rescale", "m"), 5, "hardware", "vcu128_fp16_rescale.m is int, expected a list"),
    ("compile/config.json", ("vcu128_fp16_rescale", "statistics"), 5, "hardware", "vcu128_fp16_rescale.statistics is 5, expected a string"),
]


@pytest.mark.parametrize("file, keys, value, step, message", RECORDS,
                         ids=[f"{r[0].split('/')[-1]}:{'.'.join(map(str, r[1] or ['whole']))}={r[2]!r}:{r[3]}" for r in RECORDS])
def test_a_damaged_record_is_one_error_naming_the_file_and_key(recorded, tmp_path, file, keys, value, step, message):
    qdir = tmp_path / "q"
    shutil.copytree(recorded, qdir, symlinks=True)
    path = qdir / file
    damage_json(path, value if keys is None else (lambda doc: setitem(doc, keys, value)))
    args = {"quantize_owns": None, "hardware_fit": ["--compile_dir", qdir / "compile", "--silu_table", "fit"]}.get(step)
    before = tree(qdir)
    if step == "quantize_owns":  # the checkpoint folder's owner record, as a re-run of quantize reads it
        from vcu128.quant.quantize import checkpoint_owns

        with pytest.raises(VCUError) as e:
            output.check_out(qdir, "quantize", checkpoint_owns, [])
        line = f"error: {e.value}"
    else:
        line = refused(*run_step(step.split("_fit")[0], *(args or step_args(step, qdir))))
    assert line.startswith(f"error: {path}: ") or f"{path}" in line, line
    assert message in line, line
    assert tree(qdir) == before and not leftovers(qdir)


# ---------------------------------------------------------------------------------------------
# Options and dimensions, each refused with one line before anything heavy runs


@pytest.mark.parametrize("value", ["1000000000", "16777217"])
def test_max_token_has_an_upper_bound(exported, value):
    line = refused(*run_step("hardware", "--compile_dir", exported["compile"], "--max_token", value))
    assert line.startswith(f"error: --max_token {value}: expected 1 to 16777216 (2^24: float32 positions are exact up to there")


def test_the_rope_table_is_written_in_pieces_with_the_same_bytes():
    from vcu128.format.tables import rope_table, rope_table_blocks

    for order in ("halves", "pairs"):
        whole = rope_table({"rope_theta": 1e6}, 3000, order, "config.json")
        pieces = np.concatenate(list(rope_table_blocks({"rope_theta": 1e6}, 3000, order, "config.json", positions_a_block=700)))
        assert np.array_equal(whole.view(np.uint16), pieces.view(np.uint16))


@pytest.mark.parametrize("mode", ["k=0,m=2000", "k=31", "k=99999999999999999999", "k=-1", "k=1,m=2,x", "auto,k=1"])
def test_fp16_rescale_out_of_range_is_one_line(make_checkpoint, mode):
    qdir = make_checkpoint()
    line = refused(*run_step("compile_sw", "--quantize_model", qdir, "--fp16_rescale", mode))
    assert line.startswith(f"error: --fp16_rescale {mode}: ")
    assert not (qdir / "compile").exists()


def test_verify_text_that_is_not_utf8(tiny_model, make_checkpoint, tmp_path):
    qdir = make_checkpoint(vocab=512)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / f, qdir / f)
    hw = export_all(qdir)["hw"]
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    for spelling in ("--eval_text", "--eval-text", "--text"):  # one name for held-out text in every step, the old one kept
        line = refused(*run_step("verify", "--quantize_model", qdir, "--hardware_dir", hw, spelling, text))
        assert line == f"error: --eval_text {text}: not UTF-8 text (byte 3); pass a UTF-8 text file"


def set_config(folder, **values):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(values)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_dimensions_past_the_boards_memory_are_refused_from_the_config(make_checkpoint):
    qdir = make_checkpoint()
    set_config(qdir, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
               vocab_size=152064)  # a 72B model
    line = refused(*run_step("compile_sw", "--quantize_model", qdir))
    assert "the model's packed int4 weights need 3" in line and "the board's HBM holds 8.59 GB (8 GiB" in line, line
    assert not (qdir / "compile").exists()


def test_a_hidden_size_of_2_to_the_20(make_checkpoint, tiny_model, tmp_path):
    qdir = make_checkpoint()
    set_config(qdir, hidden_size=2**20)
    for step in ("compile_sw", "lm_head"):
        line = refused(*run_step(step, "--quantize_model", qdir))
        assert line.startswith("error: model.layers.0.self_attn.q_proj.qweight: shape ")
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    set_config(model, hidden_size=2**20, head_dim=128)
    line = refused(*run_step("quantize", "--model", model, "--calib", ROOT / "data" / "demo_corpus.txt", "--quantize_model", tmp_path / "mq"))
    assert line == "error: model.embed_tokens.weight: shape [512, 256], expected [512, 1048576] from config.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "q"]


def test_quantize_refuses_what_the_machine_cannot_hold(tiny_model, tmp_path, monkeypatch):
    from vcu128.quant import quantize

    monkeypatch.setattr(quantize, "machine_memory", lambda device: 1 << 20)
    line = refused(*run_step("quantize", "--model", tiny_model, "--calib", ROOT / "data" / "demo_corpus.txt", "--quantize_model", tmp_path / "q"))
    assert "quantizing needs at least" in line and "the machine has 1.05 MB" in line, line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Gate holes


Q = "model.layers.1.self_attn.q_proj"


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda q: edit_quant_config(q, bits=3), r"bits=3: the board supports 4-bit weights only"),
        (lambda q: edit_quant_config(q, group_size=64), r"group_size=64: the board supports group size 128 only"),
        (lambda q: edit_quant_config(q, sym=False), r"sym=false: asymmetric"),
        (lambda q: edit_tensor(q, f"{Q}.qzeros", lambda z: set_nibble(z, (1, 3), 5, 0x6)), rf"{Q}.qzeros: asymmetric: group 1, column 29"),
        (lambda q: edit_tensor(q, f"{Q}.g_idx", lambda g: np.concatenate([g[128:], g[:128]])), rf"{Q}.g_idx: act-order: input row 0"),
    ],
    ids=["bits 3", "group 64", "sym", "qzeros", "g_idx"],
)
@pytest.mark.parametrize("method", [None, "rtn", "trunc"])
def test_lm_head_refuses_what_compile_sw_refuses(make_checkpoint, change, pattern, method):
    qdir = make_checkpoint()
    change(qdir)
    with pytest.raises(VCUError, match=pattern):
        quantize_lm_head(qdir, method=method, progress=False)
    with pytest.raises(VCUError, match=pattern):
        compile_software(qdir, progress=False)
    assert not (qdir / "compile").exists()


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(rope_theta=-10000), "'rope_theta' is -10000.0, expected a number above 1"),
        (dict(rope_theta=0), "'rope_theta' is 0.0, expected a number above 1"),
        (dict(rope_theta="10000"), "'rope_theta' is '10000', expected a finite number"),
        (dict(rope_theta=None, rope_parameters={"rope_theta": float("nan"), "rope_type": "default"}), "'rope_parameters.rope_theta' is nan, expected a finite number"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 0}), "'rope_scaling.factor' is 0.0, expected a number above 0"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192}), "llama3 scaling divides by their difference"),
        (dict(rope_scaling=[1]), "'rope_scaling' is [1], expected an object or null"),
    ],
    ids=["negative", "zero", "string", "nan", "linear factor 0", "llama3 equal factors", "list"],
)
def test_rope_values_that_give_no_finite_table_are_refused_naming_the_key(make_checkpoint, values, message):
    qdir = make_checkpoint(num_heads=2, num_kv_heads=1)  # head_dim 128
    export_all(qdir)
    comp = qdir / "compile"
    set_config(comp, **values)
    before = tree(comp)
    line = refused(*run_step("hardware", "--compile_dir", comp))
    assert line.startswith(f"error: {comp / 'config.json'}: ") and message in line, line
    assert tree(comp) == before
    set_config(qdir, **values)  # the gate: every step refuses the model
    line = refused(*run_step("compile_sw", "--quantize_model", qdir, "--force"))
    assert message in line


def test_seqlen_past_the_trained_positions_is_refused(tiny_model, tmp_path):
    trained = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    line = refused(*run_step("quantize", "--model", tiny_model, "--calib", ROOT / "data" / "demo_corpus.txt", "--seqlen", trained + 1,
                             "--quantize_model", tmp_path / "q"))
    assert line == (f"error: --seqlen {trained + 1}: the model was trained on at most {trained} positions "
                    f"({tiny_model / 'config.json'}: max_position_embeddings)")
    assert list(tmp_path.iterdir()) == []


def test_a_model_without_a_tokenizer_is_refused_naming_it(tiny_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("tokenizer*"))
    line = refused(*run_step("quantize", "--model", model, "--calib", ROOT / "data" / "demo_corpus.txt", "--quantize_model", tmp_path / "q"))
    assert line.startswith(f"error: {model}: no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---------------------------------------------------------------------------------------------
# NaN and inf: refused where they are read, naming the tensor and row


def nonfinite_cases():
    return [
        # (tensor, row, column, value, float dtype of the checkpoint, steps that read it, message)
        ("model.embed_tokens.weight", 200, 3, np.nan, "float16", ["compile_sw"], "model.embed_tokens.weight: row 200, column 3 is nan"),
        ("model.embed_tokens.weight", 7, 0, np.inf, "bfloat16", ["compile_sw"], "model.embed_tokens.weight: row 7, column 0 is inf"),
        ("model.norm.weight", None, 5, -np.inf, "float32", ["compile_sw"], "model.norm.weight: element 5 is -inf"),
        ("lm_head.weight", 100, 1, np.nan, "float16", ["lm_head"], "lm_head.weight: row 100, column 1 is nan"),
        ("lm_head.weight", 9, 2, 1e6, "float32", ["lm_head"], "lm_head.weight: row 9, group 0: largest |weight| 1000000.0 gives a scale outside fp16's range"),
        ("model.embed_tokens.weight", 11, 4, 1e6, "float32", ["compile_sw"], "model.embed_tokens.weight: row 11, column 4 is 1000000.0, outside fp16's range"),
        (f"{Q}.scales", 1, 17, np.nan, "float16", ["compile_sw"], f"{Q}.scales: row 1, column 17 is nan"),
        ("model.layers.0.self_attn.k_proj.bias", None, 9, np.inf, "float16", ["compile_sw"], "model.layers.0.self_attn.k_proj.bias: element 9 is inf"),
    ]


@pytest.mark.parametrize("name, row, col, value, dtype, steps, message", nonfinite_cases(),
                         ids=[f"{c[0].split('.')[-2]}.{c[0].split('.')[-1]}-{c[3]}-{c[4]}" for c in nonfinite_cases()])
def test_a_non_finite_value_in_the_checkpoint_is_refused_by_name_and_row(make_checkpoint, name, row, col, value, dtype, steps, message):
    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    qdir = make_checkpoint(float_dtype=dtype)
    shard = qdir / json.loads((qdir / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_torch(shard)
    t = tensors[name]
    if row is None:
        t[col] = torch.tensor(value, dtype=torch.float32).to(t.dtype)
    else:
        t[row, col] = torch.tensor(value, dtype=torch.float32).to(t.dtype)
    save_torch(tensors, shard)
    for step in steps:
        line = refused(*run_step(step, *step_args(step, qdir)))
        assert line.startswith(f"error: {message}"), line
    assert not (qdir / "compile").exists() and not leftovers(qdir)


def test_a_nan_in_an_embedding_row_no_evaluation_reaches_is_refused_in_every_step(exported):
    """compile_sw reads every row; the compile folder's table is checked again by embedding_tokens,
    and verify reads the checkpoint through the same reader."""
    qdir, comp = exported["qdir"], exported["compile"]
    emb = comp / "qwen2_fp16_weight_bin" / "model.embed_tokens.weight.bin"
    data = np.fromfile(emb, "<f2").reshape(256, 256)
    data[250, 7] = np.nan  # the last rows: seeded evaluation ids may never use them
    data.tofile(emb)
    line = refused(*run_step("embedding_tokens", "--compile_dir", comp))
    assert line == f"error: {emb}: row 250, column 7 is nan (not a finite number): the board would compute NaN or inf from it"
    nan_in(qdir, "model.embed_tokens.weight", 250, 7)
    assert refused(*run_step("compile_sw", "--quantize_model", qdir)).startswith("error: model.embed_tokens.weight: row 250, column 7 is nan")
    line = refused(*run_step("verify", "--quantize_model", qdir, "--hardware_dir", exported["hw"], "--bits_only"))
    assert line.startswith("error: model.embed_tokens.weight: row 250, column 7 is nan"), line


@pytest.mark.parametrize("engine", ["vcu128", "gptqmodel"])
def test_quantize_refuses_a_nan_in_the_source_model(tiny_model, tmp_path, engine):
    """The vcu128 engine refuses it as it reads the layer; GPTQModel loads the model itself, so the
    model is scanned first."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 4] = np.nan
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "a" / "q"
    line = refused(*run_step("quantize", "--model", model, "--calib", ROOT / "data" / "demo_corpus.txt", "--nsamples", 8, "--seqlen", 64,
                             "--no_report", "--engine", engine, "--quantize_model", out))
    assert line.startswith("error: model.layers.1.mlp.down_proj.weight: row 3, column 4 is nan"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_hardware_refuses_a_nan_in_the_compile_folder(exported):
    comp = exported["compile"]
    norm = comp / "qwen2_fp16_weight_bin" / "model.norm.weight.bin"
    data = np.fromfile(norm, "<f2")
    data[3] = np.nan
    data.tofile(norm)
    before = tree(exported["hw"])
    line = refused(*run_step("hardware", "--compile_dir", comp))
    assert line == f"error: {norm}: element 3 is nan (not a finite number): the board would compute NaN or inf from it"
    assert tree(exported["hw"]) == before
    with pytest.raises(VCUError):
        pack_hardware(comp, progress=False)
