#!/usr/bin/env python3
"""GPTQ checkpoint -> software-format .bin files (compile/qwen2_qweight_bin, compile/qwen2_fp16_weight_bin).

Checks the checkpoint first (4 bits, group 128, symmetric, no act-order, shapes from config.json);
a refused checkpoint leaves nothing behind. See FORMAT.md section 2.
"""

import logging

from vcu128.io.errors import (  # standard library only: first
    ArgumentParser,
    exit_process,
    run_cli,
)


def main(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--quantize_model", "--quantize-model", required=True, metavar="QDIR", help="GPTQ checkpoint folder (config.json + safetensors)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: QDIR/compile)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder that compile_sw.py did not write")
    p.add_argument("--fp16_rescale", "--fp16-rescale", default="auto", metavar="auto|off|measure|k=K,m=M",
                   help="power-of-two factors that keep activations inside fp16 (FORMAT.md 7): auto (default) from quant_report.json's "
                        "statistics, nothing without them; measure: run the model first; off; or explicit factors")
    p.add_argument("--eval_text", "--eval-text", "--text", dest="text", metavar="FILE",
                   help="with --fp16_rescale measure (or a residual factor to weigh): held-out text to measure on "
                        "(default: data/demo_corpus.txt)")
    args = p.parse_args(argv)
    from vcu128.export.compile_sw import compile_software

    result = compile_software(args.quantize_model, args.out, force=args.force, fp16_rescale=args.fp16_rescale, text=args.text)
    logging.getLogger("vcu128").info(result.line())


if __name__ == "__main__":
    exit_process(run_cli(main))
