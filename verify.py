#!/usr/bin/env python3
"""Prove a packed folder is the model before it goes on the board.

1. Bit check: decode every file of the hardware folder (docs/FORMAT.md) back to integers, scales,
   biases, norm weights, embedding rows and the RoPE and SiLU tables, and compare them with the GPTQ
   checkpoint, every word including padding; check sizes and sha256 against manifest.json (a folder
   without one, from the original scripts, is checked on what it holds). Each difference names the
   file, row, word and the expected value.
2. Functional check, streamed one decoder layer at a time (a real 7B fits in a few GB): the folder's
   model in the board's own fp16 arithmetic (--numerics board, the default: fp16 storage with
   saturation, fixed norm eps 1e-6, the folder's RoPE and SiLU tables; a model of the board, see
   docs/FORMAT.md) next to the checkpoint's model in fp32 (and the unquantized original with --model):
   greedy tokens, top-1 agreement and relative logit error on held-out tokens, every saturated fp16
   site, and the sites whose fp32 values pass half the fp16 range. Written to verify_report.json
   beside the hardware folder.

The verdict has two parts, on the last line and in the report: the bits (the folder is the
checkpoint) and the board model (it answers like the checkpoint: top-1 agreement at least 0.9 and
no saturated fp16 site; below that, a warning names the next step).
Exit code 0: the bits match and the board model computes only finite values (a board-model warning
allowed). 1: a difference, a non-finite value (named), or with --strict a board model below the
threshold. 2: bad input.
"""

import logging
import sys

from vcu128.io.errors import (  # standard library only: first
    ArgumentParser,
    exit_process,
    one_line,
    positive_int,
    run_cli,
)


def main(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--quantize_model", "--quantize-model", required=True, metavar="QDIR", help="the GPTQ checkpoint")
    p.add_argument("--hardware_dir", "--hardware-dir", required=True, metavar="HWDIR", help="the packed folder (QWEN_BLOCK_write_data_port32)")
    p.add_argument("--compile_dir", "--compile-dir", help="the compile folder HWDIR came from, for stale-input warnings (default: beside HWDIR, "
                   "or QDIR/compile); nothing in it is trusted: every byte is checked against the checkpoint")
    p.add_argument("--model", help="the fp16 original, to compare with too")
    p.add_argument("--eval_text", "--eval-text", "--text", dest="text", metavar="FILE",
                   help="held-out text for the functional check (default: data/demo_corpus.txt); its last --eval_tokens tokens")
    p.add_argument("--eval_ids", "--eval-ids", help="evaluate on these token ids instead (.npy, or a text file of integers)")
    p.add_argument("--eval_tokens", "--eval-tokens", type=positive_int, default=256, help="evaluation tokens (default 256)")
    p.add_argument("--prompt", default="The accelerator", help="prompt for the greedy continuation")
    p.add_argument("--tokens", type=positive_int, default=8, help="tokens to generate greedily (default 8)")
    p.add_argument("--numerics", choices=("board", "fp32"), default="board",
                   help="board (default): the folder's model in the board's fp16 arithmetic; fp32: plain PyTorch arithmetic")
    p.add_argument("--variant", default="nearest+fp32+centred", metavar="ROUNDING+ACCUMULATION+VARIANCE",
                   help="the board model's main variant (default nearest+fp32+centred: the testbench reference's operations, "
                        "rounding to nearest); see docs/FORMAT.md, The emulator")
    p.add_argument("--variants", choices=("none", "pessimistic", "all"), default="pessimistic",
                   help="variants run beside it on the same tokens, for what public code cannot tell: pessimistic (default: "
                        "truncate+grouped with either variance), all (every combination), none; the verdict takes the worst")
    p.add_argument("--centred_variance", "--centred-variance", action="store_true",
                   help="(the default now; kept for old command lines)")
    p.add_argument("--strict", action="store_true", help="also fail (exit 1) when the board model is below the threshold (fp16 saturation or top-1 agreement below 0.9)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (a GPU needs torch's CUDA build: README 'GPU setup')")
    p.add_argument("--bits_only", "--bits-only", action="store_true", help="only the bit check")
    p.add_argument("--lm_head_from_checkpoint", action="store_true", help="functional check with the checkpoint's float lm_head (isolates packing from lm_head quantization)")
    args = p.parse_args(argv)
    from vcu128.io.devices import check_device

    check_device(args.device)  # before torch and the checkpoint are loaded

    from vcu128.check.verify import verify

    log = logging.getLogger("vcu128")
    result = verify(
        args.quantize_model, args.hardware_dir, compile_dir=args.compile_dir, model=args.model, text=args.text, prompt=args.prompt,
        tokens=args.tokens, device=args.device, functional=not args.bits_only, lm_head_from_checkpoint=args.lm_head_from_checkpoint,
        eval_tokens=args.eval_tokens, eval_ids=args.eval_ids, numerics=args.numerics, variant=args.variant, variants=args.variants,
        strict=args.strict,
    )
    bits, func, verdict = result["bit_check"], result.get("functional"), result["verdict"]
    if func is not None:
        from vcu128.check.functional import format_functional

        log.info(format_functional(func))
    if not bits["ok"]:
        for d in bits["differences"]:
            print(one_line(f"difference: {d}"), file=sys.stderr)
        for line in bits.get("stale_inputs") or []:  # said again here: they may explain the differences above
            print(one_line(f"warning: {line}"), file=sys.stderr)
        more = f" (and {bits['more_differences']} more)" if bits["more_differences"] else ""
        print(one_line(f"error: verify: {len(bits['differences'])} differences{more} in {args.hardware_dir}; do not load it on the board"), file=sys.stderr)
        return 1
    if func is not None and not func["ok"]:
        print(one_line(f"error: verify: {func['error']}; the board would compute garbage from this folder"), file=sys.stderr)
        return 1
    report = f"; report: {result['report_path']}" if "report_path" in result else ""
    board = board_line(verdict)
    if verdict["board_model"] == "below the threshold":
        log.warning(f"warning: the board model is below the threshold ({board}); next: {verdict['next_step']}")
        if args.strict:
            print(one_line(f"error: verify --strict: the board model is below the threshold ({board})"), file=sys.stderr)
            return 1
        log.info(f"verify: bits OK: {bits['files']} files{counted(args.hardware_dir)}, {bits['bytes'] / 1e9:.3f} GB match the checkpoint bit for bit; "
                 f"board model WARNING: {board}{report}")
        return 0
    log.info(f"verify: OK: {bits['files']} files{counted(args.hardware_dir)}, {bits['bytes'] / 1e9:.3f} GB match the checkpoint bit for bit "
             f"in {bits['seconds']:.1f} s; board model: {board}{report}")
    return 0


def counted(hw: str) -> str:
    """What the file count covers, as the other steps say it: every file the manifest lists (not itself)."""
    import os

    return " (manifest.json lists them)" if os.path.isfile(os.path.join(hw, "manifest.json")) else ""


def board_line(verdict: dict) -> str:
    if verdict["board_model"] == "not run":
        return "not run (--bits_only)"
    t = verdict["threshold"]["top1_agreement"]
    top1 = verdict["top1_agreement"]
    sat = f", {verdict['saturated_sites']} saturated fp16 sites" if verdict["saturated_sites"] else ""
    which = f"worst of {len(verdict['variants'])} variants, {verdict['worst_variant']}: " if len(verdict.get("variants", [])) > 1 else ""
    return f"{verdict['board_model']} ({which}top-1 agreement {top1:.4f} {'>=' if top1 >= t else '<'} {t}{sat})"


if __name__ == "__main__":
    exit_process(run_cli(main))
