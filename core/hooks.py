"""The typed facade core calls hooks through. Nothing else in core touches ``pm.hook``.

Each method says what failure means, so that every call site fails closed the same way: an
exception in a decision hook becomes a deny, never a silent allow.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pluggy

from bastion.core.config import Registry
from bastion.core.specs import IdentityProviderSpec, ProtocolSpec, SinkSpec
from bastion.policies.model import Decision, Message, Request, ResultShape

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    from bastion.core.events import AuditEvent
    from bastion.core.secrets import SecretRef
    from bastion.core.session import SessionInfo

log = logging.getLogger("bastion.hooks")


class HookError(Exception):
    pass


class Hooks:
    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._hook = pm.hook
        self._protocols: dict[str, ProtocolSpec] | None = None
        self._identity: dict[str, IdentityProviderSpec] | None = None
        self._sinks: dict[str, SinkSpec] | None = None

    # --- registration ---------------------------------------------------------------------------

    def protocols(self) -> dict[str, ProtocolSpec]:
        if self._protocols is None:
            self._protocols = _by_key(self._hook.bastion_register_protocols(), "name", "protocol")
        return self._protocols

    def identity_providers(self) -> dict[str, IdentityProviderSpec]:
        if self._identity is None:
            self._identity = _by_key(self._hook.bastion_register_identity_providers(), "kind", "identity provider")
        return self._identity

    def sinks(self) -> dict[str, SinkSpec]:
        if self._sinks is None:
            self._sinks = _by_key(self._hook.bastion_register_sinks(), "kind", "audit sink")
        return self._sinks

    def registry(self) -> Registry:
        return Registry(
            protocols={name: spec.options for name, spec in self.protocols().items()},
            identity={kind: spec.options for kind, spec in self.identity_providers().items()},
            sinks={kind: spec.options for kind, spec in self.sinks().items()},
        )

    def add_commands(self, subparsers: argparse._SubParsersAction) -> None:
        self._hook.bastion_add_commands(subparsers=subparsers)

    def resolve_secret(self, reference: SecretRef) -> str | None:
        return self._hook.bastion_resolve_secret(reference=reference)

    # --- per session / statement / result set -----------------------------------------------------

    def parse(self, session: SessionInfo, message: Message) -> list[Request]:
        """Never raises: a parser that fails or a message nobody understands is ``unknown``."""
        try:
            requests = self._hook.bastion_parse(session=session, message=message)
        except Exception as exc:
            log.exception("parse hook failed on session %s", session.id)
            return [Request.unknown(message, f"the parser failed ({type(exc).__name__})")]
        if not requests:
            return [Request.unknown(message, f"no plugin understands this {message.protocol} {message.kind}")]
        return list(requests)

    def authorize(self, session: SessionInfo, request: Request) -> Decision:
        """The combined decision. Never raises: a failing policy denies (fail closed)."""
        try:
            decisions = [d for d in self._hook.bastion_authorize(session=session, request=request) if d is not None]
        except Exception as exc:
            log.exception("authorize hook failed on session %s", session.id)
            return Decision.deny("policy-error", f"policy evaluation failed ({type(exc).__name__}); denied to be safe")
        return Decision.combine(decisions)

    def transform(self, session: SessionInfo, request: Request | None, shape: ResultShape) -> list[Any]:
        """Row plans for a result. Raises HookError: the caller must refuse the result."""
        try:
            return [plan for plan in self._hook.bastion_transform(session=session, request=request, shape=shape) if plan is not None]
        except Exception as exc:
            log.exception("transform hook failed on session %s", session.id)
            raise HookError(f"cannot prepare the result ({type(exc).__name__})") from exc

    def text_transform(self, session: SessionInfo, text: str) -> str:
        """Rewrite echoed free text. Raises HookError: the caller must withhold the text."""
        try:
            for result in self._hook.bastion_text_transform(session=session, text=text):
                if result is not None:
                    text = result
        except Exception as exc:
            log.exception("text transform hook failed on session %s", session.id)
            raise HookError("cannot mask the message") from exc
        return text

    def has_text_transforms(self) -> bool:
        return bool(self._hook.bastion_text_transform.get_hookimpls())

    def record(self, event: AuditEvent) -> None:
        try:
            self._hook.bastion_record(event=event)
        except Exception:
            log.exception("a record hook failed (the event is kept)")


def _by_key(results: list[list[Any]], key: str, what: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for specs in results:
        for spec in specs or ():
            name = getattr(spec, key)
            if name in found:
                raise HookError(f"two plugins register the {what} {name!r}")
            found[name] = spec
    return found
