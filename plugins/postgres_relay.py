"""The PostgreSQL relay: two pumps, one FIFO of what the server owes, and the statements in between.

Once both legs are logged in (:mod:`bastion.plugins.postgres_login`), two tasks run per session:

* the **frontend pump** reads the caller's messages, judges every statement-bearing one before it
  is forwarded, and appends an *entry* to the FIFO for every message the server will answer;
* the **backend pump** reads the server's messages and matches each against the FIFO's head: it
  applies masking plans to rows, records responses, swaps the server's error for Bastion's
  refusal where a refused message was replaced, and keeps the prepared-statement and portal
  tables in step with what the server confirmed.

Where a statement is judged
    Simple Query: the whole text, before it is forwarded. Parse: parsed and authorized (not
    recorded) — a denied statement is refused right there and recorded. Bind: the full check
    (authorize again, human review when the policy asks for it, record with the parameters
    masked) — Bind is where a prepared statement gets its values and becomes runnable, so every
    execution is checked and recorded, and a portal can only come from a checked Bind. Execute is
    mapped back to its portal's Bind for recording and masking. FunctionCall: judged as a
    ``function-call`` message (denied unless a rule allows it). A Bind naming a statement Bastion
    did not see prepared (e.g. one made by SQL ``PREPARE``) and an Execute naming a portal it did
    not see bound (e.g. a ``DECLARE``d cursor) are refused as the server refuses unknown names.

How a refusal is delivered
    A refused message is replaced, in place, by a *poison* message the server is certain to
    reject (a syntax error); the backend pump swaps the server's error for Bastion's ErrorResponse
    (SQLSTATE 42501, the rules and reasons). So the server itself goes through the failure: an
    open transaction becomes aborted (``E``) exactly as if the statement had failed there, the
    server skips to the next Sync in the extended protocol, and its ReadyForQuery carries the
    right transaction status. The frontend discards the caller's messages up to that Sync, as the
    server would. Refusals for "audit unavailable" and unparsable statements go the same way.

Statements Bastion answers itself
    ``SET bastion.justification = '…'`` (see :mod:`bastion.protocols.postgres.gateway_settings`)
    is never forwarded: the server gets an empty statement in its place (so ordering and the
    transaction status stay the server's), and the backend pump answers the caller ``SET``
    instead of the EmptyQueryResponse.

Reviews
    A statement the policy sends to a reviewer waits in ``session.check``; meanwhile the caller is
    told so with a NOTICE (``session.notify``) and is read only to notice a hang-up, which
    withdraws the request. A row-threshold review lets the statement run and pauses its result at
    the threshold: the server is not read while ``session.approve_rows`` waits, and on anything
    but an approval the statement is cancelled upstream and the caller gets the reason.

Statement and portal names
    Each name table keeps what the server *confirmed* (ParseComplete, BindComplete,
    CloseComplete, errors) and the frontend's *speculative* view of the batch it is reading (up to
    the next Sync). Within one batch the speculation is exact, because the server runs nothing
    after the first failure until the Sync. A message naming a statement or portal last defined
    in an earlier batch the server has not finished answering waits for that batch's
    ReadyForQuery, so a name always means what the server will run (pipelines that define and use
    names in the same batch, and clients that wait for answers, never wait).

Results
    A RowDescription's columns (with the table each comes from, via the catalog's OID map, and the
    sources the analysis traced) go to ``session.transform_plans`` once per result set; the plans
    are applied to every DataRow, in text and binary formats, and to COPY TO STDOUT lines. When a
    plan refuses or masking fails, the rest of that result is drained from the server and
    dropped, the caller gets an error in place of the command tag, and everything the server
    sends until the next ReadyForQuery is dropped too, as a caller expects after an error. Rows
    already executed are not undone: later statements of the same batch still ran on the server
    (an open transaction block is made to fail, so it cannot commit). Error and notice fields
    that echo values go through ``session.mask_text``. Each response is recorded with its
    column names, row and byte counts, masked-cell counts, duration and command tag or error
    code, and the masked rows in chunks up to ``audit.record_rows``.

Flow control
    Frames the relay need not change are forwarded as they came (header re-packed, body as is);
    writes are gathered and sent when the input read runs dry, at a Sync/Flush/ReadyForQuery, or
    beyond ``write_batch_bytes``. A slow caller blocks the send to it, so the server's data stops
    being read; a server that is slow to answer stops the caller's messages from being read.
    Memory per session is bounded by one message plus one write batch (a caller's message by
    ``max_message_bytes``; a server's row by what PostgreSQL itself can send, 1 GiB).
"""

from __future__ import annotations

import logging
import re
import struct
import time
from collections import deque
from typing import Any

import trio

from bastion.core import events
from bastion.core.errors import ClientProtocolError, SessionError
from bastion.core.hooks import HookError
from bastion.core.session import Judgement
from bastion.plugins import postgres_catalog as catalog
from bastion.plugins import postgres_login as login
from bastion.plugins.postgres_io import Channel, Gate
from bastion.protocols.postgres import codec
from bastion.protocols.postgres.errors import ProtocolError
from bastion.protocols.postgres.framing import END_OF_STREAM, NEED_DATA
from bastion.protocols.postgres.gateway_settings import GatewaySetting, SettingError, read_gateway_setting
from bastion.protocols.postgres.messages import (
    DataRow,
    Describe,
    ErrorField,
    ErrorResponse,
    CommandComplete,
    FieldDescription,
    NoticeResponse,
    Parse,
    Query,
)
from bastion.policies.masking import MaskingError
from bastion.policies.model import Column, Decision, Message, Request, ResultShape, Verdict

log = logging.getLogger("bastion.postgres")

# one read from a socket: PostgreSQL itself writes in 8 KiB blocks, and a larger read lets a
# burst of rows be handled (and forwarded) in one go
RECEIVE_BYTES = 64 * 1024
# ResultRows records hold at most this many rows each, so a large result is recorded in pieces
# as it streams instead of being held until its end
ROWS_PER_RECORD = 500
# what a caller may send while its statement is held for review before Bastion stops reading it
# (it is kept for when the statement is decided; reading at all is only to notice a hang-up)
HELD_INPUT_BYTES = 1024 * 1024
# decoded RowDescriptions a session keeps, keyed by their bytes
DESCRIPTION_CACHE = 64
# entries (messages the server still owes an answer to) beyond which the frontend stops reading
# the caller until answers have gone out: a caller pipelining without reading holds up only itself
MAX_PENDING = 8192

# error fields that can echo a value back (a key in DETAIL, a literal in a context line, a query)
_TEXT_FIELDS = frozenset(
    str(code) for code in (ErrorField.MESSAGE, ErrorField.DETAIL, ErrorField.HINT, ErrorField.WHERE, ErrorField.INTERNAL_QUERY)
)

# SQLSTATEs (errcodes.txt names in comments)
INSUFFICIENT_PRIVILEGE = "42501"  # insufficient_privilege: Bastion refused the statement
UNDEFINED_STATEMENT = "26000"  # invalid_sql_statement_name: no such prepared statement
UNDEFINED_CURSOR = "34000"  # invalid_cursor_name: no such portal
PROTOCOL_VIOLATION = "08P01"
ADMIN_SHUTDOWN = "57P01"
IDLE_SESSION_TIMEOUT = "57P05"
INVALID_AUTHORIZATION = "28000"
FEATURE_NOT_SUPPORTED = "0A000"

# The message a refused one is replaced with. It cannot parse, so the server rejects it at once
# and changes nothing but the transaction's state; the name keeps it apart from any statement
# of the caller's, and the text says in the server's log what happened.
POISON_TEXT = "BASTION REFUSED THIS STATEMENT"
POISON_PARSE = codec.encode(Parse("bastion_refused", POISON_TEXT))
POISON_QUERY = codec.encode(Query(POISON_TEXT))
EMPTY_QUERY = codec.encode(Query(""))  # stands in for a statement Bastion answers itself
SET_COMPLETE = codec.encode(CommandComplete("SET"))
# The masked-cell count of a response for values masked in the server's error or notice text.
ECHOED_VALUES_KEY = "echoed-value"
# The Bind of a statement Bastion answers itself: nothing to authorize (it reaches no data).
_ANSWERED_BY_BASTION = Judgement(0, (), Decision.allow("bastion:settings", "Bastion answers this statement itself"))

