#!/usr/bin/env python3
"""edgekd's final LM decoder beside ONNX Runtime GenAI's model builder on the same distilled student: a
finished `edgekd compress` causal-lm run's student weights (stages/distill/model.pt) go to a Hugging Face
model directory, the GenAI model builder makes its INT4 and INT8 CPU models of it, and one process measures
them with edgekd's own decoders of the run (its final, and its candidates of the same precisions):

    decode tokens/s   greedy decoding of the run's test prompts (the first prompt_tokens of test blocks
                      spread evenly over the split, as edgekd takes them), the same number of new tokens for
                      every model (no early stop), the same intra-op threads, after a warm-up, interleaved
                      prompt by prompt in an order that rotates; edgekd through its Decoder on an onnxruntime session, GenAI through
                      og.Model / og.Generator (greedy search, min_length = max_length)
    test perplexity   exp(mean next-token NLL) over the run's test blocks (the same split, seq_len and seed,
                      rebuilt with edgekd's text-data code and checked against the run's eval.npz) with
                      Decoder.perplexity; GenAI's model.onnx runs there on a plain onnxruntime InferenceSession
    size              the files the runtime loads (GenAI: model.onnx and its external data)

Prints a Markdown table with ratios against edgekd's final decoder, and with --json writes every figure.

    python tools/genai_peer.py --run RUN_DIR [--precisions int4 int8] [--prompts 20] [--new-tokens 64]
                               [--threads N] [--work DIR] [--genai-graph] [--json OUT]

--genai-graph adds a row per precision: GenAI's model.onnx decoded by edgekd's own loop, which tells its
graph's speed apart from its Generator's (a KV cache kept in place, buffers reused across steps).

onnxruntime-genai is not an edgekd dependency. Install it beside the environment without its dependencies
(it uses the onnxruntime already installed, which it needs at >= 1.31) and put it on the path:

    pip install --no-deps --target /tmp/genai onnxruntime-genai==0.18.0
    PYTHONPATH=/tmp/genai python tools/genai_peer.py --run RUN_DIR

A failure to import GenAI, to rebuild the student or to build a GenAI model prints one line and exits 2."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekd.lm.decode import Decoder  # noqa: E402

PRECISIONS = ("int4", "int8")
INSTALL = ("pip install --no-deps --target /tmp/genai onnxruntime-genai==0.18.0, then run with "
           "PYTHONPATH=/tmp/genai")
BUILDER = "onnxruntime_genai.models.builder"


class PeerError(Exception):
    """A step failed; the message is the one line printed before exit 2."""


@dataclass
class Entry:
    """One model in the comparison: how it decodes one prompt, and what was measured of it."""

    name: str
    side: str  # "edgekd" or "genai"
    precision: str
    files: list[Path]
    decode: Callable[[Sequence[int], int], dict]
    speed_runtime: str
    perplexity_runtime: str
    details: dict = field(default_factory=dict)
    speed: dict = field(default_factory=dict)
    perplexity: float | None = None
    tokens: list[list[int]] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


# ---------------------------------------------------------------- the run and its student

def load_run(run: Path) -> dict:
    """The run's report.json, checked to be a finished causal-lm run on an ONNX Runtime target."""
    path = run / "report.json"
    if not path.is_file():
        raise PeerError(f"{run} has no report.json (not a finished edgekd run)")
    report = json.loads(path.read_text())
    if report.get("task") != "causal-lm":
        raise PeerError(f"{run} is a {report.get('task')} run; this tool needs a causal-lm run")
    backend = (report.get("final") or {}).get("backend")
    if backend != "onnxruntime":
        raise PeerError(f"{run}: the final decoder runs on {backend}; this tool compares ONNX Runtime decoders")
    if not (run / "stages" / "distill" / "model.pt").is_file():
        raise PeerError(f"{run}/stages/distill/model.pt is missing (the run has no distilled student)")
    return report


def run_threads(report: dict) -> int:
    """The intra-op threads the run measured with."""
    return int(report["target"].get("threads") or report["environment"]["threads"])


