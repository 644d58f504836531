#!/usr/bin/env bash
# Quantize one checkpoint by tensor role: bash pipelines/quantize.sh [extra quant_save args, e.g. --dry-run]
# Recipe: RECIPE=configs/NAME.env (default configs/clip_122b.env); every recipe value is overridable from
# the environment, e.g.  MODEL=/ckpt OUT=/out EXPERT_BITS=2 bash pipelines/quantize.sh
# MODEL=embedded:smollm2 means the embedded SmolLM2 checkpoint. PROBE=1 is reserved (not implemented yet).
# All flags: bash pipelines/quantize.sh --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
RECIPE="${RECIPE:-configs/clip_122b.env}"
[ -f "$RECIPE" ] || RECIPE="$ROOT/$RECIPE"
if [ ! -f "$RECIPE" ]; then echo "quantize: recipe '$RECIPE' not found (try RECIPE=configs/smoke.env)" >&2; exit 2; fi
# shellcheck disable=SC1090
source "$RECIPE"
if [ "${PROBE:-0}" != "0" ]; then
  echo "quantize: PROBE=$PROBE (per-layer sensitivity probe) is not implemented yet; unset PROBE" >&2
  exit 3
fi
moe_lowbit_ensure_venv
if [[ "$MODEL" == embedded:* ]]; then
  MODEL="$(python "$ROOT/src/quant/embedded_model.py" "$MODEL" | tail -n 1)"
fi
ARGS=(--model "$MODEL" --out "$OUT" --expert-bits "$EXPERT_BITS" --linear-bits "$LINEAR_BITS" --mtp-bits "$MTP_BITS"
      --group "$GROUP" --clip-steps "$CLIP_STEPS" --clip-lo "$CLIP_LO" --device "$DEVICE")
[ -n "${REVISION:-}" ] && ARGS+=(--revision "$REVISION")
exec python "$ROOT/src/quant/quant_save.py" "${ARGS[@]}" "$@"
