"""One exported LM decoder of a causal-lm run, compiled for the target and opened: what it is, what was measured
of it (validation figures choose, test figures report), and its quality and parity checks."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backends import get_backend
from ..backends.base import Artifact, Runner
from ..context import RunContext
from ..errors import StageError
from .decode import Decoder

__all__ = ["PARITY_STEPS", "LMCandidate", "kv_cache_update", "open_candidate", "parity", "quality"]

PARITY_STEPS = 16


@dataclass
class LMCandidate:
    """One exported LM decoder compiled for the target and what was measured of it."""

    name: str
    precision: str
    onnx: Path
    label: str
    artifact: Artifact | None = None
    runner: Runner | None = None
    decoder: Decoder | None = None
    selection: dict = field(default_factory=dict)  # validation figures: what chose
    figures: dict = field(default_factory=dict)  # test figures: what is reported
    speed: dict = field(default_factory=dict)
    footprint: dict = field(default_factory=dict)  # peak memory, its scope and runtime
    measured_on: str = "host"  # where speed and memory were taken: "host" or the board
    board: dict = field(default_factory=dict)  # the board's environment and versions, with --host


def open_candidate(ctx: RunContext, c: LMCandidate, config, layers: int) -> None:
    backend = get_backend(ctx.profile.backend)
    c.artifact = backend.compile(c.onnx, ctx.profile, ctx.run_dir / "target" / c.name, c.precision)
    c.runner = backend.load(c.artifact, ctx.profile, ctx.threads, spin=False)  # sessions take turns: see load
    c.decoder = Decoder(c.runner.run, config, layers, session=getattr(c.runner, "session", None))


def kv_cache_update(ctx: RunContext, dec: Decoder) -> str:
    """How the decoders that measure speed update their KV cache: in place with ONNX Runtime where the graph
    takes kv_length, in the infer request's states with OpenVINO (bench.lm_runner.StatefulKV), else copied."""
    if dec.kv is not None:
        return "in place"
    return "in place (OpenVINO states)" if ctx.profile.backend == "openvino" else "copied each step"


def quality(dec: Decoder, blocks: np.ndarray, ref: np.ndarray | None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Perplexity, next-token accuracy against the text and (with `ref`) agreement with a reference's picks;
    the picks and each block's mean next-token NLL. One pass over the blocks."""
    nll, picks = dec.score(blocks)
    nll = nll / max(blocks.shape[1] - 1, 1)
    out = {"perplexity": round(math.exp(float(nll.mean())), 4),
           "accuracy": round(100.0 * float((picks[:, :-1] == blocks[:, 1:]).mean()), 3)}
    if ref is not None:
        out["next_token_agreement"] = round(100.0 * float((picks == ref).mean()), 3)
    return out, picks, nll


def parity(student: nn.Module, dec: Decoder, blocks: torch.Tensor) -> dict:
    with torch.no_grad():
        ref = student(input_ids=blocks[:2], use_cache=False).logits.numpy()
    got, _ = dec.forward(blocks[:2].numpy(), dec.empty_cache(min(2, len(blocks))))
    prompt = blocks[0, :16].tolist()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        for _ in range(PARITY_STEPS):
            ids = torch.cat([ids, student(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    torch_tokens = ids[0, len(prompt):].tolist()
    ort_tokens = dec.greedy(prompt, PARITY_STEPS)
    out = {"max_abs_diff": float(np.abs(ref - got).max()), "greedy_steps": PARITY_STEPS,
           "greedy_identical": torch_tokens == ort_tokens}
    if out["max_abs_diff"] > 1e-2 * max(1.0, float(np.abs(ref).max())) or not out["greedy_identical"]:
        raise StageError(f"export: the KV-cache decoder differs from PyTorch (max logit difference "
                         f"{out['max_abs_diff']:.2e}, greedy tokens identical: {out['greedy_identical']})")
    return out
