"""Audit events: frozen values, one class per thing that happens.

Events hold no raw PHI and no secret: statements are recorded with literals masked, parameters
and result rows masked, and identities without their tokens. The audit trail encodes them with
msgpack (see :mod:`bastion.core.audit`), adding a sequence number and a hash chain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs

from bastion.core.codec import converter
from bastion.policies.model import Identity


def _now() -> float:
    return time.time()


@attrs.frozen(kw_only=True)
class AuditEvent:
    """Common fields: ``at`` is a Unix timestamp; ``session_id`` is empty for gateway events."""

    session_id: str = ""
    at: float = attrs.field(factory=_now)

    @property
    def type(self) -> str:
        return EVENT_TYPES_BY_CLASS[type(self)]


@attrs.frozen(kw_only=True)
class GatewayStarted(AuditEvent):
    version: str
    targets: tuple[str, ...]
    policy_version: str
    pid: int


@attrs.frozen(kw_only=True)
class GatewayStopped(AuditEvent):
    reason: str
    sessions_interrupted: int = 0


@attrs.frozen(kw_only=True)
class ConnectionOpened(AuditEvent):
    target: str
    protocol: str
    client: str
    listen: str


@attrs.frozen(kw_only=True)
class SessionStarted(AuditEvent):
    target: str
    protocol: str
    client: str
    tls: bool
    identity: Identity
    client_user: str | None = None
    database: str | None = None
    decision: str = "allow"
    rules: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class AuthenticationFailed(AuditEvent):
    target: str
    client: str
    reason: str
    client_user: str | None = None
    provider: str | None = None


@attrs.frozen(kw_only=True)
class FindingRecord:
    name: str
    weight: int
    sentence: str


@attrs.frozen(kw_only=True)
class RequestJudged(AuditEvent):
    """One statement-bearing message and what was decided about it."""

    request_no: int
    identity: str
    target: str
    kind: str  # message kind: statement, parse, bind, execute, function-call, copy, command…
    statements: tuple[str, ...]  # literals masked
    actions: tuple[str, ...]
    fingerprints: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    findings: tuple[FindingRecord, ...] = ()
    risk: int = 0
    parameters: tuple[str | None, ...] = ()  # masked
    verdict: str
    rules: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    policy_version: str = ""


@attrs.frozen(kw_only=True)
class ResponseCompleted(AuditEvent):
    request_no: int
    status: str  # ok | error | cancelled | denied
    columns: tuple[str, ...] = ()
    rows: int = 0
    bytes: int = 0
    masked: dict[str, int] = attrs.field(factory=dict, hash=False)
    duration_ms: float = 0.0
    command_tag: str = ""
    error_code: str = ""
    error_message: str = ""


@attrs.frozen(kw_only=True)
class ResultRows(AuditEvent):
    """Masked result rows as the caller saw them (text), for replay."""

    request_no: int
    first_row: int
    rows: tuple[tuple[str | None, ...], ...]


@attrs.frozen(kw_only=True)
class ApprovalEvent(AuditEvent):
    request_no: int
    approval_id: str
    step: str  # requested | approval (one reviewer's vote) | approved | denied | expired | cancelled | window
    actor: str = ""
    comment: str = ""
    rule: str = ""


@attrs.frozen(kw_only=True)
class CancelForwarded(AuditEvent):
    target: str
    client: str
    outcome: str  # forwarded | unknown-key


@attrs.frozen(kw_only=True)
class SessionEnded(AuditEvent):
    reason: str
    requests: int = 0
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    duration_ms: float = 0.0
    error: str = ""


EVENT_TYPES: dict[str, type[AuditEvent]] = {
    "gateway-started": GatewayStarted,
    "gateway-stopped": GatewayStopped,
    "connection-opened": ConnectionOpened,
    "session-started": SessionStarted,
    "authentication-failed": AuthenticationFailed,
    "request": RequestJudged,
    "response": ResponseCompleted,
    "rows": ResultRows,
    "approval": ApprovalEvent,
    "cancel": CancelForwarded,
    "session-ended": SessionEnded,
}
EVENT_TYPES_BY_CLASS: dict[type, str] = {cls: name for name, cls in EVENT_TYPES.items()}


# The converter's generated unstructure function of each event class, looked up once: every
# statement turns events into dicts, and the converter's own dispatch costs as much as the work.
_UNSTRUCTURE_BY_CLASS: dict[type, Callable[[Any], dict[str, Any]]] = {}


def event_to_dict(event: AuditEvent) -> dict[str, Any]:
    """A plain dict (msgpack/JSON-ready) with a ``type`` key naming the event class.

    The same dict as ``converter.unstructure(event)`` plus ``type``, keys in field order.
    """
    cls = type(event)
    unstructure = _UNSTRUCTURE_BY_CLASS.get(cls)
    if unstructure is None:
        unstructure = _UNSTRUCTURE_BY_CLASS[cls] = converter.get_unstructure_hook(cls)
    data = unstructure(event)
    data["type"] = EVENT_TYPES_BY_CLASS[cls]
    return data


def event_from_dict(data: dict[str, Any]) -> AuditEvent:
    data = dict(data)
    cls = EVENT_TYPES[data.pop("type")]
    return converter.structure(data, cls)
