"""Where approval requests live: SQLite (one host, the default), PostgreSQL (several gateways), memory.

Every store keeps the same three things:

* **requests**: one row per approval request — its fixed description (JSON), its state, the votes
  (JSON), a version that grows with every change, and the instance (``holder``) whose session
  waits for the answer;
* **windows**: time-boxed approvals, looked up by identity, target, fingerprint and kind;
* **steps**: an outbox of what happened to each request (requested, approval, approved, denied,
  expired, cancelled). The gateway that holds the session *claims* the steps of its requests and
  records them in its audit trail (and sends webhooks); steps of requests whose holder died are
  claimed by whichever gateway sweeps first. A claim is one atomic update, so each step is
  recorded once, whichever process — gateway or ``bastion approvals`` command — caused it.

A change (approve, deny, expire, cancel) is computed by a pure function of
:mod:`bastion.core.approvals_model` from the record read *inside* the transaction that writes the
result (SQLite ``BEGIN IMMEDIATE``, PostgreSQL ``SELECT … FOR UPDATE``), so concurrent reviewers
are serialised and none overwrites another's vote.

Liveness of the holder
    A pending request belongs to a live session only while the gateway process that holds it is
    alive. Each gateway instance holds a lock for as long as it runs, which the operating system
    or the database releases when the process dies, however it dies: SQLite stores use an
    ``flock`` on ``<db>.instances/<instance>.lock``; the PostgreSQL store a session-level advisory
    lock on the listening connection. A request whose holder's lock is free is never approved: a
    reviewer acting on it finds it cancelled, and a gateway sweeping at start-up (and every minute)
    marks it cancelled.

Waking the waiting session
    In-process decisions wake the waiter directly. Decisions from another process reach it by
    :meth:`watch`: the SQLite store polls ``PRAGMA data_version`` (a counter SQLite bumps when
    another connection commits; reading it costs no I/O beyond the shared-memory index of the WAL)
    every ``approvals.poll_interval`` while sessions are waiting — there is no cross-process
    notification in SQLite, and this keeps the command line independent of the admin listener.
    The PostgreSQL store uses LISTEN/NOTIFY: every change notifies the request id in the same
    transaction, and a thread blocks on its own connection's notifications — no polling.

Blocking calls run in worker threads (``trio.to_thread``), one at a time per store (a capacity
limiter of one, since each store has one connection for its queries).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import trio

from bastion.core import approvals_model as model
from bastion.core.approvals_model import ApprovalRecord, ApprovalRequest, Change, ReviewRefused, Step, Window

log = logging.getLogger("bastion.approvals.store")

# a reviewer's command and a gateway may write at the same moment: wait this long for the lock
SQLITE_BUSY_TIMEOUT_MS = 10_000
# PostgreSQL: no query of the store may hold a session's approval hostage for longer than this
PG_STATEMENT_TIMEOUT_MS = 15_000
# how long the notification thread blocks before looking at its stop flag (bounds shutdown time)
PG_LISTEN_SLICE = 0.5
# waits between reconnection attempts of the notification thread
PG_RECONNECT_INITIAL = 0.5
PG_RECONNECT_MAX = 30.0
# the first key of the advisory locks that mark live gateway instances ("bast" in ASCII), so
# they cannot be mistaken for another application's advisory locks
PG_LOCK_NAMESPACE = 0x62617374
TABLE_PREFIX_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,40}")
# lists are for people; nobody reads more than this many requests at once
MAX_LIST = 1000

WakeCallback = Callable[[frozenset[str] | None], None]  # None: "anything may have changed"


class StoreUnavailable(Exception):
    """The store cannot be reached or used; the message says why (never a password)."""


# --- the interface -----------------------------------------------------------------------------------


class ApprovalStore:
    """What the approval service and the command line need from a store (all async)."""

    description = "store"
    # a database server may come back by itself; a local file that cannot be opened will not
    retry_when_unavailable = False

    async def open(self, instance_id: str | None) -> None:
        """Create the schema if needed; with an ``instance_id``, hold that instance's liveness lock."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def create(self, request: ApprovalRequest) -> ApprovalRecord:
        """Store a new pending request and its ``requested`` step."""
        raise NotImplementedError

    async def get(self, approval_id: str) -> ApprovalRecord | None:
        raise NotImplementedError

    async def list(self, states: Iterable[str] | None = None, limit: int = 100) -> list[ApprovalRecord]:
        """Newest first."""
        raise NotImplementedError

    async def change(
        self,
        approval_id: str,
        compute: Callable[[ApprovalRecord], Change | None],
        *,
        now: float,
        live_holder_required: bool = False,
    ) -> ApprovalRecord:
        """Apply ``compute(current record)`` atomically and return the record as it is now.

        ``compute`` may raise :class:`ReviewRefused`; None means "nothing to do". With
        ``live_holder_required``, a pending request whose holder is dead is cancelled instead and
        :class:`ReviewRefused` (conflict) is raised. Unknown ids raise ReviewRefused (not-found).
        """
        raise NotImplementedError

    async def find_window(self, person: model.Person, target: str, fingerprint: str, kind: str, rules: Iterable[str], now: float) -> Window | None:
        raise NotImplementedError

    async def versions(self, approval_ids: Iterable[str]) -> dict[str, int]:
        raise NotImplementedError

    async def holder_alive(self, holder: str) -> bool:
        raise NotImplementedError

    async def claim_steps(self, approval_ids: Iterable[str]) -> list[Step]:
        """Unrecorded steps of these requests, marked recorded (only one claimer gets each)."""
        raise NotImplementedError

    async def unclaimed(self) -> dict[str, str]:
        """approval id -> holder, for requests with steps nobody has recorded yet."""
        raise NotImplementedError

    async def watch(self, wake: WakeCallback, interested: Callable[[], bool], interval: float, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Call ``wake`` when requests may have changed in another process. Runs until cancelled."""
        raise NotImplementedError


# --- SQL, shared by SQLite and PostgreSQL --------------------------------------------------------------


class _SqlStore(ApprovalStore):
    """The queries; subclasses say how to connect, lock rows, check liveness and notify."""

    placeholder = "?"
    serial = "integer primary key autoincrement"
    for_update = ""

    def __init__(self, prefix: str) -> None:
        if not TABLE_PREFIX_PATTERN.fullmatch(prefix):
            raise StoreUnavailable(f"table prefix {prefix!r}: use lower-case letters, digits and _")
        self.prefix = prefix
        self.instance_id: str | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._lock = threading.Lock()
        self._conn: Any = None

    # --- for subclasses ---

    def _connect(self) -> Any:
        raise NotImplementedError

    def _begin(self, conn: Any) -> None:
        raise NotImplementedError

    def _alive(self, conn: Any, holder: str) -> bool:
        raise NotImplementedError

    def _notify(self, conn: Any, approval_id: str) -> None:
        """Tell other processes, inside the transaction, that this request changed."""

    def _is_connection_error(self, exc: BaseException) -> bool:
        return False

    # --- plumbing ---

    def _sql(self, text: str) -> str:
        text = text.replace("{p}", self.prefix)
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def _execute(self, conn: Any, text: str, params: Iterable[Any] = ()) -> Any:
        return conn.execute(self._sql(text), tuple(params))

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(self._blocking, fn, *args, limiter=self._limiter)

    def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            try:
                return fn(self._conn, *args)
            except Exception as exc:
                if self._is_connection_error(exc):
                    self._drop()
                    raise StoreUnavailable(f"the approval store ({self.description}) is unavailable: {first_line(exc)}") from None
                raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def _transaction(self, conn: Any):
        self._begin(conn)
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("rollback")
            raise
        conn.execute("commit")

    def _schema(self) -> list[str]:
        return [
            """create table if not exists {p}_requests (
                id text primary key,
                state text not null,
                holder text not null,
                version integer not null,
                created_at double precision not null,
                expires_at double precision not null,
                decided_at double precision,
                outcome text not null default '',
                window_until double precision,
                body text not null,
                votes text not null default '[]'
            )""",
            "create index if not exists {p}_requests_state on {p}_requests (state, created_at)",
            """create table if not exists {p}_windows (
                approval_id text primary key,
                provider text not null,
                subject text not null,
                target text not null,
                fingerprint text not null,
                kind text not null,
                rules text not null,
                until double precision not null
            )""",
            "create index if not exists {p}_windows_lookup on {p}_windows (subject, fingerprint)",
            f"""create table if not exists {{p}}_steps (
                seq {self.serial},
                approval_id text not null,
                step text not null,
                at double precision not null,
                actor text not null default '',
                comment text not null default '',
                recorded integer not null default 0
            )""",
            "create index if not exists {p}_steps_open on {p}_steps (approval_id) where recorded = 0",
        ]

    # --- operations ---

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close_blocking, limiter=self._limiter)

    def _close_blocking(self) -> None:
        with self._lock:
            self._drop()

    async def create(self, request: ApprovalRequest) -> ApprovalRecord:
        record = ApprovalRecord(request)
        step = Step(request.id, "requested", request.created_at, request.requester.display, request.justification)
        await self._run(self._create, record, step)
        return record

    def _create(self, conn: Any, record: ApprovalRecord, step: Step) -> None:
        request = record.request
        with self._transaction(conn):
            self._execute(
                conn,
                "insert into {p}_requests (id, state, holder, version, created_at, expires_at, body, votes) values (?, ?, ?, ?, ?, ?, ?, ?)",
                (request.id, record.state, request.holder, record.version, request.created_at, request.expires_at, model.request_to_json(request), "[]"),
            )
            self._insert_step(conn, step)
            self._notify(conn, request.id)

    def _insert_step(self, conn: Any, step: Step) -> None:
        self._execute(
            conn,
            "insert into {p}_steps (approval_id, step, at, actor, comment) values (?, ?, ?, ?, ?)",
            (step.approval_id, step.step, step.at, step.actor, step.comment),
        )

    _COLUMNS = "body, state, votes, version, decided_at, outcome, window_until"

    @staticmethod
    def _record(row: Any) -> ApprovalRecord:
        body, state, votes, version, decided_at, outcome, window_until = row
        return ApprovalRecord(
            request=model.request_from_json(body),
            state=state,
            votes=model.votes_from_json(votes),
            version=int(version),
            decided_at=decided_at,
            outcome=outcome or "",
            window_until=window_until,
        )

    async def get(self, approval_id: str) -> ApprovalRecord | None:
        return await self._run(self._get, approval_id, False)

    def _get(self, conn: Any, approval_id: str, lock: bool) -> ApprovalRecord | None:
        suffix = self.for_update if lock else ""
        row = self._execute(conn, f"select {self._COLUMNS} from {{p}}_requests where id = ?{suffix}", (approval_id,)).fetchone()
        return self._record(row) if row is not None else None

    async def list(self, states: Iterable[str] | None = None, limit: int = 100) -> list[ApprovalRecord]:
        return await self._run(self._list, tuple(states) if states is not None else None, max(1, min(limit, MAX_LIST)))

    def _list(self, conn: Any, states: tuple[str, ...] | None, limit: int) -> list[ApprovalRecord]:
        where, params = "", []
        if states is not None:
            if not states:
                return []
            where = f"where state in ({', '.join('?' for _ in states)})"
            params = list(states)
        rows = self._execute(conn, f"select {self._COLUMNS} from {{p}}_requests {where} order by created_at desc, id limit ?", (*params, limit)).fetchall()
        return [self._record(row) for row in rows]

    async def change(self, approval_id, compute, *, now, live_holder_required=False):
        outcome = await self._run(self._change, approval_id, compute, now, live_holder_required)
        if isinstance(outcome, ReviewRefused):
            raise outcome
        return outcome

    def _change(self, conn: Any, approval_id: str, compute, now: float, live_holder_required: bool) -> ApprovalRecord | ReviewRefused:
        with self._transaction(conn):
            record = self._get(conn, approval_id, True)
            if record is None:
                raise ReviewRefused("not-found", f"there is no approval request {approval_id}")
            refusal = None
            if live_holder_required and record.pending and not self._alive(conn, record.request.holder):
                change = model.cancel(record, now, HOLDER_GONE)
                refusal = ReviewRefused("conflict", f"approval request {approval_id} was cancelled: {HOLDER_GONE}")
            else:
                change = compute(record)
            if change is None:
                return record
            self._apply(conn, change)
        return refusal or change.record

    def _apply(self, conn: Any, change: Change) -> None:
        record = change.record
        self._execute(
            conn,
            "update {p}_requests set state = ?, votes = ?, version = ?, decided_at = ?, outcome = ?, window_until = ? where id = ?",
            (record.state, model.votes_to_json(record.votes), record.version, record.decided_at, record.outcome, record.window_until, record.id),
        )
        for step in change.steps:
            self._insert_step(conn, step)
        window = change.window
        if window is not None:
            self._execute(
                conn,
                "insert into {p}_windows (approval_id, provider, subject, target, fingerprint, kind, rules, until) values (?, ?, ?, ?, ?, ?, ?, ?)",
                (window.approval_id, window.provider, window.subject, window.target, window.fingerprint, window.kind, json.dumps(sorted(window.rules)), window.until),
            )
        self._notify(conn, record.id)

    async def find_window(self, person, target, fingerprint, kind, rules, now):
        if not fingerprint:
            return None
        return await self._run(self._find_window, person, target, fingerprint, kind, frozenset(rules), now)

    def _find_window(self, conn: Any, person: model.Person, target: str, fingerprint: str, kind: str, rules: frozenset[str], now: float) -> Window | None:
        rows = self._execute(
            conn,
            "select approval_id, provider, subject, target, fingerprint, kind, rules, until from {p}_windows "
            "where subject = ? and provider = ? and target = ? and fingerprint = ? and kind = ? and until > ? order by until desc",
            (person.subject, person.provider, target, fingerprint, kind, now),
        ).fetchall()
        for approval_id, provider, subject, target_, fingerprint_, kind_, rules_json, until in rows:
            window = Window(approval_id, provider, subject, target_, fingerprint_, kind_, frozenset(json.loads(rules_json)), until)
            if window.covers(person, target, fingerprint, kind, rules, now):
                return window
        return None

    async def versions(self, approval_ids: Iterable[str]) -> dict[str, int]:
        ids = tuple(approval_ids)
        if not ids:
            return {}
        return await self._run(self._versions, ids)

    def _versions(self, conn: Any, ids: tuple[str, ...]) -> dict[str, int]:
        rows = self._execute(conn, f"select id, version from {{p}}_requests where id in ({', '.join('?' for _ in ids)})", ids).fetchall()
        return {approval_id: int(version) for approval_id, version in rows}

    async def holder_alive(self, holder: str) -> bool:
        return await self._run(self._alive, holder)

    async def claim_steps(self, approval_ids: Iterable[str]) -> list[Step]:
        ids = tuple(approval_ids)
        if not ids:
            return []
        return await self._run(self._claim_steps, ids)

    def _claim_steps(self, conn: Any, ids: tuple[str, ...]) -> list[Step]:
        with self._transaction(conn):
            rows = self._execute(
                conn,
                f"update {{p}}_steps set recorded = 1 where recorded = 0 and approval_id in ({', '.join('?' for _ in ids)}) "
                "returning seq, approval_id, step, at, actor, comment",
                ids,
            ).fetchall()
        return [Step(approval_id, step, at, actor, comment) for _, approval_id, step, at, actor, comment in sorted(rows)]

    async def unclaimed(self) -> dict[str, str]:
        return await self._run(self._unclaimed)

    def _unclaimed(self, conn: Any) -> dict[str, str]:
        rows = self._execute(
            conn,
            "select distinct s.approval_id, r.holder from {p}_steps s join {p}_requests r on r.id = s.approval_id where s.recorded = 0",
        ).fetchall()
        return {approval_id: holder for approval_id, holder in rows}


HOLDER_GONE = "the session that asked is gone (its gateway process stopped)"


# --- SQLite ------------------------------------------------------------------------------------------


class SqliteStore(_SqlStore):
    """The default: one file in the state directory, shared by the gateway's workers and commands."""

    def __init__(self, path: Path, prefix: str = "approval") -> None:
        super().__init__(prefix)
        self.path = Path(path)
        self.description = f"SQLite {self.path}"
        self.instances_dir = self.path.with_name(self.path.name + ".instances")
        self._instance_lock: Any = None
        self._instance_lock_path: Path | None = None

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
            conn.execute(f"pragma busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            conn.execute("pragma journal_mode = wal")  # readers (the command line) never block the gateway
            conn.execute("pragma synchronous = full")  # a decision, once answered, survives a power cut
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open the approval store {self.path}: {exc}") from None
        return conn

    def _begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("begin immediate")  # take the write lock now, so the read below is current

    def _is_connection_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError)

    async def open(self, instance_id: str | None) -> None:
        await self._run(self._open, instance_id)

    def _open(self, conn: sqlite3.Connection, instance_id: str | None) -> None:
        for statement in self._schema():
            self._execute(conn, statement)
        if instance_id is not None:
            # The lock file appears under its name only once it is locked (locked under a
            # temporary name, then renamed), so a file seen unlocked belongs to a dead process
            # and may be removed by whoever sees it.
            self.instances_dir.mkdir(parents=True, exist_ok=True)
            final = self.instances_dir / f"{_safe_name(instance_id)}.lock"
            fd, temporary = tempfile.mkstemp(prefix=".starting-", dir=self.instances_dir)
            handle = os.fdopen(fd, "a")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a brand-new file: never taken
            os.rename(temporary, final)
            self._instance_lock = handle
            self._instance_lock_path = final
            self.instance_id = instance_id

    def _close_blocking(self) -> None:
        super()._close_blocking()
        handle, self._instance_lock = self._instance_lock, None
        if handle is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._instance_lock_path)
            handle.close()  # releases the flock: this instance is no longer alive

    def _alive(self, conn: Any, holder: str) -> bool:
        if holder == self.instance_id and self._instance_lock is not None:
            return True
        path = self.instances_dir / f"{_safe_name(holder)}.lock"
        try:
            handle = open(path)
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # its gateway holds the lock: alive
            with contextlib.suppress(OSError):
                os.unlink(path)  # left behind by a process that died: nobody will lock it again
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    async def watch(self, wake, interested, interval, *, task_status=trio.TASK_STATUS_IGNORED):
        """Poll ``PRAGMA data_version`` (see the module's documentation for why polling here)."""
        conn = await trio.to_thread.run_sync(self._connect)
        try:
            last = await trio.to_thread.run_sync(_data_version, conn)
            task_status.started()
            while True:
                await trio.sleep(interval)
                if not interested():
                    continue
                try:
                    version = await trio.to_thread.run_sync(_data_version, conn)
                except sqlite3.Error as exc:
                    log.warning("approval store: cannot poll %s: %s", self.path, exc)
                    continue
                if version != last:
                    last = version
                    wake(None)
        finally:
            conn.close()


