"""The approval service on its own: holding, reviewing, windows, expiry, cancellation, recovery.

Most tests use the memory store and trio's MockClock (``autojump_clock``): timeouts of minutes
pass in virtual time, and the wall clock the service stores is derived from trio's clock.
"""

from __future__ import annotations

import pytest
import trio

from bastion.core import events
from bastion.core.approvals_model import ReviewRefused
from bastion.core.approvals_store import HOLDER_GONE, MemoryBackend, MemoryStore
from bastion.core.session import Judgement
from bastion.policies.model import Decision, Verdict
from tests.approvals_helpers import (
    ALICE,
    BOB,
    CAROL,
    CI_BOT,
    MALLORY,
    ROOT,
    FakeSession,
    pending_request,
    person,
    requirement,
    review_decision,
    running_service,
    section,
    statement,
    wall,
)

pytestmark = pytest.mark.timeout(60)


async def hold_in_background(nursery: trio.Nursery, harness, session=None, decision=None, requests=None, results=None):
    """Start ``service.hold`` in a task; its decision lands in ``results`` (a list)."""
    session = session or FakeSession()
    results = results if results is not None else []

    async def hold():
        results.append(await harness.service.hold(session, 1, requests or statement(), decision or review_decision()))

    nursery.start_soon(hold)
    return session, results


async def until(predicate, step: float = 0.01):
    while not predicate():
        await trio.sleep(step)


# --- holding and deciding --------------------------------------------------------------------------


async def test_an_approved_statement_is_allowed_and_the_reasons_name_the_approver(autojump_clock):
    with trio.fail_after(3600):
        async with running_service() as harness, trio.open_nursery() as nursery:
            session, results = await hold_in_background(nursery, harness)
            approval_id = await harness.pending_id()
            await until(lambda: session.notices)
            notice = session.notices[0]
            assert approval_id in notice
            assert f"bastion approvals approve {approval_id} -c /etc/bastion/bastion.toml" in notice
            assert f"POST http://127.0.0.1:8700/approvals/{approval_id}/approve" in notice
            assert "privacy" in notice and "security-admins" in notice and "15m" in notice

            record = await harness.service.desk.approve(person(ALICE), approval_id, comment="checked with the ward")
            assert record.state == "approved"
            await until(lambda: results)
        (decision,) = results
        assert decision.verdict is Verdict.ALLOW
        assert any(f"approved by alice (approval {approval_id})" in r for r in decision.reasons)
        assert harness.steps(approval_id) == ["requested", "approval", "approved"]
        approval_event = next(e for e in harness.events if isinstance(e, events.ApprovalEvent) and e.step == "approval")
        assert approval_event.actor == "alice (keys)" and approval_event.comment == "checked with the ward"
        assert approval_event.session_id == session.id and approval_event.rule == "hipaa:review:bulk-delete"


async def test_the_request_carries_the_evidence_a_reviewer_needs(autojump_clock):
    async with running_service() as harness, trio.open_nursery() as nursery:
        session, _ = await hold_in_background(nursery, harness)
        approval_id = await harness.pending_id()
        record = await harness.service.desk.show(person(ALICE), approval_id)
        view = harness.service.desk.view(record)
        assert view["requester"] == {"provider": "keys", "subject": "ci-bot", "groups": ["etl"]}
        assert view["target"] == "clinic" and view["session_id"] == session.id and view["request_no"] == 1
        assert view["statement"] == "delete from public.patients"
        assert view["findings"] == [{"name": "no-where", "weight": 40, "sentence": "it deletes every row: there is no WHERE clause"}]
        assert view["rules"] == ["hipaa:review:bulk-delete"]
        assert view["approver_groups"] == ["privacy"] and view["min_approvals"] == 1
        assert view["justification"] == "ticket OPS-42"
        assert view["expires_at"] - view["created_at"] == pytest.approx(900)
        nursery.cancel_scope.cancel()


async def test_a_denied_statement_is_refused_with_the_reviewers_reason(autojump_clock):
    async with running_service() as harness, trio.open_nursery() as nursery:
        _, results = await hold_in_background(nursery, harness)
        approval_id = await harness.pending_id()
        await harness.service.desk.deny(person(BOB), approval_id, reason="no change ticket for this")
        await until(lambda: results)
    (decision,) = results
    assert decision.verdict is Verdict.DENY
    assert decision.reasons == (f"denied by bob (approval {approval_id}): no change ticket for this",)
    assert decision.rules == ("hipaa:review:bulk-delete",)
    assert harness.steps(approval_id) == ["requested", "denied"]


