"""The SQLite approval store: decisions from another connection wake the waiter, concurrent
reviewers are serialised, and requests of a gateway process that was killed are cancelled."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from bastion.core.approvals import ReviewDesk
from bastion.core.approvals_model import ReviewRefused
from bastion.core.approvals_store import HOLDER_GONE, SqliteStore
from bastion.policies.model import Verdict
from tests.approvals_helpers import ALICE, BOB, FakeSession, pending_request, person, requirement, review_decision, running_service, section, statement

pytestmark = pytest.mark.timeout(60)
FAST_POLL = section(poll_interval=0.02)
DEADLINE = 20


async def until(predicate, step: float = 0.01):
    while not predicate():
        await trio.sleep(step)


async def other_process_desk(path) -> ReviewDesk:
    """What ``bastion approvals`` opens: the same file, another connection, no instance."""
    store = SqliteStore(path)
    await store.open(None)
    return ReviewDesk(store, admin_groups=("security-admins",))


async def test_a_decision_written_by_another_connection_wakes_the_held_session(tmp_path):
    path = tmp_path / "approvals.sqlite"
    with trio.fail_after(DEADLINE):
        async with running_service(SqliteStore(path), clock=time.time, settings=FAST_POLL) as harness, trio.open_nursery() as nursery:
            results = []

            async def hold():
                results.append(await harness.service.hold(FakeSession(), 1, statement(), review_decision()))

            nursery.start_soon(hold)
            approval_id = await harness.pending_id()
            desk = await other_process_desk(path)
            try:
                await desk.approve(person(ALICE), approval_id, comment="fine")
            finally:
                await desk.store.aclose()
            await until(lambda: results)
    assert results[0].verdict is Verdict.ALLOW
    assert harness.steps(approval_id) == ["requested", "approval", "approved"]


async def test_the_file_is_in_wal_mode_and_keeps_decided_requests(tmp_path):
    path = tmp_path / "approvals.sqlite"
    with trio.fail_after(DEADLINE):
        async with running_service(SqliteStore(path), clock=time.time, settings=FAST_POLL) as harness, trio.open_nursery() as nursery:
            results = []

            async def hold():
                results.append(await harness.service.hold(FakeSession(), 1, statement(), review_decision()))

            nursery.start_soon(hold)
            approval_id = await harness.pending_id()
            await harness.service.desk.deny(person(BOB), approval_id, reason="no")
            await until(lambda: results)
    with sqlite3.connect(path) as conn:
        assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    reopened = SqliteStore(path)
    await reopened.open(None)
    try:
        record = await reopened.get(approval_id)
        assert record.state == "denied" and record.votes[0].reviewer.subject == "bob"
    finally:
        await reopened.aclose()


async def test_concurrent_reviewers_in_different_processes_both_count(tmp_path):
    path = tmp_path / "approvals.sqlite"
    with trio.fail_after(DEADLINE):
        async with running_service(SqliteStore(path), clock=time.time, settings=FAST_POLL) as harness, trio.open_nursery() as nursery:
            results = []

            async def hold():
                results.append(await harness.service.hold(FakeSession(), 1, statement(), review_decision(requirement(min_approvals=2))))

            nursery.start_soon(hold)
            approval_id = await harness.pending_id()
            desks = [await other_process_desk(path), await other_process_desk(path)]
            try:
                async with trio.open_nursery() as reviewers:
                    for desk, reviewer in zip(desks, (ALICE, BOB), strict=True):
                        reviewers.start_soon(desk.approve, person(reviewer), approval_id)
            finally:
                for desk in desks:
                    await desk.store.aclose()
            await until(lambda: results)
    assert results[0].verdict is Verdict.ALLOW
    assert harness.steps(approval_id) == ["requested", "approval", "approval", "approved"]


async def test_a_gateway_stopping_cleanly_cancels_what_it_held_and_the_records_stay(tmp_path):
    path = tmp_path / "approvals.sqlite"
    with trio.fail_after(DEADLINE):
        async with running_service(SqliteStore(path), clock=time.time, settings=FAST_POLL) as harness:
            async with trio.open_nursery() as sessions:
                sessions.start_soon(harness.service.hold, FakeSession(), 1, statement(), review_decision())
                approval_id = await harness.pending_id()
                sessions.cancel_scope.cancel()  # the gateway's shutdown cancels the sessions
    reopened = SqliteStore(path)
    await reopened.open(None)
    try:
        record = await reopened.get(approval_id)
        assert record.state == "cancelled"
    finally:
        await reopened.aclose()


CRASHING_GATEWAY = textwrap.dedent(
    """
    import sys, time, trio
    from bastion.core.approvals_store import SqliteStore
    from tests.approvals_helpers import pending_request

    async def main():
        store = SqliteStore(sys.argv[1])
        await store.open("doomed-gateway")
        record = await store.create(pending_request(holder="doomed-gateway", created_at=time.time()))
        print(record.id, flush=True)
        await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_requests_of_a_killed_gateway_process_are_cancelled_at_the_next_start(tmp_path):
    path = tmp_path / "approvals.sqlite"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, "-c", CRASHING_GATEWAY, str(path)], stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        approval_id = process.stdout.readline().strip()
        assert approval_id.startswith("apr-")

        # while it runs, it is alive: a reviewer may act, a new gateway leaves it alone
        store = SqliteStore(path)
        await store.open(None)
        try:
            assert await store.holder_alive("doomed-gateway")
        finally:
            await store.aclose()
        with trio.fail_after(DEADLINE):
            async with running_service(SqliteStore(path), clock=time.time, settings=FAST_POLL) as early:
                assert (await early.store.get(approval_id)).pending
    finally:
        process.send_signal(signal.SIGKILL)  # no clean-up at all
        process.wait(10)

    with trio.fail_after(DEADLINE):
        async with running_service(SqliteStore(path), clock=time.time, settings=FAST_POLL) as restarted:
            record = await restarted.store.get(approval_id)
            assert record.state == "cancelled" and record.outcome == HOLDER_GONE
            assert restarted.steps(approval_id) == ["requested", "cancelled"]
            # the dead process's lock file is cleared away; the live gateway's is there
            locks = sorted(p.name for p in (tmp_path / "approvals.sqlite.instances").iterdir())
            assert locks == [f"{restarted.service.instance_id}.lock"]
            with pytest.raises(ReviewRefused) as info:
                await restarted.service.desk.approve(person(ALICE), approval_id)
            assert info.value.kind == "conflict"


async def test_a_reviewer_acting_on_a_dead_gateways_request_finds_it_cancelled(tmp_path):
    path = tmp_path / "approvals.sqlite"
    ghost = SqliteStore(path)
    await ghost.open("ghost-gateway")
    record = await ghost.create(pending_request(holder="ghost-gateway", created_at=time.time()))
    ghost._instance_lock.close()  # the lock goes as it would when its process dies
    ghost._instance_lock = None
    desk = await other_process_desk(path)
    try:
        with pytest.raises(ReviewRefused) as info:
            await desk.approve(person(ALICE), record.id)
        assert info.value.kind == "conflict" and "gone" in info.value.message
        assert (await desk.store.get(record.id)).state == "cancelled"
    finally:
        await desk.store.aclose()
        await ghost.aclose()
