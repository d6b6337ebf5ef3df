"""Approval webhooks against a local HTTP server: signed, retried with backoff, never in the way."""

from __future__ import annotations

import json
import time

import pytest
import trio

from bastion.core.approvals_webhook import SIGNATURE_HEADER, backoff, verify
from bastion.core.config import ApprovalWebhook, Duration
from bastion.core.http import HTTPResponse, serve_http
from bastion.core.secrets import Secret, SecretRef
from bastion.policies.model import Verdict
from tests.approvals_helpers import ALICE, BOB, FakeSession, person, review_decision, running_service, section, statement

pytestmark = pytest.mark.timeout(60)
DEADLINE = 30
SECRET = "webhook-shared-secret"


def resolve(reference: SecretRef) -> Secret:
    assert reference == SecretRef("env", "APPROVALS_WEBHOOK_SECRET")
    return Secret(SECRET)


def hook(port: int, **overrides) -> ApprovalWebhook:
    values = {
        "url": f"http://127.0.0.1:{port}/hooks/approvals",
        "secret": SecretRef("env", "APPROVALS_WEBHOOK_SECRET"),
        "retry_initial": Duration(0.01),
        "retry_max": Duration(0.05),
        "max_attempts": 5,
    }
    values.update(overrides)
    return ApprovalWebhook(**values)


class Receiver:
    """A local HTTP server answering from a script of statuses (then 200), keeping every request."""

    def __init__(self, statuses=(), *, hang: bool = False) -> None:
        self.statuses = list(statuses)
        self.hang = hang
        self.requests = []
        self.port = 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]

        async def handle(request):
            self.requests.append(request)
            if self.hang:
                await trio.sleep_forever()
            status = self.statuses.pop(0) if self.statuses else 200
            return HTTPResponse.json(status, {"status": status})

        async def serve(stream):
            async with stream:
                await serve_http(stream, handle, "test")

        task_status.started(self)
        await trio.serve_listeners(serve, listeners)

    def deliveries(self):
        return [json.loads(r.body) for r in self.requests]


async def hold_and(harness, nursery, decide):
    results = []

    async def run():
        results.append(await harness.service.hold(FakeSession(), 1, statement(), review_decision()))

    nursery.start_soon(run)
    approval_id = await harness.pending_id()
    await decide(approval_id)
    while not results:
        await trio.sleep(0.01)
    return approval_id, results[0]


async def until(predicate):
    while not predicate():
        await trio.sleep(0.01)


async def test_deliveries_are_signed_and_retried_until_the_receiver_takes_them(tmp_path):
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as servers:
            receiver = await servers.start(Receiver([503, 502]).run)
            settings = section(webhooks=(hook(receiver.port),))
            async with running_service(clock=time.time, settings=settings, resolve_secret=resolve) as harness, trio.open_nursery() as nursery:
                approval_id, decision = await hold_and(harness, nursery, lambda i: harness.service.desk.approve(person(ALICE), i, comment="ok"))
                assert decision.verdict is Verdict.ALLOW
                await until(lambda: [d["event"] for d in receiver.deliveries()].count("approved") == 1)
            servers.cancel_scope.cancel()
    deliveries = receiver.deliveries()
    # "requested" failed twice (503, 502) and went through on the third attempt, unchanged
    assert [d["event"] for d in deliveries] == ["requested", "requested", "requested", "approved"]
    assert len({r.body for r in receiver.requests[:3]}) == 1 and deliveries[0]["delivery"] == deliveries[2]["delivery"]
    for request in receiver.requests:
        assert request.method == "POST" and request.path == "/hooks/approvals"
        assert request.headers["content-type"] == "application/json"
        assert verify(SECRET, request.body, request.headers[SIGNATURE_HEADER])
        assert not verify("another secret", request.body, request.headers[SIGNATURE_HEADER])
        assert request.headers["x-bastion-event"] == json.loads(request.body)["event"]
    requested, approved = deliveries[0], deliveries[3]
    assert requested["approval"]["id"] == approval_id and requested["approval"]["state"] == "pending"
    assert requested["approval"]["statement"] == "delete from public.patients"
    assert requested["step"]["actor"] == "ci-bot (keys)" and requested["step"]["comment"] == "ticket OPS-42"
    assert approved["approval"]["state"] == "approved" and approved["step"]["actor"] == "alice"


async def test_a_receiver_that_refuses_is_not_retried_and_events_are_filtered(tmp_path):
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as servers:
            refusing = await servers.start(Receiver([400]).run)
            denials_only = await servers.start(Receiver().run)
            settings = section(webhooks=(hook(refusing.port), hook(denials_only.port, events=("denied",))))
            async with running_service(clock=time.time, settings=settings, resolve_secret=resolve) as harness, trio.open_nursery() as nursery:
                await hold_and(harness, nursery, lambda i: harness.service.desk.deny(person(BOB), i, reason="no"))
                await until(lambda: denials_only.deliveries() and len(refusing.deliveries()) >= 2)
            servers.cancel_scope.cancel()
    # the 400 for "requested" was final: no second attempt of it; "denied" went through
    assert [d["event"] for d in refusing.deliveries()] == ["requested", "denied"]
    assert [d["event"] for d in denials_only.deliveries()] == ["denied"]
    assert denials_only.deliveries()[0]["step"]["comment"] == "no"


async def test_a_receiver_that_never_answers_does_not_hold_the_session_back(tmp_path):
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as servers:
            stuck = await servers.start(Receiver(hang=True).run)
            settings = section(webhooks=(hook(stuck.port, timeout=Duration(600)),))
            async with running_service(clock=time.time, settings=settings, resolve_secret=resolve) as harness, trio.open_nursery() as nursery:
                _, decision = await hold_and(harness, nursery, lambda i: harness.service.desk.approve(person(ALICE), i))
                assert decision.verdict is Verdict.ALLOW
                # the first delivery is still waiting for its answer; the next waits behind it
                await until(lambda: stuck.requests)
                assert len(stuck.requests) == 1
            servers.cancel_scope.cancel()


async def test_backoff_doubles_up_to_its_ceiling():
    webhook = hook(1, retry_initial=Duration(1), retry_max=Duration(10))
    assert [backoff(webhook, n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