async def test_a_denial_needs_a_reason(autojump_clock):
    async with running_service() as harness, trio.open_nursery() as nursery:
        await hold_in_background(nursery, harness)
        approval_id = await harness.pending_id()
        with pytest.raises(ReviewRefused) as info:
            await harness.service.desk.deny(person(BOB), approval_id, reason="  ")
        assert info.value.kind == "invalid"
        nursery.cancel_scope.cancel()


async def test_without_a_decision_the_request_expires_and_the_statement_is_refused(autojump_clock):
    async with running_service() as harness, trio.open_nursery() as nursery:
        started = trio.current_time()
        _, results = await hold_in_background(nursery, harness, decision=review_decision(requirement(timeout=600)))
        approval_id = await harness.pending_id()
        await until(lambda: results, step=30)
    (decision,) = results
    assert trio.current_time() - started >= 600  # virtual time: the whole timeout passed
    assert decision.verdict is Verdict.DENY
    assert decision.reasons == (f"not approved in time (approval {approval_id}): no decision within 10m",)
    assert harness.steps(approval_id) == ["requested", "expired"]
    with pytest.raises(ReviewRefused) as info:
        await harness.service.desk.approve(person(ALICE), approval_id)
    assert info.value.kind == "conflict"


async def test_the_shortest_timeout_of_the_rules_that_held_it_applies(autojump_clock):
    async with running_service() as harness, trio.open_nursery() as nursery:
        decision = review_decision(requirement("a", timeout=3600), requirement("b", ("dba",), timeout=120))
        await hold_in_background(nursery, harness, decision=decision)
        approval_id = await harness.pending_id()
        record = await harness.store.get(approval_id)
        assert record.request.expires_at - record.request.created_at == pytest.approx(120)
        nursery.cancel_scope.cancel()


async def test_reminders_tell_the_waiting_caller_what_is_missing(autojump_clock):
    async with running_service(settings=section(reminder_interval=60)) as harness, trio.open_nursery() as nursery:
        session, _ = await hold_in_background(nursery, harness, decision=review_decision(requirement(min_approvals=2)))
        approval_id = await harness.pending_id()
        await until(lambda: len(session.notices) >= 3, step=10)
        assert session.notices[1].startswith(f"Still waiting for approval request {approval_id}: hipaa:review:bulk-delete needs 2 more approvals")
        nursery.cancel_scope.cancel()


async def test_a_decision_whose_wake_up_was_lost_is_found_at_the_next_reminder(autojump_clock):
    from bastion.core.approvals import ReviewDesk

    backend = MemoryBackend()
    async with running_service(MemoryStore(backend), settings=section(reminder_interval=60)) as harness, trio.open_nursery() as nursery:
        _, results = await hold_in_background(nursery, harness)
        approval_id = await harness.pending_id()
        watchers = list(backend.watchers)
        backend.watchers.clear()  # as if a notification never arrived
        await ReviewDesk(MemoryStore(backend)).approve(person(ALICE), approval_id)
        backend.watchers.extend(watchers)
        await trio.sleep(1)
        assert results == []
        await until(lambda: results, step=10)
    assert results[0].verdict is Verdict.ALLOW


# --- who may approve -------------------------------------------------------------------------------


async def test_the_requester_cannot_approve_their_own_request_even_as_an_admin(autojump_clock):
    requester = ROOT  # in the approver group and an admin
    async with running_service() as harness, trio.open_nursery() as nursery:
        session = FakeSession(identity=requester)
        decision = review_decision(requirement(groups=("privacy", "security-admins")))
        await hold_in_background(nursery, harness, session=session, decision=decision)
        approval_id = await harness.pending_id()
        with pytest.raises(ReviewRefused) as info:
            await harness.service.desk.approve(person(requester), approval_id)
        assert info.value.kind == "forbidden" and "asked for" in info.value.message
        assert (await harness.store.get(approval_id)).pending
        nursery.cancel_scope.cancel()


