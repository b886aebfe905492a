"""compile_sw.py packs every linear for the board as it writes its ints (the compile folder's
packed_ahead/, listed in packed_ahead.json: export/packing.py), and hardware.py, run after it as its
own command, takes a linear from there only where its own inputs are the very ones packed, with the
same ports and int4 code. The folders are, every byte, those of the steps with nothing packed ahead;
what hardware.py does not take stays where it was and is said; a linear that hardware.py would refuse
is not packed ahead, and hardware.py refuses it as it does without."""

import json
import threading

import numpy as np
import pytest
from test_chatglm import TINY_GLM
from test_int4_setting import record
from test_pipelined_export import TINY_QWEN, digests, raise_a_bias, staging_left
from test_safety import run_step
from test_tables import _clip_checkpoint_to_seven

from vcu128.export import compile_sw, hardware
from vcu128.export.compile_sw import compile_software
from vcu128.export.hardware import BoardOptions, pack_hardware
from vcu128.export.lm_head import quantize_lm_head
from vcu128.export.packing import (
    PACKED_AHEAD_DIR,
    PACKED_AHEAD_INDEX,
    packed_linear_bytes,
)
from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.layout import sw_linear_paths
from vcu128.format.model import LINEARS
from vcu128.format.synthetic import SyntheticSpec, write_gptq_checkpoint
from vcu128.io.errors import VCUError
from vcu128.io.output import disk_bytes

LAYER_LINEARS = 2 * len(LINEARS)  # the tiny models' two layers


def export(qdir, out, pack=True, rescale="auto", ports=32, int4=None, after_compile=None) -> int:
    """compile_sw (packing ahead for 32 ports, or not), lm_head, hardware into `out`; returns how
    many linears hardware took from packed_ahead/. `after_compile(out)`: a change to compile_sw's files."""
    compile_software(qdir, out, progress=False, fp16_rescale=rescale, ports=32 if pack else None)
    if after_compile is not None:
        after_compile(out)
    quantize_lm_head(qdir, out, progress=False)
    return pack_hardware(out, None, progress=False, opts=BoardOptions(ports=ports, int4=int4)).details["packed_ahead"]


def listed(compile_dir) -> list[str]:
    return sorted(json.loads((compile_dir / PACKED_AHEAD_DIR / PACKED_AHEAD_INDEX).read_text())["linears"])


@pytest.mark.parametrize("spec", [TINY_QWEN, TINY_GLM], ids=["qwen2", "chatglm"])
def test_hardware_takes_every_linear_compile_sw_packed_and_writes_the_same_bytes(tmp_path, spec):
    """ChatGLM too: its q, k, v parts of query_key_value, gate and up halves of dense_h_to_4h."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**spec, seed=3))
    assert export(qdir, tmp_path / "plain", pack=False) == 0
    compile_software(qdir, tmp_path / "ahead", progress=False)
    assert listed(tmp_path / "ahead") == sorted(lin.name(layer) for layer in range(2) for lin in LINEARS)
    on_disk = sum(disk_bytes(p.stat().st_size) for p in (tmp_path / "ahead" / PACKED_AHEAD_DIR).rglob("*.bin"))
    assert on_disk == packed_linear_bytes(GPTQCheckpoint(qdir).dims, 32, output_layer=False)  # what the free-space check asks for
    quantize_lm_head(qdir, tmp_path / "ahead", progress=False)
    assert pack_hardware(tmp_path / "ahead", progress=False).details["packed_ahead"] == LAYER_LINEARS
    # every file of both compile folders (compile_sw.json, the packed folder and its manifest included);
    # packed_ahead/ is gone, its files moved into the packed folder
    assert digests(tmp_path / "ahead") == digests(tmp_path / "plain")
    assert staging_left(tmp_path) == []


def test_the_steps_run_by_hand_say_what_was_packed_ahead_and_taken(tmp_path, caplog):
    caplog.set_level("INFO", logger="vcu128")
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    comp = qdir / "compile"
    for step, args in (("compile_sw", ["--quantize_model", qdir]), ("lm_head", ["--quantize_model", qdir]), ("hardware", ["--compile_dir", comp]),
                       ("embedding_tokens", ["--compile_dir", comp]),
                       ("verify", ["--quantize_model", qdir, "--hardware_dir", comp / "QWEN_BLOCK_write_data_port32", "--bits_only"])):
        code, err = run_step(step, *args)
        assert code == 0, (step, err)
    said = [r.getMessage() for r in caplog.records]
    assert (f"compile_sw: {LAYER_LINEARS} of {LAYER_LINEARS} linears also packed for the board (32 ports, int4 twos) in "
            f"{comp / PACKED_AHEAD_DIR}: hardware.py takes them from there") in said
    assert not (comp / PACKED_AHEAD_DIR).exists() and [m for m in said if "packed" in m and m.startswith("warning")] == []


def rewrite_a_qweight(compile_dir) -> None:
    """Layer 0's q_proj qweight.bin written again, the same bytes: another file than the one packed."""
    path = sw_linear_paths(compile_dir, LINEARS[0].name(0))["qweight"]
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)


