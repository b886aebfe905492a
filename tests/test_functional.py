"""verify.py's streamed functional check: the streamed fp32 model equals transformers' forward, the
board's fp16 datapath answers like it, and a NaN or inf fails the check where it first appears."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, export_all

from vcu128.board.datapath import FLUSH, FP16_MAX, Numerics
from vcu128.check.functional import (
    CompactDecoder,
    ModelRun,
    Shape,
    checkpoint_embedding,
    checkpoint_output_layer,
    forward,
)
from vcu128.check.verify import verify
from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.model import EMBEDDING


@pytest.fixture(scope="module")
def packed(quantized, tmp_path_factory):
    """The tiny trained model's checkpoint and packed folder (a copy this module may damage)."""
    qdir = tmp_path_factory.mktemp("functional") / "q"
    shutil.copytree(quantized[0], qdir)
    return qdir, export_all(qdir)["hw"]


def test_streamed_fp32_model_equals_the_transformers_forward(packed):
    from vcu128.check.functional import _fp32_rope
    from vcu128.format.model import read_model_config
    from vcu128.quant.report import load_checkpoint_model

    qdir, _ = packed
    ckpt = GPTQCheckpoint(qdir)
    d = ckpt.dims
    ids = np.random.default_rng(1).integers(0, d.vocab, (2, 40))
    cfg = read_model_config(qdir / "config.json")
    cos, sin = (torch.from_numpy(a) for a in _fp32_rope(cfg, d.head_dim, 40, qdir / "config.json"))
    run = ModelRun("checkpoint", Numerics("checkpoint", False, cfg["rms_norm_eps"], cos, sin), CompactDecoder(ckpt),
                   checkpoint_embedding(lambda t: ckpt.get_fp16(EMBEDDING, rows=slice(t, t + 1))[0], d.hidden),
                   checkpoint_output_layer(ckpt), torch.from_numpy(ckpt.get_fp16("model.norm.weight").astype(np.float32)))
    with torch.no_grad():
        streamed = forward([run], {"checkpoint": ids}, Shape(d.num_heads, d.num_kv_heads, d.head_dim), d.num_layers)["checkpoint"]
        whole = load_checkpoint_model(qdir, "cpu", torch.float32)(torch.from_numpy(ids)).logits
    assert float((streamed - whole).norm() / whole.norm()) < 1e-5


def test_the_decoder_reads_the_next_layer_ahead(make_checkpoint):
    ckpt = GPTQCheckpoint(make_checkpoint(num_layers=3))
    streamed = CompactDecoder(ckpt, keep=False)
    first = streamed.raw(0)
    assert set(streamed.ahead) == {1} and not streamed.layers  # one layer more in memory, none kept
    streamed.raw(1)
    assert set(streamed.ahead) == {2}
    streamed.raw(2)
    assert not streamed.ahead and not streamed.layers
    # the int4 bytes: GPTQ's words transposed, row c holding inputs 2k, 2k+1 of output channel c as q + 8
    q = ckpt.get("model.layers.0.mlp.down_proj.qweight")
    assert torch.equal(first["mlp.down_proj"][0], torch.from_numpy(np.ascontiguousarray(q.T).view(np.uint8)))
    kept = CompactDecoder(ckpt)
    assert kept.raw(1) is kept.raw(1) and set(kept.layers) == {1} and set(kept.ahead) == {2}
    # a CPU builds a layer's weights for each use (the int4 bytes shared), keeping only the bytes
    w = kept.layer(1, {"mlp.down_proj": 0.5})
    assert w.linears["mlp.down_proj"][0].nibbles is kept.raw(1)["mlp.down_proj"][0] and not kept.built
    scales = ckpt.get("model.layers.1.mlp.down_proj.scales").T.astype(np.float32)
    assert torch.equal(w.linears["mlp.down_proj"][0].scales, torch.from_numpy(scales * 0.5))
    # a GPU keeps them, once for each set of factors
    kept.keep_built = True
    assert kept.layer(1, {"mlp.down_proj": 0.5}) is kept.layer(1, {"mlp.down_proj": 0.5}) is not kept.layer(1)
    assert set(kept.built) == {(1, (("mlp.down_proj", 0.5),)), (1, ())}


