#!/usr/bin/env python3
"""Software-format .bin files -> the VCU128 board's layout (QWEN_BLOCK_write_data_port32/).

Writes the board's two global tables too (FORMAT.md 5): the RoPE table pos_in_4_token<MAX_TOKEN>_ch32.bin
and the SiLU table ACT_parameter_in_DDR.bin. What the folder assumes about the board (RoPE value order,
SiLU table, int4 code) is printed and recorded in manifest.json's "assumptions".

Every linear becomes rows of 32-bit words (scales and int4 weights interleaved per 2048 inputs) spread
over the HBM ports; biases become bias words, norms are copied. Dimensions come from the compile
folder's config.json. Writes manifest.json (every file's bytes, sha256, source). See FORMAT.md section 3.

A linear compile_sw.py packed ahead (DIR/packed_ahead/) is moved into the folder instead of packed
again, where its inputs are the very files it was packed from, with the same ports and int4 code.
"""

import logging

from vcu128.io.errors import (  # standard library only: first
    ArgumentParser,
    exit_process,
    positive_int,
    run_cli,
)


def main(argv=None):
    # standard library only: --help and a wrong argument cost no import of numpy
    from vcu128.format.constants import (
        BOARD_PORTS,
        DEFAULT_MAX_TOKEN,
        INT4_CODES,
        ROPE_ORDERS,
        SILU_TABLES,
    )

    p = ArgumentParser(__doc__)
    p.add_argument("--compile_dir", "--compile-dir", required=True, metavar="DIR", help="folder written by compile_sw.py and lm_head.py")
    p.add_argument("--ports", type=positive_int, default=BOARD_PORTS, help=f"HBM ports the weights are spread over (default: {BOARD_PORTS}, the board's)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: DIR/QWEN_BLOCK_write_data_port<ports>)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder that hardware.py did not write")
    p.add_argument("--max_token", "--max-token", type=positive_int, default=DEFAULT_MAX_TOKEN,
                   help="positions in the RoPE table: the board's context buffer (default 2048), not the model's")
    p.add_argument("--rope_table", "--rope-table", choices=ROPE_ORDERS, default=None,
                   help="value order of a RoPE row: for Qwen2/Llama halves (64 cos, then 64 sin; default) or pairs (cos, sin interleaved); "
                        "for ChatGLM/GLM glm (the only one: cos, sin of 32 frequencies interleaved, then zeros); see docs/FORMAT.md 5 and 8")
    p.add_argument("--silu_table", "--silu-table", choices=SILU_TABLES, default="board",
                   help="board (default): the table the accelerator's host code loads, bit for bit; fit: this project's minimax fit")
    p.add_argument("--int4", choices=INT4_CODES,
                   help="int4 nibble code: twos (the 1128 bitstream) or sign_magnitude (the older bitstream, -7..7); default: "
                        "the code quantize.py --int4 recorded (carried in compile_sw.json), else twos")
    args = p.parse_args(argv)
    from vcu128.export.hardware import BoardOptions, format_assumptions, pack_hardware

    opts = BoardOptions(ports=args.ports, int4=args.int4, rope_table=args.rope_table, silu_table=args.silu_table, max_token=args.max_token)
    result = pack_hardware(args.compile_dir, args.out, force=args.force, opts=opts)
    log = logging.getLogger("vcu128")
    log.info(format_assumptions(result.details))
    log.info(result.line())


if __name__ == "__main__":
    exit_process(run_cli(main))