# client encodings whose text is read correctly as UTF-8 (the codec reads strings as UTF-8):
# SQL_ASCII passes the database's UTF-8 bytes through unconverted. Names are compared the way
# PostgreSQL compares them: letters and digits only, case-insensitive ('utf-8' is UTF8).
SUPPORTED_ENCODINGS = frozenset({"UTF8", "UNICODE", "SQLASCII"})


def encoding_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", name).upper()

_HEADER = struct.Struct(">ci")
_UNSET = object()

# entry kinds: what the server owes an answer to
QUERY, PARSE, BIND, DESCRIBE_S, DESCRIBE_P, EXECUTE, CLOSE_S, CLOSE_P, SYNC, FUNCTION, REFUSED, TXN_POISON = range(12)
_TERMINATORS = (SYNC, QUERY, FUNCTION)
_EXTENDED = frozenset({PARSE, BIND, DESCRIBE_S, DESCRIBE_P, EXECUTE, CLOSE_S, CLOSE_P, REFUSED})
_DDL_ACTIONS = frozenset({"ddl", "create", "alter", "drop", "comment", "grant", "revoke"})

# Keys in session.state shared with other plugins: the SQL plugin's memory of prepared statements
# (name -> analysis; SQL EXECUTE can run protocol-level statements too) and the client encoding
# the masking plugin reads text cells with.
PREPARED_KEY = "sql.prepared"
CLIENT_ENCODING_KEY = "client_encoding"
HASH_KEY = "gateway.hash_key"  # target_state: the key pseudonyms of parameters are made with

_DEALLOCATE = re.compile(r'\s*deallocate\s+(?:prepare\s+)?(?:"((?:[^"]|"")+)"|([^\s;"]+))', re.I)


# --- what the relay remembers --------------------------------------------------------------------


class Prepared:
    """A statement the caller prepared, with its judged requests and what the server described."""

    __slots__ = ("name", "message", "requests", "param_types", "description", "describing", "setting")

    def __init__(self, name: str, message: Message, requests: tuple, param_types: tuple[int, ...]) -> None:
        self.setting: GatewaySetting | None = None  # a SET bastion.* Bastion answers when executed
        self.name = name
        self.message = message
        self.requests = requests
        self.param_types = param_types
        self.description: tuple[FieldDescription, ...] | None = None  # from Describe S; () NoData
        self.describing = False  # a Describe S went out: a description arrives before any use


class Portal:
    """A bound statement: the Bind's judgement (request number) and its result formats."""

    __slots__ = ("name", "statement", "request_no", "judgement", "result_formats", "description", "describing", "plans")

    def __init__(self, name: str, statement: Prepared, judgement, result_formats: tuple[int, ...]) -> None:
        self.name = name
        self.statement = statement
        self.request_no = judgement.request_no
        self.judgement = judgement if judgement.row_review is not None else None  # rows to pause at
        self.result_formats = result_formats
        self.description: tuple[FieldDescription, ...] | None = None
        self.describing = False
        self.plans: Any = _UNSET  # compiled once per portal, on its first rows


class _UnsupportedEncoding(Exception):
    """The server reports a client_encoding the relay cannot read statements in."""


class _Stall(Exception):
    def __init__(self, batch: int) -> None:
        self.batch = batch


class Names:
    """Statement or portal names: what the server confirmed, and the current batch's speculation."""

    __slots__ = ("confirmed", "speculative")

    def __init__(self) -> None:
        self.confirmed: dict[str, Any] = {}
        self.speculative: dict[str, tuple[Any, int]] = {}

    def lookup(self, name: str, batch: int, acked: int) -> Any:
        """The object ``name`` means for a message of ``batch``; raises _Stall(b) when that
        depends on batch ``b``, still unanswered."""
        guess = self.speculative.get(name)
        if guess is not None:
            obj, defined_in = guess
            if defined_in == batch:
                return obj
            if defined_in > acked:
                raise _Stall(defined_in)
            del self.speculative[name]
        return self.confirmed.get(name)

    def define(self, name: str, obj: Any, batch: int) -> None:
        self.speculative[name] = (obj, batch)

    def confirm(self, name: str, obj: Any) -> None:
        if obj is None:
            self.confirmed.pop(name, None)
        else:
            self.confirmed[name] = obj

    def clear(self) -> None:
        self.confirmed.clear()
        self.speculative.clear()


class _Entry:
    """One message the server owes an answer to."""

    __slots__ = ("kind", "batch", "request_no", "requests", "obj", "name", "refusal", "swallow", "started", "index", "failed", "judgement", "answer")

    def __init__(self, kind: int, batch: int = 0) -> None:
        self.kind = kind
        self.batch = batch
        self.request_no = 0
        self.requests: tuple = ()
        self.obj: Any = None
        self.name = ""
        self.refusal: bytes | None = None  # Bastion's ErrorResponse, sent in place of the server's
        self.swallow = False  # injected by Bastion: the caller never sees the answer
        self.started = 0.0
        self.index = 0  # simple Query: which statement's result comes next
        self.failed = False
        self.judgement: Any = None  # kept when its result must pause for a reviewer (rows_over)
        self.answer: bytes | None = None  # Bastion's own answer in place of an EmptyQueryResponse


class _Result:
    """One result set (or one statement's outcome) on its way to the caller."""

    __slots__ = (
        "request_no", "request", "columns", "formats", "plans", "rows", "bytes", "pending", "first_row",
        "budget", "withheld", "started", "passthrough", "copy", "copy_options", "copy_header",
        "judgement", "row_limit", "cancelled",
    )

    def __init__(self, request_no: int, request: Any, started: float, budget: int | None) -> None:
        self.request_no = request_no
        self.request = request
        self.columns: tuple[str, ...] = ()
        self.formats: tuple[int, ...] = ()
        self.plans: list = []
        self.rows = 0
        self.bytes = 0
        self.pending: list[tuple] = []
        self.first_row = 0
        self.budget = budget  # rows still to record; None: all
        self.withheld: str | None = None
        self.started = started
        self.passthrough = True
        self.copy = False
        self.copy_options: dict | None = None
        self.copy_header = False
        self.judgement: Any = None
        self.row_limit: int | None = None  # rows sent before a reviewer must approve the rest
        self.cancelled = False  # Bastion cancelled the statement upstream (a reviewer said no)


# --- the relay ------------------------------------------------------------------------------------


