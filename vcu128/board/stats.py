"""fp16 headroom statistics: per decoder layer, the largest |value| at each site the board stores
in fp16, and the range the gate outputs take (what the SiLU table must cover).

quantize.py measures them on its calibration data (quant_report.json, `activation_stats`);
compile_sw.py copies them into the compile folder (activation_stats.json), where hardware.py (the
SiLU fit) and the fp16 rescaling read them.
"""

from __future__ import annotations

import json
from pathlib import Path

from vcu128.format.rescale import FP16_MAX  # noqa: F401  (what the board saturates at)

# Sites the board stores in fp16, in pipeline order (the names reports, statistics and the rescaling use).
SITES = ("q", "k", "v", "attention_scores", "attention_probs", "attention", "o", "residual_attention", "gate", "up", "silu", "mlp_product", "down", "residual_mlp")
# The site each linear's output is.
LINEAR_SITES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
                "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
STATS_FILE = "activation_stats.json"
REPORT_KEY = "activation_stats"


def read_activation_stats(folder: Path) -> dict | None:
    """The statistics in a compile folder, or None when there are none (or they do not parse)."""
    path = Path(folder) / STATS_FILE
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def stats_from_report(qdir: Path) -> dict | None:
    """The statistics quantize.py recorded in a checkpoint's quant_report.json, if any."""
    try:
        doc = json.loads((Path(qdir) / "quant_report.json").read_bytes())
    except (OSError, ValueError):
        return None
    stats = doc.get(REPORT_KEY) if isinstance(doc, dict) else None
    return stats if isinstance(stats, dict) else None
