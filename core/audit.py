"""The audit trail at run time: group-committed local log, sinks fed from it.

The gateway calls :meth:`AuditTrail.record` for every event. The event becomes plain data at once
(:func:`~bastion.core.events.event_fields`) and waits in a bounded queue for one writer task,
which appends whatever has queued up as one batch — on the event loop's thread: appending is
CPU (msgpack, SHA-256, compression) and one ``write`` into the page cache. Only an fsync leaves
the loop, to one long-lived thread (the *lane*, which also seals segments), and one fsync covers every record written before it (group
commit): while it runs, the next batch queues up. A session that has the trail to itself skips
the writer task: its durable call appends the batch itself (one commit at a time either way). A
``durable=True`` caller returns once its record is as safe as ``fsync`` says (see
:class:`LocalLogSettings`); under ``audit.fail_closed`` a record that cannot be made so raises
:class:`AuditUnavailable`, and the session refuses the statement.

Records nobody waits for (responses, rows, session ends) are not written one by one: they ride
along with the next durable record, or are written once they have waited ``WRITE_DELAY``, or
once a block's worth has queued up. A statement's three records thus usually cost one write and
one fsync between them, and the thread hand-off (tens of µs of CPU) is paid once per fsync, not
once per record.

The local log (see :mod:`bastion.core.auditlog`) is the source of truth. Every other sink —
SQLite index, PostgreSQL, NATS — is fed by its own forwarder task that reads the log's files from
where that sink got to (kept in ``audit/sinks/``), so a sink that is down is caught up when it
comes back, nothing is dropped meanwhile, and a slow or broken sink never holds up a statement.
Delivery is at least once; records carry ``chain:seq`` ids, so sinks make it exactly once.

Forwarders send only records the writer has fsynced: a crash can lose an unacknowledged record
whose seq is later reused, and no sink may ever have seen it.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from bastion.core import auditlog
from bastion.core.config import AuditSection
from bastion.core.events import AuditEvent, event_fields
from bastion.core.specs import AuditSink, ComponentContext

log = logging.getLogger("bastion.audit")

# Events waiting for the writer. Bounded so a stalled disk slows callers down (backpressure) rather
# than growing memory; 1024 absorbs a burst from many sessions between two fsyncs.
QUEUE_CAPACITY = 1024
# The most records one write/fsync covers, so one append (and one failed batch) stays bounded.
MAX_BATCH_RECORDS = 1024
# The longest a record nobody waits for stays queued before it is written (to the OS), unless a
# durable record or a full block takes it sooner. Short enough that a process crash loses at most
# this much of them; long enough that a statement's response and rows wait for the next
# statement's record and share its write, compressor and fsync.
WRITE_DELAY = 0.01
# Queued records nobody waits for that are written without waiting for WRITE_DELAY: one block's
# worth, the most one compressor is set up for anyway.
WRITE_THRESHOLD = auditlog.MAX_BLOCK_RECORDS
# On cancellation or close, how long the writer keeps flushing what is queued and sealing the
# segment. Below the gateway's 5 s cleanup deadline, which also covers the final records.
FLUSH_DEADLINE = 3.0
# After close, how long forwarders get to hand sinks the last records; missed ones go next start.
FINAL_FORWARD_DEADLINE = 1.0
# With fsync = "durable", the longest a record nobody waited for may go without an fsync.
DURABLE_FSYNC_INTERVAL = 1.0
# With fsync = "interval", the default time between fsyncs: what a power loss can take. PostgreSQL's
# synchronous_commit = off risks a few hundred ms the same way; 100 ms keeps the fsync's cost (one
# thread hand-off) far below a busy gateway's per-statement work.
DEFAULT_FSYNC_INTERVAL_MS = 100
# Reopening the local log after a failure (full disk, I/O error): first retry, then at most.
REOPEN_RETRY_MIN, REOPEN_RETRY_MAX = 0.1, 5.0
# Once the log has moved on, how long a forwarder lets records gather before it reads them, so
# that one read and one sink call (each a thread hand-off or a round trip) carry many statements'
# records rather than one each. Sinks are copies: this much more lag costs nothing.
FORWARD_GATHER = 0.05
# Records handed to a sink per write call: big enough to amortise a round trip, small enough
# that one failed call redoes little.
SINK_BATCH = 500
# One sink call (open or write) that takes longer has failed; it is retried from the same place.
SINK_CALL_TIMEOUT = 30.0
# Backoff between attempts on a failing sink.
SINK_RETRY_MIN, SINK_RETRY_MAX = 0.2, 30.0
FSYNC_MODES = ("always", "durable", "interval")
DEFAULT_FSYNC_MODE = "durable"
DEFAULT_SLOT = "main"
# What one ring of a doorbell writes: an eventfd takes exactly 8 bytes (a counter increment)
DOORBELL_RING = (1).to_bytes(8, sys.byteorder)
# Enough to empty a doorbell in one read, however many rings a pipe collected
DOORBELL_DRAIN_BYTES = 4096


class AuditUnavailable(Exception):
    """The local audit log cannot record (disk full, I/O error, closed). Refuse the statement."""


FSYNC_DOC = """``fsync`` says when the local log calls fsync, and so what a ``durable=True`` record —
a statement's, which the gateway waits for before it forwards the statement — survives once its
caller goes on:

* ``"durable"`` (the default): a batch holding a durable record is fsynced before those callers
  return, so an acknowledged statement's record survives a power loss. Records nobody waits for
  (responses, result rows, session ends) are written to the OS within ``WRITE_DELAY`` (10 ms) or
  with the next durable record, and fsynced with the next durable batch or within
  ``DURABLE_FSYNC_INTERVAL`` (1 s): a process crash (kill -9) can lose the last 10 ms of them, a
  power loss the last second.
* ``"interval"``: a durable record is acknowledged once it is written to the OS (the ``write``
  returned), not once it is fsynced; fsync runs every ``fsync_interval_ms`` (default 100) while
  something is unsynced. A process crash (kill -9, the OOM killer) loses no acknowledged record:
  the kernel has it. A power loss, kernel crash or failing disk can lose the last
  ``fsync_interval_ms`` of records, those of statements that were already forwarded included, so
  the trail may then lack statements that ran; the next start seals what survived and continues
  the chain after it, and no sink has seen a lost record (sinks get fsynced records only). An
  fsync that fails marks the log unhealthy (statements are refused from then on) and the damage
  record written at reopen names the first record whose durability was not confirmed. Costs no
  thread hand-off per statement, only one per interval.
* ``"always"``: every batch, durable or not, is fsynced before the next is written and before
  its durable callers return; no record waits for a write. The most fsyncs, for deployments that
  want responses and rows as safe as statements.
"""


@attrs.frozen
class LocalLogSettings:
    """Where and how the local log is written; the ``file`` sink kind sets it.

    ``directory``: the audit directory (default ``<state_dir>/audit``). ``fsync_interval_ms``:
    used by ``fsync = "interval"`` only.
    """

    directory: Path | None = None
    fsync: str = attrs.field(default=DEFAULT_FSYNC_MODE, validator=attrs.validators.in_(FSYNC_MODES))
    fsync_interval_ms: int = attrs.field(default=DEFAULT_FSYNC_INTERVAL_MS, validator=[attrs.validators.instance_of(int), attrs.validators.gt(0)])


LocalLogSettings.__doc__ = f"{LocalLogSettings.__doc__}\n{FSYNC_DOC}"


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
    durable_waits: int  # records whose caller waited for them
    batches: int  # appends (one write call each)
    fsyncs: int
    bytes: int  # written to segments (compressed, with framing)
    queue_length: int  # records waiting for the writer
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


def _forget_waiter(pending: _Pending) -> Any:
    """Abort function of a durable caller's wait: a cancelled caller is not woken later."""

    def abort(_: Any) -> trio.lowlevel.Abort:
        pending.task = None
        return trio.lowlevel.Abort.SUCCEEDED

    return abort