def student_and_data(run: Path, cfg, target: str, threads: int) -> tuple:
    """(the run's student with its distilled weights, the test blocks as a tensor), rebuilt with
    edgekd's own code: the teacher the config names, the student as the distill stage builds it, the text
    splits as the causal-lm entry cuts them."""
    import torch

    from edgekd.config.profiles import load_profile
    from edgekd.context import RunContext
    from edgekd.lm.models import build_lm_student, load_lm
    from edgekd.lm.student_stage import text_splits

    torch.set_num_threads(threads)
    loaded = load_lm(cfg.teacher.model)
    ctx = RunContext(cfg, load_profile(target), run, threads=threads)
    splits = text_splits(ctx, loaded.tokenizer)
    student, _ = build_lm_student(loaded.model, cfg.student.lm_sizes(), cfg.student.init, cfg.seed)
    student.load_state_dict(torch.load(run / "stages" / "distill" / "model.pt", weights_only=True))
    return student.eval(), splits.test.ids


def check_test_blocks(run: Path, test: np.ndarray) -> bool:
    """Whether the rebuilt test blocks are the ones the run reported on (its eval.npz)."""
    path = run / "eval.npz"
    if not path.is_file():
        return False
    stored = np.load(path)["x"]
    return stored.shape == test.shape and bool((stored == test).all())


def write_hf_dir(student, run: Path, out: Path) -> Path:
    """The student as a Hugging Face model directory (config.json, model.safetensors, the run's tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(str(out), safe_serialization=True)
    for f in (run / "tokenizer").iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


# ---------------------------------------------------------------- GenAI: install, build, load

def import_genai():
    """onnxruntime_genai, or a PeerError saying how to install it."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise PeerError(f"onnxruntime-genai cannot be imported ({str(e).splitlines()[0]}): {INSTALL}") from None
    return og


def build_genai(hf_dir: Path, precision: str, out: Path, cache: Path, log: Path) -> Path:
    """GenAI's model builder on `hf_dir` for the CPU at `precision`, its output in `out` (log in `log`)."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", BUILDER, "-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", "cpu",
           "-c", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # local input only
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file() or not (out / "model.onnx").is_file():
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1][:300] if lines else f"exit code {proc.returncode}"
        raise PeerError(f"the GenAI model builder failed for {precision} ({last}); log: {log}")
    return out


def set_genai_threads(model_dir: Path, threads: int) -> dict:
    """Write the intra-op threads (inter-op 1, as edgekd's sessions) into genai_config.json; returns the
    decoder's session options."""
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    path.write_text(json.dumps(config, indent=4))
    return options


def describe_onnx(path: Path) -> dict:
    """The graph's inputs (the first past input only), its op counts, its MatMulNBits settings and how it
    stores the token embedding (float Gather, or GatherBlockQuantized and whether the LM head shares it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    nbits: dict[str, set] = {"bits": set(), "block_size": set(), "accuracy_level": set()}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name in nbits:
                    nbits[a.name].add(a.i)
    embedding = "float Gather"
    for node in model.graph.node:
        if node.op_type == "GatherBlockQuantized":
            attrs = {a.name: a.i for a in node.attribute}
            shared = any(n.op_type == "MatMulNBits" and set(n.input[1:]) & set(node.input) for n in model.graph.node)
            embedding = (f"GatherBlockQuantized ({attrs.get('bits', 4)}-bit, block {attrs.get('block_size')})"
                         + (", shared with the LM head's MatMulNBits" if shared else ""))
    inputs = [i.name for i in model.graph.input]
    shown = [n for n in inputs if not n.startswith("past_key_values.")] + [n for n in inputs[:8] if ".0." in n]
    return {"inputs": shown, "past_inputs": sum(n.startswith("past_key_values.") for n in inputs), "ops": ops,
            "matmulnbits": {k: sorted(v) for k, v in nbits.items()}, "embedding": embedding}


def genai_files(model_dir: Path) -> list[Path]:
    """What ONNX Runtime loads of a GenAI model: model.onnx and its external data."""
    return sorted(p for p in model_dir.iterdir() if p.name.startswith("model.onnx"))


def load_genai(og, model_dir: Path):
    """og.Model of a built model directory."""
    try:
        return og.Model(str(model_dir))
    except Exception as e:  # noqa: BLE001 - GenAI raises RuntimeError with the runtime's message
        raise PeerError(f"onnxruntime-genai cannot load {model_dir}: {str(e).splitlines()[0][:200]}") from None


def genai_decode(og, model) -> Callable[[Sequence[int], int], dict]:
    """One greedy generation through og.Generator, timed as edgekd's decode_once times its decoders: the
    prefill (append_tokens, which runs the prompt) with the first token, then each later token's step."""

    def once(prompt: Sequence[int], new_tokens: int) -> dict:
        t0 = time.perf_counter()
        params = og.GeneratorParams(model)
        total = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)  # no early stop
        gen = og.Generator(model, params)
        gen.append_tokens(list(prompt))
        gen.generate_next_token()  # the first token, from the prefill's logits
        prefill = time.perf_counter() - t0
        steps = []
        for _ in range(new_tokens - 1):
            if gen.is_done():
                break
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t)
        tokens = [int(t) for t in gen.get_sequence(0)[len(prompt):]]
        return {"prefill_s": prefill, "prompt_tokens": len(prompt), "step_s": steps, "tokens": tokens}

    return once


