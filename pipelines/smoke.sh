#!/usr/bin/env bash
# The main job: quantize a teacher, evaluate teacher and quant through vLLM on the same samples, measure
# fidelity (PPL, KL, top-1), regenerate results/RESULTS.md, print one table and SMOKE OK (exit 0) - or the
# step that failed and why (exit != 0). On a GPU box with the hub it runs SMOKE_MODEL (Qwen/Qwen3.5-2B);
# offline it falls back to the embedded SmolLM2-135M-Instruct and the shipped smoke set. docs/SMOKE.md.
#   bash pipelines/smoke.sh [smoke.py flags]        all flags: bash pipelines/smoke.sh --help
# Recipe: configs/smoke_eval.env (SMOKE_* knobs), whose SMOKE_QUANT_RECIPE (configs/smoke.env) holds the quant
# knobs. This script only finds the venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
case " $* " in *" --help "*|*" -h "*) exec python3 "$ROOT/src/eval/smoke.py" --help ;; esac  # no venv needed for help
moe_lowbit_ensure_venv
exec python "$ROOT/src/eval/smoke.py" --default-recipe "$ROOT/configs/smoke_eval.env" "$@"
