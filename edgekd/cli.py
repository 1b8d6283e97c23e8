"""The `edgekd` command: parses arguments, calls the pipeline / bench / gate / report, maps errors to exit codes."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_OK, EXIT_STAGE_FAILED, EdgeKDError

EXIT_CODES_HELP = "exit codes: 0 done, 1 a gate failed, 2 bad input, 3 a stage or a board failed"


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line with the exit code for bad input (argparse prints the usage too)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """Unknown arguments are named with the command they were given to (argparse names the root)."""
        known, extras = self.parse_known_args(args, namespace)
        if extras:
            prog = f"{self.prog} {known.command}" if getattr(known, "command", None) else self.prog
            self.exit(EXIT_BAD_INPUT, f"{prog}: error: unrecognized arguments: {' '.join(extras)} (see {prog} --help)\n")
        return known


def seed_arg(text: str) -> int:
    """--seed: what torch, numpy and random all take, 0 to 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {2**32 - 1}, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {2**32 - 1}, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="edgekd", description="Compress a PyTorch classifier or a small causal language model for an edge board.",
                                epilog=EXIT_CODES_HELP)
    p.add_argument("--version", action="version", version=f"edgekd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("compress", help="distill, prune, quantize, export, compile and measure for a target",
                       epilog=EXIT_CODES_HELP)
    c.add_argument("--config", help="YAML config (default: the embedded digits demo)")
    c.add_argument("--target", help="target name, alias or profile file (default: the config's, else cpu)")
    c.add_argument("--out", help="run directory (default: runs/<name>-<target>-<timestamp>/)")
    c.add_argument("--seed", type=seed_arg, help="overrides the config's seed")
    c.add_argument("--model", help="FP32 ONNX model to enter with (then --calib-data is required)")
    c.add_argument("--calib-data", help="calibration inputs (.npz with array x)")
    c.add_argument("--eval-data", help="held-out eval set (.npz with x and y)")
    c.add_argument("--host", action="append", default=[], help="[user@]host[:port] of a board (repeatable)")
    c.add_argument("--ssh-config", help="ssh config file for --host")
    c.add_argument("--remote-python", help="python on the board (default: the profile's)")
    c.add_argument("--verify-arm", action="store_true", help="evaluate the artifact on ARM kernels under emulation")
    c.add_argument("--trust-checkpoint", action="store_true",
                   help="allow loading a whole pickled model file (runs code from the file: only for files you trust)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--debug", action="store_true", help="show tracebacks")
    t = sub.add_parser("targets", help="list target profiles and their aliases")
    t.add_argument("--debug", action="store_true")
    _add_cache_parser(sub)
    from .bench.cli import add_parser as add_bench_parser
    from .bench.sysroot import add_parser as add_arm_parser
    from .lm.generate import add_parser as add_generate_parser
    from .report.cli import add_parsers as add_report_parsers

    add_bench_parser(sub)
    add_report_parsers(sub)
    add_generate_parser(sub)
    add_arm_parser(sub)
    return p


def _cmd_targets(args: argparse.Namespace) -> int:
    from .config.profiles import list_profiles

    rows = [("NAME", "ALIASES", "BACKEND", "DEVICE", "ARCH", "PRECISIONS", "LATENCY MEASURED")]
    for p in list_profiles():
        where = "here" if p.arch == "host" else ("here (x86 host) or --host" if p.measures_here else "on the board (--host)")
        rows.append((p.name, ",".join(p.aliases) or "-", p.backend, p.device, p.arch, ">".join(p.precisions), where))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


