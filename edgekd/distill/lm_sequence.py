"""Sequence-level distillation for causal LMs: text the teacher wrote, and text the student samples.

Sequence-level KD (Kim & Rush, 2016): the teacher continues each training block's first seq_len - N
tokens greedily for N tokens, and the student trains on the blocks as the teacher wrote them. The
rewritten blocks are stored once per teacher, data and N in the user cache and reused by later runs
(and by the top-k cache, whose key follows the blocks).

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

__all__ = ["SEQUENCE_VERSION", "continue_greedy", "sample_continuations", "sequence_kd_blocks"]

SEQUENCE_VERSION = "lm-seqkd-v1"


def _generate(model: nn.Module, prompts: torch.Tensor, new_tokens: int, *, sample: bool, temperature: float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """`prompts` (batch, P) continued for exactly `new_tokens` tokens through the model's KV cache;
    greedy, or sampled at `temperature` from `generator`. Returns (batch, P + new_tokens)."""
    was = model.training
    model.eval()
    out = prompts
    with torch.no_grad():
        res = model(input_ids=prompts, use_cache=True)
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


def sequence_kd_blocks(teacher: nn.Module, teacher_key: str, blocks: torch.Tensor, new_tokens: int, batch_size: int,
                       progress: Progress | None = None, root: Path | None = None) -> tuple[torch.Tensor, dict]:
    """`blocks` (n, seq_len) with the last `new_tokens` of each replaced by the teacher's greedy
    continuation of the rest; read from the user cache when this teacher already wrote them."""
    n, seq_len = blocks.shape
    if not 1 <= new_tokens < seq_len:
        raise ValueError(f"distill.sequence_kd {new_tokens} must be between 1 and data.seq_len - 1 ({seq_len - 1})")
    key = hash_obj(SEQUENCE_VERSION, teacher_key, hash_arrays(blocks.numpy()), new_tokens)
    path = (root or cache_dir() / "lm-seqkd") / f"{key}.npy"
    info = {"new_tokens": new_tokens, "prompt_tokens": seq_len - new_tokens, "blocks": int(n), "file": str(path)}
    if path.is_file():
        stored = np.load(path)
        if stored.shape == tuple(blocks.shape):
            return torch.from_numpy(stored.astype(np.int64)), {**info, "reused": True, "seconds": 0.0}
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    out = []
    with progress.task("teacher writing the sequence-KD blocks", -(-n // batch_size)) as bar:
        for i in range(0, n, batch_size):
            out.append(continue_greedy(teacher, blocks[i:i + batch_size, :seq_len - new_tokens], new_tokens))
            bar.advance()
    written = torch.cat(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, written.numpy().astype(np.int32))
            f.flush()
            os.fsync(f.fileno())
    changed = float((written[:, seq_len - new_tokens:] != blocks[:, seq_len - new_tokens:]).float().mean())
    return written, {**info, "reused": False, "seconds": round(time.perf_counter() - t0, 2),
                     "differs_from_text": round(100.0 * changed, 2)}
