"""Running an exported KV-cache decoder (lm.export) on any runner that takes named inputs: prefill, decode
steps, greedy generation and perplexity, with the same code for every runtime."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from ..bench.lm_figures import block_nll
from ..bench.lm_generation import greedy, trim
from .export import io_names, kv_shape

__all__ = ["Decoder"]

RunFn = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]


class Decoder:
    """Greedy decoding and scoring through `run(feeds) -> [logits, present_key_0, present_value_0, ...]`.
    With the ONNX Runtime `session` of a graph that takes kv_length (the fused export), one sequence at a time
    decodes with its cache in place (bench.lm_runner.InPlaceKV); the cache is then its length in tokens. `kv`
    gives such a decoder directly (bench.lm_runner.StatefulKV: OpenVINO's cache in its infer request's states)."""

    def __init__(self, run: RunFn, config, layers: int, session=None, kv=None):
        self.run, self.config, self.layers = run, config, layers
        self.inputs, self.outputs = io_names(layers)
        self.kv = kv
        if session is not None and kv is None:
            from ..bench.lm_runner import InPlaceKV, in_place

            if in_place(session):
                _, heads, _, size = kv_shape(config, 1, 0)
                self.kv = InPlaceKV(session, layers, heads, size)

    def empty_cache(self, batch: int = 1):
        if self.kv is not None and batch == 1:
            return self.kv.empty_cache()
        return [np.zeros(kv_shape(self.config, batch, 0), dtype=np.float32) for _ in range(2 * self.layers)]

    def cut(self, cache, length: int):
        """The cache cut back to its first `length` tokens."""
        return self.kv.cut(cache, length) if self.kv is not None else trim(cache, length)

    def forward(self, ids: np.ndarray, cache) -> tuple[np.ndarray, list[np.ndarray] | int]:
        """Logits for `ids` (batch, seq) after the cached tokens, and the cache extended by them. With the cache
        in place, the logits of a pass of up to InPlaceKV.REUSED tokens are the decoder's own buffer for that
        length, overwritten by its next pass of the same length: read (or copy) them before the next call."""
        if isinstance(cache, int):
            return self.kv.forward(ids, cache)
        feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        feeds.update(zip(self.inputs[1:], cache, strict=True))
        out = self.run(feeds)
        return np.asarray(out[0]), [np.asarray(o) for o in out[1:]]

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, eos: int | None = None,
               on_tokens: Callable[[list[int]], None] | None = None) -> list[int]:
        """The greedy continuation of `prompt` (a list of token ids): lm_generation.greedy, the board's loop."""
        return greedy(self, prompt, max_new_tokens, eos, on_tokens)

    def score(self, blocks: np.ndarray, batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """One pass over `blocks` (n, seq), each block prefilled: every block's summed next-token NLL (n,
        float64) and the most likely next token at every position (n, seq)."""
        nll, picks = [], []
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i:i + batch_size]
            logits, _ = self.forward(ids, self.empty_cache(len(ids)))
            nll.append(block_nll(logits, ids))
            picks.append(logits.argmax(-1))
        return np.concatenate(nll), np.concatenate(picks)

    def perplexity(self, blocks: np.ndarray, batch_size: int = 4) -> float:
        """exp(mean next-token NLL) over every predicted token of `blocks` (n, seq), each block prefilled."""
        nll, _ = self.score(blocks, batch_size)
        return math.exp(float(nll.sum()) / max(blocks[:, 1:].size, 1))

    def next_tokens(self, blocks: np.ndarray, batch_size: int = 4) -> np.ndarray:
        """The most likely next token at every position of `blocks` (n, seq)."""
        return self.score(blocks, batch_size)[1]


def openvino_decoder(path, config, threads: int | None, device: str, precision: str, kv_cache: str = "auto"
                     ) -> Decoder:
    """A Decoder for an OpenVINO IR loaded and compiled as the run's measurements load it (bench.lm_runner):
    with `kv_cache` auto the IR made stateful where the runtime can (StatefulKV), with copy the cache copied
    each step. The runner's RunnerError (exit 2: bad model, 3: runtime) passes through."""
    import argparse

    from ..bench.lm_runner import CountedKV, load

    kv = load(argparse.Namespace(model=str(path), backend="openvino", threads=threads, device=device,
                                 precision=precision, kv_heads=None, head_dim=None, kv_cache=kv_cache))[0]
    return Decoder(kv.run, config, config.num_hidden_layers, kv=kv if isinstance(kv, CountedKV) else None)

