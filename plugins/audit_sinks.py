"""Audit sink kinds: ``file``, ``sqlite``, ``postgres``, ``nats``.

The local segment log is always written and is the source of truth (see
:mod:`bastion.core.audit`); ``[[audit.sinks]] kind = "file"`` only tunes it (directory, fsync).
The other kinds receive copies, fed from the local log by the trail's forwarders: each
``write(records)`` gets records in seq order and returns once they are stored; a record may come
twice (after a crash or a lost acknowledgement), so every sink stores ``(chain, seq)`` once.

Blocking drivers (sqlite3, psycopg) run in worker threads. NATS is spoken directly over a trio
stream: the client protocol is a handful of text lines, and doing it in trio keeps the sink
under the trail's deadlines and cancellation, where nats-py would need its own asyncio loop in a
thread of its own.
"""

from __future__ import annotations

import datetime
import json
import re
import secrets
import sqlite3
import ssl
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from bastion.core import auditlog
from bastion.core.audit import DEFAULT_FSYNC_INTERVAL_MS, DEFAULT_FSYNC_MODE, FSYNC_DOC, FSYNC_MODES, LocalLogSettings
from bastion.core.hookspecs import hookimpl
from bastion.core.secrets import SecretRef
from bastion.core.specs import ComponentContext, SinkSpec

INDEX_FILE = "index.sqlite"
# an identifier we interpolate into SQL: letters, digits and underscores only
SQL_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@hookimpl
def bastion_register_sinks() -> list[SinkSpec]:
    return [
        SinkSpec(kind="file", factory=FileSink.from_options, options=FileOptions, description="the local segment log (always on): directory and fsync mode"),
        SinkSpec(kind="sqlite", factory=SqliteSink.from_options, options=SqliteOptions, description="a queryable index of sessions and events (used by `bastion sessions`)"),
        SinkSpec(kind="postgres", factory=PostgresSink.from_options, options=PostgresOptions, description="one PostgreSQL table shared by many gateways"),
        SinkSpec(kind="nats", factory=NatsSink.from_options, options=NatsOptions, description="NATS JetStream, deduplicated by Nats-Msg-Id = chain:seq"),
    ]


def record_json(record: auditlog.AuditRecord) -> dict[str, Any]:
    """A record as JSON-ready data (exports, the NATS json format, the CLI)."""
    return {
        "chain": record.chain,
        "seq": record.seq,
        "at": record.at,
        "type": record.type,
        "prev_hash": record.prev_hash.hex(),
        "hash": record.hash.hex(),
        "event": record.event,
    }


# --- file -------------------------------------------------------------------------------------------


@attrs.frozen
class FileOptions:
    """``directory``: where segments go (default ``<state_dir>/audit``); ``fsync``: ``"durable"``
    (the default), ``"interval"`` or ``"always"``; ``fsync_interval_ms``: the time between fsyncs
    with ``fsync = "interval"`` (default 100)."""

    directory: Path | None = None
    fsync: str = attrs.field(default=DEFAULT_FSYNC_MODE, validator=attrs.validators.in_(FSYNC_MODES))
    fsync_interval_ms: int = attrs.field(default=DEFAULT_FSYNC_INTERVAL_MS, validator=[attrs.validators.instance_of(int), attrs.validators.gt(0)])


FileOptions.__doc__ = f"{FileOptions.__doc__}\n\n{FSYNC_DOC}"


@attrs.define
class FileSink:
    """Not a forwarded sink: the trail reads ``local_log`` and writes its own log accordingly."""

    name: str
    local_log: LocalLogSettings

    @classmethod
    def from_options(cls, options: FileOptions, context: ComponentContext) -> FileSink:
        return cls(context.name, LocalLogSettings(directory=options.directory, fsync=options.fsync, fsync_interval_ms=options.fsync_interval_ms))

    async def open(self) -> None:
        pass

    async def write(self, records: list[Any]) -> None:
        pass

    async def aclose(self) -> None:
        pass


# --- sqlite ---------------------------------------------------------------------------------------


