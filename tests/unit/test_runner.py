"""The standalone runner: its JSON contract, accuracy on a tiny model, and its exit codes."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekd.bench import runner

RUNNER = Path(runner.__file__)
LATENCY_KEYS = {"p50", "p90", "p95", "p99", "mean", "std", "min", "max"}


def tiny_model(path: Path, classes: int = 5) -> Path:
    """Conv -> ReLU -> global pool -> MatMul: a classifier over 3x8x8 inputs with a dynamic batch."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((4, classes)).astype(np.float32), "fc")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def eval_set(model: Path, path: Path, n: int = 40, wrong: int = 8) -> tuple[Path, np.ndarray]:
    """x and labels y that agree with the model's own predictions except on `wrong` samples."""
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(np.float32)
    pred = ort.InferenceSession(str(model)).run(None, {"x": x})[0].argmax(1)
    y = pred.copy()
    y[:wrong] = (y[:wrong] + 1) % 5
    np.savez(path, x=x, y=y)
    return path, pred


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner")
    model = tiny_model(d / "tiny.onnx")
    data, pred = eval_set(model, d / "eval.npz")
    return d, model, data, pred


def run_runner(*args: str, env: dict | None = None, python: str = sys.executable, script: Path = RUNNER):
    e = {k: v for k, v in os.environ.items() if k != "EDGEKD_EMULATED"}
    e.update(env or {})
    return subprocess.run([python, str(script), *args], capture_output=True, text=True, env=e, timeout=120)


