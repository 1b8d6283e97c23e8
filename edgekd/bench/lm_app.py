#!/usr/bin/env python3
"""Text in, text out on the board: an edgekd causal-LM run's final decoder with its tokenizer, without edgekd,
PyTorch or transformers. edgekd copies this file as generate.py into target/app/ beside lm_runner.py,
lm_generation.py, lm_figures.py, lm_sampling.py, lm_prompts.py, runner.py, the decoders and the tokenizer;
bundle.json says which file is which.

    python3 generate.py --prompt TEXT | --prompt-file FILE [--chat [--system TEXT]] | --messages FILE.json
                        | --prompts FILE.jsonl
                        [--max-new-tokens 64] [--stream]
                        [--temperature T [--top-k K] [--top-p P] [--seed N]] [--repetition-penalty R [--repetition-window N]]
                        [--stop TEXT ...]
                        [--speculative [--draft-tokens K] [--min-confidence P] [--lookup 0|1]] [--threads N]
                        [--json OUT]

Needs numpy, the runtime the run was built for (onnxruntime, or openvino for an intel-cpu run) and the
`tokenizers` package; --chat also needs jinja2 (the tokenizer's chat template is a Jinja template). Greedy
decoding, or sampled with --temperature (lm_sampling), through the same loading and decode loops that measured
the run (lm_runner.load, lm_generation); with --speculative the final decoder drafts and the teacher checks
(lossless: the teacher's own greedy output, or distributed as the teacher's own sampling); a repetition penalty
shapes every step's logits, the teacher's checks included.
The continuation is printed on stdout, the figures on stderr; with --prompts (lm_prompts.py: one prompt per line
of JSON Lines) each prompt's result is a line of JSON on stdout as it comes, and --json holds the batch's figures
and every result. Exit 2: bad input; exit 3: a missing package or a runtime failure."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

if __package__:  # imported as edgekd.bench.lm_app
    from .lm_prompts import conversation, read_messages, read_prompts, read_text, summary, summary_line
else:  # generate.py on a board, lm_prompts.py beside it
    from lm_prompts import conversation, read_messages, read_prompts, read_text, summary, summary_line  # type: ignore[no-redef]

EXIT_BAD_INPUT, EXIT_RUNTIME = 2, 3


class Streamer:
    """Watches a continuation as its tokens come (on_tokens of the decode loops), up to `limit` tokens, ending
    before `eos`. With `show` it prints the text decoded so far past what is already shown, held back while it
    ends in an incomplete character or could be the start of a stop string. With `stops` the text ends before
    the first of them to appear: `ids` keeps the tokens up to the one that completed it, `text` the text before
    it, `stop` the string, and the call answers True so the loop ends there. finish() prints what is left."""

    def __init__(self, decode, eos, limit: int, out=None, stops=(), show: bool = True):
        self.decode, self.eos, self.limit, self.out = decode, eos, limit, out or sys.stdout
        self.stops, self.show = [t for t in stops if t], show
        self.ids: list = []
        self.shown = ""
        self.text: str | None = None
        self.stop: str | None = None
        self.done = False

    def _stopped(self) -> bool:
        """Whether the text so far holds a stop string: if so, cut there."""
        text = self.decode(self.ids)
        at = [(text.find(t), t) for t in self.stops if t in text]
        if not at:
            return False
        cut, self.stop = min(at)
        self.text, self.done = text[:cut], True
        return True

    def _partial(self, text: str) -> int:
        """How many characters at the end of `text` could be the start of a stop string (held back)."""
        return max((k for t in self.stops for k in range(1, min(len(t), len(text) + 1)) if text.endswith(t[:k])),
                   default=0)

    def __call__(self, tokens: list) -> bool:
        for t in tokens:
            if self.done or t == self.eos or len(self.ids) >= self.limit:
                self.done = True
                break
            self.ids.append(t)
            if self.stops and self._stopped():
                break
        if self.show:
            text = self.text if self.stop is not None else self.decode(self.ids)
            ready = text if self.stop is not None else text[:len(text) - self._partial(text)]
            if not ready.endswith("\ufffd") and ready.startswith(self.shown):
                self.out.write(ready[len(self.shown):])
                self.out.flush()
                self.shown = ready
        return self.stop is not None

    def finish(self, text: str) -> None:
        self.out.write((text[len(self.shown):] if text.startswith(self.shown) else "\n" + text) + "\n")
        self.out.flush()


class AppError(Exception):
    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


def _bundle() -> dict:
    """bundle.json beside this file: the app's own (target/app/), or its "app" entry (a Jetson bundle, whose
    bundle.json is trt_lm_runner.py's)."""
    try:
        with open(os.path.join(HERE, "bundle.json")) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise AppError(f"bundle.json beside generate.py cannot be read ({e})") from None
    return data.get("app", data)


