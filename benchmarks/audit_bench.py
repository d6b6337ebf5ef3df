"""The audit trail's hot path on its own: records per second and CPU per record.

    .venv/bin/python benchmarks/audit_bench.py [--queries 3000] [--modes durable,interval,always]
                                               [--sessions 1,8,50] [--dir /path/on/the/real/disk]
                                               [--json out.json]

Each simulated session does what one PostgreSQL session does for a simple ``SELECT`` (pgbench
``-S``): a ``request`` record it waits for (durable, as a statement's record is before the
statement is forwarded), then a ``rows`` and a ``response`` record it does not wait for, then
one trio checkpoint where a real session would wait for its client. The scenarios are one
session doing that sequentially, and 8 and 50 sessions at once. The harness itself (building
three events, the checkpoint) costs about 10-15 µs per query, included in the figures.

CPU is the whole process's (``resource.getrusage(RUSAGE_SELF)``: user + system time of every
thread, the fsync thread included), taken over the timed part only; the log directory is on the
disk the gateway would use (default: a temporary directory under ``--dir``). Also measured: the
pieces of one record on their own (event encoding, the record body, block compression).

Each scenario runs ``--repeat`` times (the machine may be shared): the table shows the median
run and the least CPU per record seen. A benchmark measures, it never asserts: compare the
printed figures between commits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import logging

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bastion.core import audit, auditlog, events  # noqa: E402
from bastion.core.config import AuditSection  # noqa: E402

# Queries each scenario runs in total (spread over its sessions): enough for a few seconds of
# steady state per scenario, few enough that the whole run stays under a minute or two.
DEFAULT_QUERIES = 3000
DEFAULT_SESSIONS = (1, 8, 50)
# Records one simulated query writes: request (durable), rows, response.
RECORDS_PER_QUERY = 3
# Queries before timing starts: opening the log, first segment, caches and thread start-up.
WARM_UP_QUERIES = 50
# How often the run looks whether the SQLite sink has caught up: short next to a run's seconds.
SINK_POLL_INTERVAL = 0.005
# Runs of each scenario: the machine is shared and one run can be off by a third; the median of
# five is steady to a few per cent, and the least CPU shows what the code costs undisturbed.
DEFAULT_REPEAT = 5
# Repetitions of each component measurement (encoding, compression): enough to average out noise.
COMPONENT_REPETITIONS = 20000
# Blocks whose size and compression the components report: a record alone, one query's three,
# and a full block (MAX_BLOCK_RECORDS) of many sessions' records.
BLOCK_SIZES = (1, 3, 64)


def cpu_seconds() -> float:
    """User + system CPU of the whole process, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def select_query(session: str, request_no: int) -> tuple[events.AuditEvent, events.AuditEvent, events.AuditEvent]:
    """The three events of one pgbench ``-S`` statement as the PostgreSQL relay records them."""
    request = events.RequestJudged(
        session_id=session,
        request_no=request_no,
        identity="ci-nightly",
        target="clinic-db",
        kind="statement",
        statements=("SELECT abalance FROM pgbench_accounts WHERE aid = ?;",),
        actions=("select",),
        fingerprints=("9f3c2a7be01d44c5",),
        tables=("pgbench_accounts",),
        risk=5,
        verdict="allow",
        rules=("grant:analytics-read",),
        policy_version="3a9f1c0b7d2e",
    )
    rows = events.ResultRows(session_id=session, request_no=request_no, first_row=0, rows=(("-2718",),))
    response = events.ResponseCompleted(
        session_id=session, request_no=request_no, status="ok", columns=("abalance",), rows=1, bytes=17, duration_ms=0.183, command_tag="SELECT 1"
    )
    return request, rows, response


class FileSinkSettings:
    """What a ``[[audit.sinks]] kind = "file"`` section hands the trail."""

    name = "file"

    def __init__(self, fsync: str) -> None:
        self.local_log = audit.LocalLogSettings(fsync=fsync)


async def run_scenario(directory: Path, mode: str, sessions: int, queries: int, sqlite_sink: bool = False) -> dict[str, Any]:
    sinks: list[Any] = [FileSinkSettings(mode)]
    if sqlite_sink:
        from bastion.plugins.audit_sinks import SqliteSink

        sinks.append(SqliteSink("index", directory / "index.sqlite"))
    trail = audit.AuditTrail(AuditSection(), directory, sinks=sinks)
    per_session = max(1, queries // sessions)
    warm_up = max(1, WARM_UP_QUERIES // sessions)
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.run)

        async def session(index: int, first: int, count: int) -> None:
            for n in range(first, first + count):
                request, rows, response = select_query(f"s{index}", n)
                await trail.record(request, durable=True)
                await trail.record(rows)
                await trail.record(response)
                # where a real session waits for its client's next statement: sessions take turns
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as warming:
            for index in range(sessions):
                warming.start_soon(session, index, 0, warm_up)
        before = trail.statistics()
        cpu, wall = cpu_seconds(), time.perf_counter()
        async with trio.open_nursery() as timed:
            for index in range(sessions):
                timed.start_soon(session, index, warm_up, per_session)
        while sqlite_sink and trail.statistics().sinks[0].lag > 0:  # the sink's share counts too
            await trio.sleep(SINK_POLL_INTERVAL)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        after = trail.statistics()
        await trail.aclose()
    records = per_session * sessions * RECORDS_PER_QUERY
    return {
        "mode": mode,
        "sessions": sessions,
        "queries": per_session * sessions,
        "records": records,
        "records_per_s": round(records / wall),
        "cpu_us_per_record": round(cpu / records * 1e6, 2),
        "cpu_us_per_query": round(cpu / (per_session * sessions) * 1e6, 2),
        "wall_s": round(wall, 3),
        "fsyncs": after.fsyncs - before.fsyncs,
        "batches": after.batches - before.batches,
        "bytes_per_record": round((after.bytes - before.bytes) / records, 1),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run (by CPU per record), with the least CPU per record and every run's figures."""
    ordered = sorted(runs, key=lambda run: run["cpu_us_per_record"])
    median = dict(ordered[len(ordered) // 2])
    median["least_cpu_us_per_record"] = ordered[0]["cpu_us_per_record"]
    median["records_per_s"] = sorted(run["records_per_s"] for run in runs)[len(runs) // 2]
    median["runs"] = [{key: run[key] for key in ("records_per_s", "cpu_us_per_record", "fsyncs", "batches")} for run in runs]
    return median


def measure(function, repetitions: int = COMPONENT_REPETITIONS) -> float:
    """CPU µs per call of ``function``."""
    function()
    start = cpu_seconds()
    for _ in range(repetitions):
        function()
    return round((cpu_seconds() - start) / repetitions * 1e6, 2)


def components() -> dict[str, float]:
    """The pieces of one record, each on its own (µs of CPU per call)."""
    out: dict[str, float] = {}
    query = select_query("s1", 1)
    for event in query:
        out[f"event_to_dict {event.type}"] = measure(lambda event=event: events.event_to_dict(event))
    data = events.event_to_dict(query[0])
    record_type = data.pop("type")
    body = auditlog.RecordBody("host.main.0123abcd", 1234, b"\0" * 32, 1.7e9, record_type, data)
    out["make_record (body msgpack + SHA-256)"] = measure(lambda: auditlog.make_record(body))
    if hasattr(events, "event_fields") and hasattr(auditlog, "spliced_body"):  # the writer's path since the splice
        for event in query:
            out[f"event_fields {event.type}"] = measure(lambda event=event: events.event_fields(event))
        head, type_part, fields = auditlog.body_head(body.chain), auditlog.body_type_part(record_type), events.event_fields(query[0])
        out["pack event + spliced body + SHA-256 (the writer's path)"] = measure(
            lambda: hashlib.sha256(auditlog.spliced_body(head, body.seq, body.prev_hash, body.at, type_part, auditlog.pack(fields))).digest()
        )
    elif hasattr(auditlog, "pack_body"):  # what the writer did per record before the splice
        fields = (body.chain, body.seq, body.prev_hash, body.at, body.type, body.event)
        out["pack_body + SHA-256 (the writer's path)"] = measure(lambda: hashlib.sha256(auditlog.pack_body(*fields)).digest())
    record = auditlog.make_record(body)
    out["encode_record (one record per frame)"] = measure(lambda: auditlog.encode_record(record))
    block = [auditlog.make_record(auditlog.RecordBody("host.main.0123abcd", 1234 + i, b"\0" * 32, 1.7e9, record_type, data)) for i in range(RECORDS_PER_QUERY)]
    if hasattr(auditlog, "encode_block"):
        out[f"encode_block ({RECORDS_PER_QUERY} records), per record"] = round(measure(lambda: auditlog.encode_block(block)) / RECORDS_PER_QUERY, 2)
    else:
        out[f"encode_record x{RECORDS_PER_QUERY}, per record"] = round(measure(lambda: [auditlog.encode_record(r) for r in block]) / RECORDS_PER_QUERY, 2)
    if hasattr(auditlog, "encode_bodies"):
        for count in BLOCK_SIZES:  # what the log grows by per block, and the CPU of one block
            bodies = realistic_bodies(count)
            raw, frame = len(auditlog.pack(bodies)), auditlog.encode_bodies(bodies)
            out[f"encode_bodies {count} records: {raw} -> {len(frame)} bytes, per block"] = measure(lambda bodies=bodies: auditlog.encode_bodies(bodies), max(200, COMPONENT_REPETITIONS // count))
    return out


def realistic_bodies(count: int) -> list[bytes]:
    """``count`` consecutive record bodies as the writer makes them: request, rows, response, …
    of a few sessions taking turns."""
    events_ = [event for n in range(count) for event in select_query(f"s{n % 8}", 1000 + n)][:count]
    head, bodies, previous = auditlog.body_head("host.main.0123abcd"), [], b"\0" * 32
    for seq, event in enumerate(events_, 1234):
        fields = events.event_fields(event)
        body = auditlog.spliced_body(head, seq, previous, 1.7e9 + seq / 1000, auditlog.body_type_part(event.type), auditlog.pack(fields))
        bodies.append(body)
        previous = hashlib.sha256(body).digest()
    return bodies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES, help="queries per scenario (all sessions together)")
    parser.add_argument("--sessions", default=",".join(map(str, DEFAULT_SESSIONS)), help="comma-separated concurrent session counts")
    parser.add_argument("--modes", default=",".join(audit.FSYNC_MODES), help="comma-separated local-log fsync modes")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary audit directories go (default: the system temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="runs of each scenario; the median is reported (and the least CPU)")
    parser.add_argument("--sqlite-sink", action="store_true", help="also feed an SQLite index sink; timing runs until it has caught up")
    parser.add_argument("--no-components", action="store_true", help="skip the per-piece measurements")
    args = parser.parse_args(argv)
    logging.getLogger("bastion.audit").setLevel(logging.ERROR)  # each run generates a key and says so
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in audit.FSYNC_MODES]
    if unknown:
        print(f"skipping fsync modes this version does not have: {', '.join(unknown)}", file=sys.stderr)
        modes = [m for m in modes if m in audit.FSYNC_MODES]
    results: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "sqlite_sink": args.sqlite_sink, "scenarios": []}
    print(f"{'mode':9} {'sessions':>8} {'records/s':>10} {'CPU µs/record':>14} {'(least)':>8} {'CPU µs/query':>13} {'fsyncs':>7} {'batches':>8} {'bytes/rec':>9}")
    for mode in modes:
        for sessions in (int(s) for s in args.sessions.split(",") if s):
            runs = []
            for _ in range(max(1, args.repeat)):
                work = Path(tempfile.mkdtemp(prefix="audit-bench-", dir=args.dir))
                try:
                    runs.append(trio.run(run_scenario, work, mode, sessions, args.queries, args.sqlite_sink))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            row = summarise(runs)
            results["scenarios"].append(row)
            print(
                f"{row['mode']:9} {row['sessions']:>8} {row['records_per_s']:>10} {row['cpu_us_per_record']:>14} {row['least_cpu_us_per_record']:>8} "
                f"{row['cpu_us_per_query']:>13} {row['fsyncs']:>7} {row['batches']:>8} {row['bytes_per_record']:>9}"
            )
    if not args.no_components:
        results["components_us"] = components()
        for name, value in results["components_us"].items():
            print(f"  {name:48} {value:>8} µs")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
