"""`edgekd generate RUN_DIR --prompt TEXT`: text from a finished causal-LM run's final decoder, alone or as
the draft for its teacher (--speculative, lossless: the teacher's own greedy output), on this host with
the run's target runtime. Greedy by default; --temperature (with --top-k, --top-p, --seed) samples, and
speculative sampling is distributed as the teacher's own sampling (bench/lm_sampling.py);
--repetition-penalty makes repeats less likely, greedy or sampled, speculative or not. --prompts FILE.jsonl
generates for many prompts with the decoders loaded once, a line of JSON for each (lm_prompts.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import EXIT_OK, BadInputError
from .run_decoders import OpenRun

__all__ = ["add_parser", "generate", "generate_many"]

MAX_THREADS = 1024  # a runtime's thread pool of tens of thousands never finishes starting


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text with a causal-lm run's final model",
                              description="Generation with the final decoder of a finished causal-lm run, greedy or sampled "
                                          "(--temperature); --speculative drafts with it for the run's teacher.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (task causal-lm)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="the text to continue")
    given.add_argument("--prompt-file", metavar="FILE", help="the text to continue, read from FILE ('-': stdin)")
    given.add_argument("--messages", metavar="FILE", help="a conversation in JSON ([{role, content}, ...], ending with "
                       "the user's turn; '-': stdin) for the model to answer, through the chat template")
    given.add_argument("--prompts", metavar="FILE", help="many prompts, one per line of JSON Lines ('-': stdin): a "
                       'text, or {"prompt": TEXT} or {"messages": [...]}, with an optional "id"; the decoders load '
                       "once and each result is a line of JSON on stdout")
    p.add_argument("--chat", action="store_true", help="the prompt as a user's message through the tokenizer's chat "
                                                       "template, the assistant's turn to answer")
    p.add_argument("--system", metavar="TEXT", help="the system message before the conversation (with --chat or "
                                                    "--messages)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--speculative", action="store_true", help="the final model drafts (with the run's draft "
                                                                    "vocabulary), the teacher verifies")
    p.add_argument("--draft-tokens", type=int, help="the most a round drafts (default: the run's choice)")
    p.add_argument("--min-confidence", type=float, help="the draft stops where its probability for its next token is "
                                                        "under this, 0 never (default: the run's choice)")
    p.add_argument("--lookup", action=argparse.BooleanOptionalAction, default=None,
                   help="rounds whose last tokens recur in the text propose what followed them (default: the run's choice)")
    p.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: greedy)")
    p.add_argument("--top-k", type=int, help="sample from the K most likely tokens only (default: all)")
    p.add_argument("--top-p", type=float, help="sample from the fewest tokens whose probabilities reach P (default 1)")
    p.add_argument("--seed", type=int, help="the sampling seed (default: a fresh one, printed; the same seed and "
                                            "settings repeat the text)")
    p.add_argument("--repetition-penalty", type=float, metavar="R",
                   help="divide the logit of every token already in the text by R (multiply where negative): above 1, "
                        "fewer repeats (default: none)")
    p.add_argument("--repetition-window", type=int, metavar="N",
                   help="the penalty counts the last N tokens only (default 0: the whole text, prompt included)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end the text before TEXT where it appears (repeat for several; the first to appear ends it)")
    p.add_argument("--stream", action="store_true", help="print the text as its tokens come")
    p.add_argument("--threads", type=int, help="inference threads (default: the run's)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write text and figures as JSON here")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)
    return p


def read_prompt(path: str) -> str:
    """--prompt-file's text ('-': standard input); a missing or unreadable file is bad input."""
    from ..bench.lm_prompts import read_text

    try:
        return read_text(path, "--prompt-file")
    except ValueError as e:
        raise BadInputError(f"generate: {e}") from None


def _settings(max_new_tokens: int, draft_tokens, min_confidence, chat: bool, system, stop, temperature, top_k,
              top_p, seed, repetition_penalty, repetition_window, batch: bool = False):
    """(Sampling or None, RepetitionPenalty or None) for these flags, after checking them all."""
    from ..bench.lm_app import flags_error
    from ..bench.lm_sampling import from_flags, penalty_from_flags

    if max_new_tokens < 1:
        raise BadInputError("generate: --max-new-tokens must be at least 1")
    if draft_tokens is not None and draft_tokens < 1:
        raise BadInputError("generate: --draft-tokens must be at least 1")
    if min_confidence is not None and not 0.0 <= min_confidence < 1.0:
        raise BadInputError("generate: --min-confidence must be in [0, 1)")
    problem = flags_error(system, chat, True if batch else None, stop)
    if problem:
        raise BadInputError(f"generate: {problem}")
    try:
        return from_flags(temperature, top_k, top_p, seed), penalty_from_flags(repetition_penalty, repetition_window)
    except ValueError as e:
        raise BadInputError(f"generate: {e}") from None


def generate(run_dir: str | Path, prompt: str | list, max_new_tokens: int = 64, speculative: bool = False,
             draft_tokens: int | None = None, threads: int | None = None,
             min_confidence: float | None = None, lookup: bool | None = None, chat: bool = False,
             stream: bool = False, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, repetition_penalty: float | None = None,
             repetition_window: int | None = None, stop: list[str] | None = None, system: str | None = None) -> dict:
    """The continuation of `prompt` and its figures (see the module's docstring); `chat`: the prompt as a
    user's message (or `prompt` a list of messages) in the chat template, after `system` where given;
    `temperature` above 0 samples (with `top_k`, `top_p`, `seed`); `repetition_penalty` (over the last
    `repetition_window` tokens, 0: all) shapes every step's logits; the text ends before the first string of
    `stop` to appear."""
    sampling, penalty = _settings(max_new_tokens, draft_tokens, min_confidence, chat, system, stop, temperature,
                                  top_k, top_p, seed, repetition_penalty, repetition_window)
    run = OpenRun(run_dir, speculative, threads)
    ids = run.ids(prompt, chat, system)
    run.check(ids, max_new_tokens)
    try:
        run.open()
        return run.continuation(ids, max_new_tokens, draft_tokens, min_confidence, lookup, sampling, penalty, stop,
                                stream)
    finally:
        run.close()


