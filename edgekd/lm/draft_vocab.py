"""The draft's vocabulary cut to the tokens it is likely to be right about: the final student with its LM head
kept only for the N tokens most frequent in the training split (FR-Spec, arXiv 2502.14856). A small draft
spends much of each step in its LM head (SmolLM2's 49,152 rows are 28M of a 12-layer student's 70M weights),
and a token the training text hardly uses is one the draft rarely guesses right.

The cut is made on the exported decoder itself (ONNX), so every other weight is the final model's, bit for
bit, and the head's kept rows are its own rows in its own precision (MatMulNBits blocks or a float MatMul).
The graph still returns logits over the whole vocabulary: the kept logits are scattered back (ScatterElements
over a row of FLOOR) and every other token gets FLOOR, so each runtime and decode loop takes the draft as it is, and a
cut token is simply never proposed. The target checks every guess, so the output stays the target's own."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import StageError
from .export import save_checked

__all__ = ["FLOOR", "cut_head", "frequent_tokens"]

FLOOR = -65504.0  # the logit of every token the cut head leaves out: far below any real logit, and the
# lowest float16, so a half-precision copy of the graph keeps it finite


def frequent_tokens(ids: np.ndarray, vocab_size: int, n: int) -> np.ndarray:
    """The `n` token ids most frequent in `ids` (ties and unseen tokens by id), most frequent first."""
    counts = np.bincount(np.asarray(ids, dtype=np.int64).ravel(), minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))
    return order[:min(n, vocab_size)].astype(np.int64)


def _rows(array: np.ndarray, n_rows: int, keep: np.ndarray) -> np.ndarray:
    """`array` whose leading dimension holds `n_rows` rows (flattened blocks allowed) with only `keep`'s rows."""
    shaped = array.reshape(n_rows, -1)[keep]
    return np.ascontiguousarray(shaped.reshape((len(keep) * array.shape[0] // n_rows,) + array.shape[1:]))


def cut_head(src: Path, dst: Path, keep: np.ndarray, logits: str = "logits") -> Path:
    """Write `src` (an exported KV-cache decoder, float or weight-quantized) to `dst` with its LM head (the node
    that writes `logits`) computing only the rows of `keep`; the output keeps its name and vocabulary."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    head = next((n for n in g.node if logits in n.output), None)
    tables = {i.name: i for i in g.initializer}
    if head is None:
        raise StageError(f"draft vocabulary: {src.name} has no node writing {logits!r}")
    keep = np.asarray(keep, dtype=np.int64)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 15:
        raise StageError(f"draft vocabulary: {src.name} is at opset {opset}; the cut needs opset 15 or later")
    new: dict[str, np.ndarray] = {}
    if head.op_type == "MatMulNBits":  # B (N, blocks, bytes), scales, zero points, g_idx (K), bias (N)
        vocab = next(a.i for a in head.attribute if a.name == "N")
        for pos, name in enumerate(head.input):
            if pos in (1, 2, 3, 5) and name:
                if name not in tables:
                    raise StageError(f"draft vocabulary: the LM head's input {name!r} is not a constant")
                new[name] = _rows(numpy_helper.to_array(tables[name]), vocab, keep)
        next(a for a in head.attribute if a.name == "N").i = len(keep)
    elif head.op_type == "MatMul" and head.input[1] in tables and len(tables[head.input[1]].dims) == 2:
        weight = numpy_helper.to_array(tables[head.input[1]])  # (hidden, vocab)
        vocab = weight.shape[1]
        new[head.input[1]] = np.ascontiguousarray(weight[:, keep])
    else:
        raise StageError(f"draft vocabulary: the LM head of {src.name} is a {head.op_type} node; a MatMul or "
                         "MatMulNBits with constant weights can be cut")
    if keep.min() < 0 or keep.max() >= vocab or len(np.unique(keep)) != len(keep):
        raise StageError(f"draft vocabulary: the kept tokens must be distinct ids below {vocab}")
    users = {i for n in g.node if n is not head for i in n.input}
    for i, name in enumerate(head.input):
        if name in new:
            kept = f"{name}_draft_vocab"
            g.initializer.append(numpy_helper.from_array(new[name], kept))
            head.input[i] = kept
            if name not in users:
                g.initializer.remove(tables[name])
    head.output[list(head.output).index(logits)] = "draft_kept_logits"
    g.initializer.extend([numpy_helper.from_array(np.full(vocab, FLOOR, dtype=np.float32), "draft_floor"),
                          numpy_helper.from_array(keep, "draft_keep"),
                          numpy_helper.from_array(np.asarray([vocab], dtype=np.int64), "draft_vocab_size")])
    # every row of the kept logits written over a row of FLOOR at its tokens' columns: a scatter of the kept
    # columns costs a sixth of a gather over the whole vocabulary (0.04 against 0.27 ms a token here)
    g.node.extend([helper.make_node("Shape", ["draft_kept_logits"], ["draft_kept_shape"], name="draft_vocab_shape"),
                   helper.make_node("Expand", ["draft_keep", "draft_kept_shape"], ["draft_columns"],
                                    name="draft_vocab_columns"),
                   helper.make_node("Shape", ["draft_kept_logits"], ["draft_rows_shape"], name="draft_vocab_rows",
                                    end=-1),
                   helper.make_node("Concat", ["draft_rows_shape", "draft_vocab_size"], ["draft_full_shape"],
                                    name="draft_vocab_full_shape", axis=0),
                   helper.make_node("Expand", ["draft_floor", "draft_full_shape"], ["draft_floors"],
                                    name="draft_vocab_floors"),
                   helper.make_node("ScatterElements", ["draft_floors", "draft_columns", "draft_kept_logits"], [logits],
                                    name="draft_vocab_scatter", axis=-1)])
    return save_checked(model, dst, "draft vocabulary: onnx.checker rejected the cut draft")
