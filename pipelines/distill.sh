#!/usr/bin/env bash
# On-policy distillation of a quantized student: gen -> score -> train (torchrun FSDP2) -> merge -> eval,
# next to an off-policy baseline at the same token budget.  Recipe: configs/opd.env (OPD_CONFIG=path).
#   bash pipelines/distill.sh --smoke        # offline fixture, CPU, 2 x gloo, ends with DISTILL OK + table
#   bash pipelines/distill.sh [--fresh] [distill_run flags]     all flags: bash pipelines/distill.sh --help
#   bash pipelines/distill.sh --dry-run      # disk, RAM, GPU memory and time of the training stage; exits
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
for a in "$@"; do
  if [ "$a" = "--smoke" ]; then  # the smoke always means the offline fixture on CPU, whatever the env says
    export OPD_TEACHER=embedded:smollm2-moe OPD_STUDENT="" OPD_DEVICE=cpu OPD_NPROC=2 OPD_TAG="${OPD_TAG:-opd_smoke}"
  fi
done
# shellcheck disable=SC1090
source "${OPD_CONFIG:-$ROOT/configs/opd.env}"
moe_lowbit_ensure_venv
cd "$ROOT"
for a in "$@"; do  # sizing of the training stage for the visible devices (sizing_run.py), then exit
  if [ "$a" = "--dry-run" ]; then
    exec python "$ROOT/src/quant/sizing_run.py" --stage distill --model "${OPD_STUDENT:-$OPD_TEACHER}" \
      --train-tokens "$OPD_TOKEN_BUDGET" ${MAX_DISK:+--max-disk "$MAX_DISK"}
  fi
done
exec python -m distill_run "$@"
