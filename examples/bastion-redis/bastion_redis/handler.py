"""The Redis proxy for one client connection.

**Login.** Until the caller authenticates, Bastion answers it alone; nothing reaches the server.
``AUTH <token>``, ``AUTH <user> <token>`` and ``HELLO <version> AUTH <user> <token>`` hand the token
to the identity providers (``Credential(secret=token, username=user)``; the user ``default`` is
Redis' name for "no user" and is passed as none). A wrong token gets ``-WRONGPASS`` and ends the
connection; any other command gets ``-NOAUTH``; ``QUIT`` gets ``+OK``. Once the caller is known,
Bastion connects to the server and logs in with the target's own ``credentials`` (``AUTH user
password``), which the caller never sees. A ``HELLO`` is then passed on without its ``AUTH``, so
the caller gets the server's own HELLO reply and protocol version.

**Commands.** Every command is decoded whole, judged (``session.check``), and only then forwarded,
re-encoded from the decoded arguments. A refused command gets ``-NOPERM <reason>`` *at its turn*:
callers pipeline, so the proxy keeps a FIFO of commands whose replies are still due — forwarded
ones, answered by the server, and refused ones, answered by the proxy — and writes each refusal
once every reply before it has been written. Each reply is recorded with its type and size, never
its content.

**Transactions.** A command refused between ``MULTI`` and ``EXEC`` would make the server run the
rest of the transaction without it. So the transaction is spoiled, as a server-side error would:
the proxy sends ``DISCARD`` instead of the ``EXEC`` and answers ``-EXECABORT``.

**Pub/Sub and MONITOR.** After ``SUBSCRIBE``, ``PSUBSCRIBE``, ``SSUBSCRIBE`` or ``MONITOR`` the
server sends messages that answer no command, so the proxy first waits for every reply due, then
switches to pass-through for the rest of the connection: replies and messages are relayed as they
come; commands are still judged and recorded, refused ones are answered at once (a refusal may then
overtake a reply still on its way), and replies are no longer recorded one by one. RESP3 pushes
(``>``) are relayed at any time and never taken for a reply.

**Memory.** A command is held whole until judged (at most ``resp.MAX_COMMAND_BYTES``); replies are
streamed through in chunks of ``RELAY_CHUNK``. At most ``MAX_PENDING_REPLIES`` commands may be
awaiting their reply: beyond that the proxy stops reading the caller until replies have gone out,
so a caller that pipelines without reading holds up only itself.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import attrs
import trio

from bastion.core.errors import (
    AuthenticationFailed,
    ClientProtocolError,
    ConnectDenied,
    SessionError,
    UpstreamUnavailable,
)
from bastion.policies.model import Credential, Message

from bastion_redis import resp
from bastion_redis.commands import PASS_THROUGH_COMMANDS, analyse

# one read from either side; also the most the proxy holds of a reply on its way through
RELAY_CHUNK = 64 * 1024
# commands awaiting their reply (see "Memory" above); a pipeline deeper than this just waits
MAX_PENDING_REPLIES = 1024
# the server's answer to the gateway's own AUTH or HELLO: a few hundred bytes in practice
MAX_LOGIN_REPLY = 64 * 1024
# after a caller's protocol error, how long the replies already under way may take to go out
# before the connection is closed anyway (a blocked BLPOP must not keep a broken session open)
DRAIN_AFTER_ERROR_SECONDS = 5.0
# after QUIT the server answers +OK and hangs up; one that stays on must not keep the session open
QUIT_GRACE_SECONDS = 5.0
# A caller may hang up the moment it has its last reply, which cancels the proxy: the record of
# that reply is still written, shielded from the cancellation, but for no longer than this.
RECORD_DEADLINE_SECONDS = 5.0

NOAUTH = "NOAUTH Authentication required."
WRONGPASS = "WRONGPASS invalid username-password pair or user is disabled."
HELLO_NEEDS_AUTH = "NOAUTH HELLO must carry AUTH <user> <token> until the connection is authenticated"
EXECABORT = resp.encode_error("EXECABORT Transaction discarded because a command in it was refused.")


@attrs.frozen
class _Forwarded:
    """A command sent to the server; its reply is due. ``substitute``: what the caller gets
    instead of the server's reply (the EXECABORT of a spoiled transaction)."""

    request_no: int
    sent_at: float
    substitute: bytes | None = None


