"""Both legs of a PostgreSQL session's start: the caller's login to Bastion, Bastion's login upstream.

Client leg
    SSLRequest is answered with TLS when the target's listener has ``tls`` and with ``N``
    otherwise; GSSENCRequest always with ``N``. A CancelRequest is mapped to the upstream session
    it names (see :func:`forward_cancel`). The StartupMessage's ``user`` is recorded, never
    trusted: the caller proves who it is with its token, sent as the password in answer to
    AuthenticationCleartextPassword. That request is only made over TLS, unless the target says
    ``allow_plaintext_auth`` (loopback listeners only).

Upstream leg
    Bastion logs in with the target's ``credentials`` (SCRAM-SHA-256, MD5 or cleartext,
    whichever the server asks for; optionally over TLS after an SSLRequest). SCRAM's server
    signature is verified before AuthenticationOk is believed. The channel-binding variant
    (SCRAM-SHA-256-PLUS) is not used: Bastion always picks plain SCRAM-SHA-256, which every
    server that offers -PLUS also offers.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import ssl
from collections.abc import Iterable

import attrs
import scramp
import trio

from bastion.core import events
from bastion.core.errors import UpstreamUnavailable
from bastion.protocols.postgres import codec
from bastion.protocols.postgres.errors import ProtocolError
from bastion.protocols.postgres.framing import END_OF_STREAM, NEED_DATA, BackendDecoder, FrontendDecoder
from bastion.protocols.postgres.messages import (
    PROTOCOL_VERSION_3_0,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    CancelRequest,
    EncryptionResponse,
    ErrorResponse,
    GSSENCRequest,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    StartupMessage,
)

# one read from a socket during login; login messages are tiny
LOGIN_RECEIVE_BYTES = 16 * 1024
# SSLRequest and GSSENCRequest rounds a client may make before its StartupMessage: one of each
# is all libpq ever sends, more is a client stuck in a loop
MAX_NEGOTIATION_ROUNDS = 3
# after forwarding a CancelRequest, how long to wait for the server to hang up (it does so as soon
# as it has read the request; the wait only keeps the cancel from racing our own close)
CANCEL_LINGER_SECONDS = 2.0

SCRAM = "SCRAM-SHA-256"

# SQLSTATEs (PostgreSQL's errcodes.txt names in comments)
INVALID_AUTHORIZATION = "28000"  # invalid_authorization_specification
INVALID_PASSWORD = "28P01"  # invalid_password
INVALID_CATALOG_NAME = "3D000"  # invalid_catalog_name: database does not exist
PROTOCOL_VIOLATION = "08P01"  # protocol_violation
REJECTED_CONNECTION = "08004"  # sqlserver_rejected_establishment_of_sqlconnection
CANNOT_CONNECT = "08006"  # connection_failure
INSUFFICIENT_PRIVILEGE = "42501"  # insufficient_privilege
FEATURE_NOT_SUPPORTED = "0A000"


class ClientGone(Exception):
    """The client closed the connection between two messages."""


class UpstreamRefused(UpstreamUnavailable):
    """The server answered Bastion's login with an ErrorResponse."""

    def __init__(self, error: ErrorResponse) -> None:
        self.error = error
        super().__init__(f"the upstream refused the login: {error.sqlstate} {error.message}")


def fatal(sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None) -> bytes:
    return codec.encode(ErrorResponse.build(sqlstate, message, severity="FATAL", detail=detail, hint=hint))


async def send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    """Send a last message to a peer that may already be gone."""
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError):
        pass


async def receive_event(stream: trio.abc.Stream, decoder):
    """The next decoded message, or END_OF_STREAM."""
    while True:
        event = decoder.next_event()
        if event is not NEED_DATA:
            return event
        decoder.receive_data(await stream.receive_some(LOGIN_RECEIVE_BYTES))


# --- client leg ------------------------------------------------------------------------------------


@attrs.frozen
class ClientStart:
    stream: trio.abc.Stream
    message: StartupMessage | CancelRequest


async def read_client_start(session, stream: trio.abc.Stream, decoder: FrontendDecoder) -> ClientStart:
    """Answer encryption requests until the client sends its StartupMessage or a CancelRequest."""
    for _ in range(MAX_NEGOTIATION_ROUNDS + 1):
        message = await receive_event(stream, decoder)
        if message is END_OF_STREAM:
            raise ClientGone()
        if isinstance(message, SSLRequest):
            if session.target.server_ssl_context is not None and not session.info.tls:
                await stream.send_all(codec.encode(EncryptionResponse("S")))
                stream = await session.start_tls(stream)
            else:
                await stream.send_all(codec.encode(EncryptionResponse("N")))
            continue
        if isinstance(message, GSSENCRequest):
            await stream.send_all(codec.encode(EncryptionResponse("N")))
            continue
        return ClientStart(stream, message)
    raise ProtocolError("too many encryption requests before the startup message")


