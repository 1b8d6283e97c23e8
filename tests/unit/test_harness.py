"""Timing and statistics: percentiles, throughput, bootstrap intervals, interleaved A/B, cold start."""
from __future__ import annotations

import time

import numpy as np
import pytest

from edgekd.bench import environment, harness
from edgekd.config.profiles import load_profile


def test_summarize_matches_the_definitions():
    t = np.arange(1, 101, dtype=np.float64)
    s = harness.summarize(t)
    assert set(s) == {"p50", "p90", "p95", "p99", "mean", "std", "min", "max"}
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(np.percentile(t, 90))
    assert s["p99"] == pytest.approx(99.01)
    assert s["mean"] == pytest.approx(50.5)
    assert s["std"] == pytest.approx(np.std(t))
    assert (s["min"], s["max"]) == (1.0, 100.0)


def test_summarize_with_batch_adds_throughput():
    s = harness.summarize(np.full(10, 2.0), batch=4)  # 4 samples every 2 ms
    assert s["throughput"] == pytest.approx(2000.0)
    assert harness.throughput(np.full(10, 2.0), batch=1) == pytest.approx(500.0)


def test_summarize_rejects_no_timings():
    with pytest.raises(ValueError):
        harness.summarize(np.array([]))


def test_time_inference_counts_warmup_and_iterations():
    calls = []
    times = harness.time_inference(lambda x: calls.append(x), 7, warmup=3, iterations=5)
    assert len(calls) == 8
    assert times.shape == (5,) and np.all(times >= 0)


def test_time_inference_duration_and_warmup_seconds():
    calls = []

    def fn(_):
        calls.append(1)
        time.sleep(0.002)

    t0 = time.perf_counter()
    times = harness.time_inference(fn, None, warmup=0, warmup_s=0.05, duration_s=0.1)
    elapsed = time.perf_counter() - t0
    assert elapsed >= 0.15
    assert times.size >= 1 and times.sum() >= 100 * 0.9  # ms timed cover the requested duration
    assert len(calls) > times.size  # the warmup calls were not timed


def test_bootstrap_ci_contains_the_true_median():
    rng = np.random.default_rng(1)
    true_median = np.exp(0.5)  # median of lognormal(mu=0.5, sigma=0.3)
    hits = 0
    for i in range(20):
        trials = [rng.lognormal(0.5, 0.3, 100) for _ in range(5)]
        lo, hi = harness.bootstrap_ci(trials, 50, resamples=300, seed=i)
        assert lo <= np.median(np.concatenate(trials)) <= hi
        hits += lo <= true_median <= hi
    assert hits >= 16  # nominal coverage is 95%: 19 of 20


def test_bootstrap_ci_widens_when_trials_drift():
    rng = np.random.default_rng(2)
    steady = [rng.normal(10, 0.5, 200) for _ in range(5)]
    drifting = [t + shift for t, shift in zip(steady, [0, 1, 2, 3, 4], strict=True)]
    pooled = [np.concatenate(drifting)]  # the same numbers seen as one trial
    w_trials = np.diff(harness.bootstrap_ci(drifting, 50, resamples=500))[0]
    w_pooled = np.diff(harness.bootstrap_ci(pooled, 50, resamples=500))[0]
    assert w_trials > 2 * w_pooled


def test_latency_with_ci_reports_intervals_around_the_percentiles():
    rng = np.random.default_rng(3)
    trials = [rng.normal(5, 0.2, 100) for _ in range(4)]
    r = harness.latency_with_ci(trials)
    for q in ("p50", "p90"):
        lo, hi = r["latency_ci95"][q]
        assert lo <= r["latency_ms"][q] <= hi
    assert r["iterations"] == 400 and r["trials"] == 4


def test_ratio_ci_recovers_a_known_ratio_under_drift():
    rng = np.random.default_rng(4)
    drift = np.linspace(1.0, 1.6, 6)[:, None]  # the machine slows down round after round
    b = rng.lognormal(0, 0.05, (6, 200)) * drift
    a = 2.0 * rng.lognormal(0, 0.05, (6, 200)) * drift
    r = harness.ratio_ci(a, b, resamples=500)
    assert r["ratio"] == pytest.approx(2.0, rel=0.03)
    assert r["ci95"][0] <= 2.0 <= r["ci95"][1]
    assert r["paired_rounds"] == 6
    flat = harness.ratio_ci(a.ravel(), b.ravel(), resamples=300)
    assert flat["paired_rounds"] == 0 and flat["ci95"][0] <= flat["ratio"] <= flat["ci95"][1]


def test_interleaved_alternates_and_measures_the_ratio():
    order = []

    def one(n):
        order.append("a")
        return sum(range(n))

    def four(n):
        order.append("b")
        return sum(sum(range(n)) for _ in range(4))

    times = harness.interleaved({"a": one, "b": four}, 200000, warmup=2, iterations=30, rounds=4)  # ms-long calls
    assert times["a"].shape == (4, 30) and times["b"].shape == (4, 30)
    firsts = [order[i * 64] for i in range(4)]  # each round: 32 calls of each function
    assert firsts == ["a", "b", "a", "b"]  # A B, B A, A B, B A
    r = harness.ratio_ci(times["b"], times["a"], resamples=300)
    assert 2.0 < r["ratio"] < 8.0  # four times the work: wide, since a shared host's other load varies the calls
    assert r["ci95"][0] <= r["ratio"] <= r["ci95"][1]