def _data_version(conn: sqlite3.Connection) -> int:
    return conn.execute("pragma data_version").fetchone()[0]


def _safe_name(instance_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", instance_id)


# --- PostgreSQL --------------------------------------------------------------------------------------


class PostgresStore(_SqlStore):
    """Shared by several gateway instances; decisions wake waiters everywhere via LISTEN/NOTIFY.

    ``conninfo`` is a callable (it resolves the password reference each time it connects, so a
    rotated password is used without a restart; it blocks, and is only called in threads).
    """

    placeholder = "%s"
    serial = "bigint generated always as identity primary key"
    for_update = " for update"
    retry_when_unavailable = True

    def __init__(self, conninfo: Callable[[], str], prefix: str = "bastion_approval", description: str = "PostgreSQL") -> None:
        super().__init__(prefix)
        self._conninfo = conninfo
        self.description = description
        self.channel = f"{prefix}_changes"
        self.ready = False

    def _connect(self) -> Any:
        import psycopg

        try:
            conn = psycopg.connect(self._conninfo(), autocommit=True, options=f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}")
        except Exception as exc:
            raise StoreUnavailable(f"cannot connect to the approval store ({self.description}): {first_line(exc)}") from None
        return conn

    def _begin(self, conn: Any) -> None:
        conn.execute("begin")

    def _is_connection_error(self, exc: BaseException) -> bool:
        import psycopg

        return isinstance(exc, psycopg.OperationalError) or (isinstance(exc, psycopg.Error) and getattr(exc, "sqlstate", None) is None)

    def _notify(self, conn: Any, approval_id: str) -> None:
        conn.execute("select pg_notify(%s, %s)", (self.channel, approval_id))

    async def open(self, instance_id: str | None) -> None:
        await self._run(self._open)
        self.instance_id = instance_id  # its advisory lock is taken by the notification thread

    def _open(self, conn: Any) -> None:
        # two gateways starting at once must not both create the tables
        with self._transaction(conn):
            conn.execute("select pg_advisory_xact_lock(%s::int4, 0)", (PG_LOCK_NAMESPACE,))
            for statement in self._schema():
                self._execute(conn, statement)

    def _alive(self, conn: Any, holder: str) -> bool:
        row = conn.execute(
            "select exists (select 1 from pg_locks l join pg_database d on d.oid = l.database "
            "where l.locktype = 'advisory' and l.granted and d.datname = current_database() "
            "and l.classid = %s::bigint::oid and l.objid = %s::bigint::oid and l.objsubid = 2)",
            (PG_LOCK_NAMESPACE, instance_lock_key(holder)),
        ).fetchone()
        return bool(row[0])

    async def watch(self, wake, interested, interval, *, task_status=trio.TASK_STATUS_IGNORED):
        """A thread with its own connection: holds this instance's advisory lock and LISTENs."""
        token = trio.lowlevel.current_trio_token()
        ready = trio.Event()
        stop = threading.Event()

        def to_trio(fn: Callable[..., Any], *args: Any) -> None:
            try:
                trio.from_thread.run_sync(fn, *args, trio_token=token)
            except trio.RunFinishedError:
                stop.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: trio.to_thread.run_sync(self._listen, lambda ids: to_trio(wake, ids), lambda: to_trio(ready.set), stop, abandon_on_cancel=True)
                )
                await ready.wait()
                task_status.started()
        finally:
            stop.set()  # the abandoned thread closes its connection within PG_LISTEN_SLICE
            self.ready = False

    def _listen(self, wake: Callable[[frozenset[str] | None], None], ready: Callable[[], None], stop: threading.Event) -> None:
        import psycopg

        delay = PG_RECONNECT_INITIAL
        announced = False
        while not stop.is_set():
            try:
                conn = psycopg.connect(self._conninfo(), autocommit=True)
            except Exception as exc:
                log.error("approval store: cannot connect to %s to listen: %s; retrying in %.1fs", self.description, first_line(exc), delay)
                stop.wait(delay)
                delay = min(delay * 2, PG_RECONNECT_MAX)
                continue
            try:
                if self.instance_id is not None:
                    locked = conn.execute("select pg_try_advisory_lock(%s::int4, %s::int4)", (PG_LOCK_NAMESPACE, instance_lock_key(self.instance_id))).fetchone()[0]
                    if not locked:  # our previous connection is still closing on the server
                        raise psycopg.OperationalError("this instance's lock is still held by an old connection")
                conn.execute(f"listen {self.channel}")
                delay = PG_RECONNECT_INITIAL
                self.ready = True
                if announced:
                    wake(None)  # notifications may have been missed while reconnecting
                else:
                    announced = True
                    ready()
                while not stop.is_set():
                    ids = {notify.payload for notify in conn.notifies(timeout=PG_LISTEN_SLICE)}
                    if ids and not stop.is_set():
                        wake(frozenset(ids))
            except Exception as exc:
                self.ready = False
                if not stop.is_set():
                    log.error("approval store: lost the notification connection to %s: %s; reconnecting", self.description, first_line(exc))
                    stop.wait(delay)
                    delay = min(delay * 2, PG_RECONNECT_MAX)
            finally:
                with contextlib.suppress(Exception):
                    conn.close()