def _tokenizer(bundle: dict):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise AppError("the tokenizers package is not installed: pip install tokenizers", EXIT_RUNTIME) from None
    path = os.path.join(HERE, bundle["tokenizer"]["file"])
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the Rust library raises its own exception type
        raise AppError(f"{path} cannot be read as a tokenizer ({e})") from None


def chat_text(bundle: dict, messages: list) -> str:
    """The messages (conversation()) in the tokenizer's chat template, the assistant's turn opened (what
    transformers' apply_chat_template(add_generation_prompt=True) writes)."""
    tok = bundle["tokenizer"]
    template = tok.get("chat_template")
    if not template:
        raise AppError("chat prompts (--chat, --messages, messages lines) need a chat template; the run's tokenizer "
                       "has none")
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise AppError("--chat needs the jinja2 package: pip install jinja2", EXIT_RUNTIME) from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                **tok.get("special_tokens", {}))
    except TemplateError as e:
        raise AppError(f"the chat template refused the prompt ({e})") from None


def flags_error(system, chat: bool, messages, stop) -> str | None:
    """What is wrong with the text flags both generate commands take (--system, --stop), or None."""
    if system is not None and not chat and messages is None:
        return "--system sets the chat's system message; add --chat"
    if stop is not None and not all(stop):
        return "--stop needs a text to stop at, got an empty one"
    return None


def figures_line(out: dict) -> str:
    """The figures line both generate commands print on stderr: tokens and speed, how the text was sampled,
    penalised and stopped, and with --speculative the acceptance, drafting and (where timed) a round's cost."""
    parts = [f"{out['tokens']} tokens, {out['tokens_per_s']} tokens/s"]
    parts += [out[k] for k in ("sampled", "penalised") if out.get(k)]
    if out.get("stop") is not None:
        parts.append(f"stopped at {out['stop']!r}")
    if out.get("speculative"):
        k, floor = out["draft_tokens"], out.get("min_confidence")
        rate = "none drafted" if out["acceptance_rate"] is None else f"acceptance {out['acceptance_rate']:.1%}"
        parts.append(f"{rate} drafting up to {k} token{'' if k == 1 else 's'}" + (f" while p >= {floor:g}" if floor else ""))
        if out.get("lookup") and "looked_up" in out:
            parts.append(f"{out['lookup_accepted']}/{out['looked_up']} looked-up tokens kept")
    line = ", ".join(parts)
    r = out.get("round")
    if r:
        line += f"; a round: {r['tokens']:.2f} tokens, check {r['check_ms']:.1f} + draft {r['draft_ms']:.1f} ms"
    return line


def _load(bundle: dict, role: str, threads, draft: bool):
    entry = bundle[role]
    if bundle["backend"] == "tensorrt":
        return _engine(os.path.join(HERE, entry["file"]))
    import argparse as ap

    from lm_runner import load  # type: ignore[import-not-found]

    args = ap.Namespace(model=os.path.join(HERE, entry["file"]), backend=bundle["backend"], threads=threads,
                        providers=",".join(bundle.get("providers") or []) or None, device=bundle.get("device", "CPU"),
                        precision=entry["precision"], precise_int8=False, kv_heads=entry["kv_heads"],
                        head_dim=entry["head_dim"], kv_cache="auto", draft="yes" if draft else None)
    return load(args)[0]


