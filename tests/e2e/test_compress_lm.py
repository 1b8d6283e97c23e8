"""task causal-lm end to end on a tiny Llama teacher built here: distill (top-k cache, CE baseline), the
KV-cache export, INT8/INT4 weight candidates chosen on validation, speed and speculative decoding, the
report and the run-directory contract."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from edgekd import Pipeline  # noqa: E402
from edgekd.config import from_dict  # noqa: E402
from tests.conftest import SHARED  # noqa: E402
from tests.lm_fixtures import corpus_files, tiny_llama_dir  # noqa: E402

CHECK_RUN = SHARED / "tools" / "check_run.py"


def lm_config(teacher_dir, **extra):
    raw = {"task": "causal-lm", "name": "tiny-lm", "teacher": {"model": str(teacher_dir)},
           "data": {"files": [str(f) for f in corpus_files(12)], "seq_len": 32, "max_train_tokens": 32 * 64,
                    "max_eval_tokens": 32 * 8, "batch_size": 8, "val_fraction": 0.2, "test_fraction": 0.2},
           "student": {"layers": 2}, "distill": {"steps": 30, "baseline": True, "lr": 3e-3, "cache_topk": 16},
           "speculative": {"prompts": 3, "max_new_tokens": 8, "prompt_tokens": 8, "draft_tokens": 3},
           "gates": {"max_perplexity_increase": 50.0}}
    for k, v in extra.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return from_dict(raw)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmrun")
    teacher = tiny_llama_dir(tmp / "teacher")
    cache = tmp / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEKD_CACHE", str(cache))
    report = Pipeline(lm_config(teacher), target="cpu", out=tmp / "run").run()
    yield report, tmp / "run", teacher, cache
    mp.undo()


def test_lm_run_reports_every_figure(lm_run):
    report, run, _, _ = lm_run
    assert report["task"] == "causal-lm" and json.loads((run / "report.json").read_text())["task"] == "causal-lm"
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["teacher", "distill", "export", "quantize", "bench"]
    d = stages["distill"]
    assert d["perplexity"] > 1 and d["baseline"]["perplexity"] > 1 and d["baseline"]["steps"] == d["steps"] == 30
    assert d["teacher_cache"]["k"] == 16 and not d["teacher_cache"]["reused"]
    assert stages["export"]["parity"]["greedy_identical"] and stages["export"]["parity"]["max_abs_diff"] < 1e-3
    q = stages["quantize"]
    assert {c["name"] for c in q["candidates"]} == {"fp32", "int8", "int4"}
    assert sum(c["chosen"] for c in q["candidates"]) == 1 and "validation" in q["choice"]["chosen_on"]
    for c in q["candidates"]:
        assert c["perplexity"] > 1 and 0 <= c["next_token_agreement"] <= 100 and c["decode_tokens_per_s"] > 0
        assert c["selection"]["perplexity"] > 1
    f, t = report["final"], report["teacher"]
    for block in (f, t):
        assert block["perplexity"] > 1 and block["decode_tokens_per_s"] > 0 and block["prefill_tokens_per_s"] > 0
        assert block["ttft_ms"] > 0 and block["tpot_ms"]["p50"] <= block["tpot_ms"]["p90"]
    assert f["speedup_vs_teacher"] == pytest.approx(f["decode_tokens_per_s"] / t["decode_tokens_per_s"], rel=1e-2)
    s = report["speculative"]
    assert s["prompts"] == 3 and s["identical"] == 3 and 0 <= s["acceptance_rate"] <= 1 and s["speedup"] > 0
    assert s["draft_tokens"] == 3 and s["tokens_per_s"] > 0 and s["teacher_tokens_per_s"] > 0
    assert report["gates"][0]["gate"] == "max_perplexity_increase" and report["gates_passed"]
    assert "perplexity" in (run / "report.md").read_text() and "Speculative" in (run / "report.html").read_text()


def test_lm_run_directory_holds_the_contract(lm_run):
    _, run, _, _ = lm_run
    if not CHECK_RUN.is_file():
        pytest.skip("the contract checker is not beside this checkout")
    res = subprocess.run([sys.executable, str(CHECK_RUN), str(run)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_second_run_reuses_the_teacher_cache(lm_run, tmp_path):
    _, _, teacher, _ = lm_run  # the same EDGEKD_CACHE is still set by the module fixture? set it again
    cache = lm_run[3]
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEKD_CACHE", str(cache))
    try:
        cfg = lm_config(teacher, quantize={"weights": ["int8"]}, distill={"baseline": False, "loss": "reverse_kl"})
        report = Pipeline(cfg, target="cpu", out=tmp_path / "again").run()
    finally:
        mp.undo()
    d = next(s for s in report["stages"] if s["name"] == "distill")
    assert d["teacher_cache"]["reused"] and d["teacher_cache"]["built_batches"] == 0 and d["loss"] == "reverse_kl"
    assert "baseline" not in d


def test_generate_alone_and_speculative_from_the_run(lm_run, tmp_path):
    from types import SimpleNamespace

    from edgekd.cli import main
    from edgekd.lm.generate import _decoder, generate

    report, run, _, _ = lm_run
    out = tmp_path / "gen.json"
    assert main(["generate", str(run), "--prompt", "def f(x):\n    return", "--max-new-tokens", "12",
                 "--json", str(out)]) == 0
    plain = json.loads(out.read_text())
    assert isinstance(plain["text"], str) and 0 < plain["tokens"] <= 12 and plain["tokens_per_s"] > 0
    spec = generate(run, "def f(x):\n    return", 12, speculative=True, draft_tokens=3)
    assert spec["speculative"] and spec["draft_tokens"] == 3 and 0 <= spec["acceptance_rate"] <= 1
    # lossless: the teacher's own greedy continuation
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    runner, teacher = _decoder(run, {**report["teacher"], "_target": "cpu"}, 1)
    try:
        ids = tok.encode("def f(x):\n    return", add_special_tokens=False)
        expect = teacher.greedy(ids, 12)
    finally:
        runner.close()
    if tok.eos_token_id in expect:
        expect = expect[:expect.index(tok.eos_token_id)]
    assert spec["token_ids"] == expect
    assert SimpleNamespace(**report["final"]["decoder"]).num_hidden_layers == 2


def test_generate_refuses_what_is_not_a_finished_lm_run(tmp_path, capsys):
    from edgekd.cli import main

    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "has no report.json" in capsys.readouterr().err
    (tmp_path / "report.json").write_text(json.dumps({"task": "image-classification"}))
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "generate needs a causal-lm run" in capsys.readouterr().err


def test_lm_gates_from_the_command_line(lm_run, capsys):
    from edgekd.cli import main

    report, run, _, _ = lm_run
    tps = report["final"]["decode_tokens_per_s"]
    ok = ["gate", str(run / "report.json"), "--min-decode-tokens-per-s", str(tps / 2), "--max-perplexity", "1e9",
          "--min-speculative-speedup", "0.001"]
    assert main(["report", "validate", str(run / "report.json")]) == 0
    assert main(ok) == 0
    assert main(["gate", str(run / "report.json"), "--max-perplexity", "1.0"]) == 1
    assert "test perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["intel-cpu", "raspberry-pi-5"])
def test_lm_run_on_openvino_and_the_pi_profile(lm_run, tmp_path, target):
    _, _, teacher, cache = lm_run
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEKD_CACHE", str(cache))
    try:
        cfg = lm_config(teacher, distill={"baseline": False, "steps": 5}, quantize={"weights": ["int8", "int4"]},
                        speculative={"prompts": 2})
        report = Pipeline(cfg, target=target, out=tmp_path / "run").run()
    finally:
        mp.undo()
    q = next(s for s in report["stages"] if s["name"] == "quantize")
    labels = " ".join(c["label"] for c in q["candidates"])
    assert ("NNCF" in labels) == (target == "intel-cpu")
    assert report["final"]["decode_tokens_per_s"] > 0 and report["speculative"]["identical"] == 2
    assert (tmp_path / "run" / "model.int8.onnx").is_file()
    if target == "raspberry-pi-5":
        assert "not the board's speed" in report["final"]["measured_on_note"]


def test_lm_on_a_jetson_profile_is_a_clear_error(lm_run, tmp_path, capsys):
    from edgekd.cli import main

    _, _, teacher, _ = lm_run
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(f"task: causal-lm\nteacher: {{model: '{teacher}'}}\ndata: {{files: ['/nonexistent/*.txt']}}\n")
    assert main(["compress", "--config", str(cfg), "--target", "jetson", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "ONNX Runtime and OpenVINO targets only" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
