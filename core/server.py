"""The gateway: listeners, one task per connection, clean shutdown.

Structure (trio nurseries, outermost first)::

    root        audit trail writer, identity providers' background work
      sessions  one task per client connection, each in its own cancel scope
        accept  one accept loop per target listener, the admin listener, the signal watcher

Shutdown (SIGTERM/SIGINT or :meth:`Gateway.shutdown`) cancels the accept nursery first, so no new
connection is taken, gives open sessions ``gateway.shutdown_grace`` seconds to end, cancels the
rest (each says goodbye in its protocol's words), records the stop, and flushes the audit trail.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bastion.core import events
from bastion.core.admin import AdminApp
from bastion.core.config import Address, Config, ListenerTLS, TargetConfig, UpstreamTLS
from bastion.core.errors import (
    AuthenticationFailed,
    ConnectDenied,
    GatewayError,
    SessionError,
    UpstreamUnavailable,
)
from bastion.core.hooks import Hooks
from bastion.core.http import serve_http
from bastion.core.metrics import Metrics
from bastion.core.secrets import Secret, SecretRef, resolve
from bastion.core.session import Session
from bastion.core.specs import ComponentContext, ProtocolHandler
from bastion.policies.model import Decision, Request

log = logging.getLogger("bastion.server")

VERSION = "0.1.0"
# a listen backlog big enough for a CI fleet connecting at once
LISTEN_BACKLOG = 1024
# how long the session's goodbye and final record may take once it is being torn down
CLEANUP_DEADLINE = 5.0
# transient accept() failures: wait, then keep serving (trio's serve_listeners does the same)
ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY_DELAY = 0.1


class TargetRuntime:
    """What a target needs while serving: its handler, TLS contexts, and plugins' shared state."""

    def __init__(self, config: TargetConfig, handler: ProtocolHandler) -> None:
        self.config = config
        self.handler = handler
        self.state: dict[str, Any] = {}
        self.server_ssl_context = server_ssl_context(config.tls) if config.tls else None
        self.upstream_ssl_context = upstream_ssl_context(config.upstream_tls) if config.upstream_tls else None
        self.listen_address: Address | None = None


class Runtime:
    """Gateway-wide services a session uses. Built once by :class:`Gateway`."""

    def __init__(self, config: Config, hooks: Hooks, policy: Any, trail: Any, metrics: Metrics) -> None:
        self.config = config
        self.hooks = hooks
        self.policy = policy
        self.trail = trail
        self.metrics = metrics
        self.identity_providers: list[tuple[str, Any]] = []
        self.sessions: dict[str, Session] = {}
        self.accepting = False
        self.approvals: Any = None
        # Gateway-wide background work that must outlive the session that started it (a target's
        # catalog refresh, say). Set while the gateway runs; None in a bare Runtime.
        self.background: trio.Nursery | None = None

    def active_sessions(self) -> int:
        return len(self.sessions)

    def resolve_secret(self, reference: SecretRef) -> Secret:
        return resolve(reference, self.hooks.resolve_secret)

    async def record(self, event: events.AuditEvent, *, durable: bool = False) -> None:
        await self.trail.record(event, durable=durable)
        self.metrics.count_record(event.type)
        self.hooks.record(event)

    async def review(self, session: Session, request_no: int, requests: Sequence[Request], decision: Decision) -> Decision:
        """Hold a statement for a human. Without an approval service, review means no."""
        if self.approvals is None:
            return _no_reviewer(decision)
        return await self.approvals.hold(session, request_no, requests, decision)

    async def review_rows(self, session: Session, judgement: Any, rows_sent: int) -> Decision:
        """Hold a result at its row threshold for a human."""
        if self.approvals is None:
            return _no_reviewer(judgement.decision)
        return await self.approvals.hold_rows(session, judgement, rows_sent)


def _no_reviewer(decision: Decision) -> Decision:
    return Decision.deny(
        ",".join(decision.rules) or "review",
        "this needs a reviewer's approval and no approval service is running",
        decision.policy_version,
    )


def component_context(config: Config, runtime_resolve, name: str) -> ComponentContext:
    return ComponentContext(
        name=name,
        state_dir=config.gateway.state_dir,
        config_dir=config.source.parent if config.source else Path.cwd(),
        resolve_secret=runtime_resolve,
    )


