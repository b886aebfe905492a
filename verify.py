#!/usr/bin/env python3
"""Prove a packed folder is the model before it goes on the board.

1. Bit check: decode every file of the hardware folder (docs/FORMAT.md) back to integers, scales,
   biases, norm weights and embedding rows and compare them with the GPTQ checkpoint, every word
   including padding; check sizes and sha256 against manifest.json; a missing or extra file is a
   difference. Each difference names the file, row, word and the expected value.
2. Functional check: the model's forward pass from the hardware files alone (int4 x fp16 scale) next
   to the checkpoint's own model (and the fp16 original with --model): greedy tokens for a prompt,
   top-1 agreement and relative logit error on held-out text. Written to verify_report.json beside
   the hardware folder.

Exit code 0 only when the bit check finds no difference.
"""

import logging
import sys

from vcu128.errors import ArgumentParser, positive_int, run_cli
from vcu128.verify import format_functional, verify


def main(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--quantize_model", "--quantize-model", required=True, metavar="QDIR", help="the GPTQ checkpoint")
    p.add_argument("--hardware_dir", "--hardware-dir", required=True, metavar="HWDIR", help="the packed folder (QWEN_BLOCK_write_data_port32)")
    p.add_argument("--compile_dir", "--compile-dir", help="where lm_head_*.bin are (default: beside HWDIR, or QDIR/compile)")
    p.add_argument("--model", help="the fp16 original, to compare with too")
    p.add_argument("--text", help="held-out text for the functional check (default: data/demo_corpus.txt)")
    p.add_argument("--prompt", default="The accelerator", help="prompt for the greedy continuation")
    p.add_argument("--tokens", type=positive_int, default=16, help="tokens to generate greedily")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bits_only", "--bits-only", action="store_true", help="only the bit check")
    p.add_argument("--lm_head_from_checkpoint", action="store_true", help="functional check with the checkpoint's float lm_head (isolates packing from lm_head quantization)")
    args = p.parse_args(argv)
    log = logging.getLogger("vcu128")
    result = verify(
        args.quantize_model, args.hardware_dir, args.compile_dir, args.model, args.text, args.prompt, args.tokens,
        args.device, not args.bits_only, args.lm_head_from_checkpoint,
    )
    bits = result["bit_check"]
    if "functional" in result:
        log.info(format_functional(result["functional"]))
    if not bits["ok"]:
        for d in bits["differences"]:
            print(f"difference: {d}", file=sys.stderr)
        more = f" (and {bits['more_differences']} more)" if bits["more_differences"] else ""
        print(f"error: verify: {len(bits['differences'])} differences{more} in {args.hardware_dir}; do not load it on the board", file=sys.stderr)
        return 1
    report = f"; report: {result['report_path']}" if "report_path" in result else ""
    log.info(f"verify: OK: {bits['files']} files, {bits['bytes'] / 1e9:.3f} GB match the checkpoint bit for bit "
             f"in {bits['seconds']:.1f} s{report}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
