"""Sampled decoding (bench/lm_sampling.py): the filters against their formulas, draws that follow their
distribution, and speculative sampling distributed exactly as the target's own sampling (chi-square over
many seeded runs, with a control that shows the test tells a wrong distribution apart)."""
import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from edgekd.bench.lm_generation import Greedy, continue_ids, greedy, speculative, speculative_greedy
from edgekd.bench.lm_sampling import RepetitionPenalty, Sampling, penalty_from_flags, settings_error
from edgekd.lm.draft_vocab import FLOOR


class Bigram:
    """A bigram language model with the decoders' interface (forward(ids, cache), empty_cache(), a cache of
    (batch, heads, length, dim) arrays that the loops cut): logits for the next token from the last one."""

    def __init__(self, table: np.ndarray):
        self.table = np.asarray(table, dtype=np.float32)

    def empty_cache(self, batch: int = 1) -> list:
        return [np.zeros((batch, 1, 0, 1), dtype=np.float32)]

    def forward(self, ids, cache):
        ids = np.asarray(ids)
        grown = np.zeros((ids.shape[0], 1, cache[0].shape[2] + ids.shape[1], 1), dtype=np.float32)
        return self.table[ids], [grown]


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_filters_follow_their_formulas():
    row = np.array([2.0, 1.0, 0.5, 0.0, -1.0])
    assert np.allclose(Sampling(temperature=0.5).probs(row), _softmax(row / 0.5), atol=1e-12)
    top2 = Sampling(top_k=2).probs(row)
    assert np.allclose(top2, np.r_[_softmax(row[:2]), 0, 0, 0], atol=1e-12)
    full = _softmax(row)  # 0.535, 0.197, 0.119, 0.072, 0.027
    assert full[0] < 0.6 < full[0] + full[1] < 0.8 < full[:3].sum()
    assert np.allclose(Sampling(top_p=0.6).probs(row), np.r_[full[:2] / full[:2].sum(), 0, 0, 0], atol=1e-12)
    assert np.allclose(Sampling(top_p=0.8).probs(row), np.r_[full[:3] / full[:3].sum(), 0, 0], atol=1e-12)
    assert np.count_nonzero(Sampling(top_p=1e-6).probs(row)) == 1  # the most likely token is always kept
    cut = np.array([FLOOR, 3.0, FLOOR, 1.0])  # a cut draft vocabulary's floor is probability 0
    assert np.allclose(Sampling().probs(cut), np.r_[0, _softmax(np.array([3.0, 1.0]))[0], 0,
                                                    _softmax(np.array([3.0, 1.0]))[1]], atol=1e-12)


def test_top_p_over_a_whole_vocabulary_keeps_the_same_nucleus_as_a_full_sort():
    rng = np.random.default_rng(4)
    for scale, top_p in ((3.0, 0.9), (3.0, 0.9999), (0.2, 0.5)):  # a partial sort, and rows it falls short on
        row = rng.normal(0, scale, 49152)
        full = _softmax(row)
        order = np.argsort(-full, kind="stable")
        keep = order[:int(np.searchsorted(np.cumsum(full[order]), top_p)) + 1]
        expect = np.zeros_like(full)
        expect[keep] = full[keep] / full[keep].sum()
        assert np.allclose(Sampling(top_p=top_p).probs(row), expect, atol=1e-12)


def test_bad_settings_are_named():
    assert "temperature" in settings_error(0.0, 0, 1.0)
    assert "top-k" in settings_error(1.0, -1, 1.0)
    assert "top-p" in settings_error(1.0, 0, 0.0) and "top-p" in settings_error(1.0, 0, 1.5)
    assert "floor" in settings_error(1.0, 0, 1.0, 1.0)
    assert settings_error(0.7, 40, 0.9, 0.3) is None
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)


def test_draws_follow_the_distribution_and_skip_zero_probability():
    p = np.array([0.5, 0.0, 0.3, 0.2, 0.0])
    s = Sampling(seed=3)
    counts = np.bincount([s.draw(p) for _ in range(20000)], minlength=5)
    assert counts[1] == counts[4] == 0
    assert chisquare(counts[[0, 2, 3]], 20000 * p[[0, 2, 3]]).pvalue > 1e-3