def negotiation_needed(startup: StartupMessage) -> NegotiateProtocolVersion | None:
    """Bastion speaks protocol 3.0 and no ``_pq_.`` extension: say so, as a 3.0 server does."""
    options = tuple(name for name, _ in startup.parameters if name.startswith("_pq_."))
    if startup.minor == 0 and not options:
        return None
    return NegotiateProtocolVersion(0, options)


async def read_password(stream: trio.abc.Stream, decoder: FrontendDecoder) -> str | None:
    """Ask for the caller's token (cleartext: it is the caller's API key, not a database password)."""
    decoder.expect_password_kind(codec.PASSWORD_KIND_PASSWORD)
    await stream.send_all(codec.encode(AuthenticationCleartextPassword()))
    message = await receive_event(stream, decoder)
    if message is END_OF_STREAM:
        return None  # libpq hangs up here to ask its user for a password, then reconnects
    if not isinstance(message, PasswordMessage):
        raise ProtocolError(f"expected a password message, got {type(message).__name__}")
    return message.password


# --- cancel requests -------------------------------------------------------------------------------

CANCEL_KEYS = "postgres.cancel-keys"


@attrs.frozen
class CancelTarget:
    session_id: str
    upstream_key: bytes = attrs.field(repr=False)
    bastion_key: bytes = attrs.field(repr=False)


def issue_cancel_key(target_state: dict, session_id: str, process_id: int, upstream_key: bytes) -> bytes:
    """A secret key of Bastion's own for the caller; the server's key never leaves the gateway."""
    key = secrets.token_bytes(4)
    target_state.setdefault(CANCEL_KEYS, {}).setdefault(process_id, []).append(CancelTarget(session_id, upstream_key, key))
    return key


def revoke_cancel_key(target_state: dict, session_id: str, process_id: int) -> None:
    table = target_state.get(CANCEL_KEYS, {})
    entries = [e for e in table.get(process_id, ()) if e.session_id != session_id]
    if entries:
        table[process_id] = entries
    else:
        table.pop(process_id, None)


def find_cancel_target(target_state: dict, request: CancelRequest) -> CancelTarget | None:
    found = None
    for entry in target_state.get(CANCEL_KEYS, {}).get(request.process_id, ()):
        if hmac.compare_digest(entry.bastion_key, request.secret_key):
            found = entry
    return found


async def forward_cancel(session, request: CancelRequest) -> None:
    """Forward a caller's cancel to the upstream with the real key; ignore unknown keys."""
    target = find_cancel_target(session.target.state, request)
    outcome = "forwarded" if target is not None else "unknown-key"
    session.end_reason = "cancel request"
    if target is not None:
        await cancel_upstream(session, request.process_id, target.upstream_key)
    await session.record(
        events.CancelForwarded(
            session_id=target.session_id if target is not None else session.id,
            target=session.config.name,
            client=session.client,
            outcome=outcome,
        )
    )


