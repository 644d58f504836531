#!/usr/bin/env bash
# Evaluate one model: bash pipelines/eval.sh --model PATH --tag NAME [--benchmarks a,b] [--n 40] ...
# Audit a finished run (re-grade its stored generations, no engine): bash pipelines/eval.sh --regrade TAG
# Recipe: configs/eval.env (or EVAL_CONFIG=path); all flags: bash pipelines/eval.sh --help
# Backends: vllm | hf | openai (a running server: --base-url) | replay run in vllm_eval8; llamacpp starts
# llama-server on --gguf (and --mmproj for image benchmarks), evaluates through it and stops it
# (llamacpp_eval8; flags: bash pipelines/eval.sh --backend llamacpp --help). Same results schema for all.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
moe_lowbit_ensure_venv
# shellcheck disable=SC1090
source "${EVAL_CONFIG:-$ROOT/configs/eval.env}"
cd "$ROOT"
backend="${EVAL_BACKEND:-vllm}"
prev=""
for arg in "$@"; do  # the last --backend wins, as argparse does
  case "$arg" in --backend=*) backend="${arg#--backend=}" ;; esac
  [ "$prev" = "--backend" ] && backend="$arg"
  prev="$arg"
done
for arg in "$@"; do  # --regrade TAG: re-grade a finished run from its stored generations, no engine
  case "$arg" in --regrade|--regrade=*) exec python -m vllm_eval8 "$@" ;; esac
done
if [ "$backend" = "llamacpp" ]; then
  exec python -m llamacpp_eval8 "$@"
fi
exec python -m vllm_eval8 "$@"
