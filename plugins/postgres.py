"""``protocol = "postgres"``: a PostgreSQL (protocol 3.0) gateway that callers cannot tell from the server.

Callers keep their own tools — psql, libpq, psycopg, asyncpg, JDBC, pgbench — and point them at the
target's listener. The caller's *token* is its password (over TLS, unless the target allows
plaintext on loopback); the user name it sends is recorded and grants nothing. Bastion logs in
upstream with the target's own credentials, which the caller never sees.

Target options (the keys of a ``[[targets]]`` section with ``protocol = "postgres"``)::

    database = "clinic"                # the database callers may ask for ...
    databases = ["clinic", "staging"]  # ... or several (at least one of the two)
    allow_startup_options = false      # forward the `options` and `replication` startup
                                       # parameters (else a grant must allow each; see below)
    startup_parameters = []            # further GUCs callers may set at startup
    catalog_refresh = "5m"             # re-read the upstream's schema this often (0: only on DDL)
    write_batch_bytes = 65536          # gather writes up to this size before sending
    max_message_bytes = 67108864       # the largest message a caller may send (64 MiB)

Startup parameters: ``application_name``, ``client_encoding``, ``DateStyle``, ``TimeZone``,
``IntervalStyle``, ``extra_float_digits``, ``search_path``, ``statement_timeout``,
``lock_timeout``, ``idle_in_transaction_session_timeout``, ``default_transaction_isolation``,
``default_transaction_read_only`` and ``bytea_output`` are passed on (plus any named in
``startup_parameters``). Any other is refused with FATAL 42501 (it could set ``role``), except
``options`` and ``replication``: with ``allow_startup_options`` they are passed on, otherwise
each is judged as a ``Message(protocol="postgres", kind="startup-options", text="name=value",
args=(name, value))`` whose request has the action ``startup-options`` (or ``replication``),
and passed on only if a grant with that capability allows it. Only UTF8 and SQL_ASCII client
encodings are relayed (statements are read as UTF-8).

How statements, results, refusals and cancels are handled: see :mod:`bastion.plugins.postgres_relay`
and :mod:`bastion.plugins.postgres_login`; the schema Bastion reads from the upstream:
:mod:`bastion.plugins.postgres_catalog`.
"""

from __future__ import annotations

import ssl

import attrs
import trio

from bastion.core.config import Duration
from bastion.core.errors import AuthenticationFailed, ConnectDenied, SessionError, UpstreamUnavailable
from bastion.core.hookspecs import hookimpl
from bastion.core.specs import ProtocolSpec
from bastion.plugins import postgres_catalog as catalog
from bastion.plugins import postgres_login as login
from bastion.plugins.postgres_relay import SUPPORTED_ENCODINGS, Relay, authorize_requests, encoding_key
from bastion.policies.model import Credential, Message, Request
from bastion.protocols.postgres import codec
from bastion.protocols.postgres.errors import PROGRAM_LIMIT_EXCEEDED, ProtocolError
from bastion.protocols.postgres.framing import DEFAULT_MAX_BACKEND_MESSAGE_LENGTH, END_OF_STREAM, FrontendDecoder
from bastion.protocols.postgres.messages import (
    AuthenticationOk,
    BackendKeyData,
    CancelRequest,
    ErrorResponse,
    ParameterStatus,
    Query,
    ReadyForQuery,
    StartupMessage,
)

# Startup parameters passed upstream as the caller gave them: what libpq, psycopg, asyncpg and
# JDBC send, and session settings that change formatting or limits but not privileges. The set is
# closed because a startup parameter can set any GUC, including `role`.
FORWARDED_STARTUP_PARAMETERS = frozenset(
    name.lower()
    for name in (
        "application_name",
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "IntervalStyle",
        "extra_float_digits",
        "search_path",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "default_transaction_isolation",
        "default_transaction_read_only",
        "bytea_output",
    )
)
# Passed on only with allow_startup_options or a grant: `options` carries command-line switches
# (-c role=…), `replication` turns the session into a walsender.
GUARDED_STARTUP_PARAMETERS = frozenset({"options", "replication"})
# What a protocol "user" may be; PostgreSQL's own limit on identifiers is 63 bytes, but callers
# often send an e-mail address or a CI job name, which is only recorded.
MAX_USER_NAME = 256

# The server is the trusted side: a row may be as large as PostgreSQL itself can make one.
MAX_SERVER_MESSAGE_BYTES = DEFAULT_MAX_BACKEND_MESSAGE_LENGTH
DEFAULT_WRITE_BATCH_BYTES = 64 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _positive(instance, attribute, value) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive", attribute, None, value)