def instance_lock_key(instance_id: str) -> int:
    """The second advisory-lock key of an instance: 31 bits of a checksum of its id."""
    return zlib.crc32(instance_id.encode()) & 0x7FFFFFFF


# --- memory ------------------------------------------------------------------------------------------


class MemoryBackend:
    """What several :class:`MemoryStore` instances share (one "database", for tests)."""

    def __init__(self) -> None:
        self.records: dict[str, ApprovalRecord] = {}
        self.windows: list[Window] = []
        self.steps: list[tuple[Step, bool]] = []
        self.alive: set[str] = set()
        self.watchers: list[WakeCallback] = []


class MemoryStore(ApprovalStore):
    """Not persistent: for tests (including trio's MockClock, since nothing runs in a thread)."""

    description = "memory"

    def __init__(self, backend: MemoryBackend | None = None) -> None:
        self.backend = backend or MemoryBackend()
        self.instance_id: str | None = None

    async def open(self, instance_id):
        self.instance_id = instance_id
        if instance_id is not None:
            self.backend.alive.add(instance_id)

    async def aclose(self):
        if self.instance_id is not None:
            self.backend.alive.discard(self.instance_id)

    def _changed(self, approval_id: str) -> None:
        for wake in list(self.backend.watchers):
            wake(frozenset({approval_id}))

    async def create(self, request):
        await trio.lowlevel.checkpoint()
        record = ApprovalRecord(request)
        self.backend.records[request.id] = record
        self.backend.steps.append((Step(request.id, "requested", request.created_at, request.requester.display, request.justification), False))
        self._changed(request.id)
        return record

    async def get(self, approval_id):
        await trio.lowlevel.checkpoint()
        return self.backend.records.get(approval_id)

    async def list(self, states=None, limit=100):
        await trio.lowlevel.checkpoint()
        states = set(states) if states is not None else None
        records = [r for r in self.backend.records.values() if states is None or r.state in states]
        records.sort(key=lambda r: (-r.request.created_at, r.id))
        return records[:limit]

    async def change(self, approval_id, compute, *, now, live_holder_required=False):
        await trio.lowlevel.checkpoint()
        record = self.backend.records.get(approval_id)
        if record is None:
            raise ReviewRefused("not-found", f"there is no approval request {approval_id}")
        refusal = None
        if live_holder_required and record.pending and record.request.holder not in self.backend.alive:
            change = model.cancel(record, now, HOLDER_GONE)
            refusal = ReviewRefused("conflict", f"approval request {approval_id} was cancelled: {HOLDER_GONE}")
        else:
            change = compute(record)
        if change is None:
            return record
        self.backend.records[approval_id] = change.record
        self.backend.steps.extend((step, False) for step in change.steps)
        if change.window is not None:
            self.backend.windows.append(change.window)
        self._changed(approval_id)
        if refusal is not None:
            raise refusal
        return change.record

    async def find_window(self, person, target, fingerprint, kind, rules, now):
        await trio.lowlevel.checkpoint()
        for window in sorted(self.backend.windows, key=lambda w: -w.until):
            if window.covers(person, target, fingerprint, kind, rules, now):
                return window
        return None

    async def versions(self, approval_ids):
        await trio.lowlevel.checkpoint()
        return {i: self.backend.records[i].version for i in approval_ids if i in self.backend.records}

    async def holder_alive(self, holder):
        await trio.lowlevel.checkpoint()
        return holder in self.backend.alive

    async def claim_steps(self, approval_ids):
        await trio.lowlevel.checkpoint()
        ids = set(approval_ids)
        claimed = []
        for index, (step, recorded) in enumerate(self.backend.steps):
            if not recorded and step.approval_id in ids:
                self.backend.steps[index] = (step, True)
                claimed.append(step)
        return claimed

    async def unclaimed(self):
        await trio.lowlevel.checkpoint()
        return {step.approval_id: self.backend.records[step.approval_id].request.holder for step, recorded in self.backend.steps if not recorded}

    async def watch(self, wake, interested, interval, *, task_status=trio.TASK_STATUS_IGNORED):
        self.backend.watchers.append(wake)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self.backend.watchers.remove(wake)


