"""Audit events: frozen values, one class per thing that happens.

Events hold no raw PHI and no secret: statements are recorded with literals masked, parameters
and result rows masked, and identities without their tokens. The audit trail encodes them with
msgpack (see :mod:`bastion.core.audit`), adding a sequence number and a hash chain.
"""

from __future__ import annotations

import time
import types
import typing
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


# --- the audit trail's fast path: an event's fields as msgpack-ready values --------------------

# Value types msgpack packs exactly as cattrs unstructures them (the value itself); a tuple of
# them packs as the array cattrs' list would. Anything else goes through the converter.
_MSGPACK_NATIVE = (str, int, float, bool, bytes, type(None))
# Each event class's generated field-map builder (see _fields_function)
_FIELDS_BY_CLASS: dict[type, Callable[[Any], dict[str, Any]]] = {}


def _is_msgpack_native(type_: Any) -> bool:
    """Whether values of ``type_`` pack to the same msgpack as their cattrs unstructuring."""
    if type_ in _MSGPACK_NATIVE:
        return True
    origin, arguments = typing.get_origin(type_), typing.get_args(type_)
    if origin in (typing.Union, types.UnionType):
        return all(_is_msgpack_native(option) for option in arguments)
    if origin is tuple:
        return len(arguments) == 2 and arguments[1] is Ellipsis and _is_msgpack_native(arguments[0])
    if origin is dict:
        return len(arguments) == 2 and arguments[0] is str and _is_msgpack_native(arguments[1])
    return False


def _fields_function(cls: type) -> Callable[[Any], dict[str, Any]]:
    """A function building ``cls``'s field map in one dict display (no converter dispatch for
    fields of msgpack-native types, the converter's hook for the others)."""
    hints = typing.get_type_hints(cls)
    namespace: dict[str, Any] = {}
    items = []
    for field in attrs.fields(cls):
        value = f"event.{field.name}"
        type_ = hints[field.name]
        if not _is_msgpack_native(type_):
            namespace[f"hook_{field.name}"] = converter.get_unstructure_hook(type_)
            # an empty tuple packs as the empty list the hook would build, without the call
            value = f"({value} if {value} == () else hook_{field.name}({value}))" if typing.get_origin(type_) is tuple else f"hook_{field.name}({value})"
        items.append(f"{field.name!r}: {value}")
    source = f"def fields(event):\n    return {{{', '.join(items)}}}\n"
    exec(compile(source, f"<audit event fields {cls.__name__}>", "exec"), namespace)
    return namespace["fields"]


def event_fields(event: AuditEvent) -> dict[str, Any]:
    """The event's fields (no ``type``) as values msgpack packs to exactly the bytes of
    :func:`event_to_dict`'s map without its ``type`` key: tuples are left as tuples (msgpack
    writes both as arrays). For the audit writer, which packs and drops the map at once; not for
    JSON or comparisons with unstructured data (use :func:`event_to_dict`)."""
    cls = type(event)
    fields = _FIELDS_BY_CLASS.get(cls)
    if fields is None:
        fields = _FIELDS_BY_CLASS[cls] = _fields_function(cls)
    return fields(event)
