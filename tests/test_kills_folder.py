"""format.folder's reading of a packed folder's manifest.json, value by value and refusal by
refusal: the known answers that kill the mutants of the full mutation run that no other test told
apart (issue #23). The manifests are written by hand (no export): each test takes milliseconds."""

import json
from pathlib import Path

import numpy as np
import pytest

from vcu128.format.folder import (
    EMBEDDING_KIND,
    HARDWARE_KIND,
    ListedFile,
    OutputLayerRecord,
    PackedFolder,
    holds_only_embedding_parts,
    read_manifest,
)
from vcu128.format.layout import hw_linear_stems, port_file
from vcu128.format.model import LINEARS
from vcu128.format.rescale import RescalePlan
from vcu128.format.tables import ACT_FILE, BOARD_SILU, SiluTable
from vcu128.io.errors import VCUError
from vcu128.io.output import TOOL

SHA = "0123456789abcdef" * 4


def write_manifest(folder: Path, kind: str = HARDWARE_KIND, **keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"tool": TOOL, "kind": kind, "model": {}, "ports": 2, "files": [{"path": "a.bin", "bytes": 4, "sha256": SHA}], **keys}
    (folder / "manifest.json").write_text(json.dumps(doc))
    return folder / "manifest.json"


def refusal(folder: Path) -> str:
    with pytest.raises(VCUError) as e:
        PackedFolder.open(folder)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# The file list


def test_each_listed_file_as_read(tmp_path):
    files = [
        {"path": "BLOCK00/x.bin", "bytes": 12, "sha256": SHA, "step": "hardware", "made_from": "run-1"},
        {"path": "Embedding/Embedding_01-of-01.bin", "bytes": 0, "sha256": SHA},  # an empty file: 0 bytes is a size
        {"path": "b.bin", "bytes": 8, "sha256": SHA, "step": "", "made_from": ""},  # empty strings: none
    ]
    write_manifest(tmp_path, files=files)
    assert PackedFolder.open(tmp_path).files == {
        "BLOCK00/x.bin": ListedFile("BLOCK00/x.bin", 12, SHA, "hardware", "run-1"),
        "Embedding/Embedding_01-of-01.bin": ListedFile("Embedding/Embedding_01-of-01.bin", 0, SHA, None, None),
        "b.bin": ListedFile("b.bin", 8, SHA, None, None),
    }


@pytest.mark.parametrize("entry, message", [
    ({"path": "/etc/x.bin"}, "files[0].path '/etc/x.bin' is not a path inside the folder"),
    ({"sha256": "abc"}, "files[0].sha256 'abc' is not a sha256 (64 hex digits)"),
    ({"step": 5}, "files[0].step is 5, expected a string"),
    ({"made_from": ["run"]}, "files[0].made_from is ['run'], expected a string"),
], ids=["absolute_path", "sha256", "step", "made_from"])
def test_a_bad_file_entry_is_refused_word_for_word(tmp_path, entry, message):
    where = write_manifest(tmp_path, files=[{"path": "a.bin", "bytes": 4, "sha256": SHA, **entry}])
    assert refusal(tmp_path) == f"{where}: {message}"


# ---------------------------------------------------------------------------------------------
# Values shown in an error: their text up to 40 characters, else their kind


def test_a_value_is_shown_up_to_40_characters_then_by_its_kind(tmp_path):
    where = write_manifest(tmp_path, ports="x" * 38)  # repr 40 characters
    assert refusal(tmp_path) == f"{where}: ports is '{'x' * 38}', expected a whole number of at least 1"
    write_manifest(tmp_path, ports="x" * 39)  # repr 41 characters
    assert refusal(tmp_path) == f"{where}: ports is a string, expected a whole number of at least 1"
    write_manifest(tmp_path, assumptions=[])
    assert refusal(tmp_path) == f"{where}: assumptions is a list, expected an object"


def test_a_manifest_of_another_tool_is_refused_naming_its_tool(tmp_path):
    where = write_manifest(tmp_path, tool="other-packer")
    with pytest.raises(VCUError) as e:
        read_manifest(tmp_path)
    assert str(e.value) == f"{where}: not a compiler-vcu128 manifest (its 'tool' is 'other-packer')"
    assert refusal(tmp_path) == f"{where}: not a compiler-vcu128 manifest (its 'tool' is 'other-packer')"