def test_a_seed_repeats_its_text_and_top_k_1_is_greedy():
    rng = np.random.default_rng(0)
    target = Bigram(rng.normal(0, 2, (40, 40)))
    a = continue_ids(target, [1, 2], 30, choice=Sampling(0.9, seed=11))
    assert a == continue_ids(target, [1, 2], 30, choice=Sampling(0.9, seed=11))
    assert a != continue_ids(target, [1, 2], 30, choice=Sampling(0.9, seed=12))
    assert continue_ids(target, [1, 2], 30, choice=Sampling(top_k=1, seed=5)) == greedy(target, [1, 2], 30)
    draft = Bigram(rng.normal(0, 2, (40, 40)))
    assert (speculative(target, draft, [1, 2], 30, 3, Sampling(top_k=1, seed=5)).tokens
            == speculative_greedy(target, draft, [1, 2], 30, 3).tokens == greedy(target, [1, 2], 30))
    s = Sampling()  # fresh entropy, and the seed drawn is kept: the text can be repeated
    assert continue_ids(target, [1], 10, choice=s) == continue_ids(target, [1], 10, choice=Sampling(seed=s.seed))


V, NEW, RUNS = 4, 3, 8000


def _chain(table, settings: dict, prompt: list, penalty=None) -> np.ndarray:
    """The exact probability of every sequence of NEW tokens after `prompt` under bigram `table` sampled with
    `settings`, each row shaped by `penalty` from the text before it."""
    s = Sampling(**settings)
    out = np.zeros((V,) * NEW)
    for seq in itertools.product(range(V), repeat=NEW):
        prob, text = 1.0, list(prompt)
        for t in seq:
            row = table[text[-1]]
            prob *= s.probs(row if penalty is None else penalty(row, text))[t]
            text.append(t)
        out[seq] = prob
    return out.ravel()


@pytest.mark.parametrize("settings, k, lookup, cut, penalty", [
    ({"temperature": 1.0}, 2, False, False, None),
    ({"temperature": 0.7, "top_k": 3, "top_p": 0.9, "min_confidence": 0.4}, 3, False, False, None),
    ({"temperature": 1.3}, 2, True, True, None),  # context lookup's copies and a draft with a cut vocabulary
    ({"temperature": 1.0}, 2, True, False, RepetitionPenalty(1.8, 3)),  # each row shaped by the text before it
])
def test_speculative_sampling_is_distributed_as_the_target(settings, k, lookup, cut, penalty):
    rng = np.random.default_rng(1)
    t_table = rng.normal(0, 1.2, (V, V))
    d_table = t_table + rng.normal(0, 1.0, (V, V))  # a draft that is often, not always, right
    if cut:
        d_table[:, V - 1] = FLOOR  # the draft never proposes the last token; the target still makes it
    target, draft = Bigram(t_table), Bigram(d_table)
    prompt = [0, 1, 0, 1]  # a repeating prompt, so context lookup proposes
    seen = np.zeros(V ** NEW)
    accepted = drafted = 0
    for seed in range(RUNS):
        res = speculative(target, draft, prompt, NEW, k, Sampling(**settings, seed=seed), lookup=lookup,
                          penalty=penalty)
        seen[np.ravel_multi_index(res.tokens, (V,) * NEW)] += 1
        accepted, drafted = accepted + res.accepted, drafted + res.drafted
    plain = {key: v for key, v in settings.items() if key != "min_confidence"}
    expect = _chain(t_table, plain, prompt, penalty)
    live = expect > 0
    assert seen[~live].sum() == 0
    assert chisquare(seen[live], RUNS * expect[live] / expect[live].sum()).pvalue > 1e-3
    assert 0.2 < accepted / drafted < 0.95  # both ways of the check were taken
    drafts = _chain(d_table, plain, prompt, penalty)
    control = drafts[live] + 1e-12
    assert chisquare(seen[live], RUNS * control / control.sum()).pvalue < 1e-6  # the draft's own sampling fails
    if penalty is not None:  # and the penalty shaped what came out
        bare = _chain(t_table, plain, prompt)[live]
        assert chisquare(seen[live], RUNS * bare / bare.sum()).pvalue < 1e-6


