"""Reading the JSON files a step is given (config.json, quantize_config.json, index, manifest,
step records) strictly: anything but the expected object, or a value of the wrong type, is one
`error:` line naming the file and the key."""

from __future__ import annotations

import json
import math
from pathlib import Path

from vcu128.io.errors import VCUError


def read_json_object(path: Path, what: str = "") -> dict:
    path = Path(path)
    if not path.is_file():
        raise VCUError(f"{path}: no such file" + (f" ({what})" if what else ""))
    try:
        doc = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VCUError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise VCUError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise VCUError(f"{path}: expected a JSON object, found a JSON {type(doc).__name__}")
    return doc


def get_int(doc: dict, key: str, path: Path, default=None, minimum: int = 1) -> int:
    """doc[key] as an int >= minimum (a JSON bool or float is not an int here)."""
    if key not in doc or doc[key] is None:
        if default is None:
            raise VCUError(f"{path}: missing '{key}'")
        return default
    value = doc[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise VCUError(f"{path}: '{key}' is {value!r}, expected an integer")
    if value < minimum:
        raise VCUError(f"{path}: '{key}' is {value}, expected at least {minimum}")
    return value


def get_bool(doc: dict, key: str, path: Path, default: bool) -> bool:
    value = doc.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise VCUError(f"{path}: '{key}' is {value!r}, expected true or false")
    return value


def get_str(doc: dict, key: str, path: Path, default: str | None = None) -> str | None:
    value = doc.get(key, default)
    if value is not None and not isinstance(value, str):
        raise VCUError(f"{path}: '{key}' is {value!r}, expected a string")
    return value


def get_float(doc: dict, key: str, path: Path, default: float | None = None) -> float | None:
    value = doc.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise VCUError(f"{path}: '{key}' is {value!r}, expected a finite number")
    return float(value)


def dumps(doc) -> str:
    """Strict JSON (NaN and inf become null: strict readers refuse bare NaN)."""
    return json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n"


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
