"""ChatGLM2/3 (remote-code names and config keys) and transformers' glm through every step
(FORMAT.md 8): the gate, the view of fused tensors, compile_glm.py's software files with its bugs
fixed, the packed folder, the GLM RoPE table, verify, and the models against ChatGLM's equations."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT, export_all
from safetensors.numpy import load_file, save_file
from test_export import check_linear, gptq_signed

from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.gate import read_model_dims
from vcu128.format.synthetic import SyntheticSpec, config_json, write_gptq_checkpoint
from vcu128.io.errors import VCUError

# Two heads of 128 (the board's) sharing one key/value group; ffn 640 is 5 groups of 128, an odd
# count as ChatGLM's 13696 (107 groups) is; vocab 512 splits in 16 parts.
TINY_GLM = dict(hidden=256, intermediate=640, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=128, vocab=512, model_type="chatglm")
Q, KV, FFN = 256, 128, 640


@pytest.fixture(scope="module")
def glm_export(tmp_path_factory):
    qdir = write_gptq_checkpoint(tmp_path_factory.mktemp("chatglm") / "q", SyntheticSpec(**TINY_GLM, seed=3))
    return export_all(qdir)


def source(qdir):
    out = {}
    for shard in sorted(qdir.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


# ---------------------------------------------------------------------------------------------
# The gate


def write_config(tmp_path, **changes):
    cfg = config_json(SyntheticSpec(**TINY_GLM))
    cfg.pop("quantization_config")
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "config.json"


def test_gate_reads_chatglm_keys(tmp_path):
    d = read_model_dims(write_config(tmp_path))
    assert (d.hidden, d.intermediate, d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim, d.vocab) == (256, 640, 2, 2, 1, 128, 512)
    assert d.family.name == "chatglm" and not d.tie_word_embeddings
    d = read_model_dims(write_config(tmp_path, multi_query_attention=False))
    assert d.num_kv_heads == 2  # without multi-query attention every head has its own key/value


@pytest.mark.parametrize("change, message", [
    (dict(kv_channels=64), "kv_channels 64: the board needs 128"),
    (dict(rmsnorm=False), "rmsnorm False: the board needs true"),
    (dict(add_bias_linear=True), "add_bias_linear True: the board needs false"),
    (dict(apply_residual_connection_post_layernorm=True), "apply_residual_connection_post_layernorm True: the board needs false"),
    (dict(post_layer_norm=False), "post_layer_norm False: the board needs true"),
    (dict(ffn_hidden_size=None), "missing 'ffn_hidden_size'"),
    (dict(rope_ratio=0), "'rope_ratio' is 0.0, expected a number above 0"),
    (dict(model_type="glm4"), "model_type 'glm4': GLM-4-0414 adds post_self_attn_layernorm and post_mlp_layernorm"),
    (dict(model_type="glm4_moe"), "model_type 'glm4_moe': a mixture of experts"),
])
def test_gate_refuses_what_the_board_cannot_run(tmp_path, change, message):
    with pytest.raises(VCUError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_model_dims(write_config(tmp_path, **change))


def test_gate_for_transformers_glm(tmp_path):
    spec = SyntheticSpec(**{**TINY_GLM, "model_type": "glm"})
    cfg = config_json(spec)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert read_model_dims(tmp_path / "config.json").family.name == "glm"
    for change, message in ((dict(partial_rotary_factor=1.0), "partial_rotary_factor 1.0: the board's GLM mode rotates half"),
                            (dict(head_dim=64, num_attention_heads=4), "head_dim 64: the board needs 128")):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(VCUError, match=message):
            read_model_dims(tmp_path / "config.json")


# ---------------------------------------------------------------------------------------------
# The view: a fused tensor's parts under the pipeline's names


def test_view_splits_fused_tensors_by_output_rows(glm_export):
    qdir = glm_export["qdir"]
    ck, t = GPTQCheckpoint(qdir), source(qdir)
    qkv = "transformer.encoder.layers.1.self_attention.query_key_value"
    h4h = "transformer.encoder.layers.1.mlp.dense_h_to_4h"
    for name, fused, start, stop in (("self_attn.q_proj", qkv, 0, Q), ("self_attn.k_proj", qkv, Q, Q + KV), ("self_attn.v_proj", qkv, Q + KV, Q + 2 * KV),
                                     ("mlp.gate_proj", h4h, 0, FFN), ("mlp.up_proj", h4h, FFN, 2 * FFN)):
        p = f"model.layers.1.{name}"
        assert np.array_equal(ck.get(f"{p}.qweight"), t[f"{fused}.qweight"][:, start:stop]), name
        assert np.array_equal(ck.get(f"{p}.scales"), t[f"{fused}.scales"][:, start:stop]), name
        assert np.array_equal(ck.get(f"{p}.qzeros"), t[f"{fused}.qzeros"][:, start // 8 : stop // 8]), name
        assert ck.has(f"{p}.bias") == (fused == qkv)
        if fused == qkv:
            assert np.array_equal(ck.get(f"{p}.bias"), t[f"{fused}.bias"][start:stop]), name
    assert np.array_equal(ck.get("model.layers.1.self_attn.o_proj.qweight"), t["transformer.encoder.layers.1.self_attention.dense.qweight"])
    assert np.array_equal(ck.get("model.embed_tokens.weight", rows=slice(5, 9)), t["transformer.embedding.word_embeddings.weight"][5:9])
    assert ck.lm_head_source() == "lm_head.weight" and np.array_equal(ck.get("lm_head.weight"), t["transformer.output_layer.weight"])


def test_fused_tensor_of_the_wrong_width_is_refused(tmp_path):
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_GLM))
    shard = qdir / "model-00001-of-00003.safetensors"
    t = load_file(shard)
    name = "transformer.encoder.layers.0.self_attention.query_key_value.scales"
    t[name] = np.concatenate([t[name], t[name][:, :8]], axis=1)  # 8 columns no board file takes
    save_file(t, shard, metadata={"format": "pt"})
    with pytest.raises(VCUError, match=rf"{name}: shape \[2, 520\], but its parts \(q_proj, k_proj, v_proj\) hold 512 columns"):
        GPTQCheckpoint(qdir).validate()


# ---------------------------------------------------------------------------------------------
# compile_sw and lm_head: compile_glm.py's names, with its three bugs fixed


def test_software_files_are_compile_glm_names_with_gptq_ints_scales_and_biases(glm_export):
    qdir, comp = glm_export["qdir"], glm_export["compile"]
    t = source(qdir)
    for layer in range(2):
        pre = f"transformer.encoder.layers.{layer}"
        step1, step7 = comp / f"BLOCK{layer:02d}" / "step1_6", comp / f"BLOCK{layer:02d}" / "step7_12"
        qkv = gptq_signed(t[f"{pre}.self_attention.query_key_value.qweight"])  # the int4 codes, not dequantized floats
        qkv_scales = t[f"{pre}.self_attention.query_key_value.scales"].T  # GPTQ's scales, not absmax / 7
        qkv_bias = t[f"{pre}.self_attention.query_key_value.bias"]
        for part, rows in (("q", slice(0, Q)), ("k", slice(Q, Q + KV)), ("v", slice(Q + KV, None))):
            assert np.array_equal(np.fromfile(step1 / f"MVM_BN_W{part}.bin", "<i4").reshape(-1, 256), qkv[rows]), part
            assert np.array_equal(np.fromfile(step1 / f"MVM_BN_Scale{part}.bin", "<f2").reshape(-1, 2), qkv_scales[rows]), part
            assert np.array_equal(np.fromfile(step1 / f"MVM_BN_Bias{part}.bin", "<f2"), qkv_bias[rows]), part  # its own bias, not folded in
        dense = gptq_signed(t[f"{pre}.self_attention.dense.qweight"])
        assert np.array_equal(np.fromfile(step7 / "MVM_BN_RES_weight.bin", "<i4").reshape(256, 256), dense)
        h4h = gptq_signed(t[f"{pre}.mlp.dense_h_to_4h.qweight"])
        for half in (0, 1):  # _0 is gate (silu(x[0]) * x[1]), _1 is up
            w = np.fromfile(step7 / f"MVMBNRES1_weight_{half}.bin", "<i4").reshape(FFN, 256)
            assert np.array_equal(w, h4h[half * FFN : (half + 1) * FFN]), half
            assert not np.fromfile(step7 / f"MVMBNRES1_bias_{half}.bin", "<f2").any()
        down = np.fromfile(step7 / "MVMBNRES2_weight.bin", "<i4").reshape(256, FFN)
        assert np.array_equal(down, gptq_signed(t[f"{pre}.mlp.dense_4h_to_h.qweight"]))
        assert np.fromfile(step7 / "MVMBNRES2_scales.bin", "<f2").size == 256 * 5
        for norm in ("input_layernorm", "post_attention_layernorm"):
            n = np.fromfile(comp / f"BLOCK{layer:02d}" / f"{norm}.weight.bin", "<f2")
            assert np.array_equal(n[:256], t[f"{pre}.{norm}.weight"]) and not n[256:].any()
    n = np.fromfile(comp / "output_layer" / "final_layernorm.weight.bin", "<f2")
    assert np.array_equal(n[:256], t["transformer.encoder.final_layernorm.weight"]) and not n[256:].any()
    e = np.fromfile(comp / "embedding" / "word_embeddings.weight.bin", "<f2").reshape(512, 256)
    assert np.array_equal(e, t["transformer.embedding.word_embeddings.weight"])
    assert not (comp / "qwen2_qweight_bin").exists()


def test_output_layer_files_and_their_halves(glm_export):
    out = glm_export["compile"] / "output_layer"
    w = np.fromfile(out / "MVM_weight.bin", "<i4").reshape(512, 256)
    s = np.fromfile(out / "MVM_scales.bin", "<f2").reshape(512, 2)
    from vcu128.quant.rtn import quantize_rows

    want_q, want_s = quantize_rows(source(glm_export["qdir"])["transformer.output_layer.weight"].astype(np.float32), "rtn", -8)
    assert np.array_equal(w, want_q) and np.array_equal(s.view("<u2"), want_s.astype("<f2").view("<u2"))  # transformer.output_layer, rtn
    for i, rows in ((0, slice(0, 256)), (1, slice(256, None))):  # split at vocab/2 (32512 for ChatGLM's 65024)
        assert np.array_equal(np.fromfile(out / f"MVM_weight_{i}.bin", "<i4").reshape(-1, 256), w[rows])
        assert np.array_equal(np.fromfile(out / f"MVM_scales_{i}.bin", "<f2").reshape(-1, 2).view("<u2"), s[rows].view("<u2"))
    record = json.loads((glm_export["compile"] / "lm_head.json").read_text())
    assert sorted(record["files"]) == sorted(f"output_layer/MVM_{k}{i}.bin" for k in ("weight", "scales") for i in ("", "_0", "_1"))


# ---------------------------------------------------------------------------------------------
# The packed folder


def test_packed_folder_holds_the_checkpoint_bit_for_bit(glm_export):
    qdir, hw = glm_export["qdir"], glm_export["hw"]
    t = source(qdir)
    pre = "transformer.encoder.layers.1"
    qkv, qkv_s = gptq_signed(t[f"{pre}.self_attention.query_key_value.qweight"]), t[f"{pre}.self_attention.query_key_value.scales"].T
    bias = t[f"{pre}.self_attention.query_key_value.bias"]
    h4h, h4h_s = gptq_signed(t[f"{pre}.mlp.dense_h_to_4h.qweight"]), t[f"{pre}.mlp.dense_h_to_4h.scales"].T
    down, down_s = gptq_signed(t[f"{pre}.mlp.dense_4h_to_h.qweight"]), t[f"{pre}.mlp.dense_4h_to_h.scales"].T
    zeros = lambda n: np.zeros(n, np.float16)  # noqa: E731
    cases = [("MVM_BN", "MVMBN0_k", qkv[Q : Q + KV], qkv_s[Q : Q + KV], bias[Q : Q + KV]),
             ("MVM_BN", "MVMBN1", h4h[:FFN], h4h_s[:FFN], zeros(FFN)),
             ("MVM_BN_RES", "MVMBNRES1", h4h[FFN:], h4h_s[FFN:], zeros(FFN)),
             ("MVM_BN_RES", "MVMBNRES2", down, down_s, zeros(256))]  # 640 inputs: 5 groups, the last scale word half padding
    for unit, stem, q, s, b in cases:
        check_linear(hw, f"BLOCK01/{unit}_write_to_HBM_bin/{stem}", f"BLOCK01/{unit}_DDR_bin/{stem}_wt_and_bias_in_DDR.bin", q, s, b, 32)
    manifest = json.loads((hw / "manifest.json").read_text())
    assert manifest["assumptions"]["rope_table"] == "glm" and manifest["assumptions"]["rope_rotation"].startswith("GLM mode")


def test_glm_rope_table_bytes(glm_export, tmp_path):
    """FORMAT.md 5 and 8: position t, channel c at byte ((c // 32) * 2048 + t) * 64 + (c % 32) * 2; channel
    2j holds cos and 2j+1 sin of t * theta^(-2j/64), theta = 10000 x rope_ratio; channels 64-127 zero."""
    table = np.fromfile(glm_export["hw"] / "pos_in_4_token2048_ch32.bin", "<f2")
    assert table.size == 2 * 2048 * 64

    def value(t, c):
        return table[((c // 32) * 2048 + t) * 32 + c % 32]

    for t, j in ((0, 0), (1, 0), (5, 3), (2047, 31), (100, 17)):
        angle = np.float32(t) * np.float32(1.0 / 10000 ** (2 * j / 64))
        assert abs(float(value(t, 2 * j)) - math.cos(angle)) <= 2**-11 and abs(float(value(t, 2 * j + 1)) - math.sin(angle)) <= 2**-11, (t, j)
    assert not table.reshape(4, 2048, 32)[2:].any()  # channels 64-127: the zero padding
    # rope_ratio moves theta: a ChatGLM3-6B-32k-style config gets another table
    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_GLM))
    cfg = json.loads((qdir / "config.json").read_text())
    (qdir / "config.json").write_text(json.dumps({**cfg, "rope_ratio": 50}))
    hw = export_all(qdir)["hw"]
    other = np.fromfile(hw / "pos_in_4_token2048_ch32.bin", "<f2")
    angle = np.float32(1000) * np.float32(1.0 / 500000 ** (2 * 5 / 64))
    assert abs(float(other[(0 * 2048 + 1000) * 32 + 10]) - math.cos(angle)) <= 2**-11


def test_verify_certifies_and_names_a_changed_fused_part(glm_export, tmp_path):
    import shutil

    from conftest import rewrite_manifest

    from vcu128.check.verify import bit_check

    qdir, hw = glm_export["qdir"], glm_export["hw"]
    report = bit_check(qdir, hw, progress=False)
    assert not report.differences and report.files_checked == 518
    copy = tmp_path / "hw"
    shutil.copytree(hw, copy)
    path = copy / "BLOCK00/MVM_BN_DDR_bin/MVMBN0_v_wt_and_bias_in_DDR.bin"  # the v part of query_key_value.bias
    words = np.fromfile(path, "<u4")
    words[3] ^= 1  # the low bit of channel 3's bias value
    words.tofile(path)
    rewrite_manifest(copy)
    differences = bit_check(qdir, copy, progress=False).differences
    assert len(differences) == 1 and "MVMBN0_v_wt_and_bias_in_DDR.bin" in differences[0], differences


# ---------------------------------------------------------------------------------------------
# The models against ChatGLM's own equations


def chatglm_forward(t: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """ChatGLM2/3's forward from its equations, on its own tensor names (float64): fused qkv split by
    rows, RoPE on the first half of each head in pairs (2j, 2j+1), the key/value groups shared by
    the heads, swiglu = silu(first half) * second half, RMSNorm with layernorm_epsilon."""
    f = {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in t.items()}
    heads, groups, hd = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    eps = cfg["layernorm_epsilon"]
    norm = lambda x, w: w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # noqa: E731
    T = ids.shape[0]
    rot = hd // 2
    theta = 1.0 / (10000 * cfg.get("rope_ratio", 1)) ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta[None]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]

    def rope(x):  # [T, heads, hd]
        xr, xp = x[..., :rot].reshape(T, x.shape[1], rot // 2, 2), x[..., rot:]
        out = torch.stack([xr[..., 0] * cos - xr[..., 1] * sin, xr[..., 1] * cos + xr[..., 0] * sin], -1)
        return torch.cat([out.flatten(-2), xp], -1)

    x = f["transformer.embedding.word_embeddings.weight"][ids]
    for layer in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{layer}."
        h = norm(x, f[p + "input_layernorm.weight"])
        qkv = h @ f[p + "self_attention.query_key_value.weight"].T + f[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * hd, groups * hd, groups * hd], -1)
        q, k, v = rope(q.view(T, heads, hd)), rope(k.view(T, groups, hd)), v.view(T, groups, hd)
        k, v = k.repeat_interleave(heads // groups, 1), v.repeat_interleave(heads // groups, 1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        a = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, heads * hd)
        x = x + a @ f[p + "self_attention.dense.weight"].T
        h = norm(x, f[p + "post_attention_layernorm.weight"])
        g, u = (h @ f[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(g) * u) @ f[p + "mlp.dense_4h_to_h.weight"].T
    return norm(x, f["transformer.encoder.final_layernorm.weight"]) @ f["transformer.output_layer.weight"].T


def dequantized_source(qdir) -> dict:
    """The checkpoint's tensors under ChatGLM's names, linears dequantized (w = scale * (q - 8))."""
    t, out = source(qdir), {}
    for name, v in t.items():
        if name.endswith(".qweight"):
            p = name[: -len(".qweight")]
            out[f"{p}.weight"] = gptq_signed(v) * np.repeat(t[f"{p}.scales"].T.astype(np.float64), 128, axis=1)
        elif not name.endswith((".scales", ".qzeros", ".g_idx")):
            out[name] = v.astype(np.float64)
    return out


def test_verify_model_and_transformers_glm_compute_chatglm(tmp_path):
    """verify's fp32 checkpoint model and transformers' glm (what quantize calibrates with) each
    against ChatGLM's equations on the original names: relative logit error <= 1e-5 (float32 against
    float64 over two layers of 256-wide sums: about 1e-6)."""
    from vcu128.check.functional import CheckpointSetup, forward
    from vcu128.quant.report import load_checkpoint_model

    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_GLM, seed=5))
    cfg = json.loads((qdir / "config.json").read_text())
    (qdir / "config.json").write_text(json.dumps({**cfg, "rope_ratio": 3}))
    cfg["rope_ratio"] = 3
    ids = np.random.default_rng(0).integers(0, 512, 24)
    want = chatglm_forward(dequantized_source(qdir), cfg, torch.from_numpy(ids))
    ckpt = GPTQCheckpoint(qdir)
    setup = CheckpointSetup.build(ckpt, len(ids))
    model = setup.run("checkpoint")
    got = forward([model], {"checkpoint": ids[None]}, setup.shape, 2)["checkpoint"][0].double()
    assert float((got - want).norm() / want.norm()) <= 1e-5
    hf = load_checkpoint_model(qdir, "cpu", torch.float32)
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(ids)[None]).logits[0].double()
    assert float((hf_logits - want).norm() / want.norm()) <= 1e-5
    # and a planted error shows: the rotation on the second half of each head instead
    wrong = dict(dequantized_source(qdir))
    qkv = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    wrong[qkv] = wrong[qkv].copy()
    wrong[qkv][:128] = np.roll(wrong[qkv][:128], 64, axis=0)
    assert float((chatglm_forward(wrong, cfg, torch.from_numpy(ids)) - want).norm() / want.norm()) > 1e-3


# ---------------------------------------------------------------------------------------------
# quantize: GPTQ on transformers' glm layer, saved under ChatGLM's names


def test_quantize_tiny_chatglm_writes_chatglm_names_and_exports(tmp_path):
    from vcu128.demo.tiny_model import build_tiny_model
    from vcu128.quant.quantize import QuantizeOptions, quantize_model

    model = build_tiny_model(tmp_path / "tiny-chatglm", train_steps=0, progress=False, architecture="chatglm")
    assert json.loads((model / "config.json").read_text())["model_type"] == "chatglm"
    out, report = quantize_model(model, None, QuantizeOptions(nsamples=8, seqlen=64, calib=str(ROOT / "data" / "demo_corpus.txt")))
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    pre = "transformer.encoder.layers.0."
    assert {pre + "self_attention.query_key_value.qweight", pre + "self_attention.query_key_value.bias", pre + "mlp.dense_h_to_4h.qweight",
            pre + "mlp.dense_4h_to_h.scales", "transformer.output_layer.weight", "transformer.embedding.word_embeddings.weight"} <= names
    assert not any(n.startswith("model.") or "q_proj" in n for n in names)
    assert source(out)[pre + "self_attention.query_key_value.qweight"].shape == (32, 512)
    assert report["layers"][0]["gptq"] < report["layers"][0]["rtn"]  # calibrated: GPTQ beats round-to-nearest on the same inputs
    exp = export_all(out)
    from vcu128.check.verify import verify

    result = verify(out, exp["hw"], model=model, variants="none", tokens=4, progress=False, lm_head_from_checkpoint=True)
    assert result["bit_check"]["ok"] and result["functional"]["ok"]
    f = result["functional"]
    # Between the board model (the folder's decoder, RoPE and SiLU tables, fp16 storage) and the fp32
    # checkpoint, with the same output layer: the SiLU table's error (at most 0.011) and fp16 rounding
    # (2^-11 a step); measured 0.017. (The rotation itself is pinned by the test against ChatGLM's equations.)
    assert f["against_checkpoint"]["hardware"]["relative_logit_error"] < 0.05, f["against_checkpoint"]
    assert "fp16 original" in f["against_hardware"] and f["rope"].endswith("(glm)")


def test_transformers_glm_checkpoint_exports_like_chatglm(tmp_path):
    """A native glm checkpoint (Qwen2's names, one gate_up_proj) packs to the same board files as the
    ChatGLM checkpoint holding the same numbers under ChatGLM's names."""
    from vcu128.check.verify import bit_check

    qdir = write_gptq_checkpoint(tmp_path / "glm", SyntheticSpec(**{**TINY_GLM, "model_type": "glm"}, seed=7))
    cfg = json.loads((qdir / "config.json").read_text())
    (qdir / "config.json").write_text(json.dumps({**cfg, "rope_theta": 10000.0}))  # ChatGLM's theta (10000 x rope_ratio 1)
    glm = export_all(qdir)
    chatglm = export_all(write_gptq_checkpoint(tmp_path / "chatglm", SyntheticSpec(**TINY_GLM, seed=7)))
    assert "model.layers.0.mlp.gate_up_proj.qweight" in json.loads((glm["qdir"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert not bit_check(glm["qdir"], glm["hw"], progress=False).differences
    manifest = json.loads((glm["hw"] / "manifest.json").read_text())
    for f in manifest["files"]:
        if f["path"].startswith(("BLOCK", "OutLayer", "pos_in", "ACT_")):
            assert (glm["hw"] / f["path"]).read_bytes() == (chatglm["hw"] / f["path"]).read_bytes(), f["path"]


def test_chatglm_tokenizer_is_read_without_the_folders_code(tmp_path):
    """A published ChatGLM folder has tokenizer.model (sentencepiece) and a config.json whose auto_map
    names remote code: the calibration text is tokenized by sentencepiece, with no code from the folder
    run and no question asked."""
    import sentencepiece

    from vcu128.quant.calibration import SentencePieceTokenizer, load_tokenizer

    text = (ROOT / "data" / "demo_corpus.txt").read_text()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_prefix=str(tmp_path / "tokenizer"),
                                             vocab_size=300, num_threads=1, minloglevel=2)
    write_config(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer) and len(tok) == 300
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert tok("the board", add_special_tokens=False)["input_ids"] == sp.encode("the board") != []
    assert tok.decode(sp.encode("the board")) == "the board"


def test_a_bad_chatglm_key_the_models_read_is_one_error(tmp_path):
    from vcu128.check.functional import CheckpointSetup
    from vcu128.quant.hfmodel import hf_config

    qdir = write_gptq_checkpoint(tmp_path / "q", SyntheticSpec(**TINY_GLM))
    cfg = json.loads((qdir / "config.json").read_text())
    (qdir / "config.json").write_text(json.dumps({**cfg, "layernorm_epsilon": "1e-5", "seq_length": 2.5}))
    with pytest.raises(VCUError, match=r"config.json: 'layernorm_epsilon' is '1e-5', expected a finite number"):
        CheckpointSetup.build(GPTQCheckpoint(qdir), 8)
    with pytest.raises(VCUError, match=r"config.json: 'seq_length' is 2.5"):
        hf_config(qdir)
