# Sourced by main.sh and tests/run.sh: make .venv from requirements.txt on first use (or when
# requirements.txt changed since), then put it first on PATH.
#
# torch: requirements.txt pins its version. Which build of it:
#   (unset)                 the build already in .venv; in a new one, what pip finds for the pin (on the 2-core
#                           CPU machines: the CPU build on local disk)
#   VCU128_TORCH=cuda       the CUDA build of the pinned version from PyTorch's index (CUDA 13.0: cu130)
#   VCU128_TORCH=cu128      ... another CUDA variant (cu126, cu128, cu129, cu130: pytorch.org lists them)
#   VCU128_TORCH=cpu        the CPU build from PyTorch's index (a GPU machine that should not use its GPU)
# VCU128_TORCH_INDEX=URL replaces PyTorch's index (a mirror). Changing VCU128_TORCH re-installs torch.
# VCU128_VENV_PLAN=1 prints the setup's commands instead of running them (and changes nothing).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="$_root/.venv"
_stamp="$_venv/.requirements.sha256"
_want="$(sha256sum "$_root/requirements.txt" | cut -d' ' -f1)"
_torch_pin="$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' "$_root/requirements.txt" | head -n 1)"
_torch_cmd=()
case "${VCU128_TORCH:-}" in
  "") ;;
  cpu|cuda|cu[0-9]*)
    _variant="${VCU128_TORCH/#cuda/cu130}"
    _torch_cmd=(-m pip install -q "torch==$_torch_pin+$_variant"
                --index-url "${VCU128_TORCH_INDEX:-https://download.pytorch.org/whl/$_variant}")
    _want="$_want torch=$_variant"
    ;;
  *)
    echo "error: VCU128_TORCH=$VCU128_TORCH: expected cuda, a CUDA variant such as cu128 or cu130, or cpu (README 'GPU setup')" >&2
    return 2 2>/dev/null || exit 2
    ;;
esac
_vcu128_setup() {  # $1: run, or print (VCU128_VENV_PLAN=1)
  local py="${PYTHON:-python3}" via=()
  [[ $1 == print ]] && via=(_vcu128_print)
  "${via[@]}" "$py" -m venv "$_venv" || return
  "${via[@]}" "$_venv/bin/python" -m pip install -q --upgrade pip || return
  if ((${#_torch_cmd[@]})); then
    "${via[@]}" "$_venv/bin/python" "${_torch_cmd[@]}" || return  # first: requirements.txt's pin is then satisfied by this build
  fi
  "${via[@]}" "$_venv/bin/python" -m pip install -q -r "$_root/requirements.txt" || return
}
_vcu128_print() { printf '%q ' "$@" | sed 's/ $//'; echo; }
if [[ ${VCU128_VENV_PLAN:-} == 1 ]]; then
  _vcu128_setup print
  return 0 2>/dev/null || exit 0
fi
_have="$(cat "$_stamp" 2>/dev/null || true)"  # no stamp yet (a fresh clone): empty, not a failure under set -e
if [[ -z ${VCU128_TORCH:-} ]]; then
  _have="${_have%% *}"  # unset: keep whichever torch build was installed (VCU128_TORCH=cuda stays CUDA)
fi
if [[ ! -x "$_venv/bin/python" || "$_have" != "$_want" ]]; then
  _py="${PYTHON:-python3}"
  if ! "$_py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "note: $_py is $("$_py" --version 2>&1); torch==$_torch_pin (CPU) is pinned for Python 3.11" >&2
  fi
  echo "setting up $_venv from requirements.txt${_torch_cmd:+ with torch $_torch_pin+$_variant} (once; a few minutes)" >&2
  if ! _vcu128_setup run; then
    echo "error: setting up $_venv failed (see pip's message above)${_torch_cmd:+; README 'GPU setup' says what the CUDA install needs}" >&2
    return 2 2>/dev/null || exit 2
  fi
  echo "$_want" > "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
