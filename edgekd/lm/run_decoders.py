"""A finished causal-LM run opened for generation (`edgekd generate`): its report, tokenizer and decoders on
this host with the run's target runtime (ONNX Runtime, or OpenVINO with the cache in the infer request's
states, as the run measured them), loaded once for one prompt or many."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

from ..errors import BadInputError

__all__ = ["OpenRun"]


def _report(run: Path) -> dict:
    path = run / "report.json"
    if not path.is_file():
        raise BadInputError(f"generate: {run} has no report.json (not a finished run directory)")
    try:
        report = json.loads(path.read_text())
    except ValueError as e:
        raise BadInputError(f"generate: {path} is not valid JSON ({e})") from None
    if not isinstance(report, dict):
        raise BadInputError(f"generate: {path} is not a report (a JSON object)")
    if report.get("task") != "causal-lm":
        raise BadInputError(f"generate: {run} is an {report.get('task', 'image-classification')} run; generate needs "
                            "a causal-lm run")
    if not (run / "tokenizer").is_dir():
        raise BadInputError(f"generate: {run}/tokenizer is missing")
    target = report.get("target")
    if not isinstance(target, dict) or not isinstance(target.get("name"), str):
        raise BadInputError(f"generate: {path} names no target (not a finished causal-lm report)")
    for role in ("final", "teacher"):
        block = report.get(role)
        if not isinstance(block, dict) or not isinstance(block.get("artifact"), str) or not isinstance(
                block.get("decoder"), dict) or not isinstance(block["decoder"].get("max_positions", 0), (int, type(None))):
            raise BadInputError(f"generate: {path} has no {role} decoder (artifact and decoder shape): not a finished "
                                "causal-lm report")
    return report


def _decoder(run: Path, block: dict, threads: int | None):
    from ..backends import Artifact, get_backend
    from ..config.profiles import load_profile
    from .decode import Decoder

    report_target = block["_target"]
    profile = load_profile(report_target)
    if profile.backend == "tensorrt":
        raise BadInputError(f"generate: {run} was built for {profile.name} (TensorRT): build its engines on the board "
                            "(target/jetson-lm/build_engine.sh) and generate there with its generate.py")
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
    """The messages (lm_prompts.conversation) in the tokenizer's chat template, opening the assistant's turn."""
    if not getattr(tok, "chat_template", None):
        raise BadInputError("generate: chat prompts (--chat, --messages, messages lines) need a chat template; the "
                            "run's tokenizer has none")
    from jinja2.exceptions import TemplateError

    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except TemplateError as e:
        raise BadInputError(f"generate: the chat template refused the prompt ({e})") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in some transformers versions
        ids = ids["input_ids"]
    return [int(i) for i in ids]


class OpenRun:
    """A finished run's report and tokenizer, and the decoders a generation needs, loaded once (open()) for
    every prompt (continuation())."""

    def __init__(self, run_dir: str | Path, speculative: bool, threads: int | None):
        from transformers import AutoTokenizer

        self.run, self.speculative = Path(run_dir), speculative
        self.report = _report(self.run)
        self.target = self.report["target"]["name"]
        self.threads = threads or self.report["target"].get("threads")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(self.run / "tokenizer"))
        except Exception as e:  # noqa: BLE001 - transformers and the Rust tokenizer raise many kinds
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BadInputError(f"generate: {self.run}/tokenizer cannot be read as a tokenizer ({first})") from None
        self.final = {**self.report["final"], "_target": self.target}
        self.drafting = (((self.report.get("speculative") or {}).get("draft") or {}).get("artifact")
                         if speculative else None)
        self.runners: list = []
        self.draft = self.teacher = None

    def ids(self, prompt: str | list, chat: bool, system: str | None, where: str = "the prompt") -> list[int]:
        """`prompt`'s token ids (through the chat template with `chat`), checked against the decoders' positions
        for `max_new_tokens` by check()."""
        if chat:
            from ..bench.lm_prompts import conversation

            ids = _chat_ids(self.tok, conversation(prompt, system))
        else:
            ids = self.tok.encode(prompt, add_special_tokens=False)
        if not ids:
            raise BadInputError(f"generate: {where} is empty after tokenisation")
        return ids

    def check(self, ids: list, max_new_tokens: int, where: str | None = None) -> None:
        try:
            _check_context([self.final, self.report["teacher"]] if self.speculative else [self.final], len(ids),
                           max_new_tokens)
        except BadInputError as e:
            if where is None:
                raise
            raise BadInputError(str(e).replace("generate: ", f"generate: {where}: ", 1)) from None

    def open(self) -> None:
        runner, self.draft = _decoder(self.run, {**self.final, "artifact": self.drafting} if self.drafting
                                      else self.final, self.threads)
        self.runners.append(runner)
        if self.speculative:
            runner, self.teacher = _decoder(self.run, {**self.report["teacher"], "_target": self.target}, self.threads)
            self.runners.append(runner)

    def close(self) -> None:
        for r in self.runners:
            r.close()
        self.runners = []

    def continuation(self, ids: list, max_new_tokens: int, draft_tokens=None, min_confidence=None, lookup=None,
                     sampling=None, penalty=None, stop=None, stream: bool = False) -> dict:
        """The continuation of `ids` and its figures (see generate())."""
        from ..bench import lm_generation
        from .speculative import UNCHOSEN

        tok = self.tok
        streamer = None
        if stream or stop:
            from ..bench.lm_app import Streamer

            streamer = Streamer(tok.decode, tok.eos_token_id, max_new_tokens, stops=stop or (), show=stream)
        out: dict = {"prompt_tokens": len(ids), "model": self.drafting or self.final["artifact"]}
        t0 = time.perf_counter()
        if self.speculative:
            chosen = self.report.get("speculative") or {}
            k = draft_tokens or chosen.get("draft_tokens") or UNCHOSEN[0]
            floor = min_confidence if min_confidence is not None else chosen.get("min_confidence", 0.0)
            copy = bool(chosen.get("lookup", False)) if lookup is None else lookup
            rule = lm_generation.Greedy(floor) if sampling is None else sampling.drafting(floor)
            res = lm_generation.speculative(self.teacher, self.draft, ids, max_new_tokens, k, rule, copy,
                                            eos=tok.eos_token_id, on_tokens=streamer, penalty=penalty)
            tokens = res.tokens
            out.update({"speculative": True, "draft_tokens": k, "min_confidence": floor, "lookup": copy,
                        "drafted": res.drafted, "accepted": res.accepted,
                        "acceptance_rate": None if res.acceptance_rate is None else round(res.acceptance_rate, 4),
                        "looked_up": res.looked_up, "lookup_accepted": res.lookup_accepted,
                        "teacher": self.report["teacher"]["artifact"]})
            if res.acceptance_rate is None:
                out["not_measured"] = {"acceptance_rate": lm_generation.NOTHING_DRAFTED}
            checks = res.target_passes - 1  # the passes after the prompt's
            if checks:
                out["round"] = {"tokens": round((len(res.tokens) - 1) / checks, 3),
                                "check_ms": round(1000 * res.check_seconds / checks, 3),
                                "draft_ms": round(1000 * res.draft_seconds / checks, 3)}
        else:
            tokens = lm_generation.continue_ids(self.draft, ids, max_new_tokens, tok.eos_token_id, streamer, sampling,
                                                penalty)
        seconds = time.perf_counter() - t0
        if tok.eos_token_id in tokens:
            tokens = tokens[:tokens.index(tok.eos_token_id)]
        text = tok.decode(tokens)
        if streamer is not None and streamer.stop is not None:  # the tokens up to the one that completed it
            tokens, text, out["stop"] = streamer.ids, streamer.text, streamer.stop
        out.update({"text": text, "tokens": len(tokens), "token_ids": tokens, "seconds": round(seconds, 4),
                    "tokens_per_s": round(len(tokens) / seconds, 2) if seconds else None})
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
