"""The packed folder read back (format.folder) and what verify compares with: the checkpoint itself.

Every field of every kind of word is changed in turn with manifest.json rewritten to agree (what an
exporter bug would leave), and the bit check must still name the file; the output layer is made
again from the checkpoint, so a changed lm_head, a changed lm_head_*.bin or another model's are
all differences; a damaged manifest is one error naming the key."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, export_all, rewrite_manifest
from safetensors.numpy import load_file, save_file

from vcu128.check.verify import bit_check, write_report
from vcu128.export.hardware import pack_hardware
from vcu128.export.lm_head import quantize_lm_head
from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.folder import PackedFolder
from vcu128.format.layout import embedding_part_file, parse_embedding_part_file
from vcu128.format.rescale import RescalePlan
from vcu128.format.synthetic import SyntheticSpec, write_gptq_checkpoint
from vcu128.io.errors import VCUError

HW = "compile/QWEN_BLOCK_write_data_port32"
# hidden 256 (2 groups: one scale word, its high half the second group), head_dim 128 (a RoPE table),
# intermediate 384 (3 groups: the second scale word's high half is padding), vocab 512
SPEC = dict(hidden=256, intermediate=384, num_layers=2, num_heads=2, num_kv_heads=1, vocab=512, seed=5)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    qdir = write_gptq_checkpoint(tmp_path_factory.mktemp("reader") / "q", SyntheticSpec(**SPEC))
    export_all(qdir, lm_method="rtn")
    return qdir


@pytest.fixture
def folder(clean, tmp_path):
    qdir = tmp_path / "q"
    shutil.copytree(clean, qdir)
    return qdir, qdir / HW


def change_word(path, index, xor, dtype="<u4"):
    w = np.fromfile(path, dtype)
    w[index] ^= np.array(xor, dtype)
    w.tofile(path)


# (file, word index, xor, dtype): one of each field the board reads. Rows of chin 256 are
# 8 scale words + 32 weight words; of chin 384 (down_proj) 8 + 48.
FIELDS = {
    "weight nibble": ("BLOCK00/MVM_BN_write_to_HBM_bin/MVMBN0_q_HBM_DDR_00.bin", 8 + 3, 0x0F00, "<u4"),
    "scale, low half": ("BLOCK01/MVM_BN_write_to_HBM_bin/MVMBN1_HBM_DDR_05.bin", 0, 0x0001, "<u4"),
    "scale, high half": ("BLOCK00/MVM_BN_write_to_HBM_bin/MVMBN0_k_HBM_DDR_02.bin", 0, 0x00010000, "<u4"),
    "scale padding half": ("BLOCK00/MVM_BN_RES_write_to_HBM_bin/MVMBNRES2_HBM_DDR_01.bin", 1, 0x00010000, "<u4"),
    "scale padding word": ("BLOCK00/MVM_BN_RES_write_to_HBM_bin/MVMBNRES0_HBM_DDR_09.bin", 7, 0x1, "<u4"),
    "bias word, multiplier half": ("BLOCK00/MVM_BN_DDR_bin/MVMBN0_q_wt_and_bias_in_DDR.bin", 4, 0x00010000, "<u4"),
    "bias word, bias half": ("BLOCK01/MVM_BN_DDR_bin/MVMBN0_v_wt_and_bias_in_DDR.bin", 100, 0x0001, "<u4"),
    "zero-bias word, bias half": ("BLOCK01/MVM_BN_RES_DDR_bin/MVMBNRES1_wt_and_bias_in_DDR.bin", 3, 0x0001, "<u4"),
    "norm, weight half": ("BLOCK01/LN_DDR_bin/LN0_wt_in_DDR.bin", 17, 0x0001, "<u2"),
    "norm, zero half": ("BLOCK00/LN_DDR_bin/LN1_wt_in_DDR.bin", 256 + 5, 0x0001, "<u2"),
    "output layer weight": ("OutLayer/MVM_BN_write_to_HBM_bin/MVMBN_Argmax_HBM_DDR_31.bin", 40 * 3 + 20, 0x1, "<u4"),
    "output layer scale": ("OutLayer/MVM_BN_write_to_HBM_bin/MVMBN_Argmax_HBM_DDR_00.bin", 40 * 15, 0x0100, "<u4"),
    "output layer bias word": ("OutLayer/MVM_BN_DDR_bin/MVMBN_Argmax_wt_and_bias_in_DDR.bin", 511, 0x0001, "<u4"),
    "final norm": ("OutLayer/LN_DDR_bin/LN_wt_in_DDR.bin", 255, 0x8000, "<u2"),
    "RoPE table": ("pos_in_4_token2048_ch32.bin", 12345, 0x0001, "<u2"),
    "SiLU table, slope": ("ACT_parameter_in_DDR.bin", 5, 0x0001, "<u2"),
    "SiLU table, zero tail": ("ACT_parameter_in_DDR.bin", 3000, 0x0001, "<u2"),
    "embedding row": ("Embedding/Embedding_07-of-16.bin", 256 * 31 + 255, 0x0001, "<u2"),
}


@pytest.mark.parametrize("field", list(FIELDS))
def test_every_field_changed_with_an_agreeing_manifest_is_found(folder, field):
    qdir, hw = folder
    rel, index, xor, dtype = FIELDS[field]
    change_word(hw / rel, index, xor, dtype)
    rewrite_manifest(hw)
    found = bit_check(qdir, hw, progress=False).differences
    assert found and all(d.startswith(rel) for d in found), (field, found)
    assert not any("sha256" in d for d in found)  # the manifest agrees: the bytes themselves were compared


def test_the_reader_mirrors_the_writer(folder):
    qdir, hw = folder
    f = PackedFolder.open(hw)
    d = GPTQCheckpoint(qdir).dims
    assert (f.ports, f.parts, f.assumptions.int4, f.assumptions.rope_table, f.assumptions.max_token) == (32, 16, "twos", "halves", 2048)
    assert f.expected_files(d) == f.on_disk() == set(f.files)
    assert f.output_layer.method == "rtn" and f.output_layer.int4_range == 8
    made = json.loads((qdir / "compile/compile_sw.json").read_text())["made_from"]
    assert f.source == {"checkpoint": made["checkpoint"]} and made["checkpoint"].endswith("/q")
    assert f.rescale is None
    for parts in (1, 7, 16, 99, 128):
        for i in (1, parts):
            assert parse_embedding_part_file(embedding_part_file(i, parts)) == (i, parts)
    assert parse_embedding_part_file("Embedding_1-of-16.bin") is None and parse_embedding_part_file("Embedding_01-of-16.bin.bak") is None


# ---------------------------------------------------------------------------------------------
# The output layer is the checkpoint's


def edit_tensor(qdir, name, change):
    shard = qdir / json.loads((qdir / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = change(tensors[name].copy())
    save_file(tensors, shard)


def test_a_changed_lm_head_in_the_checkpoint_is_a_difference(folder):
    qdir, hw = folder
    edit_tensor(qdir, "lm_head.weight", lambda w: np.where(np.arange(w.size).reshape(w.shape) == 5 * 256 + 7, w * 3, w).astype(w.dtype))
    found = bit_check(qdir, hw, progress=False).differences
    assert found and all(d.startswith("OutLayer/MVM_BN_write_to_HBM_bin/MVMBN_Argmax_HBM_DDR_05.bin: row 0 (output channel 5)") for d in found), found


def test_a_changed_intermediate_file_packed_again_is_a_difference(folder):
    """One int changed in lm_head_qweight.bin and the folder packed again from it: every record
    agrees, the stale check has nothing to say, and the bits are still not the checkpoint's."""
    qdir, hw = folder
    lm = qdir / "compile/qwen2_qweight_bin/lm_head_qweight.bin"
    q = np.fromfile(lm, "<i4")
    q[40 * 256 + 9] = 7 if q[40 * 256 + 9] != 7 else 6
    q.tofile(lm)
    pack_hardware(qdir / "compile", progress=False)
    found = bit_check(qdir, hw, progress=False).differences
    assert found == [f"OutLayer/MVM_BN_write_to_HBM_bin/MVMBN_Argmax_HBM_DDR_08.bin: row 1 (output channel 40), word 9 (weights of inputs 8..15) "
                     f"is {found[0].split(' is ')[1].split(',')[0]}, expected {found[0].split('expected ')[1]}"]


