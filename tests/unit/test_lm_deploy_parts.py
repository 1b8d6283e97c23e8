"""LM weight quantization in ONNX Runtime (INT8 per channel, INT4 MatMulNBits), the generation bench and
lossless speculative decoding, on a tiny Llama exported with its KV cache."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from edgekd.backends import get_backend  # noqa: E402
from edgekd.bench.lm_bench import choose_speculation, generation_bench, speculative_bench  # noqa: E402
from edgekd.config.profiles import load_profile  # noqa: E402
from edgekd.distill.lm_trainer import train_lm  # noqa: E402
from edgekd.lm.decode import Decoder  # noqa: E402
from edgekd.lm.export import export_lm_onnx  # noqa: E402
from edgekd.lm.models import build_lm_student, load_lm  # noqa: E402
from edgekd.lm.speculative import LOOKUP_TOKENS, context_lookup, draft_token, speculative_greedy  # noqa: E402
from edgekd.quantize.lm_weights import eight_bit_matmuls, quantize_lm_weights  # noqa: E402
from tests.lm_fixtures import tiny_llama_dir  # noqa: E402


def _decoder(path, config, tmp, name):
    profile, backend = load_profile("cpu"), get_backend("onnxruntime")
    runner = backend.load(backend.compile(path, profile, tmp / name, name.split("-")[0]), profile, 1)
    return Decoder(runner.run, config, config.num_hidden_layers)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmq")
    teacher = load_lm(str(tiny_llama_dir(tmp / "teacher", hidden_size=64, intermediate_size=128))).model
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, teacher.config.vocab_size, (8, 6), generator=g).repeat(1, 6)  # periodic: learnable
    train_lm(teacher, text, text[:2], steps=150, lr=1e-2, batch_size=4, seed=0, alpha=0.0)
    fp32 = export_lm_onnx(teacher, tmp / "fp32.onnx")
    return teacher, text, tmp, fp32


@pytest.mark.parametrize("weights, bits", [("int8", 8), ("int4", 4), ("int4_mixed", 4)])
def test_weight_quantization_keeps_perplexity_and_greedy_tokens(models, weights, bits):
    import onnx

    teacher, text, tmp, fp32 = models
    q = quantize_lm_weights(fp32, tmp / f"{weights}.onnx", weights)
    nodes = onnx.load(str(q)).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert nbits and not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in nodes)
    kept = set(eight_bit_matmuls(onnx.load(str(fp32)))) if weights == "int4_mixed" else set()
    for n in nbits:  # weight-only, k bits; int4_mixed's narrowing projections and LM head in 8
        assert next(a.i for a in n.attribute if a.name == "bits") == (8 if n.name.removesuffix("_Q8") in kept else bits)
    # the tied model's token embedding reads the quantized LM head's own blocks (its table is gone from the
    # file); the rotary tables stay float
    embedding = [n for n in nodes if n.op_type == "GatherBlockQuantized"]
    head = next(n for n in nodes if "logits" in n.output)
    assert [n.input[:2] for n in embedding] == [[head.input[1], "input_ids"]]  # the head's weight itself
    assert next(a.i for a in embedding[0].attribute if a.name == "bits") == next(
        a.i for a in head.attribute if a.name == "bits")
    assert not [n for n in nodes if n.op_type == "Gather" and n.input[1:2] == ["input_ids"]]  # no float table
    assert q.stat().st_size < (0.4 if bits == 8 else 0.3) * fp32.stat().st_size  # one table for both, quantized
    served = get_backend("onnxruntime").compile(q, load_profile("cpu"), tmp / f"{weights}-served", weights)
    assert served.size_bytes() < 1.02 * q.stat().st_size  # ONNX Runtime's optimized graph does not copy it back
    ref = _decoder(fp32, teacher.config, tmp, "fp32-ref")
    got = _decoder(q, teacher.config, tmp, f"{weights}-c")
    blocks = text[:4].numpy()
    assert got.perplexity(blocks) == pytest.approx(ref.perplexity(blocks), rel=0.1)
    # where FP32 is clear about the next token (its top score leads by 2), the quantized model agrees; the
    # tiny model's other positions are near ties that any rounding flips
    ref_logits, _ = ref.forward(blocks, ref.empty_cache(len(blocks)))
    got_logits, _ = got.forward(blocks, got.empty_cache(len(blocks)))
    top2 = np.sort(ref_logits, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2.0
    assert clear.sum() >= 20
    assert (ref_logits.argmax(-1) == got_logits.argmax(-1))[clear].mean() >= 0.95


def test_an_untied_model_keeps_its_own_embedding_table(tmp_path):
    import onnx

    from edgekd.quantize.lm_weights import embedding_shares_head

    untied = load_lm(str(tiny_llama_dir(tmp_path / "untied", hidden_size=64, tie_word_embeddings=False))).model
    fp32 = export_lm_onnx(untied, tmp_path / "fp32.onnx")
    assert not embedding_shares_head(onnx.load(str(fp32)))
    nodes = onnx.load(str(quantize_lm_weights(fp32, tmp_path / "int4.onnx", "int4"))).graph.node
    embedding = next(n for n in nodes if n.op_type == "GatherBlockQuantized")
    assert embedding.input[0] == next(n for n in onnx.load(str(fp32)).graph.node if n.op_type == "Gather"
                                      and n.input[1:2] == ["input_ids"]).input[0] + "_Q4"  # its own 4-bit table
    assert not [n for n in nodes if n.op_type == "MatMulNBits" and embedding.input[0] in n.input]


def test_int4_mixed_keeps_the_head_and_the_narrowing_projections_in_8_bits(models):
    import onnx

    teacher, _, tmp, fp32 = models
    cfg = teacher.config
    model = onnx.load(str(fp32))
    tables = {i.name: list(i.dims) for i in model.graph.initializer}
    kept = eight_bit_matmuls(model)
    shapes = [next(tables[i] for i in n.input if i in tables) for n in model.graph.node if n.name in kept]
    layers, kv = cfg.num_hidden_layers, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    # per layer the down projection (intermediate -> hidden) and the key and value projections (hidden -> kv),
    # once the LM head (hidden -> vocab); the query, output, gate and up projections go to 4 bits
    expect = [[cfg.intermediate_size, cfg.hidden_size]] * layers + [[cfg.hidden_size, kv]] * 2 * layers
    expect += [[cfg.hidden_size, cfg.vocab_size]]
    assert sorted(shapes) == sorted(expect)
    q = onnx.load(str(quantize_lm_weights(fp32, tmp / "mixed.onnx", "int4_mixed")))
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in q.graph.node if n.op_type == "MatMulNBits"}
    assert sorted(bits.values()).count(8) == len(kept) and sorted(bits.values()).count(4) == 4 * layers
    consts = {i.name for i in q.graph.initializer}
    assert not [n for n in q.graph.node if n.op_type == "MatMul" and consts & set(n.input)]  # every weight quantized


def test_generation_bench_figures(models):
    teacher, text, tmp, fp32 = models
    dec = _decoder(fp32, teacher.config, tmp, "fp32-bench")
    prompts = [text[i, :8].tolist() for i in range(3)]
    figs = generation_bench({"a": dec, "b": dec}, prompts, new_tokens=6, rounds=2)
    for f in figs.values():
        assert f["runs"] == 6 and f["new_tokens"] == 6
        assert f["decode_tokens_per_s"] > 0 and f["prefill_tokens_per_s"] > 0 and f["ttft_ms"] > 0
        assert 0 < f["tpot_ms"]["p50"] <= f["tpot_ms"]["p90"] <= f["tpot_ms"]["p99"]
        assert f["decode_tokens_per_s"] == pytest.approx(1000 / np.mean([f["tpot_ms"]["p50"]]), rel=1.0)


def test_speculative_decoding_is_the_targets_greedy_output(models):
    teacher, text, tmp, fp32 = models
    target = _decoder(fp32, teacher.config, tmp, "fp32-target")
    prompt = text[1, :7].tolist()
    expect = target.greedy(prompt, 20)
    same = speculative_greedy(target, target, prompt, 20, draft_tokens=4)  # a perfect draft
    assert same.tokens == expect and same.acceptance_rate == 1.0 and same.target_passes < 20
    other, _ = build_lm_student(teacher, {"layers": 1}, init="scratch", seed=5)
    draft = _decoder(export_lm_onnx(other, tmp / "draft.onnx"), other.config, tmp, "fp32-draft")
    for k in (1, 3, 8):
        res = speculative_greedy(target, draft, prompt, 20, draft_tokens=k)
        assert res.tokens == expect and len(res.tokens) == 20 and 0 <= res.acceptance_rate <= 1
    figs = speculative_bench(target, target, [text[i, :7].tolist() for i in range(2)], 12, 4)
    assert figs["identical"] == 2 and figs["prompts"] == 2 and figs["acceptance_rate"] == 1.0
    assert figs["tokens_per_s"] > 0 and figs["teacher_tokens_per_s"] > 0 and figs["speedup"] > 0
    # a round: 11 tokens after the first in 3 checks (4 kept + the target's own, twice, then the 1 left)
    assert figs["round"]["tokens"] == pytest.approx(11 / 3, abs=1e-3)
    assert figs["round"]["check_ms"] > 0 and figs["round"]["draft_ms"] > 0 and figs["teacher_token_ms"] > 0
    alone = speculative_bench(target, draft, [prompt], 12, 0, lookup=True)  # no draft passes in any round
    assert alone["round"]["draft_ms"] == 0 and alone["round"]["tokens"] >= 1


def test_speculative_decoding_stops_at_the_end_token_as_greedy_does(models):
    teacher, text, tmp, fp32 = models
    target = _decoder(fp32, teacher.config, tmp, "fp32-eos")
    other, _ = build_lm_student(teacher, {"layers": 1}, init="scratch", seed=5)
    draft = _decoder(export_lm_onnx(other, tmp / "draft-eos.onnx"), other.config, tmp, "fp32-deos")
    prompt = text[3, :7].tolist()
    full = target.greedy(prompt, 20)
    for eos in (full[0], full[6], full[13]):  # the first token, one inside a round, a later one
        expect = target.greedy(prompt, 20, eos=eos)
        assert expect[-1] == eos and len(expect) == full.index(eos) + 1
        for d, k in ((target, 4), (draft, 3)):  # a perfect draft keeps whole rounds; another is cut mid-round
            res = speculative_greedy(target, d, prompt, 20, draft_tokens=k, eos=eos)
            assert res.tokens == expect
        assert speculative_greedy(target, draft, prompt, 20, draft_tokens=0, lookup=True, eos=eos).tokens == expect


def test_draft_token_keeps_only_a_guess_as_likely_as_the_floor():
    logits = np.log(np.array([0.1, 0.6, 0.3], dtype=np.float32))
    assert draft_token(logits, 0.0) == 1 and draft_token(logits, 0.59) == 1
    assert draft_token(logits, 0.61) is None  # p(top) = 0.6
    assert draft_token(np.array([0.0, 0.0, 0.0]), 0.34) is None and draft_token(np.array([0.0, 0.0, 0.0]), 0.33) == 0


def test_a_confidence_floor_drafts_less_and_stays_lossless(models):
    teacher, text, tmp, fp32 = models
    target = _decoder(fp32, teacher.config, tmp, "fp32-floor")
    other, _ = build_lm_student(teacher, {"layers": 1}, init="teacher", seed=5)
    draft = _decoder(export_lm_onnx(other, tmp / "draft-floor.onnx"), other.config, tmp, "fp32-dfloor")
    prompt = text[2, :7].tolist()
    expect = target.greedy(prompt, 20)
    drafted = []
    for floor in (0.0, 0.5, 0.999999):
        res = speculative_greedy(target, draft, prompt, 20, draft_tokens=4, min_confidence=floor)
        assert res.tokens == expect  # lossless at any floor
        drafted.append(res.drafted)
    assert drafted[0] >= drafted[1] >= drafted[2] and drafted[0] > drafted[2]
    silent = speculative_greedy(target, draft, prompt, 20, draft_tokens=4, min_confidence=0.999999)
    if silent.drafted == 0:  # no proposal at all: every round is one plain step of the target
        assert silent.target_passes == 20


def test_the_speculation_choice_times_every_pair_and_keeps_the_fastest(models):
    teacher, text, tmp, fp32 = models
    target = _decoder(fp32, teacher.config, tmp, "fp32-choice")
    prompts = [text[i, :7].tolist() for i in range(3)]
    got = choose_speculation(target, target, prompts, 10, (1, 3), (0.0, 0.5), (False, True))
    tried = [(t["draft_tokens"], t["min_confidence"], t["lookup"]) for t in got["tried"]]
    assert tried == [(k, c, u) for u in (False, True) for k in (1, 3) for c in (0.0, 0.5)] and got["prompts"] == 3
    assert all(t["tokens_per_s"] > 0 and 0 <= t["acceptance_rate"] <= 1 for t in got["tried"])
    best = max(got["tried"], key=lambda t: t["tokens_per_s"])
    assert [got[k] for k in ("draft_tokens", "min_confidence", "lookup")] == [
        best[k] for k in ("draft_tokens", "min_confidence", "lookup")]
    assert got["teacher_tokens_per_s"] > 0
    figs = speculative_bench(target, target, prompts[:2], 10, got["draft_tokens"], got["min_confidence"])
    assert figs["identical"] == 2 and figs["min_confidence"] == got["min_confidence"]


def test_the_speculation_choice_times_its_finalists_on_every_prompt(models):
    from edgekd.bench.lm_figures import FINALISTS, SELECTION_FIRST

    teacher, text, tmp, fp32 = models
    target = _decoder(fp32, teacher.config, tmp, "fp32-final")
    other, _ = build_lm_student(teacher, {"layers": 1}, init="teacher", seed=5)
    draft = _decoder(export_lm_onnx(other, tmp / "draft-final.onnx"), other.config, tmp, "fp32-dfinal")
    prompts = [text[i, :7].tolist() for i in range(SELECTION_FIRST + 3)]
    got = choose_speculation(target, draft, prompts, 8, (1, 2, 3), (0.0, 0.5), (False, True))
    counts = {(t["draft_tokens"], t["min_confidence"], t["lookup"]): t["prompts"] for t in got["tried"]}
    finalists = [s for s, n in counts.items() if n == len(prompts)]
    assert set(counts.values()) == {SELECTION_FIRST, len(prompts)} and got["prompts"] == len(prompts)
    assert FINALISTS <= len(finalists) <= FINALISTS + 2 and {s[2] for s in finalists} == {False, True}
    chosen = (got["draft_tokens"], got["min_confidence"], got["lookup"])
    rate = {(t["draft_tokens"], t["min_confidence"], t["lookup"]): t["tokens_per_s"] for t in got["tried"]}
    assert chosen in finalists and rate[chosen] == max(rate[s] for s in finalists)
    assert all(t["speedup"] > 0 for t in got["tried"]) and got["teacher_tokens_per_s"] > 0


def test_context_lookup_copies_what_followed_the_latest_earlier_match():
    seq = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6, 7]
    assert context_lookup(seq, 3) == [2, 3, 5]  # the last 3 tokens 5 6 7 recur twice: the later one wins
    assert context_lookup(seq, 1) == [2] and context_lookup(seq, 0) == []
    assert context_lookup([1, 2, 3, 4, 9, 3, 4], 5) == [9, 3, 4]  # 2-gram 3 4, the tokens up to the end
    assert context_lookup([4, 1, 2, 3, 9, 8, 2, 3], 2) == [9, 8]  # the longest n-gram first: 4 tokens, 3, then 2
    assert context_lookup([1, 2, 3, 4, 5], 4) == [] and context_lookup([7], 4) == []
    assert context_lookup([3, 3, 3, 3, 3], 8) == [3]  # the match ends where the text does


def test_lookup_is_lossless_and_counts_what_it_proposed(models):
    teacher, text, tmp, fp32 = models
    target = _decoder(fp32, teacher.config, tmp, "fp32-lookup")
    other, _ = build_lm_student(teacher, {"layers": 1}, init="scratch", seed=5)
    draft = _decoder(export_lm_onnx(other, tmp / "draft-lookup.onnx"), other.config, tmp, "fp32-dlookup")
    prompt = (text[3, :6].tolist() * 3)[:16]  # a text that repeats itself: the lookup has something to copy
    expect = target.greedy(prompt, 24)
    for k, floor in ((2, 0.0), (4, 0.5), (0, 0.0)):  # draft length 0: lookup alone
        res = speculative_greedy(target, draft, prompt, 24, k, floor, lookup=True)
        assert res.tokens == expect
        assert 0 < res.looked_up <= res.drafted and 0 <= res.lookup_accepted <= min(res.looked_up, res.accepted)
    alone = speculative_greedy(target, draft, prompt, 24, 0, 0.0, lookup=True)
    assert alone.drafted == alone.looked_up  # nothing but copies
    plain = speculative_greedy(target, draft, prompt, 24, 2, 0.0)
    assert plain.looked_up == 0 and plain.tokens == expect
    figs = speculative_bench(target, draft, [prompt, text[4, :7].tolist()], 12, 2, 0.0, True,
                             compare=[(2, 0.0, False), (0, 0.0, True)])
    assert figs["lookup"] is True and figs["identical"] == 2 and set(figs["sources"]) == {"draft", "lookup"}
    assert figs["sources"]["lookup"]["proposed"] + figs["sources"]["draft"]["proposed"] == figs["drafted"]
    assert [(c["draft_tokens"], c["lookup"]) for c in figs["compared"]] == [(2, False), (0, True)]
    assert all(c["identical"] == 2 and c["speedup"] > 0 for c in figs["compared"])
    assert LOOKUP_TOKENS >= 2


def test_the_lm_runner_shares_one_thread_pool_between_target_and_draft(models, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from edgekd.bench.lm_bench import LM_RUNNER

    teacher, text, _, fp32 = models
    np.savez(tmp_path / "prompts.npz", prompts=text[:3, :8].numpy().astype(np.int64))
    cfg = teacher.config
    cmd = [sys.executable, str(LM_RUNNER), "--model", str(fp32), "--draft", str(fp32), "--threads", "1",
           "--kv-heads", str(cfg.num_key_value_heads), "--head-dim", str(cfg.hidden_size // cfg.num_attention_heads),
           "--draft-kv-heads", str(cfg.num_key_value_heads),
           "--draft-head-dim", str(cfg.hidden_size // cfg.num_attention_heads),
           "--prompts", str(tmp_path / "prompts.npz"), "--new-tokens", "10", "--draft-tokens", "3",
           "--lookup", "1", "--compare", "3:0:0,0:0:1", "--json", str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["details"]["thread_pool"] == got["draft_details"]["thread_pool"] == "shared"
    spec = got["speculative"]
    assert spec["identical"] == 3 and spec["lookup"] is True
    own = spec["sources"]["draft"]  # its own draft: every token it proposes is kept (a copied guess may not be)
    assert own["accepted"] == own["proposed"] and spec["compared"][0]["acceptance_rate"] == 1.0
    assert spec["round"]["tokens"] > 1 and spec["round"]["check_ms"] > 0 and spec["teacher_token_ms"] > 0
    assert [(c["draft_tokens"], c["min_confidence"], c["lookup"]) for c in spec["compared"]] == [(3, 0.0, False),
                                                                                                 (0, 0.0, True)]
    over = cmd[:cmd.index("--threads") + 1] + [str(len(os.sched_getaffinity(0)) + 1)] + cmd[cmd.index("--threads") + 2:]
    proc = subprocess.run(over, capture_output=True, text=True, timeout=300)  # more threads than cores: no spinning
    assert proc.returncode == 0 and json.loads((tmp_path / "out.json").read_text())["details"]["thread_pool"] == (
        "own, not spinning")
    bad = subprocess.run(cmd[:-2] + ["--compare", "0:0:0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--compare" in bad.stderr


def test_decoder_sessions_that_take_turns_do_not_spin(models):
    from edgekd.backends import get_backend
    from edgekd.config.profiles import load_profile

    _, _, tmp, fp32 = models
    backend, profile = get_backend("onnxruntime"), load_profile("cpu")
    art = backend.compile(fp32, profile, tmp / "spin", "fp32")
    turns = backend.load(art, profile, 1, spin=False).session.get_session_options()
    assert turns.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    alone = backend.load(art, profile, 1).session.get_session_options()
    with pytest.raises(Exception, match="allow_spinning"):  # not set: ONNX Runtime's default, spin
        alone.get_session_config_entry("session.intra_op.allow_spinning")
