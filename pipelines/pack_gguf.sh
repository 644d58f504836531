#!/usr/bin/env bash
# Pack the ORIGINAL BF16 checkpoint into a deployable llama.cpp GGUF: convert -> imatrix -> llama-quantize with
# the tensor-type recipe -> meta JSON. Recipe: configs/gguf.env (--recipe / GGUF_RECIPE for another); every
# key is also GGUF_<KEY> and --<key>, e.g.
#   GGUF_MODEL=/ckpt GGUF_OUT=/out bash pipelines/pack_gguf.sh --base-type Q3_K_M
# The old unprefixed names (MODEL=, OUT=, BASE_TYPE=, ...) still work here, with a notice. LLAMA_CPP=/path uses an
# existing llama.cpp build. This script only finds the venv; all flags: bash pipelines/pack_gguf.sh --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
case " $* " in *" --help "*|*" -h "*) exec python3 "$ROOT/src/quant/gguf_run.py" --help ;; esac  # no venv needed for help
moe_lowbit_ensure_venv
exec python "$ROOT/src/quant/gguf_run.py" --default-recipe "$ROOT/configs/gguf.env" "$@"
