"""LM teacher loading (a Hugging Face directory, bad specs) and student building from the teacher."""
import pytest
import torch

pytest.importorskip("transformers")

from edgekd.errors import ModelError  # noqa: E402
from edgekd.lm.models import build_lm_student, count_lm_params, lm_layers, load_lm  # noqa: E402
from tests.lm_fixtures import tiny_llama_dir  # noqa: E402


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("lm") / "teacher")


def test_loads_a_model_directory_with_its_tokenizer(teacher_dir):
    lm = load_lm(str(teacher_dir))
    assert lm.source.startswith("directory") and not lm.model.training
    ids = lm.tokenizer.encode("def f(x):\n    return x\n", add_special_tokens=False)
    assert ids and lm.tokenizer.decode(ids) == "def f(x):\n    return x\n"
    logits = lm.model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(lm.tokenizer))


@pytest.mark.parametrize("spec, words", [("gguf:/nonexistent/m.gguf", "no GGUF file at /nonexistent/m.gguf"),
                                         ("/nonexistent/dir", "not a Hugging Face model directory")])
def test_bad_teacher_specs_name_the_path(spec, words):
    with pytest.raises(ModelError, match=words):
        load_lm(spec)


def test_student_from_teacher_copies_embeddings_and_spaced_layers(teacher_dir):
    teacher = load_lm(str(teacher_dir)).model
    student, info = build_lm_student(teacher, {"layers": 2}, init="teacher")
    assert info["layers_from_teacher"] == [0, 3] and info["embeddings"] == "copied"
    assert len(lm_layers(student)) == 2 and count_lm_params(student) < count_lm_params(teacher)
    for s_i, t_i in enumerate([0, 3]):
        for (name, a), (_, b) in zip(lm_layers(student)[s_i].state_dict().items(),
                                     lm_layers(teacher)[t_i].state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    # the same tokenizer and vocabulary: logits line up token for token
    x = torch.randint(0, teacher.config.vocab_size, (2, 8))
    assert student(x).logits.shape == teacher(x).logits.shape


def test_smaller_hidden_size_projects_embeddings_and_starts_layers_fresh(teacher_dir):
    teacher = load_lm(str(teacher_dir)).model
    student, info = build_lm_student(teacher, {"layers": 2, "hidden_size": 16, "heads": 2, "kv_heads": 1,
                                               "intermediate_size": 32})
    assert info["layers_from_teacher"] == [] and "principal" in info["embeddings"]
    assert student.config.hidden_size == 16 and student.config.head_dim == 8
    assert student.get_input_embeddings().weight.shape == (teacher.config.vocab_size, 16)
    scratch, info = build_lm_student(teacher, {"layers": 2}, init="scratch")
    assert info == {"init": "scratch", "config": info["config"]} and info["config"]["layers"] == 2
    assert not torch.equal(scratch.get_input_embeddings().weight, teacher.get_input_embeddings().weight)


def test_bad_student_sizes_are_model_errors(teacher_dir):
    teacher = load_lm(str(teacher_dir)).model
    with pytest.raises(ModelError, match="hidden_size 30 is not a multiple of heads 4"):
        build_lm_student(teacher, {"hidden_size": 30})
    with pytest.raises(ModelError, match="heads of 5 dimensions; rotary positions need an even head size"):
        build_lm_student(teacher, {"hidden_size": 20})
    with pytest.raises(ModelError, match="heads 4 is not a multiple of kv_heads 3"):
        build_lm_student(teacher, {"kv_heads": 3})
    with pytest.raises(ModelError, match="not an LM size"):
        build_lm_student(teacher, {"depth": 2})
    with pytest.raises(ModelError, match="student.init"):
        build_lm_student(teacher, {}, init="random")
    with pytest.raises(ModelError, match="student.layers 5: init teacher copies a subset of the teacher's 4 layers"):
        build_lm_student(teacher, {"layers": 5})
    with pytest.raises(ModelError, match="more than the teacher's"):
        build_lm_student(teacher, {"layers": 5}, init="scratch")
    with pytest.raises(ModelError, match="more than the teacher's"):
        build_lm_student(teacher, {"layers": 4, "intermediate_size": 96})
    same, _ = build_lm_student(teacher, {"layers": 4})  # the teacher's own size: allowed (born-again KD)
    assert sum(p.numel() for p in same.parameters()) == sum(p.numel() for p in teacher.parameters())


def test_greedy_layer_choice_drops_the_cheapest_layer_each_time_and_leaves_the_teacher_whole(teacher_dir):
    import math

    from edgekd.lm.models import choice_trials, choose_layers

    teacher = load_lm(str(teacher_dir)).model
    torch.manual_seed(0)
    blocks = torch.randint(0, teacher.config.vocab_size, (2, 12))
    before = teacher(input_ids=blocks).logits

    def ppl_of(layers):
        student, info = build_lm_student(teacher, {"layers": len(layers)}, "teacher", layers=layers)
        assert info["layers_from_teacher"] == layers
        logits = student.eval()(input_ids=blocks, use_cache=False).logits[:, :-1]
        return math.exp(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())))

    ticks = []
    keep, removals = choose_layers(teacher, 2, blocks, lambda: ticks.append(1))
    assert len(keep) == 2 and keep == sorted(keep) and len(removals) == 2
    assert len(ticks) == choice_trials(4, 2) == 4 + 3  # a progress tick per subset scored
    assert sorted(keep + [r["dropped"] for r in removals]) == [0, 1, 2, 3]
    # the first removal is the cheapest of the four single-layer removals, and its perplexity is a student's
    singles = {d: ppl_of([k for k in range(4) if k != d]) for d in range(4)}
    assert removals[0]["dropped"] == min(singles, key=singles.get)
    assert removals[0]["perplexity"] == pytest.approx(singles[removals[0]["dropped"]], rel=1e-4)
    assert removals[1]["perplexity"] == pytest.approx(ppl_of(keep), rel=1e-4)
    assert len(lm_layers(teacher)) == 4 and torch.equal(teacher(input_ids=blocks).logits, before)
    with pytest.raises(ModelError, match="cannot copy teacher layers"):
        build_lm_student(teacher, {"layers": 2}, "teacher", layers=[0, 9])