def test_the_repetition_penalty_follows_its_formula_and_its_window():
    row = np.array([2.0, -1.0, 0.5, -0.5, 3.0], dtype=np.float32)
    kept = row.copy()
    pen = RepetitionPenalty(2.0)
    assert np.allclose(pen(row, [0, 1, 1, 3]), [1.0, -2.0, 0.5, -1.0, 3.0])  # positive / 2, negative * 2
    assert np.array_equal(row, kept)  # the decoder's row is left as it was
    assert np.allclose(RepetitionPenalty(2.0, window=2)(row, [0, 1, 3, 4]), [2.0, -1.0, 0.5, -1.0, 1.5])
    assert penalty_from_flags(None) is None and penalty_from_flags(1.0) is None  # 1 changes nothing
    assert penalty_from_flags(1.3, 64).record() == {"penalty": 1.3, "window": 64}
    assert penalty_from_flags(1.3).describe() == "repetition penalty 1.3"
    for flags, words in (((0.0,), "above 0"), ((float("nan"),), "above 0"), ((1.2, -1), "window must be 0"),
                         ((None, 8), "add --repetition-penalty")):
        with pytest.raises(ValueError, match=words):
            penalty_from_flags(*flags)


def test_penalised_speculative_greedy_is_the_targets_own_penalised_greedy():
    rng = np.random.default_rng(7)
    loop = rng.normal(0, 0.8, (12, 12))
    loop[np.arange(12), (np.arange(12) + 1) % 3] = 2.5  # greedy cycles 1 -> 2 -> 0 -> 1 ...
    target = Bigram(loop)
    plain = greedy(target, [0], 24)
    pen = RepetitionPenalty(3.0, window=6)
    shaped = continue_ids(target, [0], 24, penalty=pen)
    assert set(plain) <= {0, 1, 2} and not set(shaped) <= {0, 1, 2}  # the penalty breaks the cycle
    for seed in range(4):
        draft = Bigram(loop + np.random.default_rng(seed).normal(0, 2.0, (12, 12)))
        for k, lookup, floor in ((1, False, 0.0), (3, False, 0.3), (2, True, 0.0)):
            res = speculative(target, draft, [0], 24, k, Greedy(floor), lookup, penalty=pen)
            assert res.tokens == shaped, (seed, k, lookup)
            assert res.drafted > 0


def test_speculative_bench_times_speculative_sampling_against_the_targets_own_sampling():
    import argparse

    from edgekd.bench.lm_figures import speculative_bench
    from edgekd.bench.lm_runner import RunnerError, _sampling

    rng = np.random.default_rng(5)
    table = rng.normal(0, 2, (24, 24))
    target, draft = Bigram(table), Bigram(table + rng.normal(0, 0.7, (24, 24)))
    prompts = [[1, 2], [3], [5, 6, 7]]
    out = speculative_bench(target, draft, prompts, 12, 2, 0.0, True, sampling=Sampling(0.9, top_p=0.95, seed=4))
    sm = out["sampled"]
    assert (sm["temperature"], sm["top_k"], sm["top_p"], sm["seed"], sm["prompts"]) == (0.9, 0, 0.95, 4, 3)
    assert (sm["draft_tokens"], sm["min_confidence"], sm["lookup"]) == (2, 0.0, True)
    assert 0 < sm["acceptance_rate"] < 1 and sm["speedup"] > 0 and sm["teacher_tokens_per_s"] > 0
    assert sm["identical"] is None and "identical" in sm["not_measured"]
    assert out["identical"] == 3 and "sampled" not in speculative_bench(target, draft, prompts, 12, 2)
    assert Sampling(0.9, seed=4).for_prompt(2).seed == 6  # each prompt draws its own
    with pytest.raises(RunnerError, match="top-p must be in"):
        _sampling(argparse.Namespace(temperature=1.0, top_k=0, top_p=0.0, seed=0))
