# Sourced by main.sh and tests/run.sh: make .venv from requirements.txt on first use (or when
# requirements.txt changed since), then put it first on PATH.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="$_root/.venv"
_stamp="$_venv/.requirements.sha256"
_want="$(sha256sum "$_root/requirements.txt" | cut -d' ' -f1)"
if [[ ! -x "$_venv/bin/python" || "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]]; then
  _py="${PYTHON:-python3}"
  if ! "$_py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "note: $_py is $("$_py" --version 2>&1); torch==2.13.0 (CPU) is pinned for Python 3.11" >&2
  fi
  echo "setting up $_venv from requirements.txt (once; about a minute)" >&2
  "$_py" -m venv "$_venv"
  "$_venv/bin/python" -m pip install -q --upgrade pip
  "$_venv/bin/python" -m pip install -q -r "$_root/requirements.txt"
  echo "$_want" > "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
