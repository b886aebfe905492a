"""The steps take each other's outputs in any order, and say what they count (issue #19).

embedding_tokens.py before hardware.py: the packed folder is made around the parts, which are kept
byte for byte with their manifest entries. hardware.py --ports 16, then embedding_tokens.py: the parts
go into the folder hardware.py wrote (or one line says which to choose). --force names what it removes.
Every count a step prints is what its record lists, the same on a re-run."""

import hashlib
import json
import logging
import os

import pytest
from test_safety import leftovers, refused, run_step, tree

from vcu128.check.verify import bit_check
from vcu128.export.compile_sw import compile_software
from vcu128.export.embedding_tokens import split_embedding
from vcu128.export.hardware import pack_hardware
from vcu128.export.lm_head import quantize_lm_head
from vcu128.export.packing import PACKED_AHEAD_DIR

HW32, HW16 = "QWEN_BLOCK_write_data_port32", "QWEN_BLOCK_write_data_port16"
# A two-layer synthetic checkpoint with the board's head size (so the folder gets a RoPE table):
# compile_sw writes 7 linears x 3 files + 2 norms a layer, the final norm, the embedding and config.json;
# hardware.py 7 linears x (32 ports + a bias) + 2 norms a layer, the output layer's 33, its norm and the
# two tables; embedding_tokens.py 16 parts.
COMPILE_FILES, HW_FILES, PARTS = 2 * (7 * 3 + 2) + 3, 2 * (7 * 33 + 2) + 33 + 1 + 2, 16


@pytest.fixture
def compiled(make_checkpoint):
    qdir = make_checkpoint(num_heads=2, num_kv_heads=2)
    compile_software(qdir, progress=False)
    quantize_lm_head(qdir, progress=False)
    return qdir, qdir / "compile"


def lines(caplog):
    return [r.getMessage() for r in caplog.records]


def test_embedding_tokens_before_hardware_keeps_every_part(compiled, caplog):
    qdir, comp = compiled
    caplog.set_level(logging.INFO, logger="vcu128")
    emb = split_embedding(comp, progress=False)
    assert emb.out == comp / HW32 / "Embedding" and emb.files == PARTS
    assert emb.line().startswith(f"embedding: {PARTS} files (manifest.json beside them lists them), ")
    parts = tree(emb.out)
    own = json.loads(parts.pop("manifest.json"))
    assert own["kind"] == "embedding" and len(own["files"]) == PARTS

    result = pack_hardware(comp, progress=False)  # once refused: "not written by hardware.py ... pass --force"
    hw = result.out
    assert {k: v for k, v in tree(hw / "Embedding").items()} == parts  # every part kept, byte for byte
    manifest = json.loads((hw / "manifest.json").read_text())
    entries = {f["path"]: f for f in manifest["files"] if f.get("step") == "embedding_tokens"}
    assert entries == {f"Embedding/{f['path']}": {**f, "path": f"Embedding/{f['path']}"} for f in own["files"]}  # not a word lost
    assert all(hashlib.sha256(parts[p[len("Embedding/"):]]).hexdigest() == f["sha256"] for p, f in entries.items())
    assert manifest["embedding_parts"] == PARTS
    assert f"hardware: kept {hw / 'Embedding'}: the {PARTS} files embedding_tokens.py wrote there first (their entries moved " \
           "from Embedding/manifest.json into manifest.json)" in lines(caplog)
    assert result.files == HW_FILES and result.line().startswith(
        f"hardware: {HW_FILES} files (manifest.json lists them; Embedding/'s {PARTS} files kept), ")
    assert leftovers(comp) == []
    assert bit_check(qdir, hw, progress=False).ok

    # A re-run keeps them again and says the same count
    again = pack_hardware(comp, progress=False)
    assert again.files == HW_FILES and tree(hw / "Embedding") == parts
    assert bit_check(qdir, hw, progress=False).ok


