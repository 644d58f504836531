#!/usr/bin/env bash
# Quantize one checkpoint by tensor role: bash pipelines/quantize.sh [extra quant_save args, e.g. --dry-run]
# Recipe: RECIPE=configs/NAME.env (default configs/clip_122b.env); every recipe value is overridable from
# the environment, e.g.  MODEL=/ckpt OUT=/out EXPERT_BITS=2 GRID=full bash pipelines/quantize.sh
# MODEL=embedded:smollm2 means the embedded SmolLM2 checkpoint (any embedded:NAME resolves the same way).
# METHOD=gptq|awq|wclip needs calibration text: CALIB_FILE=PATH, CALIB_DATASET=ID[:split[:field]] or
# CALIB=teacher-sample (CALIB_TOKENS, CALIB_CTX). ROLE_BITS=embed=8,lm_head=8 overrides any role's bits.
# PROBE=1: moe_probe.py (routing statistics on PROBE_CALIB, streamed one layer at a time) -> moe_alloc.py (a bits plan under ALLOC_BUDGET
# with ALLOC_STRATEGY over ALLOC_LEVELS) -> the build with --bits-plan; the plan lands in $OUT.probe/.
# BITS_PLAN=PLAN.json uses an existing plan. All flags: bash pipelines/quantize.sh --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
RECIPE="${RECIPE:-configs/clip_122b.env}"
[ -f "$RECIPE" ] || RECIPE="$ROOT/$RECIPE"
if [ ! -f "$RECIPE" ]; then echo "quantize: recipe '$RECIPE' not found (try RECIPE=configs/smoke.env)" >&2; exit 2; fi
# shellcheck disable=SC1090
source "$RECIPE"
moe_lowbit_ensure_venv
if [[ "$MODEL" == embedded:* ]]; then
  MODEL="$(python "$ROOT/src/quant/embedded_model.py" "$MODEL" | tail -n 1)"
fi
ARGS=(--model "$MODEL" --out "$OUT" --expert-bits "$EXPERT_BITS" --linear-bits "$LINEAR_BITS" --mtp-bits "$MTP_BITS"
      --group "$GROUP" --clip-steps "$CLIP_STEPS" --clip-lo "$CLIP_LO" --device "$DEVICE"
      --method "${METHOD:-clip}" --grid "${GRID:-sym}")
[ -n "${REVISION:-}" ] && ARGS+=(--revision "$REVISION")
[ -n "${ROLE_BITS:-}" ] && ARGS+=(--role-bits "$ROLE_BITS")
case "${ACT_ORDER:-off}" in on|1|true|yes) ARGS+=(--act-order) ;; esac   # gptq: columns by decreasing diag(H)
if [ -n "${CALIB_FILE:-}" ]; then ARGS+=(--calib-file "$CALIB_FILE")          # first of: a file,
elif [ -n "${CALIB_DATASET:-}" ]; then ARGS+=(--calib-dataset "$CALIB_DATASET")  # a hub dataset,
elif [ -n "${CALIB:-}" ]; then ARGS+=(--calib "$CALIB"); fi                       # a named source
[ -n "${CALIB_TOKENS:-}" ] && ARGS+=(--calib-tokens "$CALIB_TOKENS")
[ -n "${CALIB_CTX:-}" ] && ARGS+=(--calib-ctx "$CALIB_CTX")
[ -n "${DAMP:-}" ] && ARGS+=(--damp "$DAMP")
[ -n "${MIN_EXPERT_TOKENS:-}" ] && ARGS+=(--min-expert-tokens "$MIN_EXPERT_TOKENS")
if [ "${PROBE:-0}" != "0" ]; then
  PROBE_DIR="$OUT.probe"
  mkdir -p "$PROBE_DIR"
  PROBE_CALIB="${PROBE_CALIB:-${CALIB_FILE:-}}"
  if [ -z "$PROBE_CALIB" ]; then echo "quantize: PROBE=1 needs PROBE_CALIB=text file (or CALIB_FILE)" >&2; exit 2; fi
  # streamed (one layer in memory, bf16, hub id or dir); the allocator's grid/levels/budget are checked before the pass
  python "$ROOT/src/quant/moe_probe.py" --model "$MODEL" --calib-file "$PROBE_CALIB" --tokens "${PROBE_TOKENS:-16384}" \
    --device "$(case "$DEVICE" in cuda*) echo "${DEVICE%%,*}";; *) echo cpu;; esac)" --out "$PROBE_DIR/probe.json" \
    --levels "${ALLOC_LEVELS:-2,3,4}" --grid "${GRID:-sym}" --group "${GROUP:-128}" --budget "${ALLOC_BUDGET:-3.0}" \
    ${REVISION:+--revision "$REVISION"}
  ALLOC_MODEL="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["model"])' "$PROBE_DIR/probe.json")"
  python "$ROOT/src/quant/moe_alloc.py" --probe "$PROBE_DIR/probe.json" --model "$ALLOC_MODEL" --budget "${ALLOC_BUDGET:-3.0}" \
    --strategy "${ALLOC_STRATEGY:-asal}" --levels "${ALLOC_LEVELS:-2,3,4}" --grid "${GRID:-sym}" --group "${GROUP:-128}" \
    --out "$PROBE_DIR/plan.json"  # the plan is costed on the grid the build uses (2 bits needs GRID=full or asym)
  BITS_PLAN="$PROBE_DIR/plan.json"
fi
if [ -n "${BITS_PLAN:-}" ]; then
  [ -f "$BITS_PLAN" ] || [ ! -f "$ROOT/$BITS_PLAN" ] || BITS_PLAN="$ROOT/$BITS_PLAN"  # recipes name it repo-relative
  ARGS+=(--bits-plan "$BITS_PLAN")
fi
exec python "$ROOT/src/quant/quant_save.py" "${ARGS[@]}" "$@"
