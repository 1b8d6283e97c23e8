"""A Jetson measures with its own TensorRT: the bundle's trt_runner.py builds the engine on the board and
times it with CUDA events; nothing falls back to ONNX Runtime.

The commands run from the folder the files were unpacked in (the model and the bundle under model/, the
eval data under data/). A board where `tensorrt` does not import ends the run with trt_runner's one line
and exit 3: no figure from another runtime is ever reported under a Jetson profile.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from ..config.profiles import Profile
from ..errors import ModelError, StageError

RUNTIME_FILES = ("trt_runner.py", "trt_device.py", "energy.py", "eval_data.py")
EXIT_BAD_INPUT = 2


def bundle_dir() -> Path:
    from ..backends.tensorrt import BUNDLE_DIR

    return BUNDLE_DIR


def board_files(model: Path, files: list[Path]) -> list[Path]:
    """What the board needs: the model, the bundle.json beside it (precision, DLA core, workspace), and this
    edgekd's trt_runner.py / trt_device.py (so a board always runs the code that reads this report)."""
    out = [Path(f) for f in files if Path(f).name not in RUNTIME_FILES]
    beside = Path(model).parent / "bundle.json"
    if beside.is_file() and all(f.name != "bundle.json" for f in out):
        out.append(beside)
    return out + [bundle_dir() / n for n in RUNTIME_FILES[:2]] + [Path(__file__).with_name(n) for n in RUNTIME_FILES[2:]]


def commands(python: str, model_name: str, profile: Profile, *, eval_data: str | None, warmup: int | None,
             iterations: int | None) -> list[list[str]]:
    """Build on the board (timing cache kept in model/), then bench with CUDA events into result.json."""
    runner = "model/trt_runner.py"
    build = [python, runner, "build", "--onnx", f"model/{model_name}", "--engine", "model/model.engine",
             "--timing-cache", "model/timing.cache"]
    bench = [python, runner, "bench", "--engine", "model/model.engine",
             "--warmup", str(profile.bench.warmup if warmup is None else warmup),
             "--iterations", str(profile.bench.iterations if iterations is None else iterations),
             "--json", "result.json"]
    if eval_data:
        bench += ["--eval-data", eval_data]
    return [build, bench]


def bench_here(model: Path, files: list[Path], profile: Profile, python: str, *, eval_data: Path | None,
               warmup: int | None, iterations: int | None, timeout_s: float) -> dict:
    """The same commands on this machine (edgekd running on the Jetson itself), in a temporary folder."""
    import json

    with tempfile.TemporaryDirectory(prefix="edgekd-trt-") as tmp:
        work = Path(tmp)
        (work / "model").mkdir()
        for f in board_files(model, files):
            shutil.copyfile(f, work / "model" / Path(f).name)
        data = None
        if eval_data is not None:
            (work / "data").mkdir()
            shutil.copyfile(eval_data, work / "data" / "eval.npz")
            data = "data/eval.npz"
        for cmd in commands(python, model.name, profile, eval_data=data, warmup=warmup, iterations=iterations):
            try:
                proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise StageError(f"bench: TensorRT did not finish within {timeout_s} s on this host") from None
            if proc.returncode != 0:
                lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
                line = (lines[-1] if lines else f"trt_runner exited with code {proc.returncode}")
                line = line.removeprefix("trt_runner: ")
                raise (ModelError if proc.returncode == EXIT_BAD_INPUT else StageError)(f"bench on this host: {line}")
        return json.loads((work / "result.json").read_text())
