"""Audit sinks against real stores: SQLite, a throwaway PostgreSQL, a throwaway NATS JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from bastion.core import auditlog, events
from bastion.core.audit import AuditTrail, build_sinks
from bastion.core.config import AuditSection, Registry, load_config
from bastion.core.secrets import SecretRef, resolve
from bastion.core.specs import ComponentContext
from bastion.plugins import audit_sinks
from bastion.policies.model import Identity
from tests import servers

# an absolute bound for every test that talks to a server; a working test takes about a second
TEST_DEADLINE = 60


async def eventually(predicate, interval: float = 0.02) -> None:
    while not predicate():
        await trio.sleep(interval)


def context(tmp_path: Path, name: str) -> ComponentContext:
    return ComponentContext(name=name, state_dir=tmp_path, config_dir=tmp_path, resolve_secret=resolve)


def session_events(session: str, *, denied: int = 0, rows: int = 3) -> list[events.AuditEvent]:
    identity = Identity(provider="static-token", subject="ci-deploy", groups={"ci"})
    out: list[events.AuditEvent] = [
        events.ConnectionOpened(session_id=session, target="clinic", protocol="postgres", client="127.0.0.1:5000", listen="127.0.0.1:6432"),
        events.SessionStarted(session_id=session, target="clinic", protocol="postgres", client="127.0.0.1:5000", tls=True, identity=identity, database="clinic"),
    ]
    for n in range(1, 3 + denied):
        verdict = "deny" if n > 2 else "allow"
        out.append(events.RequestJudged(session_id=session, request_no=n, identity="ci-deploy", target="clinic", kind="statement", statements=("SELECT name FROM patients",), actions=("select",), verdict=verdict))
        if verdict == "allow":
            out.append(events.ResponseCompleted(session_id=session, request_no=n, status="ok", columns=("name",), rows=rows))
    out.append(events.SessionEnded(session_id=session, reason="client disconnected", requests=2 + denied))
    return out


def test_the_plugin_registers_every_kind_and_the_config_accepts_their_options(tmp_path: Path) -> None:
    specs = {spec.kind: spec for spec in audit_sinks.bastion_register_sinks()}
    assert set(specs) == {"file", "sqlite", "postgres", "nats"}
    config_file = tmp_path / "bastion.toml"
    config_file.write_text(
        """
        [[targets]]
        name = "db"
        protocol = "tcp"
        listen = "127.0.0.1:0"
        upstream = "127.0.0.1:5432"
        [[audit.sinks]]
        kind = "file"
        directory = "elsewhere"
        fsync = "interval"
        fsync_interval_ms = 250
        [[audit.sinks]]
        kind = "postgres"
        name = "central"
        dsn = { env = "AUDIT_DSN" }
        [[audit.sinks]]
        kind = "nats"
        url = "nats://127.0.0.1:4222"
        """
    )
    from bastion.plugins import tcp

    registry = Registry(protocols={"tcp": tcp.TCPOptions}, sinks={kind: spec.options for kind, spec in specs.items()})
    config = load_config(config_file, registry)

    class Hooks:
        def sinks(self):
            return specs

    sinks = build_sinks(config, Hooks(), resolve)
    assert [s.name for s in sinks] == ["file", "central", "nats"]
    trail = AuditTrail(config.audit, config.gateway.state_dir, sinks=sinks)
    assert trail.directory == tmp_path / "elsewhere" and (trail.local_log.fsync, trail.local_log.fsync_interval_ms) == ("interval", 250)
    assert [f.sink.name for f in trail._forwarders] == ["central", "nats"]  # the file kind is the log itself

    bad = config_file.read_text().replace('fsync = "interval"', 'fsync = "sometimes"')
    config_file.write_text(bad)
    with pytest.raises(Exception, match="fsync"):
        load_config(config_file, registry)


# --- SQLite ---------------------------------------------------------------------------------------


@trio.testing.trio_test
async def test_the_sqlite_index_counts_sessions_once_however_often_records_arrive(tmp_path: Path) -> None:
    sink = audit_sinks.SqliteSink.from_options(audit_sinks.SqliteOptions(), context(tmp_path, "index"))
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path, sinks=[sink], sink_retry_max=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            for event in session_events("a") + session_events("b", denied=1, rows=5):
                await trail.record(event, durable=True)
            await eventually(lambda: trail.statistics().sinks[0].lag == 0)
            await trail.aclose()
    index = audit_sinks.SqliteIndex(tmp_path / "audit" / audit_sinks.INDEX_FILE)
    rows = {r["session_id"]: dict(r) for r in index.query("SELECT * FROM sessions")}
    assert rows["a"]["identity"] == "ci-deploy" and rows["a"]["target"] == "clinic" and rows["a"]["end_reason"] == "client disconnected"
    assert (rows["a"]["requests"], rows["a"]["denied"], rows["a"]["rows"]) == (2, 0, 6)
    assert (rows["b"]["requests"], rows["b"]["denied"], rows["b"]["rows"]) == (3, 1, 10)
    # a second delivery of everything (a crash between write and position) changes nothing
    everything = list(auditlog.iter_records(trail.directory))
    assert index.insert(everything) == 0
    assert {r["session_id"]: dict(r) for r in index.query("SELECT * FROM sessions")} == rows
    assert index.query("SELECT count(*) AS n FROM events")[0]["n"] == len(everything)


def test_the_sqlite_index_gives_the_same_sessions_whatever_the_batches(tmp_path: Path) -> None:
    key = auditlog.load_signing_key(b"\x07" * 32)
    lock = auditlog.SlotLock.acquire(tmp_path / "audit", "main")
    writer, _ = auditlog.LogWriter.open(lock, key, segment_max_bytes=10**7)
    pairs = itertools.zip_longest(session_events("a"), session_events("b", denied=2, rows=7))
    mixed = [event for pair in pairs for event in pair if event is not None]  # two sessions interleaved
    mixed += [events.AuthenticationFailed(session_id="c", target="clinic", client="127.0.0.1:5001", reason="bad token", provider="static-token")]
    for event in mixed:
        data = events.event_to_dict(event)
        writer.append([(data.pop("type"), data)])
    writer.close()
    records = list(auditlog.iter_records(tmp_path / "audit"))

    def sessions(batches: list[list[auditlog.AuditRecord]], name: str) -> list[dict]:
        index = audit_sinks.SqliteIndex(tmp_path / f"{name}.sqlite")
        for batch in batches:
            index.insert(batch)
        return [dict(r) for r in index.query("SELECT * FROM sessions ORDER BY session_id")]

    one_by_one = sessions([[r] for r in records], "one-by-one")
    assert [r["session_id"] for r in one_by_one] == ["a", "b", "c"]
    assert (one_by_one[1]["requests"], one_by_one[1]["denied"], one_by_one[1]["rows"]) == (4, 2, 14)
    assert one_by_one[2]["decision"] == "rejected" and one_by_one[2]["end_reason"] == "authentication failed: bad token"
    assert sessions([records], "at-once") == one_by_one
    assert sessions([records[:5], records[3:12], records], "overlapping") == one_by_one  # repeats count once


@trio.testing.trio_test
async def test_a_locked_sqlite_index_is_caught_up_when_it_frees(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(audit_sinks, "SQLITE_BUSY_TIMEOUT", 0.05)
    path = tmp_path / "audit" / audit_sinks.INDEX_FILE
    sink = audit_sinks.SqliteSink.from_options(audit_sinks.SqliteOptions(path=path), context(tmp_path, "index"))
    with trio.fail_after(TEST_DEADLINE):
        trail = AuditTrail(AuditSection(), tmp_path, sinks=[sink], sink_retry_max=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(trail.run)
            await trail.record(session_events("a")[0], durable=True)
            await eventually(lambda: trail.statistics().sinks[0].lag == 0)
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")  # someone holds the index: the sink cannot write
            for event in session_events("a")[1:]:
                await trail.record(event, durable=True)  # statements are not held up
            await eventually(lambda: trail.statistics().sinks[0].failures > 0)
            assert trail.statistics().sinks[0].lag > 0
            blocker.execute("ROLLBACK")
            blocker.close()
            await eventually(lambda: trail.statistics().sinks[0].lag == 0)
            await trail.aclose()
    index = audit_sinks.SqliteIndex(path)
    assert index.query("SELECT count(*) AS n FROM events")[0]["n"] == len(session_events("a"))
    assert index.query("SELECT requests FROM sessions")[0]["requests"] == 2


# --- PostgreSQL -------------------------------------------------------------------------------------


class Proxy:
    """A TCP relay to a server that the test can cut (an outage) and restore."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.port = 0
        self.down = False
        self._scopes: set[trio.CancelScope] = set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    def cut(self) -> None:
        self.down = True
        for scope in list(self._scopes):
            scope.cancel()

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client:
            if self.down:
                return
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream)
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                        nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
                finally:
                    self._scopes.discard(scope)

    @staticmethod
    async def _pump(source: trio.SocketStream, target: trio.SocketStream, scope: trio.CancelScope) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for chunk in source:
                await target.send_all(chunk)
        scope.cancel()