def test_the_checkpoints_output_layer_as_a_gpu_and_a_cpu_hold_it(make_checkpoint):
    ckpt = GPTQCheckpoint(make_checkpoint(vocab=320))
    out = checkpoint_output_layer(ckpt)
    table = out.fp16_table("cpu")  # what load_on(cuda) makes there, here on the CPU
    rows = out.rows_fn(0, 320)
    assert table.dtype == torch.float16 and table.shape == (320, 256)
    assert torch.equal(table.float(), rows) and torch.equal(rows, torch.from_numpy(ckpt.get("lm_head.weight").astype(np.float32)))
    out.load_on("cpu")  # a CPU reads slices as it goes: nothing held
    assert out.loading is None and out.dense is None
    # GPTQ's own int4 lm_head: read and transposed on a thread
    quantized = GPTQCheckpoint(make_checkpoint("q2", vocab=320, lm_head_quantized=True))
    held = checkpoint_output_layer(quantized)
    held.wait()
    q = quantized.get("lm_head.qweight")
    assert torch.equal(held.int4.nibbles, torch.from_numpy(np.ascontiguousarray(q.T).view(np.uint8))) and held.loading is None


def test_board_storage_rounds_saturates_and_flushes():
    num = Numerics("board", True, 1e-6, torch.zeros(1, 1), torch.zeros(1, 1))
    x = torch.tensor([1e5, -7e4, 1 / 3, FLUSH / 2, -FLUSH * 2, 65504.0])
    y = num.store(x, 3, "residual_mlp")
    assert y.tolist() == [FP16_MAX, -FP16_MAX, float(np.float16(1 / 3)), 0.0, float(np.float16(-FLUSH * 2)), 65504.0]
    assert num.stats.saturation_list() == [{"layer": 3, "site": "residual_mlp", "count": 2}]
    assert num.stats.max_abs[(3, "residual_mlp")] == 1e5


def test_a_nan_in_the_checkpoint_is_refused_by_name(packed, tmp_path):
    """Issue #18: a non-finite value in a checkpoint tensor is refused where it is read (exit 2, the
    tensor and element named) by every step, verify included; it never reaches the functional check.
    (The functional check's own NaN naming, for a NaN the arithmetic makes, is left to its tests.)"""
    qdir0, _ = packed
    qdir = tmp_path / "q"
    shutil.copytree(qdir0, qdir)
    hw = export_all(qdir)["hw"]
    from safetensors.numpy import load_file, save_file

    name = "model.layers.1.post_attention_layernorm.weight"
    shard = qdir / json.loads((qdir / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].copy()
    tensors[name][3] = np.inf
    save_file(tensors, shard)
    (hw.parent / "verify_report.json").unlink(missing_ok=True)
    for args in (["compile_sw.py", "--quantize_model", str(qdir)], ["verify.py", "--quantize_model", str(qdir), "--hardware_dir", str(hw)]):
        r = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], capture_output=True, text=True,
                           env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"})
        assert r.returncode == 2, r.stderr
        assert f"error: {name}: element 3 is inf (not a finite number)" in r.stderr
    assert not (hw.parent / "verify_report.json").exists()


def test_a_checkpoint_without_tokenizer_is_evaluated_on_seeded_ids(packed, tmp_path):
    qdir0, _ = packed
    qdir = tmp_path / "q"
    shutil.copytree(qdir0, qdir)
    for f in qdir.glob("tokenizer*"):
        f.unlink()
    (qdir / "special_tokens_map.json").unlink(missing_ok=True)
    hw = qdir / "compile" / "QWEN_BLOCK_write_data_port32"
    f = verify(qdir, hw, progress=False, eval_tokens=64, tokens=4)["functional"]
    assert f["ok"] and f["eval"] == {"tokens": 64, "source": "seeded random ids: the checkpoint has no tokenizer"}
    assert len(f["greedy"]["hardware"]["tokens"]) == 4 and f["greedy"]["hardware"]["text"] is None
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3, 4 5 6 7 8 9 10")
    f = verify(qdir, hw, progress=False, eval_ids=ids, tokens=2)["functional"]
    assert f["eval"] == {"tokens": 10, "source": f"ids from {ids}"}


def test_the_unquantized_original_runs_beside_them(packed, tiny_model):
    qdir, hw = packed
    f = verify(qdir, hw, model=tiny_model, progress=False, eval_tokens=128, tokens=4)["functional"]
    orig = f["against_hardware"]["fp16 original"]
    assert f["ok"] and orig["top1_agreement"] > 0.85 and orig["relative_logit_error"] < 0.1
    assert f["silu_effect"]["tokens"] == 64 and f["silu_effect"]["top1_agreement"] > 0.95
