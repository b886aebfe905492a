#!/usr/bin/env python3
"""Split the fp16 embedding table into K equal parts for the board's host (FORMAT.md 3.4).

Writes Embedding_01-of-16.bin ... in row order; a vocab that K does not divide is refused.
"""

import logging

from vcu128.format.constants import BOARD_EMBEDDING_PARTS
from vcu128.io.errors import (  # standard library only: first
    ArgumentParser,
    exit_process,
    positive_int,
    run_cli,
)


def main(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--compile_dir", "--compile-dir", required=True, metavar="DIR", help="folder written by compile_sw.py")
    p.add_argument("--parts", type=positive_int, default=BOARD_EMBEDDING_PARTS, help=f"number of parts (default: {BOARD_EMBEDDING_PARTS}, the board's)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: Embedding/ in the packed folder hardware.py wrote in DIR, "
                   "whatever its --ports; with none yet, DIR/QWEN_BLOCK_write_data_port32/Embedding)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder that embedding_tokens.py did not write")
    args = p.parse_args(argv)
    from vcu128.export.embedding_tokens import split_embedding

    result = split_embedding(args.compile_dir, args.out, args.parts, force=args.force)
    logging.getLogger("vcu128").info(result.line())


if __name__ == "__main__":
    exit_process(run_cli(main))
