#!/usr/bin/env bash
# Compiler-VCU128 driver: HuggingFace model -> GPTQ W4A16 checkpoint -> files for the VCU128 board.
#
#   bash main.sh                       # as shipped (no model configured): a demo on a tiny Qwen2 (demo=chatglm: ChatGLM) built here, CPU
#   bash main.sh /data/models/Qwen2-7B # the models given (folders), with the settings below
#   bash main.sh --help                # usage; runs nothing
#
# To compile your own models, give their folders as arguments, or edit the variables below. Each model
# goes through quantize -> compile_sw -> lm_head -> hardware -> embedding_tokens -> verify, with its log
# in log/<model>.log. The packed folder is <model>-W4A16-gptq/compile/QWEN_BLOCK_write_data_port<ports>/
# beside the model folder (the format: docs/FORMAT.md).

# ------------------------------------------------------------------ edit here
models=()                          # folder names under model_path, e.g. (Qwen2-7B DeepSeek-R1-Distill-Qwen-7B)
model_path=/path/to/models         # where the HuggingFace model folders are
wbits=4                            # the board runs 4-bit weights only
group_size=128                     # ... and group size 128 only
compile=1                          # 1: export for the board after quantizing; 0: quantize only
lm_head_method=""                  # rtn | trunc | checkpoint; empty: checkpoint if quantized by GPTQ, else rtn
int4=""                            # the board's int4 code: empty (twos) | sign_magnitude (the older bitstream: quantized to -7..7,
                                   # recorded with the checkpoint; lm_head.py and hardware.py follow the record)
ports=32                           # HBM ports the weights are spread over (the board: 32)
embedding_parts=16                 # parts of the embedding table (the board: 16)
device=cpu                         # cpu or cuda:0 (a GPU needs torch's CUDA build: README "GPU setup")
calib=data/demo_corpus.txt         # calibration text: .txt, .jsonl with "text", or a saved HF dataset folder
nsamples=256                       # calibration samples
seqlen=512                         # tokens a sample
extra_quantize_args=()             # e.g. (--lm_head) to GPTQ-quantize the output layer too
extra_hardware_args=()             # e.g. (--silu_table fit) or (--rope_table pairs): hardware.py's options (hardware.py --help)
demo=qwen2                         # the demo's tiny model when no model is given: qwen2 or chatglm (ChatGLM2/3's layout)
# ------------------------------------------------------------------ end of settings

usage() {
  cat <<'EOF'
usage: bash main.sh [--redo] [MODEL_FOLDER ...]

Compiles each HuggingFace model folder given (or, with none given, the models=() set at the top of
main.sh; with neither, a demo on a tiny Qwen2, or ChatGLM with demo=chatglm, built under demo/) through
  quantize -> compile_sw -> lm_head -> hardware -> embedding_tokens -> verify
with the settings at the top of main.sh. The checkpoint goes beside the model folder
(<model>-W4A16-gptq), each model's log to log/<model>.log.

A step whose outputs are up to date with its inputs (the same command line, inputs and outputs as
when it last succeeded here) is skipped. A model that fails does not stop the others; the summary
at the end says how each went.

options:
  --redo      run every step again, up to date or not
  -h, --help  show this help and exit

exit status: 0 every model compiled; 1 a model failed (see the summary and its log); 2 bad usage;
130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM.
EOF
}

redo=0
model_args=()
while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --redo) redo=1 ;;
    --) shift; model_args+=("$@"); break ;;
    -*) echo "main.sh: error: unknown option $1" >&2; echo "hint: bash main.sh --help lists the options" >&2; exit 2 ;;
    *) model_args+=("$1") ;;
  esac
  shift
done

set -uo pipefail
# Model folders given as arguments are relative to where main.sh was started.
model_dirs=()
for m in "${model_args[@]}"; do
  model_dirs+=("$(realpath -m -- "$m")")
done
started_in="$PWD"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # logs and the demo go here
root="${VCU128_ROOT:-$here}"                             # the tools (tests run a copy of main.sh with VCU128_ROOT set)
cd "$here" || exit 2
source "$root/scripts/venv.sh" || exit 2

