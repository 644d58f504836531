# Source me:  source env.sh   (every value below is overridable from the environment)
# Puts the three bare-name module dirs on PYTHONPATH, activates $MOE_LOWBIT_VENV when it exists,
# and points HF/torch/scratch caches at one user cache root.
MOE_LOWBIT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
export MOE_LOWBIT_ROOT
export PYTHONPATH="$MOE_LOWBIT_ROOT/src/quant:$MOE_LOWBIT_ROOT/src/eval:$MOE_LOWBIT_ROOT/src/distill${PYTHONPATH:+:$PYTHONPATH}"
export MOE_LOWBIT_CACHE="${MOE_LOWBIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-lowbit}"
export HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"
export MOE_LOWBIT_SCRATCH="${MOE_LOWBIT_SCRATCH:-$MOE_LOWBIT_CACHE/scratch}"
export MOE_LOWBIT_MODELS="${MOE_LOWBIT_MODELS:-$MOE_LOWBIT_ROOT/models}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
# OpenMP threads sleep at a barrier instead of spinning: the numba quantization kernels and torch each
# keep a pool, and a spinning pool starves the other on a small box (SmolLM2 gptq build, 4096 calibration
# tokens, 2 cores: 203 s -> 78 s wall, 185 s -> 64 s CPU; tests/bench/bench_gptq_build.py).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# HF_TOKEN is read from the environment only; nothing in this project writes it anywhere.
if [ -n "${MOE_LOWBIT_VENV:-}" ] && [ -f "$MOE_LOWBIT_VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$MOE_LOWBIT_VENV/bin/activate"
fi

# Pipelines call this after sourcing env.sh: use $MOE_LOWBIT_VENV if set; else the current python if it
# already has torch+transformers (a GPU box's own venv); else build/reuse the cached CPU venv
# (pipelines/setup_venv.sh), so a fresh machine needs no set-up step of its own.
moe_lowbit_ensure_venv() {
  if [ -n "${MOE_LOWBIT_VENV:-}" ]; then
    if [ ! -f "$MOE_LOWBIT_VENV/bin/activate" ]; then
      echo "error: MOE_LOWBIT_VENV=$MOE_LOWBIT_VENV has no bin/activate; unset it or create that venv" >&2
      return 1
    fi
    # shellcheck disable=SC1091
    source "$MOE_LOWBIT_VENV/bin/activate"
    return 0
  fi
  # find_spec looks the packages up without importing them (importing torch alone takes seconds)
  if [ -n "${VIRTUAL_ENV:-}" ] && python -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('torch', 'transformers', 'safetensors')))" 2>/dev/null; then
    return 0
  fi
  local venv
  venv="$(bash "$MOE_LOWBIT_ROOT/pipelines/setup_venv.sh" | tail -n 1)" || return 1
  export MOE_LOWBIT_VENV="$venv"
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
}
