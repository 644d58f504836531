#!/usr/bin/env bash
# The main job: quantize a teacher, evaluate teacher and quant through vLLM on the same samples, measure
# fidelity (PPL, KL, top-1), regenerate results/RESULTS.md, print one table and SMOKE OK (exit 0) - or the
# step that failed and why (exit != 0). On a GPU box with the hub it runs SMOKE_MODEL (Qwen/Qwen3.5-2B);
# offline it falls back to the embedded SmolLM2-135M-Instruct and the shipped smoke set. docs/SMOKE.md.
#   bash pipelines/smoke.sh [smoke.py flags]        all flags: bash pipelines/smoke.sh --help
# Recipes: configs/smoke.env (quant: int4 linears, clip 8) + configs/smoke_eval.env (SMOKE_* eval knobs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
# shellcheck disable=SC1091
source "$ROOT/configs/smoke.env"
# shellcheck disable=SC1091
source "$ROOT/configs/smoke_eval.env"
moe_lowbit_ensure_venv
cd "$ROOT"
exec python -m smoke --expert-bits "$EXPERT_BITS" --linear-bits "$LINEAR_BITS" --mtp-bits "$MTP_BITS" \
  --group "$GROUP" --clip-steps "$CLIP_STEPS" --clip-lo "$CLIP_LO" --method "${METHOD:-clip}" --grid "${GRID:-sym}" \
  --act-order "${ACT_ORDER:-off}" \
  --role-bits "${ROLE_BITS:-}" --bits-plan "${BITS_PLAN:-}" --calib "${CALIB:-}" --calib-tokens "${CALIB_TOKENS:-0}" --calib-ctx "${CALIB_CTX:-512}" "$@"
