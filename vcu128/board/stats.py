"""fp16 headroom statistics: per decoder layer, the largest |value| at each site the board stores
in fp16, and the range the gate outputs take (what the SiLU table must cover).

quantize.py measures them on its calibration data (quant_report.json, `activation_stats`);
compile_sw.py copies them into the compile folder (activation_stats.json), where hardware.py (the
SiLU fit) and the fp16 rescaling read them. Both records are read strictly (`check_stats`): a value
of the wrong type is one error naming the file and the key.
"""

from __future__ import annotations

import math
from pathlib import Path

from vcu128.format.rescale import FP16_MAX  # noqa: F401  (what the board saturates at)
from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import (
    get_int,
    get_list,
    get_object,
    get_str,
    get_str_list,
    read_json_object,
    shown,
)

# Sites the board stores in fp16, in pipeline order (the names reports, statistics and the rescaling use).
SITES = ("q", "k", "v", "attention_scores", "attention_probs", "attention", "o", "residual_attention", "gate", "up", "silu", "mlp_product", "down", "residual_mlp")
# The site each linear's output is.
LINEAR_SITES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
                "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
STATS_FILE = "activation_stats.json"
REPORT_FILE = "quant_report.json"
REPORT_KEY = "activation_stats"


def check_stats(stats, where: Path, key: str = "", num_layers: int | None = None) -> dict:
    """Activation statistics checked: {"layers": [{"layer": L, "max_abs": {site: number >= 0, or null
    for a non-finite one}}, ...], "gate_range": [low, high] or null, ...}; anything else is one error
    naming the file and the key (`key` is where the statistics sit in the file)."""
    at = f"{key}." if key else ""
    if not isinstance(stats, dict):
        raise VCUError(f"{where}: '{key or 'activation statistics'}' is {shown(stats)}, expected an object")
    get_str(stats, "measured_on", where, name=f"{at}measured_on")
    get_str(stats, "dtype", where, name=f"{at}dtype")
    rows = get_list(stats, "layers", where, name=f"{at}layers") or []
    seen = set()
    for i, row in enumerate(rows):
        name = f"{at}layers[{i}]"
        if not isinstance(row, dict):
            raise VCUError(f"{where}: '{name}' is {shown(row)}, expected an object with layer and max_abs")
        layer = get_int(row, "layer", where, minimum=0, maximum=None if num_layers is None else num_layers - 1, name=f"{name}.layer")
        if layer in seen:
            raise VCUError(f"{where}: '{name}.layer' is {layer}, a layer listed twice")
        seen.add(layer)
        sites = get_object(row, "max_abs", where, required=True, name=f"{name}.max_abs")
        for site, value in sites.items():
            if site not in SITES:
                raise VCUError(f"{where}: '{name}.max_abs' has site {shown(site)}; the sites are {', '.join(SITES)}")
            # null: a non-finite maximum (strict JSON has no inf), read as inf by the rescaling
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
                raise VCUError(f"{where}: '{name}.max_abs.{site}' is {shown(value)}, expected a number >= 0 (or null for a non-finite one)")
    gate = stats.get("gate_range")
    if gate is not None:
        ok = (isinstance(gate, list) and len(gate) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in gate)
              and gate[0] < gate[1])
        if not ok:
            raise VCUError(f"{where}: '{at}gate_range' is {shown(gate)}, expected [low, high], two finite numbers, low < high")
    return stats


def read_activation_stats(folder: Path, num_layers: int | None = None) -> dict | None:
    """The statistics in a compile folder (activation_stats.json, strictly read), or None when there are none."""
    path = Path(folder) / STATS_FILE
    if not path.is_file():
        return None
    return check_stats(read_json_object(path), path, num_layers=num_layers)


def read_quant_report(qdir: Path) -> dict | None:
    """A checkpoint's quant_report.json, strictly read (the keys other steps read: `files`, `activation_stats`), or None."""
    path = Path(qdir) / REPORT_FILE
    if not path.is_file():
        return None
    doc = read_json_object(path)
    if "files" in doc:
        get_str_list(doc, "files", path, relative_paths=True)
    if doc.get(REPORT_KEY) is not None:
        check_stats(doc[REPORT_KEY], path, REPORT_KEY)
    return doc


def stats_from_report(qdir: Path, num_layers: int | None = None) -> dict | None:
    """The statistics quantize.py recorded in a checkpoint's quant_report.json, if any."""
    doc = read_quant_report(qdir)
    stats = None if doc is None else doc.get(REPORT_KEY)
    if stats is not None and num_layers is not None:
        check_stats(stats, Path(qdir) / REPORT_FILE, REPORT_KEY, num_layers)
    return stats
