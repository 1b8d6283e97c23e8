"""The causal-LM sections of report.md and report.html: teacher, student and final side by side, the
weight candidates, distillation against its cross-entropy baseline and speculative decoding."""
from __future__ import annotations

from .schema import not_measured_reason
from .tables import (
    Cell,
    Table,
    figure,
    fmt_bytes,
    fmt_count,
    fmt_mb,
    fmt_ms,
    fmt_num,
    fmt_pct,
    fmt_ratio,
    fmt_share,
    fmt_tps,
    stage,
)


def lm_headline(report: dict) -> str:
    final, teacher = report.get("final") or {}, report.get("teacher") or {}
    parts = [f"{final.get('precision', '?')} decoder `{final.get('artifact', '?')}`"]
    if isinstance(final.get("peak_memory_mb"), (int, float)):
        parts.append(f"peak memory {fmt_mb(final['peak_memory_mb'])}")
    ppl = figure(final, "perplexity", fmt_num)
    parts.append(f"test perplexity {ppl.text}" + (f" (teacher {teacher['perplexity']:.2f})"
                                                  if isinstance(teacher.get("perplexity"), (int, float)) else ""))
    tps = figure(final, "decode_tokens_per_s", fmt_tps)
    sp = final.get("speedup_vs_teacher")
    parts.append(f"decode {tps.text}" + (f" ({fmt_ratio(sp)} the teacher's)" if isinstance(sp, (int, float)) else ""))
    spec = report.get("speculative") or {}
    if isinstance(spec.get("speedup"), (int, float)):
        beside = "; ".join(f"{_draft(c)}: {fmt_ratio(c['speedup'])}" for c in spec.get("compared") or []
                           if isinstance(c.get("speedup"), (int, float)))
        parts.append(f"speculative decoding {fmt_ratio(spec['speedup'])} over the teacher alone ({_draft(spec)}"
                     + (f"; {beside}" if beside else "") + f"), {spec.get('identical')}/{spec.get('prompts')} "
                     "outputs identical")
    sampled = spec.get("sampled")
    if isinstance(sampled, dict) and isinstance(sampled.get("speedup"), (int, float)):
        parts.append(f"speculative sampling {fmt_ratio(sampled['speedup'])} over the teacher's own sampling "
                     f"({_sampled(sampled)})")
    if final.get("measured_on") is None and "measured_on" in final:  # a board that builds and times it itself
        parts.append(f"not measured: {not_measured_reason(final, 'measured_on')}")
    else:
        note = final.get("measured_on_note")
        parts.append(f"measured on {final.get('measured_on') or 'host'}" + (f" ({note})" if note else ""))
    return "; ".join(parts)


def _row(label: str, h: dict) -> list[Cell]:
    return [Cell(label), figure(h, "perplexity", fmt_num), figure(h, "accuracy", fmt_pct),
            figure(h, "decode_tokens_per_s", fmt_tps), figure(h, "prefill_tokens_per_s", fmt_tps),
            figure(h, "ttft_ms", fmt_ms), figure(h, "tpot_ms", fmt_ms, "p50"), figure(h, "tpot_ms", fmt_ms, "p90"),
            figure(h, "peak_memory_mb", fmt_mb), figure(h, "size_bytes", fmt_bytes), figure(h, "params", fmt_count),
            Cell(str(h.get("measured_on") or "—"))]


HEADERS = ["model", "test perplexity", "next-token accuracy", "decode", "prefill", "TTFT", "TPOT p50",
           "TPOT p90", "peak memory", "size", "params", "speed measured on"]


def models_table(report: dict) -> Table:
    t = Table(HEADERS)
    teacher = report.get("teacher") or {}
    t.rows.append(_row(teacher.get("label") or "teacher (FP32)", teacher))
    q = stage(report, "quantize")
    params = (report.get("final") or {}).get("params")  # every candidate is the same student, its weights stored
    for c in (q or {}).get("candidates") or []:  # another way
        row = c if "params" in c or params is None else {**c, "params": params}
        t.rows.append(_row(f"{c['label']}" + (" ← final" if c.get("chosen") else ""), row))
    if not q:
        t.rows.append(_row("final", report.get("final") or {}))
    return t


