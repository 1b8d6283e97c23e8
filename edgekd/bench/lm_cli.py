"""`edgekd bench` on a KV-cache decoder (a causal-lm run's artifact): greedy generation of prompts taken from
token blocks (a run's eval.npz), timed with the target's runtime here or on boards over SSH, and the
perplexity on those blocks. The same lm_runner.py as `edgekd compress` uses, so the figures are the report's."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..config.profiles import Profile
from ..errors import BadInputError, EdgeKDError
from .lm_runner import POSITIONS_KEY, kv_layout

__all__ = ["LM_DEFAULTS", "POSITIONS_KEY", "decoder_dims", "decoder_positions", "lm_bench", "describe_lm"]

LM_DEFAULTS = {"prompts": 8, "prompt_tokens": 32, "new_tokens": 64}


def decoder_dims(model: Path) -> tuple[int, int, int] | None:
    """(layers, kv heads, head size) of a KV-cache decoder (inputs input_ids, past_key_i, past_value_i, as
    edgekd.lm.export writes), or None for any other model."""
    shapes: dict[str, list] = {}
    if model.suffix.lower() == ".xml":
        try:
            import openvino as ov

            read = ov.Core().read_model(str(model))
        except Exception:  # noqa: BLE001 - not readable here: the image path reports it
            return None
        for p in read.inputs:
            shapes[p.get_any_name()] = [d.get_length() if d.is_static else None for d in p.get_partial_shape()]
    else:
        try:
            import onnx

            graph = onnx.load(str(model), load_external_data=False).graph
        except Exception:  # noqa: BLE001
            return None
        for i in graph.input:
            shapes[i.name] = [d.dim_value or None for d in i.type.tensor_type.shape.dim]
    layout = kv_layout(shapes)
    return layout if layout is not None and layout[1] and layout[2] else None


def decoder_positions(model: Path) -> int | None:
    """The positions an ONNX KV-cache decoder takes: its edgekd.max_positions metadata (edgekd.lm.export), else
    the length of its GroupQueryAttention rotary table; None where neither says (an IR, a plain graph of an
    older run)."""
    if model.suffix.lower() != ".onnx":
        return None
    try:
        import onnx

        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - decoder_dims read it already; nothing to add here
        return None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get(POSITIONS_KEY, "").isdigit():
        return int(meta[POSITIONS_KEY])
    tables = {i.name: list(i.dims) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) > 7 and node.input[7] in tables:
            return int(tables[node.input[7]][0])  # cos_cache: (positions, head size / 2)
    return None


def _precision(model: Path) -> str:
    """The weights' precision as edgekd names the file (model.int4.onnx, draft.int8.xml); fp32 otherwise."""
    for p in ("int4", "int8", "fp16"):
        if f".{p}." in model.name or model.stem.endswith(p):
            return p
    return "fp32"


def _blocks(path: Path | None) -> np.ndarray:
    if path is None:
        raise BadInputError("bench: a KV-cache decoder needs --eval-data: token blocks (a causal-lm run's eval.npz) "
                            "for its prompts and perplexity")
    try:
        with np.load(path) as z:
            x = np.asarray(z["x"])
    except Exception as e:  # noqa: BLE001 - missing key, not an archive
        raise BadInputError(f"bench: --eval-data {path}: cannot read token blocks x ({e})") from None
    if x.ndim != 2 or not x.size or not np.issubdtype(x.dtype, np.integer):
        raise BadInputError(f"bench: --eval-data {path}: x must be (blocks, tokens) token ids for a KV-cache decoder, "
                            f"got {x.dtype} {x.shape}")
    if x.shape[1] < 2:
        raise BadInputError(f"bench: --eval-data {path}: blocks of {x.shape[1]} token score nothing; a perplexity "
                            "needs blocks of at least 2 tokens")
    return x.astype(np.int64)


