#!/usr/bin/env bash
# Build this bundle's TensorRT LM engines with trtexec, on the Jetson itself: an engine only loads with the
# TensorRT version and GPU it was built with, so it is never built elsewhere and copied.
#
#   ./build_engine.sh                   model.engine (the student), teacher.engine (it verifies the
#                                       drafts in speculative decoding) and, where the bundle has it,
#                                       draft.engine (the student with its LM head cut to the run's
#                                       draft vocabulary: the draft)
#   ./build_engine.sh model             one of them: model, teacher or draft
#   ./build_engine.sh all --verbose     extra arguments go to trtexec
#   TRTEXEC=/path/to/trtexec ./build_engine.sh
#
# Written by edgekd for target @TARGET@. One optimization profile covers prefill and decode: batch 1,
# input_ids of 1 to @MAX_INPUT@ tokens (optimal at 1: a decode step), every past key and value of 0 (prefill)
# to @MAX_PAST@ cached tokens (optimal at @OPT_PAST@).
set -euo pipefail
cd "$(dirname "$0")"

TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
if [ ! -x "$TRTEXEC" ]; then
    echo "build_engine.sh: trtexec not found on PATH or at /usr/src/tensorrt/bin/trtexec;" \
         "install TensorRT (JetPack) or set TRTEXEC=/path/to/trtexec" >&2
    exit 3
fi

which=all
case "${1:-}" in
    model|teacher|all) which=$1; shift ;;
esac

# trtexec names its version as "TensorRT v101200" (10.12.0). TensorRT 10.12 deprecated the --fp16 flag and
# TensorRT 11 removed it: from 10.12 the network is strongly typed and takes its precision from the model,
# so the build reads the mixed FP16 copy (*.fp16.onnx: FP16 weights, matrix products and KV cache; rotary
# phases, the causal mask and the RMSNorm statistics in FP32). Below 10.12 it reads the FP32 model with
# --fp16 and holds the same layers at FP32 (--layerPrecisions, preferred, not forced).
version=$("$TRTEXEC" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n 1 | tr -dc '0-9' || true)

build() {  # NAME FP32_ONNX FP16_ONNX MIN_SHAPES OPT_SHAPES MAX_SHAPES FP32_LAYERS [trtexec arguments...]
    local name=$1 onnx=$2 onnx16=$3 min=$4 opt=$5 max=$6 keep=$7
    shift 7
    local args=(
        --saveEngine="$name.engine.part"
        --timingCacheFile=timing.cache
        --memPoolSize=workspace:@WORKSPACE_MB@M
        "$min" "$opt" "$max"
        --skipInference
    )
    if [ -n "$version" ] && [ "$version" -ge 101200 ]; then
        args+=(--onnx="$onnx16" --stronglyTyped)
    else
        args+=(--onnx="$onnx" --fp16)
        if [ -n "$keep" ]; then
            args+=(--precisionConstraints=prefer --layerPrecisions="$keep")
        fi
    fi
    echo "build_engine.sh: $TRTEXEC ${args[*]:0:3} ... ($name)"
    "$TRTEXEC" "${args[@]}" "$@"
    mv -f "$name.engine.part" "$name.engine"
    echo "build_engine.sh: wrote $(pwd)/$name.engine"
}

@BUILDS@
echo "build_engine.sh: time them with"
echo "    python3 trt_lm_runner.py bench --eval-data eval.npz"
echo "    python3 trt_lm_runner.py bench --engine teacher.engine --draft @DRAFT@.engine"
