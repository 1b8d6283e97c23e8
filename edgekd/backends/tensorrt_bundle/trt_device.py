"""Device memory, one CUDA stream and CUDA events for trt_runner.py: cuda-python when it imports, else torch.cuda.

JetPack does not ship either; `pip3 install cuda-python` (matching the board's CUDA) or NVIDIA's PyTorch
wheel for Jetson provides one. Needs numpy besides; part of the Jetson bundle edgekd writes.
"""
from __future__ import annotations

import ctypes

import numpy as np


class DeviceError(Exception):
    """A CUDA call failed or no CUDA binding is available."""


class CudaPython:
    """Device buffers, one stream and events through cuda-python's runtime bindings."""

    name = "cuda-python"

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.rt = cudart
        self.stream = self._ok(cudart.cudaStreamCreate())
        self.handle = int(self.stream)
        self._h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def _ok(self, result):
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise DeviceError(f"CUDA runtime error {err}")
        return rest[0] if len(rest) == 1 else None

    def alloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(nbytes)))

    def host_empty(self, shape, dtype) -> np.ndarray:
        """A page-locked (pinned) host array: asynchronous copies from pageable memory are staged and
        serialised by the driver, which would time the staging, not the transfer."""
        nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        ptr = int(self._ok(self.rt.cudaMallocHost(nbytes)))
        self._pinned = getattr(self, "_pinned", []) + [ptr]
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
        return raw[:int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        self._ok(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, self._h2d, self.stream))

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        self._ok(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, self._d2h, self.stream))

    def synchronize(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))

    def event(self):
        return self._ok(self.rt.cudaEventCreate())

    def record(self, event) -> None:
        self._ok(self.rt.cudaEventRecord(event, self.stream))

    def elapsed_ms(self, start, end) -> float:
        self._ok(self.rt.cudaEventSynchronize(end))
        return float(self._ok(self.rt.cudaEventElapsedTime(start, end)))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def free_host(self) -> None:
        for ptr in getattr(self, "_pinned", []):
            self.rt.cudaFreeHost(ptr)
        self._pinned = []

    def version(self) -> str:
        v = self._ok(self.rt.cudaRuntimeGetVersion())
        return f"{v // 1000}.{v % 1000 // 10}"


class TorchCuda:
    """The same operations through torch.cuda, for boards with NVIDIA's PyTorch wheel and no cuda-python."""

    name = "torch.cuda"

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise DeviceError("torch imports but sees no CUDA device")
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.handle = int(self.stream.cuda_stream)
        self._buffers: dict = {}

    def alloc(self, nbytes: int) -> int:
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda")
        self._buffers[t.data_ptr()] = t
        return int(t.data_ptr())

    def _bytes(self, host: np.ndarray):
        return self.torch.from_numpy(host.reshape(-1).view(np.uint8))

    def host_empty(self, shape, dtype) -> np.ndarray:
        """A page-locked (pinned) host array, kept alive with its tensor."""
        nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=True)
        self._buffers[("host", t.data_ptr())] = t
        return t.numpy()[:int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        with self.torch.cuda.stream(self.stream):
            self._buffers[ptr][:host.nbytes].copy_(self._bytes(host), non_blocking=True)

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        with self.torch.cuda.stream(self.stream):
            self._bytes(host).copy_(self._buffers[ptr][:host.nbytes])

    def synchronize(self) -> None:
        self.stream.synchronize()

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def record(self, event) -> None:
        event.record(self.stream)

    def elapsed_ms(self, start, end) -> float:
        end.synchronize()
        return float(start.elapsed_time(end))

    def free(self, ptr: int) -> None:
        self._buffers.pop(ptr, None)

    def free_host(self) -> None:
        for key in [k for k in self._buffers if isinstance(k, tuple)]:
            del self._buffers[key]

    def version(self) -> str:
        return str(self.torch.version.cuda)


def cuda_memory():
    """cuda-python when it imports, else torch.cuda; a clear error when neither does."""
    try:
        return CudaPython()
    except ImportError:
        pass
    try:
        return TorchCuda()
    except ImportError:
        raise DeviceError("neither cuda-python nor torch imports: install one (pip3 install cuda-python), "
                          "or build and time with ./build_engine.sh and trtexec --loadEngine") from None
