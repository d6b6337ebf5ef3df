"""``protocol = "tcp"``: an audited pass-through.

No parsing: Bastion records the connection (who, from where, to which target), relays bytes both
ways, and records the disconnect with the byte counts. With ``authentication = "mtls"`` (which
needs ``tls.client_ca`` on the listener) the caller's verified client certificate is its identity,
through the identity providers (e.g. ``kind = "mtls"``); otherwise the caller is ``anonymous`` and
needs a grant that names it. The connection to the upstream is TLS when the target has an
``upstream_tls`` section (verified against its ``ca``, or the system's, by default).
"""

from __future__ import annotations

import attrs
import trio

from bastion.core.errors import AuthenticationFailed
from bastion.core.hookspecs import hookimpl
from bastion.core.specs import ProtocolSpec
from bastion.policies.model import Credential

# one read from either side; also the most a slow peer can make us hold per direction
RELAY_CHUNK = 64 * 1024


@attrs.frozen
class TCPOptions:
    """``authentication``: ``"mtls"`` (a verified client certificate is required) or ``"none"``."""

    authentication: str = attrs.field(default="none", validator=attrs.validators.in_(("none", "mtls")))


class TCPHandler:
    def __init__(self, target, runtime) -> None:
        self.options: TCPOptions = target.options
        if self.options.authentication == "mtls" and (target.tls is None or target.tls.client_ca is None):
            raise ValueError(f"target {target.name}: authentication = \"mtls\" needs tls.client_ca")

    async def serve(self, session, stream: trio.abc.Stream) -> None:
        credential = Credential()
        if session.target.server_ssl_context is not None:
            stream = await session.start_tls(stream)
            peer = stream.getpeercert(binary_form=True)
            if peer:
                credential = Credential(peer_certificate=peer)
        if self.options.authentication == "mtls":
            if credential.peer_certificate is None:
                raise AuthenticationFailed("no client certificate presented")
            await session.authenticate(credential)
        else:
            await session.accept_anonymous()
        upstream = await session.connect_upstream(implicit_tls=session.config.upstream_tls is not None)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_relay, stream, upstream, session, "from_client", nursery.cancel_scope)
                nursery.start_soon(_relay, upstream, stream, session, "to_client", nursery.cancel_scope)
        finally:
            await trio.aclose_forcefully(upstream)


async def _relay(source, sink, session, direction: str, scope: trio.CancelScope) -> None:
    """Copy one direction; the end of either direction ends the session."""
    try:
        while True:
            data = await source.receive_some(RELAY_CHUNK)
            if not data:
                break
            await sink.send_all(data)
            if direction == "from_client":
                session.bytes_from_client += len(data)
            else:
                session.bytes_to_client += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        if session.end_reason is None:
            session.end_reason = "client disconnected" if direction == "from_client" else "upstream closed"
        scope.cancel()


@hookimpl
def bastion_register_protocols():
    return [
        ProtocolSpec(
            name="tcp",
            factory=TCPHandler,
            options=TCPOptions,
            description="audited TCP pass-through (connect, bytes, disconnect)",
        )
    ]
