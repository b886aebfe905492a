"""fp16 headroom and rescaling (FORMAT.md 7) on a trained tiny model whose activations pass the fp16
range: the residual stream carried 2^13 larger (as a bf16-trained model's massive activations are)
and layer 1's MLP intermediate 2^10 larger, both planted exactly (fp32 answers are unchanged)."""

import json
import math
import shutil

import numpy as np
import pytest
from conftest import FAST, export_all

from vcu128.board.rescale import plan_from_stats
from vcu128.check.verify import verify
from vcu128.format.rescale import RescalePlan, module_factors
from vcu128.io.errors import VCUError

RESIDUAL, MLP = 2.0**13, 2.0**10


@pytest.fixture(scope="module")
def overflowing(tiny_model, tmp_path_factory):
    """The tiny model with the planted scales, quantized (quant_report.json records the overflow)."""
    from conftest import plant_overflow

    from vcu128.quant.quantize import QuantizeOptions, quantize_model

    model = plant_overflow(tiny_model, tmp_path_factory.mktemp("overflow") / "m", residual=RESIDUAL, mlp=MLP)
    qdir, report = quantize_model(model, None, QuantizeOptions(**FAST))
    return qdir, report


def test_quantize_records_the_headroom_of_every_site(overflowing):
    _, report = overflowing
    stats = report["activation_stats"]
    layer1 = stats["layers"][1]["max_abs"]
    assert set(layer1) == {"q", "k", "v", "o", "residual_attention", "gate", "up", "mlp_product", "down", "residual_mlp"}
    assert layer1["residual_mlp"] > 65504 and layer1["mlp_product"] > 65504 and layer1["gate"] < 100
    lo, hi = stats["gate_range"]
    assert lo < 0 < hi < 100


def test_the_plan_reaches_4x_headroom():
    stats = {"layers": [{"layer": 0, "max_abs": {"residual_mlp": 70000.0, "mlp_product": 1000.0, "gate": 10.0}},
                        {"layer": 1, "max_abs": {"residual_attention": 200000.0, "mlp_product": 40000.0, "up": 3.0}}]}
    plan = plan_from_stats(stats, 2)
    assert plan.k == 4 and plan.m == (0, 2)  # 200000 / 16 = 12500 and 40000 / 4 = 10000: under 65504 / 4
    assert module_factors(plan, 1) == {"self_attn.o_proj": 2.0**-4, "mlp.up_proj": 2.0**-2, "mlp.down_proj": 2.0**-2}
    stats["layers"][0]["max_abs"]["gate"] = 70000.0
    with pytest.raises(VCUError, match=r"layer 0, gate: largest \|value\| 70000.0 passes the fp16 range and no rescaling factor reaches this site"):
        plan_from_stats(stats, 2)
    # a maximum that was not finite reaches the JSON report as null: it is an overflow, not a 0
    nulls = {"layers": [{"layer": 0, "max_abs": {"residual_mlp": None, "gate": 10.0}}]}
    with pytest.raises(VCUError, match=r"fp16 statistics hold an inf or NaN"):
        plan_from_stats(nulls, 1)


@pytest.fixture(scope="module")
def both(overflowing, tmp_path_factory):
    """verify's board-numerics result for the folder exported with --fp16_rescale off, then auto."""
    qdir, _ = overflowing
    out = {}
    for mode in ("off", "auto"):
        work = tmp_path_factory.mktemp(mode) / "q"
        shutil.copytree(qdir, work, ignore=shutil.ignore_patterns("compile"))
        hw = export_all(work, fp16_rescale=mode)["hw"]
        result = verify(work, hw, progress=False, tokens=8)
        assert result["bit_check"]["ok"], result["bit_check"]["differences"]
        out[mode] = (work, hw, result["functional"])
    return out


def test_without_rescaling_the_board_saturates_and_says_where(both):
    _, _, f = both["off"]
    sites = {(s["layer"], s["site"]) for s in f["saturation"]}
    assert (0, "residual_mlp") in sites and (1, "residual_attention") in sites
    flagged = {(r["layer"], r["site"]) for r in f["headroom"]["above_half_fp16_range"]}  # the fp32 model's sites past 32752
    assert {(0, "residual_mlp"), (1, "mlp_product")} <= flagged


def smallest_power(value: float) -> int:
    """FORMAT.md 7's rule, computed here: a site past half the fp16 range (32752) is divided by the
    smallest power of two that leaves it 4x headroom (under 65504 / 4)."""
    return 0 if value <= 65504 / 2 else math.ceil(math.log2(value / (65504 / 4)))