class _Pending:
    """One queued event: its plain data and, for a durable caller, how its wait ends.

    Not a ``trio.Event`` per record: the caller parks its own task and the writer reschedules it,
    a fraction of the cost, on a path every statement takes.
    """

    __slots__ = ("type", "event", "durable", "settled", "task", "error")

    def __init__(self, record_type: str, event: dict[str, Any], durable: bool) -> None:
        self.type = record_type
        self.event = event
        self.durable = durable
        self.settled = False  # written (and fsynced where the mode says so), or failed: see error
        self.task: trio.lowlevel.Task | None = None  # the durable caller parked until settled
        self.error: BaseException | None = None

    def settle(self, error: BaseException | None = None) -> None:
        self.error = error
        self.settled = True
        if self.task is not None:
            trio.lowlevel.reschedule(self.task)
            self.task = None

    async def wait(self) -> None:
        if not self.settled:
            self.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(_forget_waiter(self))


class _Doorbell:
    """A file descriptor one thread rings and another waits on: an eventfd where the OS has one
    (one descriptor, rings add up in a counter), otherwise a pipe."""

    def __init__(self, *, blocking: bool, use_eventfd: bool = hasattr(os, "eventfd")) -> None:
        if use_eventfd:
            descriptor = os.eventfd(0, 0 if blocking else os.EFD_NONBLOCK)
            self._read_end, self._write_end = descriptor, descriptor
        else:
            self._read_end, self._write_end = os.pipe()
            os.set_blocking(self._read_end, blocking)

    def fileno(self) -> int:
        return self._read_end

    def ring(self) -> None:
        os.write(self._write_end, DOORBELL_RING)

    def wait(self) -> None:
        """Block until rung (a blocking doorbell)."""
        os.read(self._read_end, DOORBELL_DRAIN_BYTES if self._read_end == self._write_end else len(DOORBELL_RING))

    def clear(self) -> None:
        """Forget the rings so far (a non-blocking doorbell)."""
        try:
            os.read(self._read_end, DOORBELL_DRAIN_BYTES)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._read_end)
        if self._write_end != self._read_end:
            os.close(self._write_end)