@attrs.frozen
class SqliteOptions:
    """``path``: the index file (default ``<state_dir>/audit/index.sqlite``)."""

    path: Path | None = None


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    chain TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    type TEXT NOT NULL,
    session_id TEXT NOT NULL,
    request_no INTEGER,
    event TEXT NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (chain, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_session ON events (session_id, at);
CREATE INDEX IF NOT EXISTS events_by_time ON events (at);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    chain TEXT NOT NULL,
    target TEXT,
    protocol TEXT,
    client TEXT,
    identity TEXT,
    provider TEXT,
    client_user TEXT,
    database TEXT,
    decision TEXT,
    started_at REAL NOT NULL,
    ended_at REAL,
    end_reason TEXT,
    requests INTEGER NOT NULL DEFAULT 0,
    denied INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    rows INTEGER NOT NULL DEFAULT 0,
    events INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_start ON sessions (started_at);
CREATE INDEX IF NOT EXISTS sessions_by_identity ON sessions (identity, started_at);
"""
# how long a writer waits for another writer's lock (the gateway and a CLI command may meet)
SQLITE_BUSY_TIMEOUT = 30.0


class _SessionChanges:
    """What a session's new records change in its ``sessions`` row, gathered over one insert:
    the earliest time, the last value each column was given, the sums of the counters."""

    def __init__(self, chain: str) -> None:
        self.chain = chain
        self.started_at: float | None = None
        self.updates: dict[str, Any] = {}
        self.increments: dict[str, int] = {"events": 0}

    def add(self, record: auditlog.AuditRecord) -> None:
        event = record.event
        at = float(event.get("at") or record.at)
        self.started_at = at if self.started_at is None else min(self.started_at, at)
        updates: dict[str, Any] = {}
        kind = record.type
        if kind in ("connection-opened", "session-started", "authentication-failed"):
            updates.update(target=event.get("target"), client=event.get("client"))
            if event.get("protocol"):
                updates["protocol"] = event["protocol"]
        if kind == "session-started":
            identity = event.get("identity") or {}
            updates.update(identity=identity.get("subject"), provider=identity.get("provider"), client_user=event.get("client_user"), database=event.get("database"), decision=event.get("decision"))
        elif kind == "authentication-failed":
            updates.update(client_user=event.get("client_user"), provider=event.get("provider"), decision="rejected", end_reason=f"authentication failed: {event.get('reason', '')}")
        elif kind == "session-ended":
            updates.update(ended_at=at, end_reason=event.get("reason"))
        self.updates.update((k, v) for k, v in updates.items() if v is not None)
        increments = self.increments
        increments["events"] += 1
        if kind == "request":
            increments["requests"] = increments.get("requests", 0) + 1
            if event.get("verdict") != "allow":
                increments["denied"] = increments.get("denied", 0) + 1
        elif kind == "response":
            increments["rows"] = increments.get("rows", 0) + int(event.get("rows") or 0)
            if event.get("status") == "error":
                increments["errors"] = increments.get("errors", 0) + 1

    def apply(self, connection: sqlite3.Connection, session_id: str) -> None:
        connection.execute(
            "INSERT INTO sessions (session_id, chain, started_at) VALUES (?, ?, ?) ON CONFLICT (session_id) DO UPDATE SET started_at = min(started_at, excluded.started_at)",
            (session_id, self.chain, self.started_at),
        )
        assignments = [f"{column} = ?" for column in self.updates] + [f"{column} = {column} + ?" for column in self.increments]
        connection.execute(f"UPDATE sessions SET {', '.join(assignments)} WHERE session_id = ?", (*self.updates.values(), *self.increments.values(), session_id))


class SqliteIndex:
    """The index: blocking, one connection, safe to call from one thread at a time.

    Each record is inserted once (``INSERT OR IGNORE`` on (chain, seq)); a session's row is
    updated only when its event is new, so delivering a record twice never counts it twice.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._connection: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        if self._connection is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT, check_same_thread=False, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # the segment log, not the index, is the durable copy
            connection.executescript(SQLITE_SCHEMA)
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def insert(self, records: Iterable[auditlog.AuditRecord]) -> int:
        """Store records; returns how many were new.

        Each session's row is written once per call, with what all of its new records change
        (the same result as record by record, for a fraction of the statements).
        """
        self.open()
        connection = self._connection
        assert connection is not None
        added = 0
        sessions: dict[str, _SessionChanges] = {}
        with self._lock:
            connection.execute("BEGIN IMMEDIATE")
            try:
                for record in records:
                    if not self._insert_event(connection, record):
                        continue
                    added += 1
                    if record.session_id:
                        changes = sessions.get(record.session_id)
                        if changes is None:
                            changes = sessions[record.session_id] = _SessionChanges(record.chain)
                        changes.add(record)
                for session_id, changes in sessions.items():
                    changes.apply(connection, session_id)
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        return added

    @staticmethod
    def _insert_event(connection: sqlite3.Connection, record: auditlog.AuditRecord) -> bool:
        """Whether the record was new (a record delivered twice is stored and counted once)."""
        request_no = record.event.get("request_no")
        cursor = connection.execute(
            "INSERT OR IGNORE INTO events (chain, seq, at, type, session_id, request_no, event, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (record.chain, record.seq, record.at, record.type, record.session_id, request_no if isinstance(request_no, int) else None, json.dumps(record.event), record.hash),
        )
        return cursor.rowcount == 1

    def positions(self) -> dict[str, int]:
        """The highest seq stored per chain."""
        self.open()
        assert self._connection is not None
        with self._lock:
            return dict(self._connection.execute("SELECT chain, max(seq) FROM events GROUP BY chain").fetchall())

    def catch_up(self, directory: Path, batch: int = 2000) -> int:
        """Index whatever the log in ``directory`` holds beyond what is indexed (the CLI's refresh)."""
        added = 0
        positions = self.positions()
        for slot in auditlog.list_slots(directory):
            chain = auditlog.chain_of(directory, slot)
            if chain is None:
                continue
            cursor = auditlog.ChainCursor(directory, slot)
            after = positions.get(chain, 0)
            while True:
                records = cursor.read(after, None, batch)
                if not records:
                    break
                added += self.insert(records)
                after = records[-1].seq
        return added

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[sqlite3.Row]:
        self.open()
        assert self._connection is not None
        with self._lock:
            self._connection.row_factory = sqlite3.Row
            try:
                return self._connection.execute(sql, parameters).fetchall()
            finally:
                self._connection.row_factory = None


def default_index_path(state_dir: Path) -> Path:
    return Path(state_dir) / auditlog.AUDIT_DIR_NAME / INDEX_FILE


class SqliteSink:
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.index = SqliteIndex(path)

    @classmethod
    def from_options(cls, options: SqliteOptions, context: ComponentContext) -> SqliteSink:
        return cls(context.name, options.path or default_index_path(context.state_dir))

    async def open(self) -> None:
        await trio.to_thread.run_sync(self.index.open)

    async def write(self, records: list[auditlog.AuditRecord]) -> None:
        await trio.to_thread.run_sync(self.index.insert, records)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.index.close)