@pytest.fixture
def pg_database(postgres_server, monkeypatch):
    name = f"audit_{id(monkeypatch)}"
    postgres_server.execute(f"CREATE DATABASE {name}")
    yield postgres_server, name
    postgres_server.execute(f"DROP DATABASE {name} WITH (FORCE)")


def pg_sink(tmp_path: Path, server, database: str, port: int, monkeypatch) -> audit_sinks.PostgresSink:
    monkeypatch.setenv("BASTION_TEST_AUDIT_PASSWORD", server.password)
    options = audit_sinks.PostgresOptions(
        host="127.0.0.1", port=port, user=server.superuser, password=SecretRef("env", "BASTION_TEST_AUDIT_PASSWORD"), database=database, sslmode="disable", connect_timeout=5
    )
    return audit_sinks.PostgresSink.from_options(options, context(tmp_path, "central"))


@pytest.mark.postgres
@trio.testing.trio_test
async def test_postgres_outage_is_caught_up_and_two_gateways_share_one_table(tmp_path: Path, pg_database, monkeypatch) -> None:
    server, database = pg_database
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as outer:
            proxy = Proxy(server.port)
            await outer.start(proxy.run)
            gateway_a = AuditTrail(AuditSection(), tmp_path / "a", sinks=[pg_sink(tmp_path, server, database, proxy.port, monkeypatch)], sink_retry_max=0.1)
            gateway_b = AuditTrail(AuditSection(), tmp_path / "b", sinks=[pg_sink(tmp_path, server, database, server.port, monkeypatch)], sink_retry_max=0.1)
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway_a.run)
                await nursery.start(gateway_b.run)
                for event in session_events("a1"):
                    await gateway_a.record(event, durable=True)
                    await gateway_b.record(event, durable=True)
                await eventually(lambda: gateway_a.statistics().sinks[0].lag == 0)
                proxy.cut()  # PostgreSQL goes away for gateway a
                for event in session_events("a2"):
                    await gateway_a.record(event, durable=True)  # statements go on
                await eventually(lambda: gateway_a.statistics().sinks[0].failures > 0)
                assert gateway_a.statistics().sinks[0].lag > 0
                proxy.down = False
                await eventually(lambda: gateway_a.statistics().sinks[0].lag == 0 and gateway_b.statistics().sinks[0].lag == 0)
                await gateway_a.aclose()
                await gateway_b.aclose()
            outer.cancel_scope.cancel()

    rows = server.execute("SELECT chain, seq, hash, body, event->>'session_id', type FROM bastion_audit ORDER BY chain, seq", dbname=database)
    by_chain: dict[str, list] = {}
    for row in rows:
        by_chain.setdefault(row[0], []).append(row)
    assert set(by_chain) == {gateway_a.chain, gateway_b.chain}
    expected_a = list(auditlog.iter_records(gateway_a.directory))
    assert [(r[1], bytes(r[2])) for r in by_chain[gateway_a.chain]] == [(r.seq, r.hash) for r in expected_a]
    assert len(by_chain[gateway_b.chain]) == len(session_events("a1"))
    # the body column holds the exact bytes the chain hash covers
    assert all(auditlog.record_from_body(bytes(r[3])).hash == bytes(r[2]) for r in rows)

    # sending everything again (a lost acknowledgement) inserts nothing twice
    again = pg_sink(tmp_path, server, database, server.port, monkeypatch)
    with trio.fail_after(TEST_DEADLINE):
        await again.open()
        await again.write(expected_a)
        await again.aclose()
    assert server.execute("SELECT count(*) FROM bastion_audit", dbname=database)[0][0] == len(rows)


