#!/usr/bin/env bash
# Pack the ORIGINAL BF16 checkpoint into a deployable llama.cpp GGUF:
#   convert (BF16 GGUF, + *-mmproj-f16.gguf for a vision tower) -> imatrix on calibration text ->
#   llama-quantize with the tensor-type recipe -> meta JSON (size, bpw, types read back, fallbacks, commands).
#   BASE_TYPE=IQ3_XXS MODEL=/ckpt OUT=/out bash pipelines/pack_gguf.sh
#   bash pipelines/pack_gguf.sh --help
# Knobs (defaults in configs/gguf.env, RECIPE=configs/other.env to swap the file): MODEL OUT NAME BASE_TYPE
# TENSOR_TYPES ROUTER_TYPE MTP MMPROJ CALIB_FILE CALIB_DATASET IMATRIX IMATRIX_CHUNKS IMATRIX_CTX IMATRIX_ARGS THREADS
# FORCE. LLAMA_CPP=/path uses an existing llama.cpp build. A finished step is reused on a rerun only when
# it was made from the same inputs (each output is written to *.part, renamed when complete, and gets a
# <file>.inputs.json: checkpoint identity, ROUTER_TYPE, MTP, llama.cpp version, calibration settings...);
# change any of them and the stale file is rebuilt. Delete a file to redo its step anyway.
# FROM_STORE=DIR: instead, write DIR/gguf/model.gguf from a quant_save build's own codes (Q4_0/Q8_0 grids;
# src/quant/gguf_export.py), verified bit for bit against its store and recorded in its _ptq_meta.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
  -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; echo; echo "configs/gguf.env:"; cat "$ROOT/configs/gguf.env"; exit 0 ;;
  "") ;;
  *) echo "pack_gguf: unknown argument '$1' (settings come from the environment; see --help)" >&2; exit 2 ;;
esac
# shellcheck disable=SC1091
source "$ROOT/env.sh"
RECIPE="${RECIPE:-$ROOT/configs/gguf.env}"
[ -f "$RECIPE" ] || { echo "pack_gguf: recipe '$RECIPE' not found" >&2; exit 2; }
# shellcheck disable=SC1090
source "$RECIPE"
cd "$ROOT"
moe_lowbit_ensure_venv
if [ -n "${FROM_STORE:-}" ]; then exec python "$ROOT/src/quant/gguf_export.py" "$FROM_STORE"; fi

if [ -z "$TENSOR_TYPES" ]; then
  case "${BASE_TYPE^^}" in Q3_K*) TENSOR_TYPES="$RECIPE_Q3K" ;; *) TENSOR_TYPES="$RECIPE_IQ3" ;; esac
fi
[ -f "$TENSOR_TYPES" ] || { echo "pack_gguf: TENSOR_TYPES='$TENSOR_TYPES' not found" >&2; exit 2; }
case "$ROUTER_TYPE" in f16|bf16|f32) ;; *) echo "pack_gguf: ROUTER_TYPE must be f16, bf16 or f32, got '$ROUTER_TYPE'" >&2; exit 2 ;; esac

# 0. input: the original checkpoint, never a dequantized PTQ clip (unless FORCE=1)
MODEL_DIR="$(python -m gguf_pack resolve-model "$MODEL" ${REVISION:+--revision "$REVISION"} | tail -n 1)"
python -m gguf_pack check-input "$MODEL_DIR" $([ "$FORCE" = 1 ] && echo --force)
python -m gguf_pack check-tokenizer "$MODEL_DIR"

# 1. llama.cpp tools, converter and gguf-py of ONE version (built once, cached)
LLAMA_PREFIX="$(bash "$ROOT/pipelines/install_llamacpp.sh" | tail -n 1)"
BIN="$LLAMA_PREFIX/bin"; [ -x "$BIN/llama-quantize" ] || BIN="$LLAMA_PREFIX/build/bin"
TREE="$LLAMA_PREFIX/llama.cpp"; [ -f "$TREE/convert_hf_to_gguf.py" ] || TREE="$LLAMA_PREFIX"
export PYTHONPATH="$TREE/gguf-py:$PYTHONPATH"
export LLAMA_CPP_VERSION
LLAMA_CPP_BUILD_INFO="$("$BIN/llama-server" --version 2>&1 | grep -m1 -i version || true)"
CONVERT_FLAGS="$(python -m gguf_pack converter-flags "$MODEL_DIR" --mtp "$MTP" --tree "$TREE")"
export LLAMA_CPP_BUILD_INFO

