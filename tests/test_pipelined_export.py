"""quantize.py --compile writes compile_sw's qweight.bin files and lm_head's files during GPTQ's
layer walk, and packs every linear in the board's layout (export/pipeline.py ExportPrewriter, fed by
layerwise's on_shard): the same bytes as the steps run one after the other, nothing left behind when
the walk fails, compile_software's adoption of the files written ahead refuses any that is not whole,
and hardware.py takes a packed linear only where its own inputs are the ones it was packed from."""

import hashlib
import json
import os
import shutil
import threading
from concurrent.futures import wait

import numpy as np
import pytest
from conftest import ROOT
from safetensors.torch import load_file
from test_chatglm import TINY_GLM
from test_safety import run_step
from test_tables import _clip_checkpoint_to_seven

from vcu128.export import hardware, pipeline
from vcu128.export.compile_sw import compile_software, write_qweight
from vcu128.export.hardware import pack_hardware
from vcu128.export.lm_head import quantize_lm_head
from vcu128.export.packing import PACKED_AHEAD_DIR
from vcu128.export.pipeline import ExportPrewriter
from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.layout import sw_linear_paths
from vcu128.format.model import LINEARS
from vcu128.format.synthetic import SyntheticSpec, write_gptq_checkpoint
from vcu128.io.errors import VCUError
from vcu128.io.output import HOST, disk_bytes, out_path
from vcu128.quant import layerwise

CALIB = ["--calib", ROOT / "data" / "demo_corpus.txt", "--nsamples", "8", "--seqlen", "64"]
TINY_QWEN = dict(hidden=256, intermediate=384, num_layers=2, num_heads=4, num_kv_heads=2, vocab=256)