class GenAIOnnxDecoder(Decoder):
    """GenAI's model.onnx on a plain onnxruntime session, shaped as edgekd's Decoder so that its perplexity
    is computed by the same code: inputs input_ids, attention_mask (all ones), position_ids where the graph
    has it, past_key_values.N.key / .value; outputs logits, present.N.key / .value."""

    def __init__(self, session, config, layers: int):
        self.past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        present = ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        # by name, in edgekd's cache order (the graph lists every layer's key before any value)
        super().__init__(lambda feeds: session.run(present, feeds), config, layers)
        self.names = {i.name for i in session.get_inputs()}
        missing = ({"input_ids", "attention_mask", *self.past} - self.names) | (
            set(present) - {o.name for o in session.get_outputs()})
        if missing:
            raise PeerError(f"GenAI's model.onnx lacks {', '.join(sorted(missing)[:4])}")

    def forward(self, ids: np.ndarray, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        batch, seq = ids.shape
        past = cache[0].shape[2]
        feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64),
                 "attention_mask": np.ones((batch, past + seq), dtype=np.int64)}
        if "position_ids" in self.names:
            feeds["position_ids"] = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy()
        feeds.update(zip(self.past, cache, strict=True))
        out = self.run(feeds)
        return np.asarray(out[0]), [np.asarray(o) for o in out[1:]]


