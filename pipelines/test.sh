#!/usr/bin/env bash
# The test command: creates the CPU venv if missing (cached by requirements hash), then runs the suite.
#   bash pipelines/test.sh [pytest args]      e.g.  bash pipelines/test.sh -k moe_quant
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/env.sh"
moe_lowbit_ensure_venv
# The code sandbox runs model-written programs under bubblewrap and refuses to run without it.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing bubblewrap (the code sandbox)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } ||
      echo "test.sh: could not install bubblewrap; the code-sandbox tests will fail" >&2
  else
    echo "test.sh: bubblewrap (bwrap) is not installed and this user cannot install it; the code-sandbox" \
         "tests will fail. Install it with: sudo apt-get install bubblewrap" >&2
  fi
fi
cd "$ROOT"
exec python -m pytest "$@"