def distill_table(report: dict) -> Table | None:
    d = stage(report, "distill")
    if not d:
        return None
    t = Table(["student", "test perplexity", "next-token accuracy", "agreement with the teacher", "steps"])
    how = str(d.get("loss", "?"))
    seq = d.get("sequence_kd")
    if isinstance(seq, dict):
        share = f"{seq['blocks']} of {seq['of_blocks']}" if "of_blocks" in seq else "all"
        how += f"; {share} blocks end in {seq.get('new_tokens', '?')} tokens the teacher wrote"
        if seq.get("last_steps"):
            how += f", trained on in the last {seq['last_steps']} steps"
    t.rows.append([Cell(f"distilled ({how})"), figure(d, "perplexity", fmt_num),
                   figure(d, "accuracy", fmt_pct), figure(d, "teacher_agreement", fmt_pct), figure(d, "steps", str)])
    base = d.get("baseline")
    if isinstance(base, dict):
        t.rows.append([Cell("cross-entropy only (same steps)"), figure(base, "perplexity", fmt_num),
                       figure(base, "accuracy", fmt_pct), figure(base, "teacher_agreement", fmt_pct),
                       figure(base, "steps", str)])
    return t


def prune_table(report: dict) -> Table | None:
    """The student before and after its MLPs were narrowed: width, size, cost, validation and test perplexity."""
    p = stage(report, "prune")
    if not p:
        return None
    t = Table(["student", "MLP channels a layer", "params", "linear MACs a token", "validation perplexity",
               "test perplexity", "agreement with the teacher", "decode (FP32)"])
    width = p.get("intermediate_size") or {}
    unpruned = p.get("unpruned") or {}
    same = width.get("after") == width.get("before")
    t.rows.append([Cell("unpruned"), Cell(str(width.get("before", "—"))), figure(p.get("before") or {}, "params", fmt_count),
                   figure(p.get("before") or {}, "macs", fmt_count), figure(p, "val_perplexity_unpruned", fmt_num),
                   figure(p if same else unpruned, "perplexity", fmt_num),
                   figure(p if same else unpruned, "teacher_agreement", fmt_pct),
                   Cell("—") if same else figure(unpruned, "decode_tokens_per_s", fmt_tps)])
    for tried in p.get("steps") or []:
        kind, value = next(iter((tried.get("amount") or {"?": "?"}).items()))
        kept = tried.get("accepted") and not same
        label = f"pruned ({kind} {value}), fine-tuned {(p.get('finetune') or {}).get('steps', '?')} steps"
        label += " ← kept" if kept else " (over prune.max_perplexity_increase: not kept)"
        t.rows.append([Cell(label), Cell(str(tried.get("intermediate_size", "—"))), figure(tried, "params", fmt_count),
                       figure(tried, "macs", fmt_count), figure(tried, "val_perplexity", fmt_num),
                       figure(p, "perplexity", fmt_num) if kept else Cell("—"),
                       figure(p, "teacher_agreement", fmt_pct) if kept else Cell("—"),
                       figure(p, "decode_tokens_per_s", fmt_tps) if kept else Cell("—")])
    return t


def _draft(s: dict) -> str:
    """How a setting drafts: the student's length and floor, with or without context lookup, or lookup alone."""
    k, c = s.get("draft_tokens"), s.get("min_confidence")
    if k is None:
        return "—"
    if k == 0:
        return "context lookup alone"
    student = f"student, up to {k}" + (f" while p ≥ {c:g}" if c else "")
    return student + (" + context lookup" if s.get("lookup") else "")


def _sampled(s: dict) -> str:
    """`temperature 0.7, top-p 0.9` for a sampled row."""
    parts = [f"temperature {s.get('temperature', 0):g}"]
    if s.get("top_k"):
        parts.append(f"top-k {s['top_k']}")
    if s.get("top_p") not in (None, 1, 1.0):
        parts.append(f"top-p {s['top_p']:g}")
    return ", ".join(parts)


def _sources(s: dict) -> str:
    src = s.get("sources")
    if not isinstance(src, dict):
        return "—"
    return ", ".join(f"{name} {v['accepted']}/{v['proposed']}" for name, v in src.items()
                     if isinstance(v, dict) and v.get("proposed"))


def _round(row: dict) -> str:
    """One round on average: the tokens it kept, and the teacher's check and the drafting in ms."""
    r = row.get("round")
    if not isinstance(r, dict):
        return "—"
    return f"{r['tokens']:.2f} tokens: check {r['check_ms']:.1f} + draft {r['draft_ms']:.1f} ms"


