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


def shown(value, limit: int = 60) -> str:
    """A JSON value for an error line: repr, cut short (a damaged record may hold a megabyte)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def get_int(doc: dict, key: str, path: Path, default=None, minimum: int = 1, maximum: int | None = None, name: str | None = None) -> int:
    """doc[key] as an int >= minimum (a JSON bool or float is not an int here). `name`: the key as
    the error names it (`made_from.fingerprint` for a nested one)."""
    name = name or key
    if key not in doc or doc[key] is None:
        if default is None:
            raise VCUError(f"{path}: missing '{name}'")
        return default
    value = doc[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise VCUError(f"{path}: '{name}' is {shown(value)}, expected an integer")
    if value < minimum:
        raise VCUError(f"{path}: '{name}' is {value}, expected at least {minimum}")
    if maximum is not None and value > maximum:
        raise VCUError(f"{path}: '{name}' is {value}, expected at most {maximum}")
    return value


def get_bool(doc: dict, key: str, path: Path, default: bool, name: str | None = None) -> bool:
    value = doc.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise VCUError(f"{path}: '{name or key}' is {shown(value)}, expected true or false")
    return value


def get_str(doc: dict, key: str, path: Path, default: str | None = None, name: str | None = None) -> str | None:
    value = doc.get(key, default)
    if value is not None and not isinstance(value, str):
        raise VCUError(f"{path}: '{name or key}' is {shown(value)}, expected a string")
    return value


def get_float(doc: dict, key: str, path: Path, default: float | None = None, name: str | None = None) -> float | None:
    value = doc.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise VCUError(f"{path}: '{name or key}' is {shown(value)}, expected a finite number")
    return float(value)


def get_object(doc: dict, key: str, path: Path, required: bool = False, name: str | None = None) -> dict | None:
    """doc[key] as a JSON object (absent or null: None, or an error when `required`)."""
    value = doc.get(key)
    if value is None:
        if required:
            raise VCUError(f"{path}: missing '{name or key}' (expected an object)")
        return None
    if not isinstance(value, dict):
        raise VCUError(f"{path}: '{name or key}' is {shown(value)}, expected an object")
    return value


def get_list(doc: dict, key: str, path: Path, required: bool = False, name: str | None = None) -> list | None:
    """doc[key] as a JSON list (absent or null: None, or an error when `required`)."""
    value = doc.get(key)
    if value is None:
        if required:
            raise VCUError(f"{path}: missing '{name or key}' (expected a list)")
        return None
    if not isinstance(value, list):
        raise VCUError(f"{path}: '{name or key}' is {shown(value)}, expected a list")
    return value


def get_str_list(doc: dict, key: str, path: Path, relative_paths: bool = False, name: str | None = None) -> list[str]:
    """doc[key], required, as a list of strings; `relative_paths`: each a path inside the folder
    (not absolute, no `..`)."""
    values = get_list(doc, key, path, required=True, name=name)
    for i, v in enumerate(values):
        if not isinstance(v, str) or (relative_paths and (not v or v.startswith("/") or ".." in Path(v).parts)):
            raise VCUError(f"{path}: '{name or key}[{i}]' is {shown(v)}, expected " + ("a relative path inside the folder" if relative_paths else "a string"))
    return values


def read_utf8_text(path: Path, label: str, needs: str) -> str:
    """A text file the user gave, as UTF-8: anything else is one error naming it and the byte."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise VCUError(f"{label}: not UTF-8 text (byte {e.start}); {needs}") from None


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
