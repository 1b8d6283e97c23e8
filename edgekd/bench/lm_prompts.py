"""What the two generate commands (`edgekd generate`, and generate.py on a board) are asked: a conversation
from --messages, and many prompts at once from --prompts FILE.jsonl; and the figures of a batch in one line.
Standard library only: it travels with lm_app.py into target/app/.

A --prompts file holds one prompt per line (blank lines skipped), each a JSON string (the text to continue) or
an object with "prompt" (the same) or "messages" (a conversation for the chat template, as --messages takes
it), and optionally "id" (any JSON value, handed back with the prompt's result); other keys are left alone,
so the records of JSON Lines chat data can be given as they are where they end with the user's turn."""
from __future__ import annotations

import json
import sys

__all__ = ["ROLES", "conversation", "read_messages", "read_prompts", "read_text", "summary", "summary_line"]

ROLES = ("system", "user", "assistant")


def conversation(prompt, system: str | None = None) -> list:
    """The messages a chat prompt stands for: `prompt` as one user message (or already a list of messages),
    after `system` as the system message where given."""
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return ([{"role": "system", "content": system}] if system is not None else []) + messages


def _messages(data, where: str, system: str | None) -> list:
    """The conversation held by `data` (a list of {"role", "content"} or an object with one under "messages"),
    checked: it ends with the user's turn, and with `system` it has no system message of its own. What is
    wrong raises ValueError naming `where`."""
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'{where}: expected a list of messages, or an object with one under "messages"')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} needs a role ({', '.join(ROLES)}) and a text content")
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message is the {messages[-1]['role']}'s; the model answers a user's message")
    if system is not None and any(m["role"] == "system" for m in messages):
        raise ValueError(f"{where} holds a system message already; leave out --system")
    return conversation(messages, system)


def read_text(path: str, flag: str) -> str:
    """The UTF-8 text of the file `flag` names ('-': standard input); what is wrong raises ValueError."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{flag} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path} is not UTF-8 text ({e})") from None


def read_messages(path: str, system: str | None = None) -> list:
    """--messages FILE ('-': standard input): a conversation in JSON, a list of {"role", "content"} or an
    object holding one under "messages" (a record of the JSON Lines chat data), ending with the user's turn for
    the model to answer; with `system` it may not hold a system message of its own. What is wrong raises
    ValueError with the line to show."""
    where = f"--messages {path}"
    text = read_text(path, "--messages")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where} is not JSON ({e})") from None
    return _messages(data, where, system)


def read_prompts(path: str, chat: bool = False, system: str | None = None) -> list[dict]:
    """--prompts FILE ('-': standard input) as [{"line", "id", "prompt"}]: "prompt" is the text to continue,
    or a list of messages for the chat template (a "messages" record; a text too with `chat`, as a user's
    message), after `system` where given. What is wrong raises ValueError naming the file and line."""
    text = read_text(path, "--prompts")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--prompts {path} line {n}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where} is not JSON ({e}); each line is a JSON string or object") from None
        if isinstance(record, str):
            record = {"prompt": record}
        if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
            raise ValueError(f'{where}: expected a JSON string, or an object with "prompt" (a text) or "messages" '
                             "(a conversation)")
        if "messages" in record:
            prompt: str | list = _messages(record, where, system)
        elif not isinstance(record["prompt"], str):
            raise ValueError(f'{where}: "prompt" must be a text, got {type(record["prompt"]).__name__}')
        elif system is not None and not chat:
            raise ValueError(f"{where}: --system is a chat's system message and this line is a text to continue; "
                             'add --chat, or give it as "messages"')
        else:
            prompt = conversation(record["prompt"], system) if chat else record["prompt"]
        out.append({"line": n, "id": record.get("id"), "prompt": prompt})
    if not out:
        raise ValueError(f"--prompts {path} holds no prompt")
    return out


def summary(results: list[dict]) -> dict:
    """The figures of a batch: prompts, tokens and seconds in all, tokens/s over the whole batch, and where
    drafted, the acceptance over every drafted token (None where none was drafted)."""
    tokens, seconds = sum(r["tokens"] for r in results), sum(r["seconds"] for r in results)
    out = {"prompts": len(results), "tokens": tokens, "seconds": round(seconds, 4),
           "tokens_per_s": round(tokens / seconds, 2) if seconds else None}
    drafted = [r for r in results if r.get("speculative")]
    if drafted:
        n = sum(r["drafted"] for r in drafted)
        out.update({"speculative": True, "drafted": n, "accepted": sum(r["accepted"] for r in drafted),
                    "acceptance_rate": round(sum(r["accepted"] for r in drafted) / n, 4) if n else None})
    return out


def summary_line(s: dict) -> str:
    """`20 prompts: 1280 tokens in 14.2 s, 90.1 tokens/s[, acceptance 61.0% of 900 drafted]`."""
    line = (f"{s['prompts']} prompt{'' if s['prompts'] == 1 else 's'}: {s['tokens']} tokens in {s['seconds']:.1f} s, "
            f"{s['tokens_per_s']} tokens/s")
    if s.get("speculative"):
        line += (", none drafted" if s["acceptance_rate"] is None
                 else f", acceptance {s['acceptance_rate']:.1%} of {s['drafted']} drafted")
    return line
