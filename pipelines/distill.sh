#!/usr/bin/env bash
# On-policy distillation of a quantized student: gen -> score -> train (torchrun FSDP2) -> merge -> eval,
# next to an off-policy baseline at the same token budget. Recipe: configs/opd.env (--recipe / OPD_RECIPE).
#   bash pipelines/distill.sh --smoke        # offline fixture, CPU, 2 x gloo, ends with DISTILL OK + table
#   bash pipelines/distill.sh [--fresh] [distill_run flags]     all flags: bash pipelines/distill.sh --help
# This script only finds the venv; every option (flag, OPD_* env, recipe key) is distill_run's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
case " $* " in *" --help "*|*" -h "*) exec python3 "$ROOT/src/distill/distill_run.py" --help ;; esac
moe_lowbit_ensure_venv
exec python "$ROOT/src/distill/distill_run.py" "$@"
