#!/usr/bin/env bash
# On-policy distillation of a quantized student: gen -> score -> train (torchrun FSDP2) -> merge -> eval,
# next to an off-policy baseline at the same token budget.  Recipe: configs/opd.env (OPD_CONFIG=path).
#   bash pipelines/distill.sh --smoke        # offline fixture, CPU, 2 x gloo, ends with DISTILL OK + table
#   bash pipelines/distill.sh --dry-run      # check the config, print each step's peak memory per rank
#   bash pipelines/distill.sh [--fresh] [distill_run flags]     all flags: bash pipelines/distill.sh --help
# Two environments: vLLM steps run in MOE_LOWBIT_VENV's python, FSDP2 training in MOE_LOWBIT_TRAIN_VENV's
# (default: the same venv).
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
EVAL_PYTHON="$(command -v python)"
TRAIN_VENV="${MOE_LOWBIT_TRAIN_VENV:-${MOE_LOWBIT_VENV:-}}"
if [ -n "$TRAIN_VENV" ]; then
  if [ ! -x "$TRAIN_VENV/bin/python" ]; then
    echo "error: MOE_LOWBIT_TRAIN_VENV=$TRAIN_VENV has no bin/python; unset it (training then uses MOE_LOWBIT_VENV) or create it" >&2
    exit 2
  fi
  TRAIN_PYTHON="$TRAIN_VENV/bin/python"
else
  TRAIN_PYTHON="$EVAL_PYTHON"
fi
export OPD_EVAL_PYTHON="${OPD_EVAL_PYTHON:-$EVAL_PYTHON}" OPD_TRAIN_PYTHON="${OPD_TRAIN_PYTHON:-$TRAIN_PYTHON}"
cd "$ROOT"
exec python -m distill_run "$@"
