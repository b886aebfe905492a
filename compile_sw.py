#!/usr/bin/env python3
"""GPTQ checkpoint -> software-format .bin files (compile/qwen2_qweight_bin, compile/qwen2_fp16_weight_bin).

Checks the checkpoint first (4 bits, group 128, symmetric, no act-order, shapes from config.json);
a refused checkpoint leaves nothing behind. See FORMAT.md section 2.

With the ints in memory, it also packs every linear for the board (compile/packed_ahead/): hardware.py
takes those files instead of reading the 27 GB of a 7B's qweight.bin files back, where they are what it
would pack (the same files, ports and int4 code), and packs the rest itself.
"""

import logging

from vcu128.io.errors import (  # standard library only: first
    ArgumentParser,
    exit_process,
    positive_int,
    run_cli,
)


def main(argv=None):
    from vcu128.format.constants import BOARD_PORTS  # standard library only

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
    p.add_argument("--ports", type=positive_int, default=BOARD_PORTS,
                   help=f"HBM ports hardware.py will pack for (default: {BOARD_PORTS}, the board's): every linear is packed for them as its "
                        "ints are written (OUT/packed_ahead/), and hardware.py takes it from there instead of reading the ints back")
    p.add_argument("--no_pack_ahead", "--no-pack-ahead", action="store_true",
                   help="pack nothing ahead (hardware.py then packs every linear from the files; saves the packed size on disk)")
    args = p.parse_args(argv)
    from vcu128.export.compile_sw import compile_software

    result = compile_software(args.quantize_model, args.out, force=args.force, fp16_rescale=args.fp16_rescale, text=args.text,
                              ports=None if args.no_pack_ahead else args.ports)
    logging.getLogger("vcu128").info(result.line())


if __name__ == "__main__":
    exit_process(run_cli(main))