def _check_blocks(blocks: np.ndarray, path: str, model: Path, limit: int | None) -> None:
    """Token ids the decoder can read (0 to its vocabulary), in blocks no longer than the positions it takes:
    anything else would be scored as some other text, or fail inside the runtime."""
    vocab = _vocabulary(model)
    low, high = int(blocks.min()), int(blocks.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise BadInputError(f"bench: --eval-data {path}: token id {low if low < 0 else high} is outside 0.."
                            f"{(vocab - 1) if vocab else 'the vocabulary'} ({model.name}'s vocabulary)")
    if limit and blocks.shape[1] > limit:
        raise BadInputError(f"bench: --eval-data {path}: blocks of {blocks.shape[1]} tokens; {model.name} takes at "
                            f"most {limit} positions")


def _vocabulary(model: Path) -> int | None:
    """The vocabulary of an ONNX decoder (its logits' last dimension), or None where the graph does not say."""
    if model.suffix.lower() != ".onnx":
        return None
    try:
        import onnx

        graph = onnx.load(str(model), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - decoder_dims read it already
        return None
    logits = next((o for o in graph.output if o.name == "logits"), None)
    dims = [d.dim_value for d in logits.type.tensor_type.shape.dim] if logits is not None else []
    return dims[-1] if dims and dims[-1] > 0 else None


def lm_bench(args: argparse.Namespace, profile: Profile, model: Path, files: list[Path],
             dims: tuple[int, int, int]) -> dict[str, dict | EdgeKDError]:
    """{host: the runner's result or its error}: this host, or each --host in turn."""
    from .lm_bench import LMJob, run_local, run_remote

    blocks = _blocks(Path(args.eval_data) if args.eval_data else None)
    n, tokens = (getattr(args, k) or LM_DEFAULTS[k] for k in ("prompts", "prompt_tokens"))
    new = args.new_tokens or LM_DEFAULTS["new_tokens"]
    if tokens > blocks.shape[1]:
        raise BadInputError(f"bench: --prompt-tokens {tokens} is more than the blocks' {blocks.shape[1]} tokens")
    limit = decoder_positions(model)
    _check_blocks(blocks, args.eval_data, model, limit)
    if limit and tokens + new > limit:
        raise BadInputError(f"bench: --prompt-tokens {tokens} and --new-tokens {new} need {tokens + new} positions; "
                            f"{model.name} takes at most {limit}")
    rows = np.linspace(0, len(blocks) - 1, min(n, len(blocks))).round().astype(int)
    prompts = blocks[rows, :tokens].tolist()
    job = LMJob("model", model, files, _precision(model), dims[1], dims[2])
    if not args.host:
        return {"host": run_local([job], prompts, new, profile, args.threads, args.timeout, score=blocks)["model"]}
    results: dict[str, dict | EdgeKDError] = {}
    for host in args.host:  # one after the other: each board runs its own decoder
        try:
            results[host] = run_remote(host, [job], prompts, new, profile, args.threads, ssh_config=args.ssh_config,
                                       remote_python=args.remote_python, timeout_s=args.timeout, score=blocks)["model"]
        except EdgeKDError as e:
            results[host] = e
    return results


def _fmt(v: float | None, unit: str = "", nd: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}{unit}"


def describe_lm(result: dict, profile: Profile) -> str:
    """A few lines for a person: where and how, then generation speed, memory and perplexity."""
    env, details = result.get("environment") or {}, result.get("details") or {}
    runtime = result.get("backend", profile.backend)
    where = result.get("measured_on", "host")
    lines = [f"{result.get('model')} on {profile.name}, measured on {where} ({env.get('machine', '?')}, "
             f"{env.get('usable_cores', '?')} cores): {runtime} {(result.get('versions') or {}).get(runtime, '')}, "
             + (f"{details['threads']} threads" if details.get("threads") else "a thread per core")]
    if result.get("board_mismatch"):
        lines.append(f"  note: {result['board_mismatch']}")
    tpot = result.get("tpot_ms") or {}
    lines.append(f"  decode {_fmt(result.get('decode_tokens_per_s'), ' tokens/s')} · prefill "
                 f"{_fmt(result.get('prefill_tokens_per_s'), ' tokens/s')} · TTFT {_fmt(result.get('ttft_ms'), ' ms', 2)}"
                 f" · TPOT p50 {_fmt(tpot.get('p50'), ' ms', 3)} p90 {_fmt(tpot.get('p90'), ' ms', 3)} "
                 f"({result.get('prompts')} prompts, {result.get('new_tokens')} new tokens each)")
    ppl = result.get("perplexity")
    lines.append(f"  peak RSS {_fmt(result.get('peak_rss_mb'), ' MiB')} · size {result.get('artifact_bytes')} bytes · "
                 + (f"perplexity {ppl:.4f}, next-token accuracy {result.get('accuracy', 0):.2f}% on the --eval-data blocks"
                    if ppl is not None else "perplexity n/a"))
    return "\n".join(lines)