def edit_a_qweight(compile_dir) -> None:
    """Layer 0's q_proj qweight.bin changed in place (a researcher's edit): one int, 3 to -3."""
    path = sw_linear_paths(compile_dir, LINEARS[0].name(0))["qweight"]
    q = np.memmap(path, "<i4", "r+")
    q[0] = 3 if q[0] != 3 else -3
    q.flush()
    del q


@pytest.mark.parametrize("change", ["rescaled", "sign_magnitude", "bias", "qweight rewritten", "qweight edited", "ports", "int4"])
def test_hardware_packs_itself_what_was_packed_from_other_inputs(tmp_path, change, caplog):
    """fp16 rescaling (k=1, m=1) is applied before compile_sw packs, and a checkpoint recorded as
    sign-magnitude is packed in that code: every linear is taken. A bias.bin of other bytes, a
    qweight.bin written again or edited in place: that linear is packed again, the rest taken. Other
    ports, another int4 code (two's complement asked of hardware.py over the sign-magnitude record):
    nothing is taken, and packed_ahead/ stays, said. Each folder is, every byte, the one the steps
    write with nothing packed ahead."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    if change in ("sign_magnitude", "int4"):
        _clip_checkpoint_to_seven(qdir)
        record(qdir, vcu128_int4="sign_magnitude", vcu128_int4_range=7)
    rescale = "k=1,m=1" if change == "rescaled" else "auto"
    after = {"bias": raise_a_bias, "qweight rewritten": rewrite_a_qweight, "qweight edited": edit_a_qweight}.get(change)
    board = dict(ports=16 if change == "ports" else 32, int4="twos" if change == "int4" else None)
    export(qdir, tmp_path / "plain", pack=False, rescale=rescale, after_compile=after, **board)
    caplog.set_level("INFO", logger="vcu128")
    taken = export(qdir, tmp_path / "ahead", rescale=rescale, after_compile=after, **board)
    left = change in ("ports", "int4")
    assert taken == (0 if left else LAYER_LINEARS if change in ("rescaled", "sign_magnitude") else LAYER_LINEARS - 1)
    hw = "QWEN_BLOCK_write_data_port16" if change == "ports" else "QWEN_BLOCK_write_data_port32"
    assert digests(tmp_path / "ahead" / hw) == digests(tmp_path / "plain" / hw)
    outside = lambda folder: {k: v for k, v in digests(folder).items() if not k.startswith(f"{PACKED_AHEAD_DIR}/")}  # noqa: E731
    assert outside(tmp_path / "ahead") == outside(tmp_path / "plain")
    not_taken = [r.getMessage() for r in caplog.records if "were not taken" in r.getMessage()]
    if left:
        assert listed(tmp_path / "ahead") == sorted(lin.name(layer) for layer in range(2) for lin in LINEARS)
        assert not_taken == [f"hardware: {LAYER_LINEARS} linears packed ahead in {tmp_path / 'ahead' / PACKED_AHEAD_DIR} were not taken "
                             "(packed from other inputs, or for other ports or another int4 code); compile_sw.py replaces them "
                             "when it runs again"]
    elif change in ("rescaled", "sign_magnitude"):
        assert not (tmp_path / "ahead" / PACKED_AHEAD_DIR).exists() and not_taken == []
    else:
        assert listed(tmp_path / "ahead") == [LINEARS[0].name(0)] and len(not_taken) == 1


def test_a_linear_hardware_would_refuse_is_not_packed_ahead(tmp_path, caplog):
    """Ints of -8 under a sign-magnitude record (a checkpoint edited by hand): compile_sw writes its
    files as ever and packs nothing ahead; hardware.py refuses with the same line as without."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    record(qdir, vcu128_int4="sign_magnitude", vcu128_int4_range=7)
    refusals = []
    for out, pack in ((tmp_path / "plain", False), (tmp_path / "ahead", True)):
        compile_software(qdir, out, progress=False, ports=32 if pack else None)
        quantize_lm_head(qdir, out, progress=False)
        with pytest.raises(VCUError) as e:
            pack_hardware(out, progress=False)
        refusals.append(str(e.value).replace(str(out), "<out>"))
    assert listed(tmp_path / "ahead") == []
    assert refusals[0] == refusals[1] and "-8" in refusals[0]
    assert not (tmp_path / "ahead" / "QWEN_BLOCK_write_data_port32").exists() and staging_left(tmp_path) == []


