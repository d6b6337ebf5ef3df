"""One client connection and the pipeline of hook calls it goes through.

A protocol handler (see :class:`bastion.core.specs.ProtocolHandler`) drives the session; it calls
back into :class:`Session` at each hook point, and the session calls the hooks through
:class:`bastion.core.hooks.Hooks`, so every protocol gets the same checks, the same records and the
same fail-closed behaviour.
"""

from __future__ import annotations

import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from bastion.core import events
from bastion.core.config import TargetConfig
from bastion.core.errors import AuthenticationFailed, ConnectDenied, UpstreamUnavailable
from bastion.core.hooks import HookError
from bastion.policies import masking
from bastion.policies.model import (
    AuthOutcome,
    AuthStatus,
    Credential,
    Decision,
    Identity,
    Message,
    Request,
    ResultShape,
    ReviewRequirement,
    Verdict,
)

if TYPE_CHECKING:  # pragma: no cover
    from bastion.core.server import Runtime, TargetRuntime

log = logging.getLogger("bastion.session")

ANONYMOUS = "anonymous"


@attrs.frozen
class SessionInfo:
    """What hooks see of a session: a snapshot, replaced (not mutated) as the session advances.

    ``target_state`` is shared by all sessions of a target and ``state`` belongs to this session:
    plugins keep caches and per-session memory there (e.g. prepared statements), keyed by their
    own name, instead of in module globals.
    """

    id: str
    target: TargetConfig
    client: str
    tls: bool = False
    identity: Identity | None = None
    policy: Any = attrs.field(default=None, eq=False, repr=False)
    started_at: float = attrs.field(factory=time.time)
    target_state: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)
    state: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def protocol(self) -> str:
        return self.target.protocol


@attrs.frozen
class Judgement:
    """The parse and authorize phases' answer for one statement-bearing message."""

    request_no: int
    requests: tuple[Request, ...]
    decision: Decision
    # set when the statement may run but its result must pause at ``row_review.rows_over`` rows
    # until a reviewer approves the rest (see Session.approve_rows)
    row_review: ReviewRequirement | None = None

    @property
    def allowed(self) -> bool:
        return self.decision.verdict is Verdict.ALLOW

    @property
    def request(self) -> Request | None:
        return self.requests[0] if len(self.requests) == 1 else None


