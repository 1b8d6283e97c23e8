"""The Jetson bundle's scripts without a GPU: build_engine.sh against a stand-in trtexec, and trt_runner.py
against a stand-in `tensorrt` module and device memory that record what the real ones would be asked."""
from __future__ import annotations

import json
import os
import py_compile
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from edgekd.backends.tensorrt import BUNDLE_DIR, render_build_script
from edgekd.backends.tensorrt_bundle import trt_runner
from edgekd.config.profiles import load_profile

SHAPE = (1, 3, 4, 4)


def test_scripts_are_valid_python_and_bash():
    py_compile.compile(str(BUNDLE_DIR / "trt_runner.py"), doraise=True)
    py_compile.compile(str(BUNDLE_DIR / "trt_device.py"), doraise=True)
    subprocess.run(["bash", "-n", str(BUNDLE_DIR / "build_engine.sh")], check=True)


def _run_script(tmp_path: Path, text: str, trtexec: str, *extra: str) -> subprocess.CompletedProcess:
    script = tmp_path / "build_engine.sh"
    script.write_text(text)
    env = {**os.environ, "TRTEXEC": trtexec}
    return subprocess.run(["bash", str(script), *extra], cwd=tmp_path, env=env, text=True, capture_output=True)


def _fake_trtexec(tmp_path: Path, version: str = "100300") -> str:
    """A trtexec that names its version on --help (as the real one does) and records a build's arguments."""
    fake = tmp_path / "trtexec"
    fake.write_text('#!/bin/sh\n'
                    f'if [ "$1" = --help ]; then echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] # trtexec"; '
                    'exit 0; fi\n'
                    'printf "%s\\n" "$@" > args.txt\n'
                    'for a; do case $a in --saveEngine=*) echo engine > "${a#--saveEngine=}";; esac; done\n')
    fake.chmod(0o755)
    return str(fake)


def test_build_script_passes_the_profile_flags_to_trtexec(tmp_path):
    agx = load_profile("jetson-agx-orin")
    text = render_build_script(agx, "int8", "input", list(SHAPE), dla_core=0)
    r = _run_script(tmp_path, text, _fake_trtexec(tmp_path), "--verbose")
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "args.txt").read_text().split()
    assert args == ["--onnx=model.onnx", "--saveEngine=model.engine.part", "--timingCacheFile=timing.cache",
                    "--memPoolSize=workspace:4096M", "--skipInference", "--int8", "--fp16", "--useDLACore=0",
                    "--allowGPUFallback", "--verbose"]
    assert (tmp_path / "model.engine").read_text() == "engine\n"
    assert not (tmp_path / "model.engine.part").exists()


def test_fp32_build_script_has_no_precision_flags(tmp_path):
    text = render_build_script(load_profile("jetson-orin-nano"), "fp32", "input", list(SHAPE), dla_core=None)
    r = _run_script(tmp_path, text, _fake_trtexec(tmp_path))
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "args.txt").read_text().split()
    assert "--int8" not in args and "--fp16" not in args and not any("DLA" in a for a in args)


@pytest.mark.parametrize(("version", "strongly_typed"), [("8601", False), ("100300", False), ("101200", True),
                                                       ("110000", True)])
def test_build_script_picks_the_precision_flags_by_trtexec_version(tmp_path, version, strongly_typed):
    text = render_build_script(load_profile("jetson-orin-nano"), "int8", "input", list(SHAPE), dla_core=None)
    r = _run_script(tmp_path, text, _fake_trtexec(tmp_path, version))
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "args.txt").read_text().split()
    if strongly_typed:  # TensorRT 10.12 deprecated --int8/--fp16, 11 removed them
        assert "--stronglyTyped" in args and "--int8" not in args and "--fp16" not in args
    else:
        assert "--int8" in args and "--fp16" in args and "--stronglyTyped" not in args


def test_build_script_without_trtexec_says_where_it_looked(tmp_path):
    text = render_build_script(load_profile("jetson"), "int8", "input", list(SHAPE), dla_core=None)
    r = _run_script(tmp_path, text, str(tmp_path / "missing"))
    assert r.returncode == 3 and "trtexec not found" in r.stderr and "TRTEXEC=" in r.stderr