class Relay:
    def __init__(self, session, options, client: trio.abc.Stream, client_decoder, upstream, encoding: str) -> None:
        self.session = session
        self.options = options
        self.client = client
        self.client_decoder = client_decoder
        self.upstream = upstream.stream
        self.upstream_decoder = upstream.decoder
        self.process_id = upstream.process_id
        self.upstream_key = upstream.secret_key
        self.rows_approved: set[int] = set()  # requests whose results a reviewer let through
        self.descriptions: dict[bytes, tuple[FieldDescription, ...]] = {}
        self.shapes: dict[tuple, tuple] = {}  # see _shape
        self.unrecorded: list[int] = []  # requests the server skipped, to record as not run
        self.answered: set[int] = set()  # requests of the current batch already recorded as failed
        self.hooks = session.hooks
        self.mask_texts = session.hooks.has_text_transforms()
        self.record_rows = session.record_rows_limit
        self.batch_bytes = options.write_batch_bytes
        self.idle_timeout = session.config.idle_timeout
        # tables
        self.statements = Names()
        self.portals = Names()
        self.pending: deque[_Entry] = deque()
        self.batch = 1  # the frontend's open batch (number of terminators forwarded + 1)
        self.acked = 0  # batches the server has finished answering
        self.upstream_hold: trio.Event | None = None  # set while a cancel Bastion sent is in flight
        self.upstream_hold_batch = 0
        self.acked_event: trio.Event | None = None  # set when someone waits for an answer
        self.popped_event = trio.Event()
        self.discarding = False  # frontend: a refused extended message; drop until Sync
        self.skipping = False  # backend: the server skips to the next Sync
        self.suppressing = False  # backend: a result was withheld; drop until ReadyForQuery
        self.result: _Result | None = None
        self.tx_status = "I"
        self.ddl_seen = False
        self.refresh_catalog = False
        self.terminating = False
        # output buffers
        self.to_client: list[bytes] = []
        self.to_client_size = 0
        self.to_upstream: list[bytes] = []
        self.to_upstream_size = 0
        self.client_io = Channel(client)
        self.upstream_io = Channel(upstream.stream)
        self.client_lock = Gate()
        self.upstream_lock = Gate()
        self.client_clean = True  # no write to the caller was cut short
        self.upstream_clean = True
        self.encoding = encoding
        self.nursery: trio.Nursery | None = None
        self.catalog_reader = None  # set by the handler: reads the catalog on its own connection
        self.session_state = session.info.state
        self.session_state[CLIENT_ENCODING_KEY] = encoding

    # --- running ----------------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            if self.catalog_reader is not None:
                catalog.refresh_if_old(self.session.target.state, float(self.options.catalog_refresh), self.catalog_reader, self._background())
            nursery.start_soon(self._backend_task, nursery.cancel_scope)
            await self._frontend_task(nursery.cancel_scope)

    async def _frontend_task(self, scope: trio.CancelScope) -> None:
        try:
            await self._pump_frontend()
        except ProtocolError as exc:
            self.session.end_reason = f"client protocol error: {exc.message}"
            await self._say_to_client(codec.encode(exc.error_response()))
            raise ClientProtocolError(f"client protocol error: {exc.message}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.session.end_reason = self.session.end_reason or "connection lost"
        finally:
            scope.cancel()

    async def _backend_task(self, scope: trio.CancelScope) -> None:
        try:
            await self._pump_backend()
        except ProtocolError as exc:
            self.session.end_reason = f"upstream protocol error: {exc.message}"
            await self._say_to_client(codec.encode(ErrorResponse.build(PROTOCOL_VIOLATION, "the database server broke the protocol", severity="FATAL")))
            raise SessionError(self.session.end_reason) from None
        except _UnsupportedEncoding as exc:
            # the SET already ran on the server: the session cannot go on, but the caller is told why
            self.session.end_reason = str(exc)
            fatal = codec.encode(ErrorResponse.build(FEATURE_NOT_SUPPORTED, f"{exc}; the session ends", severity="FATAL", hint="use UTF8"))
            await self._say_to_client(b"".join(self.to_client) + fatal)  # what was already answered, then why
            raise SessionError(str(exc)) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.session.end_reason = self.session.end_reason or "connection lost"
        finally:
            scope.cancel()

    async def farewell(self, reason: str) -> None:
        """Gateway shutdown or an expired credential: a FATAL error, unless a write was cut short."""
        if not self.client_clean:
            return
        if "expired" in reason:
            data = ErrorResponse.build(INVALID_AUTHORIZATION, "terminating connection because the caller's credential expired", severity="FATAL")
        else:
            data = ErrorResponse.build(ADMIN_SHUTDOWN, "terminating connection due to administrator command", severity="FATAL", detail=f"Bastion: {reason}")
        with trio.move_on_after(1):
            await self.client_io.send_all(codec.encode(data))

    async def close_upstream(self) -> None:
        """Say goodbye to the server (Terminate) when the stream is whole, then close it."""
        if self.upstream_clean and not self.terminating:
            with trio.move_on_after(0.5) as scope:
                scope.shield = True
                try:
                    await self.upstream_io.send_all(b"X\x00\x00\x00\x04")
                except Exception:
                    pass
        await trio.aclose_forcefully(self.upstream)

    # --- output -----------------------------------------------------------------------------------

    async def _flush_client(self) -> None:
        if not self.to_client:
            return
        data = b"".join(self.to_client) if len(self.to_client) > 1 else self.to_client[0]
        self.to_client.clear()
        self.to_client_size = 0
        async with self.client_lock:
            self.client_clean = False
            await self.client_io.send_all(data)
            self.client_clean = True
        self.session.bytes_to_client += len(data)

    async def _flush_upstream(self) -> None:
        if not self.to_upstream:
            return
        data = b"".join(self.to_upstream) if len(self.to_upstream) > 1 else self.to_upstream[0]
        self.to_upstream.clear()
        self.to_upstream_size = 0
        async with self.upstream_lock:
            self.upstream_clean = False
            await self.upstream_io.send_all(data)
            self.upstream_clean = True

    async def _say_to_client(self, data: bytes) -> None:
        """A last message (a FATAL error) when the session is ending; the caller may be gone."""
        if not self.client_clean:
            return
        try:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                async with self.client_lock:
                    await self.client_io.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def _up(self, data: bytes) -> None:
        self.to_upstream.append(data)
        self.to_upstream_size += len(data)

    def _down(self, data: bytes) -> None:
        self.to_client.append(data)
        self.to_client_size += len(data)

    # --- frontend: the caller's messages ----------------------------------------------------------

    async def _pump_frontend(self) -> None:
        decoder = self.client_decoder
        client = self.client_io
        session = self.session
        while True:
            frame = decoder.next_frame()
            if frame is NEED_DATA:
                if self.to_upstream:
                    await self._flush_upstream()
                if self.idle_timeout and not self.pending:
                    with trio.move_on_after(self.idle_timeout) as idle:
                        data = await client.receive(RECEIVE_BYTES)
                    if idle.cancelled_caught:
                        session.end_reason = "idle timeout"
                        await self._say_to_client(codec.encode(ErrorResponse.build(IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout", severity="FATAL")))
                        return
                else:
                    data = await client.receive(RECEIVE_BYTES)
                decoder.receive_data(data)
                continue
            if frame is END_OF_STREAM:
                session.end_reason = session.end_reason or "client disconnected"
                return
            kind, body = frame
            session.bytes_from_client += len(body) + 5
            if self.upstream_hold is not None and self.batch > self.upstream_hold_batch:
                # a later batch waits while the cancel of a denied result is in flight (see
                # _pause_for_review); what belongs to that batch (its Sync) has gone already
                await self._flush_upstream()
                while self.upstream_hold is not None:
                    await self.upstream_hold.wait()
            if self.discarding and kind != b"S" and kind != b"X":
                continue  # the server would skip these too, after the refused message
            if len(self.pending) >= MAX_PENDING:
                await self._wait_for_answers()
            if kind == b"B":
                await self._bind(body)
            elif kind == b"E":
                await self._execute(body)
            elif kind == b"S":
                self._terminate_batch(_Entry(SYNC))
                self.discarding = False
                self._up(b"S\x00\x00\x00\x04")
                await self._flush_upstream()
            elif kind == b"Q":
                await self._query(body)
            elif kind == b"P":
                await self._parse(body)
            elif kind == b"D":
                await self._describe(body)
            elif kind == b"d" or kind == b"c" or kind == b"f":
                self._up(_HEADER.pack(kind, len(body) + 4) + body)  # COPY data: goes into the database
            elif kind == b"C":
                await self._close(body)
            elif kind == b"H":
                self._up(b"H\x00\x00\x00\x04")
                await self._flush_upstream()
            elif kind == b"F":
                await self._function_call(body)
            elif kind == b"X":
                session.end_reason = "client terminated the session"
                self.terminating = True
                self._up(b"X\x00\x00\x00\x04")
                await self._flush_upstream()
                return
            else:
                raise ProtocolError(f"unexpected message {kind!r} from the client")
            if self.to_upstream_size >= self.batch_bytes:
                await self._flush_upstream()

    async def _wait_for_answers(self) -> None:
        """Too many answers owed: let the server catch up (a Flush makes it send what it holds)."""
        self._up(b"H\x00\x00\x00\x04")
        await self._flush_upstream()
        while len(self.pending) >= MAX_PENDING:
            event = self.popped_event = trio.Event()
            await event.wait()

    def _terminate_batch(self, entry: _Entry) -> None:
        entry.batch = self.batch
        self.batch += 1
        self.pending.append(entry)

    async def _wait_acked(self, batch: int) -> None:
        await self._flush_upstream()
        while self.acked < batch:
            if self.acked_event is None:
                self.acked_event = trio.Event()
            await self.acked_event.wait()

    async def _lookup(self, table: Names, name: str) -> Any:
        while True:
            try:
                return table.lookup(name, self.batch, self.acked)
            except _Stall as stall:
                await self._wait_acked(stall.batch)

    async def _before_judging(self) -> None:
        if self.refresh_catalog and self.catalog_reader is not None:
            self.refresh_catalog = False
            await catalog.wait_fresh(self.session.target.state, self.catalog_reader, self._background())

    def _background(self) -> trio.Nursery:
        # A catalog refresh belongs to the target: a short session that ends must not cancel it
        # (it would never complete when every session is shorter than the read).
        return self.session.runtime.background or self.nursery

    async def _check(self, message: Message, *, kind: str, parameters, judged):
        session = self.session
        if judged[1].verdict is not Verdict.REVIEW:
            return await session.check(message, parameters=parameters, kind=kind, judged=judged)
        # A reviewer may take minutes: send what is already judged, and watch the caller meanwhile,
        # so that a caller who hangs up withdraws its request instead of leaving it pending.
        await self._flush_upstream()
        outcome: list = []

        async def check_then_stop(scope: trio.CancelScope) -> None:
            outcome.append(await session.check(message, parameters=parameters, kind=kind, judged=judged))
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(check_then_stop, nursery.cancel_scope)
            await self._watch_caller()
            nursery.cancel_scope.cancel()
        if not outcome:
            session.end_reason = "client disconnected while a statement was held for review"
            raise trio.BrokenResourceError("the caller hung up while its statement was held")
        return outcome[0]

    async def _watch_caller(self) -> None:
        """Return when the caller hangs up; keep what it sends meanwhile for later (bounded)."""
        decoder = self.client_decoder
        while decoder.buffered < HELD_INPUT_BYTES:
            data = await self.client_io.receive(RECEIVE_BYTES)
            decoder.receive_data(data)
            if not data:
                return
        await trio.sleep_forever()  # enough is buffered: the caller waits like everyone else

    async def notify(self, text: str) -> None:
        """Tell a caller whose statement is held (e.g. the approval request's id): a NOTICE."""
        data = codec.encode(NoticeResponse.build("00000", text, severity="NOTICE"))
        async with self.client_lock:
            self.client_clean = False
            await self.client_io.send_all(data)
            self.client_clean = True

    def _hash_key(self) -> bytes:
        return self.session.target.state.get(HASH_KEY, b"")

    def _refusal(self, judgement) -> bytes:
        decision = judgement.decision
        rules = ", ".join(decision.rules) or "default-deny"
        return codec.encode(
            ErrorResponse.build(
                INSUFFICIENT_PRIVILEGE,
                f"Bastion refused this statement: {decision.summary}",
                detail=f"Rule: {rules}. Request {judgement.request_no} of session {self.session.id}.",
            )
        )

    async def _refuse_setting(self, exc: SettingError, *, extended: bool = False) -> None:
        """A ``SET bastion.*`` Bastion will not take: refused like a denied statement, recorded."""
        await self.session.record_own_answer("SET bastion.* ?", "bastion:settings", exc.message, kind="parse" if extended else "statement", allowed=False)
        refusal = codec.encode(ErrorResponse.build(exc.sqlstate, exc.message))
        if extended:
            self._refuse_extended(refusal)
            return
        entry = _Entry(QUERY)
        entry.refusal = refusal
        self._up(POISON_QUERY)
        self._terminate_batch(entry)

    def _refuse_extended(self, refusal: bytes) -> None:
        """Replace the current extended-protocol message with the poison; skip to Sync."""
        entry = _Entry(REFUSED, self.batch)
        entry.refusal = refusal
        self.pending.append(entry)
        self._up(POISON_PARSE)
        self.discarding = True

    async def _query(self, body: bytes) -> None:
        text = codec.decode_frontend(b"Q", body).query
        try:
            setting = read_gateway_setting(text)
        except SettingError as exc:
            await self._refuse_setting(exc)
            return
        if setting is not None:
            await self.session.give_justification(setting.value)
            entry = _Entry(QUERY)
            entry.answer = SET_COMPLETE
            self._up(EMPTY_QUERY)
            self._terminate_batch(entry)
            return
        await self._before_judging()
        message = Message("postgres", "statement", text=text, dialect="postgres")
        judgement = await self._check(message, kind="statement", parameters=(), judged=self.session.judge(message))
        entry = _Entry(QUERY)
        entry.started = time.monotonic()
        if judgement.allowed:
            entry.request_no = judgement.request_no
            entry.requests = judgement.requests
            if judgement.row_review is not None:
                entry.judgement = judgement
            self._up(_HEADER.pack(b"Q", len(body) + 4) + body)
        else:
            entry.refusal = self._refusal(judgement)
            self._up(POISON_QUERY)
        self._terminate_batch(entry)

    async def _parse(self, body: bytes) -> None:
        parse = codec.decode_frontend(b"P", body)
        try:
            setting = read_gateway_setting(parse.query)
        except SettingError as exc:
            await self._refuse_setting(exc, extended=True)
            return
        if setting is not None:
            # the server prepares an empty statement under the caller's name; Execute answers SET
            statement = Prepared(parse.name, Message("postgres", "statement", text="", dialect="postgres"), (), parse.param_type_oids)
            statement.setting = setting
            wire = codec.encode(Parse(parse.name, "", parse.param_type_oids))
        else:
            await self._before_judging()
            session = self.session
            message = Message("postgres", "statement", text=parse.query, dialect="postgres")
            requests, decision = session.judge(message)
            if decision.verdict is Verdict.DENY:
                judgement = await session.check(message, kind="parse", judged=(requests, decision))
                self._refuse_extended(self._refusal(judgement))
                return
            statement = Prepared(parse.name, message, tuple(requests), parse.param_type_oids)
            wire = _HEADER.pack(b"P", len(body) + 4) + body
        self.statements.define(parse.name, statement, self.batch)
        entry = _Entry(PARSE, self.batch)
        entry.name = parse.name
        entry.obj = statement
        self.pending.append(entry)
        self._up(wire)

    async def _bind(self, body: bytes) -> None:
        bind = codec.decode_frontend(b"B", body)
        statement = await self._lookup(self.statements, bind.statement)
        if statement is None:
            name = f'prepared statement "{bind.statement}"' if bind.statement else "unnamed prepared statement"
            self._refuse_extended(codec.encode(ErrorResponse.build(UNDEFINED_STATEMENT, f"{name} does not exist")))
            return
        session = self.session
        if statement.setting is not None:
            judgement = _ANSWERED_BY_BASTION  # nothing reaches the server: recorded when executed
        else:
            parameters = _masked_parameters(bind.params, bind.param_formats, statement.param_types, self._hash_key())
            requests = list(statement.requests)
            decision = authorize_requests(session, requests)
            judgement = await self._check(statement.message, kind="execute", parameters=parameters, judged=(requests, decision))
            if not judgement.allowed:
                self._refuse_extended(self._refusal(judgement))
                return
        portal = Portal(bind.portal, statement, judgement, bind.result_formats)
        self.portals.define(bind.portal, portal, self.batch)
        entry = _Entry(BIND, self.batch)
        entry.name = bind.portal
        entry.obj = portal
        entry.request_no = judgement.request_no
        self.pending.append(entry)
        self._up(_HEADER.pack(b"B", len(body) + 4) + body)

    async def _execute(self, body: bytes) -> None:
        execute = codec.decode_frontend(b"E", body)
        portal = await self._lookup(self.portals, execute.portal)
        if portal is None:
            self._refuse_extended(codec.encode(ErrorResponse.build(UNDEFINED_CURSOR, f'portal "{execute.portal}" does not exist')))
            return
        if portal.statement.setting is not None:
            await self.session.give_justification(portal.statement.setting.value, kind="execute")
            entry = _Entry(EXECUTE, self.batch)
            entry.obj = portal
            entry.answer = SET_COMPLETE
            self.pending.append(entry)
            self._up(_HEADER.pack(b"E", len(body) + 4) + body)
            return
        if not portal.describing and portal.description is None and not portal.statement.describing and portal.statement.description is None:
            # nobody asked what the rows look like: ask, so they can be masked, and keep the answer
            portal.describing = True
            describe = _Entry(DESCRIBE_P, self.batch)
            describe.obj = portal
            describe.swallow = True
            self.pending.append(describe)
            self._up(codec.encode(Describe("P", execute.portal)))
        entry = _Entry(EXECUTE, self.batch)
        entry.obj = portal
        entry.request_no = portal.request_no
        entry.requests = portal.statement.requests
        entry.started = time.monotonic()
        self.pending.append(entry)
        self._up(_HEADER.pack(b"E", len(body) + 4) + body)

    async def _describe(self, body: bytes) -> None:
        describe = codec.decode_frontend(b"D", body)
        if describe.kind == "S":
            obj = await self._lookup(self.statements, describe.name)
            entry = _Entry(DESCRIBE_S, self.batch)
        else:
            obj = await self._lookup(self.portals, describe.name)
            entry = _Entry(DESCRIBE_P, self.batch)
        if obj is not None:
            obj.describing = True
        entry.obj = obj
        self.pending.append(entry)
        self._up(_HEADER.pack(b"D", len(body) + 4) + body)

    async def _close(self, body: bytes) -> None:
        close = codec.decode_frontend(b"C", body)
        table = self.statements if close.kind == "S" else self.portals
        table.define(close.name, None, self.batch)
        entry = _Entry(CLOSE_S if close.kind == "S" else CLOSE_P, self.batch)
        entry.name = close.name
        self.pending.append(entry)
        self._up(_HEADER.pack(b"C", len(body) + 4) + body)

    async def _function_call(self, body: bytes) -> None:
        call = codec.decode_frontend(b"F", body)
        text = f"fast-path call of function {call.function_oid}"
        message = Message("postgres", "function-call", text=text, args=(call.function_oid, len(call.args)))
        # the request is the protocol's own: no SQL to parse, and its action is the capability
        # (function-call) a grant must have; nothing allows it by default
        request = Request(message=message, action="function-call", functions=frozenset({f"oid:{call.function_oid}"}), redacted_text=text)
        parameters = _masked_parameters(call.args, call.arg_formats, (), self._hash_key())
        judgement = await self._check(message, kind="function-call", parameters=parameters, judged=([request], authorize_requests(self.session, [request])))
        entry = _Entry(FUNCTION)
        entry.started = time.monotonic()
        if judgement.allowed:
            entry.request_no = judgement.request_no
            entry.requests = judgement.requests
            self._up(_HEADER.pack(b"F", len(body) + 4) + body)
        else:
            entry.refusal = self._refusal(judgement)
            self._up(POISON_QUERY)
        self._terminate_batch(entry)

    # --- backend: the server's messages -------------------------------------------------------------

    async def _pump_backend(self) -> None:
        decoder = self.upstream_decoder
        upstream = self.upstream_io
        header = _HEADER.pack
        while True:
            frame = decoder.next_frame()
            if frame is NEED_DATA:
                if self.to_client:
                    await self._flush_client()
                decoder.receive_data(await upstream.receive(RECEIVE_BYTES))
                continue
            if frame is END_OF_STREAM:
                if not self.terminating:
                    self.session.end_reason = self.session.end_reason or "upstream closed the connection"
                await self._flush_client()
                return
            kind, body = frame
            result = self.result
            if kind == b"D" and result is not None:
                if result.passthrough:
                    if not self.suppressing:
                        self.to_client.append(header(b"D", len(body) + 4))
                        self.to_client.append(body)
                        self.to_client_size += len(body) + 5
                    result.rows += 1
                    result.bytes += len(body) + 5
                else:
                    await self._masked_row(result, body)
            else:
                await self._backend_message(kind, body)
                if self.unrecorded:
                    await self._record_skipped()
            if self.to_client_size >= self.batch_bytes:
                await self._flush_client()

    def _head(self) -> _Entry | None:
        pending = self.pending
        if self.skipping:
            while pending and pending[0].kind != SYNC:
                self._skip(pending.popleft())
        return pending[0] if pending else None

    def _pop(self) -> _Entry:
        entry = self.pending.popleft()
        if len(self.pending) < MAX_PENDING:
            self.popped_event.set()
        return entry

    def _forward(self, kind: bytes, body: bytes) -> None:
        if not self.suppressing:
            self.to_client.append(_HEADER.pack(kind, len(body) + 4))
            self.to_client.append(body)
            self.to_client_size += len(body) + 5

    def _skip(self, entry: _Entry) -> None:
        """The server skips this message (an earlier one in its batch failed)."""
        if entry.kind == QUERY or entry.kind == FUNCTION:
            self._acknowledge()  # a Query during skip-to-Sync is ignored: it gets no ReadyForQuery
        if entry.request_no and entry.kind in (QUERY, FUNCTION, EXECUTE) and entry.request_no not in self.answered:
            self.unrecorded.append(entry.request_no)  # recorded by the pump right after
        if len(self.pending) < MAX_PENDING:
            self.popped_event.set()

    async def _record_skipped(self) -> None:
        skipped, self.unrecorded = self.unrecorded, []
        for request_no in skipped:
            await self.session.record_response(request_no, "error", error_message="not run: an earlier message of the batch failed")

    def _acknowledge(self) -> None:
        self.acked += 1
        event = self.acked_event
        if event is not None:  # someone waits for an answer (see _wait_acked)
            self.acked_event = None
            event.set()

    async def _backend_message(self, kind: bytes, body: bytes) -> None:
        if kind == b"C":
            await self._command_complete(body)
        elif kind == b"Z":
            await self._ready_for_query(body)
        elif kind == b"T":
            self._row_description(body)
        elif kind == b"1":
            entry = self._expect(PARSE)
            self.statements.confirm(entry.name, entry.obj)
            self._remember_protocol_statement(entry.name, entry.obj)
            self._forward(kind, body)
        elif kind == b"2":
            entry = self._expect(BIND)
            self.portals.confirm(entry.name, entry.obj)
            self._forward(kind, body)
        elif kind == b"3":
            entry = self._head()
            if entry is None or entry.kind not in (CLOSE_S, CLOSE_P):
                raise ProtocolError("CloseComplete answers no Close")
            self._pop()
            if entry.kind == CLOSE_S:
                self.statements.confirm(entry.name, None)
                self.session_state.get(PREPARED_KEY, {}).pop(entry.name, None)
            else:
                self.portals.confirm(entry.name, None)
            if not entry.swallow:
                self._forward(kind, body)
        elif kind == b"t":
            entry = self._head()
            if entry is None or entry.kind != DESCRIBE_S:
                raise ProtocolError("ParameterDescription answers no Describe")
            if entry.obj is not None:
                entry.obj.param_types = codec.decode_backend(kind, body).type_oids
            self._forward(kind, body)
        elif kind == b"n":
            entry = self._head()
            if entry is None or entry.kind not in (DESCRIBE_S, DESCRIBE_P):
                raise ProtocolError("NoData answers no Describe")
            self._pop()
            if entry.obj is not None:
                entry.obj.description = ()
            if not entry.swallow:
                self._forward(kind, body)
        elif kind == b"E":
            await self._error(body)
        elif kind == b"N":
            self._forward_fields(kind, body, NoticeResponse)
        elif kind == b"S":
            self._parameter_status(body)
            self._forward(kind, body)
        elif kind == b"A":
            self._forward(kind, body)  # LISTEN/NOTIFY: passed on as it is
        elif kind == b"D":
            entry = self._head()
            if entry is None or entry.kind != EXECUTE:
                raise ProtocolError("DataRow outside of a result")
            result = self.result = self._execute_result(entry)
            if result.passthrough:
                self._forward(kind, body)
                result.rows += 1
                result.bytes += len(body) + 5
            else:
                await self._masked_row(result, body)
        elif kind == b"I":
            entry = self._head()
            if entry is None or entry.kind not in (QUERY, EXECUTE):
                raise ProtocolError("EmptyQueryResponse answers no query")
            if entry.kind == EXECUTE:
                self._pop()
            else:
                entry.index += 1
            self.result = None
            if entry.answer is not None:
                self._down(entry.answer)  # the empty statement stood in for a SET Bastion answered
            else:
                self._forward(kind, body)
        elif kind == b"s":
            entry = self._expect(EXECUTE)
            self._pop()
            result = self.result or self._execute_result(entry)
            self.result = None
            await self._finish_result(result, "ok", command_tag="", kind=kind, body=body)
        elif kind == b"G":
            entry = self._head()
            if entry is None or entry.kind not in (QUERY, EXECUTE):
                raise ProtocolError("CopyInResponse answers no query")
            self._forward(kind, body)
            await self._flush_client()  # the caller waits for this before it sends its data
        elif kind == b"H":
            self._copy_out(body)
        elif kind == b"d":
            await self._copy_data(body)
        elif kind == b"c":
            self._forward(kind, body)
        elif kind == b"V":
            entry = self._head()
            if entry is None or entry.kind != FUNCTION:
                raise ProtocolError("FunctionCallResponse answers no FunctionCall")
            await self.session.record_response(entry.request_no, "ok", bytes=len(body) + 5, duration_ms=_ms_since(entry.started))
            self._forward(kind, body)
        elif kind == b"W":
            raise SessionError("the server started a COPY BOTH (replication) stream, which Bastion does not relay")
        else:
            raise ProtocolError(f"unexpected message {kind!r} from the server during the session")

    def _expect(self, kind: int) -> _Entry:
        entry = self._head()
        if entry is None or entry.kind != kind:
            raise ProtocolError("the server's answers are out of step with the requests")
        if kind != EXECUTE:
            self._pop()
        return entry

    def _parameter_status(self, body: bytes) -> None:
        status = codec.decode_backend(b"S", body)
        if status.name == "client_encoding":
            if encoding_key(status.value) not in SUPPORTED_ENCODINGS:
                raise _UnsupportedEncoding(f"client_encoding {status.value} is not supported through Bastion")
            self.encoding = status.value
            self.session_state[CLIENT_ENCODING_KEY] = status.value

    # --- results ------------------------------------------------------------------------------------

    def _new_result(self, request_no: int, request: Any, started: float) -> _Result:
        return _Result(request_no, request, started, self.record_rows)

    def _row_description(self, body: bytes) -> None:
        entry = self._head()
        if entry is None:
            raise ProtocolError("RowDescription answers nothing")
        kind = entry.kind
        if kind == DESCRIBE_S or kind == DESCRIBE_P:
            self._pop()
            if entry.obj is not None:
                # the cached object: a statement described again (each Bind of pgbench -M
                # prepared) then finds its result shape in the shape cache by identity
                entry.obj.description = self._fields(body)
            if not entry.swallow:
                self._forward(b"T", body)
            return
        if kind != QUERY:
            raise ProtocolError("RowDescription answers no query")
        fields = self._fields(body)
        request = entry.requests[entry.index] if entry.index < len(entry.requests) else (entry.requests[-1] if entry.requests else None)
        result = self.result = self._new_result(entry.request_no, request, entry.started)
        self._pause_at(result, entry.judgement)
        self._prepare_result(result, fields, tuple(f.format for f in fields))
        self._forward(b"T", body)

    def _fields(self, body: bytes) -> tuple[FieldDescription, ...]:
        """A RowDescription's fields; a session asks the same few shapes again and again."""
        fields = self.descriptions.get(body)
        if fields is None:
            fields = codec.decode_backend(b"T", body).fields
            if len(self.descriptions) >= DESCRIPTION_CACHE:
                self.descriptions.clear()
            self.descriptions[body] = fields
        return fields

    def _execute_result(self, entry: _Entry) -> _Result:
        portal: Portal = entry.obj
        requests = portal.statement.requests
        request = requests[0] if len(requests) == 1 else None
        result = self._new_result(entry.request_no, request, entry.started)
        self._pause_at(result, portal.judgement)
        fields = portal.description if portal.description is not None else portal.statement.description
        if fields is None:
            result.withheld = "the result's columns are unknown, so it cannot be masked"
            result.passthrough = False
            return result
        try:
            formats = codec.resolve_formats(portal.result_formats, len(fields)) if portal.description is None else tuple(f.format for f in fields)
        except ProtocolError:
            formats = tuple(f.format for f in fields)
        self._prepare_result(result, fields, formats, portal)
        return result

    def _prepare_result(self, result: _Result, fields, formats, portal: Portal | None = None) -> None:
        result.columns = tuple(f.name for f in fields)
        result.formats = formats
        if portal is not None and portal.plans is not _UNSET:
            plans = portal.plans
        else:
            shape = self._shape(fields, formats, result.request)
            try:
                plans = self.session.transform_plans(result.request, shape) if fields else []
            except HookError as exc:
                plans = None
                result.withheld = str(exc)
            if portal is not None and plans is not None:
                portal.plans = plans
        if plans:
            for plan in plans:
                reason = getattr(plan, "deny_reason", None)
                if reason:
                    result.withheld = reason
            result.plans = plans
        result.passthrough = not plans and not result.withheld and not result.budget and result.budget is not None and result.row_limit is None

    def _shape(self, fields, formats, request) -> ResultShape:
        columns_map = self.session.target.state.get(catalog.COLUMNS_KEY) or {}
        analysis = getattr(request, "analysis", None)
        outputs = getattr(analysis, "output_columns", None) or ()
        # A session asks the same few shapes again and again: the same description object (see
        # _fields), the same analysis outputs (the analysis cache) and the same catalog make the
        # same shape. Identity, not equality, so a lookup costs no hashing of the parts.
        key = (id(fields), formats, id(outputs), id(columns_map))
        known = self.shapes.get(key)
        if known is not None and known[0] is fields and known[1] is outputs and known[2] is columns_map:
            return known[3]
        shape = self._new_shape(fields, formats, outputs, columns_map)
        if len(self.shapes) >= DESCRIPTION_CACHE:
            self.shapes.clear()
        self.shapes[key] = (fields, outputs, columns_map, shape)
        return shape

    def _new_shape(self, fields, formats, outputs, columns_map) -> ResultShape:
        if len(outputs) != len(fields):
            outputs = ()
        columns = []
        for index, field in enumerate(fields):
            direct = columns_map.get((field.table_oid, field.column_attnum)) if field.table_oid else None
            sources: set[str] = set()
            if direct is not None:
                sources.add(f"{direct[0]}.{direct[1]}")
            if outputs:
                sources.update(outputs[index].sources)
                traced = outputs[index].traced
            else:
                traced = direct is not None and direct[2] != "v"
            columns.append(
                Column(
                    name=field.name,
                    type_oid=field.type_oid,
                    binary=formats[index] == 1 if index < len(formats) else False,
                    table=direct[0] if direct is not None else None,
                    sources=frozenset(sources),
                    traced=traced,
                )
            )
        return ResultShape(tuple(columns))

    def _pause_at(self, result: _Result, judgement) -> None:
        if judgement is not None and judgement.row_review is not None and judgement.request_no not in self.rows_approved:
            result.judgement = judgement
            result.row_limit = judgement.row_review.rows_over

    async def _pause_for_review(self, result: _Result) -> None:
        """The result reached its review threshold: stop reading the server until a reviewer
        decides; on anything but allow, cancel the statement upstream and withhold the rest."""
        await self._flush_client()
        decision = await self.session.approve_rows(result.judgement, result.row_limit)
        if decision.verdict is Verdict.ALLOW:
            result.row_limit = None
            self.rows_approved.add(result.request_no)  # the approval covers the message's results
            return
        result.withheld = f"a reviewer did not approve more than {result.row_limit} rows: {decision.summary}"
        head = self.pending[0] if self.pending else None
        if head is None or any(entry.batch != head.batch for entry in self.pending):
            # the caller's next statement may already be running on the server, and a cancel
            # would hit it instead: drop the rest of this result as it arrives (memory stays flat)
            return
        # Nothing after this statement has reached the server: cancel it, and send nothing more
        # upstream until its ReadyForQuery (a late cancel must not find the next statement).
        self.upstream_hold = trio.Event()
        self.upstream_hold_batch = head.batch
        result.cancelled = True
        await login.cancel_upstream(self.session, self.process_id, self.upstream_key)

    async def _masked_row(self, result: _Result, body: bytes) -> None:
        result.rows += 1
        if result.withheld:
            return
        if result.row_limit is not None and result.rows > result.row_limit:
            await self._pause_for_review(result)
            if result.withheld:
                return
        values = codec.data_row_values(body)
        try:
            for plan in result.plans:
                plan.apply(values)
        except Exception as exc:  # MaskingError or anything else: the row must not go out
            result.withheld = _why_not_masked(exc)
            return
        if result.plans:
            wire = codec.encode_data_row_values(values)
        else:
            wire = _HEADER.pack(b"D", len(body) + 4) + body
        result.bytes += len(wire)
        if not self.suppressing:
            self._down(wire)
        if result.budget is None or result.budget > 0:
            result.pending.append(_row_text(values, result.formats))
            if result.budget is not None:
                result.budget -= 1
            if len(result.pending) >= ROWS_PER_RECORD:
                await self._record_rows(result)

    async def _record_rows(self, result: _Result) -> None:
        rows = tuple(result.pending)
        result.pending = []
        first = result.first_row
        result.first_row += len(rows)
        await self.session.record(events.ResultRows(session_id=self.session.id, request_no=result.request_no, first_row=first, rows=rows))

    async def _finish_result(self, result: _Result, status: str, *, command_tag: str, kind: bytes, body: bytes) -> None:
        """The end of one result (CommandComplete or PortalSuspended): record it, send the end."""
        if result.pending:
            await self._record_rows(result)
        masked: dict[str, int] = {}
        for plan in result.plans:
            try:
                for key, count in plan.counts().items():
                    masked[key] = masked.get(key, 0) + count
            except Exception:
                pass
        if result.withheld:
            await self.session.record_response(
                result.request_no,
                "denied",
                columns=result.columns,
                rows=result.rows,
                bytes=0,
                masked=masked,
                duration_ms=_ms_since(result.started),
                command_tag=command_tag,
                error_code=INSUFFICIENT_PRIVILEGE,
                error_message=f"result withheld: {result.withheld}",
            )
            self._down(
                codec.encode(
                    ErrorResponse.build(
                        INSUFFICIENT_PRIVILEGE,
                        f"Bastion withheld the result of this statement: {result.withheld}",
                        detail=f"Request {result.request_no} of session {self.session.id}.",
                    )
                )
            )
            self.suppressing = True  # as after any error: nothing more until ReadyForQuery
            return
        if result.request_no:
            await self.session.record_response(
                result.request_no,
                status,
                columns=result.columns,
                rows=result.rows,
                bytes=result.bytes,
                masked=masked,
                duration_ms=_ms_since(result.started),
                command_tag=command_tag,
            )
        self._forward(kind, body)

    async def _command_complete(self, body: bytes) -> None:
        entry = self._head()
        if entry is None or entry.kind not in (QUERY, EXECUTE):
            raise ProtocolError("CommandComplete answers no query")
        tag = _command_tag(body)
        result = self.result
        self.result = None
        if entry.kind == EXECUTE:
            self._pop()
            if result is None:
                result = self._new_result(entry.request_no, entry.requests[0] if len(entry.requests) == 1 else None, entry.started)
            requests = entry.requests
        else:
            index = entry.index
            entry.index += 1
            request = entry.requests[index] if index < len(entry.requests) else None
            if result is None:
                result = self._new_result(entry.request_no, request, entry.started)
            requests = (request,) if request is not None else ()
            entry.started = time.monotonic()  # the next statement of the text starts now
        self._session_effects(requests, tag)
        await self._finish_result(result, "ok", command_tag=tag, kind=b"C", body=body)

    def _session_effects(self, requests, tag: str) -> None:
        """What a statement that succeeded changes in the session: prepared statements, cursors,
        the search path (through the SQL plugin's memory) and the schema (the catalog)."""
        analysed = False
        effective = []  # only statements with a session effect need the SQL plugin's memory
        for request in requests:
            if getattr(request, "action", "") in _DDL_ACTIONS:
                self.ddl_seen = True
            analysis = getattr(request, "analysis", None)
            if analysis is not None:
                analysed = True
                effect = analysis.session_effect
                if not effect:
                    continue
                effective.append(request)
                if effect == "deallocate" and analysis.statement_name is not None:
                    self.statements.confirmed.pop(analysis.statement_name, None)
                    self.statements.speculative.pop(analysis.statement_name, None)
                elif effect in ("deallocate-all", "discard-all"):
                    self.statements.clear()
                    if effect == "discard-all":
                        self.portals.clear()
        if effective:
            _apply_confirmed(self.session_state, effective)
        if analysed:
            return
        # no analysis (a parser that gives none): go by the command tag, erring towards forgetting
        if tag == "DEALLOCATE ALL" or tag == "DISCARD ALL":
            self.statements.clear()
            if tag == "DISCARD ALL":
                self.portals.clear()
        elif tag == "DEALLOCATE":
            name = None
            for request in requests:
                match = _DEALLOCATE.match(getattr(request, "redacted_text", "") or "")
                if match:
                    name = match[1].replace('""', '"') if match[1] is not None else match[2].lower()
            if name is None:
                self.statements.clear()
            else:
                self.statements.confirmed.pop(name, None)
                self.statements.speculative.pop(name, None)
        elif tag.startswith(("CREATE", "ALTER", "DROP", "SELECT INTO", "COMMENT")) and not tag.startswith(("CREATE ROLE", "ALTER ROLE", "DROP ROLE")):
            self.ddl_seen = True

    def _remember_protocol_statement(self, name: str, statement: Prepared) -> None:
        """A named protocol-level statement can also be run with SQL ``EXECUTE name``."""
        if not name:
            return
        prepared = self.session_state.setdefault(PREPARED_KEY, {})
        if len(statement.requests) == 1 and getattr(statement.requests[0], "analysis", None) is not None:
            prepared[name] = statement.requests[0].analysis
        else:
            prepared.pop(name, None)

    async def _ready_for_query(self, body: bytes) -> None:
        entry = self._head()
        if entry is None or entry.kind not in (SYNC, QUERY, FUNCTION, TXN_POISON):
            raise ProtocolError("ReadyForQuery answers no Sync or Query")
        self._pop()
        self.skipping = False
        self.result = None
        if self.answered:
            self.answered.clear()
        status = body[:1].decode("latin-1")
        hold = self.upstream_hold
        if hold is not None and entry.batch >= self.upstream_hold_batch:
            self.upstream_hold = None  # the cancelled statement is over: the caller's next may go
            hold.set()
        if entry.kind == TXN_POISON:
            return  # Bastion's own: the caller already has its ReadyForQuery
        self._acknowledge()
        self.tx_status = status
        if status == "I":
            self.portals.confirmed.clear()  # portals end with their transaction
            if self.ddl_seen:
                self.ddl_seen = False
                catalog.mark_stale(self.session.target.state)
                self.refresh_catalog = True
        if self.suppressing:
            self.suppressing = False
            if status == "T":
                # a withheld result inside a transaction block: make the block fail, as an error
                # would have, so it cannot commit what the caller was told went wrong
                await self._poison_transaction()
                body = b"E"
        self._forward(b"Z", body)
        await self._flush_client()

    async def _poison_transaction(self) -> None:
        entry = _Entry(TXN_POISON)
        entry.swallow = True
        self.pending.append(entry)
        async with self.upstream_lock:
            self.upstream_clean = False
            await self.upstream_io.send_all(POISON_QUERY)
            self.upstream_clean = True

    async def _error(self, body: bytes) -> None:
        entry = self._head()
        if entry is None:
            self._forward_fields(b"E", body, ErrorResponse)
            return
        kind = entry.kind
        if kind == TXN_POISON:
            return
        if entry.refusal is not None:
            # the poison failed as intended: the caller gets Bastion's refusal instead
            if kind == REFUSED:
                self._pop()
                self.skipping = True
            else:
                entry.failed = True
            if not self.suppressing:
                self._down(entry.refusal)
            if entry.request_no:
                await self.session.record_response(entry.request_no, "denied", error_code=INSUFFICIENT_PRIVILEGE)
            return
        error = codec.decode_backend(b"E", body)
        code = error.sqlstate or ""
        result = self.result
        self.result = None
        if result is not None and result.cancelled:
            # the cancel Bastion sent after a reviewer's no: the caller gets the reason instead
            await self._finish_result(result, "denied", command_tag="", kind=b"E", body=body)
            if kind in _EXTENDED:
                self._pop()
                self.skipping = True
            else:
                entry.failed = True
            return
        if kind == QUERY or kind == FUNCTION:
            entry.failed = True
            request_no = entry.request_no
        elif kind == SYNC:
            request_no = 0  # the implicit COMMIT at Sync failed (e.g. a deferred constraint)
        else:
            self._pop()
            # a Bind can fail too (a bad parameter, or an error planning with its values)
            request_no = entry.request_no if kind == EXECUTE or kind == BIND else 0
            if kind == PARSE and entry.name == "":
                self.statements.confirm("", None)  # the server dropped the old unnamed statement
            elif kind == BIND and entry.name == "":
                self.portals.confirm("", None)
            self.skipping = True
        fields, echoed = self._masked_fields(error)
        if request_no:
            self.answered.add(request_no)
            rows = result.rows if result is not None else 0
            if result is not None and result.pending:
                await self._record_rows(result)
            message = next((value for field, value in fields if field == "M"), "") if fields is not None else error.message or ""
            await self.session.record_response(
                request_no,
                "error",
                rows=rows,
                duration_ms=_ms_since(entry.started) if entry.started else 0.0,
                error_code=code,
                error_message=message,
                masked={ECHOED_VALUES_KEY: echoed} if echoed else {},
            )
        self._forward_fields(b"E", body, ErrorResponse, fields)

    def _masked_fields(self, message) -> tuple[tuple | None, int]:
        """An error's or notice's fields with those that can echo values masked (None: nothing
        to mask), and how many of them masking changed (counted in the response record)."""
        if not self.mask_texts:
            return None, 0
        changed = 0
        fields = []
        for code, value in message.fields:
            if code in _TEXT_FIELDS:
                masked = self._masked_text(value)
                if masked != value:
                    changed += 1
                value = masked
            fields.append((code, value))
        return tuple(fields), changed

    def _masked_text(self, text: str) -> str:
        if not self.mask_texts or not text:
            return text
        try:
            return self.session.mask_text(text)
        except HookError:
            return "(withheld by Bastion: the text could not be masked)"

    def _forward_fields(self, kind: bytes, body: bytes, cls, fields: tuple | None = None) -> None:
        """An ErrorResponse or NoticeResponse, with the fields that can echo values masked
        (``fields``: already masked by the caller; None: masked here)."""
        if self.suppressing and kind == b"E":
            return
        if not self.mask_texts:
            self._forward(kind, body)
            return
        if fields is None:
            fields, _ = self._masked_fields(codec.decode_backend(kind, body))
        self._down(codec.encode(cls(fields)))

    # --- COPY TO STDOUT --------------------------------------------------------------------------------

    def _copy_out(self, body: bytes) -> None:
        entry = self._head()
        if entry is None or entry.kind not in (QUERY, EXECUTE):
            raise ProtocolError("CopyOutResponse answers no query")
        response = codec.decode_backend(b"H", body)
        if entry.kind == QUERY:
            request = entry.requests[entry.index] if entry.index < len(entry.requests) else None
        else:
            request = entry.requests[0] if len(entry.requests) == 1 else None
        result = self.result = self._new_result(entry.request_no, request, entry.started)
        result.copy = True
        self._pause_at(result, entry.judgement if entry.kind == QUERY else entry.obj.judgement)
        width = len(response.column_formats)
        analysis = getattr(request, "analysis", None)
        outputs = getattr(analysis, "output_columns", None) or ()
        names = tuple(o.name for o in outputs) if len(outputs) == width else tuple(f"column{i + 1}" for i in range(width))
        result.columns = names
        result.formats = response.column_formats
        columns = []
        for index in range(width):
            output = outputs[index] if len(outputs) == width else None
            columns.append(
                Column(
                    name=names[index],
                    binary=response.overall_format == 1,
                    sources=output.sources if output is not None else frozenset(),
                    traced=output.traced if output is not None else False,
                )
            )
        shape = ResultShape(tuple(columns), origin="copy")
        try:
            plans = self.session.transform_plans(request, shape) if width else []
        except HookError as exc:
            plans, result.withheld = [], str(exc)
        for plan in plans:
            reason = getattr(plan, "deny_reason", None)
            if reason:
                result.withheld = reason
        result.plans = plans
        if plans and not result.withheld:
            if response.overall_format == 1:
                result.withheld = "binary COPY data cannot be masked"
            else:
                options = _copy_options(request)
                if options is None:
                    result.withheld = "the COPY statement's options could not be read, so its data cannot be masked"
                else:
                    result.copy_options = options
                    result.copy_header = options.pop("header", False)
        result.passthrough = False
        self._forward(b"H", body)

    async def _copy_data(self, body: bytes) -> None:
        result = self.result
        if result is None or not result.copy:
            raise ProtocolError("CopyData outside of a COPY")
        if result.withheld:
            result.rows += 1
            return
        if result.row_limit is not None and result.rows >= result.row_limit and not result.copy_header:
            await self._pause_for_review(result)
            if result.withheld:
                result.rows += 1
                return
        line = body
        if result.copy_header:
            result.copy_header = False  # the CSV header line names columns; it holds no row
        elif result.plans:
            options = result.copy_options
            try:
                for plan in result.plans:
                    line = plan.mask_copy_line(line, options["format"], **{k: v for k, v in options.items() if k != "format"})
            except Exception as exc:
                result.withheld = _why_not_masked(exc)
                result.rows += 1
                return
            result.rows += 1
        else:
            result.rows += 1
        result.bytes += len(line) + 5
        if not self.suppressing:
            self._down(_HEADER.pack(b"d", len(line) + 4) + line)
        if result.budget is None or result.budget > 0:
            result.pending.append((line.decode("utf-8", "replace").rstrip("\n"),))
            if result.budget is not None:
                result.budget -= 1
            if len(result.pending) >= ROWS_PER_RECORD:
                await self._record_rows(result)


def _apply_confirmed(session_state: dict, requests: list) -> None:
    try:
        from bastion.plugins.sql import apply_confirmed
    except ImportError:  # no SQL plugin: nothing keeps analyses per session
        return
    apply_confirmed(session_state, requests)


def authorize_requests(session, requests: list) -> Decision:
    """Authorize already-parsed requests again (at Bind: the policy may have changed since Parse)."""
    if not requests:
        return Decision.deny("empty", "the message carries no statement")
    decisions = [session.hooks.authorize(session.info, request) for request in requests]
    return decisions[0] if len(decisions) == 1 else Decision.combine(decisions)


def _masked_parameters(values, formats, type_oids, hash_key: bytes = b"") -> tuple[str | None, ...]:
    """What the audit trail keeps of Bind or FunctionCall values: never the values themselves."""
    try:
        from bastion.policies.masking import mask_literal_values
    except ImportError:
        return tuple(None if v is None else f"<{len(v)} bytes>" for v in values)
    oids = tuple(type_oids[: len(values)]) + (0,) * max(0, len(values) - len(type_oids))
    return tuple(mask_literal_values(values, formats, oids, hash_key=hash_key))


def _row_text(values: list, formats: tuple[int, ...]) -> tuple[str | None, ...]:
    """A row as the audit trail keeps it: text values as text, binary values as \\x hex."""
    out = []
    for index, value in enumerate(values):
        if value is None:
            out.append(None)
        elif index < len(formats) and formats[index] == 1:
            out.append("\\x" + value.hex())
        else:
            out.append(value.decode("utf-8", "replace"))
    return tuple(out)


def _why_not_masked(exc: Exception) -> str:
    """What the caller and the trail are told when a row could not be masked.

    Only Bastion's own masking errors are worded to hold no value; any other exception (a
    plugin's plan, a bug) may quote the raw cell it failed on, so only its type is told.
    """
    if isinstance(exc, MaskingError) and str(exc):
        return str(exc)
    log.error("a row could not be masked on this result (%s); the result is withheld", type(exc).__name__)
    return f"a row could not be masked ({type(exc).__name__})"


def _command_tag(body: bytes) -> str:
    if body[-1:] != b"\x00" or b"\x00" in body[:-1]:
        raise ProtocolError("malformed CommandComplete")
    return body[:-1].decode("utf-8", "replace")


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3) if started else 0.0


# COPY options, as far as masking needs them: FORMAT, DELIMITER, NULL, QUOTE, ESCAPE, HEADER.
_COPY_WITH = re.compile(r"\bto\s+stdout\b(.*)$", re.I | re.S)
_OPTION = re.compile(
    r"\s*,?\s*(format|delimiter|null|quote|escape|header|csv|binary|text|encoding|force_quote|force\s+quote)"
    r"(?:\s+as)?\s*(\(|'(?:[^']|'')*'|[a-z_]+|\*)?",
    re.I,
)


def _copy_options(request) -> dict | None:
    """The options of ``COPY … TO STDOUT`` from the statement's own text, or None when unsure."""
    if request is None:
        return None
    text = request.message.text
    match = _COPY_WITH.search(text)
    if match is None:
        return None
    rest = match[1].strip().rstrip(";").strip()
    if rest.lower().startswith("with"):
        rest = rest[4:].strip()
    if rest.startswith("(") and rest.endswith(")"):
        rest = rest[1:-1]
    options: dict[str, Any] = {"format": "text"}
    pos = 0
    while pos < len(rest):
        option = _OPTION.match(rest, pos)
        if option is None or option.end() == pos:
            return None
        pos = option.end()
        name = option[1].lower()
        value = option[2]
        if value == "(":  # FORCE_QUOTE (a, b) and the like: skip the list
            end = rest.find(")", pos)
            if end < 0:
                return None
            pos = end + 1
            continue
        literal = value[1:-1].replace("''", "'").encode() if value and value.startswith("'") else None
        if name in ("csv", "binary", "text"):
            options["format"] = name
            if value and value.lower() == "header":
                options["header"] = True
        elif name == "format":
            if not value:
                return None
            options["format"] = value.lower().strip("'")
        elif name == "header":
            options["header"] = value is None or value.lower().strip("'") in ("true", "on", "1", "match")
        elif name in ("delimiter", "null", "quote", "escape"):
            if literal is None:
                return None
            options[name] = literal
    if options["format"] not in ("text", "csv"):
        return None
    return options