def test_another_models_lm_head_files_are_a_difference(folder, tmp_path):
    qdir, hw = folder
    other = write_gptq_checkpoint(tmp_path / "other", SyntheticSpec(**{**SPEC, "seed": 6}))
    quantize_lm_head(other, qdir / "compile", "rtn", progress=False, force=True)
    pack_hardware(qdir / "compile", progress=False)
    found = bit_check(qdir, hw, progress=False)
    assert not found.ok and all(d.startswith("OutLayer/MVM_BN_write_to_HBM_bin/MVMBN_Argmax_HBM_DDR_") for d in found.differences)


def test_an_untied_model_without_lm_head_weight_is_refused(tmp_path):
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**SPEC))
    index = json.loads((qdir / "model.safetensors.index.json").read_text())
    shard = qdir / index["weight_map"].pop("lm_head.weight")
    tensors = load_file(shard)
    del tensors["lm_head.weight"]
    save_file(tensors, shard)
    (qdir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(VCUError, match="no lm_head.weight, and config.json's tie_word_embeddings is false"):
        quantize_lm_head(qdir, progress=False)


def test_a_tied_model_outputs_through_its_embedding_whatever_lm_head_weight_holds(tmp_path):
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**SPEC))
    cfg = json.loads((qdir / "config.json").read_text())
    (qdir / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    quantize_lm_head(qdir, progress=False, method="trunc")
    from vcu128.quant.rtn import quantize_rows

    ckpt = GPTQCheckpoint(qdir)
    want, _ = quantize_rows(ckpt.get("model.embed_tokens.weight").astype(np.float32), "trunc")
    got = np.fromfile(qdir / "compile/qwen2_qweight_bin/lm_head_qweight.bin", "<i4").reshape(want.shape)
    assert np.array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# A damaged manifest: one error naming the file and the key


DAMAGE = [
    (lambda d: d.update(ports="32"), r"ports is '32', expected a whole number"),
    (lambda d: d.update(ports=None), r"ports is missing"),
    (lambda d: d.update(embedding_parts=[16]), r"embedding_parts is \[16\], expected a whole number"),
    (lambda d: d.update(assumptions="twos"), r"assumptions is a string, expected an object"),
    (lambda d: d["assumptions"].update(int4="ones"), r"assumptions.int4 is 'ones', expected one of twos, sign_magnitude"),
    (lambda d: d["assumptions"].update(max_token=0), r"assumptions.max_token is 0, expected a whole number of at least 1"),
    (lambda d: d["assumptions"].update(rope_table=7), r"assumptions.rope_table is 7, expected a string"),
    (lambda d: d["assumptions"].update(silu_table="fit"), r"tables.silu.fit_range is None, expected \[low, high\]"),
    (lambda d: d.update(fp16_rescale=[1, 2]), r"fp16_rescale is list, expected an object with k and m"),
    (lambda d: d.update(fp16_rescale={"k": -1, "m": []}), r"fp16_rescale: fp16 rescaling k=-1"),
    (lambda d: d.update(fp16_rescale={"k": 1, "m": "0"}), r"fp16_rescale.m is str"),
    (lambda d: d.update(lm_head={"method": "gptq"}), r"lm_head.method is 'gptq', expected one of trunc, rtn, checkpoint"),
    (lambda d: d.update(lm_head={"method": "rtn", "int4_range": 9}), r"lm_head.int4_range is 9, expected 7 or 8"),
    (lambda d: d.update(model=None), r"model is null, expected an object"),
    (lambda d: d.update(files={}), r"files is an object, expected a list"),
    (lambda d: d["files"].__setitem__(3, "x"), r"files\[3\] is a string, expected an object"),
    (lambda d: d["files"][4].pop("sha256"), r"files\[4\].sha256 is missing"),
    (lambda d: d["files"][5].update(bytes="12"), r"files\[5\].bytes is '12', expected a whole number"),
    (lambda d: d["files"][6].update(path="../x.bin"), r"files\[6\].path '../x.bin' is not a path inside the folder"),
    (lambda d: d["made_from"].__class__ and d.update(made_from=3), r"made_from is a number, expected an object"),
    (lambda d: d.update(kind="embedding"), r"kind is 'embedding', expected one of hardware"),
]


@pytest.mark.parametrize("damage, pattern", DAMAGE)
def test_a_damaged_manifest_is_one_error_naming_the_key(folder, damage, pattern):
    qdir, hw = folder
    doc = json.loads((hw / "manifest.json").read_text())
    damage(doc)
    (hw / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(VCUError, match=pattern) as e:
        bit_check(qdir, hw, progress=False)
    assert str(hw / "manifest.json") in str(e.value) and "\n" not in str(e.value)


def test_damaged_manifest_through_the_command_line(folder):
    qdir, hw = folder
    doc = json.loads((hw / "manifest.json").read_text())
    doc["assumptions"] = []
    (hw / "manifest.json").write_text(json.dumps(doc))
    for script, args in (("verify.py", ["--quantize_model", str(qdir), "--hardware_dir", str(hw), "--bits_only"]),
                         ("embedding_tokens.py", ["--compile_dir", str(qdir / "compile")])):
        r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"})
        assert (script, r.returncode) == (script, 2), r.stderr
        assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# The fp16 plan and verify's own report


def test_the_plan_gives_every_tensors_factor_from_one_rule():
    plan = RescalePlan(3, (0, 2))
    assert plan.factor("model.embed_tokens.weight") == 2.0**-3
    assert plan.factor("model.layers.1.self_attn.o_proj") == 2.0**-3
    assert plan.factor("model.layers.1.mlp.up_proj.scales") == 2.0**-2
    assert plan.factor("model.layers.1.mlp.down_proj") == 2.0 ** (2 - 3)
    assert plan.factor("model.layers.0.mlp.down_proj") == 2.0**-3
    assert plan.factor("model.layers.0.self_attn.q_proj") == plan.factor("model.norm.weight") == plan.factor("lm_head") == 1.0
    assert RescalePlan.from_record(plan.to_record(), "x", "k") == plan
    with pytest.raises(VCUError, match="m has 2 entries, the model has 3 layers"):
        RescalePlan.from_record(plan.to_record(), "x", "key", num_layers=3)
    with pytest.raises(VCUError, match="expected a whole number from 0 to 30"):
        RescalePlan(31, ())


def test_verify_replaces_only_its_own_report(tmp_path):
    path = tmp_path / "verify_report.json"
    path.write_text(json.dumps({"bit_check": {"mine": True}}))
    assert not write_report(path, {"tool": "compiler-vcu128", "bit_check": {}})
    assert json.loads(path.read_text()) == {"bit_check": {"mine": True}}
    path.write_text(json.dumps({"bit_check": {"ok": True, "files": 1, "bytes": 2, "differences": []}}))  # a 0.1 report
    assert write_report(path, {"tool": "compiler-vcu128", "bit_check": {}})
    assert write_report(path, {"tool": "compiler-vcu128", "bit_check": {"ok": False}})
    assert json.loads(path.read_text())["bit_check"] == {"ok": False}


# ---------------------------------------------------------------------------------------------
# The verdict: the bits, and the board model against a named threshold


def _result(bits_ok=True, top1=0.97, saturated=0, finite=True, functional=True):
    f = {"ok": finite, "error": "hardware: non-finite value", "against_hardware": {"checkpoint": {"top1_agreement": top1}},
         "saturation": [{"layer": 0, "site": "down", "count": 1}] * saturated}
    return {"bit_check": {"ok": bits_ok}, **({"functional": f} if functional else {})}


@pytest.mark.parametrize("case, strict, board, code, step", [
    (dict(), False, "answers like the checkpoint", 0, None),
    (dict(top1=0.9), False, "answers like the checkpoint", 0, None),
    (dict(top1=0.8999), False, "below the threshold", 0, "--model"),
    (dict(top1=0.8999), True, "below the threshold", 1, "--model"),
    (dict(saturated=2), False, "below the threshold", 0, "--fp16_rescale measure"),
    (dict(saturated=2), True, "below the threshold", 1, "--fp16_rescale measure"),
    (dict(finite=False), False, "non-finite", 1, "NaN or inf"),
    (dict(bits_ok=False, functional=False), False, "not run", 1, None),
    (dict(functional=False), True, "not run", 0, None),
])
def test_the_verdict_names_the_threshold_and_the_next_step(case, strict, board, code, step):
    from vcu128.check.verify import BOARD_TOP1_THRESHOLD, judge

    v = judge(_result(**case), strict)
    assert (v["board_model"], v["exit_code"], v["ok"]) == (board, code, code == 0)
    assert v["threshold"]["top1_agreement"] == BOARD_TOP1_THRESHOLD == 0.9
    assert (step is None and "next_step" not in v) or step in v["next_step"]


def test_a_random_model_is_not_certified_as_answering_like_the_checkpoint(tmp_path):
    """Random weights in 4 layers: the bits match, the board model does not answer like the
    checkpoint (top-1 agreement about 0.6, far from 0.9 on any CPU): a warning with the next step,
    exit 0; with --strict exit 1; the report's top level says both."""
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**{**SPEC, "num_layers": 4}))
    hw = export_all(qdir, lm_method="rtn")["hw"]
    cmd = [sys.executable, str(ROOT / "verify.py"), "--quantize_model", str(qdir), "--hardware_dir", str(hw), "--eval_tokens", "32", "--tokens", "2"]
    env = {"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    report = json.loads((hw.parent / "verify_report.json").read_text())
    assert report["verdict"]["bits"] == "match" and report["verdict"]["board_model"] == "below the threshold", report["verdict"]
    assert r.returncode == 0, r.stderr
    assert "warning: the board model is below the threshold (below the threshold (worst of 3 variants, " in r.stderr
    assert set(report["verdict"]["variants"]) == {"nearest+fp32+centred", "truncate+grouped+centred", "truncate+grouped+mean_square"}
    assert report["functional"]["unknowns"] and "not covered by any variant" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("verify: bits OK: ") and "board model WARNING" in r.stderr.strip().splitlines()[-1]
    assert report["tool"] == "compiler-vcu128" and report["checkpoint"] == str(qdir.resolve()) and report["time"]
    r = subprocess.run(cmd + ["--strict"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: verify --strict: the board model is below the threshold")


def test_an_original_of_another_shape_is_one_error(folder, tmp_path):
    from vcu128.check.verify import verify

    qdir, hw = folder
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((qdir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (other / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 512}))
    with pytest.raises(VCUError, match=r"--model .*other: intermediate 512, the checkpoint's is 384: not the model it was quantized from"):
        verify(qdir, hw, model=other, progress=False, eval_tokens=16, tokens=1)
