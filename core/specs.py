"""What plugins contribute through the ``bastion_register_*`` hooks.

Decision hooks are synchronous and pure; anything that does I/O — a protocol handler, an identity
provider, an audit sink — is contributed as one of these specs and run by core inside its own
nurseries. Each spec names a ``kind`` (the value used in the configuration) and an attrs class for
the configuration section, so unknown keys are rejected with a path like any other config error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs

if TYPE_CHECKING:  # pragma: no cover
    import trio

    from bastion.core.secrets import Secret, SecretRef
    from bastion.core.session import Session
    from bastion.policies.model import AuthOutcome, Credential


@attrs.frozen
class NoOptions:
    """For protocols and components that take no configuration of their own."""


class ProtocolHandler(Protocol):
    """Serves one client connection of a target. Created once per target."""

    async def serve(self, session: Session, stream: trio.abc.Stream) -> None:
        """Speak the protocol on ``stream`` until the session ends.

        Must call ``session.authenticate``/``session.judge``/``session.record`` at the hook
        points; may raise ``bastion.core.errors.SessionEnded``-style exceptions. Core closes the
        stream forcefully afterwards, whatever happens.
        """


class IdentityProvider(Protocol):
    async def authenticate(self, credential: Credential) -> AuthOutcome:
        """Answer ok (verified identity), unknown (not mine: ask the next) or reject (stop)."""

    async def aclose(self) -> None: ...


class AuditSink(Protocol):
    """Receives audit records in order; ``write`` returns when they are durable in the sink."""

    name: str

    async def open(self) -> None: ...

    async def write(self, records: list[Any]) -> None: ...

    async def aclose(self) -> None: ...


@attrs.frozen
class ComponentContext:
    """What a component factory gets besides its own options section.

    ``resolve_secret`` blocks (it may read a file or ask a vault plugin): call it through
    ``trio.to_thread.run_sync`` from async code, and call it when the secret is needed, not once at
    start-up, so rotation works without a restart.
    """

    name: str
    state_dir: Path
    config_dir: Path
    resolve_secret: Callable[[SecretRef], Secret]


@attrs.frozen
class ProtocolSpec:
    """A protocol plugin: ``name`` is the ``protocol = "…"`` value of a target.

    ``options`` is the attrs class of the protocol's own target keys (e.g. ``database`` for
    PostgreSQL); ``factory(target_config, gateway)`` builds the handler for one target.
    """

    name: str
    factory: Callable[..., ProtocolHandler]
    options: type = NoOptions
    description: str = ""


@attrs.frozen
class IdentityProviderSpec:
    """An identity provider kind: ``[[identity]] kind = "…"``.

    ``factory(options, context)`` gets the structured options and a :class:`ComponentContext`.
    """

    kind: str
    factory: Callable[..., IdentityProvider]
    options: type = NoOptions
    description: str = ""


@attrs.frozen
class SinkSpec:
    """An audit sink kind: ``[[audit.sinks]] kind = "…"``.

    ``factory(options, context)`` gets the structured options and a :class:`ComponentContext`.
    """

    kind: str
    factory: Callable[..., AuditSink]
    options: type = NoOptions
    description: str = ""
