"""The int4 grid and the int4 code, said once: quantize.py records them with the checkpoint and every
later step follows the record.

Two settings are tied. The grid is what the ints were quantized to (8: the 16 levels -8..7; 7: the
15 levels -7..7); the code is how the board reads a nibble (FORMAT.md 3.1: two's complement, or the
older bitstream's sign-magnitude, which has no -8 and so needs the 7-grid). The rule (README, "The
int4 code"):

- quantize.py takes either option and infers the other (`--int4 sign_magnitude` quantizes to -7..7;
  `--int4_range 7` is for a sign-magnitude board) and records both in quantize_config.json's `meta`
  (vcu128_int4, vcu128_int4_range). `--int4 sign_magnitude --int4_range 8` is refused.
- compile_sw.py copies the record into compile_sw.json (`int4`). lm_head.py quantizes the output
  layer on the recorded grid, hardware.py packs in the recorded code, each unless given an option.
- An option overrides a record where the result can still be packed (ints of the 7-grid in two's
  complement, a 7-grid output layer beside 8-grid layers), and says so; one that cannot (sign-magnitude
  over ints a record puts on the -8..7 grid) is refused before any work, in one line naming the fix.
- No record (GPTQModel's checkpoints, other tools', the original scripts' compile folders): the -8..7
  grid in two's complement; a sign-magnitude pack is then checked int by int (layout.check_int4_range).
  An earlier version of quantize.py recorded the grid only: 7 stands for sign-magnitude.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vcu128.format.constants import INT4_CODES
from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import get_int, get_object, get_str, read_json_object, shown

log = logging.getLogger("vcu128")

GRIDS = (8, 7)
META_CODE, META_GRID = "vcu128_int4", "vcu128_int4_range"  # quantize_config.json's meta
RECORD_KEY = "int4"  # compile_sw.json's copy
NO_MINUS_8 = "sign-magnitude int4 has no -8"
FIX = "quantize with quantize.py --int4 sign_magnitude (the later steps follow its record), or pack with hardware.py --int4 twos"


def grid_of(code: str) -> int:
    """The grid a code is quantized to by default: sign-magnitude's 15 levels, else the full 16."""
    return 7 if code == "sign_magnitude" else 8


@dataclass(frozen=True)
class Int4Setting:
    """The board's int4 code and the grid the ints were quantized to, and where that was said."""

    code: str
    grid: int
    source: str  # the record's file, or the option

    def to_record(self) -> dict:
        return {"code": self.code, "int4_range": self.grid, "from": self.source}


def from_options(code: str | None, grid: int | None, source: str = "quantize.py") -> Int4Setting:
    """quantize.py's --int4 and --int4_range: either one implies the other; contradicting ones are refused."""
    if code is not None and code not in INT4_CODES:
        raise VCUError(f"--int4 {code}: expected one of {', '.join(INT4_CODES)}")
    if grid is not None and grid not in GRIDS:
        raise VCUError(f"--int4_range {grid}: expected 8 (-8..7, the default) or 7 (-7..7, for sign-magnitude boards)")
    if code == "sign_magnitude" and grid == 8:
        raise VCUError(f"--int4 sign_magnitude with --int4_range 8: {NO_MINUS_8}, it needs the 15 levels -7..7; pass --int4 sign_magnitude alone")
    if code is None:
        code = "sign_magnitude" if grid == 7 else "twos"
    return Int4Setting(code, grid if grid is not None else grid_of(code), source)


def _checked(code, grid, path: Path, prefix: str) -> Int4Setting:
    if code is not None and code not in INT4_CODES:
        key = META_CODE if prefix.endswith("meta.") else "code"
        raise VCUError(f"{path}: '{prefix}{key}' is {shown(code)}, expected one of {', '.join(INT4_CODES)}")
    code = code or ("sign_magnitude" if grid == 7 else "twos")
    grid = grid or grid_of(code)
    if code == "sign_magnitude" and grid == 8:
        raise VCUError(f"{path}: records sign-magnitude int4 on the -8..7 grid, but {NO_MINUS_8}")
    return Int4Setting(code, grid, str(path))


