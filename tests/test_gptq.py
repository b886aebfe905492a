"""This project's GPTQ (vcu128/quant/gptq.py, vcu128/quant/layerwise.py) against GPTQModel and FORMAT.md 1."""

import numpy as np
import pytest
import torch
from conftest import FAST

from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.model import GROUP_SIZE
from vcu128.io.errors import VCUError
from vcu128.quant.gptq import (
    add_to_hessian,
    dequantize,
    gptq_quantize,
    gptq_tensors,
    group_aware_order,
)
from vcu128.quant.quantize import QuantizeOptions, quantize_model
from vcu128.quant.report import rtn_symmetric


def correlated_problem(rows=96, cols=512, n=4096, seed=0):
    """Weights and inputs whose features are correlated, so that GPTQ has something to exploit."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.1 * torch.randn(cols, cols, generator=g)
    X = torch.randn(n, cols, generator=g) @ mix * torch.linspace(0.2, 3, cols)  # unequal column energies
    W = 0.05 * torch.randn(rows, cols, generator=g)
    H = torch.zeros(cols, cols)
    add_to_hessian(H, X)
    return W, X, H * (2 / n)


def output_error(X, W, Wq):
    return float((X @ (Wq - W).T).norm() / (X @ W.T).norm())


def gptqmodel_quantize(W, X):
    """GPTQModel 7.6's own GPTQ on the same problem, with its defaults (act-group-aware order)."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.clone()
    g = GPTQ(lin, QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False))
    g.quantizer.configure(perchannel=True)
    g.add_batch(X[None], None)
    Wq, scales = g.quantize()[:2]
    return Wq.float(), scales.float()


def test_one_matrix_matches_gptqmodel():
    W, X, H = correlated_problem()
    q, scales = gptq_quantize(W, H.clone(), "test")
    ours = output_error(X, W, dequantize(q, scales))
    Wq_gm, scales_gm = gptqmodel_quantize(W, X)
    theirs = output_error(X, W, Wq_gm)
    rtn = output_error(X, W, rtn_symmetric(W))
    # measured: ours 0.06795, GPTQModel 0.06792, RTN 0.1104
    assert ours <= theirs * 1.002, (ours, theirs)
    assert ours < 0.65 * rtn, (ours, rtn)
    # The group quantized first has GPTQModel's scales up to their fp16 rounding; later groups
    # drift a little (the rounding moves a few ints, whose errors feed forward), ints agree 97%.
    first = group_aware_order(H.diagonal().clone())[1][0]
    rel = (scales - scales_gm).abs() / scales_gm
    assert rel[:, first].max() < 2**-11 and rel.mean() < 0.01
    q_gm = torch.round(Wq_gm / scales_gm.repeat_interleave(128, dim=1))
    assert (q.float() == q_gm).float().mean() > 0.95
    assert q.min() >= -8 and q.max() <= 7


def test_group_aware_order_takes_groups_by_largest_diagonal():
    diag = torch.cat([torch.arange(128.0), 1000 + torch.arange(128.0), torch.full((128,), 500.0)])
    diag[5] = 2000  # group 0 now holds the largest value of all
    perm, order = group_aware_order(diag)
    assert order == [0, 1, 2]
    assert perm[:2].tolist() == [5, 127] and perm[127].item() == 0
    assert perm[128:256].tolist() == list(range(255, 127, -1))
    diag[5] = 0
    perm, order = group_aware_order(diag)
    assert order == [1, 2, 0] and perm[:3].tolist() == [255, 254, 253]
    assert sorted(perm.tolist()) == list(range(384))


def test_inputs_never_seen_get_zero_weights():
    W, X, H = correlated_problem(rows=16, cols=256, n=1024)
    X[:, 7] = 0
    H = torch.zeros_like(H)
    add_to_hessian(H, X)
    q, _ = gptq_quantize(W, H, "test")
    assert (q[:, 7] == 0).all() and (q[:, 8] != 0).any()


def test_degenerate_hessian_is_refused():
    W, _, H = correlated_problem(rows=8, cols=128, n=256)
    H[3, 3] = float("nan")
    with pytest.raises(VCUError, match="test: the Hessian is not positive definite even with 100% damping"):
        gptq_quantize(W, H, "test")
    with pytest.raises(VCUError, match="test: 100 inputs is not a multiple of the group size 128"):
        gptq_quantize(W[:, :100], H[:100, :100], "test")