def genai_perplexity(model_dir: Path, shape: SimpleNamespace, test: np.ndarray, threads: int) -> float:
    """Decoder.perplexity of GenAI's model.onnx on the test blocks, on an onnxruntime session with edgekd's
    session options."""
    import onnxruntime as ort

    from edgekd.backends.onnxruntime import session_options

    try:
        session = ort.InferenceSession(str(model_dir / "model.onnx"), session_options(threads),
                                       providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise PeerError(f"onnxruntime cannot load {model_dir / 'model.onnx'}: {str(e).splitlines()[0][:200]}") \
            from None
    try:
        return GenAIOnnxDecoder(session, shape, shape.num_hidden_layers).perplexity(test)
    finally:
        del session


# ---------------------------------------------------------------- edgekd's decoders

def edgekd_decoders(run: Path, report: dict, precisions: Sequence[str]) -> list[dict]:
    """The run's final decoder and its candidates of the requested precisions (final first)."""
    final = report["final"]
    quantize = next((s for s in report["stages"] if s["name"] == "quantize"), {"candidates": []})
    out = [{"name": f"edgekd {final.get('candidate') or final['precision']} (final)", "precision": final["precision"],
            "artifact": final["artifact"], "label": final.get("label"), "report": final, "final": True}]
    for c in quantize["candidates"]:
        if c["precision"] in precisions and c["artifact"] != final["artifact"]:
            out.append({"name": f"edgekd {c.get('name') or c['precision']}", "precision": c["precision"],
                        "artifact": c["artifact"],
                        "label": c.get("label"), "report": c, "final": False})
    for d in out:
        if not (run / d["artifact"]).is_file():
            raise PeerError(f"{run / d['artifact']} is missing from the run directory")
    return out


def open_edgekd(run: Path, target: str, artifact: str, precision: str, shape: SimpleNamespace, threads: int):
    """(runner, Decoder) of one of the run's compiled decoders on the run's target runtime. Intra-op threads
    spin between runs, ONNX Runtime's default and what GenAI's sessions do (GenAI has no setting for it)."""
    from edgekd.backends import Artifact, get_backend
    from edgekd.config.profiles import load_profile

    profile = load_profile(target)
    path = run / artifact
    art = Artifact(path=path, backend=profile.backend, precision=precision, files=[path])
    runner = get_backend(profile.backend).load(art, profile, threads, spin=True)
    return runner, Decoder(runner.run, shape, shape.num_hidden_layers, session=getattr(runner, "session", None))


# ---------------------------------------------------------------- timing and output

def interleaved(entries: list[Entry], prompts: Sequence[Sequence[int]], new_tokens: int) -> None:
    """Every entry decodes every prompt; one full warm-up generation each first, then prompt by prompt in an
    order that rotates, so a drift in the machine's speed touches all alike. Fills speed and tokens."""
    from edgekd.bench.lm_bench import figures

    for e in entries:
        e.decode(prompts[0], new_tokens)
    runs: dict[str, list[dict]] = {e.name: [] for e in entries}
    for i, prompt in enumerate(prompts):
        k = i % len(entries)
        for e in entries[k:] + entries[:k]:
            runs[e.name].append(e.decode(prompt, new_tokens))
    for e in entries:
        e.speed = figures(runs[e.name])
        e.tokens = [r["tokens"] for r in runs[e.name]]


def _ratio(x: float | None, ref: float | None) -> float | None:
    return round(x / ref, 3) if x and ref else None


def rows(entries: list[Entry], final: Entry) -> list[dict]:
    """The JSON rows: figures, ratios against the final decoder, and how many greedy continuations equal those
    of edgekd's decoder of the same precision."""
    same = {e.precision: e for e in entries if e.side == "edgekd"}
    out = []
    for e in entries:
        ref = same.get(e.precision)
        identical = None
        if e.side == "genai" and ref is not None:
            identical = sum(a == b for a, b in zip(e.tokens, ref.tokens, strict=True))
        out.append({
            "name": e.name, "side": e.side, "precision": e.precision,
            "decode_tokens_per_s": e.speed.get("decode_tokens_per_s"),
            "tpot_ms": e.speed.get("tpot_ms"), "ttft_ms": e.speed.get("ttft_ms"),
            "prefill_tokens_per_s": e.speed.get("prefill_tokens_per_s"),
            "test_perplexity": round(e.perplexity, 4) if e.perplexity is not None else None,
            "size_bytes": e.size_bytes, "files": [str(f) for f in e.files],
            "speed_vs_final": _ratio(e.speed.get("decode_tokens_per_s"), final.speed.get("decode_tokens_per_s")),
            "perplexity_vs_final": _ratio(e.perplexity, final.perplexity),
            "size_vs_final": _ratio(e.size_bytes, final.size_bytes),
            "speed_runtime": e.speed_runtime, "perplexity_runtime": e.perplexity_runtime,
            "greedy_identical_to_edgekd_same_precision": identical, **e.details,
        })
    return out


def table(result: list[dict], notes: list[str]) -> str:
    """The Markdown table of the rows, with notes below."""
    lines = ["| model | decode tokens/s | vs final | test perplexity | vs final | size MB | vs final "
             "| speed measured with | perplexity measured with |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in result:
        lines.append(f"| {r['name']} | {r['decode_tokens_per_s']:.1f} | {r['speed_vs_final']:.2f}x "
                     f"| {r['test_perplexity']:.3f} | {r['perplexity_vs_final']:.3f}x "
                     f"| {r['size_bytes'] / 1e6:.1f} | {r['size_vs_final']:.2f}x "
                     f"| {r['speed_runtime']} | {r['perplexity_runtime']} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


# ---------------------------------------------------------------- main

def compare(args: argparse.Namespace, work: Path) -> dict:
    import onnxruntime as ort

    from edgekd.bench.lm_bench import decode_once
    from edgekd.config import from_dict
    from edgekd.config.lm import SpeculativeConfig
    from edgekd.data.text import TokenBlocks

    og = import_genai()
    run = args.run.resolve()
    report = load_run(run)
    cfg = from_dict(report["config"], f"{run}/report.json config")
    threads = args.threads or run_threads(report)
    target = report["target"]["name"]
    shape = SimpleNamespace(**report["final"]["decoder"])
    spec = cfg.speculative or SpeculativeConfig()
    t0 = time.perf_counter()
    student, test_ids = student_and_data(run, cfg, target, threads)
    test = test_ids.numpy()
    same_blocks = check_test_blocks(run, test)
    prompts = TokenBlocks(test_ids).prompts(args.prompts, spec.prompt_tokens)
    hf_dir = write_hf_dir(student, run, work / "hf")
    del student
    print(f"student rebuilt and written to {hf_dir} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    ort_v, og_v = f"onnxruntime {ort.__version__}", f"onnxruntime-genai {og.__version__}"
    entries: list[Entry] = []
    runners = []
    try:
        for d in edgekd_decoders(run, report, args.precisions):
            runner, dec = open_edgekd(run, target, d["artifact"], d["precision"], shape, threads)
            runners.append(runner)
            e = Entry(d["name"], "edgekd", d["precision"], [run / d["artifact"]],
                      partial(decode_once, dec), f"{ort_v} (edgekd Decoder)",
                      f"{ort_v} (edgekd Decoder)",
                      {"label": d["label"], "report_test_perplexity": d["report"].get("perplexity"),
                       "report_decode_tokens_per_s": d["report"].get("decode_tokens_per_s")})
            e.perplexity = dec.perplexity(test)
            entries.append(e)
            print(f"{e.name}: test perplexity {e.perplexity:.4f}", file=sys.stderr)
        for precision in args.precisions:
            t = time.perf_counter()
            out = build_genai(hf_dir, precision, work / f"genai-{precision}", work / "cache",
                              work / f"builder-{precision}.log")
            options = set_genai_threads(out, threads)
            info = describe_onnx(out / "model.onnx")
            ppl = genai_perplexity(out, shape, test, threads)
            model = load_genai(og, out)
            e = Entry(f"GenAI {precision}", "genai", precision, genai_files(out), genai_decode(og, model),
                      f"{og_v} Generator ({ort_v})", f"{ort_v} InferenceSession on GenAI's model.onnx",
                      {"build_seconds": round(time.perf_counter() - t, 1), "model_dir": str(out),
                       "session_options": options, "graph": info})
            e.perplexity = ppl
            entries.append(e)
            print(f"{e.name}: built in {e.details['build_seconds']} s, test perplexity {ppl:.4f}", file=sys.stderr)
            if args.genai_graph:  # the same graph through edgekd's loop: its graph apart from its Generator
                from edgekd.backends.onnxruntime import OrtRunner

                runner = OrtRunner(out / "model.onnx", threads, ["CPUExecutionProvider"], spin=True)
                runners.append(runner)
                dec = GenAIOnnxDecoder(runner.session, shape, shape.num_hidden_layers)
                g = Entry(f"GenAI {precision} graph, edgekd's loop", "genai", precision, genai_files(out),
                          partial(decode_once, dec), f"{ort_v} (edgekd's decode loop on GenAI's model.onnx)",
                          e.perplexity_runtime, {"graph": info})
                g.perplexity = ppl
                entries.append(g)
        print(f"timing {len(entries)} models on {len(prompts)} prompts x {args.new_tokens} new tokens, "
              f"{threads} threads", file=sys.stderr)
        interleaved(entries, prompts, args.new_tokens)
    finally:
        for r in runners:
            r.close()
    final = entries[0]
    return {"run": str(run), "threads": threads, "prompts": len(prompts), "prompt_tokens": spec.prompt_tokens,
            "new_tokens": args.new_tokens, "test_blocks": list(test.shape), "test_blocks_match_eval_npz": same_blocks,
            "final": report["final"]["artifact"], "versions": {"onnxruntime": ort.__version__,
                                                               "onnxruntime_genai": og.__version__},
            "builder": f"python -m {BUILDER} -i HF_DIR -o OUT -p PRECISION -e cpu (defaults otherwise)",
            "rows": rows(entries, final)}


def notes(result: dict) -> list[str]:
    """What the table's figures are, under it."""
    genai = [r for r in result["rows"] if r["side"] == "genai"]
    out = [f"{result['prompts']} test prompts of {result['prompt_tokens']} tokens, {result['new_tokens']} new tokens "
           f"each (greedy, no early stop), {result['threads']} intra-op threads, interleaved in one process",
           f"test perplexity over {result['test_blocks'][0]} test blocks of {result['test_blocks'][1]} tokens"
           + ("" if result["test_blocks_match_eval_npz"] else " (NOT identical to the run's eval.npz)"),
           "size: the ONNX files the runtime loads (GenAI: model.onnx and model.onnx.data)",
           "GenAI's time to first token (JSON) includes creating its Generator (KV buffers of max_length)"]
    edgekd = [r for r in result["rows"] if r["side"] == "edgekd"]
    differ = [f"{r['name']} {r['test_perplexity']} (report {r['report_test_perplexity']})" for r in edgekd
              if r["report_test_perplexity"] is not None and r["test_perplexity"] != r["report_test_perplexity"]]
    out.append("edgekd's test perplexities " + (f"differ from report.json's: {'; '.join(differ)}" if differ
                                                else "equal report.json's"))
    for r in genai:
        q = r["graph"]["matmulnbits"]
        same = r["greedy_identical_to_edgekd_same_precision"]
        out.append(f"{r['name']}: {r['graph']['ops'].get('MatMulNBits', 0)} MatMulNBits (bits {q['bits']}, block "
                   f"{q['block_size']}, accuracy_level {q['accuracy_level']}), embedding: {r['graph']['embedding']}; "
                   f"inputs "
                   f"{', '.join(r['graph']['inputs'])}"
                   + (f"; greedy output equal to edgekd {r['precision']}'s on {same}/{result['prompts']} prompts"
                      if same is not None else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="a finished causal-lm run")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--prompts", type=int, default=20, help="test prompts to time (default 20)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the run's)")
    p.add_argument("--work", type=Path, help="where the student and the GenAI builds go (default: a temporary "
                   "directory, removed at the end)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write every figure as JSON here")
    p.add_argument("--genai-graph", action="store_true",
                   help="also time GenAI's model.onnx through edgekd's own decode loop (an onnxruntime session, "
                        "fresh past and present arrays each step, as edgekd's decoders run): its graph apart from "
                        "its Generator")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.new_tokens < 2:
        p.error("--prompts must be at least 1 and --new-tokens at least 2")
    from edgekd.errors import EdgeKDError

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="genai-peer-")
        work = Path(tmp.name)
    else:
        work = args.work.resolve()
        work.mkdir(parents=True, exist_ok=True)
    try:
        result = compare(args, work)
    except (PeerError, EdgeKDError) as e:
        print(f"genai_peer: {e}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["notes"] = notes(result)
    print(table(result["rows"], result["notes"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
