"""task causal-lm end to end on a tiny Llama teacher built here: distill (top-k cache, CE baseline), the
KV-cache export, INT8/INT4 weight candidates chosen on validation, speed and speculative decoding, the
report and the run-directory contract."""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from edgekd import Pipeline  # noqa: E402
from edgekd.config import from_dict  # noqa: E402
from tests.conftest import ROOT, SHARED  # noqa: E402
from tests.lm_fixtures import corpus_files, tiny_llama_dir  # noqa: E402

CHECK_RUN = SHARED / "tools" / "check_run.py"


def lm_raw(teacher_dir, **extra) -> dict:
    raw = {"task": "causal-lm", "name": "tiny-lm", "teacher": {"model": str(teacher_dir)},
           "data": {"files": [str(f) for f in corpus_files(12)], "seq_len": 32, "max_train_tokens": 32 * 64,
                    "max_eval_tokens": 32 * 8, "batch_size": 8, "val_fraction": 0.2, "test_fraction": 0.2},
           "student": {"layers": 2}, "distill": {"steps": 30, "baseline": True, "lr": 3e-3, "cache_topk": 16},
           "speculative": {"prompts": 3, "max_new_tokens": 8, "prompt_tokens": 8, "draft_tokens": 3,
                           "draft_vocab": 200, "sampling": {"temperature": 0.8, "top_p": 0.9, "seed": 3}},
           "gates": {"max_perplexity_increase": 50.0}}
    for k, v in extra.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


def lm_config(teacher_dir, **extra):
    return from_dict(lm_raw(teacher_dir, **extra))


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
    choice = d["init"]["layer_choice"]  # 2 of the teacher's 4 layers, chosen on validation blocks
    assert choice["method"] == "greedy" and "validation" in choice["chosen_on"] and len(choice["removals"]) == 2
    assert sorted(d["init"]["layers_from_teacher"] + [r["dropped"] for r in choice["removals"]]) == [0, 1, 2, 3]
    assert stages["export"]["parity"]["greedy_identical"] and stages["export"]["parity"]["max_abs_diff"] < 1e-3
    q = stages["quantize"]
    assert {c["name"] for c in q["candidates"]} == {"fp32", "int8", "int4", "int4_mixed"}
    mixed = next(c for c in q["candidates"] if c["name"] == "int4_mixed")  # runs as an INT4 model
    assert mixed["precision"] == "int4" and "LM head" in mixed["label"]
    assert sum(c["chosen"] for c in q["candidates"]) == 1 and "validation" in q["choice"]["chosen_on"]
    for c in q["candidates"]:
        assert c["perplexity"] > 1 and 0 <= c["next_token_agreement"] <= 100 and c["decode_tokens_per_s"] > 0
        assert c["selection"]["perplexity"] > 1 and c["selection"]["speed_measured_on"] == "host"
        # every candidate's validation speed: up to 8 prompts, each in 2 interleaved rounds
        assert c["selection"]["speed_generations"] == 2 * min(8, report["data"]["validation"]["blocks"])
        assert c["peak_memory_mb"] > 10 and c["measured_on"] == "host"
        if c["name"] != "fp32":  # the increase over FP32 on validation and its one-sided 95% bound decide
            sel = c["selection"]
            assert sel["perplexity_increase_upper"] >= sel["perplexity_increase"] and sel["bound_groups"] >= 2
            assert sel["within_budget"] == (sel["perplexity_increase_upper"] <= 10.0)  # the default budget
    assert "95% confidence" in q["choice"]["why"]
    assert q["choice"]["measured_where"].startswith("this host")
    f, t = report["final"], report["teacher"]
    for block in (f, t):
        assert block["perplexity"] > 1 and block["decode_tokens_per_s"] > 0 and block["prefill_tokens_per_s"] > 0
        assert block["ttft_ms"] > 0 and block["tpot_ms"]["p50"] <= block["tpot_ms"]["p90"]
        # peak memory of the decoder's own runner process, on the target's runtime (ONNX Runtime here)
        assert block["peak_memory_mb"] > 10 and block["measured_on"] == "host"
        assert block["memory_scope"].startswith("peak resident memory of its own runner process")
        assert block["memory_runtime"].startswith("onnxruntime ") and "peak_memory_mb" not in (block.get("not_measured") or {})
    assert f["peak_memory_mb"] == next(c["peak_memory_mb"] for c in q["candidates"] if c["chosen"])
    assert f["speedup_vs_teacher"] == pytest.approx(f["decode_tokens_per_s"] / t["decode_tokens_per_s"], rel=1e-2)
    s = report["speculative"]
    assert s["prompts"] == 3 and s["identical"] == 3 and 0 <= s["acceptance_rate"] <= 1 and s["speedup"] > 0
    assert s["draft_tokens"] == 3 and s["tokens_per_s"] > 0 and s["teacher_tokens_per_s"] > 0 and s["measured_on"] == "host"
    # what a round kept and cost, from the runner process: at least the target's own token, a check, drafting
    assert s["round"]["tokens"] >= 1 and s["round"]["check_ms"] > 0 and s["teacher_token_ms"] > 0
    assert all("round" in c for c in s.get("compared") or [])
    # min_confidence and lookup auto: the pinned draft length with each floor, with and without context lookup,
    # timed on validation prompts
    sel = s["selection"]
    assert sel["on"] == "validation prompts"
    assert [(t["min_confidence"], t["lookup"]) for t in sel["tried"]] == [(c, u) for u in (False, True)
                                                                         for c in (0.0, 0.3, 0.5)]
    assert {t["draft_tokens"] for t in sel["tried"]} == {3} and s["min_confidence"] in (0.0, 0.3, 0.5)
    best = max(sel["tried"], key=lambda t: t["tokens_per_s"])
    assert (best["min_confidence"], best["lookup"]) == (s["min_confidence"], s["lookup"])
    # beside the choice, in the same rounds on the test prompts: the other lookup mode and lookup alone
    assert [c["lookup"] for c in s["compared"]] == [not s["lookup"], True] and s["compared"][1]["draft_tokens"] == 0
    assert all(c["identical"] == 3 and c["speedup"] > 0 for c in s["compared"])
    # speculative sampling with the chosen setting, against the teacher's own sampling in the same rounds
    sm = s["sampled"]
    assert (sm["temperature"], sm["top_p"], sm["top_k"], sm["prompts"]) == (0.8, 0.9, 0, 3)
    assert (sm["draft_tokens"], sm["min_confidence"], sm["lookup"]) == (s["draft_tokens"], s["min_confidence"], s["lookup"])
    assert sm["speedup"] > 0 and sm["teacher_tokens_per_s"] > 0 and sm["round"]["check_ms"] > 0
    assert sm["identical"] is None and "distributed as the teacher's own sampling" in sm["not_measured"]["identical"]
    md = (run / "report.md").read_text()
    assert "chosen on validation prompts" in md and "context lookup alone" in md
    assert "sampled at temperature 0.8, top-p 0.9 (the teacher alone samples too)" in md
    assert "over the teacher's own sampling (temperature 0.8, top-p 0.9)" in md
    # the draft: the final decoder with its LM head cut to the training split's 200 most frequent tokens
    dv = s["draft"]
    assert dv["vocab_tokens"] == 200 and dv["vocab_size"] == 320 and 50 < dv["train_coverage"] <= 100
    assert dv["artifact"].startswith("target/draft/") and (run / dv["artifact"]).is_file()
    assert "LM head kept for the 200 tokens most frequent in the training split" in md
    from edgekd.report.tables import fmt_count

    models = md.split("### Language models")[1].split("###")[0]
    rows = [line for line in models.splitlines() if "MatMulNBits" in line]  # every weight candidate: the student's params
    assert rows and all(f"| {fmt_count(report['final']['params'])} |" in line for line in rows)
    # how the final was chosen: each candidate's validation increase over FP32, its 95% bound, the budget
    choice = md.split("### Weight candidates, chosen on validation")[1].split("###")[0]
    assert "at 95% confidence" in choice and "| at most (95%) |" in choice and choice.count("✔ chosen") == 1
    for c in q["candidates"][1:]:
        assert f"{c['selection']['perplexity_increase_upper']:+.2f}%" in choice
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