def speculative_table(report: dict) -> Table | None:
    """The chosen setting and those timed beside it in the same rounds (the student alone, lookup alone, and
    with speculative.sampling the chosen setting sampled, against the teacher's own sampling), with what a
    round cost and gave (a plain teacher token costs teacher_token_ms)."""
    s = report.get("speculative")
    if not isinstance(s, dict):
        return None
    token_ms = s.get("teacher_token_ms")
    alone = "teacher alone" + (f" ({token_ms:.1f} ms a token)" if isinstance(token_ms, (int, float)) else "")
    t = Table(["drafting", "acceptance", "kept / proposed", "a round", "tokens/s", alone, "speedup",
               "identical outputs", "measured on", ""])
    sampled = [s["sampled"]] if isinstance(s.get("sampled"), dict) else []
    for row in [s, *(s.get("compared") or []), *sampled]:
        label = _draft(row) + (f", sampled at {_sampled(row)} (the teacher alone samples too)" if row in sampled else "")
        t.rows.append([Cell(label), figure(row, "acceptance_rate", fmt_share), Cell(_sources(row)),
                       Cell(_round(row)), figure(row, "tokens_per_s", fmt_tps),
                       figure(row if row in sampled else s, "teacher_tokens_per_s", fmt_tps),
                       figure(row, "speedup", fmt_ratio),
                       figure(row, "identical", lambda n: f"{n}/{s.get('prompts')}"),
                       Cell(str(s.get("measured_on") or "—")), Cell("✔ chosen" if row is s else "")])
    return t


def speculative_choice_table(report: dict) -> Table | None:
    sel = (report.get("speculative") or {}).get("selection")
    if not isinstance(sel, dict) or not sel.get("tried"):
        return None
    s = report["speculative"]
    key = ("draft_tokens", "min_confidence", "lookup")
    t = Table(["drafting", "acceptance", "tokens/s", "speedup", "prompts", ""])
    for row in sel["tried"]:
        chosen = all(row.get(k) == s.get(k) for k in key)
        t.rows.append([Cell(_draft(row)), figure(row, "acceptance_rate", fmt_share),
                       figure(row, "tokens_per_s", fmt_tps), figure(row, "speedup", fmt_ratio),
                       Cell(str(row.get("prompts", sel.get("prompts", "—")))), Cell("✔ chosen" if chosen else "")])
    return t


def _increase(sel: dict, key: str) -> str:
    v = sel.get(key)
    return f"{v:+.2f}%" if isinstance(v, (int, float)) else "—"


def weights_choice_table(report: dict) -> Table | None:
    """The weight candidates as the quantize stage chose among them: validation perplexity, its increase over
    FP32 and that increase's 95% upper bound, whether it is within the budget, and validation decode speed."""
    q = stage(report, "quantize") or {}
    cands = [c for c in q.get("candidates") or [] if isinstance(c.get("selection"), dict)]
    if not cands:
        return None
    conf = q.get("budget_confidence")
    t = Table(["candidate", "validation perplexity", "increase over FP32",
               f"at most ({conf:.0%})" if isinstance(conf, (int, float)) else "at most", "within budget",
               "validation decode", ""])
    for c in cands:
        sel = c["selection"]
        within = sel.get("within_budget")
        t.rows.append([Cell(c.get("label") or c.get("name", "—")), figure(sel, "perplexity", fmt_num),
                       Cell(_increase(sel, "perplexity_increase")), Cell(_increase(sel, "perplexity_increase_upper")),
                       Cell("—" if within is None else ("yes" if within else "no")),
                       figure(sel, "decode_tokens_per_s", fmt_tps), Cell("✔ chosen" if c.get("chosen") else "")])
    return t


def lm_sections(report: dict) -> list[tuple[str, Table]]:
    """(title, table) for every LM section the report has."""
    out = [("Language models (test split, target runtime)", models_table(report))]
    w = weights_choice_table(report)
    if w is not None:
        q = stage(report, "quantize") or {}
        budget, conf = q.get("max_perplexity_increase"), q.get("budget_confidence")
        within = f" within quantize.max_perplexity_increase {budget:g}%" if budget is not None else ""
        if within and isinstance(conf, (int, float)):
            within += f" at {conf:.0%} confidence"
        out.append((f"Weight candidates, chosen on validation (the fastest decode{within})", w))
    d = distill_table(report)
    if d is not None:
        base = isinstance((stage(report, "distill") or {}).get("baseline"), dict)
        out.append(("Distillation against cross-entropy alone" if base else "Distillation", d))
    p = prune_table(report)
    if p is not None:
        budget = (stage(report, "prune") or {}).get("max_perplexity_increase")
        within = f", within prune.max_perplexity_increase {budget:g}% on validation" if budget is not None else ""
        out.append((f"Pruning the student's MLPs (the same channels kept in every layer{within})", p))
    s = speculative_table(report)
    if s is not None:
        head = ((report.get("speculative") or {}).get("draft") or {}).get("head")
        drafts = "the final student drafts for the teacher" + (
            f", its LM head kept for {head}" if head and head != "the whole vocabulary" else "")
        out.append((f"Speculative decoding ({drafts}; test prompts, the same rounds)", s))
    c = speculative_choice_table(report)
    if c is not None:
        out.append(("Draft length, confidence floor and context lookup, chosen on validation prompts (the whole grid "
                    "on the first prompts, the fastest few on all of them)", c))
    return out
