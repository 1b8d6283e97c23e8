"""Remote benchmarks against a real OpenSSH server on 127.0.0.1: the same JSON as a local run, and a
bounded, one-line BoardError for every way a board can be out of reach."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekd.bench.harness import bench_local
from edgekd.bench.remote import bench_hosts, bench_remote, parse_host
from edgekd.config.profiles import RemoteDefaults, load_profile
from edgekd.errors import BadInputError, BoardError, ModelError
from tests.e2e.sshd import SSHD, free_port, start_sshd
from tests.unit.test_runner import eval_set, tiny_model

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not SSHD.exists(), reason=f"{SSHD} is missing (Debian package openssh-server)")]

ROOT = Path(__file__).resolve().parents[2]
QUICK = {"warmup": 2, "iterations": 20, "remote_python": sys.executable}


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("artifact")
    model = tiny_model(d / "tiny.onnx")
    data, _ = eval_set(model, d / "eval.npz")
    return model, data


@pytest.fixture
def profile(tmp_path):
    """The cpu profile with the board's temporary directories under a folder this test can inspect."""
    work = tmp_path / "board-tmp"
    work.mkdir()
    return load_profile("cpu").model_copy(
        update={"remote": RemoteDefaults(workdir=str(work), timeout_s=120, connect_timeout_s=5)})


def leftovers(profile) -> list[str]:
    return sorted(p.name for p in Path(profile.remote.workdir).iterdir())


def test_remote_run_returns_the_local_fields(sshd, artifact, profile):
    model, data = artifact
    remote = bench_remote("board", [model], model.name, profile, eval_data=data, threads=1,
                          ssh_config=sshd.ssh_config(), timeout_s=120, **{k: v for k, v in QUICK.items()})
    local = bench_local(model, profile, eval_data=data, threads=1, warmup=2, iterations=20)
    assert set(remote) == set(local)
    assert set(remote["environment"]) == set(local["environment"])
    assert set(remote["latency_ms"]) == {"p50", "p90", "p95", "p99", "mean", "std", "min", "max"}
    assert remote["latency_ms"]["p50"] > 0 and remote["throughput"] > 0
    assert remote["accuracy"] == local["accuracy"] == pytest.approx(80.0)
    assert remote["predictions"] == local["predictions"]
    assert remote["measured_on"] == "board" and local["measured_on"] == "host"
    assert remote["versions"]["onnxruntime"] == local["versions"]["onnxruntime"]
    assert leftovers(profile) == []  # the board's temporary directory is gone


def test_bad_artifact_on_the_board_is_bad_input_and_cleaned_up(sshd, tmp_path, profile):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="board board: onnxruntime cannot load") as err:
        bench_remote("board", [bad], bad.name, profile, ssh_config=sshd.ssh_config(), **QUICK)
    assert err.value.exit_code == 2
    assert leftovers(profile) == []


def test_unreachable_port_is_a_quick_board_error(artifact, profile):
    model, _ = artifact
    host = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(BoardError, match=f"board {host}: connection refused") as err:
        bench_remote(host, [model], model.name, profile, **QUICK)
    assert time.monotonic() - t0 < 10
    assert err.value.exit_code == 3 and "\n" not in str(err.value)


def test_unknown_host_key_is_refused(sshd, artifact, profile, tmp_path):
    model, _ = artifact
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    config = sshd.ssh_config("stranger", known_hosts=empty)
    with pytest.raises(BoardError, match="board stranger: host key verification failed"):
        bench_remote("stranger", [model], model.name, profile, ssh_config=config, **QUICK)
    assert empty.read_text() == ""  # nothing was recorded: the key was not accepted
    assert leftovers(profile) == []  # and nothing ran on the board


def test_rejected_key_is_an_authentication_failure(sshd, artifact, profile, tmp_path):
    model, _ = artifact
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    config = sshd.ssh_config("intruder", identity=other)
    with pytest.raises(BoardError, match="board intruder: authentication failed"):
        bench_remote("intruder", [model], model.name, profile, ssh_config=config, **QUICK)


def test_board_without_python_or_numpy(sshd, artifact, profile):
    model, _ = artifact
    options = {**QUICK, "ssh_config": sshd.ssh_config()}
    with pytest.raises(BoardError, match="board board: /opt/none/python3 was not found"):
        bench_remote("board", [model], model.name, profile, **{**options, "remote_python": "/opt/none/python3"})
    plain = "/usr/bin/python3"
    if subprocess.run([plain, "-c", "import numpy"], capture_output=True).returncode == 0:
        pytest.skip(f"{plain} has numpy here, so it cannot stand for a board without it")
    with pytest.raises(BoardError, match="board board: numpy is not installed"):
        bench_remote("board", [model], model.name, profile, **{**options, "remote_python": plain})
    assert leftovers(profile) == []


def test_several_hosts_run_in_parallel(sshd, artifact, profile):
    model, data = artifact
    refused = f"127.0.0.1:{free_port()}"
    results = bench_hosts(["board", refused], [model], model.name, profile, eval_data=data,
                          ssh_config=sshd.ssh_config(), **QUICK)
    assert list(results) == ["board", refused]
    assert results["board"]["accuracy"] == pytest.approx(80.0)
    assert isinstance(results[refused], BoardError)


def test_malformed_host_spec_is_bad_input():
    for spec in ("-oProxyCommand=x", "user@", "host:99999", "a b"):
        with pytest.raises(BadInputError):
            parse_host(spec)
    assert parse_host("pi@[::1]:2222").host == "::1"


def test_edgekd_bench_command_over_ssh(sshd, artifact, tmp_path):
    model, data = artifact
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-c", "import sys; from edgekd.cli import main; sys.exit(main())",
                        "bench", str(model), "--target", "cpu", "--host", "board", "--ssh-config",
                        str(sshd.ssh_config()), "--remote-python", sys.executable, "--iterations", "20",
                        "--warmup", "2", "--eval-data", str(data), "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["measured_on"] == "board" and result["accuracy"] == pytest.approx(80.0)
    assert result["target"]["name"] == "cpu" and result["latency_ms"]["p50"] > 0
    assert "measured on board" in r.stdout