def test_runner_without_tensorrt_exits_3_with_a_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code = trt_runner.main(["build", "--onnx", str(tmp_path / "m.onnx"), "--engine", str(tmp_path / "e")])
    assert code == 3 and "tensorrt does not import" in capsys.readouterr().err


def test_versions_read_l4t_and_jetpack(monkeypatch):
    release = "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May 6 2024"
    monkeypatch.setattr(trt_runner, "_read", lambda p: release if p == "/etc/nv_tegra_release" else None)
    monkeypatch.setattr(trt_runner, "_command", lambda a: "6.0+b106" if "nvidia-jetpack" in a else None)
    v = trt_runner.versions(types.SimpleNamespace(__version__="10.3.0.30"))
    assert v["tensorrt"] == "10.3.0.30" and v["l4t"] == "36.3.0" and v["jetpack"] == "6.0+b106"


# ---------------------------------------------------------------- a stand-in tensorrt

class FakeMemory:
    """Device memory as numpy byte arrays; 'kernels' run when the context executes."""

    name = "fake"
    handle = 7

    def __init__(self):
        self.mem: dict[int, np.ndarray] = {}
        self.copies = 0

    def alloc(self, nbytes):
        ptr = 0x1000 * (len(self.mem) + 1)
        self.mem[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def to_device(self, ptr, host):
        self.mem[ptr][:host.nbytes] = host.reshape(-1).view(np.uint8)
        self.copies += 1

    def to_host(self, host, ptr):
        host.reshape(-1).view(np.uint8)[:] = self.mem[ptr][:host.nbytes]

    def synchronize(self):
        pass

    def event(self):
        return object()

    def record(self, event):
        pass

    def elapsed_ms(self, start, end):
        return 1.25

    def free(self, ptr):
        self.mem.pop(ptr, None)

    def version(self):
        return "12.6"


def fake_tensorrt(memory: FakeMemory, calls: dict) -> types.ModuleType:
    """The part of the tensorrt 10 API trt_runner uses. The 'network' maps x to its first 10 values."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.BuilderFlag = types.SimpleNamespace(INT8="INT8", FP16="FP16", GPU_FALLBACK="GPU_FALLBACK")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")
    trt.nptype = lambda dtype: np.float32
    shapes = {"input": SHAPE, "logits": (1, 10)}

    class Context:
        addresses: dict = {}

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def get_tensor_shape(self, name):
            return shapes[name]

        def execute_async_v3(self, handle):
            calls["stream"] = handle
            x = memory.mem[self.addresses["input"]].view(np.float32)
            memory.mem[self.addresses["logits"]][:] = x[:10].copy().view(np.uint8)
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ["input", "logits"][i]

        def get_tensor_mode(self, name):
            return "in" if name == "input" else "out"

        def get_tensor_shape(self, name):
            return shapes[name]

        def get_tensor_dtype(self, name):
            return "float"

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"ENGINE" else None

    class Config:
        def __init__(self):
            self.flags, self.cache = set(), None
            calls["config"] = self

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def create_timing_cache(self, data):
            calls["cache_in"] = bytes(data)
            return types.SimpleNamespace(serialize=lambda: b"CACHE")

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return calls.get("cache_accepted", True)

        def get_timing_cache(self):
            return self.cache

    class Builder:
        num_DLA_cores = 2

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return types.SimpleNamespace(num_inputs=1, get_input=lambda i: types.SimpleNamespace(name="input",
                                                                                                 shape=SHAPE))

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            return b"ENGINE"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["parsed"] = path
            return True

    trt.Runtime, trt.Builder, trt.OnnxParser = Runtime, Builder, OnnxParser
    return trt


@pytest.fixture
def fake(monkeypatch):
    memory, calls = FakeMemory(), {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(memory, calls))
    monkeypatch.setattr(trt_runner, "cuda_memory", lambda: memory)
    return memory, calls


def test_build_sets_explicit_int8_fp16_dla_and_timing_cache(fake, tmp_path):
    _, calls = fake
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"onnx")
    (tmp_path / "timing.cache").write_bytes(b"OLD")
    info = trt_runner.build_engine(str(onnx_path), str(tmp_path / "model.engine"), "int8", 512,
                                   str(tmp_path / "timing.cache"), dla_core=1)
    config = calls["config"]
    assert config.flags == {"INT8", "FP16", "GPU_FALLBACK"}
    assert config.default_device_type == "DLA" and config.DLA_core == 1
    assert calls["workspace"] == 512 << 20 and calls["network_flags"] == 0
    assert calls["cache_in"] == b"OLD" and (tmp_path / "timing.cache").read_bytes() == b"CACHE"
    assert (tmp_path / "model.engine").read_bytes() == b"ENGINE"
    assert info["precision"] == "int8" and info["tensorrt"] == "10.3.0" and info["builder_api"] == "flags"
    assert info["timing_cache_reused"] is True


def test_builder_api_and_dla_follow_the_tensorrt_version():
    api = trt_runner.builder_api
    assert api((8, 6)) == api((10, 11)) == "flags"
    assert api((10, 12)) == api((11, 0)) == "strongly-typed" and api((10, 3), has_precision_flags=False) == "strongly-typed"
    assert trt_runner.trt_version("10.12.0.36") == (10, 12) and trt_runner.trt_version("8.5.2.2") == (8, 5)
    dla = trt_runner.dla_problem
    assert dla((10, 3), "int8", 0) is None and dla((11, 4), "fp16", 0) is None and dla((10, 3), "int8", None) is None
    assert "8.6" in dla((8, 5), "int8", 0)  # JetPack 5: Q/DQ int8 on the DLA is not supported
    assert "no DLA support" in dla((10, 9), "int8", 0) and "no DLA support" in dla((11, 0), "fp16", 1)


def test_tensorrt_11_builds_a_strongly_typed_network_without_precision_flags(fake, tmp_path, monkeypatch):
    _, calls = fake
    trt = sys.modules["tensorrt"]
    monkeypatch.setattr(trt, "__version__", "11.0.0")
    monkeypatch.setattr(trt, "BuilderFlag", types.SimpleNamespace(GPU_FALLBACK="GPU_FALLBACK"))  # INT8/FP16 gone
    monkeypatch.setattr(trt, "NetworkDefinitionCreationFlag", types.SimpleNamespace(STRONGLY_TYPED=1), raising=False)
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"onnx")
    (tmp_path / "timing.cache").write_bytes(b"FROM-ANOTHER-GPU")
    calls["cache_accepted"] = False  # set_timing_cache refuses a mismatched cache: a new one is started
    info = trt_runner.build_engine(str(onnx_path), str(tmp_path / "model.engine"), "int8", 512,
                                   str(tmp_path / "timing.cache"))
    assert calls["config"].flags == set() and calls["network_flags"] == 1 << 1
    assert info["builder_api"] == "strongly-typed" and info["timing_cache"] is None
    assert info["timing_cache_reused"] is False and (tmp_path / "timing.cache").read_bytes() == b"FROM-ANOTHER-GPU"


def test_build_refuses_dla_for_fp32_and_cores_that_do_not_exist(fake, tmp_path):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"onnx")
    with pytest.raises(trt_runner.RunnerError, match="DLA runs int8 or fp16 only"):
        trt_runner.build_engine(str(onnx_path), str(tmp_path / "e"), "fp32", 512, None, dla_core=0)
    with pytest.raises(trt_runner.RunnerError, match="DLA core 2 requested; this device has 2"):
        trt_runner.build_engine(str(onnx_path), str(tmp_path / "e"), "int8", 512, None, dla_core=2)


def test_engine_infers_any_batch_through_the_static_one(fake, tmp_path):
    memory, calls = fake
    (tmp_path / "model.engine").write_bytes(b"ENGINE")
    eng = trt_runner.TrtEngine(str(tmp_path / "model.engine"))
    x = np.random.default_rng(0).standard_normal((5, *SHAPE[1:])).astype(np.float32)
    out = eng.infer(x)
    np.testing.assert_array_equal(out, x.reshape(5, -1)[:, :10])
    assert memory.copies == 5 and calls["stream"] == FakeMemory.handle
    eng.close()
    assert memory.mem == {}


def test_engine_host_buffers_are_page_locked_where_the_binding_offers_it(fake, tmp_path, monkeypatch):
    memory, _ = fake
    pinned, released = [], []

    def host_empty(shape, dtype):
        pinned.append((shape, np.dtype(dtype)))
        return np.empty(shape, dtype)

    monkeypatch.setattr(memory, "host_empty", host_empty, raising=False)
    monkeypatch.setattr(memory, "free_host", lambda: released.append(True), raising=False)
    (tmp_path / "model.engine").write_bytes(b"ENGINE")
    eng = trt_runner.TrtEngine(str(tmp_path / "model.engine"))
    assert pinned == [(SHAPE, np.dtype(np.float32)), ((1, 10), np.dtype(np.float32))]  # input and output
    x = np.ones(SHAPE, np.float32)
    np.testing.assert_array_equal(eng.infer(x), x.reshape(1, -1)[:, :10])
    eng.close()
    assert released == [True]


def test_engine_from_another_tensorrt_is_a_clear_error(fake, tmp_path):
    (tmp_path / "model.engine").write_bytes(b"OTHER")
    with pytest.raises(trt_runner.RunnerError, match="rebuild it on this device"):
        trt_runner.TrtEngine(str(tmp_path / "model.engine"))


def test_bench_json_has_the_bench_runner_fields(fake, tmp_path, capsys):
    (tmp_path / "model.engine").write_bytes(b"ENGINE")
    x = np.random.default_rng(1).standard_normal((6, *SHAPE[1:])).astype(np.float32)
    y = x.reshape(6, -1)[:, :10].argmax(1)
    y[0] = (y[0] + 1) % 10  # one wrong label: 5 of 6 right
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    out = tmp_path / "bench.json"
    code = trt_runner.main(["bench", "--engine", str(tmp_path / "model.engine"), "--eval-data",
                            str(tmp_path / "eval.npz"), "--warmup", "2", "--iterations", "5", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert set(result["latency_ms"]) == {"p50", "p90", "p95", "p99", "mean", "std", "min", "max"}
    assert result["latency_ms"]["p50"] == 1.25 and result["throughput"] == pytest.approx(800.0)
    assert result["accuracy"] == pytest.approx(500 / 6) and result["eval_samples"] == 6
    assert result["backend"] == "tensorrt" and result["emulated"] is False
    assert {"nvpmodel", "clocks"} <= set(result["environment"])
    assert {"tensorrt", "jetpack", "l4t", "cuda"} <= set(result["versions"])


def test_bench_refuses_eval_data_of_another_shape(fake, tmp_path):
    (tmp_path / "model.engine").write_bytes(b"ENGINE")
    np.savez(tmp_path / "eval.npz", x=np.zeros((2, 3, 8, 8), np.float32), y=np.zeros(2, np.int64))
    code = trt_runner.main(["bench", "--engine", str(tmp_path / "model.engine"), "--eval-data",
                            str(tmp_path / "eval.npz"), "--iterations", "1"])
    assert code == 2


@pytest.mark.parametrize("labels, said", [(lambda y: np.eye(10)[y], "one-hot labels: save y.argmax(1)"),
                                          (lambda y: y + 10, "y holds class 1")])
def test_bench_refuses_labels_that_are_not_the_engines_classes(fake, tmp_path, capsys, labels, said):
    (tmp_path / "model.engine").write_bytes(b"ENGINE")
    x = np.random.default_rng(1).standard_normal((6, *SHAPE[1:])).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x, y=labels(np.arange(6)))
    code = trt_runner.main(["bench", "--engine", str(tmp_path / "model.engine"), "--eval-data",
                            str(tmp_path / "eval.npz"), "--iterations", "1"])
    err = capsys.readouterr().err
    assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
