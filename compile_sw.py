#!/usr/bin/env python3
"""GPTQ checkpoint -> software-format .bin files (compile/qwen2_qweight_bin, compile/qwen2_fp16_weight_bin).

Checks the checkpoint first (4 bits, group 128, symmetric, no act-order, shapes from config.json);
a refused checkpoint leaves nothing behind. See FORMAT.md section 2.
"""

import argparse
import logging
import sys

from vcu128.compile_sw import compile_software
from vcu128.errors import run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantize_model", "--quantize-model", required=True, metavar="QDIR", help="GPTQ checkpoint folder (config.json + safetensors)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: QDIR/compile)")
    args = p.parse_args(argv)
    result = compile_software(args.quantize_model, args.out)
    logging.getLogger("vcu128").info(result.line())


if __name__ == "__main__":
    sys.exit(run_cli(main))
