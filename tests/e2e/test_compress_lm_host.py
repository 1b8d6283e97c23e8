"""`edgekd compress --host` for task causal-lm: the runner, the decoders and the prompts go to a board over SSH
(a real sshd on loopback), the board's decode speed chooses the precision, and the report's speed and peak
memory for the final student and the teacher, and speculative decoding, are the board's."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from tests.conftest import SHARED, run_edgekd  # noqa: E402
from tests.e2e.sshd import SSHD, start_sshd  # noqa: E402
from tests.e2e.test_compress_lm import lm_raw  # noqa: E402
from tests.lm_fixtures import tiny_llama_dir  # noqa: E402

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not SSHD.exists(), reason=f"{SSHD} is missing (Debian package openssh-server)")]


def test_lm_compress_with_host_reports_the_boards_figures(tmp_path):
    teacher = tiny_llama_dir(tmp_path / "teacher")
    cfg = tmp_path / "lm.yaml"  # JSON is YAML
    cfg.write_text(json.dumps(lm_raw(teacher, distill={"baseline": False, "steps": 5}, quantize={"weights": ["int8"]},
                                     speculative={"prompts": 2, "sampling": {"temperature": 1.0, "top_k": 20}},
                                     gates={"max_memory_mb": 1e6},
                                     stages=["distill", "prune", "quantize"],
                                     prune={"ratio": 0.5, "finetune_steps": 4, "max_perplexity_increase": None})))
    profile = tmp_path / "pi.yaml"
    profile.write_text(f"name: test-pi\nbackend: onnxruntime\narch: aarch64\nthreads: 1\n"
                       f"remote: {{workdir: {tmp_path}, timeout_s: 120, connect_timeout_s: 5}}\n")
    server = start_sshd(tmp_path / "sshd")
    try:
        out = tmp_path / "run"
        r = run_edgekd("compress", "--config", str(cfg), "--target", str(profile), "--out", str(out), "--host", "board",
                       "--ssh-config", str(server.ssh_config()), "--remote-python", sys.executable, "--quiet",
                       timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        rep = json.loads((out / "report.json").read_text())
        bench = run_edgekd("bench", str(out / rep["final"]["artifact"]), "--target", str(profile), "--host", "board",
                           "--ssh-config", str(server.ssh_config()), "--remote-python", sys.executable,
                           "--eval-data", str(out / "eval.npz"), "--new-tokens", "6", "--prompts", "2",
                           "--json", str(tmp_path / "bench.json"), timeout=600)
        bad = run_edgekd("compress", "--config", str(cfg), "--target", str(profile), "--out", str(tmp_path / "run2"),
                         "--host", "nosuchboard:1", "--ssh-config", str(server.ssh_config()), "--quiet", timeout=600)
    finally:
        server.stop()
    final, teacher = rep["final"], rep["teacher"]
    for block in (final, teacher):
        assert block["measured_on"] == "board" and block["decode_tokens_per_s"] > 0 and block["prefill_tokens_per_s"] > 0
        assert block["ttft_ms"] > 0 and 0 < block["tpot_ms"]["p50"] <= block["tpot_ms"]["p90"]
        assert block["peak_memory_mb"] > 10 and block["memory_scope"].endswith("on board")
        assert block["memory_runtime"].startswith("onnxruntime ")
        # the loopback "board" is this x86 host, not the aarch64 board the profile names: the report says so
        assert "x86_64 processor where test-pi is aarch64" in block["measured_on_note"]
    assert final["speedup_vs_teacher"] == pytest.approx(final["decode_tokens_per_s"] / teacher["decode_tokens_per_s"],
                                                        rel=1e-2)
    assert rep["remote"][0]["host"] == "board" and rep["remote"][0]["peak_memory_mb"] == final["peak_memory_mb"]
    stages = {s["name"]: s for s in rep["stages"]}
    q = stages["quantize"]
    assert q["choice"]["measured_where"].startswith("board, the board") and "on board" in q["choice"]["chosen_on"]
    for c in q["candidates"]:
        assert c["measured_on"] == "board" and c["selection"]["speed_measured_on"] == "board"
        assert c["selection"]["speed_generations"] == 2 * min(8, rep["data"]["validation"]["blocks"])
        assert c["decode_tokens_per_s"] > 0 and c["peak_memory_mb"] > 10
    assert stages["bench"]["measured_on"] == "board"
    p = stages["prune"]  # the pruned and the unpruned FP32 student timed in the same rounds on the board
    assert p["intermediate_size"]["after"] == 32 and p["speed_measured_on"] == "board"
    assert p["unpruned"]["decode_tokens_per_s"] > 0 and p["speedup_vs_unpruned"] > 0
    spec = rep["speculative"]  # on the board too: the floor chosen there on validation prompts, then the test
    assert spec["measured_on"] == "board" and spec["identical"] == 2 and spec["prompts"] == 2
    assert "x86_64 processor where test-pi is aarch64" in spec["measured_on_note"]
    assert spec["tokens_per_s"] > 0 and spec["teacher_tokens_per_s"] > 0 and spec["draft_tokens"] == 3
    sel = spec["selection"]
    assert sel["measured_on"] == "board" and [t["min_confidence"] for t in sel["tried"]] == [0.0, 0.3, 0.5] * 2
    assert [c["draft_tokens"] for c in spec["compared"]][-1] == 0  # lookup alone, timed on the board as well
    assert spec["sampled"]["top_k"] == 20 and spec["sampled"]["speedup"] > 0  # sampled there, lm_sampling.py beside
    assert rep["gates"][0]["gate"] == "max_memory_mb" and "measured on board" in rep["gates"][0]["detail"]
    assert "board" in (out / "report.md").read_text()
    check = SHARED / "tools" / "check_run.py"
    if check.is_file():
        res = subprocess.run([sys.executable, str(check), str(out)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout
    # `edgekd bench` on the same board: the final decoder's speed there, its perplexity as the report's
    assert bench.returncode == 0, bench.stderr[-2000:]
    got = json.loads((tmp_path / "bench.json").read_text())
    assert got["measured_on"] == "board" and got["decode_tokens_per_s"] > 0 and got["prompts"] == 2
    assert got["perplexity"] == pytest.approx(final["perplexity"], rel=1e-4)
    assert "measured on board" in bench.stdout and "x86_64 processor where test-pi is aarch64" in bench.stdout
    # an unreachable board: one line, exit 3, no report
    assert bad.returncode == 3 and "nosuchboard" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr and not (tmp_path / "run2" / "report.json").exists()