async def cancel_upstream(session, process_id: int, upstream_key: bytes) -> None:
    """Cancel what a session's upstream connection is running (Bastion's own decision)."""
    stream = await session.connect_upstream()
    try:
        if session.target.upstream_ssl_context is not None:
            stream = await _upstream_tls(session, stream, BackendDecoder())
        await stream.send_all(codec.encode(CancelRequest(process_id, upstream_key)))
        with trio.move_on_after(CANCEL_LINGER_SECONDS):
            while await stream.receive_some(LOGIN_RECEIVE_BYTES):
                pass
    except (trio.BrokenResourceError, OSError, ssl.SSLError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


# --- upstream leg ----------------------------------------------------------------------------------


@attrs.frozen
class Upstream:
    stream: trio.abc.Stream
    decoder: BackendDecoder
    parameters: tuple[tuple[str, str], ...]
    process_id: int
    secret_key: bytes = attrs.field(repr=False)
    notices: tuple[NoticeResponse, ...] = ()


async def _upstream_tls(session, stream: trio.abc.Stream, decoder: BackendDecoder) -> trio.SSLStream:
    await stream.send_all(codec.encode(SSLRequest()))
    decoder.expect_encryption_response()
    answer = await receive_event(stream, decoder)
    if isinstance(answer, ErrorResponse):
        raise UpstreamRefused(answer)
    if not isinstance(answer, EncryptionResponse) or answer.code != "S":
        raise UpstreamUnavailable("the upstream does not accept TLS connections")
    tls = trio.SSLStream(stream, session.target.upstream_ssl_context, server_hostname=session.upstream_server_name)
    try:
        with trio.fail_after(session.config.connect_timeout):
            await tls.do_handshake()
    except (ssl.SSLError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        raise UpstreamUnavailable(f"TLS with the upstream failed: {getattr(exc, 'reason', None) or type(exc).__name__}") from None
    return tls


def md5_password(user: str, password: str, salt: bytes) -> str:
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


async def login_upstream(session, database: str, parameters: Iterable[tuple[str, str]], max_message_length: int) -> Upstream:
    """Connect and log in with the target's credentials; returns once the server is ready."""
    credentials = session.config.credentials
    if credentials is None:
        raise UpstreamUnavailable("the target has no credentials to log in upstream with")
    user = credentials.user
    stream = await session.connect_upstream()
    decoder = BackendDecoder(max_message_length)
    try:
        if session.target.upstream_ssl_context is not None:
            stream = await _upstream_tls(session, stream, decoder)
        startup = StartupMessage(PROTOCOL_VERSION_3_0, (("user", user), ("database", database), *parameters))
        await stream.send_all(codec.encode(startup))
        password: str | None = None
        scram: scramp.ScramClient | None = None
        authenticated = False
        server_parameters: list[tuple[str, str]] = []
        notices: list[NoticeResponse] = []
        process_id, secret_key = 0, b""

        async def need_password() -> str:
            nonlocal password
            if password is None:
                password = await session.upstream_password()
            if password is None:
                raise UpstreamUnavailable("the upstream asks for a password and the target's credentials have none")
            return password

        while True:
            message = await receive_event(stream, decoder)
            if message is END_OF_STREAM:
                raise UpstreamUnavailable("the upstream closed the connection during login")
            if isinstance(message, AuthenticationOk):
                if scram is not None and not authenticated:
                    raise UpstreamUnavailable("the upstream skipped the end of SCRAM authentication")
                authenticated = True
            elif isinstance(message, AuthenticationSASL):
                if SCRAM not in message.mechanisms:
                    raise UpstreamUnavailable(f"the upstream offers no SASL mechanism Bastion speaks ({', '.join(message.mechanisms)})")
                scram = scramp.ScramClient([SCRAM], user, await need_password())
                first = scram.get_client_first().encode()
                await stream.send_all(codec.encode(SASLInitialResponse(SCRAM, first)))
            elif isinstance(message, AuthenticationSASLContinue) and scram is not None:
                try:
                    scram.set_server_first(message.data.decode())
                    final = scram.get_client_final().encode()
                except (scramp.ScramException, UnicodeDecodeError) as exc:
                    raise UpstreamUnavailable(f"SCRAM with the upstream failed: {exc}") from None
                await stream.send_all(codec.encode(SASLResponse(final)))
            elif isinstance(message, AuthenticationSASLFinal) and scram is not None:
                try:
                    scram.set_server_final(message.data.decode())
                except (scramp.ScramException, UnicodeDecodeError) as exc:
                    raise UpstreamUnavailable(f"the upstream's SCRAM signature is wrong: {exc}") from None
                authenticated = True
            elif isinstance(message, AuthenticationMD5Password):
                await stream.send_all(codec.encode(PasswordMessage(md5_password(user, await need_password(), message.salt))))
            elif isinstance(message, AuthenticationCleartextPassword):
                await stream.send_all(codec.encode(PasswordMessage(await need_password())))
            elif isinstance(message, ParameterStatus):
                server_parameters.append((message.name, message.value))
            elif isinstance(message, BackendKeyData):
                process_id, secret_key = message.process_id, message.secret_key
            elif isinstance(message, NoticeResponse):
                notices.append(message)
            elif isinstance(message, NegotiateProtocolVersion):
                continue  # we ask for 3.0 and nothing else: nothing to adjust
            elif isinstance(message, ErrorResponse):
                raise UpstreamRefused(message)
            elif isinstance(message, ReadyForQuery):
                if not authenticated:
                    raise UpstreamUnavailable("the upstream was ready before authenticating Bastion")
                return Upstream(stream, decoder, tuple(server_parameters), process_id, secret_key, tuple(notices))
            else:
                raise UpstreamUnavailable(f"unexpected {type(message).__name__} from the upstream during login")
    except ProtocolError as exc:
        await trio.aclose_forcefully(stream)
        raise UpstreamUnavailable(f"the upstream broke the protocol during login: {exc.message}") from None
    except (trio.BrokenResourceError, OSError, ssl.SSLError) as exc:
        await trio.aclose_forcefully(stream)
        raise UpstreamUnavailable(f"the connection to the upstream broke during login ({type(exc).__name__})") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


def upstream_refusal_for_client(error: ErrorResponse) -> bytes:
    """What the caller is told when the server refuses Bastion's own login.

    Authentication failures (class 28) name Bastion's service account, so they are replaced;
    anything else (too many connections, the server starting up, no such database) is passed on,
    because it is about the server, not about Bastion's credentials.
    """
    sqlstate = error.sqlstate or CANNOT_CONNECT
    if sqlstate.startswith("28"):
        return fatal(REJECTED_CONNECTION, "the database server refused Bastion's own login", hint="ask the gateway's operator to check the target's credentials")
    return fatal(sqlstate, error.message or "the database server refused the connection")
