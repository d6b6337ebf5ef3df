"""The typed facade core calls hooks through. Nothing else in core touches ``pm.hook``.

Each method says what failure means, so that every call site fails closed the same way: an
exception in a decision hook becomes a deny, never a silent allow.

The per-statement hooks (parse, authorize, transform, text transform, record) run several times
for every statement, so they go through :class:`_Direct`, which calls the implementations in
pluggy's order with pluggy's result rules but without its general machinery, whenever that is the
same thing (see there); otherwise they go through pluggy.
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


# pluggy's own executor, as every manager starts with it; tracing and call monitoring replace it
_PLUGGY_EXECUTE = getattr(pluggy.PluginManager("bastion-probe"), "_inner_hookexec", object())


class _Direct:
    """One hook, called the way pluggy's executor calls it, minus what only wrappers need.

    pluggy calls implementations last registered first (``tryfirst``/``trylast`` already sorted
    into its list), passes each the arguments it names, collects the non-None results (stops at
    the first one for a ``firstresult`` hook) and lets an exception propagate unchanged. That is
    all this does, for the call order pluggy's list has at the time of the call: the list is
    compared with the one last resolved on every call (a few identity comparisons), so a plugin
    registered or unregistered takes effect at once.

    It steps aside (the call goes through pluggy) whenever it would not be the same thing: an
    implementation that is a wrapper, has defaulted arguments or names an argument the spec does
    not have, or a manager whose executor was replaced (``enable_tracing``,
    ``add_hookcall_monitoring``).
    """

    __slots__ = ("_pm", "_caller", "_names", "_seen", "_calls")

    def __init__(self, pm: pluggy.PluginManager, name: str, argnames: tuple[str, ...]) -> None:
        self._pm = pm
        self._caller = getattr(pm.hook, name)
        self._names = argnames  # the spec's, in order: how core passes the arguments
        self._seen: list[Any] | None = None
        self._calls: tuple[tuple[Any, tuple[int, ...] | None], ...] | None = None

    def _plan(self) -> tuple[tuple[Any, tuple[int, ...] | None], ...] | None:
        """(function, positions of its arguments or None for all) in call order; None: use pluggy."""
        if getattr(self._pm, "_inner_hookexec", None) is not _PLUGGY_EXECUTE:
            return None
        impls = getattr(self._caller, "_hookimpls", None)
        if impls is None:  # a pluggy that keeps them elsewhere: let it call them
            return None
        if impls != self._seen:  # list equality: the same implementation objects, in order
            self._seen = list(impls)
            self._calls = self._resolve(self._seen)
        return self._calls

    def _resolve(self, impls: list[Any]) -> tuple[tuple[Any, tuple[int, ...] | None], ...] | None:
        names = self._names
        everything = tuple(range(len(names)))
        calls = []
        for impl in reversed(impls):
            if getattr(impl, "wrapper", True) or getattr(impl, "hookwrapper", True) or impl.kwargnames:
                return None
            if not set(impl.argnames) <= set(names):
                return None
            positions = tuple(names.index(argname) for argname in impl.argnames)
            calls.append((impl.function, None if positions == everything else positions))
        return tuple(calls)

    def first(self, *args: Any) -> Any:
        """A ``firstresult`` hook: the first non-None result, or None."""
        calls = self._plan()
        if calls is None:
            return self._caller(**dict(zip(self._names, args, strict=True)))
        for function, positions in calls:
            result = function(*args) if positions is None else function(*[args[i] for i in positions])
            if result is not None:
                return result
        return None

    def all(self, *args: Any) -> list[Any]:
        """Every non-None result, in call order."""
        calls = self._plan()
        if calls is None:
            return self._caller(**dict(zip(self._names, args, strict=True)))
        results = []
        for function, positions in calls:
            result = function(*args) if positions is None else function(*[args[i] for i in positions])
            if result is not None:
                results.append(result)
        return results

    def has_implementations(self) -> bool:
        return bool(self._caller.get_hookimpls())


class Hooks:
    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._hook = pm.hook
        self._parse = _Direct(pm, "bastion_parse", ("session", "message"))
        self._authorize = _Direct(pm, "bastion_authorize", ("session", "request"))
        self._transform = _Direct(pm, "bastion_transform", ("session", "request", "shape"))
        self._text_transform = _Direct(pm, "bastion_text_transform", ("session", "text"))
        self._record = _Direct(pm, "bastion_record", ("event",))
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
            requests = self._parse.first(session, message)
        except Exception as exc:
            log.exception("parse hook failed on session %s", session.id)
            return [Request.unknown(message, f"the parser failed ({type(exc).__name__})")]
        if not requests:
            return [Request.unknown(message, f"no plugin understands this {message.protocol} {message.kind}")]
        return list(requests)

    def authorize(self, session: SessionInfo, request: Request) -> Decision:
        """The combined decision. Never raises: a failing policy denies (fail closed)."""
        try:
            decisions = self._authorize.all(session, request)
        except Exception as exc:
            log.exception("authorize hook failed on session %s", session.id)
            return Decision.deny("policy-error", f"policy evaluation failed ({type(exc).__name__}); denied to be safe")
        return Decision.combine(decisions)

    def transform(self, session: SessionInfo, request: Request | None, shape: ResultShape) -> list[Any]:
        """Row plans for a result. Raises HookError: the caller must refuse the result."""
        try:
            return self._transform.all(session, request, shape)
        except Exception as exc:
            log.exception("transform hook failed on session %s", session.id)
            raise HookError(f"cannot prepare the result ({type(exc).__name__})") from exc

    def text_transform(self, session: SessionInfo, text: str) -> str:
        """Rewrite echoed free text. Raises HookError: the caller must withhold the text."""
        try:
            for result in self._text_transform.all(session, text):
                if result is not None:
                    text = result
        except Exception as exc:
            log.exception("text transform hook failed on session %s", session.id)
            raise HookError("cannot mask the message") from exc
        return text

    def has_text_transforms(self) -> bool:
        return self._text_transform.has_implementations()

    def record(self, event: AuditEvent) -> None:
        try:
            self._record.all(event)
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
