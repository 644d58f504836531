#!/usr/bin/env bash
# On-policy distillation of a quantized student: gen -> score -> train (torchrun FSDP2) -> merge -> eval,
# next to an off-policy baseline at the same token budget.  Recipe: configs/opd.env (OPD_CONFIG=path).
#   bash pipelines/distill.sh --smoke        # offline fixture, CPU, 2 x gloo, ends with DISTILL OK + table
#   bash pipelines/distill.sh [--fresh] [distill_run flags]     all flags: bash pipelines/distill.sh --help
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
exec python -m distill_run "$@"
