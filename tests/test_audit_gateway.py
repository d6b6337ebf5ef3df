"""The audit trail end to end: a real gateway, a real PostgreSQL, the real trail on disk, psycopg.

- a ``bastion serve`` killed (SIGKILL) under insert load left a durable request record for every
  row the server holds, and restarts into a log that ``bastion audit verify`` accepts;
- a trail that cannot write (disk full) refuses statements (42501) without forwarding them,
  /healthz says 503 meanwhile, and the gateway serves again once writing works;
- ``audit.record_rows`` (a number, ``"none"``, ``"all"``) as read back from the segments;
- ``bastion sessions replay`` of a real session: statements, decisions, masked rows only.

The trail keeps no literal (``values (?)``), so a statement that must be matched to a server row
names its number in an identifier too: ``insert into t as m_17 (n) values (17)``.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest

from bastion.core import audit, auditlog
from bastion.plugins.identity_static import add_key
from tests.gateway_helpers import bastion_serve
from tests.pg_helpers import run_pg_gateway
from tests.servers import free_port

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
# generous: two busy cores; a hung step fails the test rather than hanging it
WAIT = 60.0
CLI_TIMEOUT = 120.0
SUBJECT = "ci-bot"
TARGET = "db"
SSN = "123-45-6789"
MASKED_SSN = "***-**-6789"
MARK = re.compile(r"\bas m_(\d+)\b")

GRANTS = """
[[grant]]
name = "ci"
identities = { subjects = ["ci-bot"] }
targets = ["db"]
statements = ["select", "insert"]

[[mask]]
name = "ssn"
columns = ["*.ssn"]
strategy = "partial"
"""


# --- helpers -----------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(interval)


def bastion(config: Path, *args: str) -> subprocess.CompletedProcess:
    """The real command line, ``bastion <args> -c CONFIG``."""
    return subprocess.run([sys.executable, "-m", "bastion.core.cli", *args, "-c", str(config)], capture_output=True, text=True, cwd=str(ROOT), timeout=CLI_TIMEOUT, check=False)


def verify_json(config: Path) -> tuple[int, dict[str, Any]]:
    done = bastion(config, "audit", "verify", "--json")
    return done.returncode, json.loads(done.stdout)


def exported(config: Path) -> list[dict[str, Any]]:
    done = bastion(config, "audit", "export", "--format", "jsonl", "--no-progress")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def marks_in(records: Any) -> set[int]:
    """The numbers named by allowed request records (``as m_<n>`` in the recorded statement)."""
    found: set[int] = set()
    for record_type, event in records:
        if record_type == "request" and event.get("verdict") == "allow":
            for statement in event.get("statements") or ():
                found.update(int(n) for n in MARK.findall(statement))
    return found


def health(address: Any) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{address.host}:{address.port}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@attrs.define
class Served:
    """A ``bastion serve`` configuration: static API key, grants bundle, file sink fsync = durable."""

    directory: Path
    config: Path
    port: int
    admin: int
    key: str

    @property
    def audit_dir(self) -> Path:
        return self.directory / "state" / "audit"

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.port, user=SUBJECT, password=self.key, dbname="postgres", sslmode="disable", connect_timeout=30, autocommit=True, **kwargs)

    def serve(self):
        # warnings only: nobody reads the pipes while the gateway runs
        return bastion_serve(self.config, self.admin, "--log-level", "warning", timeout=WAIT)


def served_config(directory: Path, server: Any) -> Served:
    directory.mkdir(parents=True, exist_ok=True)
    port, admin = free_port(), free_port()
    (directory / "db-password").write_text(server.password)
    key = add_key(directory / "tokens.toml", SUBJECT, ["etl"]).key
    (directory / "grants.toml").write_text(textwrap.dedent(GRANTS))
    config = directory / "bastion.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            state_dir = "state"
            admin_listen = "127.0.0.1:{admin}"
            policies = ["grants.toml"]
            shutdown_grace = "2s"

            [audit]
            fail_closed = true
            record_rows = "all"

            [[audit.sinks]]
            kind = "file"
            fsync = "durable"

            [[identity]]
            kind = "static-token"
            tokens_file = "tokens.toml"

            [[targets]]
            name = "{TARGET}"
            protocol = "postgres"
            listen = "127.0.0.1:{port}"
            upstream = "{server.host}:{server.port}"
            database = "postgres"
            allow_plaintext_auth = true
            [targets.credentials]
            user = "{server.superuser}"
            password = {{ file = "db-password" }}
            """
        )
    )
    return Served(directory, config, port, admin, key)