async def test_only_the_rules_approver_groups_and_admins_may_review(autojump_clock):
    async with running_service() as harness, trio.open_nursery() as nursery:
        _, results = await hold_in_background(nursery, harness)
        approval_id = await harness.pending_id()
        for outsider in (MALLORY, CAROL):
            with pytest.raises(ReviewRefused) as info:
                await harness.service.desk.approve(person(outsider), approval_id)
            assert info.value.kind == "forbidden"
            with pytest.raises(ReviewRefused):
                await harness.service.desk.show(person(outsider), approval_id)
            assert await harness.service.desk.list(person(outsider)) == []
        # the requester sees their own request, and an admin may approve any
        assert [r.id for r in await harness.service.desk.list(person(CI_BOT))] == [approval_id]
        await harness.service.desk.approve(person(ROOT), approval_id)
        await until(lambda: results)
    assert results[0].verdict is Verdict.ALLOW


async def test_two_approvals_need_two_distinct_reviewers(autojump_clock):
    async with running_service() as harness, trio.open_nursery() as nursery:
        _, results = await hold_in_background(nursery, harness, decision=review_decision(requirement(min_approvals=2)))
        approval_id = await harness.pending_id()
        first = await harness.service.desk.approve(person(ALICE), approval_id)
        assert first.state == "pending"
        with pytest.raises(ReviewRefused) as info:
            await harness.service.desk.approve(person(ALICE), approval_id)
        assert info.value.kind == "conflict" and "already reviewed" in info.value.message
        await trio.sleep(60)
        assert results == []  # still held after one approval
        await harness.service.desk.approve(person(BOB), approval_id, comment="second pair of eyes")
        await until(lambda: results)
    assert results[0].verdict is Verdict.ALLOW
    assert any("approved by alice, bob" in r for r in results[0].reasons)
    assert harness.steps(approval_id) == ["requested", "approval", "approval", "approved"]


async def test_every_rule_that_asked_must_be_satisfied(autojump_clock):
    async with running_service() as harness, trio.open_nursery() as nursery:
        decision = review_decision(requirement("privacy-rule", ("privacy",)), requirement("dba-rule", ("dba",)))
        _, results = await hold_in_background(nursery, harness, decision=decision)
        approval_id = await harness.pending_id()
        record = await harness.service.desk.approve(person(ALICE), approval_id)
        assert record.state == "pending"
        assert harness.service.desk.view(record)["missing_approvals"] == {"dba-rule": 1}
        await harness.service.desk.approve(person(CAROL), approval_id)
        await until(lambda: results)
    assert results[0].verdict is Verdict.ALLOW


async def test_a_review_nobody_may_approve_is_refused_at_once(autojump_clock):
    async with running_service(settings=section(admin_groups=())) as harness:
        decision = Decision(Verdict.REVIEW, ("plugin:odd",), ("a plugin wants a human",), "v1", ())
        result = await harness.service.hold(FakeSession(), 1, statement(), decision)
    assert result.verdict is Verdict.DENY and "no group may approve" in result.reasons[0]
    assert harness.steps() == []


async def test_unknown_requests_are_not_found(autojump_clock):
    async with running_service() as harness:
        with pytest.raises(ReviewRefused) as info:
            await harness.service.desk.approve(person(ALICE), "apr-000000000000")
        assert info.value.kind == "not-found"


# --- windows ---------------------------------------------------------------------------------------


async def test_a_window_lets_the_same_statement_through_until_it_closes(autojump_clock):
    decision = review_decision(requirement(max_window=3600))
    async with running_service() as harness, trio.open_nursery() as nursery:
        _, results = await hold_in_background(nursery, harness, decision=decision)
        approval_id = await harness.pending_id()
        await harness.service.desk.approve(person(ALICE), approval_id, window_seconds=1800)
        await until(lambda: results)
        assert any("and for the same statement until" in r for r in results[0].reasons)

        # the same statement shape, ten minutes later: no new request
        await trio.sleep(600)
        again = await harness.service.hold(FakeSession(), 7, statement("delete from public.patients"), decision)
        assert again.verdict is Verdict.ALLOW
        assert any(approval_id in r for r in again.reasons)
        window_events = [e for e in harness.events if isinstance(e, events.ApprovalEvent) and e.step == "window"]
        assert window_events[0].approval_id == approval_id and window_events[0].request_no == 7

        # another identity, another statement shape, or another target: not covered
        _, other = await hold_in_background(nursery, harness, session=FakeSession(identity=MALLORY), decision=decision)
        other_id = await harness.pending_id()
        assert other_id != approval_id
        await harness.service.desk.deny(person(BOB), other_id, reason="not yours")
        _, shape = await hold_in_background(nursery, harness, decision=decision, requests=statement("delete from public.visits", "fp-other"))
        await harness.service.desk.deny(person(BOB), await harness.pending_id(), reason="different statement")
        _, elsewhere = await hold_in_background(nursery, harness, session=FakeSession(target="billing"), decision=decision)
        await harness.service.desk.deny(person(BOB), await harness.pending_id(), reason="different target")
        await until(lambda: other and shape and elsewhere)

        # past the window: held again
        await trio.sleep(1200 + 1)
        await hold_in_background(nursery, harness, decision=decision)
        late_id = await harness.pending_id()
        assert late_id != approval_id
        nursery.cancel_scope.cancel()


