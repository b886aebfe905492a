"""fp16 rescaling as the files hold it (FORMAT.md 7): a plan of power-of-two factors, the one rule
that says which factor every tensor carries, and the exact fp16 multiplication by it.

How a plan is chosen lives in `board.rescale` (the rules) and `check.rescale_search` (the search for
the residual factor); this module only says what a plan means for the bytes, and reads and writes
its record (the `vcu128_fp16_rescale` key of compile/config.json, compile_sw.json and the packed
folder's manifest.json), strictly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vcu128.format.model import EMBEDDING
from vcu128.io.errors import VCUError

FP16_MAX = 65504.0  # the largest finite fp16: what the board saturates at
FP16_MIN_NORMAL = 2.0**-14
CONFIG_KEY = "vcu128_fp16_rescale"  # the plan's key in compile/config.json
# Past 2^30 every fp16 value leaves the normal range: no factor of use is larger.
MAX_EXPONENT = 30

_LINEAR = re.compile(r"model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)")


@dataclass(frozen=True)
class RescalePlan:
    """The residual stream scaled by 2^-k (one k), each layer's MLP intermediate by 2^-m[layer].
    `why`, `statistics`, `k_choice` and `out_of_normal_range` are what compile_sw reports about how
    the plan was chosen and what it cost; they do not change a byte."""

    k: int
    m: tuple[int, ...]
    why: tuple[str, ...] = ()
    statistics: str | None = None
    k_choice: dict | None = None
    out_of_normal_range: int | None = None

    def __post_init__(self):
        for name, value in [("k", self.k), *((f"m[{i}]", v) for i, v in enumerate(self.m))]:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EXPONENT:
                raise VCUError(f"fp16 rescaling {name}={value!r}: expected a whole number from 0 to {MAX_EXPONENT}")

    @property
    def is_identity(self) -> bool:
        return self.k == 0 and not any(self.m)

    def layer_m(self, layer: int) -> int:
        return self.m[layer] if layer < len(self.m) else 0

    def factor(self, tensor: str) -> float:
        """The power of two that `tensor`'s scales, bias or rows carry in the files: the one rule.
        `tensor` is a linear (`model.layers.N.mlp.down_proj`, with or without a suffix such as
        `.scales`) or the embedding; every other tensor carries 1."""
        if tensor.startswith(EMBEDDING.rsplit(".", 1)[0]):
            return 2.0**-self.k
        hit = _LINEAR.match(tensor)
        if not hit:
            return 1.0
        layer, module = int(hit.group(1)), hit.group(2)
        m = self.layer_m(layer)
        return {"self_attn.o_proj": 2.0**-self.k, "mlp.up_proj": 2.0**-m, "mlp.down_proj": 2.0 ** (m - self.k)}.get(module, 1.0)

    def module_factors(self, layer: int) -> dict[str, float]:
        """{module: factor} of one layer's linears, those other than 1."""
        out = {mod: self.factor(f"model.layers.{layer}.{mod}") for mod in ("self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
        return {mod: f for mod, f in out.items() if f != 1.0}

    def with_k(self, k: int) -> "RescalePlan":
        return RescalePlan(k, self.m, self.why, self.statistics, self.k_choice, self.out_of_normal_range)

    def with_report(self, **fields) -> "RescalePlan":
        return RescalePlan(**{**self.__dict__, **fields})

    def factors_record(self) -> dict:
        """{"k", "m"}: what made_from records and the manifest's `fp16_rescale` entry."""
        return {"k": self.k, "m": list(self.m)}

    def describe(self) -> str:
        """The manifest's assumptions string."""
        return f"k={self.k}, m={list(self.m)}"

    def to_record(self) -> dict:
        """The whole record (compile/config.json's key, compile_sw.json), keys in their usual order."""
        doc: dict = {"k": self.k, "m": list(self.m), "why": list(self.why)}
        if self.statistics is not None:
            doc["statistics"] = self.statistics
        if self.k_choice is not None:
            doc["k_choice"] = self.k_choice
        if self.out_of_normal_range is not None:
            doc["out_of_normal_range"] = self.out_of_normal_range
        return doc

    @classmethod
    def from_record(cls, doc, where: Path | str, key: str, num_layers: int | None = None) -> "RescalePlan | None":
        """A recorded plan (null: none), checked: a wrong type is one error naming the file and key."""
        if doc is None:
            return None
        if not isinstance(doc, dict):
            raise VCUError(f"{where}: {key} is {type(doc).__name__}, expected an object with k and m (or null)")
        k, m = doc.get("k"), doc.get("m", [])
        if not isinstance(m, list):
            raise VCUError(f"{where}: {key}.m is {type(m).__name__}, expected a list of whole numbers (one a layer)")
        why = doc.get("why", [])
        if not isinstance(why, list) or not all(isinstance(w, str) for w in why):
            raise VCUError(f"{where}: {key}.why is not a list of strings")
        if "k" not in doc:
            raise VCUError(f"{where}: {key}.k is missing (the residual stream's factor, a whole number from 0 to {MAX_EXPONENT})")
        for name, types, what in (("statistics", (str,), "a string"), ("k_choice", (dict,), "an object"), ("out_of_normal_range", (int,), "a whole number")):
            value = doc.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
                raise VCUError(f"{where}: {key}.{name} is {value!r:.60}, expected {what} (or null)")
        try:
            plan = cls(k, tuple(m), tuple(why), doc.get("statistics"), doc.get("k_choice"), doc.get("out_of_normal_range"))
        except VCUError as e:
            raise VCUError(f"{where}: {key}: {e}") from None
        if num_layers is not None and m and len(m) != num_layers:
            raise VCUError(f"{where}: {key}.m has {len(m)} entries, the model has {num_layers} layers")
        return plan


def tensor_factor(plan: RescalePlan | None, tensor: str) -> float:
    return 1.0 if plan is None else plan.factor(tensor)


def module_factors(plan: RescalePlan | None, layer: int) -> dict[str, float]:
    return {} if plan is None else plan.module_factors(layer)


def scale_fp16(values: np.ndarray, factor: float, counter: dict | None = None) -> np.ndarray:
    """fp16 values times a power of two: exact unless the result leaves fp16's normal range
    (counted in `counter`: a subnormal or zero result loses bits, an overflow saturates)."""
    if factor == 1.0:
        return values
    out = values.astype(np.float32) * np.float32(factor)
    normal_before = np.abs(values.astype(np.float32)) >= FP16_MIN_NORMAL
    lost = normal_before & ((np.abs(out) < FP16_MIN_NORMAL) | (np.abs(out) > FP16_MAX))
    if counter is not None:
        counter["out_of_normal_range"] = counter.get("out_of_normal_range", 0) + int(lost.sum())
    return np.clip(out, -FP16_MAX, FP16_MAX).astype(np.float16)
