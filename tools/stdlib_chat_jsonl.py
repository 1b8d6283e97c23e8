"""Write a chat dataset in JSON Lines from Python's standard library: one record per documented top-level
function, {"messages": [user: "Write the Python function NAME(ARGS): FIRST DOCSTRING LINE", assistant: its
source in a ```python fenced block]}, split by module into train.jsonl and test.jsonl (every fifth module, in
sorted order, to test). Real text in the form users bring for an instruct model (what `data.files: {train,
test}` and chat records read).

The answer is fenced because that is how the teacher (SmolLM2-135M-Instruct) answers a request for code.
Answers that open otherwise (the bare source) disagree with the teacher at the answer's first token: token-level
KD then teaches the student the teacher's "```" there, while no training text shows what follows it, and the
distilled student's free-running answer loops on "```" (measured: BENCHMARKS.md, the chat example).

    python tools/stdlib_chat_jsonl.py --out /tmp/chat
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekd.data.text import stdlib_sources  # noqa: E402


def records(path: Path) -> list[dict]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        code = ast.get_source_segment(source, node)
        if not doc or not code or len(code) > 4000:
            continue
        args = ast.unparse(node.args)
        ask = f"Write the Python function {node.name}({args}): {doc.strip().splitlines()[0]}"
        answer = f"```python\n{code}\n```"
        out.append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "test": 0}
    with (out / "train.jsonl").open("w") as train, (out / "test.jsonl").open("w") as test:
        for i, path in enumerate(stdlib_sources()):
            split = "test" if i % 5 == 4 else "train"
            for rec in records(path):
                (test if split == "test" else train).write(json.dumps(rec) + "\n")
                counts[split] += 1
    print(f"{out}/train.jsonl: {counts['train']} records, {out}/test.jsonl: {counts['test']} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
