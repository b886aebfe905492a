"""quantize's options and the checks that need no model: run before anything heavy is imported or any
model is opened, so that a wrong argument costs milliseconds, not the seconds a 7B's load takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vcu128.format.int4_grid import from_options
from vcu128.format.model import GROUP_SIZE
from vcu128.io.errors import VCUError

ENGINES = ("vcu128", "gptqmodel")


@dataclass
class QuantizeOptions:
    wbits: int = 4
    group_size: int = GROUP_SIZE
    sym: bool = True
    desc_act: bool = False
    device: str = "cpu"
    nsamples: int = 256
    seqlen: int = 512
    seed: int = 0
    calib: str | None = None
    eval_text: str | None = None
    lm_head: bool = False
    engine: str = "vcu128"  # "vcu128" (this project's GPTQ, vcu128/quant/gptq.py) or "gptqmodel"
    batch_size: int | None = None  # samples a forward pass; None: vcu128 16384 tokens' worth, gptqmodel 1 on CPU, GPU_BATCH on a GPU
    # GPTQModel engine only:
    offload: bool | None = None  # GPTQModel's offload_to_disk; None: off on a GPU, its default on the CPU
    pack_impl: str | None = None  # GPTQModel's int4 packing; None: "gpu" on a GPU, "original" on the CPU
    tf32: bool | None = None  # TF32 matmuls for the Hessians and their inverses; None: on for a GPU
    true_sequential: bool = True  # one forward a group of linears in a layer (GPTQ's default) or one a layer
    verbose: bool = False  # GPTQModel's own output (banners, tables) on stdout; quiet by default
    report: bool = True
    force: bool = False  # replace an existing output folder this step did not write
    int4_range: int | None = None  # 8: the full -8..7 grid; 7: the 15 levels -7..7 that sign-magnitude boards hold
    int4: str | None = None  # the board's nibble code (twos, sign_magnitude): either option implies the other

    def __post_init__(self):
        # Said once (vcu128/format/int4_grid.py): --int4 sign_magnitude means the 7-grid, --int4_range 7
        # a sign-magnitude board. A contradiction stays as given, for check_arguments to refuse.
        if self.int4_range is None:
            self.int4_range = 7 if self.int4 == "sign_magnitude" else 8
        if self.int4 is None:
            self.int4 = "sign_magnitude" if self.int4_range == 7 else "twos"


def check_board_settings(opts: QuantizeOptions) -> None:
    """What --compile needs: the board runs only W4, group 128, symmetric, no act-order."""
    bad = [
        (opts.wbits != 4, f"--wbits {opts.wbits}"),
        (opts.group_size != GROUP_SIZE, f"--group_size {opts.group_size}"),
        (not opts.sym, "--no-sym"),
        (opts.desc_act, "--desc_act"),
    ]
    for is_bad, flag in bad:
        if is_bad:
            raise VCUError(f"{flag} with --compile: the board supports only 4-bit, group size 128, symmetric, no act-order")


def check_engine_settings(opts: QuantizeOptions) -> None:
    for flag, value, least in (("--nsamples", opts.nsamples, 1), ("--seqlen", opts.seqlen, 2), ("--batch_size", opts.batch_size or 1, 1)):
        if not isinstance(value, int) or value < least:
            raise VCUError(f"{flag} {value}: must be an integer of at least {least}")
    if opts.engine not in ENGINES:
        raise VCUError(f"--engine {opts.engine}: expected one of {', '.join(ENGINES)}")
    from_options(opts.int4, opts.int4_range)
    if opts.int4_range == 7 and opts.engine != "vcu128":
        said = "--int4 sign_magnitude" if opts.int4 == "sign_magnitude" else "--int4_range 7"
        raise VCUError(f"{said} needs --engine vcu128 (GPTQModel has no 15-level grid)")
    if opts.engine == "vcu128" and (opts.wbits, opts.group_size, opts.sym, opts.desc_act) != (4, GROUP_SIZE, True, False):
        raise VCUError("--engine vcu128 quantizes only what the board runs (4-bit, group size 128, symmetric, "
                       "no act-order); pass --engine gptqmodel for other settings")


def check_text_arguments(opts: QuantizeOptions) -> None:
    """--calib and --eval_text: present where they are needed, and there (read later)."""
    if opts.calib is None:
        raise VCUError("--calib: pass a text file, a JSONL file, a saved dataset folder, or 'random'")
    if opts.calib == "random" and opts.eval_text is None and opts.report:
        raise VCUError("--calib random: pass --eval_text too, there is no held-out text to evaluate on",
                       "or pass --no_report: the held-out text is for the report only")
    if opts.calib != "random" and not Path(opts.calib).exists():
        raise VCUError(f"--calib {opts.calib}: no such calibration file or dataset folder")
    if opts.eval_text is not None and not Path(opts.eval_text).exists():
        raise VCUError(f"--eval_text {opts.eval_text}: no such file or dataset folder")


def check_arguments(opts: QuantizeOptions, compile: bool = False) -> None:
    """Every check of quantize's arguments that needs no model (the device is io.devices')."""
    if compile:
        check_board_settings(opts)
    check_engine_settings(opts)
    check_text_arguments(opts)