def _add_cache_parser(sub: argparse._SubParsersAction) -> None:
    from .runs import CACHE_KINDS

    c = sub.add_parser("cache", help="list or clear the user cache (trained teachers, teacher logits, sysroots)",
                       description="The user cache: $EDGEKD_CACHE, else $XDG_CACHE_HOME/edgekd or ~/.cache/edgekd.")
    actions = c.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    ls = actions.add_parser("list", help="each entry, its size, and the total")
    ls.add_argument("kind", nargs="?", choices=list(CACHE_KINDS), metavar="KIND", help=", ".join(CACHE_KINDS))
    clear = actions.add_parser("clear", help="remove entries (every kind unless KIND is given)")
    clear.add_argument("kind", nargs="?", choices=list(CACHE_KINDS), metavar="KIND", help=", ".join(CACHE_KINDS))
    clear.add_argument("--older-than", type=float, metavar="DAYS", help="only entries last written more than DAYS ago")
    for p in (ls, clear):
        p.add_argument("--debug", action="store_true")
    c.set_defaults(func=_cmd_cache)


def _size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _count(entries: list) -> str:
    return f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"


def _cmd_cache(args: argparse.Namespace) -> int:
    import time

    from .errors import BadInputError
    from .runs import cache_dir, cache_entries, clear_cache

    if args.cache_command == "list":
        entries = cache_entries(args.kind)
        now = time.time()
        rows = [("KIND", "SIZE", "AGE", "PATH")] + [
            (e.kind, _size_text(e.size_bytes), f"{(now - e.modified) / 86400:.1f} d", str(e.path)) for e in entries]
        if entries:
            widths = [max(len(r[i]) for r in rows) for i in range(3)]
            for r in rows:
                print("  ".join([c.ljust(w) for c, w in zip(r[:3], widths, strict=True)] + [r[3]]))
        print(f"total: {_count(entries)}, {_size_text(sum(e.size_bytes for e in entries))} in {cache_dir()}")
        return EXIT_OK
    if args.older_than is not None and not args.older_than >= 0:
        raise BadInputError(f"--older-than {args.older_than:g}: expected a number of days >= 0")
    removed = clear_cache(args.kind, args.older_than)
    for e in removed:
        print(f"removed {e.kind} {e.path} ({_size_text(e.size_bytes)})")
    print(f"removed {_count(removed)}, {_size_text(sum(e.size_bytes for e in removed))} from {cache_dir()}")
    return EXIT_OK


def _cmd_compress(args: argparse.Namespace) -> int:
    from .config import load_config
    from .pipeline import Pipeline
    from .progress import NullProgress, RichProgress
    from .report.summary import print_summary

    cfg = load_config(args.config, {"seed": args.seed})
    progress = NullProgress() if args.quiet or not sys.stderr.isatty() and os.environ.get("CI") else RichProgress()
    pipe = Pipeline(cfg, args.target, args.out, model_onnx=args.model, calib_data=args.calib_data,
                    eval_data=args.eval_data, hosts=args.host, ssh_config=args.ssh_config,
                    remote_python=args.remote_python, verify_arm=args.verify_arm,
                    trust_checkpoint=args.trust_checkpoint, progress=progress)
    report = pipe.run()
    print_summary(report, pipe_run_dir(report, args))
    return EXIT_OK if report.get("gates_passed", True) else EXIT_GATE_FAILED


def pipe_run_dir(report: dict, args: argparse.Namespace) -> str:
    return report.get("run_dir", args.out or "")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_BAD_INPUT
    debug = getattr(args, "debug", False)
    if not debug:
        # Library chatter stays quiet; edgekd's own warnings (a trusted pickle being loaded) still show.
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"edgekd(\.|$)")
        warnings.filterwarnings("default", message=r"loading .* with full pickle")
    handlers = {"compress": _cmd_compress, "targets": _cmd_targets}
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        return args.func(args)
    except EdgeKDError as e:
        if debug:
            traceback.print_exc()
        print(f"edgekd: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        print("edgekd: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - an unexpected failure of a stage: one line, exit 3
        if debug:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"edgekd: error: {type(e).__name__}: {msg[:300]} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_STAGE_FAILED


if __name__ == "__main__":
    sys.exit(main())