@pytest.fixture(scope="module")
def checkpoint_steps(both):
    """The fp32 checkpoint's own logits (transformers, dequantized weights) at each step of its greedy
    continuation: the top-2 margin and the logits' norm at each step."""
    import torch

    from vcu128.quant.report import load_checkpoint_model

    work, _, f = both["auto"]
    prompt, tokens = f["prompt_tokens"], f["greedy"]["checkpoint"]["tokens"]
    model = load_checkpoint_model(work, "cpu", torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    top = logits.topk(2, -1).values
    return (top[:, 0] - top[:, 1]).tolist(), logits.norm(dim=-1).tolist(), logits.shape[-1]


def steps_before_a_near_tie(f: dict, steps) -> int:
    """The checkpoint's greedy steps before its first near-tie: a step whose top-2 margin the board's
    logit error could flip. From verify's relative logit error eps on the evaluation tokens, a step's
    logits (norm |l|) move by about eps |l| in all, so by about eps |l| sqrt(2 / V) on the difference of
    two of its V logits if the error favours no token; a margin under 4 times that is a near-tie
    (either token is the model's answer)."""
    margins, norms, vocab = steps
    eps = f["against_hardware"]["checkpoint"]["relative_logit_error"]
    ties = [i for i, (m, n) in enumerate(zip(margins, norms, strict=True)) if m <= 4 * eps * n * math.sqrt(2 / vocab)]
    return ties[0] if ties else len(margins)


def answers_like_the_checkpoint(f: dict, steps) -> list[str]:
    """What keeps a folder's board-numerics model from answering like the fp32 checkpoint (empty: it
    does): fp16 saturation, greedy tokens other than the checkpoint's before its first near-tie, top-1
    agreement on the evaluation tokens below verify --strict's 0.9."""
    r = f["against_hardware"]["checkpoint"]
    sure = steps_before_a_near_tie(f, steps)
    problems = []
    if f["saturation"]:
        problems.append(f"{len(f['saturation'])} saturated fp16 sites")
    ours, theirs = f["greedy"]["hardware"]["tokens"][:sure], f["greedy"]["checkpoint"]["tokens"][:sure]
    if ours != theirs:
        problems.append(f"greedy tokens {ours} where the checkpoint says {theirs} (no near-tie before step {sure})")
    if not r["top1_agreement"] >= 0.9:  # verify --strict's own criterion
        problems.append(f"top-1 agreement {r['top1_agreement']}")
    return problems


def test_rescaled_folder_answers_like_the_fp32_checkpoint(both, overflowing, checkpoint_steps):
    work, hw, f = both["auto"]
    _, _, off = both["off"]
    doc = json.loads((hw / "manifest.json").read_text())
    stats = {row["layer"]: row["max_abs"] for row in overflowing[1]["activation_stats"]["layers"]}
    residual = max(v for sites in stats.values() for s, v in sites.items() if s in ("residual_attention", "residual_mlp", "o", "down"))
    assert doc["fp16_rescale"]["k"] == smallest_power(residual) > 0
    assert doc["fp16_rescale"]["m"] == [smallest_power(max(stats[i]["up"], stats[i]["mlp_product"])) for i in sorted(stats)]
    assert max(doc["fp16_rescale"]["m"]) > 0  # the planted MLP intermediate is rescaled too
    # k was weighed in the default board model and in both pessimistic variants (issue #20)
    assert doc["fp16_rescale"]["weighed_under"] == ["nearest+fp32+centred", "truncate+grouped+centred", "truncate+grouped+mean_square"]
    assert answers_like_the_checkpoint(f, checkpoint_steps) == []
    ours, theirs = f["against_hardware"]["checkpoint"], off["against_hardware"]["checkpoint"]
    assert ours["relative_logit_error"] < theirs["relative_logit_error"] / 2
    # The same check on the folder exported without rescaling (a planted error: the factors left out) fails.
    assert answers_like_the_checkpoint(off, checkpoint_steps)
    config = json.loads((work / "compile" / "config.json").read_text())["vcu128_fp16_rescale"]
    assert config["k_choice"]["kept"] == "with_k" and config["statistics"] == "quant_report.json"


def test_auto_without_statistics_warns_and_leaves_the_export_alone(make_checkpoint, caplog):
    qdir = make_checkpoint()
    export_all(qdir)
    assert "no fp16 statistics (quant_report.json has none): not rescaled" in caplog.text
    assert "vcu128_fp16_rescale" not in json.loads((qdir / "compile" / "config.json").read_text())


def test_rescaled_bytes_are_the_checkpoints_times_powers_of_two(both):
    """FORMAT.md 7, checked here without the export's own code: embedding rows, o_proj and down_proj
    scales times 2^-k, up_proj scales times 2^-m, down_proj's times 2^m too; the ints unchanged."""
    from safetensors import safe_open

    work, hw, _ = both["auto"]
    plan = json.loads((hw / "manifest.json").read_text())["fp16_rescale"]
    k, m = plan["k"], plan["m"]
    index = json.loads((work / "model.safetensors.index.json").read_text())["weight_map"]

    def ck(name):
        with safe_open(work / index[name], "np") as f:
            return f.get_tensor(name)

    part = np.fromfile(hw / "Embedding" / "Embedding_01-of-16.bin", "<f2").reshape(-1, 256)
    emb = ck("model.embed_tokens.weight")[: part.shape[0]].astype(np.float32) * 2.0**-k
    assert np.array_equal(part.view("<u2"), emb.astype(np.float16).view("<u2"))
    sw = work / "compile" / "qwen2_qweight_bin"
    for layer in (0, 1):
        for module, power in (("self_attn.o_proj", -k), ("mlp.up_proj", -m[layer]), ("mlp.down_proj", m[layer] - k)):
            name = f"model.layers.{layer}.{module}"
            got = np.fromfile(sw / f"{name}.scales.bin", "<f2")
            want = (ck(f"{name}.scales").T.astype(np.float32) * 2.0**power).astype(np.float16).ravel()
            assert np.array_equal(got.view("<u2"), want.view("<u2")), name
        q = np.fromfile(sw / f"model.layers.{layer}.mlp.down_proj.qweight.bin", "<i4")
        assert q.min() >= -8 and q.max() <= 7


def test_the_embedding_carries_2_to_the_minus_k_by_its_module_or_tensor_name():
    """factor() takes a module or a tensor name: the embedding's module (`model.embed_tokens`) is the
    embedding as much as its tensor; the norms and the output layer carry 1 whatever k and m."""
    plan = RescalePlan(3, (2,))
    assert plan.factor("model.embed_tokens") == plan.factor("model.embed_tokens.weight") == 2.0**-3
    assert plan.factor("model.norm.weight") == plan.factor("lm_head") == plan.factor("model.layers.0.input_layernorm.weight") == 1.0
    assert plan.factor("model.layers.0.mlp.down_proj.scales") == 2.0 ** (2 - 3)