def test_a_missing_folder_is_refused(tmp_path):
    assert refusal(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: no such hardware folder"


# ---------------------------------------------------------------------------------------------
# Assumptions


def test_an_unknown_rope_order_is_refused_with_the_choices(tmp_path):
    where = write_manifest(tmp_path, assumptions={"rope_table": "diagonal"})
    assert refusal(tmp_path) == f"{where}: assumptions.rope_table is 'diagonal', expected one of halves, pairs, glm"


def test_the_fit_range_is_two_increasing_numbers(tmp_path):
    where = write_manifest(tmp_path, assumptions={"silu_table": "fit"}, tables={"silu": {"fit_range": [2, 2]}})
    assert refusal(tmp_path) == f"{where}: tables.silu.fit_range is [2, 2], expected [low, high] (two finite numbers)"
    write_manifest(tmp_path, assumptions={"silu_table": "fit"}, tables={"silu": {"fit_range": [-4, 2.5]}})
    assert PackedFolder.open(tmp_path).assumptions.silu_fit_range == (-4.0, 2.5)


def test_the_board_silu_table_has_no_fit_range(tmp_path):
    write_manifest(tmp_path, assumptions={"silu_table": "board"})
    assert PackedFolder.open(tmp_path).assumptions.silu_fit_range is None


def test_the_folders_silu_table_as_read_from_its_file(tmp_path):
    write_manifest(tmp_path)
    folder = PackedFolder.open(tmp_path)
    assert folder.silu_table() is None  # no file
    table = SiluTable(BOARD_SILU.wt, BOARD_SILU.bias[::-1].copy(), BOARD_SILU.x_region)
    table.pack().tofile(tmp_path / ACT_FILE)
    got = folder.silu_table()
    for name in ("wt", "bias", "x_region"):
        assert getattr(got, name).dtype == np.dtype("<f2")
        assert getattr(got, name).view("<u2").tolist() == getattr(table, name).view("<u2").tolist()


# ---------------------------------------------------------------------------------------------
# An Embedding/ folder made alone, before the packed folder around it


def test_a_folder_holding_only_an_embedding_folder_made_alone(tmp_path):
    hw = tmp_path / "hw"
    embedding = dict(files=[{"path": "Embedding_01-of-01.bin", "bytes": 4, "sha256": SHA, "step": "embedding_tokens"}])
    write_manifest(hw / "Embedding", kind=EMBEDDING_KIND, **embedding)
    assert holds_only_embedding_parts(hw, "embedding_tokens") is True
    # anything else beside it: not only the parts
    (hw / "notes.txt").write_text("mine")
    assert holds_only_embedding_parts(hw, "embedding_tokens") is False
    (hw / "notes.txt").unlink()
    # an Embedding/ folder without its own manifest (or with a hardware one) is not one made alone
    write_manifest(hw / "Embedding", kind=HARDWARE_KIND, **embedding)
    assert holds_only_embedding_parts(hw, "embedding_tokens") is False
    (hw / "Embedding" / "manifest.json").unlink()
    assert holds_only_embedding_parts(hw, "embedding_tokens") is False
    assert holds_only_embedding_parts(tmp_path / "nowhere", "embedding_tokens") is False


# ---------------------------------------------------------------------------------------------
# The output layer and the counts a manifest may leave out


def test_the_output_layers_record_and_its_int4_range(tmp_path):
    write_manifest(tmp_path, lm_head={"method": "rtn", "int4_range": 7})
    assert PackedFolder.open(tmp_path).output_layer == OutputLayerRecord("rtn", 7)
    write_manifest(tmp_path, lm_head={"method": "trunc"})
    assert PackedFolder.open(tmp_path).output_layer == OutputLayerRecord("trunc", 8)
    where = write_manifest(tmp_path, lm_head={"method": "rtn", "int4_range": 6})
    assert refusal(tmp_path) == f"{where}: lm_head.int4_range is 6, expected a whole number of at least 7"
    write_manifest(tmp_path, lm_head={"method": "rtn", "int4_range": 9})
    assert refusal(tmp_path) == f"{where}: lm_head.int4_range is 9, expected 7 or 8"


def test_a_manifest_without_embedding_parts_has_none(tmp_path):
    write_manifest(tmp_path)
    folder = PackedFolder.open(tmp_path)
    assert (folder.ports, folder.parts, folder.embedding_part_names()) == (2, 0, [])
    write_manifest(tmp_path, embedding_parts=4)
    assert PackedFolder.open(tmp_path).parts == 4


# ---------------------------------------------------------------------------------------------
# A folder the original scripts made: no manifest


def _unlisted_folder(folder: Path, ports: int = 2) -> Path:
    stem, _ = hw_linear_stems(0, LINEARS[0])
    for p in range(ports):
        (folder / port_file(stem, p)).parent.mkdir(parents=True, exist_ok=True)
        (folder / port_file(stem, p)).write_bytes(b"")
    return folder


def test_a_folder_without_a_manifest_records_nothing(tmp_path):
    folder = PackedFolder.open(_unlisted_folder(tmp_path / "hw", ports=3), compile_hints=(tmp_path / "nowhere",))
    assert (folder.has_manifest, folder.ports, folder.parts, folder.output_layer) == (False, 3, 0, None)
    assert folder.rescale is None  # no compile folder beside it: no fp16 factors
    assert (folder.files, folder.made_from, folder.model, folder.source) == ({}, {}, {}, {})


def test_a_folder_without_a_manifest_takes_its_fp16_factors_from_the_compile_folder(tmp_path):
    hw, compile_dir = _unlisted_folder(tmp_path / "hw"), tmp_path / "compile"
    compile_dir.mkdir()
    (compile_dir / "config.json").write_text(json.dumps({"vcu128_fp16_rescale": {"k": 3, "m": [1, 2]}}))
    assert PackedFolder.open(hw, compile_hints=(None, tmp_path, compile_dir)).rescale == RescalePlan(3, (1, 2))
    (compile_dir / "config.json").write_text(json.dumps({"vcu128_fp16_rescale": {"m": [1, 2]}}))
    with pytest.raises(VCUError) as e:
        PackedFolder.open(hw, compile_hints=(compile_dir,))
    assert str(e.value) == (f"{compile_dir / 'config.json'}: vcu128_fp16_rescale.k is missing "
                            "(the residual stream's factor, a whole number from 0 to 30)")
