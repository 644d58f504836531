#!/usr/bin/env bash
# The test command: creates the CPU venv if missing (cached by requirements hash), then runs the suite.
#   bash pipelines/test.sh [pytest args]      e.g.  bash pipelines/test.sh -k moe_quant
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
moe_lowbit_ensure_venv
cd "$ROOT"
exec python -m pytest "$@"
