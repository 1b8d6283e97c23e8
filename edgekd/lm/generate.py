"""`edgekd generate RUN_DIR --prompt TEXT`: text from a finished causal-LM run's final decoder, alone or as
the draft for its teacher (--speculative, lossless: the teacher's own greedy output), on this host with
the run's target runtime. Greedy by default; --temperature (with --top-k, --top-p, --seed) samples, and
speculative sampling is distributed as the teacher's own sampling (bench/lm_sampling.py);
--repetition-penalty makes repeats less likely, greedy or sampled, speculative or not."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from ..errors import EXIT_OK, BadInputError

__all__ = ["add_parser", "generate"]


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


def _load(run: Path) -> dict:
    path = run / "report.json"
    if not path.is_file():
        raise BadInputError(f"generate: {run} has no report.json (not a finished run directory)")
    try:
        report = json.loads(path.read_text())
    except ValueError as e:
        raise BadInputError(f"generate: {path} is not valid JSON ({e})") from None
    if report.get("task") != "causal-lm":
        raise BadInputError(f"generate: {run} is a {report.get('task', 'image-classification')} run; generate needs "
                            "a causal-lm run")
    if not (run / "tokenizer").is_dir():
        raise BadInputError(f"generate: {run}/tokenizer is missing")
    return report


def _decoder(run: Path, block: dict, threads: int | None):
    from ..backends import Artifact, get_backend
    from ..config.profiles import load_profile
    from .decode import Decoder

    report_target = block["_target"]
    profile = load_profile(report_target)
    if profile.backend == "tensorrt":
        raise BadInputError(f"generate: {run} was built for {profile.name} (TensorRT): build its engines on the board "
                            "(target/jetson-lm/build_engine.sh) and generate there with trt_lm_runner.py")
    path = run / block["artifact"]
    if not path.is_file():
        raise BadInputError(f"generate: {path} is missing from the run directory")
    cfg = SimpleNamespace(**block["decoder"])
    if profile.backend == "openvino":  # the cache in the infer request's states, as the run measured it
        return _stateful(path, block, profile, threads, cfg)
    art = Artifact(path=path, backend=profile.backend, precision=block.get("precision", "fp32"), files=[path])
    runner = get_backend(profile.backend).load(art, profile, threads, spin=False)
    return runner, Decoder(runner.run, cfg, cfg.num_hidden_layers, session=getattr(runner, "session", None))


def _stateful(path: Path, block: dict, profile, threads: int | None, cfg):
    """(closer, Decoder) for an OpenVINO IR loaded the way the run's measurements load it (decode.openvino_decoder)."""
    from ..bench.lm_runner import RunnerError
    from ..errors import ModelError, StageError
    from .decode import openvino_decoder

    try:
        dec = openvino_decoder(path, cfg, threads or profile.threads, profile.device, block.get("precision", "fp32"))
    except RunnerError as e:
        raise (ModelError if e.exit_code == 2 else StageError)(f"generate: {e}") from None
    return SimpleNamespace(close=lambda: None), dec


def _check_context(blocks: list, prompt_tokens: int, max_new_tokens: int) -> None:
    """A prompt and its continuation must fit the positions every decoder in use takes (runs before 0.1 did
    not record them: the runtime says so then)."""
    limits = [b["decoder"]["max_positions"] for b in blocks if b["decoder"].get("max_positions")]
    if limits and prompt_tokens + max_new_tokens > min(limits):
        raise BadInputError(f"generate: the prompt's {prompt_tokens} tokens and --max-new-tokens {max_new_tokens} "
                            f"need {prompt_tokens + max_new_tokens} positions; the model takes at most {min(limits)}")