class Session:
    """The pipeline of one client connection.

    The full sequence of hook calls, in order (``[]`` marks what a protocol may repeat)::

        connection accepted             -> record: ConnectionOpened
        authenticate(credential)        -> each configured identity provider in config order:
                                           ok (stop) | unknown (next) | reject (stop)
                                        -> bastion_authorize(request=<connect>)   (grant to use
                                           the target at all; default deny)
                                        -> record: SessionStarted (durable) or
                                           AuthenticationFailed
        [ check(message)                -> bastion_parse(message)       first non-None wins
                                        -> bastion_authorize(request)   for every statement;
                                           deny > review > allow; nothing allows -> deny
                                        -> record: RequestJudged (durable before anything is
                                           forwarded when audit.fail_closed)
          [ transform_plans(shape)      -> bastion_transform(request, shape)  once per result
                                           set; the protocol applies the plans to each row ]
          [ mask_text(text)             -> bastion_text_transform(text)  error/notice fields ]
          record_rows / record_response -> record: ResultRows, ResponseCompleted ]
        session ends                    -> record: SessionEnded (reason, totals)

    ``bastion_record`` is called for every recorded event. Authentication, the connect check and
    the end-of-session record happen exactly once; ``check`` happens for every statement-bearing
    message, before it reaches the server.
    """

    def __init__(self, runtime: Runtime, target: TargetRuntime, client: str) -> None:
        self.runtime = runtime
        self.target = target
        self.id = uuid.uuid4().hex[:20]
        self.client = client
        self._info = SessionInfo(
            id=self.id,
            target=target.config,
            client=client,
            policy=runtime.policy,
            target_state=target.state,
        )
        self.started = time.monotonic()
        self.requests = 0
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.cancel_scope: trio.CancelScope | None = None
        self.end_reason: str | None = None
        self.expired = False
        # set by the protocol handler: says goodbye in the protocol's words (e.g. a FATAL error)
        self.farewell: Callable[[str], Awaitable[None]] | None = None
        # set by the protocol handler: tells the caller something while a statement is held
        # (PostgreSQL: a NoticeResponse naming the approval request)
        self.notify: Callable[[str], Awaitable[None]] | None = None
        # the caller's reason for what it is about to do, shown to reviewers
        self.justification: str | None = None
        # (policy, its masker) for what the audit trail keeps, built on first use
        self._masker: tuple[Any, masking.TextMasker] | None = None
        # the last one-statement request's recorded fields (see _described)
        self._last_described: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    # --- snapshot for hooks ---------------------------------------------------------------------

    @property
    def info(self) -> SessionInfo:
        return self._info

    @property
    def identity(self) -> Identity | None:
        return self._info.identity

    @property
    def config(self) -> TargetConfig:
        return self.target.config

    @property
    def hooks(self):
        return self.runtime.hooks

    def set_tls(self, tls: bool) -> None:
        self._info = attrs.evolve(self._info, tls=tls)

    # --- authenticate -----------------------------------------------------------------------------

    async def authenticate(
        self,
        credential: Credential,
        *,
        client_user: str | None = None,
        database: str | None = None,
    ) -> Identity:
        """Verify the caller, check it may use this target at all, and record the start.

        Raises :class:`AuthenticationFailed` (tell the caller only that authentication failed)
        or :class:`ConnectDenied`.
        """
        outcome = AuthOutcome.reject("no identity provider is configured")
        provider_name = None
        for name, provider in self.runtime.identity_providers:
            try:
                outcome = await provider.authenticate(credential)
            except trio.Cancelled:
                raise
            except Exception as exc:
                log.exception("identity provider %s failed on session %s", name, self.id)
                outcome = AuthOutcome.reject(f"identity provider {name} failed ({type(exc).__name__})")
            if outcome.status is not AuthStatus.UNKNOWN:
                provider_name = name
                break
        else:
            if self.runtime.identity_providers:
                outcome = AuthOutcome.reject("no identity provider recognised the credential")
        if outcome.status is AuthStatus.OK and outcome.identity is not None:
            identity = outcome.identity
            if identity.expires_at is not None and identity.expires_at.timestamp() <= time.time():
                outcome = AuthOutcome.reject("the credential has expired")
        if outcome.status is not AuthStatus.OK or outcome.identity is None:
            await self.authentication_failed(outcome.reason or "rejected", client_user=client_user, provider=provider_name)
            raise AuthenticationFailed(outcome.reason or "rejected")
        return await self._start(outcome.identity, client_user=client_user, database=database)

    async def authentication_failed(self, reason: str, *, client_user: str | None = None, provider: str | None = None) -> None:
        """Count and record a failed login (the caller is told only that authentication failed).

        :meth:`authenticate` calls it; a protocol calls it for a credential it refuses before any
        provider can see it (e.g. one too large for the protocol's password message).
        """
        self.runtime.metrics.auth_failures.labels(self.config.name).inc()
        await self.record(
            events.AuthenticationFailed(
                session_id=self.id,
                target=self.config.name,
                client=self.client,
                reason=reason,
                client_user=client_user,
                provider=provider,
            )
        )

    async def accept_anonymous(self, *, client_user: str | None = None) -> Identity:
        """For targets configured without caller authentication: the identity ``anonymous``.

        Grants can still name it (``identities = { subjects = ["anonymous"] }``), so default deny
        holds: an unauthenticated target reaches nothing until a grant says so.
        """
        identity = Identity(provider="none", subject=ANONYMOUS, auth_method="none")
        return await self._start(identity, client_user=client_user, database=None)

    async def _start(self, identity: Identity, *, client_user: str | None, database: str | None) -> Identity:
        self._info = attrs.evolve(self._info, identity=identity)
        connect = Request(message=Message(self.config.protocol, "connect"), action="connect")
        decision = self.hooks.authorize(self._info, connect)
        event = events.SessionStarted(
            session_id=self.id,
            target=self.config.name,
            protocol=self.config.protocol,
            client=self.client,
            tls=self._info.tls,
            identity=identity,
            client_user=client_user,
            database=database,
            decision=decision.verdict.value,
            rules=decision.rules,
        )
        await self.record(event, durable=True)
        if decision.verdict is not Verdict.ALLOW:
            raise ConnectDenied(decision)
        self.runtime.metrics.sessions_started.labels(self.config.name).inc()
        self._watch_expiry(identity)
        return identity

    def _watch_expiry(self, identity: Identity) -> None:
        if identity.expires_at is None or self.cancel_scope is None:
            return
        remaining = identity.expires_at.timestamp() - time.time() + self.runtime.config.gateway.expiry_grace
        self.cancel_scope.deadline = min(self.cancel_scope.deadline, trio.current_time() + max(remaining, 0))
        self.expires_deadline = self.cancel_scope.deadline

    # --- parse + authorize -------------------------------------------------------------------------

    def judge(self, message: Message) -> tuple[list[Request], Decision]:
        """Parse and authorize without recording: for protocols that must decide before they can
        describe (e.g. PostgreSQL's Parse message). Use :meth:`check` to also record."""
        hooks = self.runtime.hooks
        info = self._info
        requests = hooks.parse(info, message)
        if len(requests) == 1:
            return requests, hooks.authorize(info, requests[0])
        return requests, combine_statements([hooks.authorize(info, request) for request in requests])

    async def check(
        self,
        message: Message,
        *,
        parameters: Sequence[str | None] = (),
        kind: str | None = None,
        judged: tuple[list[Request], Decision] | None = None,
    ) -> Judgement:
        """Parse, authorize and record one statement-bearing message.

        Returns the judgement; when it is allowed, the request record is durable (under
        ``audit.fail_closed``) by the time this returns, so the message may be forwarded.
        ``parameters`` must already be masked.
        """
        requests, decision = judged if judged is not None else self.judge(message)
        self.requests += 1
        request_no = self.requests
        row_review = None
        if decision.verdict is Verdict.REVIEW:
            if decision.reviews and all(r.rows_over is not None for r in decision.reviews):
                # the statement runs; its result pauses at the threshold (approve_rows)
                row_review = min(decision.reviews, key=lambda r: r.rows_over)
                decision = attrs.evolve(
                    decision,
                    verdict=Verdict.ALLOW,
                    reasons=(*decision.reasons, f"rows past {row_review.rows_over} need a reviewer's approval"),
                )
            else:
                decision = await self.runtime.review(self, request_no, requests, decision)
        identity = self._info.identity
        event = events.RequestJudged(
            session_id=self.id,
            request_no=request_no,
            identity=identity.subject if identity else "",
            target=self.target.config.name,
            kind=kind or message.kind,
            **self._described(requests),
            parameters=tuple(parameters),
            verdict=decision.verdict.value,
            rules=decision.rules,
            reasons=decision.reasons,
            policy_version=decision.policy_version,
        )
        allowed = decision.verdict is Verdict.ALLOW
        try:
            await self.record(event, durable=allowed)
        except Exception as exc:  # AuditUnavailable and anything else: never run unrecorded
            if not self.runtime.config.audit.fail_closed:
                log.error("audit trail failed (%s); continuing because audit.fail_closed is false", exc)
            else:
                decision = Decision.deny(
                    "audit-unavailable",
                    "the audit trail cannot record this statement, so it is not run",
                )
        self.runtime.metrics.count_request(self.config.name, decision.verdict.value)
        return Judgement(request_no, tuple(requests), decision, row_review)

    def _described(self, requests: Sequence[Request]) -> dict[str, Any]:
        """:func:`_described`, kept for the last one-statement shape: a session repeats its
        statements, and the fields it is built from are the same objects (shared by the cached
        analysis) each time. Only redacted text, names and findings are kept, never a literal."""
        if len(requests) != 1:
            return _described(requests)
        request = requests[0]
        fields = (request.redacted_text, request.action, request.fingerprint, request.tables_read, request.tables_written, request.findings)
        last = self._last_described
        if last is not None:
            known = last[0]
            if (
                known[0] is fields[0]
                and known[1] is fields[1]
                and known[2] is fields[2]
                and known[3] is fields[3]
                and known[4] is fields[4]
                and known[5] is fields[5]
            ):
                return last[1]
        described = _described(requests)
        self._last_described = (fields, described)
        return described

    async def give_justification(self, text: str | None, *, kind: str = "statement") -> None:
        """The caller says why (``SET bastion.justification`` in PostgreSQL): shown to reviewers of
        this session's later requests. Recorded as a request Bastion answered itself; None clears it.
        """
        if text is None:
            await self.record_own_answer("RESET bastion.justification", "bastion:justification", "justification cleared", kind=kind)
        else:
            shown = self._record_masker()(text)
            await self.record_own_answer("SET bastion.justification = ?", "bastion:justification", f"justification: {shown}", kind=kind)
        self.justification = text

    async def record_own_answer(self, statement: str, rule: str, reason: str, *, kind: str, allowed: bool = True) -> None:
        """Record a request the gateway answers itself, without the parse and authorize hooks
        (a setting of its own, or a refusal of one): ``statement`` must hold no literal."""
        self.requests += 1
        await self.record(
            events.RequestJudged(
                session_id=self.id,
                request_no=self.requests,
                identity=self.identity.subject if self.identity else "",
                target=self.config.name,
                kind=kind,
                statements=(statement,),
                actions=("set",),
                verdict=(Verdict.ALLOW if allowed else Verdict.DENY).value,
                rules=(rule,),
                reasons=(reason,),
            ),
        )

    async def approve_rows(self, judgement: Judgement, rows_sent: int) -> Decision:
        """A result reached its review threshold: hold it until a reviewer decides.

        The protocol stops reading the server while this waits (so memory stays bounded) and,
        unless the answer is allow, cancels the query upstream and ends the statement with an
        error. Returns the reviewer's decision (deny on expiry or without an approval service).
        """
        assert judgement.row_review is not None
        return await self.runtime.review_rows(self, judgement, rows_sent)

    # --- transform ---------------------------------------------------------------------------------

    def transform_plans(self, request: Request | None, shape: ResultShape) -> list[Any]:
        """Compiled row plans for one result set. Raises HookError: refuse the result."""
        return self.hooks.transform(self._info, request, shape)

    def mask_text(self, text: str) -> str:
        """Free text echoed to the caller (error details, notices). Raises HookError."""
        return self.hooks.text_transform(self._info, text)

    # --- record ------------------------------------------------------------------------------------

    async def record(self, event: events.AuditEvent, *, durable: bool = False) -> None:
        await self.runtime.record(self._for_the_record(event), durable=durable)

    def _for_the_record(self, event: events.AuditEvent) -> events.AuditEvent:
        """Recordings never hold raw PHI, whatever the caller was allowed to see.

        Result rows and echoed error text are what the caller saw after its own masking (none for
        an exempt identity); before they are written, every recognizer masks what it finds
        again, so even an exempt caller's session is recorded without raw identifiers.
        """
        if isinstance(event, events.ResultRows):
            mask = self._record_masker()
            rows = event.rows
            masked = tuple([tuple([None if cell is None else mask(cell) for cell in row]) for row in rows])
            return event if masked == rows else attrs.evolve(event, rows=masked)
        if isinstance(event, events.ResponseCompleted) and event.error_message:
            masked_message = self._record_masker()(event.error_message)
            return event if masked_message == event.error_message else attrs.evolve(event, error_message=masked_message)
        return event

    def _record_masker(self) -> Callable[[str], str]:
        """Every free-text recognizer (the built-in ones and the policy's own), compiled once per
        session; raises MaskingConfigError when the policy's recognizers cannot be compiled."""
        policy = self._info.policy
        cached = self._masker
        if cached is None or cached[0] is not policy:
            custom = tuple(getattr(policy, "recognizers", ()) or ())
            cached = self._masker = (policy, masking.TextMasker(custom))
        return cached[1]

    async def record_response(self, request_no: int, status: str, **fields: Any) -> None:
        await self.record(events.ResponseCompleted(session_id=self.id, request_no=request_no, status=status, **fields))

    @property
    def record_rows_limit(self) -> int | None:
        """How many rows of each result the trail keeps: None means all."""
        setting = self.runtime.config.audit.record_rows
        if setting == "all":
            return None
        if setting == "none":
            return 0
        return int(setting)

    # --- upstream ----------------------------------------------------------------------------------

    async def connect_upstream(self, *, implicit_tls: bool = False) -> trio.abc.Stream:
        """Open the connection to the target's upstream (TLS when ``implicit_tls`` and configured)."""
        address = self.config.upstream
        try:
            with trio.fail_after(self.config.connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
                if implicit_tls and self.target.upstream_ssl_context is not None:
                    stream = trio.SSLStream(stream, self.target.upstream_ssl_context, server_hostname=self.upstream_server_name)
                    await stream.do_handshake()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise UpstreamUnavailable(f"cannot reach upstream {address}: {_describe_os_error(exc)}") from None
        return stream

    @property
    def upstream_server_name(self) -> str:
        tls = self.config.upstream_tls
        return (tls.server_name if tls and tls.server_name else None) or self.config.upstream.host

    async def upstream_password(self) -> str | None:
        """Resolve the target's password reference now (rotation without restart)."""
        credentials = self.config.credentials
        if credentials is None or credentials.password is None:
            return None
        secret = await trio.to_thread.run_sync(self.runtime.resolve_secret, credentials.password)
        return secret.reveal()

    async def start_tls(self, stream: trio.abc.Stream) -> trio.SSLStream:
        """Wrap the client stream in TLS (server side) and complete the handshake."""
        context = self.target.server_ssl_context
        assert context is not None, "start_tls called on a target without tls"
        tls_stream = trio.SSLStream(stream, context, server_side=True)
        with trio.fail_after(self.runtime.config.gateway.handshake_timeout):
            await tls_stream.do_handshake()
        self.set_tls(True)
        return tls_stream

    # --- end ---------------------------------------------------------------------------------------

    async def finish(self, reason: str, error: str = "") -> None:
        await self.record(
            events.SessionEnded(
                session_id=self.id,
                reason=reason,
                requests=self.requests,
                bytes_from_client=self.bytes_from_client,
                bytes_to_client=self.bytes_to_client,
                duration_ms=round((time.monotonic() - self.started) * 1000, 3),
                error=error,
            )
        )


def _described(requests: Sequence[Request]) -> dict[str, Any]:
    """What the audit trail keeps of a message's requests (the request record's fields)."""
    if len(requests) == 1:  # nearly every message: the same fields, built directly
        (request,) = requests
        findings = request.findings
        if findings and len({f.name for f in findings}) != len(findings):
            findings = tuple({f.name: f for f in findings}.values())
        tables = request.tables_read | request.tables_written
        return {
            "statements": (request.redacted_text,),
            "actions": (request.action,),
            "fingerprints": (request.fingerprint,) if request.fingerprint else (),
            "tables": tuple(sorted(tables)) if len(tables) > 1 else tuple(tables),
            "findings": tuple(events.FindingRecord(name=f.name, weight=f.weight, sentence=f.sentence) for f in findings),
            "risk": request.risk if findings else 0,
        }
    findings_by_name = {f.name: f for r in requests for f in r.findings}
    return {
        "statements": tuple(r.redacted_text for r in requests),
        "actions": tuple(r.action for r in requests),
        "fingerprints": tuple(r.fingerprint for r in requests if r.fingerprint),
        "tables": tuple(sorted({t for r in requests for t in r.tables})),
        "findings": tuple(events.FindingRecord(name=f.name, weight=f.weight, sentence=f.sentence) for f in findings_by_name.values()),
        "risk": max((r.risk for r in requests), default=0),
    }


def combine_statements(decisions: list[Decision]) -> Decision:
    """A message of several statements runs only if every statement may run."""
    if not decisions:
        return Decision.deny("empty", "the message carries no statement")
    return Decision.combine(decisions)


def _describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


__all__ = ["Session", "SessionInfo", "Judgement", "HookError"]
