#!/usr/bin/env bash
# Quantize one checkpoint by tensor role: bash pipelines/quantize.sh [quant_save flags, e.g. --dry-run]
# Recipe: --recipe / QUANT_RECIPE=configs/NAME.env (default configs/clip_122b.env). Every recipe key is also
# QUANT_<KEY> in the environment and --<key> on the command line (flags win), e.g.
#   QUANT_MODEL=/ckpt QUANT_OUT=/out bash pipelines/quantize.sh --expert-bits 2 --grid full
# The old unprefixed names (MODEL=, OUT=, RECIPE=, ...) still work here, with a notice naming the new one.
# MODEL may be embedded:NAME (the offline SmolLM2 models). gptq|awq|wclip need calibration text: --calib-file,
# --calib-dataset or --calib pydoc-topics|teacher-sample. --probe: router statistics -> a bits plan
# (moe_probe, moe_alloc) -> the build with that plan. Relative paths resolve against your cwd.
# This script only finds the venv; all flags: bash pipelines/quantize.sh --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
case " $* " in *" --help "*|*" -h "*) exec python3 "$ROOT/src/quant/quant_save.py" --help ;; esac  # no venv needed for help
moe_lowbit_ensure_venv
exec python "$ROOT/src/quant/quant_save.py" --default-recipe "$ROOT/configs/clip_122b.env" "$@"
