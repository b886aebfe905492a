"""The packed folder against the loader the accelerator's public compiler generates (FORMAT.md 5, 8):
every file dlavm-llm-public's `script/main.py --model {chatglm,qwen2} --wt2hbm` opens, at exactly the
bytes it reads, and no other file, for a ChatGLM3-6B- and a Qwen2-7B-shaped model of 2 layers.
(tests/data/dlavm_loader_*_2L.json; scripts/dlavm_loader_files.py makes them from a dlavm checkout.)

The compile folder is made of sparse files of the right sizes (zeros: the names and sizes are what is
tested here; the bytes of each rule are tested in test_export.py and test_chatglm.py), so the 6B's 2.6
GB of software files cost no disk; hardware.py then packs them as it packs any folder."""

import json
from pathlib import Path

import pytest
from conftest import ROOT

from vcu128.export.hardware import pack_hardware
from vcu128.format.layout import sw_fp16_path, sw_linear_paths, sw_lm_head_paths
from vcu128.format.model import (
    FINAL_NORM,
    GROUP_SIZE,
    LAYER_NORMS,
    LINEARS,
    dims_from_config,
)
from vcu128.format.synthetic import QWEN2_7B, SyntheticSpec, config_json

CHATGLM3_6B = dict(hidden=4096, intermediate=13696, num_layers=2, num_heads=32, num_kv_heads=2, head_dim=128, vocab=65024, model_type="chatglm")


def sparse_compile_folder(folder: Path, spec: SyntheticSpec) -> Path:
    cfg = config_json(spec)
    cfg.pop("quantization_config")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    d = dims_from_config(cfg, folder / "config.json")
    software = d.family.software

    def sparse(path: Path, size: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)

    for layer in range(d.num_layers):
        for lin in LINEARS:
            chin, chout = d.linear_shape(lin)
            paths = sw_linear_paths(folder, lin.name(layer), software)
            sparse(paths["qweight"], 4 * chout * chin)
            sparse(paths["scales"], 2 * chout * chin // GROUP_SIZE)
            sparse(paths["bias"], 2 * chout)
        for norm, _ in LAYER_NORMS:
            sparse(sw_fp16_path(folder, f"model.layers.{layer}.{norm}.weight", software), 4 * d.hidden)
    sparse(sw_fp16_path(folder, f"{FINAL_NORM}.weight", software), 4 * d.hidden)
    lm = sw_lm_head_paths(folder, software)
    sparse(lm["qweight"], 4 * d.vocab * d.hidden)
    sparse(lm["scales"], 2 * d.vocab * d.hidden // GROUP_SIZE)
    return folder


@pytest.mark.parametrize("model, dims", [("chatglm", CHATGLM3_6B), ("qwen2", {**QWEN2_7B, "num_layers": 2})])
def test_packed_folder_is_the_file_list_dlavms_loader_opens(tmp_path, model, dims):
    fixture = json.loads((ROOT / "tests" / "data" / f"dlavm_loader_{model}_2L.json").read_text())
    header = fixture["header"]
    assert header["files"] == 502 and header["dims"]["layers"] == 2 and header["max_token"] == 2048
    hw = pack_hardware(sparse_compile_folder(tmp_path / "compile", SyntheticSpec(**dims)), progress=False).out
    ours = {str(p.relative_to(hw)): p.stat().st_size for p in hw.rglob("*") if p.is_file() and p.name != "manifest.json"}
    want = dict(fixture["files"])
    assert sorted(set(want) - set(ours)) == [] and sorted(set(ours) - set(want)) == []
    assert {p: n for p, n in ours.items() if want[p] != n} == {}
    assert max(len(f"BLOCK_write_data/{p}") for p in ours) <= 77  # the loader keeps paths in a 100-character buffer