@attrs.frozen
class PostgresOptions:
    """A postgres target's own keys (see the module documentation)."""

    database: str | None = None
    databases: tuple[str, ...] = ()
    allow_startup_options: bool = False
    startup_parameters: tuple[str, ...] = ()
    catalog_refresh: Duration = Duration(300)
    write_batch_bytes: int = attrs.field(default=DEFAULT_WRITE_BATCH_BYTES, validator=_positive)
    max_message_bytes: int = attrs.field(default=DEFAULT_MAX_MESSAGE_BYTES, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.database is None and not self.databases:
            raise ValueError("a postgres target needs database (or databases): the database callers may use")

    @property
    def allowed_databases(self) -> frozenset[str]:
        return frozenset(((self.database,) if self.database else ()) + tuple(self.databases))


class PostgresHandler:
    """One per target; ``serve`` runs one client connection."""

    def __init__(self, target, runtime) -> None:
        self.options: PostgresOptions = target.options
        if target.tls is None and not target.allow_plaintext_auth:
            raise ValueError(
                f"target {target.name}: callers send their token as the password, so a postgres "
                "target needs tls on its listener (or allow_plaintext_auth = true on loopback)"
            )
        self.forwarded = FORWARDED_STARTUP_PARAMETERS | {name.lower() for name in self.options.startup_parameters}

    async def serve(self, session, stream: trio.abc.Stream) -> None:
        options = self.options
        decoder = FrontendDecoder(options.max_message_bytes)
        client = stream
        upstream = None
        relay = None
        try:
            with trio.fail_after(session.runtime.config.gateway.handshake_timeout):
                try:
                    start = await login.read_client_start(session, stream, decoder)
                except login.ClientGone:
                    session.end_reason = "client disconnected before logging in"
                    return
                client = start.stream
                if isinstance(start.message, CancelRequest):
                    await login.forward_cancel(session, start.message)
                    return
                prepared = await self._login_client(session, client, decoder, start.message)
                if prepared is None:
                    return
                database, parameters, encoding = prepared
                try:
                    upstream = await login.login_upstream(session, database, parameters, MAX_SERVER_MESSAGE_BYTES)
                except login.UpstreamRefused as exc:
                    await login.send_quietly(client, login.upstream_refusal_for_client(exc.error))
                    raise
                except UpstreamUnavailable:
                    await login.send_quietly(client, login.fatal(login.CANNOT_CONNECT, "Bastion cannot reach the database server"))
                    raise
                reader = _catalog_reader(session, database)
                relay = Relay(session, options, client, decoder, upstream, encoding)
                relay.catalog_reader = reader
                session.farewell = relay.farewell
                session.notify = relay.notify
                await catalog.ensure_loaded(session.target.state, reader)
                await self._hand_over(session, client, upstream)
            await relay.run()
        except ProtocolError as exc:
            session.end_reason = f"client protocol error: {exc.message}"
            await login.send_quietly(client, codec.encode(exc.error_response()))
        except trio.TooSlowError:
            session.end_reason = "login timed out"
            await login.send_quietly(client, login.fatal(login.CANNOT_CONNECT, "the login did not complete in time"))
        finally:
            if upstream is not None:
                login.revoke_cancel_key(session.target.state, session.id, upstream.process_id)
                if relay is not None:
                    await relay.close_upstream()
                else:
                    await trio.aclose_forcefully(upstream.stream)

    async def _login_client(self, session, client, decoder, startup: StartupMessage):
        """Authenticate the caller and vet its startup packet; None when the caller left."""
        user = startup.user
        if not user:
            await login.send_quietly(client, login.fatal(login.INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet"))
            raise AuthenticationFailed("no user name in the startup packet")
        if len(user) > MAX_USER_NAME:
            raise ProtocolError("the user name is too long")
        database = startup.database or user
        negotiation = login.negotiation_needed(startup)
        if negotiation is not None:
            await client.send_all(codec.encode(negotiation))
        if not session.info.tls and not session.config.allow_plaintext_auth:
            await login.send_quietly(
                client,
                login.fatal(login.INVALID_AUTHORIZATION, "Bastion accepts tokens only over TLS", hint="connect with sslmode=require (or verify-full)"),
            )
            raise AuthenticationFailed("the client asked to log in without TLS")
        try:
            password = await login.read_password(client, decoder)
        except ProtocolError as exc:
            if exc.sqlstate != PROGRAM_LIMIT_EXCEEDED:
                raise
            # a credential too large for the protocol is a failed login like any other: recorded,
            # counted, and answered without saying why
            await session.authentication_failed(f"the password message is over the protocol's limit ({exc.message})", client_user=user)
            await login.send_quietly(client, login.fatal(login.INVALID_PASSWORD, f'password authentication failed for user "{user}"'))
            raise AuthenticationFailed("the password message is over the protocol's limit") from None
        if password is None:
            session.end_reason = "client disconnected before sending a password"
            return None
        peer = _peer_certificate(client)
        credential = Credential(secret=password or None, username=user, peer_certificate=peer)
        try:
            await session.authenticate(credential, client_user=user, database=database)
        except AuthenticationFailed:
            await login.send_quietly(client, login.fatal(login.INVALID_PASSWORD, f'password authentication failed for user "{user}"'))
            raise
        except ConnectDenied as exc:
            rules = ", ".join(exc.decision.rules) or "default-deny"
            await login.send_quietly(
                client,
                login.fatal(login.INVALID_AUTHORIZATION, f"Bastion denies this connection: {exc.decision.summary}", detail=f"Rule: {rules}."),
            )
            raise
        if database not in self.options.allowed_databases:
            await login.send_quietly(client, login.fatal(login.INVALID_CATALOG_NAME, f'database "{database}" does not exist'))
            raise SessionError("the caller asked for a database the target does not serve")
        parameters = []
        encoding = "UTF8"
        for name, value in startup.parameters:
            lowered = name.lower()
            if lowered in ("user", "database") or lowered.startswith("_pq_."):
                continue
            if lowered == "client_encoding":
                resolved = "UTF8" if value.lower() == "auto" else value
                if encoding_key(resolved) not in SUPPORTED_ENCODINGS:
                    await login.send_quietly(
                        client,
                        login.fatal(login.FEATURE_NOT_SUPPORTED, f"client_encoding {value} is not supported through Bastion", hint="use UTF8"),
                    )
                    raise SessionError(f"client_encoding {value} refused")
                encoding = resolved
                value = resolved
            elif lowered in GUARDED_STARTUP_PARAMETERS:
                if not self.options.allow_startup_options and not await _granted(session, name, value):
                    await login.send_quietly(
                        client,
                        login.fatal(login.INSUFFICIENT_PRIVILEGE, f'Bastion does not pass on the startup parameter "{name}"'),
                    )
                    raise SessionError(f"startup parameter {name} refused")
            elif lowered not in self.forwarded:
                await login.send_quietly(
                    client,
                    login.fatal(login.INSUFFICIENT_PRIVILEGE, f'Bastion does not pass on the startup parameter "{name}"', hint="ask the gateway's operator to list it in startup_parameters"),
                )
                raise SessionError(f"startup parameter {name} refused")
            parameters.append((name, value))
        return database, tuple(parameters), encoding

    async def _hand_over(self, session, client, upstream: login.Upstream) -> None:
        """Tell the caller it is in: the server's parameters, its real process id, our key."""
        key = login.issue_cancel_key(session.target.state, session.id, upstream.process_id, upstream.secret_key)
        parts = [codec.encode(AuthenticationOk())]
        parts += [codec.encode(ParameterStatus(name, value)) for name, value in upstream.parameters]
        parts.append(codec.encode(BackendKeyData(upstream.process_id, key)))
        parts += [codec.encode(notice) for notice in upstream.notices]
        parts.append(codec.encode(ReadyForQuery("I")))
        data = b"".join(parts)
        await client.send_all(data)
        session.bytes_to_client += len(data)


async def _granted(session, name: str, value: str) -> bool:
    """Ask the policy about a guarded startup parameter: the request's action is the capability a
    grant must have (``startup-options`` for ``options``, ``replication`` for ``replication``)."""
    capability = "replication" if name.lower() == "replication" else "startup-options"
    message = Message("postgres", capability, text=f"{name}={value}", args=(name, value))
    request = Request(message=message, action=capability, redacted_text=f"startup parameter {name}")
    decision = authorize_requests(session, [request])
    judgement = await session.check(message, kind="startup-parameter", judged=([request], decision))
    return judgement.allowed


def _peer_certificate(stream) -> bytes | None:
    if isinstance(stream, trio.SSLStream):
        try:
            return stream.getpeercert(binary_form=True) or None
        except (ssl.SSLError, ValueError, AttributeError):
            return None
    return None


def _catalog_reader(session, database: str):
    """Reads the catalog on a connection of its own, with the target's credentials."""

    async def read() -> list[catalog.Row]:
        upstream = await login.login_upstream(session, database, (("application_name", "bastion catalog"),), MAX_SERVER_MESSAGE_BYTES)
        try:
            query = catalog.CATALOG_QUERY.format(limit=catalog.MAX_CATALOG_COLUMNS + 1)
            await upstream.stream.send_all(codec.encode(Query(query)))
            rows = []
            decoder = upstream.decoder
            while True:
                message = await login.receive_event(upstream.stream, decoder)
                if message is END_OF_STREAM:
                    raise UpstreamUnavailable("the upstream closed the catalog connection")
                if isinstance(message, ErrorResponse):
                    raise UpstreamUnavailable(f"reading the catalog failed: {message.message}")
                if isinstance(message, ReadyForQuery):
                    break
                values = getattr(message, "values", None)
                if values is not None:
                    schema, table, column, attnum, oid, relkind = (v.decode() for v in values)
                    rows.append((schema, table, column, int(attnum), int(oid), relkind))
            if len(rows) > catalog.MAX_CATALOG_COLUMNS:
                raise catalog.CatalogTooLarge(f"the upstream has more than {catalog.MAX_CATALOG_COLUMNS} columns")
            try:
                await upstream.stream.send_all(b"X\x00\x00\x00\x04")
            except (trio.BrokenResourceError, OSError):
                pass
            return rows
        finally:
            await trio.aclose_forcefully(upstream.stream)

    return read


@hookimpl
def bastion_register_protocols():
    return [
        ProtocolSpec(
            name="postgres",
            factory=PostgresHandler,
            options=PostgresOptions,
            description="PostgreSQL wire protocol 3.0: every statement judged, results masked, all recorded",
        )
    ]


__all__ = ["PostgresHandler", "PostgresOptions", "bastion_register_protocols"]