def generate_many(run_dir: str | Path, prompts: list[dict], max_new_tokens: int = 64, speculative: bool = False,
                  draft_tokens: int | None = None, threads: int | None = None, min_confidence: float | None = None,
                  lookup: bool | None = None, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = None, repetition_penalty: float | None = None,
                  repetition_window: int | None = None, stop: list[str] | None = None, where: str = "--prompts",
                  on_result=None) -> list[dict]:
    """generate() for every record of `prompts` (lm_prompts.read_prompts: "prompt" a text to continue or a list
    of messages for the chat template), with the decoders loaded once; every prompt is checked before the first
    is generated. Each result carries its "index" (and "id" where the record has one) and goes to
    `on_result` as it comes. Sampled, the i-th prompt is seeded with seed + i (its own "sampling" says which)."""
    sampling, penalty = _settings(max_new_tokens, draft_tokens, min_confidence, False, None, stop, temperature,
                                  top_k, top_p, seed, repetition_penalty, repetition_window, batch=True)
    run = OpenRun(run_dir, speculative, threads)
    for i, p in enumerate(prompts):
        line = f"{where} line {p['line']}" if p.get("line") else f"{where} prompt {i}"
        p["ids"] = run.ids(p["prompt"], isinstance(p["prompt"], list), None, f"{line}'s prompt")
        run.check(p["ids"], max_new_tokens, line)
    results = []
    try:
        run.open()
        for i, p in enumerate(prompts):
            out = run.continuation(p["ids"], max_new_tokens, draft_tokens, min_confidence, lookup,
                                   sampling.for_prompt(i) if sampling else None, penalty, stop)
            out = {"index": i, **({"id": p["id"]} if p.get("id") is not None else {}), **out}
            if on_result is not None:
                on_result(out)
            results.append(out)
    finally:
        run.close()
    return results


def run(args: argparse.Namespace) -> int:
    loose = [flag for flag, value in (("--draft-tokens", args.draft_tokens), ("--min-confidence", args.min_confidence),
                                      ("--lookup/--no-lookup", args.lookup)) if value is not None]
    if loose and not args.speculative:
        raise BadInputError(f"generate: {loose[0]} sets speculative decoding; add --speculative")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise BadInputError(f"generate: --threads must be 1 to {MAX_THREADS}, got {args.threads}"
                            if args.threads > 0 else f"generate: --threads must be at least 1, got {args.threads}")
    if args.json_out:
        from ..runs import check_output_file

        check_output_file(args.json_out, "generate: --json", (getattr(args, "prompts", None), args.messages, args.prompt_file))
    from ..bench.lm_app import figures_line
    from ..bench.lm_prompts import read_messages, read_prompts, summary, summary_line

    if args.prompts is not None:
        return _run_many(args, read_prompts, summary, summary_line, figures_line)
    if args.messages is not None:
        try:
            prompt: str | list = read_messages(args.messages, args.system)
        except ValueError as e:
            raise BadInputError(f"generate: {e}") from None
    else:
        prompt = args.prompt if args.prompt is not None else read_prompt(args.prompt_file)
    out = generate(args.run_dir, prompt, args.max_new_tokens, args.speculative, args.draft_tokens, args.threads,
                   args.min_confidence, args.lookup, chat=args.chat or args.messages is not None,
                   system=None if args.messages else args.system, stream=args.stream, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
                   repetition_window=args.repetition_window, stop=args.stop)
    if not out.get("streamed"):
        print(out["text"])
    print(figures_line(out), file=sys.stderr)
    if args.json_out:
        from ..runs import write_json

        write_json(args.json_out, out)
    return EXIT_OK


def _run_many(args: argparse.Namespace, read_prompts, summary, summary_line, figures_line) -> int:
    """--prompts FILE: a line of JSON on stdout for each prompt's result as it comes, its figures on stderr,
    the batch's figures last; --json holds them and every result."""
    if args.stream:
        raise BadInputError("generate: --stream prints one text as it comes; with --prompts each result is a line of "
                            "JSON")
    try:
        prompts = read_prompts(args.prompts, args.chat, args.system)
    except ValueError as e:
        raise BadInputError(f"generate: {e}") from None

    def show(out: dict) -> None:
        print(json.dumps(out, ensure_ascii=False), flush=True)
        print(f"[{out['index'] + 1}/{len(prompts)}] {figures_line(out)}", file=sys.stderr, flush=True)

    results = generate_many(args.run_dir, prompts, args.max_new_tokens, args.speculative, args.draft_tokens,
                            args.threads, args.min_confidence, args.lookup, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            repetition_penalty=args.repetition_penalty, repetition_window=args.repetition_window,
                            stop=args.stop, where=f"--prompts {args.prompts}", on_result=show)
    out = {**summary(results), "results": results}
    print(summary_line(out), file=sys.stderr)
    if args.json_out:
        from ..runs import write_json

        write_json(args.json_out, out)
    return EXIT_OK
