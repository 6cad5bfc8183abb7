"""This tree against an earlier commit, on one model and one endpoint, in paired runs.

    python -m bench.studies.before_after --rev d168bef [--model breast_cancer_large]
                                         [--endpoint oip] [-c 64] [--repeats 8] [--seconds 5]

Both routers serve ``--model`` inline from the model store at once (the earlier commit from a
``git worktree``); wrk drives one at a time, alternating which goes first each repeat, so slow
drift of this shared VM's speed hits both alike. Prints each repeat's req/s and the ratio
this/before, and the median ratio. Use it to find what a change costs the hot path of a model
that ``bench.studies.versioning`` (iris, ``/predict``) does not cover. Writes nothing.

It also prints the router workers' CPU time per answered request (user + system time, summed
over the server's router worker processes, over the requests wrk got answers to). On this VM
req/s of single repeats swing by ±30 % (other tenants take the CPU), while CPU per
request moves far less, so a few percent show in the CPU column long before they show in req/s
(e.g. one fewer write per response: 237 -> 219 us, req/s median 1.03 with repeats 0.84-1.37).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.harness.processes import cpu_seconds, router_workers
from bench.harness.results import use_model_store
from bench.harness.server import start_server, worktree
from bench.harness.subjects import load_subject, oip_bodies, predict_bodies
from bench.harness.wrk import run_wrk


def bodies(model: str, endpoint: str) -> list[str]:
    """One-row bodies of ``model``'s own rows for ``/predict`` or OIP V2 REST."""
    subject = load_subject(model)
    return predict_bodies(subject) if endpoint == "predict" else oip_bodies(subject)


def _env(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.studies.before_after", description=__doc__)
    p.add_argument("--rev", required=True, help="git revision to compare against")
    p.add_argument("--model", default="breast_cancer_large")
    p.add_argument("--endpoint", choices=("oip", "predict"), default="oip")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of this tree's server (repeatable), e.g. OTEL_TRACES_SAMPLER_ARG=1",
    )
    p.add_argument(
        "--before-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the earlier commit's server (repeatable)",
    )
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    home = use_model_store()
    config = f"models:\n  - {{name: {args.model}, tag: {args.model}, placement: inline}}\n"
    path = "/predict" if args.endpoint == "predict" else f"/v2/models/{args.model}/infer"
    payload = bodies(args.model, args.endpoint)
    rps: dict[str, list[float]] = {"this": [], "before": []}
    cpu_us: dict[str, list[float]] = {"this": [], "before": []}
    with tempfile.TemporaryDirectory(prefix="servery-before-after-") as tmp_name:
        tmp = Path(tmp_name)
        with worktree(args.rev, tmp) as before_tree:
            servers = {
                "this": start_server(home, config, tmp / "this", env=_env(args.env)),
                "before": start_server(
                    home, config, tmp / "before", root=before_tree, env=_env(args.before_env)
                ),
            }
            try:
                workers = {k: router_workers(srv) for k, srv in servers.items()}
                for rep in range(args.repeats):
                    order = ["this", "before"] if rep % 2 == 0 else ["before", "this"]
                    for name in order:
                        url = servers[name].url + path
                        used = cpu_seconds(workers[name])
                        result = run_wrk(
                            url, payload, concurrency=args.concurrency, seconds=args.seconds
                        )
                        used = cpu_seconds(workers[name]) - used
                        rps[name].append(result.rps)
                        cpu_us[name].append(used / max(result.ok, 1) * 1e6)
                        print(
                            f"repeat {rep + 1} {name:6} {result.rps:8,.0f} req/s "
                            f"{cpu_us[name][-1]:7.1f} us router CPU/request",
                            flush=True,
                        )
            finally:
                for srv in servers.values():
                    srv.stop()
    ratios = [a / b for a, b in zip(rps["this"], rps["before"], strict=True)]
    print(f"this/{args.rev} per repeat: " + ", ".join(f"{r:.3f}" for r in ratios))
    print(
        f"median this/{args.rev}: {statistics.median(ratios):.3f} "
        f"({args.model}, {args.endpoint}, c={args.concurrency}, {args.repeats} x {args.seconds} s)"
    )
    this, before = statistics.median(cpu_us["this"]), statistics.median(cpu_us["before"])
    print(
        f"median router CPU per request: this {this:.1f} us, {args.rev} {before:.1f} us "
        f"(this/{args.rev} {this / before:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
