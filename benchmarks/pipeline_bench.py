"""The session pipeline's own CPU per statement, in process, without sockets or an audit writer.

    .venv/bin/python benchmarks/pipeline_bench.py [--queries 20000] [--repeat 5] [--profile]

Builds what ``bastion serve`` builds for the benchmark configuration of ``benchmarks/run.py`` (the
HIPAA baseline bundle plus grants, a review rule, three column masks with every recognizer on
free text), with the real plugins and hook facade, then drives one :class:`Session` the way the
PostgreSQL relay drives it for each ``pgbench -S`` query in the simple protocol::

    judge + check (parse, authorize, record RequestJudged)
    transform_plans (masking plan for the one-column result) + the plan applied to the row
    record ResultRows (the trail's own re-masking), the plan's counts, record ResponseCompleted

The audit trail is a stub that drops events, so the figures are the layer above it: session,
hooks, plugins, analysis cache, policy memo, masking and metrics. It prints µs per query for the
whole sequence and for each step (best of ``--repeat`` rounds of CPU time). ``--profile`` prints a
cProfile of one round instead. Numbers vary with the machine: compare runs, never assert on them.

On a busy machine CPU time still varies by half; instruction counts do not. ``--only-queries N``
runs N whole queries and prints nothing, for callgrind: the difference between two counts is the
cost of the queries alone (start-up and imports cancel out)::

    for n in 200 1200; do PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n \
        .venv/bin/python benchmarks/pipeline_bench.py --only-queries $n; done
    # instructions per query: (summary of cg.1200 - summary of cg.200) / 1000
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from benchmarks.run import bastion_config  # noqa: E402

STATEMENT = "SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"


class _Server:
    host = "127.0.0.1"
    port = 5432


class _Trail:
    """Stands in for the audit trail: takes every event, keeps none."""

    async def record(self, event, *, durable: bool = False) -> None:
        return None


def build():
    from bastion.core import events
    from bastion.core.loading import load
    from bastion.core.metrics import Metrics
    from bastion.core.server import Runtime, TargetRuntime
    from bastion.core.session import Session
    from bastion.policies.analysis import Catalog
    from bastion.policies.model import Column, Identity, Message, ResultShape

    work = Path(tempfile.mkdtemp(prefix="bastion-pipeline-"))
    config_path = bastion_config(_Server(), work, 1, 2)
    loaded = load(config_path, entry_points=False)
    runtime = Runtime(loaded.config, loaded.hooks, loaded.policy, _Trail(), Metrics())
    target = TargetRuntime(loaded.config.targets[0], handler=None)
    target.state["gateway.hash_key"] = b"k" * 32
    # what the relay reads from the upstream's information_schema before the first statement
    target.state["catalog"] = Catalog.from_rows(
        [("public", "pgbench_accounts", column, n) for n, column in enumerate(("aid", "bid", "abalance", "filler"), 1)]
        + [("public", "pgbench_branches", column, n) for n, column in enumerate(("bid", "bbalance", "filler"), 1)]
    )
    session = Session(runtime, target, "127.0.0.1:1")
    identity = Identity(provider="static-token", subject="bench-ci", groups=["bench"], auth_method="token")
    trio.run(functools.partial(session._start, identity, client_user="bench-ci", database="bench"))

    def message(aid: int) -> Message:
        return Message("postgres", "statement", text=STATEMENT.format(aid=aid), dialect="postgres")

    def shape_for(request) -> ResultShape:
        # as the relay builds it (plugins/postgres_relay.py _shape): a new value for every result
        outputs = request.analysis.output_columns
        return ResultShape(
            tuple(
                Column(
                    name=o.name,
                    type_oid=23,
                    table="public.pgbench_accounts",
                    sources=frozenset({"public.pgbench_accounts.abalance", *o.sources}),
                    traced=o.traced,
                )
                for o in outputs
            )
        )

    return session, events, message, shape_for


async def one_query(session, events, message, shape_for, aid: int) -> None:
    judged = session.judge(message(aid))
    judgement = await session.check(message(aid), kind="statement", judged=judged)
    request = judgement.request
    plans = session.transform_plans(request, shape_for(request))
    values = [str(aid % 7).encode()]
    for plan in plans:
        plan.apply(values)
    await session.record(events.ResultRows(session_id=session.id, request_no=judgement.request_no, first_row=0, rows=(tuple(v.decode() for v in values),)))
    masked: dict[str, int] = {}
    for plan in plans:
        for key, count in plan.counts().items():
            masked[key] = masked.get(key, 0) + count
    await session.record_response(
        judgement.request_no, "ok", columns=("abalance",), rows=1, bytes=11, masked=masked, duration_ms=0.1, command_tag="SELECT 1"
    )


async def run_queries(parts, queries: int) -> None:
    for i in range(queries):
        await one_query(*parts, i)


async def run_round(parts, queries: int) -> dict[str, float]:
    session, events, message, shape_for = parts
    timings: dict[str, float] = {}
    clock = time.process_time  # CPU time: the machine may be busy with other work

    started = clock()
    for i in range(queries):
        await one_query(session, events, message, shape_for, i)
    timings["whole query"] = clock() - started

    msgs = [message(i) for i in range(queries)]
    started = clock()
    for m in msgs:
        session.judge(m)
    timings["judge"] = clock() - started

    judged = session.judge(msgs[0])
    started = clock()
    for m in msgs:
        await session.check(m, kind="statement", judged=judged)
    timings["check (judged)"] = clock() - started

    request = judged[0][0]
    shape = shape_for(request)
    started = clock()
    for _ in range(queries):
        session.transform_plans(request, shape)
    timings["transform_plans"] = clock() - started

    rows = events.ResultRows(session_id=session.id, request_no=1, first_row=0, rows=(("0",),))
    started = clock()
    for _ in range(queries):
        await session.record(rows)
    timings["record ResultRows"] = clock() - started

    started = clock()
    for _ in range(queries):
        await session.record_response(1, "ok", columns=("abalance",), rows=1, bytes=11, masked={}, duration_ms=0.1, command_tag="SELECT 1")
    timings["record_response"] = clock() - started
    return {name: seconds / queries * 1e6 for name, seconds in timings.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--only-queries", type=int, metavar="N", help="run N whole queries after the warm-up, print nothing")
    args = parser.parse_args()
    parts = build()
    trio.run(run_round, parts, 200)  # warm the caches
    if args.only_queries is not None:
        trio.run(run_queries, parts, args.only_queries)
        return 0
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        trio.run(run_round, parts, args.queries)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
        return 0
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, us in trio.run(run_round, parts, args.queries).items():
            best[name] = min(us, best.get(name, us))
    for name, us in best.items():
        print(f"{name:20} {us:8.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