def test_a_damaged_list_is_said_and_everything_packed_again(tmp_path, caplog):
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    export(qdir, tmp_path / "plain", pack=False)
    compile_software(qdir, tmp_path / "ahead", progress=False)
    index = tmp_path / "ahead" / PACKED_AHEAD_DIR / PACKED_AHEAD_INDEX
    index.write_text('{"kind": "vcu128 linears packed ahead", "ports": 32')  # cut short
    quantize_lm_head(qdir, tmp_path / "ahead", progress=False)
    assert pack_hardware(tmp_path / "ahead", progress=False).details["packed_ahead"] == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "packed_ahead" in r.getMessage()] == [
        f"warning: {index}: not a list of linears packed ahead (Expecting ',' delimiter: line 1 column 52 (char 51)); "
        "hardware packs every linear itself"]
    hw = "QWEN_BLOCK_write_data_port32"
    assert digests(tmp_path / "ahead" / hw) == digests(tmp_path / "plain" / hw)


def test_a_file_gone_from_packed_ahead_packs_that_linear_again(tmp_path):
    """The linear stays listed (compile_sw.py's, its other files still there: a re-run replaces
    them, no --force needed); hardware.py packs it itself."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    export(qdir, tmp_path / "plain", pack=False)
    compile_software(qdir, tmp_path / "ahead", progress=False)
    quantize_lm_head(qdir, tmp_path / "ahead", progress=False)
    gone = tmp_path / "ahead" / PACKED_AHEAD_DIR / "BLOCK01" / "MVM_BN_write_to_HBM_bin" / "MVMBN0_q_HBM_DDR_03.bin"
    gone.unlink()
    assert pack_hardware(tmp_path / "ahead", progress=False).details["packed_ahead"] == LAYER_LINEARS - 1
    hw = "QWEN_BLOCK_write_data_port32"
    assert digests(tmp_path / "ahead" / hw) == digests(tmp_path / "plain" / hw)
    assert listed(tmp_path / "ahead") == [LINEARS[0].name(1)]
    compile_software(qdir, tmp_path / "ahead", progress=False, ports=16)  # its own files: replaced
    assert json.loads((tmp_path / "ahead" / PACKED_AHEAD_DIR / PACKED_AHEAD_INDEX).read_text())["ports"] == 16
    assert len(listed(tmp_path / "ahead")) == LAYER_LINEARS and staging_left(tmp_path) == []
    assert not (gone.parent / "MVMBN0_q_HBM_DDR_20.bin").exists()  # the first run's (32 ports) went with it


def test_a_failed_hardware_run_gives_back_what_it_took(tmp_path, monkeypatch):
    """hardware.py fails after taking the linears (here: writing its tables): they go back to
    packed_ahead/, and the next run takes them all."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    export(qdir, tmp_path / "plain", pack=False)
    compile_software(qdir, tmp_path / "ahead", progress=False)
    quantize_lm_head(qdir, tmp_path / "ahead", progress=False)
    before = digests(tmp_path / "ahead")

    def failing(*args):
        raise VCUError("the disk is full")

    monkeypatch.setattr(hardware, "write_tables", failing)
    with pytest.raises(VCUError):
        pack_hardware(tmp_path / "ahead", progress=False)
    assert digests(tmp_path / "ahead") == before and staging_left(tmp_path) == []
    monkeypatch.undo()
    assert pack_hardware(tmp_path / "ahead", progress=False).details["packed_ahead"] == LAYER_LINEARS
    assert digests(tmp_path / "ahead") == digests(tmp_path / "plain")


