#!/usr/bin/env bash
# Evaluate one model: bash pipelines/eval.sh --model PATH --tag NAME [--benchmarks a,b] [--n 40] ...
# Audit a finished run (re-grade its stored generations, no engine): bash pipelines/eval.sh --regrade TAG
# What a run would do (engine args, data, n, what the gate can decide): add --dry-run.
# Recipe: configs/eval.env (--recipe / EVAL_RECIPE for another); every key is also EVAL_<KEY> and --<key>.
# Backends: vllm | hf | openai (a running server: --base-url) | replay; llamacpp starts llama-server on --gguf
# (and --mmproj for image benchmarks), evaluates through it and stops it. Same results schema for all.
# This script only finds the venv; all flags: bash pipelines/eval.sh --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
case " $* " in *" --help "*|*" -h "*) exec python3 "$ROOT/src/eval/vllm_eval8.py" "$@" ;; esac  # no venv needed
moe_lowbit_ensure_venv
exec python "$ROOT/src/eval/vllm_eval8.py" --default-recipe "$ROOT/configs/eval.env" "$@"
