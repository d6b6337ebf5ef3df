"""Just-in-time approval: a risky statement waits for a human, per statement, with the evidence.

When the combined decision on a statement is *review*, :meth:`Session.check
<bastion.core.session.Session.check>` asks :meth:`ApprovalService.hold`, which

1. allows it at once when an earlier approval granted a still-open *window* for this identity,
   target and statement fingerprint under the same rules (the reasons name that approval);
2. otherwise stores an approval request — who asks, on which target, the statement (literals
   masked), the findings, the rules that held it, who may approve and how many must, the caller's
   justification, when it expires — records ``ApprovalEvent(step="requested")`` and tells the
   caller (``session.notify``) the request id and how to approve it (command and HTTP endpoint);
3. waits until reviewers approve it (allow: the reasons name the approvers), one denies it (deny
   with the reviewer's reason), or it expires (deny). The session's other traffic waits too.

If the session ends while waiting (the caller hung up, the gateway stops, the credential
expires), the request is cancelled; it can never be approved for a session that is gone. After a
crash, requests whose gateway died are cancelled by the next gateway to start (see
:mod:`bastion.core.approvals_store` for how liveness is known).

:meth:`ApprovalService.hold_rows` does the same for a result paused at its row threshold: the
request reads "result of <statement> passed N rows".

Reviewers authenticate with the gateway's identity providers (a bearer token) and act through
``bastion approvals list|show|approve|deny`` (which works on the store directly, so it works while
the gateway runs in another process or on another host) or the admin listener's HTTP API
(``GET /approvals``, ``GET /approvals/{id}``, ``POST /approvals/{id}/approve|deny``; described in
docs/approvals-openapi.json). The rules of who may approve what are in
:mod:`bastion.core.approvals_model`. Every step is an :class:`~bastion.core.events.ApprovalEvent`
in the audit trail of the gateway that holds the session, and optionally a signed webhook
(:mod:`bastion.core.approvals_webhook`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import attrs
import trio

from bastion.core import approvals_model as model
from bastion.core import events
from bastion.core.approvals_model import ApprovalRecord, ApprovalRequest, Person, ReviewRefused
from bastion.core.approvals_store import HOLDER_GONE, MAX_LIST, ApprovalStore, StoreUnavailable, build_store
from bastion.core.approvals_webhook import WebhookNotifier
from bastion.core.config import ApprovalsSection, Duration
from bastion.core.errors import GatewayError
from bastion.core.http import HTTPRequest, HTTPResponse
from bastion.policies.model import AuthStatus, Credential, Decision, Identity, Request, ReviewRequirement, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from bastion.core.admin import AdminApp
    from bastion.core.session import Judgement, Session

log = logging.getLogger("bastion.approvals")

# how long cancelling a request may take once the waiting session is being torn down
CLEANUP_DEADLINE = 5.0
# how often every gateway looks for requests whose gateway died, and steps nobody recorded
SWEEP_INTERVAL = 60.0
# PostgreSQL may be down when the gateway starts: try again this often (statements that need a
# reviewer are denied meanwhile, everything else is served)
STORE_RETRY_INITIAL = 1.0
STORE_RETRY_MAX = 60.0
# the HTTP API lists at most this many requests unless asked for fewer
DEFAULT_LIST_LIMIT = 100
ID_PREFIX = "apr-"
ID_BYTES = 6  # 12 hex digits: short enough to type, and ids are checked for nothing but equality

DEFAULT_NOTICE = (
    "Bastion is holding this statement until a reviewer approves it: approval request {id} "
    "(rules: {rules}; approvers: {approvers}; expires {expires}, in {timeout}). "
    "To approve: {cli}  or  {http}"
)

# what the held caller is told when its statement is still waiting, every reminder_interval
REMINDER = "Still waiting for approval request {id}: {missing}; it expires in {remaining}."

# errors that mean the caller's connection is gone when we try to tell it something
_CALLER_GONE_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError, BrokenPipeError)


def new_approval_id() -> str:
    return ID_PREFIX + secrets.token_hex(ID_BYTES)


def new_instance_id() -> str:
    """Unique per gateway process run: a restarted gateway is a new instance."""
    host = socket.gethostname().split(".")[0][:24] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class _CallerGone(Exception):
    pass


@attrs.define
class _Waiter:
    version: int
    event: trio.Event = attrs.field(factory=trio.Event)


# --- authentication of reviewers ------------------------------------------------------------------


async def authenticate_token(providers: Sequence[tuple[str, Any]], token: str | None, *, clock: Callable[[], float] = time.time) -> Identity | None:
    """The identity a bearer token stands for, asking the providers in order as sessions do.

    None when no provider verifies it (unknown everywhere, rejected, expired, or a provider
    failed — a reviewer is never let in on a provider's error).
    """
    if not token:
        return None
    credential = Credential(secret=token)
    for name, provider in providers:
        try:
            outcome = await provider.authenticate(credential)
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("identity provider %s failed while authenticating a reviewer", name)
            return None
        if outcome.status is AuthStatus.UNKNOWN:
            continue
        if outcome.status is not AuthStatus.OK or outcome.identity is None:
            return None
        identity = outcome.identity
        if identity.expires_at is not None and identity.expires_at.timestamp() <= clock():
            return None
        return identity
    return None


# --- what reviewers can do (shared by the HTTP API and the command line) ---------------------------


class ReviewDesk:
    """List, show, approve and deny, with the rules of :mod:`bastion.core.approvals_model`.

    ``on_change(approval_id)`` is called after a change this process made (the service uses it to
    wake its own waiting session at once, without waiting for the store's notification).
    """

    def __init__(
        self,
        store: ApprovalStore,
        *,
        admin_groups: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.admin_groups = frozenset(admin_groups)
        self.clock = clock
        self.on_change = on_change

    async def list(self, reviewer: Person, states: Iterable[str] | None = (model.PENDING,), limit: int = DEFAULT_LIST_LIMIT) -> list[ApprovalRecord]:
        """The requests ``reviewer`` may see (those they may review, and their own), newest first."""
        # reviewers see only part of the store: read more than asked, then filter
        records = await self.store.list(states, limit=min(MAX_LIST, max(limit * 4, DEFAULT_LIST_LIMIT)))
        visible = [r for r in records if model.may_see(reviewer, r.request, self.admin_groups)]
        return visible[:limit]

    async def show(self, reviewer: Person, approval_id: str) -> ApprovalRecord:
        record = await self.store.get(approval_id)
        if record is None:
            raise ReviewRefused("not-found", f"there is no approval request {approval_id}")
        if not model.may_see(reviewer, record.request, self.admin_groups):
            raise ReviewRefused("forbidden", f"{reviewer.subject} may not see approval request {approval_id}")
        return record

    async def approve(self, reviewer: Person, approval_id: str, *, comment: str = "", window_seconds: float = 0.0) -> ApprovalRecord:
        now = self.clock()
        record = await self.store.change(
            approval_id,
            lambda current: model.approve(current, reviewer, now, comment=comment, window_seconds=window_seconds, admin_groups=self.admin_groups),
            now=now,
            live_holder_required=True,
        )
        self._changed(approval_id)
        return record

    async def deny(self, reviewer: Person, approval_id: str, *, reason: str) -> ApprovalRecord:
        now = self.clock()
        record = await self.store.change(
            approval_id,
            lambda current: model.deny(current, reviewer, now, reason=reason, admin_groups=self.admin_groups),
            now=now,
            live_holder_required=True,
        )
        self._changed(approval_id)
        return record

    def _changed(self, approval_id: str) -> None:
        if self.on_change is not None:
            self.on_change(approval_id)

    def view(self, record: ApprovalRecord) -> dict[str, Any]:
        return model.record_view(record, self.admin_groups)


# --- the service ------------------------------------------------------------------------------------


class ApprovalService:
    """Holds statements for reviewers; one per gateway process (see the module documentation).

    ``record(event)`` writes to the audit trail; ``providers()`` returns the identity providers
    (the gateway's, at the time of the call); ``clock()`` is wall-clock seconds (stored times are
    shared between processes); waits use trio's clock, so tests can use a MockClock with a clock
    derived from it.
    """

    def __init__(
        self,
        section: ApprovalsSection,
        store: ApprovalStore,
        *,
        record: Callable[[events.AuditEvent], Awaitable[None]],
        providers: Callable[[], Sequence[tuple[str, Any]]],
        resolve_secret: Callable[[Any], Any] | None = None,
        clock: Callable[[], float] = time.time,
        instance_id: str | None = None,
        config_path: Any = None,
        admin_url: str | None = None,
    ) -> None:
        self.section = section
        self.store = store
        self.clock = clock
        self.instance_id = instance_id or new_instance_id()
        self.config_path = config_path
        self.admin_url = admin_url
        self._record = record
        self._providers = providers
        self.desk = ReviewDesk(store, admin_groups=section.admin_groups, clock=clock, on_change=self._wake_one)
        self.notifier = WebhookNotifier(section.webhooks, resolve_secret, clock=clock) if section.webhooks and resolve_secret else None
        self._waiters: dict[str, _Waiter] = {}
        self._resync = trio.Event()
        self._opened = False
        self.available = False

    @classmethod
    def for_gateway(cls, config: Any, runtime: Any) -> ApprovalService | None:
        """The service ``[approvals]`` configures for a gateway, or None when it is disabled."""
        section = config.approvals
        if not section.enabled:
            return None
        try:
            store = build_store(config, runtime.resolve_secret)
        except StoreUnavailable as exc:
            raise GatewayError(f"approvals: {exc}") from None
        return cls(
            section,
            store,
            record=lambda event: runtime.record(event, durable=True),
            providers=lambda: runtime.identity_providers,
            resolve_secret=runtime.resolve_secret,
            config_path=config.source,
        )

    # --- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store before the gateway serves.

        An SQLite store that cannot be opened stops the gateway from starting (a path or
        permission problem does not mend itself): :class:`GatewayError`. A database server that
        cannot be reached is retried by :meth:`run` while the gateway serves; meanwhile
        statements that need a reviewer are denied.
        """
        try:
            await self.store.open(self.instance_id)
            self._opened = True
        except StoreUnavailable as exc:
            if not self.store.retry_when_unavailable:
                raise GatewayError(f"approvals: {exc}") from None
            log.error("approvals: %s; statements that need a reviewer are denied until it is back", exc)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Watch for decisions, sweep for orphans, send webhooks, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                if self.notifier is not None:
                    await nursery.start(self.notifier.run)
                watch = (self.store.watch, self._wake, lambda: bool(self._waiters), float(self.section.poll_interval))
                if self.store.retry_when_unavailable:
                    # a database server may be slow or down: the gateway serves meanwhile
                    task_status.started()
                    await self._open_with_retry()
                    await nursery.start(*watch)
                    await self._sweep_logged()
                    self.available = True
                else:
                    if not self._opened:
                        await self.open()
                    await nursery.start(*watch)
                    await self._sweep_logged()  # before serving: requests of a crashed predecessor
                    self.available = True
                    task_status.started()
                nursery.start_soon(self._resync_loop)
                while True:
                    await trio.sleep(SWEEP_INTERVAL)
                    await self._sweep_logged()
        finally:
            self.available = False
            with trio.move_on_after(CLEANUP_DEADLINE) as cleanup:
                cleanup.shield = True
                with contextlib.suppress(Exception):
                    await self.store.aclose()

    async def _open_with_retry(self) -> None:
        delay = STORE_RETRY_INITIAL
        while not self._opened:
            try:
                await self.store.open(self.instance_id)
                self._opened = True
            except StoreUnavailable as exc:
                log.error("approvals: %s; retrying in %.0fs", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX)

    async def _sweep_logged(self) -> None:
        try:
            await self.sweep()
        except StoreUnavailable as exc:
            log.warning("approvals: sweep skipped: %s", exc)

    async def sweep(self) -> None:
        """Cancel pending requests whose gateway died; record steps nobody recorded."""
        now = self.clock()
        alive: dict[str, bool] = {self.instance_id: True}

        async def holder_alive(holder: str) -> bool:
            if holder not in alive:
                alive[holder] = await self.store.holder_alive(holder)
            return alive[holder]

        for record in await self.store.list([model.PENDING], limit=MAX_LIST):
            if not await holder_alive(record.request.holder):
                await self.store.change(record.id, lambda current: model.cancel(current, now, HOLDER_GONE), now=now)
        for approval_id, holder in (await self.store.unclaimed()).items():
            mine_without_waiter = holder == self.instance_id and approval_id not in self._waiters
            if mine_without_waiter or not await holder_alive(holder):
                record = await self.store.get(approval_id)
                if record is not None:
                    await self._drain(record)

    # --- waking -------------------------------------------------------------------------------------

    def _wake(self, approval_ids: frozenset[str] | None) -> None:
        if approval_ids is None:
            self._resync.set()
            return
        for approval_id in approval_ids:
            self._wake_one(approval_id)

    def _wake_one(self, approval_id: str) -> None:
        waiter = self._waiters.get(approval_id)
        if waiter is not None:
            waiter.event.set()

    async def _resync_loop(self) -> None:
        """Something changed somewhere (SQLite poll, reconnect): wake the waiters whose record did."""
        while True:
            await self._resync.wait()
            self._resync = trio.Event()
            waiting = dict(self._waiters)
            try:
                versions = await self.store.versions(waiting)
            except StoreUnavailable as exc:
                log.warning("approvals: cannot check for decisions: %s", exc)
                for waiter in waiting.values():
                    waiter.event.set()  # each re-reads, and fails closed if the store stays away
                continue
            for approval_id, waiter in waiting.items():
                if versions.get(approval_id) != waiter.version:
                    waiter.event.set()

    # --- holding ------------------------------------------------------------------------------------

    async def hold(self, session: Session, request_no: int, requests: Sequence[Request], decision: Decision) -> Decision:
        """Hold a statement until it is approved, denied or expires; see the module documentation."""
        # every rule that asked, row-threshold rules included: once approved, the statement runs
        # without a later pause (Session.check pauses results only when all reviews are by rows)
        reviews = tuple(decision.reviews) or self._fallback(decision)
        statement = "; ".join(r.redacted_text for r in requests) or "<statement>"
        return await self._hold(session, request_no, requests, decision, reviews, model.STATEMENT, statement, None)

    async def hold_rows(self, session: Session, judgement: Judgement, rows_sent: int) -> Decision:
        """Hold a result at its row threshold until the rest is approved (allow) or not (deny)."""
        decision = judgement.decision
        reviews = tuple(r for r in decision.reviews if r.rows_over is not None)
        if not reviews and judgement.row_review is not None:
            reviews = (judgement.row_review,)
        reviews = reviews or self._fallback(decision)
        statement = "; ".join(r.redacted_text for r in judgement.requests) or "<statement>"
        text = f"result of {statement} passed {rows_sent} rows"
        return await self._hold(session, judgement.request_no, judgement.requests, decision, reviews, model.ROWS, text, rows_sent)

    def _fallback(self, decision: Decision) -> tuple[ReviewRequirement, ...]:
        """A review verdict with no terms (a plugin's): only admins may approve, default timeout."""
        return (
            ReviewRequirement(
                rule=",".join(decision.rules) or "review",
                approver_groups=frozenset(self.section.admin_groups),
                timeout_seconds=float(self.section.default_timeout),
            ),
        )

    async def _hold(
        self,
        session: Session,
        request_no: int,
        requests: Sequence[Request],
        decision: Decision,
        reviews: tuple[ReviewRequirement, ...],
        kind: str,
        statement: str,
        rows_sent: int | None,
    ) -> Decision:
        identity = session.identity
        if identity is None:
            return _refuse(decision, "an unauthenticated session cannot ask for approval")
        if not self.available:
            return _refuse(decision, "this needs a reviewer's approval and the approval store is unavailable")
        requester = Person.of(identity)
        target = session.config.name
        fingerprint = model.combined_fingerprint(requests)
        rules = frozenset(r.rule for r in reviews)
        if not any(r.approver_groups for r in reviews) and not self.section.admin_groups:
            return _refuse(decision, "this needs a reviewer's approval and no group may approve it")
        now = self.clock()
        try:
            window = await self.store.find_window(requester, target, fingerprint, kind, rules, now)
        except StoreUnavailable as exc:
            log.error("approvals: %s", exc)
            return _refuse(decision, "this needs a reviewer's approval and the approval store is unavailable")
        if window is not None:
            return await self._use_window(session, request_no, decision, window, requester)

        timeout = min(r.timeout_seconds for r in reviews)
        request = ApprovalRequest(
            id=new_approval_id(),
            kind=kind,
            requester=requester,
            target=target,
            session_id=session.id,
            request_no=request_no,
            holder=self.instance_id,
            statement=statement,
            fingerprint=fingerprint,
            requirements=model.requirements_for(reviews),
            created_at=now,
            expires_at=now + timeout,
            findings=model.findings_of(requests),
            rules=tuple(decision.rules),
            reasons=tuple(decision.reasons),
            justification=(session.justification or "").strip()[: model.MAX_COMMENT_CHARS],
            rows_sent=rows_sent,
            policy_version=decision.policy_version,
        )
        try:
            record = await self.store.create(request)
        except StoreUnavailable as exc:
            log.error("approvals: %s", exc)
            return _refuse(decision, "this needs a reviewer's approval and the approval store is unavailable")
        waiter = self._waiters[request.id] = _Waiter(record.version)
        try:
            await self._drain(record)
            await self._tell(session, self._notice(record))
            final = await self._wait(session, record, waiter)
        except _CallerGone:
            final = await self._cancel(request.id, "the caller's connection closed while the statement was held")
        except StoreUnavailable as exc:
            log.error("approvals: %s", exc)
            with contextlib.suppress(StoreUnavailable):
                await self._cancel(request.id, "the approval store became unavailable")
            return _refuse(decision, "the approval store became unavailable while the statement was held")
        except BaseException:
            # the session is ending (hang-up noticed by the protocol, shutdown, expiry): whatever
            # happens later, this request must never be approved for a session that is gone
            with trio.move_on_after(CLEANUP_DEADLINE) as cleanup:
                cleanup.shield = True
                with contextlib.suppress(Exception):
                    await self._cancel(request.id, "the session ended while the statement was held")
            raise
        finally:
            self._waiters.pop(request.id, None)
        return _outcome(final, decision)

    async def _use_window(self, session: Session, request_no: int, decision: Decision, window: model.Window, requester: Person) -> Decision:
        comment = f"covered by the window of approval {window.approval_id} until {iso(window.until)}"
        event = events.ApprovalEvent(
            session_id=session.id,
            request_no=request_no,
            approval_id=window.approval_id,
            step="window",
            actor=requester.display,
            comment=comment,
            rule=",".join(sorted(window.rules)),
        )
        await self._record_event(event)
        if self.notifier is not None:
            self.notifier.send("window", {"id": window.approval_id, "target": window.target, "window_until": window.until}, {"actor": requester.display, "comment": comment, "at": self.clock(), "session_id": session.id, "request_no": request_no})
        return Decision(
            Verdict.ALLOW,
            decision.rules,
            (*decision.reasons, f"approved in advance: {comment}"),
            decision.policy_version,
        )

    async def _wait(self, session: Session, record: ApprovalRecord, waiter: _Waiter) -> ApprovalRecord:
        request = record.request
        reminder_every = float(self.section.reminder_interval)
        next_reminder = trio.current_time() + reminder_every if reminder_every > 0 else float("inf")
        while True:
            remaining = request.expires_at - self.clock()
            if remaining <= 0:
                now = self.clock()  # read here: stores may run the change in a worker thread
                current = await self.store.change(request.id, lambda r, now=now: model.expire(r, now), now=now)
                await self._drain(current)
                if current.state != model.PENDING:
                    return current
                await trio.sleep(0)  # the stored expiry is a hair ahead of this clock: look again
                continue
            with trio.move_on_at(min(trio.current_time() + remaining, next_reminder)):
                await waiter.event.wait()
            if trio.current_time() >= next_reminder and not waiter.event.is_set():
                next_reminder = trio.current_time() + reminder_every
                current = await self.store.get(request.id)
                if current is not None and current.pending:
                    await self._tell(session, self._reminder(current))
                    continue
                waiter.event.set()  # decided, and the wake-up went astray: read it below
            if not waiter.event.is_set():
                continue  # the deadline passed: the loop expires the request
            waiter.event = trio.Event()  # before reading, so a change while we read is not lost
            current = await self.store.get(request.id)
            if current is None:
                raise StoreUnavailable(f"approval request {request.id} disappeared from the store")
            waiter.version = current.version
            await self._drain(current)
            if current.state != model.PENDING:
                return current

    async def _cancel(self, approval_id: str, reason: str) -> ApprovalRecord:
        now = self.clock()
        record = await self.store.change(approval_id, lambda current: model.cancel(current, now, reason), now=now)
        await self._drain(record)
        return record

    async def _tell(self, session: Session, text: str) -> None:
        notify = getattr(session, "notify", None)
        if notify is None:
            return
        try:
            await notify(text)
        except _CALLER_GONE_ERRORS:
            raise _CallerGone() from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("approvals: could not tell session %s about its held statement", session.id)

    # --- what the caller is told -------------------------------------------------------------------

    def _urls(self, approval_id: str) -> tuple[str, str]:
        config = f" -c {self.config_path}" if self.config_path else ""
        cli = f"bastion approvals approve {approval_id}{config}"
        base = (self.section.public_url or self.admin_url or "").rstrip("/")
        http = f"POST {base}/approvals/{approval_id}/approve" if base else "the admin API (POST /approvals/{id}/approve)".replace("{id}", approval_id)
        return cli, http

    def _notice(self, record: ApprovalRecord) -> str:
        request = record.request
        cli, http = self._urls(request.id)
        fields = {
            "id": request.id,
            "expires": iso(request.expires_at),
            "timeout": model.describe_seconds(request.expires_at - request.created_at),
            "approvers": ", ".join(sorted(request.approver_groups | frozenset(self.section.admin_groups))) or "nobody",
            "rules": ", ".join(sorted(request.review_rules)),
            "cli": cli,
            "http": http,
        }
        return (self.section.notice or DEFAULT_NOTICE).format_map(fields)

    def _reminder(self, record: ApprovalRecord) -> str:
        missing = model.missing_approvals(record, self.section.admin_groups)
        needs = "; ".join(f"{rule} needs {count} more approval{'s' if count > 1 else ''}" for rule, count in missing.items()) or "waiting for the store"
        remaining = model.describe_seconds(record.request.expires_at - self.clock())
        return REMINDER.format(id=record.id, missing=needs, remaining=remaining)

    # --- the audit trail and webhooks ----------------------------------------------------------------

    async def _drain(self, record: ApprovalRecord) -> None:
        """Record (and announce) the steps of ``record`` nobody has recorded yet."""
        for step in await self.store.claim_steps([record.id]):
            request = record.request
            event = events.ApprovalEvent(
                session_id=request.session_id,
                request_no=request.request_no,
                approval_id=request.id,
                step=step.step,
                actor=step.actor,
                comment=step.comment,
                rule=",".join(sorted(request.review_rules)),
            )
            await self._record_event(event)
            if self.notifier is not None:
                self.notifier.send(step.step, self.desk.view(record), {"actor": step.actor, "comment": step.comment, "at": step.at})

    async def _record_event(self, event: events.AuditEvent) -> None:
        try:
            await self._record(event)
        except trio.Cancelled:
            raise
        except Exception:
            # the statement's own record (RequestJudged) fails closed if the trail is down
            log.exception("approvals: could not record the %s step of %s", getattr(event, "step", "?"), getattr(event, "approval_id", "?"))

    # --- the HTTP API --------------------------------------------------------------------------------

    def add_routes(self, app: AdminApp) -> None:
        """``GET /approvals``, ``GET /approvals/{id}``, ``POST /approvals/{id}/approve|deny``."""
        api = HttpApi(self.desk, self._providers, clock=self.clock)
        app.add_route("GET", "/approvals", api.list)
        app.add_route("GET", "/approvals/{id}", api.show)
        app.add_route("POST", "/approvals/{id}/approve", api.approve)
        app.add_route("POST", "/approvals/{id}/deny", api.deny)


def _refuse(decision: Decision, reason: str) -> Decision:
    return Decision(Verdict.DENY, decision.rules or ("review",), (reason,), decision.policy_version)


def _outcome(record: ApprovalRecord, decision: Decision) -> Decision:
    """The decision a held statement ends with."""
    approval = record.id
    if record.state == model.APPROVED:
        scope = f", and for the same statement until {iso(record.window_until)}" if record.window_until else ""
        reason = f"approved by {', '.join(p.subject for p in record.approvers)} (approval {approval}{scope})"
        return Decision(Verdict.ALLOW, decision.rules, (*decision.reasons, reason), decision.policy_version)
    if record.state == model.DENIED:
        reviewer = next((v.reviewer.subject for v in record.votes if v.verdict == model.DENY), "a reviewer")
        reason = f"denied by {reviewer} (approval {approval}): {record.outcome}"
    elif record.state == model.EXPIRED:
        reason = f"not approved in time (approval {approval}): {record.outcome}"
    else:
        reason = f"approval {approval} was cancelled: {record.outcome}"
    return Decision(Verdict.DENY, decision.rules, (reason,), decision.policy_version)


# --- HTTP ------------------------------------------------------------------------------------------


_STATUS_OF = {"forbidden": 403, "not-found": 404, "conflict": 409, "invalid": 400}
LIST_STATES = (*model.STATES, "all")


class HttpApi:
    """Handlers for the admin listener; every request needs ``Authorization: Bearer <token>``."""

    def __init__(self, desk: ReviewDesk, providers: Callable[[], Sequence[tuple[str, Any]]], *, clock: Callable[[], float] = time.time) -> None:
        self.desk = desk
        self.providers = providers
        self.clock = clock

    async def _reviewer(self, request: HTTPRequest) -> Person | HTTPResponse:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        identity = None
        if scheme.lower() == "bearer" and token.strip():
            identity = await authenticate_token(self.providers(), token.strip(), clock=self.clock)
        if identity is None:
            body = json.dumps({"error": "a valid bearer token is needed (Authorization: Bearer <token>)"}).encode() + b"\n"
            return HTTPResponse(401, body, headers=(("www-authenticate", 'Bearer realm="bastion-approvals"'),))
        return Person.of(identity)

    async def _guarded(self, request: HTTPRequest, action: Callable[[Person], Awaitable[HTTPResponse]]) -> HTTPResponse:
        reviewer = await self._reviewer(request)
        if isinstance(reviewer, HTTPResponse):
            return reviewer
        try:
            return await action(reviewer)
        except ReviewRefused as exc:
            return HTTPResponse.error(_STATUS_OF.get(exc.kind, 400), exc.message)
        except StoreUnavailable as exc:
            log.error("approvals API: %s", exc)
            return HTTPResponse.error(503, "the approval store is unavailable")

    async def list(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        async def action(reviewer: Person) -> HTTPResponse:
            state = (request.query.get("state") or ["pending"])[-1]
            if state not in LIST_STATES:
                raise ReviewRefused("invalid", f"state must be one of {', '.join(LIST_STATES)}")
            try:
                limit = int((request.query.get("limit") or [str(DEFAULT_LIST_LIMIT)])[-1])
            except ValueError:
                raise ReviewRefused("invalid", "limit must be a whole number") from None
            if limit < 1:
                raise ReviewRefused("invalid", "limit must be at least 1")
            records = await self.desk.list(reviewer, None if state == "all" else (state,), limit)
            return HTTPResponse.json(200, {"approvals": [self.desk.view(r) for r in records]})

        return await self._guarded(request, action)

    async def show(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        async def action(reviewer: Person) -> HTTPResponse:
            return HTTPResponse.json(200, self.desk.view(await self.desk.show(reviewer, params["id"])))

        return await self._guarded(request, action)

    async def approve(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        async def action(reviewer: Person) -> HTTPResponse:
            body = _json_object(request)
            comment = _optional_text(body, "comment")
            window = parse_window(body.get("window"))
            record = await self.desk.approve(reviewer, params["id"], comment=comment, window_seconds=window)
            return HTTPResponse.json(200, self.desk.view(record))

        return await self._guarded(request, action)

    async def deny(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        async def action(reviewer: Person) -> HTTPResponse:
            body = _json_object(request)
            record = await self.desk.deny(reviewer, params["id"], reason=_optional_text(body, "reason"))
            return HTTPResponse.json(200, self.desk.view(record))

        return await self._guarded(request, action)


def _json_object(request: HTTPRequest) -> dict[str, Any]:
    try:
        body = request.json()
    except (ValueError, UnicodeDecodeError):
        raise ReviewRefused("invalid", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ReviewRefused("invalid", "the body must be a JSON object")
    unknown = set(body) - {"comment", "window", "reason"}
    if unknown:
        raise ReviewRefused("invalid", f"unknown field {sorted(unknown)[0]!r}")
    return body


def _optional_text(body: dict[str, Any], key: str) -> str:
    value = body.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ReviewRefused("invalid", f"{key} must be a string")
    return value


def parse_window(value: Any) -> float:
    """A window as the API and the command line take it: ``"30m"``, ``"2h"``, seconds, or nothing."""
    if value is None or value == "" or value == 0:
        return 0.0
    try:
        return float(Duration.parse(value))
    except ValueError as exc:
        raise ReviewRefused("invalid", f"window: {exc}") from None


# --- the command line's side: a desk and an identity without a gateway ----------------------------


@contextlib.asynccontextmanager
async def reviewer_desk(config: Any, hooks: Any, token: str | None) -> AsyncIterator[tuple[ReviewDesk, Person]]:
    """For ``bastion approvals``: the store and the reviewer the token stands for.

    Builds the configuration's identity providers as the gateway does, authenticates ``token``
    (ReviewRefused ``unauthenticated`` when it stands for nobody) and opens the store without
    registering an instance (a command holds no session).
    """
    from bastion.core.secrets import resolve
    from bastion.core.server import component_context

    def resolve_secret(reference: Any) -> Any:
        return resolve(reference, hooks.resolve_secret)

    providers: list[tuple[str, Any]] = []
    specs = hooks.identity_providers()
    try:
        for section in config.identity:
            context = component_context(config, resolve_secret, section.name)
            providers.append((section.name, specs[section.kind].factory(section.options, context)))
        identity = await authenticate_token(providers, token)
        if identity is None:
            raise ReviewRefused("unauthenticated", "the reviewer token is missing or not valid (give --token or set BASTION_TOKEN)")
        store = build_store(config, resolve_secret)
        await store.open(None)
        try:
            yield ReviewDesk(store, admin_groups=config.approvals.admin_groups), Person.of(identity)
        finally:
            with trio.move_on_after(CLEANUP_DEADLINE) as cleanup:
                cleanup.shield = True
                await store.aclose()
    finally:
        for name, provider in providers:
            try:
                await provider.aclose()
            except Exception:
                log.exception("identity provider %s failed to close", name)


__all__ = [
    "ApprovalService",
    "HttpApi",
    "ReviewDesk",
    "authenticate_token",
    "parse_window",
    "reviewer_desk",
]