def test_a_disk_without_room_for_the_packed_files_too_gets_nothing_packed_ahead(tmp_path, monkeypatch, caplog):
    """Room for compile_sw's own files, not for the packed ones as well: one line, and hardware.py packs."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    dims = GPTQCheckpoint(qdir).dims
    monkeypatch.setattr(compile_sw, "free_bytes", lambda path: compile_sw.output_bytes(dims) + packed_linear_bytes(dims, 32, output_layer=False) - 1)
    caplog.set_level("INFO", logger="vcu128")
    result = compile_software(qdir, tmp_path / "c", progress=False)
    assert result.details["packed_ahead"] == 0 and not (tmp_path / "c" / PACKED_AHEAD_DIR).exists()
    assert (f"compile_sw: no room to pack the linears for the board as well (another "
            f"{packed_linear_bytes(dims, 32, output_layer=False) / 1e9:.1f} GB): hardware.py packs them from the files") in caplog.messages
    monkeypatch.setattr(compile_sw, "free_bytes", lambda path: compile_sw.output_bytes(dims) + packed_linear_bytes(dims, 32, output_layer=False))
    assert compile_software(qdir, tmp_path / "c", progress=False).details["packed_ahead"] == LAYER_LINEARS


def test_a_folder_linked_to_elsewhere_is_not_taken_from(tmp_path):
    """A folder of packed_ahead/ replaced by a link to the user's own files of the same names and
    sizes: hardware.py takes nothing from there, packs those linears itself, and the user's files
    stay where they are, as they were."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    export(qdir, tmp_path / "plain", pack=False)
    compile_software(qdir, tmp_path / "ahead", progress=False)
    quantize_lm_head(qdir, tmp_path / "ahead", progress=False)
    block = tmp_path / "ahead" / PACKED_AHEAD_DIR / "BLOCK01"
    mine = tmp_path / "mine"
    block.rename(mine)
    block.symlink_to(mine, target_is_directory=True)
    before = digests(mine)
    assert pack_hardware(tmp_path / "ahead", progress=False).details["packed_ahead"] == len(LINEARS)  # layer 0's
    hw = "QWEN_BLOCK_write_data_port32"
    assert digests(tmp_path / "ahead" / hw) == digests(tmp_path / "plain" / hw)
    assert digests(mine) == before and block.is_symlink()


def test_packed_ahead_linked_to_elsewhere_is_left_alone(tmp_path):
    """packed_ahead/ itself replaced by a link to a copy of it (the user's): nothing is taken from
    there, nothing there is moved or removed, its list included."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))
    export(qdir, tmp_path / "plain", pack=False)
    compile_software(qdir, tmp_path / "ahead", progress=False)
    quantize_lm_head(qdir, tmp_path / "ahead", progress=False)
    folder = tmp_path / "ahead" / PACKED_AHEAD_DIR
    mine = tmp_path / "mine"
    folder.rename(mine)
    folder.symlink_to(mine, target_is_directory=True)
    before = digests(mine)
    assert pack_hardware(tmp_path / "ahead", progress=False).details["packed_ahead"] == 0
    hw = "QWEN_BLOCK_write_data_port32"
    assert digests(tmp_path / "ahead" / hw) == digests(tmp_path / "plain" / hw)
    assert digests(mine) == before and folder.is_symlink()


def test_a_compile_sw_that_fails_leaves_nothing_and_no_thread_writing(tmp_path, monkeypatch):
    """The linears' files are written on threads of their own: a failure after them (here: the
    embedding) waits for those threads, then removes the stage; nothing is left, no thread runs on."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_QWEN, seed=3))

    def failing(*args):
        raise VCUError("the disk is full")

    monkeypatch.setattr(compile_sw, "write_embedding", failing)
    with pytest.raises(VCUError):
        compile_software(qdir, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists() and staging_left(tmp_path) == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("pack-ahead-finish")] == []