# --- postgres -----------------------------------------------------------------------------------


@attrs.frozen
class PostgresOptions:
    """Either ``dsn`` (a secret reference holding a libpq connection string or URL) or the parts.

    Several gateways may write one table: rows are keyed by (chain, seq) and inserted once.
    """

    dsn: SecretRef | None = None
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: SecretRef | None = None
    database: str | None = None
    sslmode: str | None = None
    table: str = attrs.field(default="bastion_audit", validator=attrs.validators.matches_re(SQL_IDENTIFIER))
    connect_timeout: int = 10
    statement_timeout_ms: int = 30000

    def __attrs_post_init__(self) -> None:
        if self.dsn is None and self.host is None:
            raise ValueError("give dsn = { env = … } or host (with port, user, password, database)")


class PostgresSink:
    """Rows in ``<table>``: chain, seq, at, type, session_id, hashes, the body (bytea, the exact
    bytes the hash covers) and the event as jsonb for queries (text that jsonb cannot hold — NUL,
    lone surrogates — is replaced there; ``body`` keeps it exactly)."""

    def __init__(self, name: str, options: PostgresOptions, context: ComponentContext) -> None:
        self.name = name
        self.options = options
        self.context = context
        self._connection: Any = None

    @classmethod
    def from_options(cls, options: PostgresOptions, context: ComponentContext) -> PostgresSink:
        return cls(context.name, options, context)

    def _conninfo(self) -> str:
        from psycopg.conninfo import make_conninfo

        options = self.options
        base = self.context.resolve_secret(options.dsn).reveal() if options.dsn is not None else ""
        parts: dict[str, Any] = {}
        for key, value in (("host", options.host), ("port", options.port), ("user", options.user), ("dbname", options.database), ("sslmode", options.sslmode)):
            if value is not None:
                parts[key] = value
        if options.password is not None:
            parts["password"] = self.context.resolve_secret(options.password).reveal()
        parts["connect_timeout"] = options.connect_timeout
        parts["options"] = f"-c statement_timeout={options.statement_timeout_ms}"
        parts["application_name"] = "bastion-audit"
        return make_conninfo(base, **parts)

    def _open_sync(self) -> None:
        import psycopg

        table = self.options.table
        connection = psycopg.connect(self._conninfo(), autocommit=False)
        try:
            with connection.transaction():
                # two gateways creating the table at once would collide in the catalog
                connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"bastion-audit-schema:{table}",))
                connection.execute(
                    f"""CREATE TABLE IF NOT EXISTS {table} (
                        chain text NOT NULL,
                        seq bigint NOT NULL,
                        at timestamptz NOT NULL,
                        type text NOT NULL,
                        session_id text NOT NULL DEFAULT '',
                        prev_hash bytea NOT NULL,
                        hash bytea NOT NULL,
                        body bytea NOT NULL,
                        event jsonb NOT NULL,
                        received_at timestamptz NOT NULL DEFAULT now(),
                        PRIMARY KEY (chain, seq)
                    )"""
                )
                connection.execute(f"CREATE INDEX IF NOT EXISTS {table}_by_session ON {table} (session_id, at)")
                connection.execute(f"CREATE INDEX IF NOT EXISTS {table}_by_time ON {table} (at)")
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def _write_sync(self, records: list[auditlog.AuditRecord]) -> None:
        from psycopg.types.json import Jsonb

        connection = self._connection
        if connection is None:
            raise ConnectionError("not connected")
        rows = [
            (
                r.chain,
                r.seq,
                datetime.datetime.fromtimestamp(r.at, datetime.timezone.utc),
                r.type,
                r.session_id,
                r.prev_hash,
                r.hash,
                r.body,
                Jsonb(_json_safe(r.event)),
            )
            for r in records
        ]
        with connection.transaction(), connection.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {self.options.table} (chain, seq, at, type, session_id, prev_hash, hash, body, event) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (chain, seq) DO NOTHING",
                rows,
            )

    def _close_sync(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    async def open(self) -> None:
        await trio.to_thread.run_sync(self._open_sync)

    async def write(self, records: list[auditlog.AuditRecord]) -> None:
        # not abandoned on cancel: connect_timeout and statement_timeout bound the thread
        await trio.to_thread.run_sync(self._write_sync, records)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close_sync)