# --- NATS JetStream --------------------------------------------------------------------------------


class Nats:
    """A nats-server with JetStream the test can stop and start again (same port, same store)."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = servers.free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        servers.wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)
            self.process = None


@pytest.fixture
def nats() -> Iterator[Nats]:
    binary = servers.find_binary("nats-server")
    if binary is None:
        servers.missing("nats-server")
    directory = Path(tempfile.mkdtemp(prefix="bastion-audit-nats-"))
    server = Nats(binary, directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def stream_contents(url: str, stream: str) -> list[tuple[str, dict[str, str], bytes]]:
    """Every message in the stream, read with nats-py (an independent client)."""
    import nats as nats_py

    async def read() -> list[tuple[str, dict[str, str], bytes]]:
        connection = await nats_py.connect(url, connect_timeout=5, max_reconnect_attempts=1)
        try:
            js = connection.jetstream()
            info = await js.stream_info(stream)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                message = await js.get_msg(stream, seq)
                out.append((message.subject, dict(message.headers or {}), message.data))
            return out
        finally:
            await connection.close()

    return asyncio.run(asyncio.wait_for(read(), TEST_DEADLINE))


@pytest.mark.nats
def test_nats_outage_is_caught_up_without_duplicates(tmp_path: Path, nats: Nats) -> None:
    options = audit_sinks.NatsOptions(url=nats.url, timeout_s=5.0)
    sink = audit_sinks.NatsSink.from_options(options, context(tmp_path, "bus"))

    async def run() -> AuditTrail:
        with trio.fail_after(TEST_DEADLINE):
            trail = AuditTrail(AuditSection(), tmp_path, sinks=[sink], sink_retry_max=0.1)
            async with trio.open_nursery() as nursery:
                await nursery.start(trail.run)
                for event in session_events("n1"):
                    await trail.record(event, durable=True)
                await eventually(lambda: trail.statistics().sinks[0].lag == 0)
                await trio.to_thread.run_sync(nats.stop)  # the bus goes down
                for event in session_events("n2"):
                    await trail.record(event, durable=True)
                await eventually(lambda: trail.statistics().sinks[0].failures > 0)
                assert trail.statistics().sinks[0].lag > 0
                await trio.to_thread.run_sync(nats.start)
                await eventually(lambda: trail.statistics().sinks[0].lag == 0)
                # a record delivered twice (an ack lost on the way) is dropped by the stream
                await sink.write(list(auditlog.iter_records(trail.directory))[:3])
                await trail.aclose()
        return trail

    trail = trio.run(run)
    expected = list(auditlog.iter_records(trail.directory))
    messages = stream_contents(nats.url, options.stream)
    assert [h["Nats-Msg-Id"] for _, h, _ in messages] == [r.record_id for r in expected]
    assert [subject for subject, _, _ in messages] == [f"bastion.audit.{r.type}" for r in expected]
    # subscribers get the bytes the hash chain covers, so they can check the chain themselves
    received = [auditlog.record_from_body(data) for _, _, data in messages]
    assert [r.hash for r in received] == [r.hash for r in expected]
    assert all(b.prev_hash == a.hash for a, b in zip(received, received[1:]))


@pytest.mark.nats
def test_nats_json_format_and_an_oversized_record_keeps_the_sequence(tmp_path: Path, nats: Nats) -> None:
    options = audit_sinks.NatsOptions(url=nats.url, stream="AUDIT_JSON", subject_prefix="gw.audit", format="json", timeout_s=5.0)
    sink = audit_sinks.NatsSink.from_options(options, context(tmp_path, "bus"))
    big = events.ResultRows(session_id="s", request_no=1, first_row=0, rows=tuple((f"{n:08d}" * 200,) for n in range(1000)))
    small = events.ResponseCompleted(session_id="s", request_no=1, status="ok", rows=1000)
    records = []
    for seq, event in enumerate((big, small), start=1):
        data = events.event_to_dict(event)
        records.append(auditlog.make_record(auditlog.RecordBody("gw.main.1", seq, b"\0" * 32, 1.0, data.pop("type"), data)))

    async def run() -> None:
        with trio.fail_after(TEST_DEADLINE):
            await sink.open()
            await sink.write(records)
            await sink.aclose()

    trio.run(run)
    import json

    messages = stream_contents(nats.url, "AUDIT_JSON")
    assert [h["Nats-Msg-Id"] for _, h, _ in messages] == ["gw.main.1:1", "gw.main.1:2"]
    first, second = (json.loads(data) for _, _, data in messages)
    assert first["oversize"] > 1 << 20 and first["hash"] == records[0].hash.hex()
    assert second["event"]["rows"] == 1000 and second["seq"] == 2
