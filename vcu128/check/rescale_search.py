"""The search for the residual factor k of fp16 rescaling: the checkpoint's model run in board
numerics with and without k, each against the fp32 model (the rules that propose a plan are
`board.rescale`; what a plan does to the bytes is `format.rescale`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vcu128.board.datapath import DEFAULT_VARIANT, pessimistic_variants
from vcu128.check.functional import CheckpointSetup, compare, forward
from vcu128.check.inputs import evaluation_inputs
from vcu128.format.checkpoint import GPTQCheckpoint
from vcu128.format.rescale import RescalePlan
from vcu128.format.tables import rope_cos_sin

log = logging.getLogger("vcu128")


def evaluate_plan(qdir: Path, tokens: np.ndarray, plan: RescalePlan | None, reference_only: bool = False) -> tuple[dict, dict | None]:
    """For fp16 rescaling, before any folder exists: the fp32 checkpoint model's site statistics on
    `tokens`, and (unless reference_only) how far the checkpoint rescaled by `plan` moves in board
    numerics from it, the worst of the default board model and the pessimistic variants:
    (stats, {top1_agreement, relative_logit_error, saturation, variants})."""
    ckpt = GPTQCheckpoint(qdir)
    d = ckpt.dims
    setup = CheckpointSetup.build(ckpt, len(tokens), keep=False)
    ref = setup.run("fp32")
    models = [ref]
    if not reference_only:
        cos16, sin16 = (torch.from_numpy(a.astype(np.float32)) for a in rope_cos_sin(setup.cfg, d.head_dim, len(tokens), ckpt.qdir / "config.json"))
        # weighed in the default board model and in the pessimistic variants: the board may round more
        for v in (DEFAULT_VARIANT, *pessimistic_variants()):
            models.append(setup.board_run(f"board [{v.name}]", cos16, sin16, plan, variant=v))
    with torch.no_grad():
        logits = forward(models, {m.name: tokens[None, :] for m in models}, setup.shape, d.num_layers)
    stats = {"measured_on": f"{len(tokens)} tokens, fp32", "layers": []}
    by_layer: dict = {}
    for (layer, site), v in ref.numerics.stats.max_abs.items():
        if isinstance(layer, int):
            by_layer.setdefault(layer, {})[site] = v
    stats["layers"] = [{"layer": i, "max_abs": by_layer.get(i, {})} for i in range(d.num_layers)]
    gate = [v for (layer, site), v in ref.numerics.stats.max_abs.items() if site == "gate"]
    stats["gate_max_abs"] = max(gate) if gate else None
    if reference_only:
        return stats, None
    against = compare(logits, "fp32")
    boards = models[1:]
    result = {"top1_agreement": min(against[m.name]["top1_agreement"] for m in boards),
              "relative_logit_error": max(against[m.name]["relative_logit_error"] for m in boards),
              "saturation": boards[0].numerics.stats.saturation_list(),
              "variants": [m.numerics.variant.name for m in boards]}
    return stats, result


def measure_stats(qdir: Path, tokens: np.ndarray) -> dict:
    """The fp32 checkpoint model's site statistics on `tokens` (streamed, a layer at a time)."""
    stats, _ = evaluate_plan(qdir, tokens, None, reference_only=True)
    return stats


def choose_k(qdir: Path, tokens: np.ndarray, plan: RescalePlan) -> RescalePlan:
    """With k > 0: the board-numerics logits with the planned factors and with k = 0 (saturating
    instead), each against the fp32 checkpoint model; keep the plan that moves the logits less
    (its `k_choice` says what was weighed)."""
    without = plan.with_k(0)
    _, scaled = evaluate_plan(qdir, tokens, plan)
    _, saturating = evaluate_plan(qdir, tokens, without)
    report = {"with_k": scaled, "saturating_instead": saturating}
    keep = plan if scaled["relative_logit_error"] <= saturating["relative_logit_error"] else without
    report["kept"] = "with_k" if keep is plan else "saturating_instead"
    return keep.with_report(k_choice=report)


def evaluation_tokens(qdir: Path, vocab: int, text: Path | None, count: int = 128) -> tuple[np.ndarray, str]:
    """Tokens to measure on: the text (default the demo corpus) with the checkpoint's tokenizer, or
    seeded ids when it has none."""
    inputs = evaluation_inputs(qdir, vocab, text, None, "", count)
    return inputs.eval_ids, inputs.source
