"""task: causal-lm in the config: its defaults, its keys, and LM keys refused on the image task."""
import pytest

from edgekd.config import from_dict, load_config
from edgekd.errors import ConfigError


def test_causal_lm_defaults():
    c = from_dict({"task": "causal-lm", "student": {"layers": 4, "hidden_size": 256}})
    assert (c.teacher.model, c.data.dataset, c.student.model) == ("smollm2-135m", "text", "teacher")
    assert c.student.lm_sizes() == {"layers": 4, "hidden_size": 256} and c.student.init == "teacher"
    assert c.distill.sweep is None and c.distill.loss == "forward_kl" and c.stages == ["distill", "quantize"]
    assert c.quantize.weights == ["int8", "int4", "int4_mixed"] and c.quantize.max_perplexity_increase == 10.0
    assert from_dict({}).task == "image-classification" and from_dict({}).distill.sweep  # the image task unchanged


@pytest.mark.parametrize("raw, words", [
    ({"student": {"layers": 4}}, "student.layers is read only with task: causal-lm"),
    ({"distill": {"loss": "jsd"}}, "distill.loss is read only with task: causal-lm"),
    ({"data": {"dataset": "text"}}, "data.dataset text needs task: causal-lm"),
    ({"speculative": {"draft_tokens": 4}}, "speculative is read only with task: causal-lm"),
    ({"gates": {"max_perplexity": 30}}, "gates.max_perplexity is read only with task: causal-lm"),
    ({"task": "causal-lm", "prune": {"target_speedup": 2}}, "prune.target_speedup is for image classifiers"),
    ({"task": "causal-lm", "prune": {"finetune_epochs": 3}}, "prune.finetune_epochs is for image classifiers"),
    ({"task": "causal-lm", "prune": {"criterion": "taylor"}}, "prune.criterion taylor is for image classifiers"),
    ({"prune": {"finetune_steps": 10}}, "prune.finetune_steps is read only with task: causal-lm"),
    ({"prune": {"max_perplexity_increase": 5}}, "prune.max_perplexity_increase is read only with task: causal-lm"),
    ({"prune": {"criterion": "activation"}}, "prune.criterion activation is read only with task: causal-lm"),
    ({"task": "causal-lm", "data": {"dataset": "digits"}}, "data.dataset must be text"),
    ({"task": "causal-lm", "student": {"model": "edge_cnn"}}, "student.model must be teacher"),
    ({"task": "causal-lm", "data": {"files": []}}, "data.files is empty"),
    ({"task": "causal-lm", "distill": {"beta": 1.5}}, "distill.beta"),
    ({"task": "chat"}, "task"),
    ({"task": "causal-lm", "speculative": {"draft_tokens": 0}},
     "speculative.draft_tokens: Input should be greater than or equal to 1 or Input should be 'auto'$"),
    ({"task": "causal-lm", "speculative": {"min_confidence": 1.0}}, "speculative.min_confidence: Input should be less"),
    ({"task": "causal-lm", "speculative": {"lookup": "sometimes"}}, "speculative.lookup: Input should be a valid boolean"),
    ({"task": "causal-lm", "data": {"seq_len": 64}, "speculative": {"prompt_tokens": 65}},
     "speculative.prompt_tokens 65 is more than data.seq_len 64"),
    ({"task": "causal-lm", "teacher": {"checkpoint": "w.pt"}}, "teacher.checkpoint is for image classifiers"),
    ({"task": "causal-lm", "quantize": {"calibration_samples": 64}}, "quantize.calibration_samples is for image"),
    ({"task": "causal-lm", "data": {"image_size": 64}}, "data.image_size is for image classifiers"),
    ({"task": "causal-lm", "distill": {"epochs": 0}}, "distill.epochs 0 trains nothing"),
    ({"quantize": {"weights": ["int4"]}}, "quantize.weights is read only with task: causal-lm"),
    ({"data": {"seq_len": 128}}, "data.seq_len is read only with task: causal-lm"),
])
def test_keys_that_do_not_fit_the_task_are_config_errors(raw, words):
    with pytest.raises(ConfigError, match=words):
        from_dict(raw)


def test_text_files_and_a_gguf_teacher_are_relative_to_the_config_file(tmp_path):
    cfg = tmp_path / "lm.yaml"
    cfg.write_text("task: causal-lm\ndata: {files: ['corpus/*.txt', '/abs/x.txt']}\n"
                   "teacher: {model: 'gguf:models/m.gguf'}\n")
    c = load_config(cfg)
    assert c.data.files == [str(tmp_path / "corpus/*.txt"), "/abs/x.txt"]
    assert c.teacher.model == f"gguf:{tmp_path / 'models/m.gguf'}"


def test_image_cache_keys_leave_the_lm_keys_out():
    c = from_dict({})
    assert not {"seq_len", "max_train_tokens", "max_eval_tokens"} & set(c.data.key_dump())
    assert not {"loss", "beta"} & set(c.distill.key_dump())
    assert c.data.key_dump()["dataset"] == "digits" and "temperature" in c.distill.key_dump()
    lm = from_dict({"task": "causal-lm"})
    assert lm.data.key_dump()["seq_len"] == 256


def test_a_causal_lm_prunes_by_activation_within_a_perplexity_budget():
    c = from_dict({"task": "causal-lm", "stages": ["distill", "prune", "quantize"], "prune": {"ratio": 0.5}})
    assert (c.prune.criterion, c.prune.max_perplexity_increase, c.prune.amount()) == ("activation", 10.0, ("ratio", 0.5))
    assert (c.prune.lr, c.prune.kd_alpha) == (1e-4, 0.5)  # a fine-tune of a distilled student
    assert from_dict({"task": "causal-lm", "prune": {"lr": 1e-3}}).prune.lr == 1e-3
    assert from_dict(c.model_dump(mode="json")) == c
    image = from_dict({})
    assert image.prune.criterion == "l2" and not {"finetune_steps", "max_perplexity_increase"} & set(image.prune.key_dump())


def test_saved_configs_load_again():
    for raw in ({}, {"task": "causal-lm", "student": {"layers": 2}}):
        c = from_dict(raw)
        assert from_dict(c.model_dump(mode="json")) == c


def test_speculative_auto_is_written_and_read_back():
    c = from_dict({"task": "causal-lm", "speculative": {"draft_tokens": "auto", "min_confidence": 0.3}})
    assert (c.speculative.draft_tokens, c.speculative.min_confidence) == ("auto", 0.3)
    again = from_dict(c.model_dump(mode="json"))  # what report.json's config holds, read again by the tools
    assert (again.speculative.draft_tokens, again.speculative.min_confidence) == ("auto", 0.3)
    assert from_dict({"task": "causal-lm", "speculative": {"draft_tokens": 3}}).speculative.min_confidence == "auto"
    assert from_dict({"task": "causal-lm", "speculative": {}}).speculative.lookup == "auto"
    off = from_dict({"task": "causal-lm", "speculative": {"lookup": False}})
    assert off.speculative.lookup is False and from_dict(off.model_dump(mode="json")).speculative.lookup is False


def test_every_example_config_loads():
    from edgekd.config import load_config
    from tests.conftest import ROOT

    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(examples) >= 2
    for path in examples:
        cfg = load_config(path)
        assert cfg.name, path
    chat = load_config(ROOT / "examples" / "smollm2-chat.yaml")  # the splits named, relative to the config file
    assert chat.data.files.train == [str(ROOT / "examples" / "../data/chat/train.jsonl")]
