#!/usr/bin/env bash
# One prepared GPU check (tests/bench/gpu_check.py): clip GB/s, batched GPTQ on the 122B's expert shapes against a
# per-expert loop, one Gated DeltaNet layer forward at 8k tokens (fla), a world-size-1 NCCL FSDP2 OPD step.
#   bash tests/bench/gpu_check.sh [--out FILE] [--parts clip,gptq,gdn_forward,fsdp2_step]   # GPU 0, <= 8 min on an H100
#   bash tests/bench/gpu_check.sh --cpu                                                       # reduced size, on the CPU
# Needs only CUDA torch, transformers, numba and triton (no vLLM, no network, no venv): on a GPU it runs with the
# python on PATH; --cpu uses the project's CPU venv. Writes one JSON ($OUT/gpu_check.json when OUT is set).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
case " $* " in *" -h "*|*" --help "*) sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
# shellcheck disable=SC1091
source "$ROOT/env.sh"
case " $* " in *" --cpu "*) moe_lowbit_ensure_venv ;; esac
exec python "$ROOT/tests/bench/gpu_check.py" "$@"
