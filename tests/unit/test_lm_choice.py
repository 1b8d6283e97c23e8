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
