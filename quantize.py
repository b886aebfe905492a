#!/usr/bin/env python3
"""GPTQ-quantize a HuggingFace causal LM (Qwen2 / Llama layout): W4A16, group 128,
symmetric, no act-order, saved as a standard GPTQ (v1) checkpoint <model>-W4A16-gptq with its
tokenizer, calibration metadata and quant_report.json (perplexity fp16 vs GPTQ; per-layer output
error of GPTQ next to plain round-to-nearest; the source model's fingerprint and the options).

With --compile, the export steps run right after: compile_sw, lm_head, hardware, embedding_tokens
(compile_sw's qweight.bin files and lm_head's are written during GPTQ's layer walk: the same bytes).
"""

import argparse

from vcu128.format.constants import (
    BOARD_EMBEDDING_PARTS,
    BOARD_PORTS,
    DEFAULT_MAX_TOKEN,
    INT4_CODES,
    ROPE_ORDERS,
    SILU_TABLES,
)
from vcu128.io.errors import (  # standard library only: first
    ArgumentParser,
    VCUError,
    exit_process,
    positive_int,
    run_cli,
)
from vcu128.quant.options import (  # light: the defaults' one home
    ENGINES,
    QuantizeOptions,
)

DEFAULTS = QuantizeOptions()


def main(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--model", required=True, help="HuggingFace model folder (fp16/bf16)")
    p.add_argument("--out", "--quantize_model", "--quantize-model", dest="quantize_model", metavar="QDIR",
                   help="output checkpoint (default: <model>-W<wbits>A16-gptq beside the model)")
    p.add_argument("--wbits", type=positive_int, default=DEFAULTS.wbits, help="weight bits (the board: 4)")
    p.add_argument("--group_size", "--group-size", type=positive_int, default=DEFAULTS.group_size, help="quantization group size (the board: 128)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=DEFAULTS.sym, help="symmetric quantization (the board needs it; --no_sym too)")
    p.add_argument("--no_sym", dest="sym", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--desc_act", "--desc-act", action="store_true", help="act-order (the board cannot run it)")
    p.add_argument("--device", default=DEFAULTS.device, help="cpu, cuda or cuda:N (a GPU needs torch's CUDA build: README 'GPU setup')")
    p.add_argument("--calib", required=True, help="calibration: text file, JSONL with 'text', saved HF dataset folder, or 'random'")
    p.add_argument("--eval_text", "--eval-text", help="held-out text for the report (default: the last 10%% of --calib)")
    p.add_argument("--nsamples", type=positive_int, default=DEFAULTS.nsamples, help=f"calibration samples (default {DEFAULTS.nsamples})")
    p.add_argument("--seqlen", type=positive_int, default=DEFAULTS.seqlen, help=f"tokens a sample (default {DEFAULTS.seqlen})")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--batch_size", "--batch-size", type=positive_int,
                   help="calibration samples a forward pass (default: 16384 tokens' worth; gptqmodel engine: 1 on CPU, 16 on a GPU)")
    p.add_argument("--engine", choices=ENGINES, default=DEFAULTS.engine,
                   help="vcu128: this project's GPTQ, one layer at a time (default; fast on a GPU); gptqmodel: GPTQModel 7.6")
    p.add_argument("--int4", choices=INT4_CODES,
                   help="the board's int4 code: twos (default) or sign_magnitude (the older bitstream: quantizes to -7..7); "
                        "recorded in the checkpoint, which lm_head.py and hardware.py follow")
    p.add_argument("--int4_range", "--int4-range", type=int, choices=(8, 7),
                   help="the grid: 8, the full -8..7 (default); 7, the 15 levels -7..7 (implies --int4 sign_magnitude unless --int4 twos)")
    p.add_argument("--lm_head", "--lm-head", action="store_true", help="also GPTQ-quantize the output layer")
    p.add_argument("--no_report", "--no-report", action="store_true", help="skip the perplexity / layer-error report")
    p.add_argument("--verbose", action="store_true", help="let GPTQModel (--engine gptqmodel) print its banners and tables")
    p.add_argument("--compile", action="store_true", help="run the export steps after quantizing")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder this step did not write")
    p.add_argument("--method", "--lm_head_method", "--lm-head-method", dest="lm_head_method", choices=("rtn", "trunc", "checkpoint"),
                   help="with --compile: lm_head.py's --method (default: automatic)")
    p.add_argument("--ports", type=positive_int, default=BOARD_PORTS, help=f"with --compile: HBM ports (default {BOARD_PORTS})")
    p.add_argument("--parts", "--embedding_parts", "--embedding-parts", dest="embedding_parts", type=positive_int, default=BOARD_EMBEDDING_PARTS,
                   help=f"with --compile: embedding parts (default {BOARD_EMBEDDING_PARTS})")
    p.add_argument("--rope_table", "--rope-table", choices=ROPE_ORDERS,
                   help="with --compile: hardware.py's --rope_table (default: halves for Qwen2/Llama, glm for ChatGLM)")
    p.add_argument("--silu_table", "--silu-table", choices=SILU_TABLES, help="with --compile: hardware.py's --silu_table (default: board)")
    p.add_argument("--max_token", "--max-token", type=positive_int,
                   help=f"with --compile: hardware.py's --max_token, the RoPE table's positions (default {DEFAULT_MAX_TOKEN})")
    args = p.parse_args(argv)
    given = [flag for flag, value in (("--rope_table", args.rope_table), ("--silu_table", args.silu_table), ("--max_token", args.max_token))
             if value is not None]
    if given and not args.compile:
        raise VCUError(f"{given[0]} is hardware.py's option: it takes effect with --compile", "or pass it to hardware.py")

    from vcu128.io.devices import check_device
    from vcu128.quant.options import check_arguments

    check_device(args.device)
    opts = QuantizeOptions(
        wbits=args.wbits, group_size=args.group_size, sym=args.sym, desc_act=args.desc_act, device=args.device,
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, calib=args.calib, eval_text=args.eval_text,
        lm_head=args.lm_head, engine=args.engine, batch_size=args.batch_size, report=not args.no_report, force=args.force,
        int4_range=args.int4_range, int4=args.int4, verbose=args.verbose,
    )
    check_arguments(opts, compile=args.compile)  # before any model is opened

    import logging

    from vcu128.quant.quantize import format_report, quantize_model

    log = logging.getLogger("vcu128")

    def quantize(on_shard=None):
        out, report = quantize_model(args.model, args.quantize_model, opts, on_shard)
        if "perplexity" in report:
            log.info(format_report(report))
        log.info(f"quantize: GPTQ in {report['seconds_quantize']:.1f} s -> {out}")
        return out

    if not args.compile:
        quantize()
        return
    from vcu128.export.hardware import BoardOptions
    from vcu128.export.pipeline import compiling_during_gptq, export_all
    from vcu128.quant.quantize import output_folder

    options = BoardOptions(ports=args.ports, rope_table=args.rope_table, silu_table=args.silu_table or "board",
                           max_token=args.max_token or DEFAULT_MAX_TOKEN)
    options.check()
    check_board_options_for(args.model, options)  # a table the model cannot have: refused before GPTQ, not after

    # Each layer's compile_sw files, and lm_head's, are written while GPTQ quantizes the layers: the
    # same bytes as the steps run afterwards (tests/test_pipelined_export.py)
    method = args.lm_head_method or "rtn"
    lm_head = None if args.lm_head or method == "checkpoint" else (method, 8 if method == "trunc" else opts.int4_range)
    board = (args.ports, opts.int4)  # opts settles the int4 code quantize records, which hardware.py follows
    with compiling_during_gptq(output_folder(args.model, args.quantize_model, args.wbits), args.model, lm_head, board) as ahead:
        out = quantize(ahead)
        export_all(out, lm_head_method=args.lm_head_method, ports=args.ports, parts=args.embedding_parts, ahead=ahead, board=options)


def check_board_options_for(model, options) -> None:
    """hardware.py's refusal of a RoPE table the model's family has no such row of; a folder with no
    readable config.json is left for quantize's own checks to name."""
    from pathlib import Path

    from vcu128.format.gate import read_model_dims

    config = Path(model) / "config.json"
    if config.is_file():
        try:
            dims = read_model_dims(config)
        except Exception:  # noqa: BLE001 - said by quantize's model check, in its words
            return
        options.for_model(dims)


if __name__ == "__main__":
    exit_process(run_cli(main))