def test_the_student_ends_on_the_teachers_own_text_with_sequence_steps(lm_run, tmp_path, capsys):
    from edgekd.cli import main

    _, _, teacher, cache = lm_run
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEKD_CACHE", str(cache))
    try:
        cfg = lm_config(teacher, quantize={"weights": ["int8"]},
                        distill={"baseline": True, "steps": 6, "sequence_kd": 8, "sequence_steps": 2})
        report = Pipeline(cfg, target="cpu", out=tmp_path / "aligned").run()
        bad = lm_raw(teacher, distill={"steps": 6, "sequence_kd": 8, "sequence_steps": 8})
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        code = main(["compress", "--config", str(tmp_path / "bad.json"), "--target", "cpu", "--out", str(tmp_path / "b")])
    finally:
        mp.undo()
    d = next(s for s in report["stages"] if s["name"] == "distill")
    seq = d["sequence_kd"]
    assert seq["last_steps"] == 2 and seq["blocks"] == 16 and seq["of_blocks"] == 64 and seq["new_tokens"] == 8
    assert d["steps"] == d["baseline"]["steps"] == 6 and not d["teacher_cache"]["reused"]  # over the rewritten blocks
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].endswith("sequence_steps must be less than 8 and at most 6") and "Traceback" not in err
    assert not (tmp_path / "b" / "report.json").exists() and not (tmp_path / "b" / "eval.npz").exists()


def test_a_resumed_run_rebuilds_the_student_on_the_layers_the_first_run_chose(lm_run, tmp_path):
    report, run, teacher, cache = lm_run
    shutil.copytree(run / "stages", tmp_path / "again" / "stages")
    shutil.copy(run / ".edgekd-run.json", tmp_path / "again")  # an earlier run was here: its outputs go
    (tmp_path / "again" / "model.int2.onnx").write_bytes(b"stale")
    (tmp_path / "again" / "target" / "int2").mkdir(parents=True)
    (tmp_path / "again" / "notes.txt").write_text("the user's own")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEKD_CACHE", str(cache))
    try:
        again = Pipeline(lm_config(teacher, speculative={"prompts": 99}), target="cpu", out=tmp_path / "again").run()
    finally:
        mp.undo()
    first, second = ({s["name"]: s for s in r["stages"]}["distill"] for r in (report, again))
    assert second["resumed"] and second["init"] == first["init"] and "layer_choice" in second["init"]
    assert not (tmp_path / "again" / "model.int2.onnx").exists() and not (tmp_path / "again" / "target" / "int2").exists()
    assert (tmp_path / "again" / "notes.txt").read_text() == "the user's own"
    n = again["speculative"]["prompts"]  # the test split's blocks, one prompt each, and the report says so
    assert n < 99 and f"speculative.prompts 99: the test split has {n} blocks, one prompt each: {n} prompts timed" in again["notes"]
    # the FP32 student measured again (the quantized final is chosen on speed, which may pick another one)
    assert second["perplexity"] == pytest.approx(first["perplexity"], rel=1e-6)


def test_a_users_json_lines_in_named_splits_through_the_cli(lm_run, tmp_path, capsys):
    from edgekd.cli import main

    _, _, teacher, cache = lm_run
    texts = [f.read_text(encoding="utf-8") for f in corpus_files(12)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"content": t, "id": i}) + "\n" for i, t in enumerate(texts[:10])))
    (data / "test.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in texts[10:]))
    raw = lm_raw(teacher, quantize={"weights": ["int8"]}, distill={"baseline": False, "steps": 6})
    raw["data"] = {**raw["data"], "files": {"train": "data/train.jsonl", "test": ["data/test.jsonl"]},
                   "text_field": "content"}
    (tmp_path / "lm.json").write_text(json.dumps(raw))  # the data paths relative to the config file
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEKD_CACHE", str(cache))
    try:
        assert main(["compress", "--quiet", "--config", str(tmp_path / "lm.json"), "--out", str(tmp_path / "run")]) == 0
        report = json.loads((tmp_path / "run" / "report.json").read_text())
        with (data / "train.jsonl").open("a") as f:
            f.write('{"body": "no content field"}\n')
        code = main(["compress", "--quiet", "--config", str(tmp_path / "lm.json"), "--out", str(tmp_path / "bad")])
    finally:
        mp.undo()
    d = report["data"]
    assert d["split"] == "as named; validation carved from the training records, seeded"
    # the records read (each split is bounded by tokens: 8, 2 and 2 records are there)
    assert 1 <= d["train"]["documents"] <= 8 and 1 <= d["validation"]["documents"] <= 2 and 1 <= d["test"]["documents"] <= 2
    assert d["train"]["files"] == d["validation"]["files"] == d["test"]["files"] == 1
    assert report["final"]["perplexity"] > 1
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].endswith("train.jsonl line 11 has no 'content' field (its keys: body); set data.text_field, or "
                           "write 'messages' (chat) or 'prompt' and 'completion'")
    assert not (tmp_path / "bad" / "report.json").exists()


def _pruned_run(lm_run, out, **prune):
    _, _, teacher, cache = lm_run
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEKD_CACHE", str(cache))
    try:
        cfg = lm_config(teacher, stages=["distill", "prune", "quantize"], quantize={"weights": ["int8"]},
                        distill={"baseline": False}, prune={"ratio": 0.5, "finetune_steps": 8, **prune})
        return Pipeline(cfg, target="cpu", out=out).run()
    finally:
        mp.undo()


