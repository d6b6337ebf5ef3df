"""The PostgreSQL approval store: several gateway instances, one database.

A decision taken through one instance wakes the session held by another through LISTEN/NOTIFY
(the PostgreSQL store never polls); each instance's liveness is an advisory lock, so requests of
a gateway process that was killed are cancelled, never approved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import trio

from bastion.core.approvals_model import ReviewRefused
from bastion.core.approvals_store import HOLDER_GONE, PostgresStore
from bastion.policies.model import Verdict
from tests.approvals_helpers import ALICE, BOB, FakeSession, person, requirement, review_decision, running_service, statement
from tests.servers import free_port

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]
DEADLINE = 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def store_for(server, prefix: str) -> PostgresStore:
    return PostgresStore(lambda: server.dsn(), prefix, "test PostgreSQL")


@pytest.fixture
def prefix() -> str:
    """Tables of their own for each test, in the shared test cluster."""
    return f"t{uuid.uuid4().hex[:10]}_approval"


async def until(predicate, step: float = 0.01):
    while not predicate():
        await trio.sleep(step)


async def hold_on(nursery, harness, decision=None) -> tuple[list, str]:
    results: list = []

    async def run():
        results.append(await harness.service.hold(FakeSession(), 1, statement(), decision or review_decision()))

    nursery.start_soon(run)
    return results, await harness.pending_id()


async def test_an_approval_on_one_instance_wakes_the_session_held_on_the_other(postgres_server, prefix):
    with trio.fail_after(DEADLINE):
        async with (
            running_service(store_for(postgres_server, prefix), clock=time.time, instance_id="gw-a") as a,
            running_service(store_for(postgres_server, prefix), clock=time.time, instance_id="gw-b") as b,
            trio.open_nursery() as nursery,
        ):
            results, approval_id = await hold_on(nursery, a)
            assert await b.store.holder_alive("gw-a")
            record = await b.service.desk.approve(person(ALICE), approval_id, comment="from instance b")
            assert record.state == "approved"
            await until(lambda: results)
    assert results[0].verdict is Verdict.ALLOW
    assert a.steps(approval_id) == ["requested", "approval", "approved"]
    assert b.steps(approval_id) == []  # recorded once, by the instance holding the session


async def test_a_denial_on_one_instance_refuses_the_statement_on_the_other(postgres_server, prefix):
    with trio.fail_after(DEADLINE):
        async with (
            running_service(store_for(postgres_server, prefix), clock=time.time, instance_id="gw-a") as a,
            running_service(store_for(postgres_server, prefix), clock=time.time, instance_id="gw-b") as b,
            trio.open_nursery() as nursery,
        ):
            results, approval_id = await hold_on(nursery, a)
            await b.service.desk.deny(person(BOB), approval_id, reason="wrong cluster")
            await until(lambda: results)
    assert results[0].verdict is Verdict.DENY and results[0].reasons[0].endswith("wrong cluster")


async def test_reviewers_on_two_instances_at_once_are_both_counted(postgres_server, prefix):
    with trio.fail_after(DEADLINE):
        async with (
            running_service(store_for(postgres_server, prefix), clock=time.time, instance_id="gw-a") as a,
            running_service(store_for(postgres_server, prefix), clock=time.time, instance_id="gw-b") as b,
            trio.open_nursery() as nursery,
        ):
            results, approval_id = await hold_on(nursery, a, review_decision(requirement(min_approvals=2)))
            async with trio.open_nursery() as reviewers:
                reviewers.start_soon(lambda: a.service.desk.approve(person(ALICE), approval_id))
                reviewers.start_soon(lambda: b.service.desk.approve(person(BOB), approval_id))
            await until(lambda: results)
    assert results[0].verdict is Verdict.ALLOW
    assert a.steps(approval_id) == ["requested", "approval", "approval", "approved"]


async def test_a_window_granted_through_one_instance_is_honoured_by_the_other(postgres_server, prefix):
    decision = review_decision(requirement(max_window=3600))
    with trio.fail_after(DEADLINE):
        async with (
            running_service(store_for(postgres_server, prefix), clock=time.time, instance_id="gw-a") as a,
            running_service(store_for(postgres_server, prefix), clock=time.time, instance_id="gw-b") as b,
            trio.open_nursery() as nursery,
        ):
            results, approval_id = await hold_on(nursery, a, decision)
            await a.service.desk.approve(person(ALICE), approval_id, window_seconds=600)
            await until(lambda: results)
            again = await b.service.hold(FakeSession(), 5, statement(), decision)
    assert again.verdict is Verdict.ALLOW and any(approval_id in r for r in again.reasons)


CRASHING_GATEWAY = textwrap.dedent(
    """
    import sys, time, trio
    from bastion.core.approvals_store import PostgresStore
    from tests.approvals_helpers import pending_request

    async def main():
        store = PostgresStore(lambda: sys.argv[1], sys.argv[2])
        await store.open("doomed-gateway")
        async with trio.open_nursery() as nursery:
            await nursery.start(store.watch, lambda ids: None, lambda: False, 1.0)
            record = await store.create(pending_request(holder="doomed-gateway", created_at=time.time()))
            print(record.id, flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_requests_of_a_killed_gateway_are_cancelled_not_approved(postgres_server, prefix):
    process = subprocess.Popen([sys.executable, "-c", CRASHING_GATEWAY, postgres_server.dsn(), prefix], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        approval_id = await trio.to_thread.run_sync(process.stdout.readline)
        approval_id = approval_id.strip()
        assert approval_id.startswith("apr-")
        with trio.fail_after(DEADLINE):
            async with running_service(store_for(postgres_server, prefix), clock=time.time, instance_id="gw-b") as b:
                assert await b.store.holder_alive("doomed-gateway")
                assert (await b.store.get(approval_id)).pending  # the start-up sweep left it alone
                process.send_signal(signal.SIGKILL)
                await trio.to_thread.run_sync(process.wait)
                # the server drops the dead process's connection, and with it its advisory lock
                while await b.store.holder_alive("doomed-gateway"):
                    await trio.sleep(0.05)
                with pytest.raises(ReviewRefused) as info:
                    await b.service.desk.approve(person(ALICE), approval_id)
                assert info.value.kind == "conflict" and "gone" in info.value.message
                record = await b.store.get(approval_id)
                assert record.state == "cancelled" and record.outcome == HOLDER_GONE
                await b.service.sweep()
                assert b.steps(approval_id) == ["requested", "cancelled"]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


async def test_a_gateway_whose_store_is_down_serves_but_refuses_what_needs_a_reviewer(prefix):
    unreachable = PostgresStore(lambda: f"host=127.0.0.1 port={free_port()} user=nobody dbname=nothing connect_timeout=2", prefix, "unreachable PostgreSQL")
    with trio.fail_after(DEADLINE):
        recorded = []

        async def record(event):
            recorded.append(event)

        from bastion.core.approvals import ApprovalService
        from tests.approvals_helpers import section

        service = ApprovalService(section(), unreachable, record=record, providers=lambda: [], clock=time.time)
        async with trio.open_nursery() as nursery:
            await service.open()  # logs, does not raise: the gateway starts
            await nursery.start(service.run)
            decision = await service.hold(FakeSession(), 1, statement(), review_decision())
            assert decision.verdict is Verdict.DENY and "approval store is unavailable" in decision.reasons[0]
            nursery.cancel_scope.cancel()
    assert recorded == []
