"""What deciding a span costs per request, in-process: the SDK's ``start_span`` against the fast
path's own root decision (services/ops/tracing.py), at a few sampling ratios.

    python -m bench.studies.tracing_cost [--n 20000]

For each ratio of ``parentbased_traceidratio``: ``sdk`` is ``Tracer.start_span`` for a request
without a caller's trace, ended at once (what a span per request would cost if the SDK decided
every time; a dropped request still pays for ids, the sampler and a non-recording span);
``servery`` is ``Tracing.server_span`` on the same request's raw headers (the header scan and
one random draw, the SDK called only for the requests picked), then ``finish`` and ``end``.
Spans go to a batch processor with an exporter that drops them. Microseconds per request, the
best of 5 runs. Writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
    from opentelemetry.trace import SpanKind

    from services.ops import tracing

    p = argparse.ArgumentParser(prog="python -m bench.studies.tracing_cost", description=__doc__)
    p.add_argument("--n", type=int, default=20000)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    class Drop(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    headers = [(b"host", b"127.0.0.1:3000"), (b"content-type", b"application/json")]
    headers += [(b"content-length", b"52"), (b"user-agent", b"wrk")]
    print(f"{'ratio':>6} {'sdk us':>8} {'servery us':>11}")
    for ratio in (0.0, 0.01, 0.1, 1.0):
        sampler = ParentBasedTraceIdRatio(ratio)
        ids = tracing._PresampledIds()
        provider = TracerProvider(sampler=sampler, id_generator=ids)
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        tracer = provider.get_tracer("bench")
        ours = tracing.Tracing(tracer, sampler, ids, roots=True)

        def sdk(tracer: object = tracer) -> None:
            tracer.start_span("POST /predict", kind=SpanKind.SERVER).end()  # type: ignore[attr-defined]

        def servery(ours: tracing.Tracing = ours) -> None:
            span = ours.server_span("POST", "/predict", headers, "rid")
            if span is not None:
                ours.finish(span, 200, ("iris", "v1"))
                span.end()

        cost = [
            min(timeit.repeat(f, number=args.n, repeat=5)) / args.n * 1e6 for f in (sdk, servery)
        ]
        print(f"{ratio:>6} {cost[0]:>8.2f} {cost[1]:>11.2f}", flush=True)
        provider.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