def test_cold_start_times_creation_and_first_call_but_not_preparation():
    session, given, out, create_ms, first_ms = harness.cold_start(
        lambda: time.sleep(0.02) or "session", lambda s, x: (s, x), lambda s: time.sleep(0.1) or 3)
    assert (session, given, out) == ("session", 3, ("session", 3))
    assert create_ms >= 19 and first_ms < 50


def test_peak_rss_and_artifact_size(tmp_path):
    assert harness.peak_rss_mb() > 1
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "b").write_bytes(b"x" * 5)
    assert harness.artifact_size_bytes([tmp_path / "a", tmp_path / "b", tmp_path / "missing"]) == 15


def test_runner_arguments_follow_the_profile():
    rpi = load_profile("rpi")
    args = harness.runner_arguments("m.onnx", rpi, backend="onnxruntime", eval_data="e.npz")
    assert args[args.index("--threads") + 1] == "4"
    assert args[args.index("--providers") + 1] == "XnnpackExecutionProvider,CPUExecutionProvider"
    assert args[args.index("--iterations") + 1] == str(rpi.bench.iterations)
    timed = harness.runner_arguments("m.onnx", rpi, backend="onnxruntime", duration_s=2.0, threads=2)
    assert "--iterations" not in timed and timed[timed.index("--duration") + 1] == "2.0"
    assert timed[timed.index("--threads") + 1] == "2"


def test_runner_backend_by_suffix_and_profile():
    assert harness.runner_backend("m.xml", load_profile("cpu")) == "openvino"
    assert harness.runner_backend("m.onnx", load_profile("openvino")) == "openvino"
    assert harness.runner_backend("m.onnx", load_profile("rpi")) == "onnxruntime"
    with pytest.raises(Exception, match="neither"):
        harness.runner_backend("m.engine", load_profile("cpu"))
    # A Jetson is measured with TensorRT from its bundle's model.onnx, never with ONNX Runtime.
    assert harness.runner_backend("model.onnx", load_profile("jetson")) == "tensorrt"
    with pytest.raises(Exception, match="bundle"):
        harness.runner_backend("m.engine", load_profile("jetson"))


def test_a_jetson_board_builds_and_times_with_its_own_tensorrt(tmp_path):
    from edgekd.bench import tensorrt_board
    from edgekd.bench.remote import remote_script

    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx")
    (tmp_path / "bundle.json").write_text("{}")
    files = tensorrt_board.board_files(model, [model])
    assert [f.name for f in files] == ["model.onnx", "bundle.json", "trt_runner.py", "trt_device.py", "energy.py",
                                          "eval_data.py"]
    assert all(f.is_file() for f in files)
    build, bench = tensorrt_board.commands("python3", "model.onnx", load_profile("jetson"), eval_data="data/eval.npz",
                                           warmup=None, iterations=None)
    assert build[1:3] == ["model/trt_runner.py", "build"] and "--timing-cache" in build
    assert bench[1:3] == ["model/trt_runner.py", "bench"] and bench[bench.index("--iterations") + 1] == "500"
    script = remote_script("/tmp", "python3", [], 60, [build, bench])
    assert "runner.py --model" not in script and script.count("$limit ") == 2  # both steps under the timeout


def test_environment_describes_this_host():
    env = environment.capture(load_profile("cpu"), threads=2)
    assert env["cpu_count"] >= 1 and env["machine"]
    assert env["threads"] == 2 and env["backend"] == "onnxruntime"
    assert "CPUExecutionProvider" in env["execution_providers"]
    assert env["versions"]["edgekd"] and env["versions"]["onnxruntime"]


def test_a_board_unlike_its_profile_is_named():
    from edgekd.bench.remote import board_mismatch
    from edgekd.config.profiles import load_profile
    from edgekd.report.assemble import apply_boards

    pi = load_profile("raspberry-pi-5")
    assert board_mismatch(pi, {"cpu_count": 4, "machine": "aarch64"}) is None
    note = board_mismatch(pi, {"cpu_count": 2, "machine": "x86_64"})
    assert "2 cores where raspberry-pi-5 has 4" in note and "x86_64 processor" in note
    report = {"final": {"artifact": "m.onnx"}, "teacher": {}}
    result = {"latency_ms": {"p50": 1.0, "p90": 1.1}, "accuracy": 90.0, "peak_rss_mb": 123.4, "board_mismatch": note}
    apply_boards(report, {"root@127.0.0.1:2222": result}, {})
    assert report["remote"][0]["peak_memory_mb"] == 123.4 and report["remote"][0]["board_mismatch"] == note
    assert report["final"]["measured_on_note"].endswith(note)


def test_a_runner_with_a_device_clock_times_itself():
    from edgekd.bench.measure import bench_interleaved

    class DeviceClocked:  # TensorRT's runner: CUDA events on its stream give the per-call times
        calls = 0

        def infer(self, x):
            return x

        def device_times(self, sample, warmup, iterations):
            self.calls += 1
            return np.full(iterations, 0.5)

    class WallClocked:
        def infer(self, x):
            return x

    r = DeviceClocked()
    out = bench_interleaved({"trt": r, "host": WallClocked()}, np.zeros((1, 3)), warmup=1, iterations=20, rounds=2)
    assert r.calls == 2 and out["trt"]["p50"] == 0.5 and out["trt"]["rounds"] == 2
    assert out["host"]["p50"] < 0.5  # an identity function on the wall clock
