"""The quantize stage's choice among LM weight candidates: the fastest on validation within the perplexity
budget, with speeds that differ by timing noise treated as a tie that the better perplexity wins."""
from types import SimpleNamespace

from edgekd.report.assemble_lm import SPEED_TIE, choose


def _cands(**figs):
    return {n: SimpleNamespace(label=n.upper(), selection={"perplexity": p, "decode_tokens_per_s": t})
            for n, (p, t) in figs.items()}


def test_the_fastest_within_the_budget_wins():
    cands = _cands(fp32=(40.0, 100.0), int8=(40.2, 200.0), int4=(48.0, 300.0), int4_mixed=(43.0, 250.0))
    name, why = choose(cands, 10.0)
    assert name == "int4_mixed" and "250.0 tokens/s" in why and "tie" not in why  # int4 is over 44.0
    assert cands["int4"].selection["within_budget"] is False and cands["int8"].selection["within_budget"] is True


def test_a_speed_within_the_tie_goes_to_the_lower_perplexity():
    faster = 200.0 * (1 + SPEED_TIE / 2)  # faster by less than the tie
    name, why = choose(_cands(fp32=(40.0, 100.0), int8=(40.2, 200.0), int4_mixed=(43.9, faster)), 10.0)
    assert name == "int8" and "a tie, which the lower perplexity wins" in why and "INT4_MIXED" in why
    clearly = 200.0 * (1 + 2 * SPEED_TIE)
    assert choose(_cands(fp32=(40.0, 100.0), int8=(40.2, 200.0), int4_mixed=(43.9, clearly)), 10.0)[0] == "int4_mixed"


def test_the_increase_bound_is_students_t_over_groups_of_consecutive_blocks():
    import math

    import numpy as np
    from scipy.stats import t

    from edgekd.report.assemble_lm import BOUND_GROUPS, increase_bound

    base = np.full(4, 3.0)
    got = increase_bound(base, base + [0.1, 0.2, 0.3, 0.4])  # 4 blocks: 4 groups of one
    spread = np.std([0.1, 0.2, 0.3, 0.4], ddof=1) / 2
    assert math.isclose(got["perplexity_increase"], 100 * math.expm1(0.25), abs_tol=1e-3)
    assert math.isclose(got["perplexity_increase_upper"], 100 * math.expm1(0.25 + t.ppf(0.95, 3) * spread), abs_tol=1e-3)
    assert got["bound_groups"] == 4
    even = increase_bound(np.zeros(64), np.full(64, 0.05))  # no spread: the bound is the increase itself
    assert even["perplexity_increase_upper"] == even["perplexity_increase"] and even["bound_groups"] == BOUND_GROUPS
    noisy = np.random.default_rng(0).normal(0.05, 0.2, 128)
    assert increase_bound(np.zeros(128), noisy)["perplexity_increase_upper"] > increase_bound(
        np.zeros(128), noisy)["perplexity_increase"]
    one = increase_bound(np.zeros(1), np.full(1, 0.1))
    assert one["perplexity_increase_upper"] is None and "bound_groups" not in one


def test_a_candidate_whose_bound_is_over_the_budget_is_out_though_its_increase_is_within():
    cands = _cands(fp32=(40.0, 100.0), int8=(40.2, 200.0), int4=(43.8, 300.0))
    cands["int8"].selection.update(perplexity_increase=0.5, perplexity_increase_upper=0.9)
    cands["int4"].selection.update(perplexity_increase=9.5, perplexity_increase_upper=10.6)
    name, why = choose(cands, 10.0)
    assert name == "int8" and cands["int4"].selection["within_budget"] is False
    assert "95% confidence" in why and "+0.50%, at most +0.90%" in why
    cands["int4"].selection["perplexity_increase_upper"] = 9.9
    assert choose(cands, 10.0)[0] == "int4"