def test_the_prune_stage_narrows_the_mlps_and_fine_tunes_from_the_distill_stages_cache(lm_run, tmp_path):
    report = _pruned_run(lm_run, tmp_path / "pruned", max_perplexity_increase=1000)
    stages = {s["name"]: s for s in report["stages"]}
    p, d = stages["prune"], stages["distill"]
    assert p["intermediate_size"] == {"before": 64, "after": 32} and p["criterion"] == "activation"
    per_channel = 3 * 32 * 2  # a gate row, an up row and a down column of width 32 in each of 2 layers
    assert p["before"]["params"] - p["after"]["params"] == 32 * per_channel
    assert p["before"]["macs"] - p["after"]["macs"] == 32 * per_channel
    assert report["final"]["params"] == p["after"]["params"] and p["reached"]
    cache = p["finetune"]["teacher_cache"]
    assert cache["reused"] and cache["built_batches"] == 0 and cache["directory"] == d["teacher_cache"]["directory"]
    [tried] = p["steps"]
    assert tried["accepted"] and tried["intermediate_size"] == 32 and len(tried["activation_kept"]) == 2
    assert tried["val_perplexity_increase"] == pytest.approx(100 * (tried["val_perplexity"] / p["val_perplexity_unpruned"] - 1),
                                                            abs=1e-2)
    # test figures through ONNX Runtime: the distill stage's are the unpruned student's, the prune stage's the final's
    assert d["perplexity"] == p["unpruned"]["perplexity"] and p["perplexity"] != d["perplexity"]
    assert p["perplexity_increase"] == pytest.approx(100 * (p["perplexity"] / d["perplexity"] - 1), abs=1e-2)
    fp32 = next(c for c in stages["quantize"]["candidates"] if c["name"] == "fp32")
    assert fp32["perplexity"] == p["perplexity"] and p["decode_tokens_per_s"] == fp32["decode_tokens_per_s"]
    assert p["speedup_vs_unpruned"] == pytest.approx(p["decode_tokens_per_s"] / p["unpruned"]["decode_tokens_per_s"],
                                                     rel=1e-2) and p["speed_measured_on"] == "host"
    md = (tmp_path / "pruned" / "report.md").read_text()
    assert "### Pruning the student's MLPs" in md and "pruned (ratio 0.5), fine-tuned 8 steps ← kept | 32 |" in md
    if CHECK_RUN.is_file():
        res = subprocess.run([sys.executable, str(CHECK_RUN), str(tmp_path / "pruned")], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout
    again = _pruned_run(lm_run, tmp_path / "pruned", max_perplexity_increase=1000)
    p2 = next(s for s in again["stages"] if s["name"] == "prune")
    assert p2["resumed"] and p2["perplexity"] == pytest.approx(p["perplexity"], rel=1e-6)


def test_a_prune_over_its_perplexity_budget_keeps_the_unpruned_student(lm_run, tmp_path):
    report = _pruned_run(lm_run, tmp_path / "over", criterion="random", finetune_steps=1, lr=1e-9,
                         max_perplexity_increase=0)
    p = next(s for s in report["stages"] if s["name"] == "prune")
    # half as far (ratio 0.25) keeps all 64 channels in blocks of 32: it is not tried
    [tried] = p["steps"]
    assert tried["amount"] == {"ratio": 0.5} and not tried["accepted"] and tried["val_perplexity_increase"] > 0
    assert p["intermediate_size"] == {"before": 64, "after": 64} and p["after"] == p["before"] and not p["reached"]
    assert "the unpruned student is kept" in p["note"] and any(n.startswith("prune: pruning added") for n in report["notes"])
    assert "unpruned" not in p and report["final"]["params"] == p["before"]["params"]


def test_a_pruned_student_for_a_jetson_bundle_says_its_test_figures_are_not_measured(lm_run, tmp_path, monkeypatch):
    from edgekd.cli import main

    _, _, teacher, cache = lm_run
    monkeypatch.setenv("EDGEKD_CACHE", str(cache))
    cfg = tmp_path / "lm.json"
    cfg.write_text(json.dumps(lm_raw(teacher, stages=["distill", "prune", "quantize"], quantize={"weights": ["int8"]},
                                     distill={"baseline": False, "steps": 5},
                                     prune={"ratio": 0.5, "finetune_steps": 4, "max_perplexity_increase": None},
                                     gates={"max_perplexity_increase": None})))
    assert main(["compress", "--config", str(cfg), "--target", "jetson", "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    p = next(s for s in report["stages"] if s["name"] == "prune")
    assert p["intermediate_size"] == {"before": 64, "after": 32} and report["final"]["params"] == p["after"]["params"]
    assert p["perplexity"] is None and "TensorRT is not installed here" in p["not_measured"]["perplexity"]
    assert p["steps"][0]["accepted"] and p["max_perplexity_increase"] is None  # no limit: the first amount stays


def test_generate_alone_and_speculative_from_the_run(lm_run, tmp_path):
    from types import SimpleNamespace

    from edgekd.cli import main
    from edgekd.lm.generate import generate
    from edgekd.lm.run_decoders import _decoder

    report, run, _, _ = lm_run
    out = tmp_path / "gen.json"
    assert main(["generate", str(run), "--prompt", "def f(x):\n    return", "--max-new-tokens", "12",
                 "--json", str(out)]) == 0
    plain = json.loads(out.read_text())
    assert isinstance(plain["text"], str) and 0 < plain["tokens"] <= 12 and plain["tokens_per_s"] > 0
    spec = generate(run, "def f(x):\n    return", 12, speculative=True, draft_tokens=3)
    assert spec["speculative"] and spec["draft_tokens"] == 3 and 0 <= spec["acceptance_rate"] <= 1
    assert spec["model"] == report["speculative"]["draft"]["artifact"] != report["final"]["artifact"]
    r = spec["round"]  # what one check-and-draft round gave and cost
    assert 1 <= r["tokens"] <= 4 and r["check_ms"] > 0 and r["draft_ms"] > 0
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


def test_generate_reads_a_prompt_file_and_a_chat_prompt_through_the_template(lm_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    from edgekd.cli import main
    from edgekd.lm.generate import generate

    _, run, _, _ = lm_run
    prompt = tmp_path / "prompt.py"
    prompt.write_text("def f(x):\n    return")
    out = tmp_path / "gen.json"
    assert main(["generate", str(run), "--prompt-file", str(prompt), "--max-new-tokens", "6", "--json", str(out)]) == 0
    from_file = json.loads(out.read_text())
    assert from_file["token_ids"] == generate(run, "def f(x):\n    return", 6)["token_ids"]  # greedy: the same
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt-file", str(prompt), "--max-new-tokens", "6", "--stream"]) == 0
    assert capsys.readouterr().out == from_file["text"] + "\n"  # streamed as it came: the same text
    assert main(["generate", str(run), "--prompt", "hi", "--chat"]) == 2  # the tiny tokenizer has no template
    assert capsys.readouterr().err.strip().endswith("chat prompts (--chat, --messages, messages lines) need a chat template; the run's "
                                               "tokenizer has none")
    assert main(["generate", str(run), "--prompt-file", str(tmp_path / "absent.txt")]) == 2
    assert "--prompt-file" in capsys.readouterr().err
    chat_run = tmp_path / "chat-run"  # the same run, its tokenizer given a chat template
    shutil.copytree(run, chat_run)
    tok = AutoTokenizer.from_pretrained(str(chat_run / "tokenizer"))
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    tok.save_pretrained(str(chat_run / "tokenizer"))
    got = generate(chat_run, "hi", 4, chat=True)
    assert got["prompt_tokens"] == len(tok.encode("<user>hi\n<assistant>", add_special_tokens=False))
    # a system message, and a whole conversation from a file: the same template, on the host and on the board
    talk = tmp_path / "talk.json"
    talk.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                {"role": "user", "content": "more"}]))
    bundle_json = chat_run / "target" / "app" / "bundle.json"
    bundle = json.loads(bundle_json.read_text())
    bundle["tokenizer"]["chat_template"] = tok.chat_template
    bundle_json.write_text(json.dumps(bundle))
    for args, text in ((["--prompt", "hi", "--chat", "--system", "be brief"], "<system>be brief\n<user>hi\n<assistant>"),
                       (["--messages", str(talk), "--system", "s"], "<system>s\n<user>hi\n<assistant>yo\n<user>more\n"
                                                                   "<assistant>")):
        assert main(["generate", str(chat_run), *args, "--max-new-tokens", "4", "--json", str(out)]) == 0
        host = json.loads(out.read_text())
        assert host["prompt_tokens"] == len(tok.encode(text, add_special_tokens=False)) > got["prompt_tokens"]
        board = _app(chat_run, tmp_path, *args, "--max-new-tokens", "4", "--json", "board.json")
        assert board.returncode == 0, board.stderr
        assert json.loads((tmp_path / "board.json").read_text())["token_ids"] == host["token_ids"]
    for args, words in ((["--prompt", "hi", "--system", "s"], "--system sets the chat's system message; add --chat"),
                        (["--messages", str(tmp_path / "absent.json")], "absent.json: No such file")):
        assert main(["generate", str(chat_run), *args]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
        board = _app(chat_run, tmp_path, *args)
        assert board.returncode == 2 and words in board.stderr, board.stderr


def _app(run, tmp_path, *args, app: str = "app"):
    """target/app/generate.py (or `app`'s) run as on a board: a fresh process where edgekd, torch and
    transformers cannot be imported."""
    blocked = tmp_path / "blocked"
    for name in ("edgekd", "torch", "transformers"):
        (blocked / name).mkdir(parents=True, exist_ok=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the board')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    return subprocess.run([sys.executable, str(run / "target" / app / "generate.py"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_app_bundle_writes_the_same_text_on_the_board_without_edgekd(lm_run, tmp_path):
    from edgekd.lm.generate import generate

    report, run, _, _ = lm_run
    b = report["final"]["bundle"]
    assert b["path"] == "target/app" and b["needs"] == ["numpy", "onnxruntime", "tokenizers"]
    for f in ("generate.py", "bundle.json", "README.md", "lm_runner.py", "lm_generation.py", "lm_figures.py", "lm_sampling.py",
              "lm_prompts.py",
              "runner.py",
              "tokenizer/tokenizer.json", b["roles"]["model"], b["roles"]["draft"], b["roles"]["teacher"]):
        assert f"target/app/{f}" in b["files"], f
    final = run / report["final"]["artifact"]
    assert os.path.samefile(final, run / "target" / "app" / b["roles"]["model"])  # linked, not copied
    prompt = "def f(x):\n    return"
    got = _app(run, tmp_path, "--prompt", prompt, "--max-new-tokens", "12", "--json", "plain.json")
    assert got.returncode == 0, got.stderr
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["token_ids"] == generate(run, prompt, 12)["token_ids"] and got.stdout.rstrip("\n") == plain["text"]
    got = _app(run, tmp_path, "--prompt", prompt, "--max-new-tokens", "12", "--speculative", "--json", "spec.json")
    assert got.returncode == 0, got.stderr
    spec = json.loads((tmp_path / "spec.json").read_text())  # lossless: the teacher's own greedy tokens
    assert spec["token_ids"] == generate(run, prompt, 12, speculative=True)["token_ids"] and spec["speculative"]
    streamed = _app(run, tmp_path, "--prompt", prompt, "--max-new-tokens", "12", "--speculative", "--stream")
    assert streamed.returncode == 0 and streamed.stdout == spec["text"] + "\n", streamed.stderr  # the same text
    for args, message in ((["--prompt", "x", "--chat"], "need a chat template"),
                          (["--prompt", "x", "--max-new-tokens", "100000"], "positions; the model takes at most"),
                          (["--prompt", "x", "--draft-tokens", "2"], "add --speculative")):
        got = _app(run, tmp_path, *args)
        assert got.returncode == 2 and message in got.stderr and "Traceback" not in got.stderr, got.stderr


def test_sampled_text_repeats_with_its_seed_in_generate_and_on_the_board(lm_run, tmp_path, capsys):
    from edgekd.cli import main
    from edgekd.lm.generate import generate

    _, run, _, _ = lm_run
    prompt, settings = "def f(x):\n    return", ["--temperature", "1.5", "--top-p", "0.95", "--seed", "7"]
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "16", *settings,
                 "--json", str(tmp_path / "s.json")]) == 0
    assert "sampled at temperature 1.5, top-p 0.95, seed 7" in capsys.readouterr().err
    sampled = json.loads((tmp_path / "s.json").read_text())
    assert sampled["sampling"] == {"temperature": 1.5, "top_k": 0, "top_p": 0.95, "seed": 7}
    again = generate(run, prompt, 16, temperature=1.5, top_p=0.95, seed=7)
    assert again["token_ids"] == sampled["token_ids"] != generate(run, prompt, 16)["token_ids"]  # not greedy
    assert len({tuple(generate(run, prompt, 16, temperature=1.5, seed=s)["token_ids"]) for s in range(4)}) > 1
    assert generate(run, prompt, 16, temperature=1.0, top_k=1, seed=3)["token_ids"] == generate(run, prompt, 16)[
        "token_ids"]  # top-k 1 is greedy
    fresh = generate(run, prompt, 8, temperature=1.0)  # no seed: a fresh one, written down so it can be repeated
    assert generate(run, prompt, 8, temperature=1.0, seed=fresh["sampling"]["seed"])["token_ids"] == fresh["token_ids"]
    spec = generate(run, prompt, 16, speculative=True, temperature=1.5, top_p=0.95, seed=7)
    assert spec["speculative"] and spec["sampling"]["seed"] == 7 and 0 < len(spec["token_ids"]) <= 16
    # the board's app: the same settings and seed give the same tokens, alone and speculative
    got = _app(run, tmp_path, "--prompt", prompt, "--max-new-tokens", "16", *settings, "--json", "app.json")
    assert got.returncode == 0 and "seed 7" in got.stderr, got.stderr
    assert json.loads((tmp_path / "app.json").read_text())["token_ids"] == sampled["token_ids"]
    got = _app(run, tmp_path, "--prompt", prompt, "--max-new-tokens", "16", *settings, "--speculative",
               "--json", "app-spec.json")
    assert got.returncode == 0, got.stderr
    assert json.loads((tmp_path / "app-spec.json").read_text())["token_ids"] == spec["token_ids"]
    for args, message in ((["--seed", "3"], "--seed sets sampling, and decoding is greedy; add --temperature"),
                          (["--temperature", "1", "--top-p", "0"], "top-p must be in (0, 1]"),
                          (["--temperature", "-1"], "temperature must be above 0")):
        assert main(["generate", str(run), "--prompt", "x", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        got = _app(run, tmp_path, "--prompt", "x", *args)
        assert got.returncode == 2 and message in got.stderr and "Traceback" not in got.stderr, got.stderr


def test_the_repetition_penalty_in_generate_and_on_the_board(lm_run, tmp_path, capsys):
    from edgekd.cli import main
    from edgekd.lm.generate import generate

    _, run, _, _ = lm_run
    prompt, penalty = "def f(x):\n    return", ["--repetition-penalty", "2.0"]
    plain = generate(run, prompt, 24)["token_ids"]
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "24", *penalty,
                 "--json", str(tmp_path / "p.json")]) == 0
    assert "repetition penalty 2" in capsys.readouterr().err
    shaped = json.loads((tmp_path / "p.json").read_text())
    assert shaped["repetition"] == {"penalty": 2.0, "window": 0}
    assert len(set(shaped["token_ids"])) > len(set(plain))  # fewer repeats
    windowed = generate(run, prompt, 24, repetition_penalty=2.0, repetition_window=4)["token_ids"]
    assert windowed != shaped["token_ids"]
    spec = generate(run, prompt, 24, speculative=True, repetition_penalty=2.0)
    assert spec["repetition"]["penalty"] == 2.0 and spec["drafted"] > 0
    assert spec["token_ids"] != generate(run, prompt, 24, speculative=True)["token_ids"]
    sampled = generate(run, prompt, 16, temperature=1.2, seed=5, repetition_penalty=1.5, repetition_window=8)
    # the board's app: the same penalty gives the same tokens, greedy, speculative and sampled
    for args, ids in (([], shaped["token_ids"]), (["--speculative"], spec["token_ids"]),
                      (["--max-new-tokens", "16", "--temperature", "1.2", "--seed", "5", "--repetition-penalty", "1.5",
                        "--repetition-window", "8"], sampled["token_ids"])):
        got = _app(run, tmp_path, "--prompt", prompt, "--max-new-tokens", "24", *penalty, *args, "--json", "a.json")
        assert got.returncode == 0 and "repetition penalty" in got.stderr, got.stderr
        assert json.loads((tmp_path / "a.json").read_text())["token_ids"] == ids, args
    for args, message in ((["--repetition-window", "8"], "add --repetition-penalty R"),
                          (["--repetition-penalty", "0"], "repetition penalty must be above 0"),
                          (["--repetition-penalty", "1.2", "--repetition-window", "-1"], "window must be 0")):
        assert main(["generate", str(run), "--prompt", "x", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        got = _app(run, tmp_path, "--prompt", "x", *args)
        assert got.returncode == 2 and message in got.stderr and "Traceback" not in got.stderr, got.stderr


def test_stop_strings_end_the_text_in_generate_and_on_the_board(lm_run, tmp_path, capsys):
    from edgekd.cli import main
    from edgekd.lm.generate import generate

    _, run, _, _ = lm_run
    prompt, sampled = "def f(x):\n    return", {"temperature": 1.5, "seed": 7}  # the tiny model's greedy text is spaces
    flags = ["--temperature", "1.5", "--seed", "7"]
    plain = generate(run, prompt, 32, **sampled)
    text = plain["text"]
    stop = next(text[k:k + 3] for k in range(len(text) // 2, len(text) - 3)
                if text[k:k + 3].strip() and text.find(text[k:k + 3]) > 2)  # a stop inside the text, not at its start
    cut = text.find(stop)
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "32", *flags, "--stop", stop,
                 "--stop", "never in this text \u2603", "--json", str(tmp_path / "s.json")]) == 0
    captured = capsys.readouterr()
    assert captured.out == text[:cut] + "\n" and f"stopped at {stop!r}" in captured.err
    got = json.loads((tmp_path / "s.json").read_text())
    assert got["text"] == text[:cut] and got["stop"] == stop
    assert got["token_ids"] == plain["token_ids"][:len(got["token_ids"])] and got["tokens"] < plain["tokens"]
    streamed = generate(run, prompt, 32, stop=[stop], stream=True, **sampled)
    assert streamed["text"] == text[:cut] and capsys.readouterr().out == text[:cut] + "\n"  # the stop never shown
    spec = generate(run, prompt, 32, speculative=True, **sampled)["text"]  # the same draws up to the stop
    cut_spec = generate(run, prompt, 32, speculative=True, stop=[stop], **sampled)
    assert cut_spec["text"] == (spec[:spec.find(stop)] if stop in spec else spec)
    app = _app(run, tmp_path, "--prompt", prompt, "--max-new-tokens", "32", *flags, "--stop", stop, "--json", "a.json")
    assert app.returncode == 0 and f"stopped at {stop!r}" in app.stderr, app.stderr
    on_board = json.loads((tmp_path / "a.json").read_text())
    assert on_board["token_ids"] == got["token_ids"] and on_board["text"] == got["text"]
    assert main(["generate", str(run), "--prompt", "x", "--stop", ""]) == 2
    err = capsys.readouterr().err
    assert "--stop needs a text to stop at" in err and "Traceback" not in err
    app = _app(run, tmp_path, "--prompt", "x", "--stop", "")
    assert app.returncode == 2 and "--stop needs a text to stop at" in app.stderr


def test_many_prompts_from_json_lines_load_the_decoders_once_on_the_host_and_on_the_board(lm_run, tmp_path, capsys):
    from edgekd.cli import main
    from edgekd.lm.generate import generate

    _, run, _, _ = lm_run
    texts = ["def f(x):\n    return", "import os\n", "class A:\n"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(texts[0]) + "\n\n" + json.dumps({"prompt": texts[1], "id": "b", "source": "x"})
                       + "\n" + json.dumps({"prompt": texts[2]}) + "\n")
    out = tmp_path / "batch.json"
    assert main(["generate", str(run), "--prompts", str(prompts), "--max-new-tokens", "6", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]  # a line of JSON for each prompt, in order
    assert [r["index"] for r in lines] == [0, 1, 2] and [r.get("id") for r in lines] == [None, "b", None]
    for r, text in zip(lines, texts, strict=True):
        assert r["token_ids"] == generate(run, text, 6)["token_ids"]  # each as it would be alone
    batch = json.loads(out.read_text())
    assert batch["prompts"] == 3 and batch["tokens"] == sum(r["tokens"] for r in lines) and batch["tokens_per_s"] > 0
    assert [r["token_ids"] for r in batch["results"]] == [r["token_ids"] for r in lines]
    assert "[3/3]" in captured.err and "3 prompts:" in captured.err
    # speculative and sampled: lossless per prompt, prompt i seeded with seed + i, the same on the board
    assert main(["generate", str(run), "--prompts", str(prompts), "--max-new-tokens", "8", "--speculative",
                 "--temperature", "1.5", "--seed", "7", "--json", str(out)]) == 0
    spec = json.loads(out.read_text())
    capsys.readouterr()
    assert spec["speculative"] and spec["drafted"] == sum(r["drafted"] for r in spec["results"])
    for i, (r, text) in enumerate(zip(spec["results"], texts, strict=True)):
        assert r["sampling"]["seed"] == 7 + i
        assert r["token_ids"] == generate(run, text, 8, speculative=True, temperature=1.5, seed=7 + i)["token_ids"]
    app = _app(run, tmp_path, "--prompts", str(prompts), "--max-new-tokens", "8", "--speculative", "--temperature",
               "1.5", "--seed", "7", "--json", "board.json")
    assert app.returncode == 0, app.stderr
    board = json.loads((tmp_path / "board.json").read_text())
    assert [r["token_ids"] for r in board["results"]] == [r["token_ids"] for r in spec["results"]]
    assert [json.loads(line)["index"] for line in app.stdout.splitlines()] == [0, 1, 2]
    # a bad line is named before anything is generated, on both
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps("ok") + "\n{not json\n")
    words = f"--prompts {bad} line 2 is not JSON"
    assert main(["generate", str(run), "--prompts", str(bad)]) == 2
    captured = capsys.readouterr()
    assert words in captured.err and "Traceback" not in captured.err and captured.out == "", captured.err
    app = _app(run, tmp_path, "--prompts", str(bad))
    assert app.returncode == 2 and words in app.stderr and app.stdout == "", app.stderr
    bad.write_text(json.dumps("ok") + "\n" + json.dumps({"prompt": "x" * 5000}) + "\n")
    assert main(["generate", str(run), "--prompts", str(bad), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert f"--prompts {bad} line 2:" in err and "the model takes at most" in err, err
    assert main(["generate", str(run), "--prompts", str(prompts), "--stream"]) == 2
    assert "--stream prints one text" in capsys.readouterr().err


def test_generate_refuses_what_is_not_a_finished_lm_run(tmp_path, capsys):
    from edgekd.cli import main

    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "has no report.json" in capsys.readouterr().err
    (tmp_path / "report.json").write_text(json.dumps({"task": "image-classification"}))
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "generate needs a causal-lm run" in capsys.readouterr().err
    (tmp_path / "tokenizer").mkdir()
    for report, words in (([], "is not a report"), ({"task": "causal-lm"}, "names no target"),
                          ({"task": "causal-lm", "target": {"name": "cpu"}, "final": {"artifact": None}},
                           "has no final decoder")):
        (tmp_path / "report.json").write_text(json.dumps(report))
        assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "report.json").write_text(json.dumps({"task": "causal-lm", "target": {"name": "cpu"}, **{
        r: {"artifact": "m.onnx", "decoder": {"max_positions": 64}} for r in ("final", "teacher")}}))
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2  # an empty tokenizer folder
    err = capsys.readouterr().err
    assert "tokenizer cannot be read as a tokenizer" in err and len(err.strip().splitlines()) == 1, err


def test_generate_refuses_a_continuation_longer_than_the_model_takes(lm_run, capsys):
    from edgekd.cli import main

    report, run, _, _ = lm_run
    limit = report["final"]["decoder"]["max_positions"]
    assert limit == report["teacher"]["decoder"]["max_positions"] > 0
    for extra in ([], ["--speculative"]):
        assert main(["generate", str(run), "--prompt", "def", "--max-new-tokens", str(limit), *extra]) == 2
        err = capsys.readouterr().err
        assert f"positions; the model takes at most {limit}" in err and "Traceback" not in err


def test_bench_times_a_runs_decoder_and_scores_its_blocks_as_the_report_did(lm_run, tmp_path, capsys):
    from edgekd.cli import main

    report, run, _, _ = lm_run
    final = run / report["final"]["artifact"]
    out = tmp_path / "bench.json"
    assert main(["bench", str(final), "--target", "cpu", "--eval-data", str(run / "eval.npz"), "--new-tokens", "6",
                 "--prompts", "2", "--prompt-tokens", "8", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["perplexity"] == pytest.approx(report["final"]["perplexity"], rel=1e-4)  # same runtime, same blocks
    assert got["decode_tokens_per_s"] > 0 and got["prefill_tokens_per_s"] > 0 and got["ttft_ms"] > 0
    assert got["cold_start_ms"] >= got["load_ms"] > 0 and got["emulated"] is False
    assert got["prompts"] == 2 and got["new_tokens"] == 6 and [len(t) for t in got["tokens"]] == [6, 6]
    assert got["artifact_bytes"] == report["final"]["size_bytes"] and got["target"]["name"] == "cpu"
    assert "next_tokens" not in got and "decode" in capsys.readouterr().out
    from edgekd.bench.lm_cli import decoder_positions

    limit = report["final"]["decoder"]["max_positions"]  # the export writes it into the decoder's metadata
    assert decoder_positions(final) == decoder_positions(run / "model.fp32.onnx") == limit
    for extra, needle in (([], "a KV-cache decoder needs --eval-data"),
                          (["--eval-data", str(run / "eval.npz"), "--iterations", "5"], "takes --prompts, --prompt-tokens"),
                          (["--eval-data", str(run / "eval.npz"), "--prompt-tokens", "999"], "more than the blocks'"),
                          (["--eval-data", str(run / "eval.npz"), "--prompt-tokens", "8", "--new-tokens", str(limit)],
                           f"need {limit + 8} positions; {final.name} takes at most {limit}")):
        assert main(["bench", str(final), "--target", "cpu", *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    import numpy as np

    vocab = report["data"]["vocab_size"]
    for name, x, needle in (("neg", np.full((2, 8), -1), "token id -1 is outside 0.."),
                            ("oov", np.full((2, 8), vocab + 10), f"token id {vocab + 10} is outside"),
                            ("long", np.ones((2, limit + 4), np.int64), f"takes at most {limit} positions"),
                            ("short", np.ones((2, 1), np.int64), "at least 2 tokens")):
        np.savez(tmp_path / f"{name}.npz", x=x)
        assert main(["bench", str(final), "--target", "cpu", "--eval-data", str(tmp_path / f"{name}.npz"),
                     "--prompt-tokens", "1", "--new-tokens", "2"]) == 2, name
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_lm_gates_from_the_command_line(lm_run, capsys):
    from edgekd.cli import main

    report, run, _, _ = lm_run
    tps = report["final"]["decode_tokens_per_s"]
    ok = ["gate", str(run / "report.json"), "--min-decode-tokens-per-s", str(tps / 2), "--max-perplexity", "1e9",
          "--min-speculative-speedup", "0.001", "--max-memory-mb", "1e6"]
    assert main(["report", "validate", str(run / "report.json")]) == 0
    assert main(ok) == 0
    assert main(["gate", str(run / "report.json"), "--max-perplexity", "1.0"]) == 1
    assert "test perplexity" in capsys.readouterr().out
    assert main(["gate", str(run / "report.json"), "--max-memory-mb", "1"]) == 1
    assert "peak resident memory" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["intel-cpu", "raspberry-pi-5"])
def test_lm_run_on_openvino_and_the_pi_profile(lm_run, tmp_path, target):
    _, _, teacher, cache = lm_run
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEKD_CACHE", str(cache))
    try:
        cfg = lm_config(teacher, distill={"baseline": False, "steps": 5}, quantize={"weights": ["int8", "int4_mixed"]},
                        speculative={"prompts": 2})
        report = Pipeline(cfg, target=target, out=tmp_path / "run").run()
    finally:
        mp.undo()
    q = next(s for s in report["stages"] if s["name"] == "quantize")
    labels = " ".join(c["label"] for c in q["candidates"])
    assert ("NNCF" in labels) == (target == "intel-cpu") and {c["name"] for c in q["candidates"]} == {
        "fp32", "int8", "int4_mixed"}
    assert report["final"]["decode_tokens_per_s"] > 0 and report["speculative"]["identical"] == 2
    assert report["speculative"]["round"]["check_ms"] > 0  # the target's runtime timed each round's check
    draft = report["speculative"]["draft"]  # the cut draft in the target's own format (NNCF's IR on OpenVINO)
    assert draft["vocab_tokens"] == 200 and draft["artifact"].endswith(".xml" if target == "intel-cpu" else ".onnx")
    assert (tmp_path / "run" / draft["artifact"]).is_file()
    runtime = "openvino " if target == "intel-cpu" else "onnxruntime "  # memory from the target's own runtime
    assert report["final"]["peak_memory_mb"] > 10 and report["final"]["memory_runtime"].startswith(runtime)
    assert report["teacher"]["memory_runtime"].startswith(runtime)
    assert (tmp_path / "run" / "model.int8.onnx").is_file()
    export = next(s for s in report["stages"] if s["name"] == "export")  # OpenVINO: the infer request's states
    if target == "intel-cpu":
        assert export["kv_cache_update"] == "in place (OpenVINO states)"
        _generate_decodes_in_the_states(tmp_path / "run", report)
        bundle = report["final"]["bundle"]  # the board's app reads the IR with OpenVINO alone
        assert bundle["needs"] == ["numpy", "openvino", "tokenizers"] and bundle["roles"]["model"].endswith(".xml")
        got = _app(tmp_path / "run", tmp_path, "--prompt", "def f(x):", "--max-new-tokens", "6", "--speculative",
                   "--json", "ov.json")
        assert got.returncode == 0, got.stderr
        from edgekd.lm.generate import generate

        assert json.loads((tmp_path / "ov.json").read_text())["token_ids"] == generate(
            tmp_path / "run", "def f(x):", 6, speculative=True)["token_ids"]
    if target == "raspberry-pi-5":
        assert "not the board's speed" in report["final"]["measured_on_note"]
        assert "not the board's speed" in (tmp_path / "run" / "report.md").read_text()  # the reader sees it too


def _generate_decodes_in_the_states(run, report):
    """`edgekd generate` on an OpenVINO run decodes as the run measured: the cache in the infer request's
    states, its speculative output the teacher's own greedy output."""
    from edgekd.bench.lm_runner import StatefulKV
    from edgekd.lm.generate import generate
    from edgekd.lm.run_decoders import _decoder

    prompt = "def f(x):\n    return"
    spec = generate(run, prompt, 12, speculative=True, draft_tokens=2)
    closer, teacher = _decoder(run, {**report["teacher"], "_target": "intel-cpu"}, 1)
    try:
        assert isinstance(teacher.kv, StatefulKV) and teacher.empty_cache() == 0
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
        expect = teacher.greedy(tok.encode(prompt, add_special_tokens=False), 12)
    finally:
        closer.close()
    if tok.eos_token_id in expect:
        expect = expect[:expect.index(tok.eos_token_id)]
    assert spec["token_ids"] == expect and spec["draft_tokens"] == 2


def test_lm_on_a_jetson_profile_writes_the_board_bundle_and_measures_nothing_here(lm_run, tmp_path, monkeypatch,
                                                                                  capsys):
    import py_compile

    import numpy as np
    import onnx

    from edgekd.backends.tensorrt_bundle.trt_lm_decode import context_limits
    from edgekd.cli import main

    _, _, teacher, cache = lm_run
    monkeypatch.setenv("EDGEKD_CACHE", str(cache))
    cfg = tmp_path / "lm.yaml"  # JSON is YAML
    cfg.write_text(json.dumps(lm_raw(teacher, distill={"baseline": False, "steps": 5}, quantize={"weights": ["int8"]},
                                     gates={"max_perplexity_increase": None})))
    run = tmp_path / "run"
    assert main(["compress", "--config", str(cfg), "--target", "jetson", "--out", str(run)]) == 0, capsys.readouterr().err
    bundle = run / "target" / "jetson-lm"
    for name in ("model.onnx", "model.fp16.onnx", "teacher.onnx", "teacher.fp16.onnx", "build_engine.sh", "bundle.json",
                 "README.md", "trt_lm_runner.py", "trt_lm_decode.py", "lm_generation.py", "lm_figures.py", "trt_runner.py",
                 "trt_device.py", "generate.py", "lm_sampling.py", "lm_prompts.py",
                 "prompts.npz",
                 "eval.npz", "tokenizer/tokenizer.json"):
        assert (bundle / name).is_file(), name
    assert subprocess.run(["bash", "-n", str(bundle / "build_engine.sh")]).returncode == 0
    for name in ("trt_lm_runner.py", "trt_lm_decode.py", "lm_generation.py", "lm_figures.py", "generate.py"):
        py_compile.compile(str(bundle / name), doraise=True)
    # the trtexec shapes name every input of each exported decoder, with its KV heads and head size
    script = (bundle / "build_engine.sh").read_text()
    flags = [line.strip().strip("\\").strip().strip("'") for line in script.splitlines() if "Shapes=input_ids" in line]
    assert len(flags) == 9  # min, opt, max for the student, the teacher, then the student with its head cut
    limits = context_limits(32, 8, 8, 3, lookup=True)  # lookup auto: on, on a GPU copied guesses are nearly free
    for name, (lo, opt, hi) in zip(("model", "teacher", "draft"), (flags[:3], flags[3:6], flags[6:]), strict=True):
        graph = onnx.load(str(bundle / f"{name}.onnx")).graph
        dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
        shapes = [dict(p.split(":") for p in f.split("=", 1)[1].split(",")) for f in (lo, opt, hi)]
        assert [f.split("=")[0] for f in (lo, opt, hi)] == ["--minShapes", "--optShapes", "--maxShapes"]
        assert all(list(s) == list(dims) for s in shapes)  # the same inputs, in the graph's order
        for inp, d in dims.items():
            low, best, top = ([int(x) for x in s[inp].split("x")] for s in shapes)
            assert len(low) == len(d) and all(x == v for x, v in zip(top, d, strict=True) if isinstance(v, int))
            if inp == "input_ids":
                assert (low, best, top) == ([1, 1], [1, 1], [1, limits["max_input"]])
            else:  # (batch, kv_heads, past, head_dim): prefill passes no past, the longest context fits
                assert d[1:4:2] == [2, 8] and low[2] == 0 and top[2] == limits["max_context"] - 1 >= 8 + 8 + 3
    b = json.loads((bundle / "bundle.json").read_text())
    assert b["models"]["model"]["layers"] == 2 and b["models"]["teacher"]["layers"] == 4 and b["draft_tokens"] == 3
    assert b["lookup"] is True and b["max_input"] == limits["max_input"]
    assert np.load(bundle / "prompts.npz")["prompts"].shape == (3, 8)
    # the draft: the student with its LM head cut to the training split's 200 most frequent tokens, in FP16 too
    assert b["draft"] == "draft" and b["draft_vocab"] == 200 and "--draft draft.engine" in script
    # generate.py over the engines the board builds: each role's engine, positions within the profile
    app = b["app"]
    assert app["backend"] == "tensorrt" and app["tokenizer"]["file"] == "tokenizer/tokenizer.json"
    assert {r: app[r]["file"] for r in ("model", "draft", "teacher")} == {
        "model": "model.engine", "draft": "draft.engine", "teacher": "teacher.engine"}
    assert app["teacher"]["max_positions"] == limits["max_context"] - 9 and app["teacher"]["layers"] == 4
    for args, code, words in ((["--prompt", "def f(x):", "--max-new-tokens", "4"], 2,
                               "model.engine is not built yet: run ./build_engine.sh"),
                              (["--prompt", "x", "--speculative", "--max-new-tokens", "4"], 2,
                               "teacher.engine is not built yet"),
                              (["--prompt", "x", "--max-new-tokens", "500"], 2, "the model takes at most"),
                              (["--prompt", "x", "--chat"], 2, "need a chat template")):
        got = _app(run, tmp_path, *args, app="jetson-lm")
        assert got.returncode == code and words in got.stderr and "Traceback" not in got.stderr, got.stderr
    (bundle / "model.engine").write_bytes(b"built elsewhere")  # present, but this host has no TensorRT
    got = _app(run, tmp_path, "--prompt", "def f(x):", "--max-new-tokens", "4", app="jetson-lm")
    assert got.returncode == 3 and "tensorrt does not import" in got.stderr and "Traceback" not in got.stderr
    (bundle / "model.engine").unlink()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / "draft.fp16.onnx"))
    feeds = {i.name: (np.asarray([[5, 9, 14]], dtype=np.int64) if i.name == "input_ids"
                      else np.zeros((1, 2, 0, 8), dtype=np.float16)) for i in sess.get_inputs()}
    logits = np.asarray(sess.run(["logits"], feeds)[0], dtype=np.float32)
    assert logits.shape == (1, 3, 320) and np.isfinite(logits).all() and ((logits == -65504).sum(-1) == 120).all()
    # the report: what TensorRT would measure is null with the reason, nothing of ONNX Runtime under its name
    report = json.loads((run / "report.json").read_text())
    final, t, spec = report["final"], report["teacher"], report["speculative"]
    why = final["not_measured"]["decode_tokens_per_s"]
    assert why.startswith("TensorRT is not installed here; build the bundle on the board") and \
        "target/jetson-lm/build_engine.sh" in why
    for block in (final, t):
        for key in ("perplexity", "accuracy", "decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms", "tpot_ms",
                    "latency_ms", "peak_memory_mb", "measured_on"):
            assert block[key] is None and block["not_measured"][key] == why, key
        assert block["backend"] == "tensorrt" and block["precision"] == "fp16"
    assert final["speedup_vs_teacher"] is None and final["compression_vs_teacher"] > 1
    for key in ("acceptance_rate", "tokens_per_s", "teacher_tokens_per_s", "speedup", "identical"):
        assert spec[key] is None and spec["not_measured"][key] == why
    assert spec["draft"]["vocab_tokens"] == 200 and spec["draft"]["artifact"] == "target/jetson-lm/draft.fp16.onnx"
    assert spec["on_board"].endswith("--draft draft.engine")
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["teacher", "distill", "export", "quantize", "bench"]
    assert stages["export"]["parity"]["greedy_identical"] and stages["export"]["parity"]["checked_with"].startswith(
        "onnxruntime")
    assert stages["distill"]["perplexity"] is None and stages["distill"]["val_perplexity"] > 1
    assert "PyTorch" in stages["distill"]["measured_with"]
    q = stages["quantize"]
    assert [c["name"] for c in q["candidates"]] == ["fp16", "int8"] and q["choice"]["candidate"] == "fp16"
    assert not q["candidates"][1]["served"] and "TensorRT does not run" in q["candidates"][1]["not_measured"]["perplexity"]
    assert stages["bench"]["measured_on"] is None and (run / "model.int8.onnx").is_file()
    md = (run / "report.md").read_text()
    assert "not measured: TensorRT is not installed here" in md and "tok/s" not in md
    assert "not measured" in (run / "report.html").read_text()
    assert main(["report", "validate", str(run / "report.json")]) == 0
    if CHECK_RUN.is_file():
        res = subprocess.run([sys.executable, str(CHECK_RUN), str(run)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def f(x):"]) == 2  # the engines are built on the board
    err = capsys.readouterr().err
    assert "build its engines on the board" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("target, host, needle", [
    ("jetson", "pi@board", "the Jetson builds and times its own engines"),  # the bundle is measured on the board
    ("cpu", "emulate:aarch64", "emulated timing is never reported as speed"),
    ("cpu", "pi@bad host", "expected [user@]host[:port]"),
])
def test_lm_hosts_it_cannot_measure_on_are_one_clear_line(lm_run, tmp_path, capsys, target, host, needle):
    from edgekd.cli import main

    _, _, teacher, _ = lm_run
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(json.dumps(lm_raw(teacher)))
    assert main(["compress", "--config", str(cfg), "--target", target, "--host", host,
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra, needle", [
    ({"data": {"seq_len": 300}}, "data.seq_len 300: the teacher takes at most 256 positions"),
    ({"speculative": {"prompt_tokens": 8, "max_new_tokens": 250}},
     "speculative.prompt_tokens 8 + max_new_tokens 250: the teacher takes at most 256 positions"),
    ({"student": {"layers": 5}}, "student.layers 5: init teacher copies a subset of the teacher's 4 layers"),
    ({"stages": ["distill", "prune", "quantize"], "prune": {"target_params": 0.1}},
     "prune.target_params 0.1: narrowing the student's MLPs to 32 channels keeps 0.787 of its parameters"),
])
def test_lm_sizes_beyond_the_teacher_are_one_clear_line(lm_run, tmp_path, capsys, extra, needle):
    from edgekd.cli import main

    _, _, teacher, _ = lm_run
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(json.dumps(lm_raw(teacher, **extra)))
    assert main(["compress", "--config", str(cfg), "--target", "cpu", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("edgekd: error:")]  # after the progress lines
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err
    assert not (tmp_path / "r" / "report.json").exists()
    assert not (tmp_path / "r" / "stages" / "distill" / "done.json").exists()  # before any training


def test_a_teacher_the_export_cannot_write_stops_before_any_training(tmp_path, capsys):
    from edgekd.cli import main

    teacher = tiny_llama_dir(tmp_path / "dynamic", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                      "rope_theta": 10000.0})
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(json.dumps(lm_raw(teacher)))
    assert main(["compress", "--config", str(cfg), "--target", "cpu", "--out", str(tmp_path / "r")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("edgekd: error:")]
    assert len(errors) == 1 and "rope type 'dynamic' changes with the sequence length" in errors[0]
    assert not (tmp_path / "r" / "stages" / "distill" / "done.json").exists()
    assert not (tmp_path / "r" / "report.json").exists()


def test_onnx_runtime_targets_get_the_fused_attention_graph(tmp_path):
    import onnx

    teacher = tiny_llama_dir(tmp_path / "teacher", hidden_size=64)  # head size 16: GroupQueryAttention takes it
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEKD_CACHE", str(tmp_path / "cache"))
    try:
        cfg = lm_config(teacher, quantize={"weights": ["int8"]}, distill={"baseline": False, "steps": 5},
                        speculative={"prompts": 2})
        report = Pipeline(cfg, target="cpu", out=tmp_path / "run").run()
    finally:
        mp.undo()
    export = next(s for s in report["stages"] if s["name"] == "export")
    assert export["attention"].startswith("fused") and export["parity"]["greedy_identical"]
    assert export["kv_cache_update"] == "in place"  # the fused graph's kv_length: one buffer per layer, no copies
    for name in ("model.fp32.onnx", "teacher.fp32.onnx", "model.int8.onnx"):
        assert "GroupQueryAttention" in {n.op_type for n in onnx.load(str(tmp_path / "run" / name)).graph.node}
    assert report["speculative"]["identical"] == 2 and report["final"]["decode_tokens_per_s"] > 0


def test_the_draft_vocabulary_bench_times_whole_and_cut_heads_on_a_finished_run(lm_run, tmp_path):
    _, run, _, cache = lm_run
    out = tmp_path / "dvb.json"
    env = {**os.environ, "EDGEKD_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "draft_vocab_bench.py"), "--run", str(run), "--vocab",
                          "0", "100", "--prompts", "2", "--new-tokens", "6", "--setting", "2:0:0", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["prompts"] == 2 and got["prompt_rows"] == "spread" and got["teacher_tokens_per_s"] > 0
    whole, cut = got["rows"]
    assert (whole["vocab_tokens"], cut["vocab_tokens"]) == (320, 100)
    assert whole["identical"] == cut["identical"] == 2 and cut["speedup"] > 0 and 0 <= cut["acceptance_rate"] <= 1
    assert whole["train_coverage"] == 100.0 and 0 < cut["train_coverage"] < 100.0
    assert "| 100 tokens | up to 2 |" in res.stdout
    other = tmp_path / "other"  # another run of the same teacher and data drafts in the same rounds
    shutil.copytree(run, other)
    res2 = subprocess.run([sys.executable, str(ROOT / "tools" / "draft_vocab_bench.py"), "--run", str(run), "--vocab",
                           "0", "--prompts", "2", "--new-tokens", "6", "--setting", "2:0:0", "--drafts-from",
                           str(other), "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res2.returncode == 0, res2.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["draft"] for r in rows] == [run.name, "other"] and all(r["identical"] == 2 for r in rows)
    assert rows[0]["acceptance_rate"] == rows[1]["acceptance_rate"]  # the same decoder, the same guesses
    assert "| other: whole vocabulary | up to 2 |" in res2.stdout
    sampled = subprocess.run([sys.executable, str(ROOT / "tools" / "draft_vocab_bench.py"), "--run", str(run),
                              "--vocab", "0", "--prompts", "2", "--new-tokens", "6", "--setting", "2:0:0",
                              "--temperature", "0.8", "--top-p", "0.9", "--json", str(out)],
                             capture_output=True, text=True, env=env, timeout=600)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    got = json.loads(out.read_text())  # speculative sampling: distributed as the teacher's, never counted identical
    assert got["sampling"] == {"temperature": 0.8, "top_k": 0, "top_p": 0.9} and got["rows"][0]["identical"] is None
    assert 0 <= got["rows"][0]["acceptance_rate"] <= 1 and "sampled at temperature 0.8" in sampled.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "draft_vocab_bench.py"), "--run", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "has no report.json" in bad.stderr and "Traceback" not in bad.stderr
