"""The audit trail at run time: group-committed local log, sinks fed from it.

The gateway calls :meth:`AuditTrail.record` for every event. Events go through a bounded queue to
one writer task, which appends whatever has queued up as one batch and covers it with one fsync
(group commit), in a worker thread so the event loop keeps queueing the next batch meanwhile. A
``durable=True`` caller returns only once its record is on disk; under ``audit.fail_closed`` a
record that cannot be written raises :class:`AuditUnavailable`, and the session refuses the
statement.

The local log (see :mod:`bastion.core.auditlog`) is the source of truth. Every other sink —
SQLite index, PostgreSQL, NATS — is fed by its own forwarder task that reads the log's files from
where that sink got to (kept in ``audit/sinks/``), so a sink that is down is caught up when it
comes back, nothing is dropped meanwhile, and a slow or broken sink never holds up a statement.
Delivery is at least once; records carry ``chain:seq`` ids, so sinks make it exactly once.

Forwarders send only records the writer has fsynced: a crash can lose an unacknowledged record
whose seq is later reused, and no sink may ever have seen it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from bastion.core import auditlog
from bastion.core.config import AuditSection
from bastion.core.events import AuditEvent, event_to_dict
from bastion.core.specs import AuditSink, ComponentContext

log = logging.getLogger("bastion.audit")

# Events waiting for the writer. Bounded so a stalled disk slows callers down (backpressure) rather
# than growing memory; 1024 absorbs a burst from many sessions between two fsyncs.
QUEUE_CAPACITY = 1024
# The most records one write/fsync covers, so one thread call (and one failed batch) stays bounded.
MAX_BATCH_RECORDS = 1024
# On cancellation or close, how long the writer keeps flushing what is queued and sealing the
# segment. Below the gateway's 5 s cleanup deadline, which also covers the final records.
FLUSH_DEADLINE = 3.0
# After close, how long forwarders get to hand sinks the last records; missed ones go next start.
FINAL_FORWARD_DEADLINE = 1.0
# With fsync = "durable", the longest a non-durable record may wait for an fsync.
DURABLE_FSYNC_INTERVAL = 1.0
# Reopening the local log after a failure (full disk, I/O error): first retry, then at most.
REOPEN_RETRY_MIN, REOPEN_RETRY_MAX = 0.1, 5.0
# Records handed to a sink per write call: big enough to amortise a round trip, small enough
# that one failed call redoes little.
SINK_BATCH = 500
# One sink call (open or write) that takes longer has failed; it is retried from the same place.
SINK_CALL_TIMEOUT = 30.0
# Backoff between attempts on a failing sink.
SINK_RETRY_MIN, SINK_RETRY_MAX = 0.2, 30.0
FSYNC_MODES = ("always", "durable")
DEFAULT_SLOT = "main"


class AuditUnavailable(Exception):
    """The local audit log cannot record (disk full, I/O error, closed). Refuse the statement."""


@attrs.frozen
class LocalLogSettings:
    """Where and how the local log is written; the ``file`` sink kind sets it.

    ``fsync``: ``"always"`` — every batch is fsynced before any of it is acknowledged (group
    commit); ``"durable"`` — only batches holding a ``durable=True`` record are fsynced at once,
    others within ``DURABLE_FSYNC_INTERVAL``.
    """

    directory: Path | None = None
    fsync: str = attrs.field(default="always", validator=attrs.validators.in_(FSYNC_MODES))


@attrs.frozen
class SinkStatistics:
    name: str
    delivered_seq: int  # last seq of this process's chain the sink confirmed
    lag: int  # durable records not yet in the sink
    healthy: bool
    failures: int
    last_error: str


@attrs.frozen
class AuditStatistics:
    healthy: bool
    chain: str
    slot: str
    records: int  # written by this process
    durable_waits: int  # records whose caller waited for fsync
    batches: int
    fsyncs: int
    bytes: int  # written to segments (compressed, with framing)
    queue_length: int
    queue_capacity: int
    committed_seq: int  # last seq known to be on disk
    segment: int
    dropped: int  # events not recorded (only with fail_closed = false)
    failures: int  # failed batches
    last_error: str
    sinks: tuple[SinkStatistics, ...]


def audit_directory(state_dir: Path, sinks: Sequence[Any] = ()) -> Path:
    """``<state_dir>/audit``, unless a ``file`` sink names another directory."""
    for sink in sinks:
        settings = getattr(sink, "local_log", None)
        if isinstance(settings, LocalLogSettings) and settings.directory is not None:
            return Path(settings.directory)
    return Path(state_dir) / auditlog.AUDIT_DIR_NAME


def configured_audit_directory(config: Any) -> Path:
    """The audit directory a loaded :class:`~bastion.core.config.Config` points at (for the CLI)."""
    for section in config.audit.sinks:
        directory = getattr(section.options, "directory", None)
        if section.kind == "file" and directory is not None:
            return Path(directory)
    return Path(config.gateway.state_dir) / auditlog.AUDIT_DIR_NAME


def load_key(settings: AuditSection, directory: Path, signing_key: bytes | None, resolve: Callable[[Any], Any] | None = None) -> tuple[Any, bool]:
    """(Ed25519 private key, generated now). Blocking: may read a secret or create the key file.

    ``signing_key`` (already resolved bytes) wins; then ``settings.signing_key`` resolved with
    ``resolve`` (default: core's env/file resolver); then ``<audit dir>/signing.key``, created on
    first start. A configured key that cannot be read is an error, never a silent fallback.
    """
    if signing_key is not None:
        return auditlog.load_signing_key(signing_key), False
    if settings.signing_key is not None:
        from bastion.core.secrets import SecretUnavailable, resolve as core_resolve

        try:
            secret = (resolve or core_resolve)(settings.signing_key)
        except SecretUnavailable as exc:
            raise auditlog.AuditLogError(f"audit.signing_key: {exc}") from None
        value = secret.reveal() if hasattr(secret, "reveal") else secret
        return auditlog.load_signing_key(value), False
    return auditlog.generated_signing_key(directory)


@attrs.define
class _Pending:
    type: str
    event: dict[str, Any]
    durable: bool
    done: trio.Event | None = None
    error: BaseException | None = None


class AuditTrail:
    """The audit trail of one gateway process. See the module docstring.

    :param settings: the ``[audit]`` section.
    :param state_dir: ``gateway.state_dir``; the log lives in ``<state_dir>/audit`` unless a
        ``file`` sink names another directory.
    :param sinks: sink objects built from ``[[audit.sinks]]`` (see :func:`build_sinks`). A
        ``file`` sink configures the local log rather than being forwarded to.
    :param on_record: called with each event once it is queued (must not raise; errors are logged).
    :param signing_key: the resolved ``audit.signing_key`` (PEM or 32-byte seed); when None the
        trail resolves ``settings.signing_key`` itself (env/file references) or uses the key
        generated in the audit directory.
    :param slot: the local name of this process's chain; a busy slot moves on to ``slot.1``…
        Worker processes may pass ``f"worker{index}"`` for a stable slot per worker.
    :param resolve_secret: resolves ``settings.signing_key`` (e.g. the gateway's resolver, which
        also asks plugins); default: core's env/file resolver.
    :param clock: the time records are stamped with (tests run it behind).
    :param sink_retry_max: the longest wait between attempts on a failing sink.
    """

    def __init__(
        self,
        settings: AuditSection,
        state_dir: Path,
        sinks: Sequence[AuditSink] = (),
        on_record: Callable[[AuditEvent], None] | None = None,
        signing_key: bytes | None = None,
        *,
        slot: str = DEFAULT_SLOT,
        resolve_secret: Callable[[Any], Any] | None = None,
        clock: Callable[[], float] = time.time,
        sink_retry_max: float = SINK_RETRY_MAX,
    ) -> None:
        self.settings = settings
        self.directory = audit_directory(state_dir, sinks)
        self.local_log = next((s.local_log for s in sinks if isinstance(getattr(s, "local_log", None), LocalLogSettings)), LocalLogSettings())
        self._on_record = on_record
        self._signing_key_material = signing_key
        self._resolve_secret = resolve_secret
        self._preferred_slot = slot
        self._clock = clock
        names = [s.name for s in sinks if getattr(s, "local_log", None) is None]
        if len(set(names)) != len(names):
            raise ValueError(f"audit sinks need distinct names, got {names}")
        self._forwarders = [_Forwarder(self, sink, sink_retry_max) for sink in sinks if getattr(sink, "local_log", None) is None]
        self._send, self._receive = trio.open_memory_channel[_Pending](QUEUE_CAPACITY)
        self._key: Any = None
        self._lock: auditlog.SlotLock | None = None
        self._writer: auditlog.LogWriter | None = None
        self._held: list[_Pending] = []  # non-durable records taken off the queue while the log was down
        self._healthy = True
        self._started = False
        self._closing = False
        self._writer_done = trio.Event()
        self._finished = trio.Event()
        self._forwarders_scope: trio.CancelScope | None = None
        self._progress = trio.Event()  # replaced after every commit: forwarders wait on it
        self._committed_seq = 0
        self._unconfirmed_from: int | None = None
        self._last_sync = 0.0
        self.warnings: tuple[auditlog.RecoveryWarning, ...] = ()
        self.public_key: bytes = b""
        self.key_generated = False
        self._stats = {"records": 0, "durable": 0, "batches": 0, "dropped": 0, "failures": 0}
        self._last_error = ""
        self._fsyncs = 0  # totals of writers retired after a failure
        self._bytes = 0
        self._close_requested = trio.Event()

    # --- the caller's side ---------------------------------------------------------------------

    async def record(self, event: AuditEvent, *, durable: bool = False) -> None:
        """Queue ``event``; with ``durable`` return only once it is fsynced (see class docs)."""
        if self._closing:
            self._unavailable("the audit trail is closed", event)
            return
        if not self._healthy:
            self._unavailable(f"the audit log cannot write ({self._last_error})", event)
            return
        data = event_to_dict(event)
        pending = _Pending(data.pop("type"), data, durable, trio.Event() if durable else None)
        try:
            await self._send.send(pending)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._unavailable("the audit trail is closed", event)
            return
        self._notify(event)
        if pending.done is None:
            return
        await pending.done.wait()
        if pending.error is not None:
            if self.settings.fail_closed:
                raise AuditUnavailable(f"the audit log could not make the record durable: {pending.error}") from pending.error
            log.error("audit record not confirmed durable (%s); continuing because audit.fail_closed is false", pending.error)

    def _unavailable(self, reason: str, event: AuditEvent) -> None:
        if self.settings.fail_closed:
            raise AuditUnavailable(reason)
        self._stats["dropped"] += 1
        log.error("audit event %s not recorded: %s (audit.fail_closed is false)", event.type, reason)

    def _notify(self, event: AuditEvent) -> None:
        if self._on_record is None:
            return
        try:
            self._on_record(event)
        except Exception:
            log.exception("audit on_record callback failed (the event is kept)")

    @property
    def healthy(self) -> bool:
        """Whether the local log is writing. A sink being down does not make the trail unhealthy."""
        return self._healthy and not self._closing

    @property
    def chain(self) -> str:
        return self._writer.chain if self._writer is not None else ""

    @property
    def slot(self) -> str:
        return self._lock.slot if self._lock is not None else ""

    def statistics(self) -> AuditStatistics:
        writer = self._writer.statistics() if self._writer is not None else None
        return AuditStatistics(
            healthy=self.healthy,
            chain=self.chain,
            slot=self.slot,
            records=self._stats["records"],
            durable_waits=self._stats["durable"],
            batches=self._stats["batches"],
            fsyncs=self._fsyncs + (writer.fsyncs if writer else 0),
            bytes=self._bytes + (writer.bytes if writer else 0),
            queue_length=self._receive.statistics().current_buffer_used,
            queue_capacity=QUEUE_CAPACITY,
            committed_seq=self._committed_seq,
            segment=writer.segment if writer else 0,
            dropped=self._stats["dropped"],
            failures=self._stats["failures"],
            last_error=self._last_error,
            sinks=tuple(f.statistics() for f in self._forwarders),
        )

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Open (and recover) the log, then write and forward until closed or cancelled.

        Raises :class:`AuditUnavailable` before ``started`` when the log cannot be opened and
        ``fail_closed`` is set: the gateway must not serve unrecorded.
        """
        if self._started:
            raise RuntimeError("AuditTrail.run may be called once")
        self._started = True
        try:
            try:
                await self._open()
            except (OSError, auditlog.AuditLogError) as exc:
                self._fail(exc)
                if self.settings.fail_closed:
                    raise AuditUnavailable(f"cannot open the audit log in {self.directory}: {exc}") from exc
                log.error("cannot open the audit log in %s (%s); serving unrecorded because audit.fail_closed is false", self.directory, exc)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._run_forwarders)
                task_status.started()
        finally:
            self._finished.set()
            if self._lock is not None:
                self._lock.release()

    async def aclose(self) -> None:
        """Flush what is queued, seal the open segment, give sinks a last chance. Idempotent."""
        if not self._closing:
            self._closing = True
            self._close_requested.set()
            self._send.close()
        if not self._started:
            return
        with trio.move_on_after(FLUSH_DEADLINE + 1.0) as scope:
            scope.shield = True
            await self._writer_done.wait()
        with trio.move_on_after(FINAL_FORWARD_DEADLINE) as scope:
            scope.shield = True
            await self._finished.wait()
        if self._forwarders_scope is not None:
            self._forwarders_scope.cancel()

    async def _run_forwarders(self) -> None:
        with trio.CancelScope() as scope:
            self._forwarders_scope = scope
            async with trio.open_nursery() as nursery:
                for forwarder in self._forwarders:
                    nursery.start_soon(forwarder.run)

    # --- the writer ------------------------------------------------------------------------------------

    async def _open(self) -> None:
        writer = await trio.to_thread.run_sync(self._open_sync)
        self._writer = writer
        self._unconfirmed_from = None
        self._committed_seq = writer.next_seq - 1
        self._last_sync = self._clock()
        self._healthy = True
        self._wake_forwarders()

    def _open_sync(self) -> auditlog.LogWriter:
        """Blocking (runs in a worker thread): key, slot lock, recovery, new segment."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._key is None:
            self._key, self.key_generated = load_key(self.settings, self.directory, self._signing_key_material, self._resolve_secret)
            self.public_key = auditlog.public_key_bytes(self._key)
            if self.key_generated:
                log.warning(
                    "no audit.signing_key configured: generated %s (key id %s); keep a copy of its public key "
                    "elsewhere so `bastion audit verify` can prove the log was not re-signed",
                    self.directory / auditlog.SIGNING_KEY_FILE,
                    auditlog.key_id(self.public_key),
                )
        if self._lock is None:
            self._lock = auditlog.SlotLock.acquire(self.directory, self._preferred_slot)
        writer, warnings = auditlog.LogWriter.open(
            self._lock,
            self._key,
            segment_max_bytes=self.settings.segment_max_bytes,
            clock=self._clock,
            unconfirmed_from=self._unconfirmed_from,
        )
        for warning in warnings:
            log.warning("audit log recovery: %s", warning.message)
        self.warnings += tuple(warnings)
        return writer

    def _fail(self, exc: BaseException) -> None:
        self._healthy = False
        self._last_error = f"{type(exc).__name__}: {exc}"

    async def _write_loop(self) -> None:
        try:
            while True:
                if self._writer is None:
                    if self._closing:
                        self._fail_queued()
                        self._stats["dropped"] += len(self._held)
                        self._held = []
                        break
                    await self._reopen()
                    continue
                batch = await self._next_batch()
                if batch is None:
                    break
                await self._commit(batch)
                if self._writer is not None:
                    await self._rotate_if_full()
        finally:
            with trio.move_on_after(FLUSH_DEADLINE) as scope:
                scope.shield = True
                await self._drain_and_close()
            self._writer_done.set()
            self._wake_forwarders()

    async def _next_batch(self) -> list[_Pending] | None:
        """What has queued up (at least one record), or None when the queue is closed and empty."""
        batch, self._held = self._held, []
        if not batch:
            if self.local_log.fsync == "durable" and self._writer is not None and self._writer.statistics().next_seq - 1 > self._committed_seq:
                with trio.move_on_after(max(0.0, self._last_sync + DURABLE_FSYNC_INTERVAL - self._clock())):
                    try:
                        batch.append(await self._receive.receive())
                    except trio.EndOfChannel:
                        return None
                if not batch:
                    return []  # interval passed: _commit syncs what is pending
            else:
                try:
                    batch.append(await self._receive.receive())
                except trio.EndOfChannel:
                    return None
        while len(batch) < MAX_BATCH_RECORDS:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return batch

    async def _commit(self, batch: list[_Pending]) -> None:
        writer = self._writer
        assert writer is not None
        sync = self.local_log.fsync == "always" or any(p.durable for p in batch) or not batch or self._clock() - self._last_sync >= DURABLE_FSYNC_INTERVAL
        entries = [(p.type, p.event) for p in batch]
        first_seq = writer.next_seq
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                records = writer.append(entries) if entries else []
                if sync:
                    writer.sync()
                result["records"] = records
            except BaseException as exc:  # reported to every waiter of the batch below
                result["error"] = exc

        try:
            # not abandonable: the batch's outcome must reach its waiters even when we are cancelled
            await trio.to_thread.run_sync(work)
        finally:
            self._settle(batch, result, sync, first_seq)

    def _settle(self, batch: list[_Pending], result: dict[str, Any], synced: bool, first_seq: int) -> None:
        writer = self._writer
        error = result.get("error")
        if error is None and "records" not in result:
            error = AuditUnavailable("the write was interrupted")
        if error is None:
            written = result["records"]
            self._stats["batches"] += 1 if batch else 0
            if synced and writer is not None:
                self._committed_seq = writer.next_seq - 1
                self._last_sync = self._clock()
                self._wake_forwarders()
            for pending, record in zip(batch, written):
                if record is None:  # this event alone could not be encoded: its caller is told
                    self._stats["dropped"] += 1
                    log.error("audit event %s could not be encoded and was not recorded", pending.type)
                    pending.error = AuditUnavailable(f"the {pending.type} event could not be encoded")
                else:
                    self._stats["records"] += 1
                    self._stats["durable"] += pending.done is not None
                if pending.done is not None:
                    pending.done.set()
            return
        self._stats["failures"] += 1
        self._fail(error)
        log.error("audit log write failed: %s; refusing statements until it recovers" if self.settings.fail_closed else "audit log write failed: %s", self._last_error)
        for pending in batch:
            if pending.done is not None:
                pending.error = error
                pending.done.set()
            else:
                self._stats["dropped"] += 1
        if writer is not None:
            self._unconfirmed_from = first_seq if batch else None
            self._retire_writer(writer)

    def _retire_writer(self, writer: auditlog.LogWriter) -> None:
        statistics = writer.statistics()
        self._fsyncs += statistics.fsyncs
        self._bytes += statistics.bytes
        writer.abandon()
        self._writer = None

    async def _reopen(self) -> None:
        """Fail what waits, keep what need not, and retry opening until it works."""
        delay = REOPEN_RETRY_MIN
        while self._writer is None and not self._closing:
            self._fail_queued()
            try:
                await self._open()
            except (OSError, auditlog.AuditLogError) as exc:
                self._fail(exc)
                log.error("cannot reopen the audit log: %s; retrying in %.1fs", exc, delay)
                with trio.move_on_after(delay):
                    await self._close_requested.wait()
                delay = min(delay * 2, REOPEN_RETRY_MAX)
            else:
                log.warning("audit log reopened (segment %d)", self._writer.segment if self._writer else 0)

    def _fail_queued(self) -> None:
        """While the log is down, durable waiters learn now; non-durable records wait in ``_held``."""
        while True:
            try:
                pending = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            if pending.done is not None:
                pending.error = AuditUnavailable(self._last_error)
                pending.done.set()
            elif len(self._held) < QUEUE_CAPACITY:
                self._held.append(pending)
            else:
                self._stats["dropped"] += 1

    async def _rotate_if_full(self) -> None:
        writer = self._writer
        assert writer is not None
        if writer.segment_bytes < writer.segment_max_bytes:
            return
        try:
            await trio.to_thread.run_sync(writer.rotate_if_full)
        except (OSError, auditlog.AuditLogError) as exc:
            self._fail(exc)
            log.error("cannot start a new audit segment: %s", exc)
            self._retire_writer(writer)

    async def _drain_and_close(self) -> None:
        """Write what is still queued and seal the segment (runs shielded, under a deadline)."""
        try:
            while self._writer is not None:
                batch = self._held
                self._held = []
                while len(batch) < MAX_BATCH_RECORDS:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if not batch:
                    break
                await self._commit(batch)
            writer = self._writer
            if writer is not None:
                await trio.to_thread.run_sync(writer.close)
                self._committed_seq = writer.next_seq - 1
        except (OSError, auditlog.AuditLogError) as exc:
            self._fail(exc)
            log.error("could not close the audit log cleanly: %s (the next start recovers it)", exc)
        finally:
            self._closing = True
            self._send.close()
            self._fail_queued()

    def _wake_forwarders(self) -> None:
        self._progress.set()
        self._progress = trio.Event()


class _Forwarder:
    """Feeds one sink from the local log's files, from where the sink got to."""

    def __init__(self, trail: AuditTrail, sink: AuditSink, retry_max: float) -> None:
        self.trail = trail
        self.sink = sink
        self.retry_max = retry_max
        self.delivered = 0
        self.healthy = True
        self.failures = 0
        self.last_error = ""
        self._cursor: auditlog.ChainCursor | None = None
        self._chain = ""

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(
            name=self.sink.name,
            delivered_seq=self.delivered,
            lag=max(0, self.trail._committed_seq - self.delivered),
            healthy=self.healthy,
            failures=self.failures,
            last_error=self.last_error,
        )

    async def run(self) -> None:
        trail = self.trail
        delay = SINK_RETRY_MIN
        opened = False
        try:
            while True:
                writer = trail._writer
                if writer is not None and self._chain != writer.chain:
                    self._chain = writer.chain
                    self._cursor = auditlog.ChainCursor(trail.directory, writer.slot)
                    self.delivered = await trio.to_thread.run_sync(auditlog.read_position, trail.directory, self.sink.name, writer.slot, writer.chain)
                if not self._chain or self.delivered >= trail._committed_seq:
                    if trail._writer_done.is_set():
                        return
                    await trail._progress.wait()
                    continue
                try:
                    if not opened:
                        with trio.fail_after(SINK_CALL_TIMEOUT):
                            await self.sink.open()
                        opened = True
                    await self._forward_once()
                    delay = SINK_RETRY_MIN
                except Exception as exc:  # any sink failure: back off and retry from the same place
                    self.failures += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if self.healthy:
                        log.warning("audit sink %s failed (%s); retrying, records are kept in the local log", self.sink.name, self.last_error)
                    self.healthy = False
                    if opened:
                        opened = False
                        await self._close_sink()
                    if trail._writer_done.is_set():
                        return
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.retry_max)
        finally:
            if opened:
                with trio.move_on_after(FINAL_FORWARD_DEADLINE) as scope:
                    scope.shield = True
                    await self._close_sink()

    async def _forward_once(self) -> None:
        trail, cursor = self.trail, self._cursor
        assert cursor is not None
        upto = trail._committed_seq
        records = await trio.to_thread.run_sync(cursor.read, self.delivered, upto, SINK_BATCH)
        if cursor.skipped:
            runs, cursor.skipped = cursor.skipped, []
            log.error("audit sink %s: records %s were pruned before it received them", self.sink.name, runs)
        if not records:
            self.delivered = max(self.delivered, min(cursor._next_seq - 1, upto))  # nothing readable up to here
            return
        with trio.fail_after(SINK_CALL_TIMEOUT):
            await self.sink.write(records)
        self.delivered = records[-1].seq
        if not self.healthy:
            log.warning("audit sink %s is back; delivered up to seq %d", self.sink.name, self.delivered)
            self.healthy = True
        writer = trail._writer
        slot = writer.slot if writer is not None else trail.slot
        await trio.to_thread.run_sync(auditlog.write_position, trail.directory, self.sink.name, slot, self._chain, self.delivered)

    async def _close_sink(self) -> None:
        try:
            with trio.move_on_after(FINAL_FORWARD_DEADLINE):
                await self.sink.aclose()
        except Exception:
            log.debug("audit sink %s failed to close", self.sink.name, exc_info=True)


def build_sinks(config: Any, hooks: Any, resolve_secret: Callable[[Any], Any]) -> list[AuditSink]:
    """The sink objects ``[[audit.sinks]]`` asks for, built by the plugins' factories."""
    specs = hooks.sinks()
    sinks = []
    for section in config.audit.sinks:
        context = ComponentContext(
            name=section.name,
            state_dir=Path(config.gateway.state_dir),
            config_dir=config.source.parent if config.source else Path.cwd(),
            resolve_secret=resolve_secret,
        )
        sinks.append(specs[section.kind].factory(section.options, context))
    return sinks