def read_checkpoint_setting(qdir: Path) -> Int4Setting | None:
    """What quantize.py recorded in a checkpoint (quantize_config.json's meta, else config.json's
    quantization_config.meta), read strictly; None where nothing was recorded."""
    for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        path = Path(qdir) / name
        if not path.is_file():
            continue
        doc = read_json_object(path)
        section = doc.get(key) if key else doc
        if not isinstance(section, dict):  # config.json's quantization_config is read strictly by the checkpoint reader
            continue
        prefix = f"{key}.meta." if key else "meta."
        meta = get_object(section, "meta", path, name=prefix[:-1])
        if not meta or (meta.get(META_CODE) is None and meta.get(META_GRID) is None):
            continue
        grid = get_int(meta, META_GRID, path, default=0, minimum=7, maximum=8, name=prefix + META_GRID) or None
        return _checked(get_str(meta, META_CODE, path, name=prefix + META_CODE), grid, path, prefix)
    return None


def read_compile_setting(compile_dir: Path) -> Int4Setting | None:
    """The checkpoint's record as compile_sw.py copied it into compile_sw.json; None without one."""
    # here, not at the top: io.output imports numpy, which quantize.py's option checks do without
    from vcu128.io.output import read_step_record

    doc = read_step_record(compile_dir, "compile_sw")
    path = Path(compile_dir) / "compile_sw.json"
    entry = get_object(doc or {}, RECORD_KEY, path)
    if entry is None:
        return None
    code = get_str(entry, "code", path, name=f"{RECORD_KEY}.code")
    if code is None:
        raise VCUError(f"{path}: missing '{RECORD_KEY}.code'")
    grid = get_int(entry, "int4_range", path, minimum=7, maximum=8, name=f"{RECORD_KEY}.int4_range")
    setting = _checked(code, grid, path, f"{RECORD_KEY}.")
    return Int4Setting(setting.code, setting.grid, get_str(entry, "from", path, default=str(path), name=f"{RECORD_KEY}.from"))


def lm_head_grid(record: Int4Setting | None, method: str, grid: int | None) -> int:
    """The grid lm_head.py quantizes the output layer to: --int4_range, else the checkpoint's record
    (`trunc`, the original rule, is on -8..7 always). An output layer on -8..7 for a checkpoint
    recorded for a sign-magnitude board is refused: hardware.py could not pack it."""
    if grid is None:
        grid = 8 if record is None or method == "trunc" else record.grid
    if grid == 8 and method != "checkpoint" and record is not None and record.code == "sign_magnitude":
        said = "--method trunc (the original rule, on -8..7)" if method == "trunc" else "--int4_range 8"
        fix = "use --method rtn" if method == "trunc" else "leave --int4_range out: lm_head.py follows the checkpoint's record"
        raise VCUError(f"{said}: the checkpoint is quantized for a sign-magnitude board ({record.source}: {META_CODE} "
                       f"sign_magnitude), and {NO_MINUS_8}; {fix}")
    return grid


def hardware_code(compile_dir: Path, code: str | None, output_layer: tuple[str, int] | None) -> tuple[str, str]:
    """(code, where it came from) for hardware.py: --int4, else compile_sw.json's record, else twos.
    `output_layer`: (method, grid) from lm_head.json. Sign-magnitude over ints that a record puts on
    the -8..7 grid is refused here, before any work; without records the packer checks every int."""
    record = read_compile_setting(compile_dir)
    if code is None:
        if record is None:
            return "twos", "the default: no record of quantize.py's --int4"
        code, said, how = record.code, f"the int4 code {record.code} ({record.source})", f"recorded by quantize.py: {record.source}"
    else:
        if code not in INT4_CODES:
            raise VCUError(f"--int4 {code}: expected one of {', '.join(INT4_CODES)}")
        said, how = f"--int4 {code}", "given: --int4"
        if record is not None and record.code != code and code == "twos":
            log.info(f"hardware: --int4 twos, although {record.source} records {record.code}: its -7..7 ints are packed in two's complement")
    if code == "sign_magnitude":
        if record is not None and record.grid == 8:
            raise VCUError(f"{said}: the checkpoint was quantized on the -8..7 grid ({record.source}: {record.code}, "
                           f"int4_range 8), and {NO_MINUS_8}; {FIX}")
        if output_layer is not None and output_layer[0] != "checkpoint" and output_layer[1] == 8:
            raise VCUError(f"{said}: the output layer in {compile_dir} was quantized on the -8..7 grid (lm_head.json: method "
                           f"{output_layer[0]}, int4_range 8), and {NO_MINUS_8}; re-run lm_head.py (it follows the checkpoint's "
                           "record, or pass --int4_range 7), or pack with --int4 twos")
    return code, how
