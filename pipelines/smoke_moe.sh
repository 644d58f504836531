#!/usr/bin/env bash
# The MoE smoke: like pipelines/smoke.sh, with routed experts at 3 bits. With CUDA and the hub it runs
# OLMoE-1B-7B-Instruct; offline, embedded:smollm2-moe (real weights: SmolLM2 MoEfied into qwen2_moe).
#   bash pipelines/smoke_moe.sh [smoke.py flags]    recipe: configs/smoke_moe.env; docs/SMOKE.md
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
case " $* " in *" --help "*|*" -h "*) exec python3 "$ROOT/src/eval/smoke.py" --help ;; esac  # no venv needed for help
moe_lowbit_ensure_venv
exec python "$ROOT/src/eval/smoke.py" --default-recipe "$ROOT/configs/smoke_moe.env" "$@"