def digests(folder) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`, hidden ones too."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def staging_left(folder) -> list[str]:
    return sorted(str(p) for p in folder.rglob(".*") if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture
def adopted(monkeypatch):
    """What the pipeline's steps adopted: compile_sw, how many qweight.bin files; lm_head, whether its
    files; hardware, how many linears packed ahead."""
    seen = []

    def packing(*args, **kwargs):
        result = pack_hardware(*args, **kwargs)
        seen.append(("hardware", result.details["packed_ahead"]))
        return result

    def compiling(*args, **kwargs):
        result = compile_software(*args, **kwargs)
        seen.append(("compile_sw", result.details["qweights_adopted"]))
        return result

    def lm_head(*args, **kwargs):
        result = quantize_lm_head(*args, **kwargs)
        seen.append(("lm_head", result[0].details["adopted"]))
        return result

    monkeypatch.setattr(pipeline, "compile_software", compiling)
    monkeypatch.setattr(pipeline, "quantize_lm_head", lm_head)
    monkeypatch.setattr(pipeline, "pack_hardware", packing)
    return seen


BOARD_FLAGS = ["--rope_table", "pairs", "--silu_table", "fit", "--max_token", "1024"]


@pytest.mark.parametrize("flags", [[], ["--lm_head"], BOARD_FLAGS], ids=["rtn output layer", "GPTQ output layer", "hardware's options"])
def test_compile_during_gptq_writes_the_bytes_of_the_steps_run_one_after_another(tiny_untrained_model, tmp_path, adopted, flags):
    """All made during the walk; with --lm_head the output layer is GPTQ's, which lm_head.py takes
    from the checkpoint and hardware.py packs itself, after the walk. hardware.py's options given to
    quantize.py --compile give the folder hardware.py gives with them."""
    q = tmp_path / "q"
    code, err = run_step("quantize", "--model", tiny_untrained_model, "--out", q, *CALIB, *flags, "--compile")
    assert code == 0, err
    gptq_output_layer = "--lm_head" in flags
    assert adopted == [("compile_sw", 2 * len(LINEARS)), ("lm_head", not gptq_output_layer),
                       ("hardware", 2 * len(LINEARS) + (not gptq_output_layer))]
    assert staging_left(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    pipelined = digests(q)
    assert sum(rel.endswith(".qweight.bin") for rel in pipelined) == 2 * len(LINEARS)
    # The same checkpoint, its export run again by each step's command line, one after the other
    shutil.move(q / "compile", tmp_path / "pipelined")
    for step, args in (("compile_sw", ["--quantize_model", q]), ("lm_head", ["--quantize_model", q]),
                       ("hardware", ["--compile_dir", q / "compile", *(f for f in flags if f != "--lm_head")]),
                       ("embedding_tokens", ["--compile_dir", q / "compile"])):
        code, err = run_step(step, *args)
        assert code == 0, (step, err)
    assert digests(q) == pipelined
    if flags == BOARD_FLAGS:
        manifest = json.loads((q / "compile" / "QWEN_BLOCK_write_data_port32" / "manifest.json").read_text())
        assert {k: manifest["assumptions"][k] for k in ("rope_table", "silu_table", "max_token")} == {"rope_table": "pairs", "silu_table": "fit", "max_token": 1024}


def test_hardwares_options_to_quantize_are_checked_before_the_model(tiny_untrained_model, tmp_path):
    """Without --compile they would do nothing; a table the model cannot have is refused before GPTQ."""
    base = ["--model", tiny_untrained_model, "--out", tmp_path / "q", *CALIB]
    assert run_step("quantize", *base, "--silu_table", "fit") == (
        2, "error: --silu_table is hardware.py's option: it takes effect with --compile\nhint: or pass it to hardware.py\n")
    assert run_step("quantize", *base, "--compile", "--rope_table", "glm") == (
        2, "error: --rope_table glm: a qwen2 model's RoPE table is halves or pairs (rotate-half)\n")
    assert run_step("quantize", *base, "--compile", "--max_token", str(2**24 + 1))[1].startswith("error: --max_token 16777217: expected 1 to 16777216")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["error", "Ctrl-C"])
def test_a_walk_that_fails_leaves_nothing_behind(tiny_untrained_model, tmp_path, monkeypatch, how):
    """GPTQ fails on layer 1, once layer 0's qweight.bin files are written ahead: no checkpoint, no
    staging folder, no files written ahead, no parent folder the run made."""
    layer0_written = threading.Event()
    seen, packed_then = [], 0
    call, run_layer = ExportPrewriter.__call__, layerwise.LayerQuantizer.run_layer

    def prewrite(self, index, tensors):
        call(self, index, tensors)
        if index == 0:
            wait(self.packing)
            layer0_written.set()

    def fail_on_layer_1(self, prefix):
        if prefix == "model.layers.1":
            assert layer0_written.wait(60)
            seen.extend(p.name for p in (tmp_path / "new").glob(".q.partial-*@compile_sw/*/*/*qweight.bin"))
            nonlocal packed_then
            packed_then = len(list((tmp_path / "new").glob(".q.partial-*@compile_sw/hardware/BLOCK00/*/*_wt_and_bias_in_DDR.bin")))
            raise KeyboardInterrupt if how == "Ctrl-C" else VCUError("planted")
        return run_layer(self, prefix)

    monkeypatch.setattr(ExportPrewriter, "__call__", prewrite)
    monkeypatch.setattr(layerwise.LayerQuantizer, "run_layer", fail_on_layer_1)
    code, err = run_step("quantize", "--model", tiny_untrained_model, "--out", tmp_path / "new" / "q", *CALIB, "--compile")
    assert (code, err) == ((130, "error: interrupted (no output was left behind)\n") if how == "Ctrl-C" else (2, "error: planted\n"))
    assert sorted(seen) == sorted([f"{lin.name(0)}.qweight.bin" for lin in LINEARS] + ["lm_head_qweight.bin"])  # something to remove
    assert packed_then == len(LINEARS)  # layer 0's linears packed for the board too (a bias words file each)
    assert list(tmp_path.iterdir()) == []
    assert [t.name for t in threading.enumerate() if t.name.startswith(("pack-ahead", "shard-sink"))] == []  # joined by the run
    for t in [t for t in threading.enumerate() if t.name == "background-_write_lm_head"]:
        t.join(60)  # its result handed over, it may still be returning: it must end, not go on writing
        assert not t.is_alive()


def test_an_error_writing_ahead_leaves_compile_sw_to_write_them(tiny_untrained_model, tmp_path, monkeypatch, adopted, caplog):
    """The disk fails while layer 1's files are written ahead: GPTQ goes on, the folder written ahead
    goes, and compile_sw writes every qweight.bin itself (as without the overlap)."""
    def failing(qweight, path):
        if ".layers.1." in path.name:
            raise OSError(28, "No space left on device", str(path))
        write_qweight(qweight, path)

    monkeypatch.setattr(pipeline, "write_qweight", failing)  # what is written ahead; compile_sw's own calls go through
    q = tmp_path / "q"
    code, err = run_step("quantize", "--model", tiny_untrained_model, "--out", q, *CALIB, "--compile")
    assert code == 0, err
    ahead = out_path(tmp_path).parent / tmp_path.name / f".q.partial-{os.getpid()}@{HOST}@compile_sw"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"warning: compile_sw's qweight.bin files could not be written during GPTQ ([Errno 28] No space left on device: "
        f"'{ahead}/compile/qwen2_qweight_bin/model.layers.1.self_attn.q_proj.qweight.bin'); compile_sw writes them after it"]
    # compile_sw, writing the ints itself, packs the layers' linears as it goes: hardware takes them
    assert adopted == [("compile_sw", 0), ("lm_head", True), ("hardware", 2 * len(LINEARS))] and staging_left(tmp_path) == []
    assert not (q / "compile" / PACKED_AHEAD_DIR).exists()
    ckpt = GPTQCheckpoint(q)
    name = LINEARS[0].name(1)
    want = ckpt.signed_weights(ckpt.get(f"{name}.qweight"), np.dtype("<i4"))
    assert np.array_equal(np.fromfile(sw_linear_paths(q / "compile", name)["qweight"], "<i4").reshape(want.shape), want)


def written_ahead(qdir, target, lm_head=("rtn", 8), board=None):
    """An ExportPrewriter fed each shard of a synthetic checkpoint (one shard a layer and one of the
    rest, under the source model's names: what GPTQ's walk hands it), the rest's first."""
    prewriter = ExportPrewriter(target, qdir, lm_head, board)
    layers = GPTQCheckpoint(qdir).dims.num_layers
    for i in [layers, *range(layers)]:
        prewriter(i, load_file(qdir / f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors"))
    assert prewriter.failed is None
    return prewriter


@pytest.mark.parametrize("spec", [TINY_QWEN, TINY_GLM], ids=["qwen2", "chatglm"])
def test_adopted_qweights_are_the_bytes_compile_sw_writes(tmp_path, spec):
    """Fused tensors too (ChatGLM's query_key_value: its q, k, v parts; its output layer in halves)."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**spec, seed=3))
    prewriter = written_ahead(qdir, tmp_path / "target")
    assert prewriter.folder == out_path(tmp_path).parent / tmp_path.name / f".target.partial-{os.getpid()}@{HOST}@compile_sw"
    assert prewriter.written() == prewriter.folder / "compile"
    plain = compile_software(qdir, tmp_path / "plain", progress=False)
    result = compile_software(qdir, tmp_path / "adopted", progress=False, qweights_from=prewriter.written())
    assert result.details["qweights_adopted"] == 2 * len(LINEARS) and plain.details["qweights_adopted"] == 0
    plain_lm = quantize_lm_head(qdir, tmp_path / "plain", progress=False)
    lm = quantize_lm_head(qdir, tmp_path / "adopted", progress=False, ahead=prewriter.lm_head_written())
    assert (lm[0].details, plain_lm[0].details, lm[1:]) == ({"adopted": True}, {"adopted": False}, plain_lm[1:])
    # compile_sw alone also packs the linears ahead, as it writes their ints (hardware.py's to take)
    assert digests(tmp_path / "adopted") == {rel: d for rel, d in digests(tmp_path / "plain").items() if not rel.startswith(f"{PACKED_AHEAD_DIR}/")}
    assert [p for p in prewriter.folder.rglob("*") if p.is_file()] == []  # renamed, not copied
    prewriter.remove()
    assert staging_left(tmp_path) == []


def test_adoption_refuses_a_qweight_that_is_not_whole(tmp_path):
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    folder = written_ahead(qdir, tmp_path / "target", lm_head=None).written()
    q_proj = sw_linear_paths(folder, "model.layers.1.self_attn.q_proj")["qweight"]
    before = digests(folder)

    def refused() -> str:
        with pytest.raises(VCUError) as e:
            compile_software(qdir, tmp_path / "out", progress=False, qweights_from=folder)
        assert not (tmp_path / "out").exists() and staging_left(tmp_path / "q") == []
        return str(e.value)

    with open(q_proj, "r+b") as f:
        f.truncate(256 * 256 * 4 - 4)
    assert refused() == f"{q_proj}: 262140 bytes, expected 262144 (int32 [256, 256]): a qweight.bin written ahead that is not whole"
    q_proj.unlink()
    assert refused() == f"{q_proj}: missing: the qweight.bin files written ahead are incomplete"
    q_proj.symlink_to(sw_linear_paths(folder, "model.layers.0.self_attn.q_proj")["qweight"])
    assert refused() == f"{q_proj}: not a plain file (a qweight.bin written ahead is one)"
    q_proj.unlink()
    assert refused() == f"{q_proj}: missing: the qweight.bin files written ahead are incomplete"
    assert {rel: d for rel, d in digests(folder).items()} == {rel: d for rel, d in before.items() if not rel.endswith("layers.1.self_attn.q_proj.qweight.bin")}
    shutil.rmtree(folder)
    with pytest.raises(VCUError, match="not a folder of qweight.bin files written ahead"):
        compile_software(qdir, tmp_path / "out", progress=False, qweights_from=folder)


def test_lm_head_writes_its_files_itself_where_those_written_ahead_are_not_what_it_would_write(tmp_path):
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    ahead = written_ahead(qdir, tmp_path / "target").lm_head_written()  # rtn on -8..7
    want = {}
    for method in ("rtn", "trunc"):
        quantize_lm_head(qdir, tmp_path / f"plain_{method}", method, progress=False)
        want[method] = digests(tmp_path / f"plain_{method}")
    result, _, _ = quantize_lm_head(qdir, tmp_path / "trunc", "trunc", progress=False, ahead=ahead)  # another method
    assert not result.details["adopted"] and digests(tmp_path / "trunc") == want["trunc"]
    result, _, _ = quantize_lm_head(qdir, tmp_path / "seven", progress=False, int4_range=7, ahead=ahead)  # another grid
    assert not result.details["adopted"]
    with open(ahead.paths["scales"], "r+b") as f:  # a file that is not whole
        f.truncate(100)
    result, _, _ = quantize_lm_head(qdir, tmp_path / "short", progress=False, ahead=ahead)
    assert not result.details["adopted"] and digests(tmp_path / "short") == want["rtn"]
    assert ahead.paths["qweight"].stat().st_size == 256 * 256 * 4  # left where it was


def test_a_folder_of_the_prewriters_name_it_did_not_create_is_left_alone(tmp_path, caplog):
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    target = tmp_path / "target"
    prewriter = ExportPrewriter(target, qdir, None)
    (prewriter.folder / "compile").mkdir(parents=True)  # there before it (same pid and host: another tool's, or a reused pid)
    (prewriter.folder / "compile" / "theirs.bin").write_bytes(b"theirs")
    layers = GPTQCheckpoint(qdir).dims.num_layers
    prewriter(0, load_file(qdir / f"model-00001-of-{layers + 1:05d}.safetensors"))
    assert prewriter.failed is not None and prewriter.written() is None
    prewriter.remove()
    assert (prewriter.folder / "compile" / "theirs.bin").read_bytes() == b"theirs"


def export_by_steps(qdir, out, ahead=None, rescale="auto", ports=32, after_compile=None):
    """compile_sw, lm_head, hardware into `out`, with what `ahead` (an ExportPrewriter) made; returns
    how many linears hardware took from it. `after_compile(out)`: a change to compile_sw's files.
    compile_sw packs nothing ahead itself here (test_packed_ahead.py tests that)."""
    compile_software(qdir, out, progress=False, fp16_rescale=rescale, qweights_from=ahead.written() if ahead else None, ports=None)
    if after_compile is not None:
        after_compile(out)
    quantize_lm_head(qdir, out, progress=False, ahead=ahead.lm_head_written() if ahead else None)
    result = pack_hardware(out, None, ports, progress=False, ahead=ahead.packed_ahead() if ahead else None)
    return result.details["packed_ahead"]


@pytest.mark.parametrize("spec", [TINY_QWEN, TINY_GLM], ids=["qwen2", "chatglm"])
def test_linears_packed_ahead_are_the_words_hardware_writes(tmp_path, spec):
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**spec, seed=3))
    assert export_by_steps(qdir, tmp_path / "plain") == 0
    prewriter = written_ahead(qdir, tmp_path / "target", board=(32, "twos"))
    assert export_by_steps(qdir, tmp_path / "adopted", prewriter) == 2 * len(LINEARS) + 1  # every linear and the output layer
    assert digests(tmp_path / "adopted") == digests(tmp_path / "plain")  # the manifests too
    assert [p for p in (prewriter.folder / "hardware").rglob("*") if p.is_file()] == []  # renamed, not copied
    prewriter.remove()
    assert staging_left(tmp_path) == []


def raise_a_bias(compile_dir) -> None:
    """Layer 0's q_proj bias one fp16 step up (the same size: only its bytes differ)."""
    path = sw_linear_paths(compile_dir, LINEARS[0].name(0))["bias"]
    path.write_bytes((np.fromfile(path, "<u2") + 1).astype("<u2").tobytes())


@pytest.mark.parametrize("change", ["rescaled", "bias", "ports", "int4", "qweight rewritten"])
def test_hardware_packs_itself_what_was_packed_from_other_inputs(tmp_path, change, caplog, monkeypatch):
    """fp16 rescaling changes the scales and biases it was packed from (k=1, m=1: each layer's o_proj
    and up_proj carry 1/2, its down_proj 2^(m-k) = 1; the output layer, which lm_head.py makes, 1):
    those two a layer are packed again, the other five and the output layer taken. A bias.bin of other
    bytes (q_proj's, which has one) is packed again too. Other ports, or another int4 code (the ints
    on -7..7, so that both codes pack every linear), pack other words: nothing is taken. A qweight.bin
    of the same bytes that is not the file packed (written again) is not taken either. The folder is
    the one the steps write alone, every byte, and nothing failed on the way."""
    bars, real_bar = [], hardware.bar
    monkeypatch.setattr(hardware, "bar", lambda *args: bars.append(real_bar(*args)) or bars[-1])
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    if change == "int4":
        _clip_checkpoint_to_seven(qdir)
    rescale, ports = ("k=1,m=1" if change == "rescaled" else "auto"), (16 if change == "ports" else 32)
    after = raise_a_bias if change == "bias" else None
    export_by_steps(qdir, tmp_path / "plain", rescale=rescale, ports=ports, after_compile=after)
    prewriter = written_ahead(qdir, tmp_path / "target", lm_head=("rtn", 7 if change == "int4" else 8),
                              board=(32, "sign_magnitude" if change == "int4" else "twos"))
    if change == "qweight rewritten":
        qweights = prewriter.written()
        for path in qweights.rglob("*.qweight.bin"):
            data = path.read_bytes()
            path.unlink()
            path.write_bytes(data)
    taken = export_by_steps(qdir, tmp_path / "adopted", prewriter, rescale=rescale, ports=ports, after_compile=after)
    assert taken == {"rescaled": 2 * 5 + 1, "bias": 2 * 7, "ports": 0, "int4": 0, "qweight rewritten": 1}[change]
    assert digests(tmp_path / "adopted") == digests(tmp_path / "plain")
    assert prewriter.pack_failed is None and [r.getMessage() for r in caplog.records if "packed" in r.getMessage()] == []
    assert [(b.desc, b.n, b.total) for b in bars] == [("hardware", 2, 2)] * 2  # each layer counted once, taken or packed
    prewriter.remove()
    assert staging_left(tmp_path) == []


def test_compile_sw_takes_the_qweights_only_once_their_packing_is_done(tmp_path, monkeypatch):
    """The packing reads the qweight.bin files that compile_sw renames away: written() waits for it
    (and lm_head_written() for the output layer's)."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    go, real = threading.Event(), pipeline.PackedAhead.pack

    def held(self, jobs):
        assert go.wait(60)
        real(self, jobs)

    monkeypatch.setattr(pipeline.PackedAhead, "pack", held)
    prewriter = written_ahead(qdir, tmp_path / "target", board=(32, "twos"))
    asking = [threading.Thread(target=ask) for ask in (prewriter.written, prewriter.lm_head_written)]
    for t in asking:
        t.start()
    for t in asking:
        t.join(0.5)
    assert [t.is_alive() for t in asking] == [True, True]  # held while the packing is
    go.set()
    for t in asking:
        t.join(60)
    assert [t.is_alive() for t in asking] == [False, False]
    assert len(prewriter.packed_ahead().linears) == 2 * len(LINEARS) + 1
    prewriter.remove()


def test_hardware_asks_the_disk_only_for_what_it_writes(tmp_path, monkeypatch):
    """The linears taken are already on the disk: the free space asked for is the rest."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    asked, real = [], hardware.staged_dir

    def staged(*args, **kwargs):
        asked.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(hardware, "staged_dir", staged)
    prewriter = written_ahead(qdir, tmp_path / "target", board=(32, "twos"))
    export_by_steps(qdir, tmp_path / "adopted", prewriter)
    packed = sum(disk_bytes(r.bytes) for _, records in prewriter.packed.linears.values() for r in records)
    dims = GPTQCheckpoint(qdir).dims
    assert asked == [hardware.output_bytes(dims, 32) - packed] and 0 < packed < hardware.output_bytes(dims, 32)
    prewriter.remove()


def test_an_error_packing_ahead_leaves_hardware_to_pack_them(tmp_path, monkeypatch, caplog):
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    export_by_steps(qdir, tmp_path / "plain")
    real = pipeline.PackedAhead.pack

    def failing(self, jobs):
        if jobs[0].name == LINEARS[0].name(1):
            raise OSError(28, "No space left on device")
        real(self, jobs)

    monkeypatch.setattr(pipeline.PackedAhead, "pack", failing)
    prewriter = written_ahead(qdir, tmp_path / "target", board=(32, "twos"))
    assert export_by_steps(qdir, tmp_path / "adopted", prewriter) == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "packed" in r.getMessage()] == [
        "warning: the board's files could not be packed during GPTQ ([Errno 28] No space left on device); hardware packs them after it"]
    assert digests(tmp_path / "adopted") == digests(tmp_path / "plain")
    prewriter.remove()
    assert staging_left(tmp_path) == []