def test_json_fields_accuracy_and_predictions(files):
    d, model, data, pred = files
    out = d / "result.json"
    r = run_runner("--model", str(model), "--eval-data", str(data), "--warmup", "3", "--iterations", "40",
                   "--threads", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result == json.loads(out.read_text())
    assert set(result["latency_ms"]) == LATENCY_KEYS
    lat = result["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert result["iterations"] == 40 and result["warmup"] == 3
    assert result["throughput"] > 0 and result["cold_start_ms"] > 0 and result["peak_rss_mb"] > 0
    for q in ("p50", "p90"):
        lo, hi = result["latency_ci95"][q]
        assert lo <= lat[q] <= hi
    assert result["accuracy"] == pytest.approx(80.0)  # 8 of 40 labels disagree with the model
    assert result["predictions"] == [int(p) for p in pred]
    assert len(result["predictions_sha256"]) == 64
    assert result["emulated"] is False and "not_measured" not in result
    env = result["environment"]
    assert env["threads"] == 1 and env["execution_providers"] == ["CPUExecutionProvider"]
    assert env["cpu_count"] >= 1 and env["machine"]
    assert result["versions"]["onnxruntime"] and result["versions"]["numpy"]


def test_duration_mode_and_batch(files):
    _, model, _, _ = files
    r = run_runner("--model", str(model), "--duration", "0.3", "--batch", "4", "--warmup", "1")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["batch"] == 4 and result["iterations"] >= 1
    assert result["timed_seconds"] >= 0.25
    assert result["throughput"] == pytest.approx(4 * 1e3 / result["latency_ms"]["mean"], rel=1e-6)
    assert result["accuracy"] is None and result["accuracy_not_measured"]


def test_no_latency_and_emulated_leave_latency_null_with_a_reason(files):
    _, model, data, _ = files
    r = run_runner("--model", str(model), "--eval-data", str(data), "--no-latency")
    result = json.loads(r.stdout)
    assert result["latency_ms"] is None and result["throughput"] is None
    assert "no-latency" in result["not_measured"]
    assert result["accuracy"] == pytest.approx(80.0)
    r = run_runner("--model", str(model), "--eval-data", str(data), env={"EDGEKD_EMULATED": "1"})
    result = json.loads(r.stdout)
    assert result["emulated"] is True
    assert result["latency_ms"] is None and result["not_measured"] == "emulated: not representative"
    assert result["cold_start_ms"] is None and result["peak_rss_mb"] is None
    assert result["accuracy"] == pytest.approx(80.0)


def test_runs_alone_from_a_copy(files, tmp_path):
    """Copied away from the package and started with -I, as on a board."""
    from edgekd.bench.harness import runner_files

    _, model, data, _ = files
    for f in runner_files():
        shutil.copyfile(f, tmp_path / f.name)
    copy = tmp_path / "runner.py"
    r = subprocess.run([sys.executable, "-I", str(copy), "--model", str(model), "--eval-data", str(data),
                        "--iterations", "5"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(80.0)
    (tmp_path / "eval_data.py").unlink()  # an LM bundle's runner.py, which never scores images, comes without it
    r = subprocess.run([sys.executable, "-I", str(copy), "--model", str(model), "--iterations", "5"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["latency_ms"]["p50"] > 0, r.stderr


def test_imports_only_numpy_the_stdlib_and_the_runtimes():
    """Boards get runner.py, energy.py and eval_data.py; JetPack 5 ships Python 3.8, so their syntax must parse
    there too."""
    from edgekd.bench.harness import runner_files

    for path in runner_files():
        tree = ast.parse(path.read_text(), feature_version=(3, 8))
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        outside = {n for n in names if n not in sys.stdlib_module_names}
        assert outside <= {"numpy", "onnxruntime", "openvino", "energy", "eval_data"}, (path.name, outside)


def per_pixel_model(path: Path, inputs: int = 1) -> Path:
    """A 1x1 conv over 3x8x8 inputs: scores per pixel (segmentation-shaped); `inputs` 2 adds a second input."""
    names = ["x", "z"][:inputs]
    nodes = [helper.make_node("Sum", names, ["s"]), helper.make_node("Conv", ["s", "w"], ["out"])]
    graph = helper.make_graph(
        nodes, "seg", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 8, 8]) for n in names],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


LABELS = {"one-hot": lambda y: np.eye(5)[y], "fractional": lambda y: y + 0.5, "negative": lambda y: np.where(np.arange(len(y)) == 3, -1, y),
          "beyond-the-classes": lambda y: y + 5, "scalar": lambda y: y[0]}


@pytest.mark.parametrize("case", LABELS)
def test_labels_that_are_not_class_indices_of_the_model_exit_2_naming_them(files, tmp_path, case):
    _, model, data, _ = files
    with np.load(data) as z:
        np.savez(tmp_path / "e.npz", x=z["x"], y=LABELS[case](z["y"]))
    r = run_runner("--model", str(model), "--iterations", "2", "--eval-data", str(tmp_path / "e.npz"))
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "y " in r.stderr and ("argmax" in r.stderr) == (case == "one-hot"), r.stderr
    if case == "beyond-the-classes":
        assert "scores 5 classes" in r.stderr


def test_accuracy_needs_class_scores_and_a_model_of_one_input(files, tmp_path):
    _, _, data, _ = files
    seg = per_pixel_model(tmp_path / "seg.onnx")
    r = run_runner("--model", str(seg), "--iterations", "2", "--eval-data", str(data))
    assert r.returncode == 2 and "not class scores" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with np.load(data) as z:
        np.savez(tmp_path / "x.npz", x=z["x"])
    r = run_runner("--model", str(seg), "--iterations", "2", "--eval-data", str(tmp_path / "x.npz"))
    result = json.loads(r.stdout)
    assert r.returncode == 0 and result["accuracy"] is None and "predictions" not in result
    assert ", 4, 8, 8], not class scores" in result["accuracy_not_measured"]
    r = run_runner("--model", str(per_pixel_model(tmp_path / "two.onnx", inputs=2)), "--iterations", "2")
    assert r.returncode == 2 and "takes 2 inputs (x, z)" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["corrupt", "missing", "eval-shape", "eval-file"])
def test_bad_artifact_or_data_exits_2_with_one_line(files, tmp_path, case):
    _, model, _, _ = files
    args = ["--model", str(model), "--iterations", "2"]
    if case == "corrupt":
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"\x08\x07 not a protobuf")
        args[1] = str(bad)
    elif case == "missing":
        args[1] = str(tmp_path / "absent.onnx")
    elif case == "eval-shape":
        np.savez(tmp_path / "e.npz", x=np.zeros((4, 3, 9, 9), np.float32))
        args += ["--eval-data", str(tmp_path / "e.npz")]
    else:
        (tmp_path / "e.npz").write_text("not an npz")
        args += ["--eval-data", str(tmp_path / "e.npz")]
    r = run_runner(*args)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("runner: ")


def test_runtime_failure_exits_3(tmp_path):
    """A model that loads but cannot run: Reshape of 4 values into rows of 3."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([3, -1], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "broken.onnx"))
    r = run_runner("--model", str(tmp_path / "broken.onnx"), "--iterations", "2")
    assert r.returncode == 3
    assert "first inference" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_numpy_exits_3_with_one_line(tmp_path):
    """A board's python without numpy (Python's isolated mode with an empty search path stands in)."""
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]; "
            f"sys.argv = ['runner.py', '--model', 'm.onnx']; exec(open({str(RUNNER)!r}).read())")
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert r.stderr.strip().startswith("runner: numpy is not installed")


def test_openvino_ir_gives_the_same_predictions(files, tmp_path):
    ov = pytest.importorskip("openvino")
    _, model, data, pred = files
    ov.save_model(ov.convert_model(str(model)), str(tmp_path / "tiny.xml"))
    r = run_runner("--model", str(tmp_path / "tiny.xml"), "--eval-data", str(data), "--iterations", "5")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["backend"] == "openvino" and result["versions"]["openvino"]
    assert result["predictions"] == [int(p) for p in pred]
    assert set(result["latency_ms"]) == LATENCY_KEYS


def _bench_args(*argv: str):
    import argparse

    from edgekd.bench.cli import add_parser

    parser = argparse.ArgumentParser(prog="edgekd")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_bench_command_locally_writes_the_runner_json(files, tmp_path, capsys):
    from edgekd.bench.cli import run

    _, model, data, _ = files
    out = tmp_path / "bench.json"
    code = run(_bench_args(str(model), "--target", "cpu", "--threads", "1", "--warmup", "2", "--iterations", "20",
                           "--eval-data", str(data), "--json", str(out)))
    assert code == 0
    result = json.loads(out.read_text())
    assert result["measured_on"] == "host" and result["target"]["name"] == "cpu"
    assert set(result["latency_ms"]) == LATENCY_KEYS and result["accuracy"] == pytest.approx(80.0)
    assert result["artifact_bytes"] == model.stat().st_size
    assert "p50" in capsys.readouterr().out


def test_bench_command_corrupt_artifact_is_bad_input(tmp_path):
    from edgekd.bench.cli import run
    from edgekd.errors import ModelError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelError) as err:
        run(_bench_args(str(bad), "--target", "cpu", "--iterations", "2"))
    assert err.value.exit_code == 2
