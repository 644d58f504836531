#!/usr/bin/env bash
# Evaluate one model: bash pipelines/eval.sh --model PATH --tag NAME [--benchmarks a,b] [--n 40] ...
# Recipe: configs/eval.env (or EVAL_CONFIG=path); all flags: bash pipelines/eval.sh --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
moe_lowbit_ensure_venv
# shellcheck disable=SC1090
source "${EVAL_CONFIG:-$ROOT/configs/eval.env}"
cd "$ROOT"
exec python -m vllm_eval8 "$@"
