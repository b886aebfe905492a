#!/usr/bin/env python3
"""Split the fp16 embedding table into K equal parts for the board's host (FORMAT.md 3.4).

Writes Embedding_01-of-16.bin ... in row order; a vocab that K does not divide is refused.
"""

import argparse
import logging
import sys

from vcu128.embedding import split_embedding
from vcu128.errors import run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile_dir", "--compile-dir", required=True, metavar="DIR", help="folder written by compile_sw.py")
    p.add_argument("--parts", type=int, default=16, help="number of parts (default: 16, the board's)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: DIR/QWEN_BLOCK_write_data_port32/Embedding)")
    args = p.parse_args(argv)
    result = split_embedding(args.compile_dir, args.out, args.parts)
    logging.getLogger("vcu128").info(result.line())


if __name__ == "__main__":
    sys.exit(run_cli(main))