def test_gptq_tensors_are_gptq_v1_words():
    q = torch.zeros(8, 256, dtype=torch.int8)
    q[0, :8] = torch.arange(-8, 0)  # stored nibbles 0..7
    q[1, 8:16] = torch.arange(0, 8)  # stored nibbles 8..15
    scales = torch.full((8, 2), 0.5)
    scales[3, 1] = 0.125
    t = gptq_tensors(q, scales)
    qweight = t["qweight"].numpy().view(np.uint32)
    assert qweight.shape == (32, 8) and t["qweight"].dtype == torch.int32
    assert qweight[0, 0] == 0x76543210 and qweight[1, 1] == 0xFEDCBA98
    assert qweight[2, 2] == 0x88888888  # q = 0 everywhere else
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (2, 8) and t["scales"][1, 3] == 0.125
    assert t["qzeros"].shape == (2, 1) and t["qzeros"].numpy().view(np.uint32).tolist() == [[0x77777777]] * 2
    assert t["g_idx"].tolist() == [i // 128 for i in range(256)]


def test_gptq_tensors_round_trip_through_the_checkpoint_reader():
    q = torch.randint(-8, 8, (24, 384), dtype=torch.int8)
    qweight = gptq_tensors(q, torch.ones(24, 3))["qweight"].numpy()
    assert np.array_equal(GPTQCheckpoint.signed_weights(None, qweight), q.numpy())


@pytest.fixture(scope="module")
def quantized_by_gptqmodel(tiny_model, tmp_path_factory):
    return quantize_model(tiny_model, tmp_path_factory.mktemp("gm") / "q", QuantizeOptions(**FAST, engine="gptqmodel"))


def test_model_matches_gptqmodel_layer_by_layer(quantized, quantized_by_gptqmodel):
    ours, theirs = quantized[1], quantized_by_gptqmodel[1]
    for a, b in zip(ours["layers"], theirs["layers"], strict=True):
        # measured: within +-0.3% of GPTQModel's error on every layer
        assert a["gptq"] <= 1.01 * b["gptq"], (a, b)
    assert ours["perplexity"]["gptq"] <= 1.005 * theirs["perplexity"]["gptq"]


def test_engine_refuses_what_the_board_cannot_run(tiny_model, tmp_path):
    with pytest.raises(VCUError, match="--engine vcu128 quantizes only what the board runs .* pass --engine gptqmodel"):
        quantize_model(tiny_model, tmp_path / "q", QuantizeOptions(**FAST, wbits=8))
    with pytest.raises(VCUError, match="--engine awq: expected one of vcu128, gptqmodel"):
        quantize_model(tiny_model, tmp_path / "q", QuantizeOptions(**FAST, engine="awq"))
    assert list(tmp_path.iterdir()) == []


def test_one_solve_per_shared_input_in_true_sequential_order(tiny_model, tmp_path, monkeypatch):
    """The speed of a 7B run rests on this: q/k/v and gate/up each solved as one matrix (four GPTQ
    solves a layer, not seven), in the order their inputs become known."""
    import json

    import vcu128.quant.layerwise as gm

    solves = []
    real = gm.gptq_quantize

    def spy(W, H, name, *args):
        solves.append((name, tuple(W.shape), W.dtype))
        return real(W, H, name, *args)

    monkeypatch.setattr(gm, "gptq_quantize", spy)
    cfg = json.loads((tiny_model / "config.json").read_text())
    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"])
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], (4, 32))
    gm.quantize_checkpoint(tiny_model, tmp_path / "q", ids, "cpu", progress=False)
    per_layer = [
        ("self_attn.q_proj+k_proj+v_proj", (h + 2 * kv, h)),
        ("self_attn.o_proj", (h, h)),
        ("mlp.gate_proj+up_proj", (2 * inter, h)),
        ("mlp.down_proj", (h, inter)),
    ]
    want = [(f"model.layers.{i}.{n}", shape, torch.float32) for i in range(cfg["num_hidden_layers"]) for n, shape in per_layer]
    assert solves == want
    GPTQCheckpoint(tmp_path / "q").validate()