_CUDA: list = []  # the one device-memory helper of this process (trt_device.cuda_memory)


def _engine(path: str):
    """A TensorRT engine the board built (build_engine.sh) as lm_generation's loops take a decoder
    (trt_lm_decode.EngineLoop over trt_lm_runner.EngineDecoder: the cache on the device)."""
    if not os.path.isfile(path):
        raise AppError(f"{os.path.basename(path)} is not built yet: run ./build_engine.sh beside generate.py first")
    from trt_lm_decode import EngineLoop  # type: ignore[import-not-found]
    from trt_lm_runner import EngineDecoder  # type: ignore[import-not-found]
    from trt_runner import _import_tensorrt  # type: ignore[import-not-found]

    trt = _import_tensorrt()
    if not _CUDA:
        from trt_device import cuda_memory  # type: ignore[import-not-found]

        _CUDA.append(cuda_memory())
    return EngineLoop(EngineDecoder.load(trt, path, _CUDA[0]))


def decoders(bundle: dict, speculative: bool, threads) -> dict:
    """The bundle's decoders a generation needs, loaded once for every prompt: the teacher and the draft with
    `speculative`, else the final model."""
    if bundle["backend"] != "tensorrt":
        import lm_runner  # type: ignore[import-not-found]

        lm_runner._POOL["allowed"] = True  # this process is the app's own: two sessions may share one pool
    if not speculative:
        return {"model": _load(bundle, "model", threads, False)}
    if "teacher" not in bundle:
        raise AppError("--speculative needs the teacher's decoder, and this bundle was written without it")
    return {"teacher": _load(bundle, "teacher", threads, True), "draft": _load(bundle, "draft", threads, True)}


