#!/usr/bin/env bash
# Compiler-VCU128 driver: HuggingFace model -> GPTQ W4A16 checkpoint -> files for the VCU128 board.
#
#   bash main.sh        # as shipped (no model configured): a demo on a tiny Qwen2 built here, CPU, ~1 min
#
# To compile your own models, edit the variables below and run it again. Each model goes through
#   quantize -> compile_sw -> lm_head -> hardware -> embedding_tokens -> verify
# with its log in log/<model>.log. The packed folder is <model_path>/<model>-W4A16-gptq/compile/
# QWEN_BLOCK_write_data_port<ports>/ (the format: docs/FORMAT.md).

# ------------------------------------------------------------------ edit here
models=()                          # folder names under model_path, e.g. (Qwen2-7B DeepSeek-R1-Distill-Qwen-7B)
model_path=/path/to/models         # where the HuggingFace model folders are
wbits=4                            # the board runs 4-bit weights only
group_size=128                     # ... and group size 128 only
compile=1                          # 1: export for the board after quantizing; 0: quantize only
lm_head_method=""                  # rtn | trunc | checkpoint; empty: checkpoint if quantized by GPTQ, else rtn
ports=32                           # HBM ports the weights are spread over (the board: 32)
embedding_parts=16                 # parts of the embedding table (the board: 16)
device=cpu                         # cpu or cuda:0
calib=data/demo_corpus.txt         # calibration text: .txt, .jsonl with "text", or a saved HF dataset folder
nsamples=256                       # calibration samples
seqlen=512                         # tokens a sample
extra_quantize_args=()             # e.g. (--lm_head) to GPTQ-quantize the output layer too
# ------------------------------------------------------------------ end of settings

set -Eeuo pipefail   # -E: the ERR trap below also fires inside run_step
cd "$(dirname "$0")"
source scripts/venv.sh

if [[ ${#models[@]} -eq 0 ]]; then
  echo "main.sh: no model configured: running the demo on a tiny Qwen2 (edit models=() to compile your own)"
  models=(tiny-qwen2)
  model_path=demo
  nsamples=64
  seqlen=128
  if [[ ! -f demo/tiny-qwen2/demo_model.json ]]; then  # none yet, or one an older version built: build it anew
    rm -rf demo/tiny-qwen2 demo/tiny-qwen2-W4A16-gptq
    python -m vcu128.demo.tiny_model demo/tiny-qwen2
  fi
fi
if [[ $compile == 1 && ( $wbits != 4 || $group_size != 128 ) ]]; then
  echo "main.sh: error: compile=1 needs wbits=4 and group_size=128 (the board runs W4, group 128 only)" >&2
  exit 2
fi

mkdir -p log
exec 3>&1
summary=()
current_step=""
current_log=""
trap 'echo "main.sh: error: step \"$current_step\" failed for ${current_model:-?}; see $current_log" >&2' ERR

run_step() {  # run_step NAME COMMAND...: run, log, time
  current_step=$1; shift
  echo "==> [$current_model] $current_step: $*" | tee -a "$current_log"
  local start=$SECONDS
  # The terminal gets everything as it comes (progress bars included); the log gets each bar's
  # last state only (what follows its last carriage return), so it reads as plain lines.
  "$@" 2>&1 | tee /dev/fd/3 | sed -u 's/.*\r//' >> "$current_log"
  summary+=("$(printf '%-28s %-16s %5d s' "$current_model" "$current_step" $((SECONDS - start)))")
}

for current_model in "${models[@]}"; do
  model_dir="$model_path/$current_model"
  qdir="$model_path/$current_model-W${wbits}A16-gptq"
  hw="$qdir/compile/QWEN_BLOCK_write_data_port$ports"
  current_log="log/$current_model.log"
  : > "$current_log"
  run_step quantize python quantize.py --model "$model_dir" --quantize_model "$qdir" --wbits "$wbits" \
    --group_size "$group_size" --device "$device" --calib "$calib" --nsamples "$nsamples" --seqlen "$seqlen" \
    "${extra_quantize_args[@]}"
  [[ $compile == 1 ]] || continue
  run_step compile_sw python compile_sw.py --quantize_model "$qdir"
  run_step lm_head python lm_head.py --quantize_model "$qdir" ${lm_head_method:+--method "$lm_head_method"}
  run_step hardware python hardware.py --compile_dir "$qdir/compile" --ports "$ports"
  run_step embedding_tokens python embedding_tokens.py --compile_dir "$qdir/compile" --out "$hw/Embedding" --parts "$embedding_parts"
  if [[ -f verify.py ]]; then
    run_step verify python verify.py --quantize_model "$qdir" --hardware_dir "$hw" --device "$device"
  fi
  summary+=("$(printf '%-28s packed folder: %s' "$current_model" "$hw")")
done

echo
echo "main.sh: done"
printf '%s\n' "${summary[@]}"