def test_calibration_runs_in_bf16_on_a_gpu_unless_the_config_says_float16(tmp_path):
    import json

    from vcu128.quant.layerwise import compute_dtype

    for saved, want in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.bfloat16), (None, torch.bfloat16)):
        (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": saved} if saved else {}))
        assert compute_dtype(tmp_path, torch.device("cuda:0")) == want
        assert compute_dtype(tmp_path, torch.device("cpu")) == torch.float32


def test_an_fp16_overflow_is_named_and_the_layer_retried_in_float32(tiny_model, tmp_path, monkeypatch, caplog):
    """A model whose residual stream passes 65504 (as bf16-trained Qwen2-7B's does), calibrated in
    fp16: the overflow is found (not reported as degenerate inputs), and the layer re-run in fp32."""
    import json

    from conftest import plant_overflow

    import vcu128.quant.layerwise as gm

    model = plant_overflow(tiny_model, tmp_path / "m", residual=2.0**13)
    monkeypatch.setattr(gm, "compute_dtype", lambda model_dir, device: torch.float16)
    ids = np.random.default_rng(0).integers(0, 512, (8, 64))
    run = gm.quantize_checkpoint(model, tmp_path / "q", ids, "cpu", progress=False)
    assert run.retried and run.retried[0]["from"] == "float16" and run.retried[0]["to"] == "float32"
    assert "overflowed in float16; retrying layer" in caplog.text
    meta = json.loads((tmp_path / "q" / "quantize_config.json").read_text())["meta"]["vcu128_run"]
    assert meta["retried_in_float32"] == run.retried and meta["dtype"] == "float32" and meta["threads"] == torch.get_num_threads()
    ckpt = GPTQCheckpoint(tmp_path / "q")
    ckpt.validate()
    assert np.isfinite(ckpt.get("model.layers.1.mlp.down_proj.scales").astype(np.float32)).all()


def test_heads_times_head_dim_need_not_be_hidden(tmp_path):
    """Mistral-Nemo style: 2 heads of 64 on a hidden size of 256 (o_proj has 128 inputs)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).to(torch.float16).save_pretrained(tmp_path / "m")
    import vcu128.quant.layerwise as gm

    ids = np.random.default_rng(0).integers(0, 256, (4, 32))
    gm.quantize_checkpoint(tmp_path / "m", tmp_path / "q", ids, "cpu", progress=False)
    ckpt = GPTQCheckpoint(tmp_path / "q")
    ckpt.validate()
    assert ckpt.info("model.layers.0.self_attn.o_proj.qweight")[1] == (128 // 8, 256)


def test_sliding_window_models_are_calibrated_with_their_window(tmp_path, monkeypatch):
    """A Mistral with a window shorter than --seqlen: the engine's layer output follows the model's
    (windowed) attention, not plain causal attention."""
    from transformers import MistralConfig, MistralForCausalLM

    import vcu128.quant.layerwise as gm

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=128, sliding_window=8, tie_word_embeddings=False)
    model = MistralForCausalLM(cfg).eval()
    model.to(torch.float16).save_pretrained(tmp_path / "m")
    ids = np.random.default_rng(0).integers(0, 256, (4, 64))
    with torch.no_grad():
        want = MistralForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)(torch.from_numpy(ids), output_hidden_states=True).hidden_states[1]
    got = {}
    real = gm.LayerQuantizer.run_layer

    def spy(self, prefix):
        real(self, prefix)
        got[prefix] = self.x.clone()

    monkeypatch.setattr(gm.LayerQuantizer, "run_layer", spy)
    errors = {}
    for windowed in (True, False):
        if not windowed:  # what the engine computed before it knew the window: plain causal attention
            monkeypatch.setattr(gm, "sliding_window_mask", lambda *args: None)
        gm.quantize_checkpoint(tmp_path / "m", tmp_path / f"q{windowed}", ids, "cpu", progress=False)
        errors[windowed] = float((got["model.layers.0"] - want).norm() / want.norm())
    assert errors[True] < 0.5 * errors[False], errors  # the windowed run differs by quantization error only
    monkeypatch.undo()
    mask = gm.sliding_window_mask(cfg, 64, "cpu")
    assert mask is not None and mask[0, 0, 20, 12].item() == float("-inf") and mask[0, 0, 20, 13].item() == 0


def test_a_run_that_fails_half_way_leaves_nothing_behind(tiny_model, tmp_path, monkeypatch):
    import vcu128.quant.layerwise as gm

    real = gm.gptq_quantize

    def fail_in_layer_1(W, H, name, *args):
        if name.startswith("model.layers.1."):
            raise VCUError(f"{name}: the Hessian is not positive definite even with 100% damping")
        return real(W, H, name, *args)

    monkeypatch.setattr(gm, "gptq_quantize", fail_in_layer_1)
    with pytest.raises(VCUError, match=r"model.layers.1.self_attn.q_proj\+k_proj\+v_proj: the Hessian"):
        quantize_model(tiny_model, tmp_path / "q", QuantizeOptions(**FAST, report=False))
    assert list(tmp_path.iterdir()) == []  # layer 0's shard was written, and removed with the stage


def test_a_gptqmodel_fallback_to_round_to_nearest_fails_loudly():
    """GPTQModel logs a module it could not solve and falls back to RTN (exit 0, RTN's error): the
    watch turns that into one error."""
    import logging

    from vcu128.io.errors import quiet_third_party
    from vcu128.quant.quantize import FallbackWatch

    quiet_third_party()  # as every command line runs: GPTQModel's logger at errors only
    with FallbackWatch() as watch:
        logging.getLogger("gptqmodel.looper").info("layer 3 done")
        watch.check()  # nothing seen yet
        logging.getLogger("gptqmodel.looper").warning("model.layers.3.mlp.down_proj: Hessian contains non-finite values; fallback to RTN")
    with pytest.raises(VCUError, match=r"GPTQModel fell back from GPTQ for 1 module\(s\): model.layers.3.mlp.down_proj: Hessian contains non-finite"):
        watch.check()


class Replay:
    def __init__(self):
        self.wrong: list[str] = []  # decisions the textbook cannot take, even allowing for float32's rounding
        self.differently = 0  # decisions the engine took the other way at a near-tie (allowed)
        self.decisions = 0
        self.max_tolerance = 0.0  # the largest tolerance, in quantization steps


def textbook_replay(W, H, q, scales, qmin=-8, qmax=7):
    """GPTQ as the paper writes it (Frantar et al. 2022, Algorithm 1, without lazy batches), in float64,
    with the engine's damping, group order and fp16-rounded group scales, made to follow the engine's
    decisions (`q`, `scales`): at each one it checks that the textbook could have taken it, then goes on
    with the engine's choice, so that a near-tie taken the other way does not carry into the rest.

    The engine computes in float32 from the same float32 W and H; its running values differ from these
    by (a) its Cholesky factor R32 (hessian_factor, float32): the feedback runs through G32 = R32^-1
    (rows over their diagonal) instead of G, which moves the value of column i by sum_j e_j (G32 - G)_ji
    (e_j the scaled errors, the same in both up to second-order terms), and (b) the rounding of its sums
    of at most n = cols terms: at most gamma_n sum |terms|, gamma_n = n u / (1 - n u), u = 2^-24
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1). Tolerance: twice (a) + (b) (the
    engine sums the same terms grouped by blocks, and the second-order terms). A decision passes when
    some value within the tolerance rounds to it: an int, the rounding of w / scale clamped to qmin..qmax;
    a scale, the fp16 rounding of 2 max|w| / (qmax - qmin) over its group's running values."""
    from vcu128.quant.gptq import DAMP_PERCENT, hessian_factor

    u = 2.0**-24
    rows, cols = W.shape
    gamma = cols * u / (1 - cols * u)
    perm, order = group_aware_order(H.diagonal().clone())
    reverse = perm.flip(0)
    R32 = hessian_factor(H[reverse[:, None], reverse[None, :]].clone(), "replay").double()
    U32 = torch.linalg.inv(R32)
    G32 = U32 / U32.diagonal()[:, None]
    W, H = W[:, perm].double(), H[perm][:, perm].double()
    H.diagonal().add_(DAMP_PERCENT * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    G = U / U.diagonal()[:, None]
    dG = (G32 - G).abs()
    terms = W.abs().clone()  # sum of |terms| of each running value
    drift = torch.zeros_like(W)  # sum_j |e_j| |dG_ji|
    r = Replay()
    for i in range(cols):
        tol = 2 * (drift[:, i] + gamma * terms[:, i])
        if i % GROUP_SIZE == 0:
            group = order[i // GROUP_SIZE]
            block = slice(i, i + GROUP_SIZE)
            amax = W[:, block].abs().amax(1)
            amax_tol = 2 * (drift[:, block] + gamma * terms[:, block]).amax(1)
            raw, raw_tol = amax * 2 / (qmax - qmin), (amax_tol * 2 / (qmax - qmin)) + amax * 2 * u
            scale = scales[:, group].double()
            lo, hi = (raw - raw_tol).half().double(), (raw + raw_tol).half().double()
            for row in torch.nonzero((scale < lo) | (scale > hi)).flatten().tolist():
                r.wrong.append(f"group {group}, row {row}: scale {scale[row].item():.6g}, the textbook's {raw[row].item():.8g}")
            r.decisions += rows
        x, x_tol = W[:, i] / scale, tol / scale
        r.max_tolerance = max(r.max_tolerance, float(x_tol.max()))
        qe = q[:, perm[i]].double()
        lo, hi = torch.round(x - x_tol).clamp(qmin, qmax), torch.round(x + x_tol).clamp(qmin, qmax)
        for row in torch.nonzero((qe < lo) | (qe > hi)).flatten().tolist():
            r.wrong.append(f"column {perm[i].item()}, row {row}: int {int(qe[row])}, the textbook's w / scale {x[row].item():.6f}")
        r.differently += int((qe != torch.round(x).clamp(qmin, qmax)).sum())
        r.decisions += rows
        e = (W[:, i] - qe * scale) / U[i, i]
        W[:, i:] -= e[:, None] * U[i, i:][None, :]
        terms[:, i + 1 :] += (e[:, None] * U[i, i + 1 :][None, :]).abs()
        drift[:, i + 1 :] += e.abs()[:, None] * U[i, i].abs() * dG[i, i + 1 :][None, :]
    return r


def test_engine_is_the_textbook_algorithm(monkeypatch):
    """The engine reaches GPTQ's errors through R (H = R R^T) and lazy sums, in fp32, never forming
    H^-1: the paper's column-at-a-time loop in float64 takes every one of its decisions (ints and fp16
    scales) but for float32's rounding, bounded in textbook_replay from the algorithm; and it does not
    take a planted wrong one."""
    import vcu128.quant.gptq as g

    W, X, H = correlated_problem(rows=64, cols=384)
    q, scales = gptq_quantize(W, H.clone(), "test")
    r = textbook_replay(W, H.clone(), q, scales)
    assert r.wrong == [], r.wrong[:5]
    assert r.decisions == 64 * 384 + 64 * 3
    # The test's power: a tolerance this small lets an int one step off pass only where w / scale lies
    # within 2^-6 steps of a tie (a scale one fp16 ulp off: within 2^-6 * 2 / 15 of the halfway point).
    assert r.max_tolerance < 2**-6, r.max_tolerance
    assert r.differently <= 2 * r.max_tolerance * r.decisions + 3  # near-ties: as many as the tolerance allows
    # Planted errors, each caught: a group's scales one fp16 ulp up (the ints left as they were),
    # one column's ints one step off, and 6% damping instead of 5%.
    last = group_aware_order(H.diagonal().clone())[1][-1]  # the group quantized last: the largest tolerances
    up = scales.clone()
    up[:, last] = (scales[:, last].half().view(torch.int16) + 1).view(torch.float16).float()
    assert textbook_replay(W, H.clone(), q, up).wrong
    off = q.clone()
    off[:, last * GROUP_SIZE + 5] = torch.where(q[:, last * GROUP_SIZE + 5] < 7, q[:, last * GROUP_SIZE + 5] + 1, 6).to(torch.int8)
    assert textbook_replay(W, H.clone(), off, scales).wrong
    monkeypatch.setattr(g, "DAMP_PERCENT", 0.06)
    q6, scales6 = gptq_quantize(W, H.clone(), "test")
    monkeypatch.undo()
    assert textbook_replay(W, H.clone(), q6, scales6).wrong


def test_hessian_factor_is_the_reverse_cholesky_factor():
    from vcu128.quant.gptq import DAMP_PERCENT, hessian_factor

    _, _, H = correlated_problem(rows=8, cols=256)
    damped = H.double() + DAMP_PERCENT * H.diagonal().mean().double() * torch.eye(256, dtype=torch.float64)
    R = hessian_factor(H.flip(0, 1).clone(), "test")
    assert torch.equal(R, R.triu()) and (R.diagonal() > 0).all()
    assert torch.allclose(R.double() @ R.double().T, damped, rtol=0, atol=1e-5 * float(damped.abs().max()))
    # GPTQ's usual route to U, in float64: the reference
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert torch.allclose(torch.linalg.inv(R.double()), U, rtol=0, atol=1e-4 * float(U.abs().max()))


def test_hessian_accumulator_split_into_blocks_is_the_full_product():
    from vcu128.quant.gptq import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(300, 640, generator=g) for _ in range(3)]
    full, split = HessianAccumulator(640, torch.device("cpu"), split=False), HessianAccumulator(640, torch.device("cpu"), split=True)
    assert [(b.start, b.stop) for b in split.blocks] == [(0, 256), (256, 512), (512, 640)]
    for x in chunks:
        full.add(x)
        split.add(x)
    H_full, H_split = full.result(), split.result()
    X = torch.cat(chunks).double()
    assert torch.equal(H_split, H_split.T)
    assert torch.allclose(H_split.double(), 2 * X.T @ X / 900, rtol=1e-5, atol=1e-5)
    assert torch.allclose(H_split, H_full, rtol=1e-5, atol=1e-5)


def test_norms_and_biases_are_saved_from_the_source_not_the_calibration_copy():
    """The calibration runs in bf16 on a GPU; an fp32 or fp16 model's norms and biases must reach the
    checkpoint as the model's own values in fp16, not rounded to bf16 first."""
    from vcu128.quant.layerwise import layer_tensors

    bias = torch.tensor([1.0009765625, 3.14159, -2.71828, 1e-3], dtype=torch.float32)  # not bf16 values
    source = {"p.self_attn.q_proj.weight": torch.zeros(4, 128), "p.self_attn.q_proj.bias": bias,
              "p.input_layernorm.weight": bias.flip(0)}
    out = layer_tensors("p", {"self_attn.q_proj": (torch.zeros(4, 128, dtype=torch.int8), torch.ones(4, 1))}, source)
    assert torch.equal(out["p.self_attn.q_proj.bias"], bias.half()) and out["p.self_attn.q_proj.bias"][0] != bias.bfloat16().half()[0]
    assert torch.equal(out["p.input_layernorm.weight"], bias.flip(0).half())
    assert "p.self_attn.q_proj.weight" not in out and out["p.self_attn.q_proj.qweight"].shape == (16, 4)


def test_keeping_the_mlp_product_changes_no_byte(tiny_model, tmp_path, monkeypatch):
    """down_proj's input is kept where there is room and recomputed where there is not: the same values
    either way, so the checkpoints are identical."""
    import vcu128.quant.layerwise as gm

    ids = np.random.default_rng(0).integers(0, 512, (4, 32))
    kept, real = [], gm.LayerQuantizer.buffer
    monkeypatch.setattr(gm.LayerQuantizer, "buffer", lambda self, width: kept.append(real(self, width)) or kept[-1])
    gm.quantize_checkpoint(tiny_model, tmp_path / "kept", ids, "cpu", progress=False)
    assert kept and all(b is not None and b.shape[:2] == (4, 32) for b in kept)
    monkeypatch.setattr(gm.LayerQuantizer, "buffer", lambda self, width: None)
    gm.quantize_checkpoint(tiny_model, tmp_path / "recomputed", ids, "cpu", progress=False)
    shards = sorted(p.name for p in (tmp_path / "kept").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "recomputed").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "kept" / name).read_bytes() == (tmp_path / "recomputed" / name).read_bytes(), name


def test_a_gpu_without_triton_runs_the_eager_loop_and_says_so_once(monkeypatch, caplog):
    import builtins

    import vcu128.quant.gptq as g

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name.split(".")[0] == "triton" or name.endswith("gptq_triton"):  # Triton may be installed here
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    monkeypatch.setattr(g, "_WARNED", set())
    assert g.block_solver(torch.device("cuda")) is g.solve_block_eager
    assert g.block_solver(torch.device("cuda")) is g.solve_block_eager
    assert caplog.text.count("Triton is not installed") == 1
    assert g.block_solver(torch.device("cpu")) is g.solve_block_eager