def generate(bundle: dict, loaded: dict, ids: list, max_new_tokens: int, draft_tokens=None, min_confidence=None,
             lookup=None, on_tokens=None, sampling=None, penalty=None) -> dict:
    """One prompt's continuation with the decoders of decoders(): speculative where they are the teacher and
    the draft."""
    from lm_generation import Greedy, continue_ids  # type: ignore[import-not-found]
    from lm_generation import speculative as speculate  # type: ignore[import-not-found]

    eos = bundle["tokenizer"].get("eos_token_id")
    out: dict = {"prompt_tokens": len(ids)}
    if "teacher" in loaded:
        chosen = bundle.get("speculative") or {}
        k = draft_tokens or chosen.get("draft_tokens") or 2
        floor = chosen.get("min_confidence", 0.0) if min_confidence is None else min_confidence
        copy = bool(chosen.get("lookup", False)) if lookup is None else bool(lookup)
        t0 = time.perf_counter()
        rule = Greedy(floor) if sampling is None else sampling.drafting(floor)
        res = speculate(loaded["teacher"], loaded["draft"], ids, max_new_tokens, k, rule, copy, eos=eos,
                        on_tokens=on_tokens, penalty=penalty)
        seconds, tokens = time.perf_counter() - t0, res.tokens
        out.update({"speculative": True, "draft_tokens": k, "min_confidence": floor, "lookup": copy,
                    "drafted": res.drafted, "accepted": res.accepted, "acceptance_rate": None
                    if res.acceptance_rate is None else round(res.acceptance_rate, 4)})
    else:
        t0 = time.perf_counter()
        tokens = continue_ids(loaded["model"], ids, max_new_tokens, eos, on_tokens, sampling, penalty)
        seconds = time.perf_counter() - t0
    if eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    out.update({"tokens": len(tokens), "token_ids": tokens, "seconds": round(seconds, 4),
                "tokens_per_s": round(len(tokens) / seconds, 2) if seconds else None})
    if sampling is not None:
        out.update({"sampling": sampling.record(), "sampled": sampling.describe()})
    if penalty is not None:
        out.update({"repetition": penalty.record(), "penalised": penalty.describe()})
    return out


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line, exit 2 (argparse prints its usage too)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _check_json_out(path: str) -> None:
    """--json must be writable before minutes of generation: a real write in its folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise AppError(f"--json {path}: is a directory; give a file path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".generate-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AppError(f"--json {path}: {folder} is not writable ({e.strerror})") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = _OneLineParser(prog="generate.py", description="Generation (greedy, or sampled with --temperature) "
                                "with the final decoder of an edgekd causal-lm run, on this machine's runtime.")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="the text to continue")
    given.add_argument("--prompt-file", metavar="FILE", help="the text to continue, read from FILE ('-': stdin)")
    given.add_argument("--messages", metavar="FILE", help="a conversation in JSON ([{role, content}, ...], ending with "
                       "the user's turn) for the model to answer, through the chat template")
    given.add_argument("--prompts", metavar="FILE", help="many prompts, one per line of JSON Lines (a text, or "
                       '{"prompt"} or {"messages"}, with an optional "id"): one line of JSON out for each')
    p.add_argument("--chat", action="store_true", help="the prompt as a user's message in the chat template")
    p.add_argument("--system", metavar="TEXT", help="the system message before the conversation (with --chat or "
                                                    "--messages)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--speculative", action="store_true", help="the final decoder drafts, the teacher checks")
    p.add_argument("--draft-tokens", type=int, default=None, help="the most a round drafts (default: the run's choice)")
    p.add_argument("--min-confidence", type=float, default=None, help="the draft's probability floor (default: the run's)")
    p.add_argument("--lookup", type=int, choices=[0, 1], default=None, help="context lookup (default: the run's choice)")
    p.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="sample from the fewest tokens reaching probability P")
    p.add_argument("--seed", type=int, default=None, help="the sampling seed (default: a fresh one, in the JSON)")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="divide the logit of every token already in the text by R (above 1: fewer repeats)")
    p.add_argument("--repetition-window", type=int, default=None, metavar="N",
                   help="the penalty counts the last N tokens only (default 0: the whole text)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the text before TEXT where it appears (repeat for several)")
    p.add_argument("--stream", action="store_true", help="print the text as its tokens come")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: the run's profile)")
    p.add_argument("--json", default=None, help="write the text and figures as JSON here")
    return p.parse_args(argv)


def _prompt(args) -> str:
    return args.prompt if args.prompt is not None else read_text(args.prompt_file, "--prompt-file")


def _sampling(args):
    """(lm_sampling.Sampling for --temperature above 0, else None (greedy); lm_sampling.RepetitionPenalty or None)."""
    from lm_sampling import from_flags, penalty_from_flags  # type: ignore[import-not-found]

    try:
        return (from_flags(args.temperature, args.top_k, args.top_p, args.seed),
                penalty_from_flags(args.repetition_penalty, args.repetition_window))
    except ValueError as e:
        raise AppError(str(e)) from None


def _prompts(args, bundle: dict) -> list[dict]:
    """[{"line", "id", "prompt"}]: --prompts' records, or the one prompt of --prompt, --prompt-file or --messages
    ("prompt": a text, or a list of messages for the chat template)."""
    try:
        if args.prompts is not None:
            return read_prompts(args.prompts, args.chat, args.system)
        if args.messages is not None:
            prompt: str | list = read_messages(args.messages, args.system)
        else:
            prompt = _prompt(args)
            prompt = conversation(prompt, args.system) if args.chat else prompt
    except ValueError as e:
        raise AppError(str(e)) from None
    return [{"line": None, "id": None, "prompt": prompt}]


def _one(bundle: dict, loaded: dict, tok, ids: list, args, sampling, penalty) -> dict:
    """One prompt's continuation and figures, its text decoded and cut before a stop string."""
    streamer = None
    if args.stream or args.stop:
        streamer = Streamer(lambda t: tok.decode(t, skip_special_tokens=False), bundle["tokenizer"].get("eos_token_id"),
                            args.max_new_tokens, stops=args.stop or (), show=args.stream)
    out = generate(bundle, loaded, ids, args.max_new_tokens, args.draft_tokens, args.min_confidence, args.lookup,
                   on_tokens=streamer, sampling=sampling, penalty=penalty)
    out["text"] = tok.decode(out["token_ids"], skip_special_tokens=False)
    if streamer is not None and streamer.stop is not None:  # the tokens up to the one that completed it
        out.update({"token_ids": streamer.ids, "tokens": len(streamer.ids), "text": streamer.text, "stop": streamer.stop,
                    "tokens_per_s": round(len(streamer.ids) / out["seconds"], 2) if out["seconds"] else None})
    if args.stream:
        streamer.finish(out["text"])
        out["streamed"] = True
    return out


