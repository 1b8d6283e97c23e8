"""Table-driven bad input: each case exits with its documented code, one line naming what and where,
no traceback, and no report.json left behind."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.cli import main
from edgekd.models import SmallCNN
from tests.conftest import run_edgekd

pytestmark = pytest.mark.e2e


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/edgekd-pwned-marker",))


def _onnx(path: Path, rank4: bool = True) -> Path:
    if rank4:
        m = SmallCNN(10).eval()
        torch.onnx.export(m, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], dynamic_axes={"input": {0: "b"}})
    else:
        m = torch.nn.Linear(8, 3).eval()
        torch.onnx.export(m, (torch.zeros(1, 8),), str(path), dynamo=False, opset_version=17, input_names=["input"])
    return path


def _setup(case: str, d: Path) -> list[str]:
    """Build the files for one case; return the compress arguments."""
    cfg = d / "c.yaml"
    good_calib = d / "calib.npz"
    np.savez(good_calib, x=np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))

    def config(text: str) -> list[str]:
        cfg.write_text(text)
        return ["--config", str(cfg)]

    if case == "missing config":
        return ["--config", str(d / "nope.yaml")]
    if case == "malformed yaml":
        return config("name: [oops\n")
    if case == "config is a list":
        return config("- a\n- b\n")
    if case == "unknown key":
        return config("distill: {epochz: 3}\n")
    if case == "out of range":
        return config("distill: {temperature: -1}\n")
    if case == "wrong type":
        return config("distill: {epochs: ten}\n")
    if case == "stage order":
        return config("stages: [quantize, distill]\n")
    if case == "unknown target":
        return ["--target", "toaster"]
    if case == "bad profile file":
        (d / "board.yaml").write_text("backend: tflite\n")
        return ["--target", str(d / "board.yaml")]
    if case == "missing data root":
        return config(f"data: {{dataset: imagefolder, root: {d / 'absent'}}}\n")
    if case == "empty data root":
        (d / "empty").mkdir()
        return config(f"data: {{dataset: imagefolder, root: {d / 'empty'}}}\n")
    if case == "unreadable images":
        for c in ("a", "b"):
            (d / "imgs" / c).mkdir(parents=True)
            for i in range(3):
                (d / "imgs" / c / f"{i}.jpg").write_bytes(b"not a jpeg")
        return config(f"data: {{dataset: imagefolder, root: {d / 'imgs'}}}\n")
    if case == "one class":
        from PIL import Image

        (d / "one" / "cat").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (i * 40, 10, 10)).save(d / "one" / "cat" / f"{i}.png")
        return config(f"data: {{dataset: imagefolder, root: {d / 'one'}}}\n")
    if case == "missing checkpoint":
        return config(f"teacher: {{checkpoint: {d / 'absent.pt'}}}\n")
    if case == "checkpoint is not one":
        (d / "junk.pt").write_bytes(b"\x00garbage" * 10)
        return config(f"teacher: {{checkpoint: {d / 'junk.pt'}}}\n")
    if case == "malicious checkpoint":
        with open(d / "evil.pt", "wb") as f:
            pickle.dump({"w": Evil()}, f)
        return config(f"teacher: {{checkpoint: {d / 'evil.pt'}}}\n")
    if case == "checkpoint of another model":
        torch.save(SmallCNN(10).state_dict(), d / "other.pt")
        return config(f"teacher: {{checkpoint: {d / 'other.pt'}}}\n")
    if case == "unknown torchvision model":
        return config("teacher: {model: 'torchvision:resnet9000'}\n")
    if case == "pickled module without trust":
        torch.save(SmallCNN(10), d / "whole.pt")
        return config(f"teacher: {{model: {d / 'whole.pt'}}}\n")
    if case == "unknown recipe":
        return config("quantize: {recipe: fastest}\n")
    if case == "calibration size 0":
        return config("quantize: {calibration_samples: 0}\n")
    if case == "model without calib":
        return ["--model", str(_onnx(d / "m.onnx"))]
    if case == "corrupt onnx":
        (d / "bad.onnx").write_bytes(b"\x08\x01garbage")
        return ["--model", str(d / "bad.onnx"), "--calib-data", str(good_calib)]
    if case == "onnx of wrong rank":
        return ["--model", str(_onnx(d / "lin.onnx", rank4=False)), "--calib-data", str(good_calib)]
    if case == "unsupported op":
        import onnx
        from onnx import TensorProto, helper

        node = helper.make_node("FancyConv", ["input"], ["out"], name="fancy_1")
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 10])])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), d / "fancy.onnx")
        return ["--model", str(d / "fancy.onnx"), "--calib-data", str(good_calib)]
    if case == "calib with nan":
        x = np.zeros((4, 3, 32, 32), np.float32)
        x[1, 0, 0, 0] = np.nan
        np.savez(d / "nan.npz", x=x)
        return ["--model", str(_onnx(d / "m.onnx")), "--calib-data", str(d / "nan.npz")]
    if case == "calib wrong shape":
        np.savez(d / "shape.npz", x=np.zeros((4, 3, 16, 16), np.float32))
        return ["--model", str(_onnx(d / "m.onnx")), "--calib-data", str(d / "shape.npz")]
    if case == "calib empty":
        np.savez(d / "empty.npz", x=np.zeros((0, 3, 32, 32), np.float32))
        return ["--model", str(_onnx(d / "m.onnx")), "--calib-data", str(d / "empty.npz")]
    if case == "calib wrong dtype":
        np.savez(d / "int.npz", x=np.zeros((4, 3, 32, 32), np.int64))
        return ["--model", str(_onnx(d / "m.onnx")), "--calib-data", str(d / "int.npz")]
    if case == "calib not npz":
        (d / "c.npz").write_text("hello")
        return ["--model", str(_onnx(d / "m.onnx")), "--calib-data", str(d / "c.npz")]
    if case == "eval shape mismatch":
        np.savez(d / "ev.npz", x=np.zeros((4, 3, 8, 8), np.float32), y=np.zeros(4, np.int64))
        return ["--model", str(_onnx(d / "m.onnx")), "--calib-data", str(good_calib), "--eval-data", str(d / "ev.npz")]
    if case == "uint8 input":
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Cast", ["input"], ["f"], to=TensorProto.FLOAT),
                                   helper.make_node("GlobalAveragePool", ["f"], ["g"]),
                                   helper.make_node("Flatten", ["g"], ["logits"])], "u8",
                                  [helper.make_tensor_value_info("input", TensorProto.UINT8, ["N", 3, 32, 32])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, str(d / "u8.onnx"))
        return ["--model", str(d / "u8.onnx"), "--calib-data", str(good_calib)]
    if case == "empty onnx":
        (d / "e.onnx").write_bytes(b"")
        return ["--model", str(d / "e.onnx"), "--calib-data", str(good_calib)]
    if case == "onnx without its external data":
        import onnx
        from onnx.external_data_helper import convert_model_to_external_data

        model = onnx.load(str(_onnx(d / "m.onnx")))
        convert_model_to_external_data(model, location="weights.bin", size_threshold=0)
        onnx.save(model, str(d / "x.onnx"))
        (d / "weights.bin").unlink()
        return ["--model", str(d / "x.onnx"), "--calib-data", str(good_calib)]
    if case == "training key in the ONNX entry":
        return ["--model", str(_onnx(d / "m.onnx")), "--calib-data", str(good_calib), *config("distill: {epochs: 5}\n")]
    if case == "one-hot eval labels":
        np.savez(d / "ev.npz", x=np.zeros((4, 3, 32, 32), np.float32), y=np.eye(5, dtype=np.int64)[[0, 1, 2, 3]])
        return ["--model", str(_onnx(d / "m.onnx")), "--calib-data", str(good_calib), "--eval-data", str(d / "ev.npz")]
    if case == "out not writable":
        (d / "afile").write_text("x")
        return ["--model", str(_onnx(d / "m.onnx")), "--calib-data", str(good_calib), "--out", str(d / "afile" / "run")]
    raise KeyError(case)


CASES = [
    ("missing config", "nope.yaml"), ("malformed yaml", "not valid YAML"), ("config is a list", "mapping"),
    ("unknown key", "distill.epochz: unknown key"), ("out of range", "distill.temperature"),
    ("wrong type", "distill.epochs"), ("stage order", "order"), ("unknown target", "unknown target 'toaster'"),
    ("bad profile file", "backend"), ("missing data root", "absent"), ("empty data root", "no class folders"),
    ("unreadable images", "none of the 6 images"), ("one class", "one class (cat); a classifier needs"), ("missing checkpoint", "absent.pt does not exist"),
    ("checkpoint is not one", "junk.pt: not a loadable"), ("malicious checkpoint", "evil.pt"),
    ("checkpoint of another model", "does not fit"), ("unknown torchvision model", "resnet9000"),
    ("pickled module without trust", "--trust-checkpoint"), ("calibration size 0", "calibration_samples"),
    ("unknown recipe", "quantize.recipe"),
    ("model without calib", "--calib-data"), ("corrupt onnx", "bad.onnx"), ("onnx of wrong rank", "rank 2"),
    ("unsupported op", "node 'fancy_1' uses op 'FancyConv'"),
    ("calib with nan", "NaN/Inf"), ("calib wrong shape", "shape"), ("calib empty", "empty"),
    ("calib wrong dtype", "dtype int64"), ("calib not npz", "not a readable .npz"),
    ("eval shape mismatch", "ev.npz"), ("out not writable", "not writable"),
    ("training key in the ONNX entry", "trains nothing: distill.epochs in the config is not read"),
    ("one-hot eval labels", "y.argmax(1)"), ("empty onnx", "e.onnx: the file is empty"),
    ("onnx without its external data", "external data file 'weights.bin', which is not in"),
    ("uint8 input", "input 'input' takes UINT8; edgekd calibrates and quantizes float32 inputs"),
]


@pytest.mark.parametrize("case, message", CASES, ids=[c for c, _ in CASES])
def test_bad_input_exits_2_with_one_line_and_no_report(case, message, tmp_path, capsys):
    marker = Path("/tmp/edgekd-pwned-marker")
    marker.unlink(missing_ok=True)
    args = _setup(case, tmp_path)
    out = tmp_path / "run"
    if "--out" not in args:
        args += ["--out", str(out)]
    code = main(["compress", "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekd: error:"), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (out / "report.json").exists()
    assert not list(tmp_path.rglob("report.json"))
    assert not marker.exists()  # a malicious pickle is refused, never executed


def test_trace_only_with_debug(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("distill: {epochz: 3}\n")
    assert main(["compress", "--debug", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_the_trust_warning_reaches_the_terminal_without_debug(tmp_path):
    # A trusted whole-module pickle is loaded with a warning the user must see; the run then stops on
    # an unknown student (exit 2) before any training.
    torch.save(SmallCNN(10), tmp_path / "whole.pt")
    (tmp_path / "c.yaml").write_text(f"teacher: {{model: {tmp_path / 'whole.pt'}}}\n"
                                     "student: {model: 'torchvision:resnet9000'}\n")
    r = run_edgekd("compress", "--quiet", "--trust-checkpoint", "--config", str(tmp_path / "c.yaml"),
                   "--out", str(tmp_path / "run"))
    err = r.stderr
    assert r.returncode == 2 and "resnet9000" in err
    assert "with full pickle (trusted by the user)" in err


@pytest.mark.parametrize("argv", [
    ["generate", "{run}", "--prompt", "x", "--json", "{dir}"],
    ["bench", "{run}/model.int8.onnx", "--target", "cpu", "--json", "{dir}"],
    ["gate", "{run}/report.json", "--max-size-mb", "1", "--junit", "{dir}"],
    ["report", "render", "{run}/report.json", "--out", "{dir}/report.md/x.md"],
])
def test_an_output_path_that_cannot_be_written_stops_before_any_work(argv, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").write_text("a file where a folder is asked for")
    args = [a.format(run=tmp_path / "no-run", dir=tmp_path / "out") for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("is a directory" in err[0] or "is a file, not a folder" in err[0]), err
    assert "Traceback" not in err[0] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.md"]


def test_generate_refuses_threads_under_one(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x", "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "edgekd: error: generate: --threads must be at least 1, got 0"


def test_generate_refuses_draft_settings_without_speculative(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x", "--draft-tokens", "3"]) == 2
    assert capsys.readouterr().err.strip() == ("edgekd: error: generate: --draft-tokens sets speculative decoding; "
                                               "add --speculative")


@pytest.mark.parametrize("value", ["nan", "inf", "0"])
def test_bench_refuses_a_duration_that_is_not_a_positive_number_of_seconds(value, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read: the flags are checked first")
    assert main(["bench", str(model), "--target", "cpu", "--duration", value]) == 2  # nan and inf would never end
    err = capsys.readouterr().err.strip()
    assert err == f"edgekd: error: bench: --duration must be a positive number of seconds, got {float(value)}", err


def test_onnx_entry_inputs_inside_the_run_directory_are_refused_before_it_is_cleared(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.fp32.onnx").write_bytes(b"the user's model")
    (out / "calib.npz").write_bytes(b"the user's calibration data")
    assert main(["compress", "--model", str(out / "model.fp32.onnx"), "--calib-data", str(out / "calib.npz"),
                 "--target", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "lies inside the run directory" in err and len(err.splitlines()) == 1, err
    assert (out / "model.fp32.onnx").read_bytes() == b"the user's model"  # untouched
    assert (out / "calib.npz").read_bytes() == b"the user's calibration data"


def test_eval_data_without_the_onnx_entry_is_refused(tmp_path, capsys):
    assert main(["compress", "--eval-data", str(tmp_path / "e.npz"), "--target", "cpu", "--out", str(tmp_path)]) == 2
    assert "--eval-data goes with --model and --calib-data" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["generate", "{run}", "--prompt", "x", "--json", "{run}/report.json"],
    ["gate", "{run}/report.json", "--max-size-mb", "1", "--junit", "{run}/report.json"],
    ["bench", "{run}/m.onnx", "--target", "cpu", "--json", "{run}/m.onnx"],
])
def test_an_output_path_that_would_destroy_an_input_or_a_runs_report_is_refused(argv, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".edgekd-run.json").write_text("{}")
    (run / "report.json").write_text('{"a": "finished run"}')
    (run / "m.onnx").write_bytes(b"a model")
    assert main([a.format(run=run) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert ("would overwrite a run directory's report.json" in err or "is the input" in err) and "Traceback" not in err
    assert (run / "report.json").read_text() == '{"a": "finished run"}' and (run / "m.onnx").read_bytes() == b"a model"


def test_generate_refuses_a_thread_count_no_runtime_can_start(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x", "--threads", "10000"]) == 2
    assert "--threads must be 1 to 1024, got 10000" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["compress", "--seed", "-1"], "edgekd compress: error: argument --seed: expected an integer from 0 to 4294967295"),
    (["compress", "--bogus"], "edgekd compress: error: unrecognized arguments: --bogus"),
    (["bench"], "edgekd bench: error: the following arguments are required: ARTIFACT, --target"),
    (["report", "show"], "edgekd report: error: argument {render,validate,compare}: invalid choice: 'show'"),
])
def test_argument_errors_are_one_line_with_exit_2(argv, said, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(said) and len(err.strip().splitlines()) == 1, err
    assert err.strip().endswith("--help)")


def test_a_config_seed_outside_what_the_generators_take_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("seed: 4294967296\n")
    assert main(["compress", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "seed: Input should be less than 4294967296" in capsys.readouterr().err


def test_an_output_folder_that_takes_no_file_is_found_by_writing_not_by_permission_bits(tmp_path):
    from edgekd.errors import BadInputError
    from edgekd.runs import check_output_file

    with pytest.raises(BadInputError, match=r"--json /proc/x: /proc is not writable \("):
        check_output_file("/proc/x", "--json")  # /proc passes os.access for root, yet takes no new file
    check_output_file(tmp_path / "new" / "x.json", "--json")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind
