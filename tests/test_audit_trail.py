"""The audit trail at run time: group commit, backpressure, failures, sinks, crash durability."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from bastion.core import audit, auditlog, events
from bastion.core.audit import AuditTrail, AuditUnavailable
from bastion.core.config import AuditSection

# every test here finishes in well under a second when it works; this only stops a hung test
TEST_DEADLINE = 30


def judged(n: int, session: str = "s1", statement: str | None = None) -> events.RequestJudged:
    return events.RequestJudged(
        session_id=session,
        request_no=n,
        identity="ci-deploy",
        target="clinic",
        kind="statement",
        statements=(statement or f"SELECT name FROM patients WHERE id = {n}",),
        actions=("select",),
        verdict="allow",
    )


async def eventually(predicate, interval: float = 0.01) -> None:
    """Wait until ``predicate()`` holds (the caller's fail_after bounds the wait)."""
    while not predicate():
        await trio.sleep(interval)


def requests_in(directory: Path) -> list[int]:
    return [r.event["request_no"] for r in auditlog.iter_records(directory) if r.type == "request"]


def verify(trail: AuditTrail) -> auditlog.VerifyReport:
    return auditlog.verify(trail.directory, [trail.public_key])


@trio.testing.trio_test
async def test_group_commit_covers_many_concurrent_durable_records_with_few_fsyncs(tmp_path: Path) -> None:
    writers, per_writer = 50, 20
    acknowledged: set[tuple[str, int]] = set()
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)

            async def session(w: int) -> None:
                for n in range(per_writer):
                    await trail.record(judged(n, f"w{w}"), durable=True)
                    acknowledged.add((f"w{w}", n))

            async with trio.open_nursery() as sessions:
                for w in range(writers):
                    sessions.start_soon(session, w)
            statistics = trail.statistics()
            await trail.aclose()
    total = writers * per_writer
    assert len(acknowledged) == total
    stored = {(r.session_id, r.event["request_no"]) for r in auditlog.iter_records(trail.directory)}
    assert stored == acknowledged
    assert statistics.records == statistics.durable_waits == total
    assert statistics.fsyncs * 5 <= total, statistics  # one fsync covers the records of many sessions
    assert verify(trail).ok


@trio.testing.trio_test
async def test_close_flushes_what_is_queued_and_seals_the_segment(tmp_path: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for n in range(200):
                await trail.record(judged(n))  # not durable: queued, not waited for
            await trail.aclose()
            await trail.aclose()  # idempotent
            with pytest.raises(AuditUnavailable):
                await trail.record(judged(999))
    assert requests_in(trail.directory) == list(range(200))
    report = verify(trail)
    assert report.ok and report.chains[0].open_segment is None


@trio.testing.trio_test
async def test_cancelling_run_still_flushes_the_queue(tmp_path: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for n in range(100):
                await trail.record(judged(n))
            nursery.cancel_scope.cancel()
    assert requests_in(trail.directory) == list(range(100))
    assert verify(trail).ok


def stalled_fsync(monkeypatch) -> threading.Event:
    """The disk stalls: every fsync of the log waits (in the writer's thread) until the event is set."""
    gate = threading.Event()
    sync = auditlog.LogWriter.sync

    def stuck_sync(self):
        gate.wait(TEST_DEADLINE)
        return sync(self)

    monkeypatch.setattr(auditlog.LogWriter, "sync", stuck_sync)
    return gate


@trio.testing.trio_test
async def test_a_full_queue_holds_callers_back(tmp_path: Path, monkeypatch) -> None:
    gate = stalled_fsync(monkeypatch)
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            nursery.start_soon(functools.partial(trail.record, judged(0), durable=True))
            await trio.testing.wait_all_tasks_blocked()  # the writer waits for record 0's fsync
            for n in range(1, audit.QUEUE_CAPACITY + 1):
                await trail.record(judged(n))
            assert trail.statistics().queue_length == audit.QUEUE_CAPACITY
            done = trio.Event()

            async def one_more() -> None:
                await trail.record(judged(audit.QUEUE_CAPACITY + 1))
                done.set()

            nursery.start_soon(one_more)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # waits for space: memory stays bounded
            gate.set()
            await done.wait()
            await trail.aclose()
    assert requests_in(trail.directory) == list(range(audit.QUEUE_CAPACITY + 2))


@trio.testing.trio_test
async def test_closing_while_a_durable_record_waits_for_its_fsync_finishes_that_record_first(tmp_path: Path, monkeypatch) -> None:
    gate = stalled_fsync(monkeypatch)
    outcomes = []
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            gate.set()
            await trail.record(judged(0), durable=True)
            await trail.record(judged(1), durable=True)
            gate.clear()

            async def statement() -> None:
                await trail.record(judged(2), durable=True)  # s1 again: writes its own batch, then its fsync stalls
                outcomes.append("recorded")

            nursery.start_soon(statement)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(trail.aclose)
            await trio.testing.wait_all_tasks_blocked()
            assert outcomes == [] and not trail.healthy  # closing, but the fsync under way is not abandoned
            gate.set()
    assert outcomes == ["recorded"]
    assert requests_in(trail.directory) == [0, 1, 2]
    report = verify(trail)
    assert report.ok and report.chains[0].open_segment is None


@trio.testing.trio_test
async def test_a_full_disk_refuses_statements_then_recovers_and_records_the_gap(tmp_path: Path, disk) -> None:
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(fail_closed=True), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            await trail.record(judged(1), durable=True)
            disk.full = True
            with pytest.raises(AuditUnavailable):
                await trail.record(judged(2), durable=True)
            assert not trail.healthy
            with pytest.raises(AuditUnavailable):  # refused at once while the log is down
                await trail.record(judged(3))
            assert "No space left" in trail.statistics().last_error
            disk.full = False
            await eventually(lambda: trail.healthy)
            await trail.record(judged(4), durable=True)
            await trail.aclose()
    records = list(auditlog.iter_records(trail.directory))
    assert [r.event.get("request_no") for r in records if r.type == "request"] == [1, 4]
    (damage,) = [r for r in records if r.type == auditlog.DAMAGE_RECORD_TYPE]
    assert damage.event["unconfirmed_from_seq"] == 2  # the refused statement's record is marked
    report = verify(trail)
    assert report.ok, report.problems
    assert "recovered-damage" in {w.kind for w in report.warnings}


@trio.testing.trio_test
async def test_without_fail_closed_a_failing_log_does_not_stop_callers(tmp_path: Path, disk) -> None:
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(fail_closed=False), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            disk.full = True
            await trail.record(judged(1), durable=True)  # logged, not raised
            await trail.record(judged(2))
            assert trail.statistics().dropped >= 1
            disk.full = False
            await eventually(lambda: trail.healthy)
            await trail.aclose()


@trio.testing.trio_test
async def test_a_log_that_cannot_be_opened_stops_a_fail_closed_gateway(tmp_path: Path) -> None:
    (tmp_path / "audit").write_text("a file where the directory should be")
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(fail_closed=True), tmp_path)
        with pytest.raises(ExceptionGroup) as info:
            async with trio.open_nursery() as nursery:
                await nursery.start(trail.run)
    assert info.group_contains(AuditUnavailable, match="cannot open the audit log")


@trio.testing.trio_test
async def test_a_configured_signing_key_is_used_and_none_is_generated(tmp_path: Path, monkeypatch) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bastion.core.secrets import SecretRef

    key = Ed25519PrivateKey.generate()
    monkeypatch.setenv("AUDIT_KEY", key.private_bytes_raw().hex())
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(signing_key=SecretRef("env", "AUDIT_KEY")), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            await trail.record(judged(1), durable=True)
            await trail.aclose()
    assert trail.public_key == auditlog.public_key_bytes(key) and not trail.key_generated
    assert not (trail.directory / auditlog.SIGNING_KEY_FILE).exists()
    assert auditlog.verify(trail.directory, [auditlog.public_key_bytes(key)]).ok


@trio.testing.trio_test
async def test_a_missing_configured_key_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    from bastion.core.secrets import SecretRef

    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(signing_key=SecretRef("env", "BASTION_TEST_NO_SUCH_VARIABLE")), tmp_path)
        with pytest.raises(ExceptionGroup) as info:
            async with trio.open_nursery() as nursery:
                await nursery.start(trail.run)
    assert info.group_contains(AuditUnavailable, match="signing_key")
    assert not (tmp_path / "audit" / auditlog.SIGNING_KEY_FILE).exists()


@trio.testing.trio_test
async def test_on_record_sees_every_event_and_its_errors_are_contained(tmp_path: Path) -> None:
    seen = []

    def observe(event):
        seen.append(event)
        raise RuntimeError("a broken observer")

    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path, on_record=observe)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            await trail.record(judged(1), durable=True)
            await trail.record(judged(2))
            await trail.aclose()
    assert [e.request_no for e in seen] == [1, 2]
    assert requests_in(trail.directory) == [1, 2]


@trio.testing.trio_test
async def test_segments_rotate_at_the_configured_size(tmp_path: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(segment_max_bytes=4096), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for n in range(300):
                await trail.record(judged(n), durable=n % 10 == 0)
            await trail.aclose()
    report = verify(trail)
    assert report.ok and report.chains[0].segments > 5
    assert requests_in(trail.directory) == list(range(300))


class FileSettings:
    """What a ``[[audit.sinks]] kind = "file"`` section hands the trail."""

    name = "file"

    def __init__(self, fsync: str, fsync_interval_ms: int = audit.DEFAULT_FSYNC_INTERVAL_MS) -> None:
        self.local_log = audit.LocalLogSettings(fsync=fsync, fsync_interval_ms=fsync_interval_ms)


def test_the_default_fsync_mode_is_durable() -> None:
    assert audit.LocalLogSettings().fsync == "durable"
    assert AuditTrail(AuditSection(), Path("unused")).local_log.fsync == "durable"


@trio.testing.trio_test
async def test_fsync_mode_durable_syncs_only_for_waiting_callers(tmp_path: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path, sinks=[FileSettings("durable")])
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for n in range(5):
                await trail.record(judged(n))
                await eventually(lambda n=n: trail.statistics().batches == n + 1)  # written after WRITE_DELAY, alone
            before = trail.statistics()
            await trail.record(judged(5), durable=True)
            after = trail.statistics()
            await trail.aclose()
    assert before.fsyncs == 0 and before.committed_seq == 0  # five writes, none fsynced
    assert after.fsyncs == 1 and after.committed_seq == 6  # the durable record's fsync covers them all
    assert requests_in(trail.directory) == list(range(6))


@trio.testing.trio_test
async def test_records_nobody_waits_for_ride_along_with_the_next_durable_one(tmp_path: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for n in range(0, 30, 3):  # a statement: its request (waited for), rows and response
                await trail.record(judged(n), durable=True)
                await trail.record(events.ResultRows(session_id="s1", request_no=n, first_row=0, rows=(("1",),)))
                await trail.record(events.ResponseCompleted(session_id="s1", request_no=n, status="ok", rows=1))
            statistics = trail.statistics()
            await trail.aclose()
    assert statistics.records == 28 and statistics.queue_length == 2  # the last rows and response still queued
    assert statistics.batches == statistics.fsyncs == 10  # one write and one fsync per statement
    assert [r.type for r in auditlog.iter_records(trail.directory)] == ["request", "rows", "response"] * 10


@pytest.mark.parametrize("sessions", [1, 6])  # a lone session writes its own batches; several share the writer's
@trio.testing.trio_test
async def test_with_fsync_durable_a_durable_record_is_fsynced_before_its_caller_goes_on(tmp_path: Path, sessions: int) -> None:
    synced_when_acknowledged: list[bool] = []
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)

            async def session(name: str) -> None:
                for n in range(20):
                    await trail.record(judged(n, name), durable=True)
                    committed = trail.statistics().committed_seq  # the last seq known fsynced
                    (own,) = [r.seq for r in auditlog.iter_records(trail.directory) if r.type == "request" and (r.session_id, r.event["request_no"]) == (name, n)]
                    synced_when_acknowledged.append(own <= committed)
                    await trail.record(events.ResponseCompleted(session_id=name, request_no=n, status="ok"))
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as sessions_nursery:
                for s in range(sessions):
                    sessions_nursery.start_soon(session, f"s{s}")
            await trail.aclose()
    assert len(synced_when_acknowledged) == 20 * sessions and all(synced_when_acknowledged)


@trio.testing.trio_test
async def test_with_fsync_durable_records_nobody_waits_for_are_fsynced_within_the_interval(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(audit, "DURABLE_FSYNC_INTERVAL", 0.05)
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for n in range(3):
                await trail.record(judged(n))
            await eventually(lambda: trail.statistics().committed_seq == 3)
            assert trail.statistics().fsyncs == 1
            await trail.aclose()


@trio.testing.trio_test
async def test_with_fsync_interval_a_durable_record_is_acknowledged_once_written(tmp_path: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path, sinks=[FileSettings("interval", fsync_interval_ms=3_600_000)])
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for n in range(5):
                await trail.record(judged(n), durable=True)
            statistics = trail.statistics()
            assert statistics.fsyncs == 0 and statistics.committed_seq == 0
            assert requests_in(trail.directory) == list(range(5))  # in the segment file already (the OS has them)
            await trail.aclose()
    assert auditlog.verify(trail.directory, [trail.public_key]).ok


@trio.testing.trio_test
async def test_with_fsync_interval_fsyncs_run_every_interval_and_feed_the_sinks(tmp_path: Path) -> None:
    sink = FlakySink()
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path, sinks=[FileSettings("interval", fsync_interval_ms=20), sink])
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for n in range(5):
                await trail.record(judged(n), durable=True)
            await eventually(lambda: trail.statistics().committed_seq == 5)  # without any other record
            await eventually(lambda: seqs(sink) == [1, 2, 3, 4, 5])
            await trail.aclose()


@trio.testing.trio_test
async def test_with_fsync_always_every_batch_is_fsynced(tmp_path: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path, sinks=[FileSettings("always")])
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for n in range(5):
                await trail.record(judged(n))
                await eventually(lambda n=n: trail.statistics().committed_seq == n + 1)  # written and fsynced at once
            statistics = trail.statistics()
            await trail.aclose()
    assert statistics.batches == statistics.fsyncs == 5


def test_an_unknown_fsync_mode_or_interval_is_refused() -> None:
    with pytest.raises(ValueError):
        audit.LocalLogSettings(fsync="sometimes")
    with pytest.raises(ValueError):
        audit.LocalLogSettings(fsync="interval", fsync_interval_ms=0)


@pytest.mark.parametrize("use_eventfd", [True, False] if hasattr(os, "eventfd") else [False])
@trio.testing.trio_test
async def test_the_writer_thread_returns_results_and_raises_errors(use_eventfd: bool) -> None:
    lane = audit._Lane(use_eventfd=use_eventfd)
    lane.start()
    try:
        assert await lane.run(lambda a, b: a + b, 2, 3) == 5
        assert await lane.run(threading.current_thread) is not threading.current_thread()
        with pytest.raises(OSError, match="disk on fire"):
            await lane.run(functools.partial(_raise, OSError("disk on fire")))
        assert await lane.run(lambda: "still serving") == "still serving"
    finally:
        lane.stop()


def _raise(exc: BaseException) -> None:
    raise exc


@trio.testing.trio_test
async def test_a_cancelled_wait_for_the_writer_thread_still_gets_the_outcome() -> None:
    lane = audit._Lane()
    lane.start()
    release = threading.Event()
    outcomes = []
    scope = trio.CancelScope()
    try:

        async def call() -> None:
            with scope:
                outcomes.append(await lane.run(lambda: release.wait(TEST_DEADLINE) and "synced"))
                await trio.sleep(0)  # the cancellation arrives at the next checkpoint
                outcomes.append("not cancelled")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert outcomes == []  # still waiting for the thread, not abandoned
            release.set()
        assert scope.cancelled_caught and outcomes == ["synced"]
    finally:
        lane.stop()


# --- sinks ---------------------------------------------------------------------------------------


class FlakySink:
    """Stores records by (chain, seq); raises while ``down``."""

    def __init__(self, name: str = "flaky") -> None:
        self.name = name
        self.down = False
        self.stored: dict[tuple[str, int], auditlog.AuditRecord] = {}
        self.deliveries = 0
        self.opened = 0

    async def open(self) -> None:
        if self.down:
            raise ConnectionRefusedError("sink is down")
        self.opened += 1

    async def write(self, records) -> None:
        await trio.sleep(0)
        if self.down:
            raise ConnectionResetError("sink went away")
        self.deliveries += len(records)
        for record in records:
            self.stored[(record.chain, record.seq)] = record

    async def aclose(self) -> None:
        pass


def seqs(sink: FlakySink) -> list[int]:
    return sorted(seq for _, seq in sink.stored)


@trio.testing.trio_test
async def test_a_sink_outage_blocks_nothing_and_is_caught_up_later(tmp_path: Path) -> None:
    sink = FlakySink()
    sink.down = True
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path, sinks=[sink], sink_retry_max=0.02)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for n in range(30):
                await trail.record(judged(n), durable=True)  # not held up by the sink
            await eventually(lambda: trail.statistics().sinks[0].failures > 0)
            statistics = trail.statistics().sinks[0]
            assert not statistics.healthy and statistics.lag == 30 and "down" in statistics.last_error
            sink.down = False
            await eventually(lambda: trail.statistics().sinks[0].lag == 0)
            assert trail.statistics().sinks[0].healthy
            await trail.aclose()
    assert seqs(sink) == list(range(1, 31))
    assert [r.event["request_no"] for _, r in sorted(sink.stored.items())] == list(range(30))


@trio.testing.trio_test
async def test_sink_positions_survive_a_restart_and_a_sink_down_at_shutdown_catches_up(tmp_path: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        first = FlakySink("copy")
        trail = AuditTrail(AuditSection(), tmp_path, sinks=[first], sink_retry_max=0.02)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for n in range(10):
                await trail.record(judged(n), durable=True)
            await eventually(lambda: trail.statistics().sinks[0].lag == 0)
            first.down = True  # the sink dies; five more records, then the gateway stops
            for n in range(10, 15):
                await trail.record(judged(n), durable=True)
            await trail.aclose()
        assert seqs(first) == list(range(1, 11))

        second = FlakySink("copy")
        trail = AuditTrail(AuditSection(), tmp_path, sinks=[second], sink_retry_max=0.02)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            await trail.record(judged(15), durable=True)
            await eventually(lambda: trail.statistics().sinks[0].lag == 0)
            await trail.aclose()
    # from where the first run stopped: nothing from before is sent again, nothing after is lost
    assert seqs(second) == list(range(11, 17))  # 11-15 missed at shutdown, then the new 16
    assert second.deliveries == len(second.stored)
    assert sorted(first.stored.keys() | second.stored.keys()) == [(trail.chain, s) for s in range(1, 17)]


# --- nothing outside the audit directory, nothing readable without the reader ----------------------

PLANTED = "PLANTED-PHI-Zq7w-123-45-6789"


@trio.testing.trio_test
async def test_records_stay_in_the_audit_directory_and_only_the_reader_decodes_them(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), state)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for n in range(5):
                await trail.record(judged(n, statement=f"SELECT '{PLANTED}' AS x -- {n}"))
            await trail.record(events.ResultRows(session_id="s1", request_no=1, first_row=0, rows=((PLANTED, None),)), durable=True)
            await trail.aclose()
    written = [p for p in state.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(state / "audit") for p in written)
    needles = [PLANTED.encode(), PLANTED.encode("utf-16-le"), PLANTED[:12].encode()]
    for path in written:
        data = path.read_bytes()
        assert not any(needle in data for needle in needles), path
    decoded = [r for r in auditlog.iter_records(state / "audit") if PLANTED in repr(r.event)]
    assert len(decoded) == 6


# --- a writer killed mid-load ----------------------------------------------------------------------

CRASH_WRITER = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from bastion.core.audit import AuditTrail, LocalLogSettings
    from bastion.core.config import AuditSection
    from bastion.core import events

    class FileSettings:
        name = "file"
        local_log = LocalLogSettings(fsync=sys.argv[2])

    async def main(state):
        trail = AuditTrail(AuditSection(segment_max_bytes=64 * 1024), Path(state), sinks=[FileSettings()])
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)

            async def session(w):
                for n in range(100000):
                    await trail.record(events.RequestJudged(
                        session_id=f"w{w}", request_no=n, identity="ci", target="db", kind="statement",
                        statements=("SELECT 1",), actions=("select",), verdict="allow"), durable=True)
                    sys.stdout.write(f"w{w} {n}\\n")
                    sys.stdout.flush()

            for w in range(20):
                nursery.start_soon(session, w)

    trio.run(main, sys.argv[1])
    """
)
# enough acknowledged records that the kill lands in the middle of steady group-commit load
ACKS_BEFORE_KILL = 2000


@pytest.mark.slow
@pytest.mark.parametrize("fsync", ["durable", "interval"])  # interval: acknowledged once written, before any fsync
def test_sigkill_mid_load_loses_no_acknowledged_record(tmp_path: Path, fsync: str) -> None:
    process = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, str(tmp_path), fsync], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    acknowledged = set()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            session, n = line.split()
            acknowledged.add((session, int(n)))
            if len(acknowledged) >= ACKS_BEFORE_KILL:
                break
        process.send_signal(signal.SIGKILL)
        for line in process.stdout:  # acknowledgements already printed before the kill count too
            if line.endswith("\n"):
                session, n = line.split()
                acknowledged.add((session, int(n)))
    finally:
        process.kill()
        process.wait(TEST_DEADLINE)
    assert len(acknowledged) >= ACKS_BEFORE_KILL
    directory = tmp_path / "audit"
    stored = {(r.session_id, r.event["request_no"]) for r in auditlog.iter_records(directory)}
    assert acknowledged <= stored
    before_restart = auditlog.verify(directory)
    assert before_restart.chains[0].open_segment is not None  # killed mid-segment, never sealed

    async def reopen() -> AuditTrail:
        trail = AuditTrail(AuditSection(segment_max_bytes=64 * 1024), tmp_path)
        with trio.fail_after(TEST_DEADLINE):
            async with trio.open_nursery() as nursery:
                await nursery.start(trail.run)
                await trail.record(judged(0, "after-restart"), durable=True)
                await trail.aclose()
        return trail

    trail = trio.run(reopen)
    report = verify(trail)
    assert report.ok, report.problems
    stored_after = [(r.session_id, r.event.get("request_no")) for r in auditlog.iter_records(directory)]
    assert acknowledged <= set(stored_after) and stored_after[-1] == ("after-restart", 0)
    assert len(stored_after) == len(set(stored_after))  # the restart reused no seq and lost nothing


@trio.testing.trio_test
async def test_an_event_that_cannot_be_encoded_fails_only_its_own_caller(tmp_path: Path, monkeypatch) -> None:
    poisoned = events.ResponseCompleted(session_id="bad", request_no=1, status="ok", masked={"name": 2**70})  # beyond msgpack
    gate = stalled_fsync(monkeypatch)
    batches: list[int] = []
    append = auditlog.LogWriter.append

    def counted_append(self, entries):
        batches.append(len(entries))
        return append(self, entries)

    monkeypatch.setattr(auditlog.LogWriter, "append", counted_append)
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            nursery.start_soon(functools.partial(trail.record, judged(0), durable=True))  # written, then its fsync stalls
            await trio.testing.wait_all_tasks_blocked()
            outcomes: dict[str, str] = {}

            async def call(name: str, event: events.AuditEvent) -> None:
                try:
                    await trail.record(event, durable=True)
                    outcomes[name] = "recorded"
                except AuditUnavailable:
                    outcomes[name] = "refused"

            async with trio.open_nursery() as callers:
                callers.start_soon(call, "before", judged(1))
                callers.start_soon(call, "poisoned", poisoned)
                callers.start_soon(call, "after", judged(2))
                await trio.testing.wait_all_tasks_blocked()
                gate.set()
            assert batches == [1, 3]  # the poisoned event shared a batch with the others
            assert trail.healthy
            await trail.aclose()
    assert outcomes == {"before": "recorded", "poisoned": "refused", "after": "recorded"}
    assert sorted(requests_in(trail.directory)) == [0, 1, 2]
    assert verify(trail).ok


@trio.testing.trio_test
async def test_a_plugin_kind_signing_key_is_resolved_with_the_given_resolver(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bastion.core.secrets import Secret, SecretRef

    key = Ed25519PrivateKey.generate()
    asked = []

    def resolver(reference: SecretRef) -> Secret:
        asked.append(reference)
        return Secret(key.private_bytes_raw().hex())

    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(signing_key=SecretRef("vault", "audit#key")), tmp_path, resolve_secret=resolver)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            await trail.aclose()
    assert asked == [SecretRef("vault", "audit#key")]
    assert trail.public_key == auditlog.public_key_bytes(key)