class Gateway:
    """Serve every configured target until shut down.

    ``policy`` is the loaded policy set (see :func:`bastion.core.loading.load_policy`); ``trail`` an
    :class:`~bastion.core.audit.AuditTrail`. Tests and custom gateways use port 0 and read the bound
    addresses from :attr:`addresses` once ``await nursery.start(gateway.run)`` returns.
    """

    def __init__(self, config: Config, hooks: Hooks, *, policy: Any = None, trail: Any = None, worker_index: int | None = None) -> None:
        self.config = config
        self.hooks = hooks
        self.metrics = Metrics()
        self.runtime = Runtime(config, hooks, policy, trail, self.metrics)
        if trail is None:
            from bastion.core.audit import AuditTrail, build_sinks

            self.runtime.trail = AuditTrail(
                config.audit,
                config.gateway.state_dir,
                sinks=build_sinks(config, hooks, self.runtime.resolve_secret),
                resolve_secret=self.runtime.resolve_secret,
                slot=f"worker-{worker_index}" if worker_index is not None else "main",
            )
        # --- approvals: holds statements a policy sends for review (bastion.core.approvals) ---
        from bastion.core.approvals import ApprovalService

        self.runtime.approvals = ApprovalService.for_gateway(config, self.runtime)
        # --- end approvals ---
        self.targets: dict[str, TargetRuntime] = {}
        self.addresses: dict[str, Address] = {}
        self.admin_address: Address | None = None
        self.stop_reason = "stopped"
        self._accept_scope: trio.CancelScope | None = None
        self._stopping = False

    # --- lifecycle ---------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED, handle_signals: bool = False, reuse_port: bool = False) -> None:
        if not handle_signals:
            await self._run(task_status, None, reuse_port)
            return
        # installed before anything else, so a SIGTERM during start-up is a clean stop too
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await self._run(task_status, signals, reuse_port)

    async def _run(self, task_status, signals, reuse_port: bool) -> None:
        config = self.config
        protocols = self.hooks.protocols()
        hash_key = await trio.to_thread.run_sync(self._hash_key)
        for target in config.targets:
            spec = protocols[target.protocol]
            self.targets[target.name] = TargetRuntime(target, spec.factory(target, self.runtime))
            self.targets[target.name].state["gateway.hash_key"] = hash_key
        listeners = self._bind_all(reuse_port)
        admin_listener = self._bind_admin(reuse_port)
        runtime = self.runtime
        try:
            # --- approvals: open the store before serving (an unusable SQLite file stops the start) ---
            if runtime.approvals is not None:
                runtime.approvals.admin_url = f"http://{self.admin_address}" if self.admin_address is not None else None
                await runtime.approvals.open()
            # --- end approvals ---
            async with trio.open_nursery() as root:
                runtime.background = root
                await root.start(runtime.trail.run)
                await self._start_identity_providers()
                if runtime.approvals is not None:  # approvals: watch, sweep, webhooks
                    await root.start(runtime.approvals.run)
                async with trio.open_nursery() as sessions:
                    with trio.CancelScope() as accepting:
                        self._accept_scope = accepting
                        runtime.accepting = True
                        async with trio.open_nursery() as accept:
                            for target_runtime, listener in listeners:
                                accept.start_soon(self._accept_loop, listener, target_runtime, sessions)
                            if admin_listener is not None:
                                accept.start_soon(self._serve_admin, admin_listener)
                            if signals is not None:
                                root.start_soon(self._watch_signals, signals)
                            await runtime.record(
                                events.GatewayStarted(
                                    version=VERSION,
                                    targets=tuple(t.name for t in config.targets),
                                    policy_version=getattr(runtime.policy, "version", ""),
                                    pid=os.getpid(),
                                ),
                                durable=True,
                            )
                            log.info("serving %s", ", ".join(f"{n} on {a}" for n, a in self.addresses.items()))
                            task_status.started(self)
                            if self._stopping:
                                accepting.cancel()
                    runtime.accepting = False
                    for _, listener in listeners:
                        await trio.aclose_forcefully(listener)
                    if admin_listener is not None:
                        await trio.aclose_forcefully(admin_listener)
                    open_sessions = len(runtime.sessions)
                    if open_sessions:
                        log.info("waiting up to %ss for %d open sessions", config.gateway.shutdown_grace, open_sessions)
                    sessions.cancel_scope.deadline = trio.current_time() + config.gateway.shutdown_grace
                with trio.move_on_after(CLEANUP_DEADLINE) as cleanup:
                    cleanup.shield = True
                    await runtime.record(events.GatewayStopped(reason=self.stop_reason, sessions_interrupted=0), durable=True)
                    await self._close_identity_providers()
                    await runtime.trail.aclose()
                root.cancel_scope.cancel()
        finally:
            for _, listener in listeners:
                listener.socket.close()
            if admin_listener is not None:
                admin_listener.socket.close()

    def _hash_key(self) -> bytes:
        """The key of keyed-hash masking: configured, or generated once into the state directory
        so pseudonyms stay the same across restarts and workers."""
        if self.config.gateway.hash_key is not None:
            return self.runtime.resolve_secret(self.config.gateway.hash_key).reveal().encode()
        return load_or_create_key(self.config.gateway.state_dir / "masking.key")

    def shutdown(self, reason: str = "shutdown requested") -> None:
        """Stop accepting; open sessions get ``gateway.shutdown_grace`` to finish."""
        self._stopping = True
        self.stop_reason = reason
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    async def _watch_signals(self, signals) -> None:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            self.shutdown(f"signal {signal.Signals(signum).name}")
            return

    # --- listeners ---------------------------------------------------------------------------------

    def _bind_all(self, reuse_port: bool) -> list[tuple[TargetRuntime, trio.SocketListener]]:
        bound = []
        try:
            for index, target in enumerate(self.config.targets):
                listener = bind_listener(target.listen, reuse_port, f"targets[{index}].listen ({target.name})")
                runtime = self.targets[target.name]
                runtime.listen_address = Address(target.listen.host, listener.socket.getsockname()[1])
                self.addresses[target.name] = runtime.listen_address
                bound.append((runtime, listener))
        except BaseException:
            for _, listener in bound:
                listener.socket.close()
            raise
        return bound

    def _bind_admin(self, reuse_port: bool) -> trio.SocketListener | None:
        address = self.config.gateway.admin_listen
        if address is None:
            return None
        listener = bind_listener(address, reuse_port, "gateway.admin_listen")
        self.admin_address = Address(address.host, listener.socket.getsockname()[1])
        return listener

    async def _accept_loop(self, listener: trio.SocketListener, target: TargetRuntime, sessions: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_RETRY_ERRNOS:
                    raise
                self.metrics.accept_errors.labels(target.config.name).inc()
                log.error("accept failed on %s: %s; retrying", target.config.name, exc.strerror)
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            if len(self.runtime.sessions) >= self.config.gateway.max_sessions:
                log.warning("refusing a connection to %s: gateway.max_sessions reached", target.config.name)
                await trio.aclose_forcefully(stream)
                continue
            sessions.start_soon(self._run_session, target, stream)

    async def _serve_admin(self, listener: trio.SocketListener) -> None:
        app = AdminApp(self.runtime)
        self.admin_app = app
        if self.runtime.approvals is not None and hasattr(self.runtime.approvals, "add_routes"):
            self.runtime.approvals.add_routes(app)

        async def handle(stream: trio.SocketStream) -> None:
            try:
                await serve_http(stream, app, _peer(stream))
            finally:
                await trio.aclose_forcefully(stream)

        await trio.serve_listeners(handle, [listener])

    # --- sessions ----------------------------------------------------------------------------------

    async def _run_session(self, target: TargetRuntime, stream: trio.abc.Stream) -> None:
        runtime = self.runtime
        name = target.config.name
        client = _peer(stream)
        session = Session(runtime, target, client)
        runtime.sessions[session.id] = session
        self.metrics.connections.labels(name).inc()
        self.metrics.sessions_active.labels(name).inc()
        reason, error = "client disconnected", ""
        say_goodbye = False
        try:
            await runtime.record(
                events.ConnectionOpened(
                    session_id=session.id,
                    target=name,
                    protocol=target.config.protocol,
                    client=client,
                    listen=str(target.listen_address),
                )
            )
            with trio.CancelScope() as scope:
                session.cancel_scope = scope
                await target.handler.serve(session, stream)
            if scope.cancelled_caught:
                say_goodbye = True
                if session.identity is not None and getattr(session, "expires_deadline", None) is not None and trio.current_time() >= session.expires_deadline:
                    session.expired = True
                    reason = "credential expired"
                else:
                    reason = "gateway shutdown"
            elif session.end_reason:
                reason = session.end_reason
        except trio.Cancelled:
            reason, say_goodbye = "gateway shutdown", True
            raise
        except BaseException as exc:  # noqa: BLE001 - classify, record, and keep serving others
            reason, error = _classify(exc, session.id)
        finally:
            with trio.move_on_after(CLEANUP_DEADLINE) as cleanup:
                cleanup.shield = True
                if say_goodbye and session.farewell is not None:
                    try:
                        await session.farewell(reason)
                    except Exception:
                        pass
                try:
                    await session.finish(reason, error)
                except Exception:
                    log.exception("could not record the end of session %s", session.id)
                await trio.aclose_forcefully(stream)
            runtime.sessions.pop(session.id, None)
            self.metrics.sessions_active.labels(name).dec()
            self.metrics.bytes.labels(name, "from_client").inc(session.bytes_from_client)
            self.metrics.bytes.labels(name, "to_client").inc(session.bytes_to_client)

    # --- components --------------------------------------------------------------------------------

    async def _start_identity_providers(self) -> None:
        specs = self.hooks.identity_providers()
        for section in self.config.identity:
            context = component_context(self.config, self.runtime.resolve_secret, section.name)
            provider = specs[section.kind].factory(section.options, context)
            self.runtime.identity_providers.append((section.name, provider))

    async def _close_identity_providers(self) -> None:
        for name, provider in self.runtime.identity_providers:
            try:
                await provider.aclose()
            except Exception:
                log.exception("identity provider %s failed to close", name)


HASH_KEY_BYTES = 32


def load_or_create_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(HASH_KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another worker won the race: use its key
        return path.read_bytes()
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())
    return key


def _classify(exc: BaseException, session_id: str) -> tuple[str, str]:
    """The reason a session ended, from what its handler raised (possibly in a group)."""
    leaf = _first_leaf(exc)
    if isinstance(leaf, AuthenticationFailed):
        return "authentication failed", leaf.reason
    if isinstance(leaf, ConnectDenied):
        return "connection denied", leaf.decision.summary
    if isinstance(leaf, UpstreamUnavailable):
        return "upstream unavailable", leaf.reason
    if isinstance(leaf, SessionError):
        return leaf.reason, ""
    if isinstance(leaf, ssl.SSLError) or isinstance(leaf.__cause__, ssl.SSLError):
        cause = leaf if isinstance(leaf, ssl.SSLError) else leaf.__cause__
        return "tls handshake failed", cause.reason or type(cause).__name__
    if isinstance(leaf, (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)):
        return "connection lost", type(leaf).__name__
    if isinstance(leaf, trio.TooSlowError):
        return "timed out", ""
    log.error("session %s failed", session_id, exc_info=exc)
    return "internal error", type(leaf).__name__


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        candidates = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (candidates or exc.exceptions)[0]
    return exc


def _peer(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        host, port, *_ = sock.getpeername()
    except (AttributeError, OSError, ValueError):
        return "unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listener(address: Address, reuse_port: bool, where: str) -> trio.SocketListener:
    """Bind synchronously so a port in use is a clear start-up error, not a crashed task."""
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    except socket.gaierror as exc:
        raise GatewayError(f"{where}: cannot resolve {address.host!r}: {exc.strerror}") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise GatewayError(f"{where}: cannot listen on {address}: {(exc.strerror or str(exc)).lower()}") from None
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_ssl_context(tls: ListenerTLS) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _TLS_VERSIONS.get(tls.min_version, ssl.TLSVersion.TLSv1_2)
    try:
        context.load_cert_chain(tls.cert, tls.key)
        if tls.client_ca is not None:
            context.load_verify_locations(cafile=tls.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise GatewayError(f"cannot load the listener's TLS certificate or key: {exc}") from None
    return context


def upstream_ssl_context(tls: UpstreamTLS) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=tls.ca) if tls.ca else ssl.create_default_context()
        if not tls.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if tls.cert is not None:
            context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise GatewayError(f"cannot set up TLS to the upstream: {exc}") from None
    return context


