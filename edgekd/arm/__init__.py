"""ARM checks without a board: the device runner on the aarch64 runtime under qemu user-mode emulation.

`sysroot` builds and caches the aarch64 Python, numpy and onnxruntime; `emulate` runs the standalone
runner there for `edgekd bench --host emulate:aarch64` and `edgekd compress --verify-arm`. Emulation
gives the ARM kernels' outputs (accuracy, agreement with x86), never a latency.
"""
