#!/usr/bin/env python3
"""Quantize the output layer (lm_head) to int4 + fp16 scales: compile/qwen2_qweight_bin/lm_head_*.bin.

Methods (FORMAT.md 2): rtn (default; round to nearest, clamped to -8..7), trunc (the original rule,
bit-exact), checkpoint (the lm_head GPTQ quantized; chosen by default when the checkpoint has
lm_head.qweight). Tied embeddings (no lm_head.weight) use model.embed_tokens.weight.
Prints the relative error ||W - W_hat|| / ||W|| of the method used.
"""

import logging

from vcu128.io.errors import (  # standard library only: first
    ArgumentParser,
    exit_process,
    run_cli,
)


def main(argv=None):
    # standard library only: --help and a wrong argument cost no import of numpy
    from vcu128.format.constants import LM_HEAD_METHODS as ALL_METHODS

    p = ArgumentParser(__doc__)
    p.add_argument("--quantize_model", "--quantize-model", required=True, metavar="QDIR", help="GPTQ checkpoint folder")
    p.add_argument("--method", choices=ALL_METHODS, help="default: checkpoint if the checkpoint has lm_head.qweight, else rtn")
    p.add_argument("--int4_range", "--int4-range", type=int, choices=(8, 7),
                   help="8: ints -8..7; 7: -7..7, what a sign-magnitude board holds (default: the grid quantize.py recorded "
                        "in the checkpoint, else 8)")
    p.add_argument("--out", metavar="DIR", help="compile folder to write into (default: QDIR/compile)")
    p.add_argument("--force", action="store_true", help="write into a folder (or replace lm_head files) that lm_head.py did not write")
    args = p.parse_args(argv)
    from vcu128.export.lm_head import quantize_lm_head

    result, method, error = quantize_lm_head(args.quantize_model, args.out, args.method, force=args.force, int4_range=args.int4_range)
    log = logging.getLogger("vcu128")
    if error is None:
        log.info("lm_head (checkpoint): taken from the GPTQ checkpoint as quantized")
    else:
        log.info(f"lm_head ({method}): relative error ||W - W_hat|| / ||W|| = {error:.5f}")
    log.info(result.line())


if __name__ == "__main__":
    exit_process(run_cli(main))