async def test_a_window_is_at_most_the_rules_max_window_and_needs_a_fingerprint(autojump_clock):
    async with running_service() as harness, trio.open_nursery() as nursery:
        await hold_in_background(nursery, harness, decision=review_decision(requirement(max_window=1800)))
        approval_id = await harness.pending_id()
        with pytest.raises(ReviewRefused) as info:
            await harness.service.desk.approve(person(ALICE), approval_id, window_seconds=3600)
        assert info.value.kind == "invalid" and "at most 30m" in info.value.message
        await harness.service.desk.deny(person(ALICE), approval_id, reason="start over")

        await hold_in_background(nursery, harness, decision=review_decision(requirement(max_window=0)))
        once_only = await harness.pending_id()
        with pytest.raises(ReviewRefused) as info:
            await harness.service.desk.approve(person(ALICE), once_only, window_seconds=60)
        assert "once only" in info.value.message
        await harness.service.desk.deny(person(ALICE), once_only, reason="start over")

        await hold_in_background(nursery, harness, decision=review_decision(requirement(max_window=1800)), requests=statement(fingerprint=""))
        no_fingerprint = await harness.pending_id()
        with pytest.raises(ReviewRefused) as info:
            await harness.service.desk.approve(person(ALICE), no_fingerprint, window_seconds=60)
        assert "no fingerprint" in info.value.message
        nursery.cancel_scope.cancel()


async def test_with_two_approvers_the_window_is_the_shortest_asked_and_none_if_one_says_once(autojump_clock):
    decision = review_decision(requirement(min_approvals=2, max_window=7200))
    async with running_service() as harness, trio.open_nursery() as nursery:
        _, results = await hold_in_background(nursery, harness, decision=decision)
        approval_id = await harness.pending_id()
        await harness.service.desk.approve(person(ALICE), approval_id, window_seconds=3600)
        record = await harness.service.desk.approve(person(BOB), approval_id, window_seconds=600)
        assert record.window_until == pytest.approx(record.decided_at + 600)
        await until(lambda: results)

        _, results = await hold_in_background(nursery, harness, decision=decision, requests=statement("truncate public.visits", "fp-truncate"))
        approval_id = await harness.pending_id()
        await harness.service.desk.approve(person(ALICE), approval_id, window_seconds=3600)
        record = await harness.service.desk.approve(person(BOB), approval_id)
        assert record.state == "approved" and record.window_until is None
        nursery.cancel_scope.cancel()


# --- sessions that go away -------------------------------------------------------------------------


async def test_a_session_that_ends_while_waiting_cancels_its_request_for_good(autojump_clock):
    async with running_service() as harness:
        async with trio.open_nursery() as nursery:
            _, results = await hold_in_background(nursery, harness)
            approval_id = await harness.pending_id()
            nursery.cancel_scope.cancel()  # what the gateway does to a session that is ending
        assert results == []
        record = await harness.store.get(approval_id)
        assert record.state == "cancelled" and "session ended" in record.outcome
        with pytest.raises(ReviewRefused) as info:
            await harness.service.desk.approve(person(ALICE), approval_id)
        assert info.value.kind == "conflict"
        assert harness.steps(approval_id) == ["requested", "cancelled"]


async def test_a_caller_that_hung_up_is_found_by_the_reminder_and_its_request_cancelled(autojump_clock):
    async with running_service(settings=section(reminder_interval=30)) as harness, trio.open_nursery() as nursery:
        session, results = await hold_in_background(nursery, harness)
        approval_id = await harness.pending_id()
        await until(lambda: session.notices)
        session.broken = True
        await until(lambda: results, step=5)
    assert results[0].verdict is Verdict.DENY and "connection closed" in results[0].reasons[0]
    assert (await harness.store.get(approval_id)).state == "cancelled"