STEM="${NAME:-$(basename "$MODEL_DIR")}"
mkdir -p "$OUT"
BF16="$OUT/$STEM-BF16.gguf"
MMPROJ_GGUF="$OUT/$STEM-mmproj-f16.gguf"
IMAT="${IMATRIX:-$OUT/$STEM-imatrix.gguf}"
QUANT="$OUT/$STEM-$BASE_TYPE.gguf"
META="$OUT/$STEM-$BASE_TYPE.meta.json"
COMMANDS="$OUT/$STEM-$BASE_TYPE.commands.jsonl"
LOG="$OUT/$STEM-$BASE_TYPE.log"
QLOG="$OUT/$STEM-$BASE_TYPE.quantize.log"
TYPES_FILE="$OUT/$STEM-$BASE_TYPE.tensor_types.txt"
: > "$COMMANDS"
echo "pack_gguf: $(date -u +%FT%TZ) MODEL=$MODEL_DIR BASE_TYPE=$BASE_TYPE TENSOR_TYPES=$TENSOR_TYPES" >> "$LOG"

run() {  # run a command (output also appended to $LOG), record argv/rc/seconds for the meta JSON, stop on failure
  local t0 rc ms; t0=$(date +%s%N)
  echo "pack_gguf: + $*" | tee -a "$LOG" >&2
  set +e; "$@" 2>&1 | tee -a "$LOG" >&2; rc=${PIPESTATUS[0]}; set -e
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  python -m gguf_pack log-command --file "$COMMANDS" --rc "$rc" --seconds "$((ms / 1000)).$(printf %03d $((ms % 1000)))" -- "$@"
  if [ "$rc" -ne 0 ]; then echo "pack_gguf: step failed (exit $rc): $1" >&2; exit "$rc"; fi
}
reuse() {  # log that an existing output was reused
  echo "pack_gguf: reusing $1" >&2
  python -m gguf_pack log-command --file "$COMMANDS" --rc 0 --seconds 0 --status reused -- "reuse" "$1"
}

# What each intermediate is made from (python -m gguf_pack fresh/record; see --help there).
LLAMA_KEY=(--value "llama_cpp=$LLAMA_CPP_VERSION" --value "llama_cpp_build=$LLAMA_CPP_BUILD_INFO")
BF16_KEY=("${LLAMA_KEY[@]}" --checkpoint "model=$MODEL_DIR" --value "router_type=$ROUTER_TYPE" --value "mtp=$MTP"
          --value "convert_flags=$CONVERT_FLAGS" --file "gguf_convert=$ROOT/src/quant/gguf_convert.py")

# 2. BF16 GGUF (+ mmproj)
if python -m gguf_pack fresh "$BF16" "${BF16_KEY[@]}"; then reuse "$BF16"; else
  # shellcheck disable=SC2086
  run python -m gguf_convert --tree "$TREE" --router-type "$ROUTER_TYPE" -- \
      "$MODEL_DIR" --outtype bf16 --outfile "$BF16.part" $CONVERT_FLAGS
  mv "$BF16.part" "$BF16"
  python -m gguf_pack record "$BF16" "${BF16_KEY[@]}"
fi
WANT_MMPROJ="$MMPROJ"
if [ "$MMPROJ" = auto ]; then
  WANT_MMPROJ=$(python -c "import json,sys; print(int('vision_config' in json.load(open(sys.argv[1]))))" "$MODEL_DIR/config.json")
