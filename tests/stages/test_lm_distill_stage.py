"""The causal-LM distill stage with sequence-level KD and on-policy steps: the entry says what the
student trained on, the teacher's text is reused by a second run, and the CE baseline keeps the real text."""
import pytest
import torch

pytest.importorskip("transformers")

from edgekd.config.profiles import load_profile  # noqa: E402
from edgekd.context import RunContext  # noqa: E402
from edgekd.distill.lm_stage import run_lm_distill  # noqa: E402
from edgekd.lm.models import build_lm_student, load_lm  # noqa: E402
from edgekd.lm.student_stage import text_splits  # noqa: E402
from tests.e2e.test_compress_lm import lm_config  # noqa: E402
from tests.lm_fixtures import tiny_llama_dir  # noqa: E402


def test_sequence_kd_and_on_policy_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "cache"))
    teacher_dir = tiny_llama_dir(tmp_path / "teacher")
    cfg = lm_config(teacher_dir, distill={"steps": 4, "sequence_kd": 8, "on_policy": 0.5})
    ctx = RunContext(cfg, load_profile("cpu"), tmp_path / "run", threads=1)
    loaded = load_lm(str(teacher_dir))
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    splits = text_splits(ctx, loaded.tokenizer)
    student, _ = build_lm_student(loaded.model, cfg.student.lm_sizes(), "teacher", 0)
    _, metrics, baseline = run_lm_distill(ctx, loaded.model, "k", student, splits)
    seq = metrics["sequence_kd"]
    assert seq["new_tokens"] == 8 and seq["prompt_tokens"] == 24 and seq["blocks"] == len(splits.train)
    assert seq["reused"] is False
    assert metrics["on_policy"]["share"] == 0.5 and 0 <= metrics["on_policy"]["steps"] <= 4
    assert metrics["on_policy"]["sampled_tokens"] == 8
    assert metrics["teacher_cache"]["batches"] == -(-len(splits.train) // 8)  # the cache is over the teacher's text
    assert baseline is not None and metrics["baseline"]["steps"] == 4
    student2, _ = build_lm_student(loaded.model, cfg.student.lm_sizes(), "teacher", 0)
    _, again, _ = run_lm_distill(ctx, loaded.model, "k", student2, splits)
    assert again["sequence_kd"]["reused"] is True and again["teacher_cache"]["reused"] is True
    assert torch.equal(splits.train.ids, text_splits(ctx, loaded.tokenizer).train.ids)  # the text itself is untouched


@pytest.mark.parametrize("allow", [False, True])
def test_a_student_that_diverges_stops_the_run_or_keeps_its_initial_weights_with_a_note(tmp_path, monkeypatch, allow):
    from edgekd.config import from_dict
    from edgekd.errors import StageError
    from tests.e2e.test_compress_lm import lm_raw

    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "cache"))
    teacher_dir = tiny_llama_dir(tmp_path / "teacher")
    cfg = from_dict({**lm_raw(teacher_dir, distill={"steps": 4, "lr": 10.0}), "allow_collapse": allow})
    ctx = RunContext(cfg, load_profile("cpu"), tmp_path / "run", threads=1)
    loaded = load_lm(str(teacher_dir))
    splits = text_splits(ctx, loaded.tokenizer)
    student, _ = build_lm_student(loaded.model, cfg.student.lm_sizes(), "teacher", 0)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    if not allow:
        with pytest.raises(StageError, match=r"never bettered its initial validation perplexity .* training diverged; "
                                             r"lower distill.lr \(now 10\)"):
            run_lm_distill(ctx, loaded.model, "k", student, splits)
        return
    student, metrics, _ = run_lm_distill(ctx, loaded.model, "k", student, splits)
    assert metrics["best_step"] == 0 and metrics["kept_initial_weights"] is True
    assert all(torch.equal(v, initial[k]) for k, v in student.state_dict().items())
    assert any("keeps its initial weights: training diverged at distill.lr 10" in n for n in ctx.notes)