interrupted=""   # INT or TERM once a signal came
signals=0
step_pid=""
on_signal() {
  interrupted=${interrupted:-$1}
  signals=$((signals + 1))
  if [[ -n $step_pid ]]; then kill -"$1" "$step_pid" 2>/dev/null; fi
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

if [[ ${#model_dirs[@]} -eq 0 ]]; then
  for m in "${models[@]}"; do model_dirs+=("$model_path/$m"); done
fi
if [[ ${#model_dirs[@]} -eq 0 ]]; then
  if [[ $demo != qwen2 && $demo != chatglm ]]; then echo "main.sh: error: demo=$demo: qwen2 or chatglm" >&2; exit 2; fi
  echo "main.sh: no model given or configured: running the demo on a tiny $demo (bash main.sh --help for how to compile your own)"
  model_dirs=(demo/tiny-$demo)
  nsamples=64
  seqlen=128
  if [[ ! -f demo/tiny-$demo/demo_model.json ]]; then  # none yet, or one an older version built: build it anew
    rm -rf "demo/tiny-$demo" "demo/tiny-$demo-W4A16-gptq"
    mkdir -p log
    python -m vcu128.io.steprun "log/tiny-$demo-build.log" -- python -m vcu128.demo.tiny_model "demo/tiny-$demo" --architecture "$demo" &
    step_pid=$!
    wait "$step_pid"; rc=$?
    while ((rc > 128)) && kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; rc=$?; done
    step_pid=""
    if [[ -n $interrupted ]]; then echo "main.sh: interrupted while building the demo model" >&2; exit $([[ $interrupted == INT ]] && echo 130 || echo 143); fi
    if ((rc != 0)); then echo "main.sh: error: building the demo model failed (exit $rc); see log/tiny-$demo-build.log" >&2; exit 1; fi
  fi
fi
if [[ $compile == 1 && ( $wbits != 4 || $group_size != 128 ) ]]; then
  echo "main.sh: error: compile=1 needs wbits=4 and group_size=128 (the board runs W4, group 128 only)" >&2
  exit 2
fi

mkdir -p log
say() {  # a line on our stdout and in the model's log
  printf '%s\n' "$*"
  printf '%s\n' "$*" >> "$log"
}

# run_step NAME COMMAND...: skip it if up to date (inputs in ins=(), outputs in outs=() and made=()),
# else run it through vcu128.io.steprun (output to our stdout and to the log) and record it.
# Returns the step's exit status (0 when skipped).
run_step() {
  local name=$1; shift
  local stamp="log/.stamps/$model/$name.json" why="" rc
  step=$name
  if [[ $redo == 0 ]]; then
    if why=$(python -m vcu128.io.uptodate check "$stamp" --in "${ins[@]}" --out "${outs[@]}" --made "${made[@]}" -- "$@"); then
      say "==> [$model] $name: up to date, skipped (--redo runs it again)"
      times+=("$name -")
      return 0
    fi
    [[ -n $interrupted ]] && return 130
  fi
  say "==> [$model] $name${why:+ ($why)}: $*"
  local start=$SECONDS before=$signals
  python -m vcu128.io.steprun "$log" -- "$@" &
  step_pid=$!
  wait "$step_pid"; rc=$?
  while ((signals != before)); do  # a trap ran during the wait: wait for the step itself
    before=$signals
    wait "$step_pid"; rc=$?
  done
  step_pid=""
  times+=("$name $((SECONDS - start))")
  if [[ -z $interrupted ]] && ((rc == 130 || rc == 143)); then  # the step was interrupted (a signal we could not trap)
    interrupted=$( ((rc == 130)) && echo INT || echo TERM)
  fi
  if ((rc == 0)) && [[ -z $interrupted ]]; then
    python -m vcu128.io.uptodate record "$stamp" --in "${ins[@]}" --out "${outs[@]}" --made "${made[@]}" -- "$@"
  fi
  return "$rc"
}

summary=()
failed=0
for model_dir in "${model_dirs[@]}"; do
  [[ -n $interrupted ]] && break
  model=$(basename "$model_dir")
  parent=$(dirname "$model_dir")
  qdir="$parent/$model-W${wbits}A16-gptq"
  cdir="$qdir/compile"
  hw="$cdir/QWEN_BLOCK_write_data_port$ports"
  log="log/$model.log"
  : > "$log"
  times=()
  step=""
  status=0
  calib_in=(); [[ $calib != random ]] && calib_in=("$calib")
  ins=("$model_dir" "${calib_in[@]}"); outs=("$qdir:!compile"); made=()
  run_step quantize python "$root/quantize.py" --model "$model_dir" --out "$qdir" --wbits "$wbits" \
    --group_size "$group_size" --device "$device" --calib "$calib" --nsamples "$nsamples" --seqlen "$seqlen" \
    ${int4:+--int4 "$int4"} "${extra_quantize_args[@]}" || status=$?
  if ((status == 0)) && [[ $compile == 1 ]]; then
    ins=("$qdir:!compile"); outs=("$cdir/compile_sw.json"); made=()
    run_step compile_sw python "$root/compile_sw.py" --quantize_model "$qdir" --ports "$ports" || status=$?
  fi
  if ((status == 0)) && [[ $compile == 1 ]]; then
    ins=("$qdir:!compile"); outs=("$cdir/lm_head.json"); made=()
    run_step lm_head python "$root/lm_head.py" --quantize_model "$qdir" ${lm_head_method:+--method "$lm_head_method"} || status=$?
  fi
  if ((status == 0)) && [[ $compile == 1 ]]; then
    ins=("$cdir/compile_sw.json" "$cdir/lm_head.json"); outs=(); made=("$hw/manifest.json")
    run_step hardware python "$root/hardware.py" --compile_dir "$cdir" --ports "$ports" "${extra_hardware_args[@]}" || status=$?
  fi
  if ((status == 0)) && [[ $compile == 1 ]]; then
    ins=("$cdir/compile_sw.json" "$hw/manifest.json"); outs=(); made=("$hw/Embedding")
    run_step embedding_tokens python "$root/embedding_tokens.py" --compile_dir "$cdir" --out "$hw/Embedding" --parts "$embedding_parts" || status=$?
  fi
  if ((status == 0)) && [[ $compile == 1 ]]; then
    ins=("$qdir:!compile" "$cdir/compile_sw.json" "$cdir/lm_head.json" "$hw"); outs=("$cdir/verify_report.json"); made=()
    run_step verify python "$root/verify.py" --quantize_model "$qdir" --hardware_dir "$hw" --device "$device" || status=$?
  fi
  steps=$(printf '%s s, ' "${times[@]}" | sed 's/ - s,/ up to date,/g; s/, $//')
  shown_log=$log; [[ $here != "$started_in" ]] && shown_log="$here/$log"
  if [[ -n $interrupted ]]; then
    summary+=("$(printf '%-24s interrupted during %s (%s); log: %s' "$model" "$step" "$steps" "$shown_log")")
    failed=1
  elif ((status != 0)); then
    reason=$(grep -a '^error:' "$log" | tail -n 1)
    summary+=("$(printf '%-24s FAILED at %s (exit %d)%s; log: %s' "$model" "$step" "$status" "${reason:+: ${reason#error: }}" "$shown_log")")
    failed=1
  elif [[ $compile == 1 ]]; then
    summary+=("$(printf '%-24s ok (%s); packed folder: %s' "$model" "$steps" "$hw")")
  else
    summary+=("$(printf '%-24s ok (%s); checkpoint: %s' "$model" "$steps" "$qdir")")
  fi
done

echo
if [[ -n $interrupted ]]; then
  echo "main.sh: interrupted (SIG$interrupted); the step's staging folder was removed, finished outputs are kept"
else
  echo "main.sh: done"
fi
printf '%s\n' "${summary[@]}"
if [[ -n $interrupted ]]; then
  [[ $interrupted == INT ]] && exit 130
  exit 143
fi
exit "$failed"