_JSONB_UNSAFE = re.compile("[\x00\ud800-\udfff]")


def _json_safe(value: Any) -> Any:
    """jsonb refuses NUL and lone surrogates: replace them (the body column keeps the original)."""
    if isinstance(value, str):
        return _JSONB_UNSAFE.sub("\ufffd", value) if _JSONB_UNSAFE.search(value) else value
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# --- nats ----------------------------------------------------------------------------------------


@attrs.frozen
class NatsOptions:
    """JetStream: each record is published to ``<subject_prefix>.<event type>`` with
    ``Nats-Msg-Id: <chain>:<seq>``; the stream (created when missing, file storage) drops
    duplicates within ``duplicate_window_s``. ``format``: ``"msgpack"`` publishes the record's body
    (the bytes its hash covers, so subscribers can check the chain) or ``"json"``."""

    url: str = "nats://127.0.0.1:4222"
    stream: str = attrs.field(default="BASTION_AUDIT", validator=attrs.validators.matches_re(r"[A-Za-z0-9_-]{1,64}"))
    subject_prefix: str = attrs.field(default="bastion.audit", validator=attrs.validators.matches_re(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*"))
    format: str = attrs.field(default="msgpack", validator=attrs.validators.in_(("msgpack", "json")))
    user: str | None = None
    password: SecretRef | None = None
    token: SecretRef | None = None
    tls: bool = False
    ca: Path | None = None
    duplicate_window_s: int = 600
    timeout_s: float = 10.0


class NatsError(Exception):
    pass


# ack and control lines are short; a line longer than this means we are not talking to NATS
NATS_MAX_LINE = 64 * 1024
NATS_RECEIVE_CHUNK = 64 * 1024


class NatsConnection:
    """A minimal NATS client over a trio stream: CONNECT, PING/PONG, SUB, HPUB and replies.

    Request/reply only: every call sends, then reads until its replies are in, answering server
    PINGs on the way. Nothing runs in the background, so an idle connection can go stale; the sink
    reconnects and retries (publishes are deduplicated by message id).
    """

    def __init__(self, stream: trio.abc.Stream, info: dict[str, Any]) -> None:
        self.stream = stream
        self.info = info
        self._buffer = bytearray()
        self.inbox = f"_INBOX.{secrets.token_hex(8)}"
        self._next_reply = 0

    @classmethod
    async def connect(cls, url: str, *, user: str | None = None, password: str | None = None, token: str | None = None, tls: bool = False, ca: Path | None = None) -> NatsConnection:
        match = re.fullmatch(r"(?:(nats|tls)://)?(\[[^\]]+\]|[^:/]+):(\d+)/?", url)
        if not match:
            raise NatsError(f"not a NATS url: {url!r} (expected nats://host:port)")
        host, port = match[2].strip("[]"), int(match[3])
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        connection = cls(stream, {})
        try:
            kind, line = await connection._read_op()
            if kind != "INFO":
                raise NatsError(f"expected INFO from the server, got {kind}")
            connection.info = json.loads(line)
            if tls or match[1] == "tls" or connection.info.get("tls_required"):
                context = ssl.create_default_context(cafile=str(ca) if ca else None)
                connection.stream = trio.SSLStream(stream, context, server_hostname=host)
                await connection.stream.do_handshake()
            options: dict[str, Any] = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True, "lang": "python-trio", "version": "bastion", "protocol": 1}
            if user is not None:
                options.update(user=user, **({"pass": password} if password is not None else {}))
            if token is not None:
                options["auth_token"] = token
            await connection._send(f"CONNECT {json.dumps(options)}\r\nPING\r\nSUB {connection.inbox}.* 1\r\n".encode())
            while True:
                kind, line = await connection._read_op()
                if kind == "PONG":
                    break
                if kind == "-ERR":
                    raise NatsError(f"the server refused the connection: {line}")
        except BaseException:
            await trio.aclose_forcefully(connection.stream)
            raise
        return connection

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def _send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(NATS_RECEIVE_CHUNK)
        if not chunk:
            raise NatsError("the server closed the connection")
        self._buffer += chunk

    async def _read_line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            if len(self._buffer) > NATS_MAX_LINE:
                raise NatsError("a protocol line is too long")
            await self._fill()

    async def _read_exact(self, size: int) -> bytes:
        while len(self._buffer) < size + 2:
            await self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[: size + 2]  # and the CRLF after the payload
        return data

    async def _read_op(self) -> tuple[str, str]:
        line = (await self._read_line()).decode("utf-8", "replace")
        kind, _, rest = line.partition(" ")
        return kind.upper(), rest

    async def _next_message(self) -> tuple[str, bytes, bytes]:
        """(subject, headers, payload) of the next MSG/HMSG, handling PING/INFO/+OK on the way."""
        while True:
            kind, rest = await self._read_op()
            if kind == "PING":
                await self._send(b"PONG\r\n")
            elif kind in ("PONG", "+OK", "INFO"):
                continue
            elif kind == "-ERR":
                raise NatsError(f"server error: {rest}")
            elif kind == "MSG":
                fields = rest.split()
                payload = await self._read_exact(int(fields[-1]))
                return fields[0], b"", payload
            elif kind == "HMSG":
                fields = rest.split()
                header_size, total = int(fields[-2]), int(fields[-1])
                data = await self._read_exact(total)
                return fields[0], data[:header_size], data[header_size:]
            else:
                raise NatsError(f"unexpected protocol line {kind!r}")

    def _reply_subject(self) -> str:
        self._next_reply += 1
        return f"{self.inbox}.{self._next_reply}"

    async def request(self, subject: str, payload: bytes) -> dict[str, Any]:
        reply = self._reply_subject()
        await self._send(f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + b"\r\n")
        while True:
            got, headers, data = await self._next_message()
            if got == reply:
                _raise_no_responders(headers, subject)
                return json.loads(data)

    async def publish_all(self, messages: Sequence[tuple[str, dict[str, str], bytes]]) -> list[dict[str, Any]]:
        """Publish each ``(subject, headers, payload)`` expecting a JetStream ack; pipelined."""
        replies: dict[str, int] = {}
        out = bytearray()
        for index, (subject, headers, payload) in enumerate(messages):
            reply = self._reply_subject()
            replies[reply] = index
            head = ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
            out += f"HPUB {subject} {reply} {len(head)} {len(head) + len(payload)}\r\n".encode() + head + payload + b"\r\n"
        await self._send(bytes(out))
        acks: list[dict[str, Any] | None] = [None] * len(messages)
        waiting = len(messages)
        while waiting:
            got, headers, data = await self._next_message()
            index = replies.pop(got, None)
            if index is None:
                continue  # a late reply to an earlier, abandoned call
            _raise_no_responders(headers, messages[index][0])
            acks[index] = json.loads(data)
            waiting -= 1
        return [ack or {} for ack in acks]


def _raise_no_responders(headers: bytes, subject: str) -> None:
    if headers.startswith(b"NATS/1.0 503"):
        raise NatsError(f"no JetStream stream listens on {subject}")


class NatsSink:
    def __init__(self, name: str, options: NatsOptions, context: ComponentContext) -> None:
        self.name = name
        self.options = options
        self.context = context
        self._connection: NatsConnection | None = None

    @classmethod
    def from_options(cls, options: NatsOptions, context: ComponentContext) -> NatsSink:
        return cls(context.name, options, context)

    async def _connect(self) -> NatsConnection:
        options = self.options

        def secrets_now() -> tuple[str | None, str | None]:
            password = self.context.resolve_secret(options.password).reveal() if options.password else None
            token = self.context.resolve_secret(options.token).reveal() if options.token else None
            return password, token

        password, token = await trio.to_thread.run_sync(secrets_now)
        with trio.fail_after(options.timeout_s):
            connection = await NatsConnection.connect(options.url, user=options.user, password=password, token=token, tls=options.tls, ca=options.ca)
            try:
                await self._ensure_stream(connection)
            except BaseException:
                await connection.aclose()
                raise
        return connection

    async def _ensure_stream(self, connection: NatsConnection) -> None:
        options = self.options
        info = await connection.request(f"$JS.API.STREAM.INFO.{options.stream}", b"")
        error = info.get("error")
        if error is None:
            return
        if error.get("code") != 404:
            raise NatsError(f"JetStream: {error.get('description', error)}")
        config = {
            "name": options.stream,
            "subjects": [f"{options.subject_prefix}.>"],
            "storage": "file",
            "retention": "limits",
            "duplicate_window": options.duplicate_window_s * 1_000_000_000,
        }
        created = await connection.request(f"$JS.API.STREAM.CREATE.{options.stream}", json.dumps(config).encode())
        if "error" in created and created["error"].get("err_code") != 10058:  # 10058: created meanwhile
            raise NatsError(f"JetStream: cannot create stream {options.stream}: {created['error'].get('description')}")

    def _messages(self, records: Sequence[auditlog.AuditRecord], max_payload: int) -> list[tuple[str, dict[str, str], bytes]]:
        messages = []
        for record in records:
            payload = record.body if self.options.format == "msgpack" else json.dumps(record_json(record)).encode()
            if len(payload) > max_payload:
                # keep the sequence complete: subscribers see that the record exists and where to get it
                stub = {"chain": record.chain, "seq": record.seq, "type": record.type, "hash": record.hash.hex(), "oversize": len(payload)}
                payload = auditlog.pack(stub) if self.options.format == "msgpack" else json.dumps(stub).encode()
            headers = {"Nats-Msg-Id": record.record_id, "Bastion-Chain": record.chain, "Bastion-Seq": str(record.seq)}
            messages.append((f"{self.options.subject_prefix}.{record.type}", headers, payload))
        return messages

    async def open(self) -> None:
        self._connection = await self._connect()

    async def write(self, records: list[auditlog.AuditRecord]) -> None:
        for attempt in range(2):  # a stale idle connection gets one silent reconnect
            if self._connection is None:
                self._connection = await self._connect()
            connection = self._connection
            try:
                with trio.fail_after(self.options.timeout_s):
                    acks = await connection.publish_all(self._messages(records, int(connection.info.get("max_payload", 1 << 20)) - 1024))
            except (NatsError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._connection = None
                await connection.aclose()
                if attempt == 1 or not _looks_stale(exc):
                    raise
                continue
            failed = [ack["error"] for ack in acks if "error" in ack]
            if failed:
                raise NatsError(f"JetStream refused {len(failed)} of {len(acks)} records: {failed[0].get('description', failed[0])}")
            return

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.aclose()


def _looks_stale(exc: BaseException) -> bool:
    return isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)) or (isinstance(exc, NatsError) and "closed the connection" in str(exc))
