#!/usr/bin/env python3
"""Software-format .bin files -> the VCU128 board's layout (QWEN_BLOCK_write_data_port32/).

Every linear becomes rows of 32-bit words (scales and int4 weights interleaved per 2048 inputs) spread
over the HBM ports; biases become bias words, norms are copied. Dimensions come from the compile
folder's config.json. Writes manifest.json (every file's bytes, sha256, source). See FORMAT.md section 3.
"""

import logging
import sys

from vcu128.errors import ArgumentParser, positive_int, run_cli
from vcu128.pack import pack_hardware


def main(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--compile_dir", "--compile-dir", required=True, metavar="DIR", help="folder written by compile_sw.py and lm_head.py")
    p.add_argument("--ports", type=positive_int, default=32, help="HBM ports the weights are spread over (default: 32, the board's)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: DIR/QWEN_BLOCK_write_data_port<ports>)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder that hardware.py did not write")
    args = p.parse_args(argv)
    result = pack_hardware(args.compile_dir, args.out, args.ports, force=args.force)
    logging.getLogger("vcu128").info(result.line())


if __name__ == "__main__":
    sys.exit(run_cli(main))