def fresh_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# --- 1. kill -9 under load ---------------------------------------------------------------------------

WRITERS = 16
# rows acknowledged to the clients before the kill: the kill lands in steady load, many
# sessions' records sharing each group commit
ROWS_BEFORE_KILL = 400


class InsertLoad:
    """``WRITERS`` threads, each with its own connection, inserting distinct numbers until an error."""

    def __init__(self, served: Served, table: str) -> None:
        self.served, self.table = served, table
        self.lock = threading.Lock()
        self.acknowledged: set[int] = set()
        self.errors: list[BaseException] = []
        self.enough = threading.Event()
        self.killed = threading.Event()
        self.threads = [threading.Thread(target=self._writer, args=(w,), name=f"insert-{w}", daemon=True) for w in range(WRITERS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _writer(self, w: int) -> None:
        try:
            with self.served.connect() as conn:
                for i in range(10**6):
                    n = w * 10**6 + i
                    conn.execute(f"insert into {self.table} as m_{n} (n) values ({n})")
                    with self.lock:
                        self.acknowledged.add(n)
                        if len(self.acknowledged) >= ROWS_BEFORE_KILL:
                            self.enough.set()
        except psycopg.Error as exc:
            with self.lock:
                self.errors.append(exc)
        finally:
            if not self.killed.is_set():
                self.enough.set()  # a writer that stops before the kill is a failure: stop waiting

    def join(self) -> None:
        for thread in self.threads:
            thread.join(WAIT)
            assert not thread.is_alive(), f"{thread.name} still running after the gateway was killed"


def wait_for_upstream_backends_to_go(server: Any, table: str) -> None:
    """After the kill, the server finishes what the gateway's connections had sent, then drops
    them: only then is the set of rows final."""

    def gone() -> bool:
        rows = server.execute(f"select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid() and query like '%{table}%'")
        return rows[0][0] == 0

    wait_until(gone, "the killed gateway's upstream connections to end")


@pytest.mark.slow
def test_a_gateway_killed_under_load_left_a_record_for_every_row_the_server_has(tmp_path, postgres_server) -> None:
    served = served_config(tmp_path / "gw", postgres_server)
    table = fresh_name("marks")
    postgres_server.execute(f"create table {table} (n bigint primary key)")
    load = InsertLoad(served, table)
    with served.serve() as process:
        load.start()
        assert load.enough.wait(WAIT * 2), "the insert load did not get going"
        with load.lock:
            errors_before_kill = list(load.errors)
            load.killed.set()
        assert not errors_before_kill, errors_before_kill
        process.send_signal(signal.SIGKILL)
        process.wait(WAIT)
        load.join()
    assert process.returncode == -signal.SIGKILL
    assert load.errors, "the kill interrupted no writer: it did not land mid-load"
    wait_for_upstream_backends_to_go(postgres_server, table)

    on_server = {n for (n,) in postgres_server.execute(f"select n from {table}")}
    assert len(on_server) >= ROWS_BEFORE_KILL
    assert load.acknowledged <= on_server
    recorded = marks_in((r.type, r.event) for r in auditlog.iter_records(served.audit_dir))
    assert not on_server - recorded, f"rows on the server without a request record: {sorted(on_server - recorded)[:20]}"

    # as the crash left it: the last segment is open (unsealed), perhaps with a torn tail, and valid
    status, before = verify_json(served.config)
    assert status == 0 and before["ok"], before["problems"]
    (chain,) = before["chains"]
    assert chain["open_segment"] is not None
    torn = [w for w in before["warnings"] if w["kind"] == "incomplete-tail"]

    # restart on the same state directory: the crashed segment is sealed as it is, a new one begun
    with served.serve():
        with served.connect() as conn:
            restarted = 9 * 10**9
            conn.execute(f"insert into {table} as m_{restarted} (n) values ({restarted})")
    status, after = verify_json(served.config)
    assert status == 0 and after["ok"], after["problems"]
    (chain_after,) = after["chains"]
    assert chain_after["chain"] == chain["chain"] and chain_after["open_segment"] is None
    assert chain_after["first_seq"] == 1 and chain_after["last_seq"] > chain["last_seq"]
    kinds = {w["kind"] for w in after["warnings"]}
    assert "incomplete-tail" not in kinds and "open-segment" not in kinds
    records = exported(served.config)
    damage = [r for r in records if r["type"] == auditlog.DAMAGE_RECORD_TYPE]
    if torn:  # a write cut by the kill: found at start-up, sealed, and said so in the chain
        assert "recovered-damage" in kinds
        (damage_record,) = damage
        assert damage_record["event"]["damage"][0]["segment"] == chain["open_segment"]
    else:
        assert "recovered-damage" not in kinds and not damage
    text = bastion(served.config, "audit", "verify")
    assert text.returncode == 0 and text.stdout.rstrip().splitlines()[-1].startswith("OK:"), text.stdout + text.stderr
    # nothing the crash left was overwritten or dropped by the restart
    assert on_server | {restarted} <= marks_in((r["type"], r["event"]) for r in records)
    assert len({r["seq"] for r in records}) == len(records)


# --- 2. fail closed with the real trail ---------------------------------------------------------------


@pytest.fixture
def disk(disk, monkeypatch):
    """The shared fillable disk (tests/conftest.py), here under a whole gateway in this process:
    a slower retry, so a busy machine still sees the refusals before the log reopens."""
    monkeypatch.setattr(audit, "REOPEN_RETRY_MAX", 0.2)
    return disk


def test_a_trail_that_cannot_write_refuses_statements_until_it_can_again(tmp_path, postgres_server, disk) -> None:
    table = fresh_name("fc")
    postgres_server.execute(f"create table {table} (n int primary key)")

    def on_server() -> list[int]:
        return [n for (n,) in postgres_server.execute(f"select n from {table} order by n")]

    with run_pg_gateway(postgres_server, tmp_path / "gw", real_trail=True, fail_closed=True) as gw:
        trail = gw.gateway.runtime.trail
        admin = gw.gateway.admin_address
        with psycopg.connect(gw.dsn(), autocommit=True) as conn:
            conn.execute(f"insert into {table} values (1)")
            assert health(admin) == (200, {"status": "ok", "audit": "ok", "sessions": 1, "accepting": True})

            disk.full = True
            for statement in (f"insert into {table} values (2)", "select 1"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                    conn.execute(statement)
                assert refused.value.sqlstate == "42501"
                assert "audit trail cannot record" in str(refused.value)
            assert on_server() == [1]  # the refused INSERT never reached the server
            assert not trail.healthy
            status, body = health(admin)
            assert status == 503 and body["status"] == "degraded" and body["audit"] == "unavailable"
            assert body["accepting"]

            disk.full = False
            wait_until(lambda: health(admin)[0] == 200, "the trail to reopen")
            conn.execute(f"insert into {table} values (3)")  # the same session goes on
            assert conn.execute("select 41 + 1").fetchone() == (42,)
        assert on_server() == [1, 3]
        with psycopg.connect(gw.dsn(), autocommit=True) as again:  # and new sessions are served
            assert again.execute("select 7").fetchone() == (7,)
        assert trail.healthy and health(admin)[0] == 200
    audit_dir = gw.directory / "var" / "audit"
    records = list(auditlog.iter_records(audit_dir))
    allowed = [r.event["statements"][0] for r in records if r.type == "request" and r.event["verdict"] == "allow"]
    assert f"insert into {table} values (?)" in allowed
    assert not any("values (2)" in s for s in allowed)
    (damage,) = [r for r in records if r.type == auditlog.DAMAGE_RECORD_TYPE]
    assert damage.event["unconfirmed_from_seq"] is not None  # the refused statement's record is marked
    report = auditlog.verify(audit_dir)
    assert report.ok, report.problems
    assert "recovered-damage" in {w.kind for w in report.warnings}


# --- 3. audit.record_rows -----------------------------------------------------------------------------


@pytest.mark.parametrize(("record_rows", "kept"), [(2, [["1"], ["2"]]), ("none", None), ("all", [["1"], ["2"], ["3"], ["4"], ["5"]])])
def test_record_rows_keeps_the_first_n_none_or_all_rows_of_a_result(tmp_path, postgres_server, record_rows, kept) -> None:
    with run_pg_gateway(postgres_server, tmp_path / "gw", real_trail=True, record_rows=record_rows) as gw:
        with psycopg.connect(gw.dsn(), autocommit=True) as conn:
            assert conn.execute("select generate_series(1,5)").fetchall() == [(1,), (2,), (3,), (4,), (5,)]
    records = list(auditlog.iter_records(gw.directory / "var" / "audit"))  # the gateway has stopped: all flushed
    (request,) = [r for r in records if r.type == "request" and "generate_series" in r.event["statements"][0]]
    key = (request.session_id, request.event["request_no"])
    (response,) = [r for r in records if r.type == "response" and (r.session_id, r.event["request_no"]) == key]
    assert response.event["rows"] == 5 and response.event["status"] == "ok"
    rows = [r for r in records if r.type == "rows" and (r.session_id, r.event["request_no"]) == key]
    if kept is None:
        assert not [r for r in records if r.type == "rows"]
    else:
        assert rows and rows[0].event["first_row"] == 0
        assert [row for r in rows for row in r.event["rows"]] == kept


# --- 4. replay of a real session ----------------------------------------------------------------------


def test_replay_of_a_real_session_shows_statements_decisions_and_masked_rows_only(tmp_path, postgres_server) -> None:
    served = served_config(tmp_path / "gw", postgres_server)
    people, log = fresh_name("people"), fresh_name("visits")
    postgres_server.execute(f"create table {people} (id int primary key, name text, ssn text); insert into {people} values (1, 'Ann', '{SSN}'), (2, 'Bob', '987-65-4321')")
    postgres_server.execute(f"create table {log} (id int)")
    with served.serve(), served.connect() as conn:
        rows = conn.execute(f"select id, name, ssn from {people} order by id").fetchall()
        assert rows == [(1, "Ann", MASKED_SSN), (2, "Bob", "***-**-4321")]
        conn.execute(f"insert into {log} values (1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"delete from {people}")
    assert len(postgres_server.execute(f"select * from {people}")) == 2

    listing = bastion(served.config, "sessions", "list", "--json", "--identity", SUBJECT)
    assert listing.returncode == 0, listing.stderr
    (session,) = json.loads(listing.stdout)
    assert session["requests"] == 3 and session["denied"] == 1
    replay = bastion(served.config, "sessions", "replay", session["session_id"])
    assert replay.returncode == 0, replay.stderr
    text = replay.stdout
    assert SSN not in text and "987-65-4321" not in text
    lines = text.splitlines()

    def line_index(predicate: Callable[[str], bool]) -> int:
        return next(i for i, line in enumerate(lines) if predicate(line))

    select = line_index(lambda line: line.strip() == f"select id, name, ssn from {people} order by id")
    assert "ALLOW" in lines[select - 1] and "#1 statement" in lines[select - 1]
    assert lines[select + 1].split("|")[2].strip() == "ssn"  # the result as psql prints it
    assert [line.split("|")[2].strip() for line in lines[select + 3 : select + 5]] == [MASKED_SSN, "***-**-4321"]
    assert lines[select + 5].strip() == "(2 rows)"
    assert "SELECT 2" in lines[select + 6] and "masked ssn" in lines[select + 6]
    insert = line_index(lambda line: line.strip() == f"insert into {log} values (?)")  # the literal is not kept
    assert "#2 statement: ALLOW" in lines[insert - 1] and "INSERT 0 1" in lines[insert + 1]
    delete = line_index(lambda line: line.strip() == f"delete from {people}")
    assert "#3 statement: DENY" in lines[delete - 1] and "does not allow delete" in lines[delete - 1]
    assert select < insert < delete
    assert "session ended" in lines[-1]