fi
if [ "$WANT_MMPROJ" = 1 ]; then
  MMPROJ_KEY=("${LLAMA_KEY[@]}" --checkpoint "model=$MODEL_DIR")
  if python -m gguf_pack fresh "$MMPROJ_GGUF" "${MMPROJ_KEY[@]}"; then reuse "$MMPROJ_GGUF"; else
    run python "$TREE/convert_hf_to_gguf.py" "$MODEL_DIR" --mmproj --outtype f16 --outfile "$MMPROJ_GGUF.part"
    mv "$MMPROJ_GGUF.part" "$MMPROJ_GGUF"
    python -m gguf_pack record "$MMPROJ_GGUF" "${MMPROJ_KEY[@]}"
  fi
fi

# 3. importance matrix (IMATRIX=/path: the user's own file, used as given)
if [ "$IMAT" = none ]; then IMAT=""
elif [ -n "$IMATRIX" ] && [ -f "$IMAT" ]; then reuse "$IMAT"
else
  CALIB="$CALIB_FILE"
  if [ -z "$CALIB" ]; then
    CALIB="$OUT/$STEM-calibration.txt"
    CALIB_KEY=(--value "dataset=$CALIB_DATASET" --value "chunks=$IMATRIX_CHUNKS" --value "ctx=$IMATRIX_CTX")
    if python -m gguf_pack fresh "$CALIB" "${CALIB_KEY[@]}"; then reuse "$CALIB"; else
      run python -m gguf_pack calib-text --dataset "$CALIB_DATASET" --chunks "$IMATRIX_CHUNKS" \
          --ctx "$IMATRIX_CTX" --out "$CALIB"
      python -m gguf_pack record "$CALIB" "${CALIB_KEY[@]}"
    fi
  fi
  [ -s "$CALIB" ] || { echo "pack_gguf: calibration text '$CALIB' is missing or empty (set CALIB_FILE)" >&2; exit 2; }
  IMAT_KEY=("${LLAMA_KEY[@]}" --file "bf16_inputs=$BF16.inputs.json" --file "calibration=$CALIB"
            --value "chunks=$IMATRIX_CHUNKS" --value "ctx=$IMATRIX_CTX" --value "args=$IMATRIX_ARGS")
  if python -m gguf_pack fresh "$IMAT" "${IMAT_KEY[@]}"; then reuse "$IMAT"; else
    # shellcheck disable=SC2086
    run "$BIN/llama-imatrix" -m "$BF16" -f "$CALIB" -o "$IMAT.part.gguf" --chunks "$IMATRIX_CHUNKS" \
        -c "$IMATRIX_CTX" -t "$THREADS" --no-ppl $IMATRIX_ARGS
    mv "$IMAT.part.gguf" "$IMAT"
    python -m gguf_pack record "$IMAT" "${IMAT_KEY[@]}"
  fi
fi

# 4. recipe -> stripped rule file (validated against the BF16 GGUF; fails on typos and a missing imatrix)
python -m gguf_pack tensor-types --recipe "$TENSOR_TYPES" --gguf "$BF16" --base-type "$BASE_TYPE" \
  ${IMAT:+--imatrix "$IMAT"} --out "$TYPES_FILE"

# 5. quantize
rm -f "$QUANT.part"
LOG_BEFORE=$(wc -c < "$LOG")
run "$BIN/llama-quantize" ${IMAT:+--imatrix "$IMAT"} --tensor-type-file "$TYPES_FILE" \
    --output-tensor-type "$OUTPUT_TENSOR_TYPE" --token-embedding-type "$TOKEN_EMBEDDING_TYPE" \
    "$BF16" "$QUANT.part" "$BASE_TYPE" "$THREADS"
mv "$QUANT.part" "$QUANT"
tail -c +"$((LOG_BEFORE + 1))" "$LOG" > "$QLOG"

# 6. meta JSON: read the file back with gguf-py
python -m gguf_pack meta --gguf "$QUANT" --source "$BF16" --recipe "$TENSOR_TYPES" --base-type "$BASE_TYPE" \
  --commands "$COMMANDS" --quantize-log "$QLOG" --out "$META" ${IMAT:+--imatrix "$IMAT"} \
  $([ -f "$MMPROJ_GGUF" ] && echo --mmproj "$MMPROJ_GGUF")
echo "$QUANT"