# --- building one from the configuration -------------------------------------------------------------


def default_sqlite_path(state_dir: Path) -> Path:
    return Path(state_dir) / "approvals.sqlite"


def build_store(config: Any, resolve_secret: Callable[[Any], Any]) -> ApprovalStore:
    """The store ``[approvals]`` configures. ``resolve_secret(ref) -> Secret`` blocks (threads only)."""
    section = config.approvals
    if section.store == "postgres":
        settings = section.postgres

        def conninfo() -> str:
            from psycopg.conninfo import make_conninfo

            password = resolve_secret(settings.password).reveal() if settings.password is not None else None
            parts = {
                "host": settings.host,
                "port": settings.port,
                "dbname": settings.dbname,
                "user": settings.user,
                "sslmode": settings.sslmode,
                "connect_timeout": max(1, int(settings.connect_timeout)),
                "application_name": "bastion-approvals",
            }
            if password is not None:
                parts["password"] = password
            return make_conninfo(**parts)

        where = f"PostgreSQL {settings.user}@{settings.host}:{settings.port}/{settings.dbname}"
        return PostgresStore(conninfo, settings.table_prefix, where)
    return SqliteStore(section.path or default_sqlite_path(config.gateway.state_dir))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


__all__ = [
    "ApprovalStore",
    "MemoryBackend",
    "MemoryStore",
    "PostgresStore",
    "SqliteStore",
    "StoreUnavailable",
    "build_store",
    "default_sqlite_path",
]