def run(args) -> list[dict]:
    """Every prompt's result in order; with --prompts each is also printed as a JSON line as it comes (its
    "index", and its "id" where the record has one), its figures on stderr."""
    if args.max_new_tokens < 1:
        raise AppError("--max-new-tokens must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise AppError("--threads must be at least 1")
    batch = args.prompts is not None
    problem = flags_error(args.system, args.chat, args.messages if not batch else args.prompts, args.stop)
    if problem:
        raise AppError(problem)
    if batch and args.stream:
        raise AppError("--stream prints one text as it comes; with --prompts each result is a line of JSON")
    if not args.speculative and (args.draft_tokens, args.min_confidence, args.lookup) != (None, None, None):
        raise AppError("--draft-tokens, --min-confidence and --lookup set speculative decoding; add --speculative")
    sampling, penalty = _sampling(args)
    bundle = _bundle()
    tok = _tokenizer(bundle)
    prompts = _prompts(args, bundle)
    limit = min(bundle[r]["max_positions"] for r in (("teacher", "draft") if args.speculative else ("model",)))
    for p in prompts:  # every prompt checked before the first is generated
        where = "" if p["line"] is None else f"--prompts {args.prompts} line {p['line']}: "
        text = chat_text(bundle, p["prompt"]) if isinstance(p["prompt"], list) else p["prompt"]
        p["ids"] = tok.encode(text, add_special_tokens=False).ids
        if not p["ids"]:
            raise AppError(f"{where}the prompt is empty after tokenisation")
        if len(p["ids"]) + args.max_new_tokens > limit:
            raise AppError(f"{where}the prompt's {len(p['ids'])} tokens and --max-new-tokens {args.max_new_tokens} "
                           f"need {len(p['ids']) + args.max_new_tokens} positions; the model takes at most {limit}")
    loaded = decoders(bundle, args.speculative, args.threads or bundle.get("threads"))
    results = []
    for i, p in enumerate(prompts):
        out = _one(bundle, loaded, tok, p["ids"], args, sampling.for_prompt(i) if batch and sampling else sampling,
                   penalty)
        if batch:
            out = {"index": i, **({"id": p["id"]} if p["id"] is not None else {}), **out}
            print(json.dumps(out), flush=True)
            print(f"[{i + 1}/{len(prompts)}] {figures_line(out)}", file=sys.stderr, flush=True)
        results.append(out)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.json:
            _check_json_out(args.json)
        results = run(args)
    except AppError as e:
        print(f"generate: {e}", file=sys.stderr)
        return e.code
    except Exception as e:  # noqa: BLE001 - the runner's errors and a runtime's own
        code = getattr(e, "exit_code", EXIT_RUNTIME)
        print(f"generate: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
              file=sys.stderr)
        return code
    if args.prompts is not None:
        out = {**summary(results), "results": results}
        print(summary_line(out), file=sys.stderr)
    else:
        out = results[0]
        if not out.get("streamed"):
            print(out["text"])
        print(figures_line(out), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