def test_a_folder_holding_more_than_the_parts_is_refused_and_force_names_what_it_removes(compiled, caplog):
    qdir, comp = compiled
    split_embedding(comp, progress=False)
    (comp / HW32 / "notes.txt").write_text("mine")
    before = tree(comp)
    assert refused(*run_step("hardware", "--compile_dir", comp)) == (
        f"error: --out {comp / HW32}: exists and was not written by hardware.py; not replacing it")
    assert tree(comp) == before
    caplog.set_level(logging.INFO, logger="vcu128")
    pack_hardware(comp, progress=False, force=True)
    assert (f"warning: --force: removed {PARTS + 2} files that hardware.py did not write from {comp / HW32}: Embedding/Embedding_01-of-16.bin, "
            f"Embedding/Embedding_02-of-16.bin, Embedding/Embedding_03-of-16.bin and {PARTS - 1} more") in lines(caplog)


def test_embedding_tokens_finds_the_folder_hardware_wrote(compiled, caplog):
    qdir, comp = compiled
    pack_hardware(comp, ports=16, progress=False)
    emb = split_embedding(comp, progress=False)  # once: a new .../port32/Embedding
    assert emb.out == comp / HW16 / "Embedding"
    assert emb.line().startswith(f"embedding: {PARTS} files ({HW16}/manifest.json lists them), ")
    # what compile_sw packed ahead for 32 ports is left where it was
    assert sorted(p.name for p in comp.iterdir() if p.is_dir()) == [HW16, PACKED_AHEAD_DIR, "qwen2_fp16_weight_bin", "qwen2_qweight_bin"]
    assert bit_check(qdir, comp / HW16, progress=False).ok

    # Two packed folders made from this compile run: which one is not clear, so one line says how to choose
    pack_hardware(comp, progress=False)
    before = tree(comp)
    assert refused(*run_step("embedding_tokens", "--compile_dir", comp)) == (
        f"error: {comp} holds 2 packed folders made from it ({HW16}, {HW32}): which one gets the embedding parts is not clear; "
        f"pass --out {comp / HW16}/Embedding (or the other's)")
    assert tree(comp) == before
    # ... unless only one was made from the compile folder as it is now
    shard = next(qdir.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # the checkpoint changed: a new compile_sw run
    compile_software(qdir, progress=False)
    pack_hardware(comp, progress=False)  # port32 is made again; port16 is stale
    assert split_embedding(comp, progress=False).out == comp / HW32 / "Embedding"


def test_every_count_is_what_the_step_wrote_the_same_on_a_re_run(compiled, caplog):
    qdir, comp = compiled
    first = compile_software(qdir, progress=False)
    record = json.loads((comp / "compile_sw.json").read_text())
    assert first.files == len(record["files"]) == COMPILE_FILES
    assert first.line().startswith(f"compile_sw: {COMPILE_FILES} files (compile_sw.json lists them), ")
    assert first.bytes == sum((comp / f).stat().st_size for f in record["files"])
    hw = pack_hardware(comp, progress=False)
    split_embedding(comp, progress=False)
    quantize_lm_head(qdir, progress=False)
    again = compile_software(qdir, progress=False)  # once: every file in the folder, the packed folder's too
    assert (again.files, again.bytes) == (first.files, first.bytes)
    lm = quantize_lm_head(qdir, progress=False)[0]
    assert lm.line().startswith("lm_head: 2 files (lm_head.json lists them), ")
    assert pack_hardware(comp, progress=False).files == hw.files == HW_FILES

    caplog.set_level(logging.INFO, logger="vcu128")
    assert run_step("verify", "--quantize_model", qdir, "--hardware_dir", hw.out, "--bits_only")[0] == 0
    on_disk = [p for p in hw.out.rglob("*") if p.is_file()]
    assert len(on_disk) == HW_FILES + PARTS + 1  # and manifest.json
    verdict = [line for line in lines(caplog) if line.startswith("verify: ")]
    assert verdict[0].startswith(f"verify: OK: {HW_FILES + PARTS} files (manifest.json lists them), "), verdict