@attrs.frozen
class _Refused:
    """A command the proxy answers itself, once every reply before it is out."""

    request_no: int | None
    reply: bytes


class RedisHandler:
    """``protocol = "redis"``: one instance per target, one :class:`_Proxy` per connection."""

    def __init__(self, target, runtime) -> None:
        self.options = target.options
        if self.options.require_auth and target.tls is None and not target.allow_plaintext_auth:
            raise ValueError(
                f"target {target.name}: callers send their token with AUTH, so require_auth needs "
                "tls on the listener (or allow_plaintext_auth = true on a loopback listener)"
            )

    async def serve(self, session, stream: trio.abc.Stream) -> None:
        if session.target.server_ssl_context is not None:
            stream = await session.start_tls(stream)
        await _Proxy(session, stream, self.options).run()


class _Proxy:
    def __init__(self, session, client: trio.abc.Stream, options) -> None:
        self.session = session
        self.client = client
        self.options = options
        self.upstream: trio.abc.Stream | None = None
        self.commands = resp.CommandDecoder()
        self.replies = resp.ReplyFramer()
        # replies due, oldest first; a slot is taken per entry (see MAX_PENDING_REPLIES)
        self.pending: deque[_Forwarded | _Refused] = deque()
        self.slots = trio.Semaphore(MAX_PENDING_REPLIES)
        self.drained = trio.Event()
        self.drained.set()
        # every write to the caller holds this, so replies and refusals never interleave
        self.write_lock = trio.Lock()
        self.pass_through = False
        self.in_multi = False
        self.multi_spoiled = False
        self.quitting = False
        self.mid_reply = False  # part of a reply has been written to the caller
        self.client_clean = True  # no write to the caller was cut short
        session.farewell = self.farewell

    # --- the connection ---------------------------------------------------------------------------

    async def run(self) -> None:
        session = self.session
        try:
            if self.options.require_auth:
                with trio.fail_after(session.runtime.config.gateway.handshake_timeout):
                    try:
                        authenticated = await self.authenticate()
                    except resp.ProtocolError as exc:
                        await self._say_quietly(f"ERR Protocol error: {exc}")
                        raise ClientProtocolError() from None
                if not authenticated:
                    return
            else:
                try:
                    await session.accept_anonymous()
                except ConnectDenied as exc:
                    await self._say_quietly(f"NOPERM {exc.decision.summary}")
                    raise
                await self.open_upstream(hello=None)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.pump_replies, nursery.cancel_scope)
                await self.pump_commands()
                if self.quitting:  # let the reply to QUIT through, then the server hangs up
                    nursery.cancel_scope.deadline = trio.current_time() + QUIT_GRACE_SECONDS
                else:
                    nursery.cancel_scope.cancel()
        finally:
            # commands forwarded whose reply never came: the trail still closes each request
            unanswered = [entry for entry in self.pending if isinstance(entry, _Forwarded)]
            for entry in unanswered:
                await self._record(entry.request_no, "cancelled")
            if self.upstream is not None:
                await trio.aclose_forcefully(self.upstream)

    async def farewell(self, reason: str) -> None:
        """On gateway shutdown: answer what is still due, unless a reply is half written."""
        if self.mid_reply or not self.client_clean or not self.pending:
            return
        closing = resp.encode_error(f"ERR Bastion closed the connection: {reason}")
        await self.client.send_all(b"".join(e.reply if isinstance(e, _Refused) else closing for e in self.pending))

    # --- login ------------------------------------------------------------------------------------

    async def authenticate(self) -> bool:
        """Answer the caller alone until it authenticates. False: it left first."""
        while True:
            command = await self._next_command()
            if command is None:
                self.session.end_reason = "client disconnected"
                return False
            name = command.name
            if name == "AUTH":
                if len(command.args) not in (2, 3):
                    await self._send(resp.encode_error("ERR wrong number of arguments for 'auth' command"))
                    continue
                user = command.args[1] if len(command.args) == 3 else None
                await self._login(user, command.args[-1])
                await self.open_upstream(hello=None)
                await self._send(b"+OK\r\n")
                return True
            if name == "HELLO":
                hello = _parse_hello(command.args)
                if isinstance(hello, str):
                    await self._send(resp.encode_error(hello))
                    continue
                version, user, token, client_name = hello
                if token is None:
                    await self._send(resp.encode_error(HELLO_NEEDS_AUTH))
                    continue
                await self._login(user, token)
                await self.open_upstream(hello=(version, client_name))
                return True
            if name == "QUIT":
                await self._send(b"+OK\r\n")
                self.session.end_reason = "client quit"
                return False
            await self._send(resp.encode_error(NOAUTH))

    async def _login(self, user: bytes | None, token: bytes) -> None:
        username = None if user is None or user == b"default" else user.decode("utf-8", "surrogateescape")
        credential = Credential(secret=token.decode("utf-8", "surrogateescape"), username=username)
        try:
            await self.session.authenticate(credential, client_user=username)
        except AuthenticationFailed:
            await self._say_quietly(WRONGPASS)
            raise
        except ConnectDenied as exc:
            await self._say_quietly(f"NOPERM {exc.decision.summary}")
            raise

    async def open_upstream(self, hello: tuple[bytes | None, bytes | None] | None) -> None:
        """Connect and log in with the target's credentials; pass a HELLO on without its AUTH."""
        session = self.session
        try:
            self.upstream = await session.connect_upstream(implicit_tls=session.config.upstream_tls is not None)
            with trio.fail_after(session.config.connect_timeout):
                credentials = session.config.credentials
                password = await session.upstream_password() if credentials is not None else None
                if credentials is not None and password is not None:
                    await self.upstream.send_all(
                        resp.encode_command([b"AUTH", credentials.user.encode(), password.encode()])
                    )
                    _, ended = await self._login_reply()
                    if ended.error:
                        raise UpstreamUnavailable(f"the upstream refused the gateway's credentials ({ended.error_code})")
                if hello is not None:
                    version, client_name = hello
                    args = [b"HELLO"] + ([version] if version is not None else [])
                    args += [b"SETNAME", client_name] if client_name is not None else []
                    await self.upstream.send_all(resp.encode_command(args))
                    reply, _ = await self._login_reply()
                    await self._send(reply)
        except (UpstreamUnavailable, trio.TooSlowError):
            await self._say_quietly("ERR Bastion cannot open a session on the Redis server")
            raise

    async def _login_reply(self) -> tuple[bytes, resp.ReplyEnd]:
        collected = bytearray()
        try:
            while True:
                event = self.replies.next_event()
                if event is resp.NEED_DATA:
                    self.replies.receive_data(await self.upstream.receive_some(RELAY_CHUNK))
                elif event is resp.END_OF_STREAM:
                    raise UpstreamUnavailable("the upstream closed the connection during login")
                elif isinstance(event, resp.ReplyData):
                    collected += event.data
                    if len(collected) > MAX_LOGIN_REPLY:
                        raise UpstreamUnavailable("the upstream's login reply is too long")
                elif event.push:
                    collected.clear()
                else:
                    return bytes(collected), event
        except resp.ProtocolError as exc:
            raise UpstreamUnavailable(f"the upstream does not speak RESP ({exc})") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise UpstreamUnavailable("the upstream closed the connection during login") from None

    # --- caller -> server -------------------------------------------------------------------------

    async def pump_commands(self) -> None:
        while not self.quitting:
            try:
                command = await self._next_command()
            except resp.ProtocolError as exc:
                await self._refuse(None, resp.encode_error(f"ERR Protocol error: {exc}"))
                with trio.move_on_after(DRAIN_AFTER_ERROR_SECONDS):
                    await self._wait_drained()
                raise ClientProtocolError() from None
            if command is None:
                self.session.end_reason = "client disconnected"
                return
            await self.handle(command)

    async def handle(self, command: resp.Command) -> None:
        session = self.session
        judgement = await session.check(Message(protocol="redis", kind="command", args=command.args), kind="command")
        request_no = judgement.request_no
        if not judgement.allowed:
            decision = judgement.decision
            rules = f" [{', '.join(decision.rules)}]" if decision.rules else ""
            await self._refuse(request_no, resp.encode_error(f"NOPERM {decision.summary}{rules}"))
            return
        analysis = analyse(command.args)
        name = analysis.name if analysis is not None else command.name.lower()
        if name in PASS_THROUGH_COMMANDS and not self.pass_through:
            if self.in_multi:
                await self._refuse(request_no, resp.encode_error(f"ERR {name.upper()} inside MULTI is not supported by Bastion"))
                return
            await self._wait_drained()
            self.pass_through = True
            await self._forward(command.args)
            await self._record(request_no, "ok", command_tag="pass-through")
            return
        if name == "exec" and self.multi_spoiled:
            await self._forward([b"DISCARD"], _Forwarded(request_no, trio.current_time(), EXECABORT))
        else:
            await self._forward(command.args, _Forwarded(request_no, trio.current_time()))
        if name == "multi":
            self.in_multi = True
        elif name in ("exec", "discard"):
            self.in_multi = self.multi_spoiled = False
        elif name == "quit":
            self.quitting = True

    async def _next_command(self) -> resp.Command | None:
        """The next command, or None when the caller closed the connection."""
        while True:
            event = self.commands.next_event()
            if isinstance(event, resp.Command):
                return event
            if event is resp.END_OF_STREAM:
                return None
            self.commands.receive_data(await self._receive_client())

    async def _receive_client(self) -> bytes:
        idle = self.session.config.idle_timeout
        while True:
            with trio.move_on_after(idle if idle else math.inf):
                data = await self.client.receive_some(RELAY_CHUNK)
                self.session.bytes_from_client += len(data)
                return data
            # a caller waiting for a reply (a blocking BLPOP) or for messages is not idle
            if not self.pending and not self.pass_through:
                raise SessionError("idle timeout")

    async def _forward(self, args: Sequence[bytes], entry: _Forwarded | None = None) -> None:
        if entry is not None and not self.pass_through:
            await self._enqueue(entry)
        await self.upstream.send_all(resp.encode_command(args))

    async def _refuse(self, request_no: int | None, reply: bytes) -> None:
        """Answer a command without forwarding it, at its turn among the replies due."""
        if self.in_multi:
            self.multi_spoiled = True
        try:
            if self.pass_through:
                await self._send(reply)
            else:
                await self._enqueue(_Refused(request_no, reply))
                async with self.write_lock:
                    await self._write_refusals_due()
        finally:
            if request_no is not None:
                code = reply[1:].split(b" ", 1)[0].decode("ascii", "replace")  # NOPERM, ERR
                await self._record(request_no, "denied", error_code=code, bytes=len(reply))

    async def _enqueue(self, entry: _Forwarded | _Refused) -> None:
        await self.slots.acquire()
        self.pending.append(entry)
        if self.drained.is_set():
            self.drained = trio.Event()

    async def _wait_drained(self) -> None:
        while self.pending:
            await self.drained.wait()

    # --- server -> caller -------------------------------------------------------------------------

    async def pump_replies(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                self.replies.receive_data(await self.upstream.receive_some(RELAY_CHUNK))
                while (event := self.replies.next_event()) is not resp.NEED_DATA:
                    if event is resp.END_OF_STREAM:
                        self.session.end_reason = "client quit" if self.quitting else "upstream closed"
                        scope.cancel()
                        return
                    if isinstance(event, resp.ReplyData):
                        await self._reply_data(event)
                    else:
                        await self._reply_end(event)
        except resp.ProtocolError:
            async with self.write_lock:
                if not self.mid_reply and self.client_clean:
                    await self._send_locked(resp.encode_error("ERR Bastion cannot read the Redis server's reply"))
            raise SessionError("upstream protocol error") from None

    async def _reply_data(self, event: resp.ReplyData) -> None:
        push = event.kind == "push"
        head = self.pending[0] if self.pending else None
        if not self.pass_through and not push and not isinstance(head, _Forwarded):
            raise resp.ProtocolError("the server sent a reply to no command")
        self.mid_reply = True
        if push or self.pass_through or head.substitute is None:
            async with self.write_lock:
                await self._send_locked(event.data)

    async def _reply_end(self, event: resp.ReplyEnd) -> None:
        self.mid_reply = False
        if self.pass_through or event.push:
            return
        # The reply is complete and out: settle its entry before anything can be cancelled.
        entry = self.pending.popleft()
        if entry.substitute is None:
            self.slots.release()
        else:  # the substitute takes the entry's place (and slot), so nothing overtakes it
            self.pending.appendleft(_Refused(None, entry.substitute))
        try:
            async with self.write_lock:
                await self._write_refusals_due()
        finally:
            await self._record_reply(entry, event)

    async def _record_reply(self, entry: _Forwarded, event: resp.ReplyEnd) -> None:
        duration_ms = round((trio.current_time() - entry.sent_at) * 1000, 3)
        if entry.substitute is not None:
            await self._record(entry.request_no, "error", error_code="EXECABORT", duration_ms=duration_ms)
            return
        await self._record(
            entry.request_no,
            "error" if event.error else "ok",
            bytes=event.size,
            duration_ms=duration_ms,
            command_tag=event.kind,
            error_code=event.error_code,
        )

    async def _write_refusals_due(self) -> None:
        """Write the refusals at the head of the queue (their turn has come). Holds the lock."""
        while self.pending and isinstance(self.pending[0], _Refused):
            entry = self.pending.popleft()
            self.slots.release()
            await self._send_locked(entry.reply)
        if not self.pending:
            self.drained.set()

    async def _record(self, request_no: int, status: str, **fields) -> None:
        with trio.move_on_after(RECORD_DEADLINE_SECONDS) as scope:
            scope.shield = True
            await self.session.record_response(request_no, status, **fields)

    # --- writing to the caller --------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        async with self.write_lock:
            await self._send_locked(data)

    async def _send_locked(self, data: bytes) -> None:
        self.client_clean = False
        await self.client.send_all(data)
        self.client_clean = True
        self.session.bytes_to_client += len(data)

    async def _say_quietly(self, message: str) -> None:
        """Tell the caller why it is being disconnected, if it is still listening."""
        try:
            await self._send(resp.encode_error(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _parse_hello(args: tuple[bytes, ...]) -> tuple[bytes | None, bytes | None, bytes | None, bytes | None] | str:
    """``HELLO [version [AUTH user token] [SETNAME name]]`` -> (version, user, token, name), or
    the error to answer."""
    version = args[1] if len(args) > 1 else None
    if version is not None and version not in (b"2", b"3"):
        return "NOPROTO unsupported protocol version"
    user = token = name = None
    i = 2
    while i < len(args):
        option = args[i].upper()
        if option == b"AUTH" and i + 2 < len(args):
            user, token = args[i + 1], args[i + 2]
            i += 3
        elif option == b"SETNAME" and i + 1 < len(args):
            name = args[i + 1]
            i += 2
        else:
            return "ERR Syntax error in HELLO options"
    return version, user, token, name