def _chat_ids(tok, messages: list) -> list[int]:
    """The messages (lm_app.conversation) in the tokenizer's chat template, opening the assistant's turn."""
    if not getattr(tok, "chat_template", None):
        raise BadInputError("generate: --chat needs a chat template, and the run's tokenizer has none")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in some transformers versions
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def read_prompt(path: str) -> str:
    """--prompt-file's text ('-': standard input); a missing or unreadable file is bad input."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"generate: --prompt-file {path}: {getattr(e, 'strerror', None) or e}") from None


def generate(run_dir: str | Path, prompt: str | list, max_new_tokens: int = 64, speculative: bool = False,
             draft_tokens: int | None = None, threads: int | None = None,
             min_confidence: float | None = None, lookup: bool | None = None, chat: bool = False,
             stream: bool = False, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, repetition_penalty: float | None = None,
             repetition_window: int | None = None, stop: list[str] | None = None, system: str | None = None) -> dict:
    """The continuation of `prompt` and its figures (see the module's docstring); `chat`: the prompt as a
    user's message (or `prompt` a list of messages) in the chat template, after `system` where given; `temperature` above 0 samples (with `top_k`, `top_p`, `seed`);
    `repetition_penalty` (over the last `repetition_window` tokens, 0: all) shapes every step's logits; the
    text ends before the first string of `stop` to appear."""
    from transformers import AutoTokenizer

    from ..bench import lm_generation
    from ..bench.lm_sampling import from_flags, penalty_from_flags
    from .speculative import UNCHOSEN

    if max_new_tokens < 1:
        raise BadInputError("generate: --max-new-tokens must be at least 1")
    if draft_tokens is not None and draft_tokens < 1:
        raise BadInputError("generate: --draft-tokens must be at least 1")
    if min_confidence is not None and not 0.0 <= min_confidence < 1.0:
        raise BadInputError("generate: --min-confidence must be in [0, 1)")
    from ..bench.lm_app import flags_error

    problem = flags_error(system, chat, None, stop)
    if problem:
        raise BadInputError(f"generate: {problem}")
    try:
        sampling = from_flags(temperature, top_k, top_p, seed)
        penalty = penalty_from_flags(repetition_penalty, repetition_window)
    except ValueError as e:
        raise BadInputError(f"generate: {e}") from None
    run = Path(run_dir)
    report = _load(run)
    target = report["target"]["name"]
    threads = threads or report["target"].get("threads")
    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    if chat:
        from ..bench.lm_app import conversation

        ids = _chat_ids(tok, conversation(prompt, system))
    else:
        ids = tok.encode(prompt, add_special_tokens=False)
    if not ids:
        raise BadInputError("generate: the prompt is empty after tokenisation")
    final = {**report["final"], "_target": target}
    _check_context([final, report["teacher"]] if speculative else [final], len(ids), max_new_tokens)
    drafting = ((report.get("speculative") or {}).get("draft") or {}).get("artifact") if speculative else None
    streamer = None
    if stream or stop:
        from ..bench.lm_app import Streamer

        streamer = Streamer(tok.decode, tok.eos_token_id, max_new_tokens, stops=stop or (), show=stream)
    runners = []
    try:
        runner, draft = _decoder(run, {**final, "artifact": drafting} if drafting else final, threads)
        runners.append(runner)
        out: dict = {"prompt_tokens": len(ids), "model": drafting or final["artifact"]}
        t0 = time.perf_counter()
        if speculative:
            chosen = report.get("speculative") or {}
            k = draft_tokens or chosen.get("draft_tokens") or UNCHOSEN[0]
            floor = min_confidence if min_confidence is not None else chosen.get("min_confidence", 0.0)
            copy = bool(chosen.get("lookup", False)) if lookup is None else lookup
            runner, teacher = _decoder(run, {**report["teacher"], "_target": target}, threads)
            runners.append(runner)
            t0 = time.perf_counter()
            rule = lm_generation.Greedy(floor) if sampling is None else sampling.drafting(floor)
            res = lm_generation.speculative(teacher, draft, ids, max_new_tokens, k, rule, copy,
                                            eos=tok.eos_token_id, on_tokens=streamer, penalty=penalty)
            tokens = res.tokens
            out.update({"speculative": True, "draft_tokens": k, "min_confidence": floor, "lookup": copy,
                        "drafted": res.drafted,
                        "acceptance_rate": None if res.acceptance_rate is None else round(res.acceptance_rate, 4),
                        "looked_up": res.looked_up, "lookup_accepted": res.lookup_accepted,
                        "teacher": report["teacher"]["artifact"]})
            if res.acceptance_rate is None:
                from ..bench.lm_generation import NOTHING_DRAFTED

                out["not_measured"] = {"acceptance_rate": NOTHING_DRAFTED}
            checks = res.target_passes - 1  # the passes after the prompt's
            if checks:
                out["round"] = {"tokens": round((len(res.tokens) - 1) / checks, 3),
                                "check_ms": round(1000 * res.check_seconds / checks, 3),
                                "draft_ms": round(1000 * res.draft_seconds / checks, 3)}
        else:
            tokens = lm_generation.continue_ids(draft, ids, max_new_tokens, tok.eos_token_id, streamer, sampling,
                                                penalty)
        seconds = time.perf_counter() - t0
    finally:
        for r in runners:
            r.close()
    if tok.eos_token_id in tokens:
        tokens = tokens[:tokens.index(tok.eos_token_id)]
    text = tok.decode(tokens)
    if streamer is not None and streamer.stop is not None:  # the tokens up to the one that completed it
        tokens, text, out["stop"] = streamer.ids, streamer.text, streamer.stop
    out.update({"text": text, "tokens": len(tokens), "token_ids": tokens,
                "seconds": round(seconds, 4), "tokens_per_s": round(len(tokens) / seconds, 2) if seconds else None})
    if sampling is not None:
        out["sampling"] = sampling.record()
        out["sampled"] = sampling.describe()
    if penalty is not None:
        out["repetition"] = penalty.record()
        out["penalised"] = penalty.describe()
    if stream:
        streamer.finish(out["text"])  # type: ignore[union-attr]
        out["streamed"] = True
    return out


def run(args: argparse.Namespace) -> int:
    loose = [flag for flag, value in (("--draft-tokens", args.draft_tokens), ("--min-confidence", args.min_confidence),
                                      ("--lookup/--no-lookup", args.lookup)) if value is not None]
    if loose and not args.speculative:
        raise BadInputError(f"generate: {loose[0]} sets speculative decoding; add --speculative")
    if args.threads is not None and args.threads < 1:
        raise BadInputError(f"generate: --threads must be at least 1, got {args.threads}")
    if args.json_out:
        from ..runs import check_output_file

        check_output_file(args.json_out, "generate: --json")
    if args.messages is not None:
        from ..bench.lm_app import read_messages

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
    from ..bench.lm_app import figures_line

    print(figures_line(out), file=sys.stderr)
    if args.json_out:
        from ..runs import write_json

        write_json(args.json_out, out)
    return EXIT_OK
