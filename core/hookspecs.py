"""The hooks a Bastion plugin can implement.

Every hook is named ``bastion_*`` and is called by core through the typed facade in
:mod:`bastion.core.hooks`, never through ``pm.hook`` directly. Hooks are grouped by the phase in
which core calls them; the full order of calls for one session is documented on
:class:`bastion.core.session.Session` (its docstring lists every hook call, in order).

Decision hooks (parse, authorize, transform, record) are **synchronous and pure**: they must not
block and must not do I/O, because they run on the gateway's event loop on every statement. A
plugin that needs I/O contributes an object (a protocol handler, an identity provider, an audit
sink) through a ``bastion_register_*`` hook, and core runs it in its own tasks.

Hooks run per gateway, per session, per statement or per result set — never per row or per
packet: where work is per row, a hook returns a compiled plan the protocol applies.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from bastion.core.events import AuditEvent
    from bastion.core.secrets import SecretRef
    from bastion.core.session import SessionInfo
    from bastion.core.specs import IdentityProviderSpec, ProtocolSpec, SinkSpec
    from bastion.policies.model import Decision, Message, Request, ResultShape

PROJECT = "bastion"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -------------------------------------------------------------------------------------------------
# Registration hooks: called once when the gateway (or a CLI command) starts.
# -------------------------------------------------------------------------------------------------


@hookspec
def bastion_register_protocols() -> list[ProtocolSpec]:
    """Contribute protocol handlers (``protocol = "…"`` on a target).

    :return: a list of :class:`~bastion.core.specs.ProtocolSpec`. Every result of every plugin is
        collected; two plugins contributing the same protocol name is a configuration error.
    """


@hookspec
def bastion_register_identity_providers() -> list[IdentityProviderSpec]:
    """Contribute identity provider kinds (``[[identity]] kind = "…"``).

    The *authenticate* phase of a session asks the configured providers in configuration order;
    each answers ok (a verified identity), unknown (ask the next) or reject (stop).

    :return: a list of :class:`~bastion.core.specs.IdentityProviderSpec`; all results collected.
    """


@hookspec
def bastion_register_sinks() -> list[SinkSpec]:
    """Contribute audit sink kinds (``[[audit.sinks]] kind = "…"``).

    :return: a list of :class:`~bastion.core.specs.SinkSpec`; all results collected.
    """


@hookspec
def bastion_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add sub-commands to the ``bastion`` command line.

    :param subparsers: the ``argparse`` sub-parsers object. Add a parser and give it
        ``set_defaults(handler=func)``; ``func(args) -> int`` is called with the parsed arguments
        and returns the exit status.
    """


@hookspec(firstresult=True)
def bastion_resolve_secret(reference: SecretRef) -> str | None:
    """Resolve a secret reference that core does not know (core knows ``env`` and ``file``).

    Called at connect time, not at load time, so a rotated secret is picked up without a
    restart. Core calls this hook in a worker thread, so it may block (e.g. ask a vault).
    Stops at the first non-None result.

    :param reference: the reference, e.g. ``SecretRef(kind="vault", value="db/clinic#password")``.
    :return: the secret's value, or None when this plugin does not handle the reference.
    """


# -------------------------------------------------------------------------------------------------
# Session hooks: called for each statement-bearing message and each result set.
# -------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def bastion_parse(session: SessionInfo, message: Message) -> list[Request] | None:
    """Say what is being asked: turn a protocol message into protocol-neutral requests.

    :param session: the session's identity, target and per-target / per-session plugin state.
    :param message: what the protocol handler saw (e.g. SQL text with its dialect).
    :return: one :class:`~bastion.policies.model.Request` per statement in the message, or None
        when this plugin does not understand the message. Stops at the first non-None result.
        When no plugin answers, core builds an ``unknown`` request, which policies deny.
    """


@hookspec
def bastion_authorize(session: SessionInfo, request: Request) -> Decision | None:
    """Decide a request: allow, review or deny, with rule ids and reasons.

    Every plugin's answer is collected and combined: deny overrides review overrides allow, and
    when no plugin allows, the request is denied (default deny). An exception raised here denies
    the request and is recorded.

    :param session: the session (identity, target, policy set).
    :param request: the parsed request.
    :return: a :class:`~bastion.policies.model.Decision`, or None to abstain.
    """


@hookspec
def bastion_transform(session: SessionInfo, request: Request | None, shape: ResultShape) -> Any:
    """Compile how a result set is rewritten before it reaches the caller (e.g. masking).

    Called once per result set (a RowDescription, a COPY header), not per row.

    :param session: the session.
    :param request: the request that produced the result (None when it is not known, e.g. a
        result of a portal created before the gateway saw it).
    :param shape: the result's columns, with what the analysis knows of their sources.
    :return: a row plan (an object with ``apply(cells)``, ``mask_copy_line(line, fmt)``,
        ``counts()`` and ``deny_reason``), or None when nothing needs doing. All non-None plans are
        applied in plugin order.
    """


@hookspec
def bastion_text_transform(session: SessionInfo, text: str) -> str | None:
    """Rewrite free text that echoes data back to the caller (error details, notices).

    :param session: the session.
    :param text: the text as the server sent it (e.g. an error's DETAIL field).
    :return: the rewritten text, or None to leave it unchanged. Results are applied in turn.
    """


@hookspec
def bastion_record(event: AuditEvent) -> None:
    """Observe every audit event as it is recorded (e.g. for metrics or alerting).

    Called after the event is queued to the audit trail. Must be quick and must not raise;
    an exception is logged and ignored, since the record itself is already kept.

    :param event: the recorded event (see :mod:`bastion.core.events`); ``event.type`` names it.
    """
