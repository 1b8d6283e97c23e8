"""Sequence-level distillation for causal LMs: text the teacher wrote, and text the student samples.

Sequence-level KD (Kim & Rush, 2016): the teacher continues each training block's first seq_len - N
tokens greedily for N tokens, and the student trains on the blocks as the teacher wrote them: the text a
draft meets when it proposes tokens for the teacher's own greedy output. A share of the blocks (a seeded
choice) can be rewritten and the rest kept. The rewritten blocks are stored once per teacher, data, N and
choice in the user cache and reused by later runs (and by the top-k cache, whose key follows the blocks).

On-policy distillation (GKD, Agarwal et al. 2024): the student samples a continuation of a prompt and
the teacher's distributions on the student's own tokens are its targets, which trains the student on the
states it will actually visit when it generates."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..progress import NullProgress, Progress
from ..runs import atomic_path, cache_dir, hash_arrays, hash_obj

__all__ = ["SEQUENCE_BATCH", "SEQUENCE_VERSION", "continue_greedy", "sample_continuations", "sequence_kd_blocks"]

SEQUENCE_VERSION = "lm-seqkd-v1"
SEQUENCE_BATCH = 64  # blocks the teacher continues at once (one decode step serves them all)


def _generate(model: nn.Module, prompts: torch.Tensor, new_tokens: int, *, sample: bool, temperature: float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """`prompts` (batch, P) continued for exactly `new_tokens` tokens through the model's KV cache;
    greedy, or sampled at `temperature` from `generator`. Returns (batch, P + new_tokens)."""
    was = model.training
    model.eval()
    out = prompts
    with torch.no_grad():
        res = model(input_ids=prompts, use_cache=True, logits_to_keep=1)  # the prompt's last position only
        past, logits = res.cache, res.logits[:, -1]
        for i in range(new_tokens):
            if sample:
                probs = torch.softmax(logits.float() / temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            if i + 1 < new_tokens:
                res = model(input_ids=nxt, cache=past, use_cache=True)
                past, logits = res.cache, res.logits[:, -1]
    model.train(was)
    return out


def continue_greedy(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The model's greedy continuation of every prompt, `new_tokens` long, prompt included."""
    return _generate(model, prompts, new_tokens, sample=False)


def sample_continuations(model: nn.Module, prompts: torch.Tensor, new_tokens: int, temperature: float,
                         generator: torch.Generator) -> torch.Tensor:
    """Sampled continuations of every prompt at `temperature`, `new_tokens` long, prompt included."""
    return _generate(model, prompts, new_tokens, sample=True, temperature=temperature, generator=generator)


def sequence_kd_blocks(teacher: nn.Module, teacher_key: str, blocks: torch.Tensor, new_tokens: int,
                       share: float = 1.0, seed: int = 0, progress: Progress | None = None,
                       root: Path | None = None, rows: np.ndarray | None = None) -> tuple[torch.Tensor, dict]:
    """`blocks` (n, seq_len) with the last `new_tokens` of each chosen block replaced by the teacher's greedy
    continuation of the rest: every block, or a `share` of them drawn with `seed` (the stage keeps it at 0,
    so runs with other seeds train on the same transfer set and reuse it), or the block indices `rows`; read
    from the user cache when this teacher already wrote them."""
    n, seq_len = blocks.shape
    if not 1 <= new_tokens < seq_len:
        raise ValueError(f"distill.sequence_kd {new_tokens} must be between 1 and data.seq_len - 1 ({seq_len - 1})")
    if not 0 < share <= 1:
        raise ValueError(f"distill.sequence_share {share} must be in (0, 1]")
    if rows is not None:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if not len(rows) or rows[0] < 0 or rows[-1] >= n:
            raise ValueError(f"sequence-KD rows must be block indices below {n}")
    count = len(rows) if rows is not None else max(1, round(share * n))
    if rows is None:
        rows = np.arange(n) if count == n else np.sort(np.random.default_rng(seed).choice(n, count, replace=False))
    parts = (SEQUENCE_VERSION, teacher_key, hash_arrays(blocks.numpy()), new_tokens)
    key = hash_obj(*parts) if count == n else hash_obj(*parts, hash_arrays(rows))  # all-block keys as they were
    path = (root or cache_dir() / "lm-seqkd") / f"{key}.npy"
    info = {"new_tokens": new_tokens, "prompt_tokens": seq_len - new_tokens, "blocks": int(count),
            "of_blocks": int(n), "file": str(path)}
    if path.is_file():
        stored = np.load(path)
        if stored.shape == tuple(blocks.shape):
            return torch.from_numpy(stored.astype(np.int64)), {**info, "reused": True, "seconds": 0.0}
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    chosen = blocks[torch.from_numpy(rows)]
    out = []
    with progress.task("teacher writing the sequence-KD blocks", -(-count // SEQUENCE_BATCH)) as bar:
        for i in range(0, count, SEQUENCE_BATCH):
            out.append(continue_greedy(teacher, chosen[i:i + SEQUENCE_BATCH, :seq_len - new_tokens], new_tokens))
            bar.advance()
    written = blocks.clone()
    written[torch.from_numpy(rows)] = torch.cat(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, written.numpy().astype(np.int32))
            f.flush()
            os.fsync(f.fileno())
    tail = slice(seq_len - new_tokens, None)
    changed = float((written[rows, tail] != blocks[rows, tail]).float().mean())
    return written, {**info, "reused": False, "seconds": round(time.perf_counter() - t0, 2),
                     "differs_from_text": round(100.0 * changed, 2)}