async def test_a_restarted_gateway_cancels_the_requests_of_sessions_that_died_with_the_old_one(autojump_clock):
    backend = MemoryBackend()
    old = MemoryStore(backend)
    await old.open("old-gateway")
    record = await old.create(pending_request(holder="old-gateway", created_at=wall()))
    backend.alive.discard("old-gateway")  # a crash: nothing was cancelled, the liveness lock is free

    async with running_service(MemoryStore(backend), instance_id="new-gateway") as new:
        swept = await new.store.get(record.id)
        assert swept.state == "cancelled" and swept.outcome == HOLDER_GONE
        # both steps are recorded by the gateway that swept (the old one never recorded them)
        assert new.steps(record.id) == ["requested", "cancelled"]
        with pytest.raises(ReviewRefused):
            await new.service.desk.approve(person(ALICE), record.id)


async def test_a_restart_leaves_requests_of_live_gateways_alone(autojump_clock):
    backend = MemoryBackend()
    other = MemoryStore(backend)
    await other.open("other-live-gateway")
    record = await other.create(pending_request(holder="other-live-gateway", created_at=wall()))
    async with running_service(MemoryStore(backend), instance_id="new-gateway") as new:
        assert (await new.store.get(record.id)).pending
        assert new.steps() == []


async def test_approving_a_request_whose_gateway_died_cancels_it_instead(autojump_clock):
    backend = MemoryBackend()
    async with running_service(MemoryStore(backend), instance_id="gw-a") as a, running_service(MemoryStore(backend), instance_id="gw-b") as b:
        async with trio.open_nursery() as nursery:
            await hold_in_background(nursery, a)
            approval_id = await a.pending_id()
            backend.alive.discard("gw-a")  # gw-a "crashes"
            with pytest.raises(ReviewRefused) as info:
                await b.service.desk.approve(person(ALICE), approval_id)
            assert info.value.kind == "conflict" and "gone" in info.value.message
            assert (await b.store.get(approval_id)).state == "cancelled"
            nursery.cancel_scope.cancel()


# --- several gateways, one store -------------------------------------------------------------------


async def test_a_decision_taken_on_one_instance_wakes_the_session_held_on_another(autojump_clock):
    backend = MemoryBackend()
    async with running_service(MemoryStore(backend), instance_id="gw-a") as a, running_service(MemoryStore(backend), instance_id="gw-b") as b:
        async with trio.open_nursery() as nursery:
            _, results = await hold_in_background(nursery, a)
            approval_id = await a.pending_id()
            await b.service.desk.approve(person(ALICE), approval_id)
            await until(lambda: results)
    assert results[0].verdict is Verdict.ALLOW
    # the holder records every step, wherever the decision was taken
    assert a.steps(approval_id) == ["requested", "approval", "approved"]
    assert b.steps(approval_id) == []


# --- results paused at their row threshold --------------------------------------------------------


async def test_a_result_paused_at_its_threshold_continues_once_approved(autojump_clock):
    rows_rule = requirement("hipaa:review:bulk-read", rows_over=1000)
    decision = Decision(Verdict.ALLOW, (rows_rule.rule,), ("rows past 1000 need a reviewer's approval",), "v1", (rows_rule,))
    requests = statement("select * from public.patients", "fp-select")
    judgement = Judgement(3, tuple(requests), decision, rows_rule)
    async with running_service() as harness, trio.open_nursery() as nursery:
        results = []

        async def pause():
            results.append(await harness.service.hold_rows(FakeSession(), judgement, 1000))

        nursery.start_soon(pause)
        approval_id = await harness.pending_id()
        record = await harness.store.get(approval_id)
        assert record.request.kind == "rows" and record.request.rows_sent == 1000
        assert record.request.statement == "result of select * from public.patients passed 1000 rows"
        assert record.request.request_no == 3
        await harness.service.desk.approve(person(ALICE), approval_id)
        await until(lambda: results)
    assert results[0].verdict is Verdict.ALLOW


async def test_the_reviewers_wall_clock_decides_expiry_consistently(autojump_clock):
    # the stored times are wall-clock seconds derived from trio's clock in these tests
    async with running_service() as harness, trio.open_nursery() as nursery:
        await hold_in_background(nursery, harness)
        approval_id = await harness.pending_id()
        record = await harness.store.get(approval_id)
        assert record.request.created_at == pytest.approx(wall(), abs=1)
        nursery.cancel_scope.cancel()
