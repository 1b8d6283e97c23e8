#!/usr/bin/env bash
# Build this bundle's TensorRT engine with trtexec, on the Jetson itself: an engine only loads with the
# TensorRT version and GPU it was built with, so it is never built elsewhere and copied.
#
#   ./build_engine.sh                 model.onnx -> model.engine (the timing cache makes rebuilds quick)
#   ./build_engine.sh --verbose       extra arguments go to trtexec
#   TRTEXEC=/path/to/trtexec ./build_engine.sh
#
# Written by edgekd for target @TARGET@, precision @PRECISION@. Input @INPUT_NAME@ is static in
# model.onnx (@INPUT_SHAPE@), so there is no --shapes flag: trtexec refuses explicit shapes for a
# model whose shapes are static.
set -euo pipefail
cd "$(dirname "$0")"

TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
if [ ! -x "$TRTEXEC" ]; then
    echo "build_engine.sh: trtexec not found on PATH or at /usr/src/tensorrt/bin/trtexec;" \
         "install TensorRT (JetPack) or set TRTEXEC=/path/to/trtexec" >&2
    exit 3
fi

args=(
    --onnx=model.onnx
    --saveEngine=model.engine.part
    --timingCacheFile=timing.cache
    --memPoolSize=workspace:@WORKSPACE_MB@M
    --skipInference
)
# trtexec names its version as "TensorRT v101200" (10.12.0; 8.6.1 is v8601). TensorRT 10.12 deprecated the
# --int8/--fp16 precision flags and TensorRT 11 removed them: there the network is strongly typed and
# takes its precision from the model (the Q/DQ nodes make int8). Below 10.12, int8 is explicit
# quantization from the Q/DQ nodes (no calibrator) and --fp16 lets the other layers run in FP16.
version=$("$TRTEXEC" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n 1 | tr -dc '0-9' || true)
if [ -n "$version" ] && [ "$version" -ge 101200 ]; then
    precision_flags=(--stronglyTyped)
else
    precision_flags=(@PRECISION_FLAGS@)
fi
# DLA core from the profile's dla_core, with GPU fallback for layers the DLA cannot run.
dla_flags=(@DLA_FLAGS@)
args+=("${precision_flags[@]}" "${dla_flags[@]}" "$@")

echo "build_engine.sh: $TRTEXEC ${args[*]}"
"$TRTEXEC" "${args[@]}"
mv -f model.engine.part model.engine
echo "build_engine.sh: wrote $(pwd)/model.engine; time it with:"
echo "    $TRTEXEC --loadEngine=model.engine   or   python3 trt_runner.py bench --eval-data eval.npz"
