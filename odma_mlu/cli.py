"""The ``odma-mlu`` command: a thin argparse layer over library functions.

Each subcommand imports its implementation lazily so ``odma-mlu --help`` is instant and a
missing optional dependency only affects the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

from odma_mlu.config import DEFAULT_MODEL, CacheConfig, SchedulerConfig
from odma_mlu.errors import OdmaError

POLICIES = ("static", "s3", "odma", "paged", "exact", "ideal")


# -- value types: a bad value is a one-line usage error naming the flag, never a traceback ----
def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: allowed [{lo}, {hi if hi is not None else 'inf'}]")
        return v
    parse.__name__ = "integer"
    return parse


def _float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(f"{text} is out of range: allowed {'(' if lo_open else '['}{lo:g}, "
                                             f"{hi:g}]")
        return v
    parse.__name__ = "number"
    return parse


def _out_path(text: str) -> str:
    """An output file whose folder exists: commands never create folders anywhere."""
    parent = Path(text).expanduser().parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(parent)!r} does not exist; create it first")
    return text


_SEED = _int_in(0, 2**63 - 1)


def add_chunked_prefill_arg(parser: argparse.ArgumentParser,
                            default: bool | None = SchedulerConfig.enable_chunked_prefill) -> None:
    """``--chunked-prefill`` / ``--no-chunked-prefill``, defaulting to ``SchedulerConfig``'s (on);
    shared with the benchmark scripts in tools/ (``default=None``: not given, a config file decides)."""
    parser.add_argument("--chunked-prefill", action=argparse.BooleanOptionalAction, default=default,
                        help="one token budget per step for decodes and prefill chunks, as vLLM v1 (default: on; "
                             "--no-chunked-prefill prefills each prompt whole)")


def add_swap_space_arg(parser: argparse.ArgumentParser,
                       default: float | None = CacheConfig.swap_space_bytes / 2**30) -> None:
    """``--swap-space-gib``, defaulting to ``CacheConfig.swap_space_bytes`` (4 GiB); shared with
    the benchmark scripts in tools/ (``default=None``: not given, a config file decides)."""
    parser.add_argument("--swap-space-gib", type=_float_in(0.0), default=default,
                        help="host memory for the KV of preempted requests, which swap instead of recomputing "
                             "(default: 4; 0: every preemption recomputes)")


def swap_space_bytes(ns: argparse.Namespace) -> int:
    """The swap space ``add_swap_space_arg`` parsed, in bytes."""
    return int(ns.swap_space_gib * 2**30)


def _bench(ns: argparse.Namespace) -> int:
    from emulator.bench import bench_main

    return bench_main(ns)


def _profile_bandwidth(ns: argparse.Namespace) -> int:
    from emulator.bandwidth_profiler import profile_bandwidth_main

    return profile_bandwidth_main(ns)


def _predictor_train(ns: argparse.Namespace) -> int:
    from odma_mlu.predictor.commands import train_main

    return train_main(ns)


def _predictor_eval(ns: argparse.Namespace) -> int:
    from odma_mlu.predictor.commands import eval_main

    return eval_main(ns)


def _generate(ns: argparse.Namespace) -> int:
    from odma_mlu.engine.commands import generate_main

    return generate_main(ns)


def _validate_emulator(ns: argparse.Namespace) -> int:
    from emulator.validate import validate_emulator_main

    return validate_emulator_main(ns)


def _serve(ns: argparse.Namespace) -> int:
    from odma_mlu.server.commands import serve_main

    return serve_main(ns)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="odma-mlu", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="replay a trace on an emulated device, one row per KV policy")
    b.add_argument("--profile", default="mlu370-x4", help="device profile name or YAML path")
    b.add_argument("--model", default=DEFAULT_MODEL, help="built-in model shape, config.json or model folder")
    b.add_argument("--trace", default=None, help="trace name or path (default: the bundled sample)")
    b.add_argument("--policies", default=None,
                   help="comma-separated subset of " + ",".join(POLICIES) + " (default: all; with a sliding-window "
                        "model also the baselines jenga,vllm_hybrid,vllm_uniform; with a hybrid SSM model the schemes "
                        "avmp,static_split_0.5,static_split_tuned,padded_unified)")
    b.add_argument("--decode-attention", choices=("gather", "in_place"), default=None,
                   help="how decode attention reads KV runs (default: the profile's, else gather, what the code "
                        "issues); in_place prices a kernel that reads runs where they lie, which no backend has yet")
    b.add_argument("--kv-gib", type=_float_in(0, 1e6, lo_open=True), default=None, help="KV capacity in GiB (default: from the profile)")
    b.add_argument("--max-requests", type=_int_in(1), default=None)
    b.add_argument("--mode", choices=("offline", "online"), default="offline")
    b.add_argument("--rate-scale", type=_float_in(0, 1e6, lo_open=True), default=1.0, help="online mode: speed arrivals up by X")
    b.add_argument("--slo-ttft-s", type=_float_in(0, 1e6, lo_open=True), default=None,
                   help="online mode: p99 TTFT limit; with --slo-tpot-s, report goodput_rps per policy")
    b.add_argument("--slo-tpot-s", type=_float_in(0, 1e6, lo_open=True), default=None,
                   help="online mode: p99 TPOT limit (seconds per output token after the first)")
    b.add_argument("--goodput-runs", type=_int_in(1, 64), default=8,
                   help="replays per policy in the goodput search (default 8, the first at --rate-scale)")
    b.add_argument("--max-new-tokens", type=_int_in(1), default=None,
                   help=f"cap on generation length (default: the trace's, else {SchedulerConfig.max_new_tokens})")
    b.add_argument("--predictor", default=None,
                   help="auto (default: online lengths per client and prompt band; the bundled learned model where "
                        "it proves calibrated), simple (online only), default (the bundled learned model alone), "
                        "s3, median, or a folder from `predictor train`")
    b.add_argument("--seed", type=_SEED, default=0)
    b.add_argument("--config", default=None, metavar="FILE",
                   help="an `odma-mlu serve` YAML file: its cache: and scheduler: sections configure the replay "
                        "(the flags below override them; other sections are not read)")
    # Cache and scheduler flags default to None: given, they override --config; else the config
    # file's value, else the config dataclasses' default (shown in each help).
    b.add_argument("--max-num-seqs", type=_int_in(1), default=None,
                   help=f"cap on running sequences (default {SchedulerConfig.max_num_seqs})")
    add_chunked_prefill_arg(b, default=None)
    add_swap_space_arg(b, default=None)
    b.add_argument("--max-prefill-chunk-tokens", type=_int_in(1), default=None,
                   help="with --chunked-prefill: prompt tokens one sequence computes per step "
                        f"(default {SchedulerConfig.max_prefill_chunk_tokens})")
    b.add_argument("--max-num-batched-tokens", type=_int_in(1), default=None,
                   help=f"tokens per step, decodes + prefill (default {SchedulerConfig.max_num_batched_tokens})")
    b.add_argument("--page-size", type=_int_in(1, 65536), default=None,
                   help=f"paged policy page tokens (default {CacheConfig.page_size_tokens})")
    b.add_argument("--json", default=None, type=_out_path, metavar="OUT")
    b.add_argument("--plot", default=None, type=_out_path, metavar="OUT.png")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_bench)

    pb = sub.add_parser("profile-bandwidth", help="measure sequential and gather bandwidth; write a profile")
    pb.add_argument("--backend", choices=("cpu", "cuda", "mlu"), default="cpu")
    pb.add_argument("--quick", action="store_true", help="small buffer and few repeats (< 30 s)")
    pb.add_argument("--out", default=None, type=_out_path, metavar="PROFILE.yaml")
    pb.add_argument("--plot", default=None, type=_out_path, metavar="OUT.png")
    pb.add_argument("--name", default=None, help="profile name (default: derived from the host)")
    pb.set_defaults(func=_profile_bandwidth)

    pr = sub.add_parser("predictor", help="train or evaluate the generation-length predictor")
    prs = pr.add_subparsers(dest="predictor_command", required=True)
    t = prs.add_parser("train")
    t.add_argument("--data", action="append", required=True, help="data file (repeatable)")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=_SEED, default=0)
    t.add_argument("--max-minutes", type=_float_in(0, 1e5, lo_open=True), default=10.0)
    t.set_defaults(func=_predictor_train)
    e = prs.add_parser("eval")
    e.add_argument("--predictor", default=None)
    e.add_argument("--data", required=True)
    e.add_argument("--json", default=None, type=_out_path, metavar="OUT")
    e.add_argument("--split", default="test", choices=("test", "all"),
                   help="'test': the held-out split used in training; 'all': every record")
    e.set_defaults(func=_predictor_eval)

    g = sub.add_parser("generate", help="generate text with the real engine")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_int_in(1), default=64)
    g.add_argument("--kv-policy", choices=POLICIES, default="odma")
    g.add_argument("--temperature", type=_float_in(0, 100), default=0.0)
    g.add_argument("--seed", type=_SEED, default=0)
    g.add_argument("--backend", default="auto")
    g.add_argument("--dtype", default=None)
    g.add_argument("--json", default=None, type=_out_path, metavar="OUT")
    g.set_defaults(func=_generate)

    v = sub.add_parser("validate-emulator", help="time real decode steps next to the cost model")
    v.add_argument("--model", required=True)
    v.add_argument("--profile", required=True)
    v.add_argument("--backend", choices=("cpu", "cuda", "mlu"), default="cpu")
    v.add_argument("--json", default=None, type=_out_path, metavar="OUT")
    v.add_argument("--timer", choices=("backend", "thread-cpu"), default="backend",
                   help="what 'measured' is: the backend's timer (default), or on CPU with one torch thread "
                        "the thread's CPU time (excludes other processes' load on a shared host)")
    v.add_argument("--repeats", type=_int_in(1), default=None, help="timed rounds per case (default 9)")
    v.add_argument("--max-error", type=_float_in(0), default=None,
                   help="PASS when the held-out median |predicted - measured| / measured is at most this "
                        "(default 0.25); else FAIL, exit 1")
    v.set_defaults(func=_validate_emulator)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", default=None)
    src.add_argument("--model", default=None)
    s.add_argument("--backend", choices=("auto", "mlu", "cuda", "cpu", "emulated"), default=None)
    s.add_argument("--emulated-target", default=None,
                   help="--backend emulated: the model shape the clock and KV capacity follow (e.g. gemma-3-12b, "
                        "or a config.json; default: the 7B target)")
    s.add_argument("--kv-policy", choices=POLICIES, default=None)
    s.add_argument("--predictor", default=None)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_int_in(0, 65535), default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set $ODMA_API_KEY)")
    s.add_argument("--reasoning-parser", choices=("deepseek_r1", "none"), default=None,
                   help="split <think>...</think> into reasoning_content (overrides server.reasoning_parser)")
    s.set_defaults(func=_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad flag value: argparse printed the one-line usage error
        return e.code if isinstance(e.code, int) else 2
    func: Callable[[argparse.Namespace], int] = ns.func
    if hasattr(ns, "no_progress") and not sys.stderr.isatty():
        ns.no_progress = True  # progress bars are carriage-return spam in logs and CI output
    try:
        return int(func(ns) or 0)
    except OdmaError as e:
        print(f"odma-mlu {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