class _Lane:
    """One long-lived thread that runs the writer's blocking calls (fsync, opening and sealing
    segments) one at a time, handed over and back through two doorbells.

    Not ``trio.to_thread.run_sync`` per call: on the machines measured that hand-off costs about
    three times the CPU of a doorbell round trip (benchmarks/audit_bench.py), and a durable
    statement needs one per fsync.
    """

    def __init__(self, *, use_eventfd: bool = hasattr(os, "eventfd")) -> None:
        self._use_eventfd = use_eventfd
        self._to_thread: _Doorbell | None = None
        self._to_trio: _Doorbell | None = None
        self._thread: threading.Thread | None = None
        self._call: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
        self._finished = False
        self._value: Any = None
        self._error: BaseException | None = None

    def start(self) -> None:
        self._to_thread = _Doorbell(blocking=True, use_eventfd=self._use_eventfd)
        self._to_trio = _Doorbell(blocking=False, use_eventfd=self._use_eventfd)
        # a daemon: a thread stuck in the fsync of a dead disk must not keep the process alive
        self._thread = threading.Thread(target=self._serve, args=(self._to_thread, self._to_trio), name="bastion-audit-lane", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread. The thread closes its own doorbell.

        A call still under way (an fsync stuck on a dead disk, past the close deadline) keeps the
        thread and its doorbells: closing them now could hand their numbers to other files that
        the thread would then write to. They go with the process.
        """
        if self._thread is None or self._to_thread is None or self._to_trio is None:
            return
        if self._call is not None and not self._finished:
            log.error("the audit writer's thread is still in a call (a stuck fsync?); leaving it running")
            return
        self._call = None
        self._to_thread.ring()
        trio.lowlevel.notify_closing(self._to_trio.fileno())
        self._to_trio.close()
        self._thread = self._to_thread = self._to_trio = None

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in the lane's thread: its result, or its exception raised here.

        Never abandoned, like ``trio.to_thread.run_sync`` without ``abandon_on_cancel``: when
        cancelled meanwhile this still waits for the call and returns its outcome (which must
        reach whoever waits for the batch); the cancellation is raised at the caller's next
        checkpoint, its scope being still cancelled.
        """
        if self._to_thread is None or self._to_trio is None:
            raise auditlog.AuditLogError("the audit writer's thread is not running")
        if self._call is not None and not self._finished:  # one call at a time: the trail's commits take turns
            raise RuntimeError("the audit writer's thread is already in a call")
        self._finished, self._value, self._error = False, None, None
        self._call = (function, args)
        self._to_thread.ring()
        try:
            await self._until_finished()
        except trio.Cancelled:  # not lost: see the docstring
            with trio.CancelScope(shield=True):
                await self._until_finished()
        value, error = self._value, self._error
        self._value = self._error = None
        if error is not None:
            raise error
        return value

    async def _until_finished(self) -> None:
        assert self._to_trio is not None
        while not self._finished:  # a ring left from an earlier call only costs one more look
            await trio.lowlevel.wait_readable(self._to_trio.fileno())
            self._to_trio.clear()

    def _serve(self, to_thread: _Doorbell, to_trio: _Doorbell) -> None:
        while True:
            to_thread.wait()
            call = self._call
            if call is None:
                to_thread.close()
                return
            function, args = call
            try:
                self._value = function(*args)
            except BaseException as exc:  # handed to the caller in trio, which raises it
                self._error = exc
            self._finished = True
            to_trio.ring()


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
        # what each fsync mode means for the writer (see FSYNC_DOC)
        self._write_at_once = self.local_log.fsync == "always"  # no record waits for WRITE_DELAY
        self._sync_every_batch = self.local_log.fsync == "always"
        self._sync_durable_batches = self.local_log.fsync in ("always", "durable")
        self._sync_interval = self.local_log.fsync_interval_ms / 1000 if self.local_log.fsync == "interval" else DURABLE_FSYNC_INTERVAL
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_durable = 0
        self._first_queued_at = 0.0  # trio time the oldest queued record came in
        self._unsynced_since: float | None = None  # trio time of the oldest write not yet fsynced
        self._room: trio.Event | None = None  # set when a full queue has room again
        self._work = trio.Event()  # wakes the writer
        self._writer_parked = False  # the writer waits for work and nobody has woken it
        self._last_durable_session: str | None = None  # whose durable record came last
        self._busy = False  # a commit (or rotation, or the close) is under way: one at a time
        self._idle = trio.Event()  # set when a commit ends (the writer waits on it while busy)
        self._commit_done = trio.Event()  # set after each commit (the ticker waits on it)
        self._ticker_idle = False
        self._ticker_wake = trio.Event()
        self._ticker_sleep: trio.CancelScope | None = None  # the ticker's sleep, until its next deadline
        self._lane = _Lane()
        self._key: Any = None
        self._lock: auditlog.SlotLock | None = None
        self._writer: auditlog.LogWriter | None = None
        self._healthy = True
        self._started = False
        self._closing = False
        self._writer_done = trio.Event()
        self._finished = trio.Event()
        self._forwarders_scope: trio.CancelScope | None = None
        self._progress = trio.Event()  # replaced after every commit: forwarders wait on it
        self._committed_seq = 0
        self._unconfirmed_from: int | None = None
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
        """Queue ``event``; with ``durable`` return only once it is as safe as the fsync mode says.

        Without ``durable`` this returns at once while the queue has room, without a checkpoint:
        the record is written within ``WRITE_DELAY``. When the queue is full it waits for room.
        A durable call that needs no fsync (``fsync = "interval"``) may also return without one.
        """
        if self._closing:
            self._unavailable("the audit trail is closed", event)
            return
        if not self._healthy:
            self._unavailable(f"the audit log cannot write ({self._last_error})", event)
            return
        data = event_fields(event)
        while len(self._queue) >= QUEUE_CAPACITY:
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()
            if self._closing or not self._healthy:
                self._unavailable("the audit trail is closed" if self._closing else f"the audit log cannot write ({self._last_error})", event)
                return
        pending = _Pending(event.type, data, durable)
        # A durable caller that finds the writer idle writes the batch itself: no hand-over to the
        # writer task and back (two trips through trio's scheduler, a good part of a statement's
        # cost). Only while one session has the trail to itself (the previous durable record was
        # its own): when sessions take turns, the writer task gathers theirs into one batch, one
        # write and one compressor, which saves more. Never when the writer was woken for
        # something (rotation, a reopen, due records).
        leading = durable and self._writer_parked and not self._busy and event.session_id == self._last_durable_session
        if durable:
            self._last_durable_session = event.session_id
        self._enqueue(pending, wake_writer=not leading)
        self._notify(event)
        if not durable:
            return
        if leading:
            await self._commit_now()
        await pending.wait()
        if pending.error is not None:
            if self.settings.fail_closed:
                raise AuditUnavailable(f"the audit log could not make the record durable: {pending.error}") from pending.error
            log.error("audit record not confirmed durable (%s); continuing because audit.fail_closed is false", pending.error)

    def _enqueue(self, pending: _Pending, *, wake_writer: bool = True) -> None:
        queue = self._queue
        was_empty = not queue
        if was_empty:
            self._first_queued_at = trio.current_time()
        queue.append(pending)
        if pending.durable:
            self._queued_durable += 1
        if pending.durable or self._write_at_once or len(queue) >= WRITE_THRESHOLD:
            if wake_writer:
                self._wake_writer()
        elif was_empty:
            self._arm_ticker(self._first_queued_at + WRITE_DELAY)

    def _wake_writer(self) -> None:
        self._writer_parked = False
        self._work.set()

    def _arm_ticker(self, deadline: float) -> None:
        """Make sure the ticker looks again by ``deadline`` (cheap when it already will)."""
        if self._ticker_idle:
            self._ticker_idle = False
            self._ticker_wake.set()
        elif self._ticker_sleep is not None and deadline < self._ticker_sleep.deadline:
            self._ticker_sleep.deadline = deadline

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
            queue_length=len(self._queue),
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
        self._lane.start()
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
                nursery.start_soon(self._tick_loop, self._writer_done)
                nursery.start_soon(self._run_forwarders)
                task_status.started()
        finally:
            self._finished.set()
            self._lane.stop()
            if self._lock is not None:
                self._lock.release()

    async def aclose(self) -> None:
        """Flush what is queued, seal the open segment, give sinks a last chance. Idempotent."""
        if not self._closing:
            self._closing = True
            self._close_requested.set()
            self._wake_writer()
            self._let_waiters_in()
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
        writer = await self._lane.run(self._open_sync)
        self._writer = writer
        self._unconfirmed_from = None
        self._committed_seq = writer.next_seq - 1
        self._unsynced_since = None
        self._healthy = True
        self._wake_forwarders()

    def _open_sync(self) -> auditlog.LogWriter:
        """Blocking (runs in the lane's thread): key, slot lock, recovery, new segment."""
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
        self._let_waiters_in()

    def _let_waiters_in(self) -> None:
        """Wake callers waiting for room, to find the trail closed or failed (or room)."""
        if self._room is not None:
            self._room.set()
            self._room = None

    def _write_due(self, now: float) -> bool:
        queue = self._queue
        if not queue:
            return False
        return bool(self._queued_durable) or self._write_at_once or self._closing or len(queue) >= WRITE_THRESHOLD or now >= self._first_queued_at + WRITE_DELAY

    def _sync_due(self, now: float) -> bool:
        return self._unsynced_since is not None and (self._closing or now >= self._unsynced_since + self._sync_interval)

    def _next_deadline(self) -> float | None:
        """When the ticker must next look: the oldest queued record's write, the oldest write's fsync."""
        deadlines = []
        if self._queue:
            deadlines.append(self._first_queued_at + WRITE_DELAY)
        if self._unsynced_since is not None:
            deadlines.append(self._unsynced_since + self._sync_interval)
        return min(deadlines, default=None)

    async def _tick_loop(self, writer_done: trio.Event) -> None:
        """Wakes the writer when a queued record has waited WRITE_DELAY or a write needs its fsync.

        One task sleeping until the next deadline, rather than the writer waiting with a timeout
        every time: under steady load it wakes once per deadline, not once per statement.
        """
        while not writer_done.is_set():
            deadline = self._next_deadline()
            if deadline is None:
                self._ticker_idle = True
                self._ticker_wake = trio.Event()
                await self._ticker_wake.wait()
                continue
            with trio.move_on_at(deadline) as self._ticker_sleep:
                await trio.sleep_forever()
            self._ticker_sleep = None
            now = trio.current_time()
            if self._writer is not None and (self._write_due(now) or self._sync_due(now)):
                self._commit_done = trio.Event()
                self._wake_writer()
                await self._commit_done.wait()

    async def _write_loop(self) -> None:
        try:
            while True:
                if self._busy:  # a durable caller is writing its batch: its end wakes us
                    self._idle = trio.Event()
                    await self._idle.wait()
                    continue
                writer = self._writer
                if writer is None:
                    if self._closing:
                        self._fail_queued(keep=False)
                        break
                    await self._reopen()
                    continue
                if writer.segment_bytes >= writer.segment_max_bytes:
                    await self._rotate(writer)
                    continue
                now = trio.current_time()
                write, sync = self._write_due(now), self._sync_due(now)
                if not write and not sync:
                    if self._closing:
                        break
                    self._work = trio.Event()
                    self._writer_parked = True
                    await self._work.wait()
                    continue
                await self._commit_now(write=write, sync_due=sync)
        finally:
            with trio.move_on_after(FLUSH_DEADLINE) as scope:
                scope.shield = True
                await self._drain_and_close()
            self._writer_done.set()
            # the ticker ends: wherever it waits, it finds the writer done
            self._commit_done.set()
            self._ticker_wake.set()
            if self._ticker_sleep is not None:
                self._ticker_sleep.cancel()
            self._wake_forwarders()

    def _take_batch(self) -> list[_Pending]:
        queue = self._queue
        if len(queue) <= MAX_BATCH_RECORDS:
            batch = list(queue)
            queue.clear()
        else:
            batch = [queue.popleft() for _ in range(MAX_BATCH_RECORDS)]
        if self._queued_durable:
            self._queued_durable -= sum(1 for pending in batch if pending.durable)
        if queue:
            self._first_queued_at = trio.current_time()
        self._let_waiters_in()
        return batch

    async def _commit_now(self, *, write: bool = True, sync_due: bool = False) -> None:
        """Commit what is queued (the writer task, or a durable caller that found nobody writing);
        one commit at a time, and the writer looks again when it ends."""
        self._busy = True
        try:
            await self._commit(self._take_batch() if write else [], sync_due=sync_due)
        finally:
            self._busy = False
            self._commit_done.set()
            self._idle.set()
            writer = self._writer
            if writer is None or writer.segment_bytes >= writer.segment_max_bytes or self._queued_durable:
                self._wake_writer()  # reopen, rotate, or durable records that came in meanwhile

    async def _commit(self, batch: list[_Pending], *, sync_due: bool = False) -> None:
        """Append ``batch`` here on the loop's thread, fsync in the lane when due, tell the waiters."""
        writer = self._writer
        assert writer is not None
        first_seq = writer.next_seq
        written: list[int | None] = []
        error: BaseException | None = None
        synced = False
        try:
            if batch:
                written = writer.append([(p.type, p.event) for p in batch])
                if self._unsynced_since is None:
                    self._unsynced_since = trio.current_time()
            durable = any(p.durable for p in batch)
            if sync_due or (batch and self._sync_every_batch) or (durable and self._sync_durable_batches):
                await self._lane.run(writer.sync)
                synced = True
        except Exception as exc:  # OSError, AuditLogError, or a bug: every waiter of the batch is told below
            error = exc
        finally:
            # whatever happened, every waiter of the batch hears of it
            if error is None and len(written) != len(batch):
                error = AuditUnavailable("the write was interrupted")
            self._settle(batch, written, error, synced, first_seq)

    def _settle(self, batch: list[_Pending], written: list[int | None], error: BaseException | None, synced: bool, first_seq: int) -> None:
        writer = self._writer
        if error is None:
            stats = self._stats
            if batch:
                stats["batches"] += 1
            if synced and writer is not None:
                self._committed_seq = writer.next_seq - 1
                self._unsynced_since = None
                self._wake_forwarders()
            for pending, seq in zip(batch, written):
                if seq is None:  # this event alone could not be encoded: its caller is told
                    stats["dropped"] += 1
                    log.error("audit event %s could not be encoded and was not recorded", pending.type)
                    pending.settle(AuditUnavailable(f"the {pending.type} event could not be encoded"))
                    continue
                stats["records"] += 1
                if pending.durable:
                    stats["durable"] += 1
                    pending.settle()
            deadline = self._next_deadline()
            if deadline is not None:
                self._arm_ticker(deadline)
            return
        self._stats["failures"] += 1
        self._fail(error)
        log.error("audit log write failed: %s; refusing statements until it recovers" if self.settings.fail_closed else "audit log write failed: %s", self._last_error)
        for pending in batch:
            if pending.durable:
                pending.settle(error)
            else:
                self._stats["dropped"] += 1
        if writer is not None:
            # after a failed write the records before the batch are intact (recovery fsyncs them);
            # after a failed fsync nothing since the last good one is known to be on disk
            failed_write = bool(batch) and len(written) != len(batch)
            self._unconfirmed_from = first_seq if failed_write else self._committed_seq + 1
            self._retire_writer(writer)

    def _retire_writer(self, writer: auditlog.LogWriter) -> None:
        statistics = writer.statistics()
        self._fsyncs += statistics.fsyncs
        self._bytes += statistics.bytes
        writer.abandon()
        self._writer = None
        self._unsynced_since = None

    async def _reopen(self) -> None:
        """Fail what waits, keep what need not, and retry opening until it works."""
        delay = REOPEN_RETRY_MIN
        while self._writer is None and not self._closing:
            self._fail_queued(keep=True)
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

    def _fail_queued(self, *, keep: bool) -> None:
        """While the log is down, durable waiters learn now; records nobody waits for stay queued
        for the reopened log (``keep``) or are counted as dropped."""
        kept: collections.deque[_Pending] = collections.deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.durable:
                pending.settle(AuditUnavailable(self._last_error or "the audit trail is closed"))
            elif keep:
                kept.append(pending)
            else:
                self._stats["dropped"] += 1
        self._queue = kept
        self._queued_durable = 0
        self._let_waiters_in()

    async def _rotate(self, writer: auditlog.LogWriter) -> None:
        """Seal the full segment and start the next (in the lane: signing, fsyncs)."""
        self._busy = True
        try:
            await self._lane.run(writer.rotate_if_full)  # sealing fsyncs: everything so far is on disk
            self._committed_seq = writer.next_seq - 1
            self._unsynced_since = None
            self._wake_forwarders()
        except (OSError, auditlog.AuditLogError) as exc:
            self._fail(exc)
            log.error("cannot start a new audit segment: %s", exc)
            self._unconfirmed_from = self._committed_seq + 1
            self._retire_writer(writer)
        finally:
            self._busy = False

    async def _drain_and_close(self) -> None:
        """Write what is still queued and seal the segment (runs shielded, under a deadline)."""
        try:
            while self._busy:  # a durable caller's commit ends first
                self._idle = trio.Event()
                await self._idle.wait()
            while self._writer is not None and self._queue:
                await self._commit_now()
            writer = self._writer
            if writer is not None:
                self._busy = True
                await self._lane.run(writer.close)
                self._committed_seq = writer.next_seq - 1
        except (OSError, auditlog.AuditLogError) as exc:
            self._fail(exc)
            log.error("could not close the audit log cleanly: %s (the next start recovers it)", exc)
        finally:
            self._closing = True
            self._busy = True  # nobody writes after this
            self._fail_queued(keep=False)

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
                if trail._committed_seq - self.delivered < SINK_BATCH and not trail._writer_done.is_set():
                    with trio.move_on_after(FORWARD_GATHER):  # let more records come: one read, one sink call
                        await trail._writer_done.wait()
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
