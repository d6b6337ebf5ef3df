"""Just-in-time approval end to end: a real psycopg session held by a real PostgreSQL gateway.

A policy bundle sends DELETEs to review; the caller's statement waits in the gateway while a
reviewer approves it from the command line (another process, through the SQLite store) or the
admin HTTP API, or denies it (SQLSTATE 42501 with the reviewer's reason); whatever the outcome, the
same connection goes on. A raw protocol client counts the rows a result paused at its threshold
lets through, and the server's own view (pg_stat_activity, its log) shows a denied result cancelled.
A large paused result is also checked with a gateway in its own process, so its memory can be measured.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
import trio
from psycopg import errors as pg_errors

from bastion.core import events
from bastion.protocols.postgres.messages import CommandComplete, DataRow, ErrorResponse, Query, ReadyForQuery
from tests.approvals_helpers import bastion_command
from tests.pg_helpers import TOKEN, RawClient, fresh_table, of_type, pg_gateway  # noqa: F401  (pg_gateway is a fixture)
from tests.servers import free_port, wait_for_port

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parent.parent
ALICE_TOKEN = "alice-token-" + uuid.uuid4().hex
MALLORY_TOKEN = "mallory-token-" + uuid.uuid4().hex
TOKENS = {TOKEN: "ci-bot", ALICE_TOKEN: "alice", MALLORY_TOKEN: "mallory"}
GROUPS = {"ci-bot": ["etl"], "alice": ["privacy"], "mallory": ["etl"]}
PLUGINS = {"postgres": "bastion.plugins.postgres", "test-tokens": "tests.approvals_test_tokens"}
WAIT = 30.0  # the longest any step below may take before the test fails

BUNDLE = """
[[grant]]
name = "ci"
identities = { subjects = ["ci-bot"] }
targets = ["pg"]
statements = ["*"]

[[review]]
name = "deletes"
when = { statements = ["delete"] }
approvers = { groups = ["privacy"] }
timeout = "2m"
max_window = "1h"

[[review]]
name = "bulk-read"
when = { rows_over = 1000, tables = ["*.bulk_*"] }
approvers = { groups = ["privacy"] }
timeout = "2m"
"""


def start(pg_gateway):
    return pg_gateway(bundle=BUNDLE, tokens=TOKENS, groups=GROUPS)


def pending(gw) -> list:
    """Pending approval requests, read in the gateway's own trio thread."""
    store = gw.gateway.runtime.approvals.store
    return trio.from_thread.run(store.list, ["pending"], trio_token=gw.trio_token)


def wait_for_pending(gw) -> str:
    (record,) = gw.wait_for(lambda: pending(gw), timeout=WAIT)
    return record.id


class Caller(threading.Thread):
    """A psycopg session running one statement in the background (it will be held).

    Whatever becomes of the statement (approved, denied, expired), the caller then runs
    ``select 1`` on the same connection: :meth:`outcome` fails unless the session went on.
    """

    def __init__(self, dsn: str, sql: str, before: tuple[str, ...] = ()) -> None:
        super().__init__(daemon=True)
        self.dsn, self.sql, self.before = dsn, sql, before
        self.rowcount: int | None = None
        self.error: BaseException | None = None  # what the held statement raised
        self.after: tuple | None = None  # `select 1` on the same connection, afterwards
        self.after_error: BaseException | None = None
        self.notices: list[str] = []

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.add_notice_handler(lambda diagnostic: self.notices.append(diagnostic.message_primary or ""))
                for statement in self.before:
                    conn.execute(statement)
                try:
                    self.rowcount = conn.execute(self.sql).rowcount
                except psycopg.Error as exc:
                    self.error = exc
                self.after = conn.execute("select 1").fetchone()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            if self.error is None:
                self.error = exc
            else:
                self.after_error = exc

    def outcome(self):
        self.join(WAIT)
        assert not self.is_alive(), "the held statement never finished"
        assert self.after == (1,), f"the session did not go on after the held statement: {self.after_error or self.error!r}"
        return self.rowcount, self.error


def patients_table(gw) -> str:
    table = fresh_table(gw.server, "create table {t} (id int primary key, name text)")
    gw.server.execute(f"insert into {table} values (1, 'a'), (2, 'b'), (3, 'c')")
    return table


def remaining(gw, table: str) -> list[int]:
    return [row[0] for row in gw.server.execute(f"select id from {table} order by id")]


def approval_steps(gw, approval_id: str) -> list[str]:
    return [e.step for e in gw.events_of(events.ApprovalEvent) if e.approval_id == approval_id]


def cli(gw, *args: str, token: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BASTION_TOKEN": token}
    env.pop("BASTION_CONFIG", None)
    command = bastion_command("approvals", *args, "-c", str(gw.directory / "bastion.toml"), plugins=PLUGINS)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=WAIT)


def test_a_held_delete_runs_once_approved_from_the_command_line(pg_gateway):
    with start(pg_gateway) as gw:
        table = patients_table(gw)
        caller = Caller(gw.dsn(), f"delete from {table} where id = 2")
        caller.start()
        approval_id = wait_for_pending(gw)
        assert remaining(gw, table) == [1, 2, 3]  # held: nothing reached the server

        listing = cli(gw, "list", "--json", token=ALICE_TOKEN)
        assert listing.returncode == 0, listing.stderr
        (entry,) = json.loads(listing.stdout)["approvals"]
        assert entry["id"] == approval_id and entry["requester"]["subject"] == "ci-bot"
        assert entry["statement"] == f"delete from {table} where id = ?"  # the literal is masked
        assert "policy:review:deletes" in entry["rules"] and entry["approver_groups"] == ["privacy"]

        approved = cli(gw, "approve", approval_id, "--comment", "one row, ticket OPS-7", token=ALICE_TOKEN)
        assert approved.returncode == 0, approved.stderr
        rowcount, error = caller.outcome()
        assert error is None and rowcount == 1
        assert remaining(gw, table) == [1, 3]
        judged = next(e for e in gw.events_of(events.RequestJudged) if e.statements == (f"delete from {table} where id = ?",))
        assert judged.verdict == "allow" and any(f"approved by alice (approval {approval_id})" in r for r in judged.reasons)
        assert approval_steps(gw, approval_id) == ["requested", "approval", "approved"]


def test_a_held_delete_runs_once_approved_through_the_http_api(pg_gateway):
    with start(pg_gateway) as gw:
        table = patients_table(gw)
        caller = Caller(gw.dsn(), f"delete from {table} where id = 3")
        caller.start()
        approval_id = wait_for_pending(gw)
        base = f"http://{gw.gateway.admin_address}"
        with httpx.Client(base_url=base, timeout=WAIT) as client:
            refused = client.post(f"/approvals/{approval_id}/approve", headers={"authorization": f"Bearer {MALLORY_TOKEN}"})
            assert refused.status_code == 403
            own = client.post(f"/approvals/{approval_id}/approve", headers={"authorization": f"Bearer {TOKEN}"})
            assert own.status_code == 403
            approved = client.post(f"/approvals/{approval_id}/approve", headers={"authorization": f"Bearer {ALICE_TOKEN}"}, json={"comment": "fine"})
            assert approved.status_code == 200 and approved.json()["state"] == "approved"
        rowcount, error = caller.outcome()
        assert error is None and rowcount == 1 and remaining(gw, table) == [1, 2]


def test_a_denied_delete_fails_with_42501_and_the_reviewers_reason(pg_gateway):
    with start(pg_gateway) as gw:
        table = patients_table(gw)
        caller = Caller(gw.dsn(), f"delete from {table}")
        caller.start()
        approval_id = wait_for_pending(gw)
        denied = cli(gw, "deny", approval_id, "--reason", "deleting every patient is never fine", token=ALICE_TOKEN)
        assert denied.returncode == 0, denied.stderr
        _, error = caller.outcome()
        assert isinstance(error, pg_errors.InsufficientPrivilege)
        assert error.sqlstate == "42501" and "deleting every patient is never fine" in str(error)
        assert remaining(gw, table) == [1, 2, 3]
        assert approval_steps(gw, approval_id) == ["requested", "denied"]
        assert caller.after == (1,)  # the same connection ran `select 1` afterwards (see Caller)


def test_a_window_lets_the_job_repeat_the_statement_without_asking_again(pg_gateway):
    with start(pg_gateway) as gw:
        table = patients_table(gw)
        caller = Caller(gw.dsn(), f"delete from {table} where id = 1")
        caller.start()
        approval_id = wait_for_pending(gw)
        assert cli(gw, "approve", approval_id, "--window", "30m", token=ALICE_TOKEN).returncode == 0
        assert caller.outcome() == (1, None)
        with psycopg.connect(gw.dsn(), autocommit=True) as conn:
            assert conn.execute(f"delete from {table} where id = 3").rowcount == 1  # same shape: covered
        assert remaining(gw, table) == [2]
        assert approval_steps(gw, approval_id)[-1] == "window"


def test_the_held_caller_is_told_the_request_id_and_how_to_approve(pg_gateway):
    with start(pg_gateway) as gw:
        table = patients_table(gw)
        caller = Caller(gw.dsn(), f"delete from {table} where id = 1")
        caller.start()
        approval_id = wait_for_pending(gw)
        try:
            gw.wait_for(lambda: caller.notices, timeout=WAIT)
        finally:
            cli(gw, "deny", approval_id, "--reason", "test over", token=ALICE_TOKEN)
            caller.outcome()
        notice = caller.notices[0]
        assert approval_id in notice and f"bastion approvals approve {approval_id} -c {gw.directory / 'bastion.toml'}" in notice
        assert f"POST http://{gw.gateway.admin_address}/approvals/{approval_id}/approve" in notice


def test_the_callers_justification_reaches_the_reviewer_and_never_the_server(pg_gateway):
    with start(pg_gateway) as gw:
        table = patients_table(gw)
        reason = "ticket OPS-9: remove the row the import duplicated"
        with psycopg.connect(gw.dsn(), autocommit=True) as conn:
            # answered by Bastion: the server never holds it as a placeholder setting
            assert conn.execute("SET bastion.justification = 'scratch'").statusmessage == "SET"
            assert conn.execute("select current_setting('bastion.justification', true)").fetchone() == (None,)
            with pytest.raises(pg_errors.SyntaxError, match="send it on its own"):
                conn.execute("select 1; SET bastion.justification = 'hidden'")
            with pytest.raises(pg_errors.UndefinedObject, match="bastion.approver"):
                conn.execute("SET bastion.approver = 'me'")
            assert conn.execute("select 2").fetchone() == (2,)  # the session goes on
        caller = Caller(gw.dsn(), f"delete from {table} where id = 2", before=(f"SET bastion.justification TO '{reason}'",))
        caller.start()
        approval_id = wait_for_pending(gw)
        (entry,) = json.loads(cli(gw, "list", "--json", token=ALICE_TOKEN).stdout)["approvals"]
        assert entry["id"] == approval_id and entry["justification"] == reason
        shown = cli(gw, "show", approval_id, token=ALICE_TOKEN)
        assert reason in shown.stdout
        cli(gw, "approve", approval_id, token=ALICE_TOKEN)
        assert caller.outcome() == (1, None)
        given = [e for e in gw.events_of(events.RequestJudged) if e.rules == ("bastion:justification",)]
        assert [e.reasons for e in given][-1] == (f"justification: {reason}",)
        refused = [e for e in gw.events_of(events.RequestJudged) if e.rules == ("bastion:settings",)]
        assert len(refused) == 2 and all(e.verdict == "deny" for e in refused)


def test_asyncpg_gives_a_justification_in_both_protocols(pg_gateway):
    asyncpg = pytest.importorskip("asyncpg")
    import asyncio

    async def scenario(gw):
        conn = await asyncpg.connect(host=gw.host, port=gw.port, user="ci-bot", password=TOKEN, database="postgres", ssl=False)
        try:
            assert await conn.execute("SET bastion.justification = 'simple protocol'") == "SET"
            statement = await conn.prepare("SET bastion.justification = $$extended protocol$$")
            assert await statement.fetch() == []
            assert await conn.fetchval("select current_setting('bastion.justification', true)") is None
            assert await conn.fetchval("select 3") == 3
        finally:
            await conn.close()

    with start(pg_gateway) as gw:
        asyncio.run(asyncio.wait_for(scenario(gw), WAIT))
        given = [e for e in gw.events_of(events.RequestJudged) if e.rules == ("bastion:justification",)]
        assert [(e.kind, e.reasons) for e in given] == [
            ("statement", ("justification: simple protocol",)),
            ("execute", ("justification: extended protocol",)),
        ]


def test_a_caller_that_hangs_up_while_held_cancels_its_request(pg_gateway):
    with start(pg_gateway) as gw:
        table = patients_table(gw)
        from tests.pg_helpers import RawClient
        from bastion.protocols.postgres.messages import Query

        client = RawClient.connect(gw)
        client.send(Query(f"delete from {table} where id = 1"))
        approval_id = wait_for_pending(gw)
        client.close()
        store = gw.gateway.runtime.approvals.store
        record = gw.wait_for(lambda: (r := trio.from_thread.run(store.get, approval_id, trio_token=gw.trio_token)).state == "cancelled" and r, timeout=WAIT)
        assert "connection closed" in record.outcome or "session ended" in record.outcome
        gw.wait_for(lambda: approval_steps(gw, approval_id) == ["requested", "cancelled"], timeout=WAIT)
        assert remaining(gw, table) == [1, 2, 3]


def test_a_result_paused_at_its_threshold_and_denied_fails_with_the_reason(pg_gateway):
    with start(pg_gateway) as gw:
        table = fresh_table(gw.server, "create table {t} (id int)", name=f"bulk_{uuid.uuid4().hex[:8]}")
        gw.server.execute(f"insert into {table} select generate_series(1, 5000)")
        caller = Caller(gw.dsn(), f"select id from {table}")
        caller.start()
        approval_id = wait_for_pending(gw)
        (record,) = pending(gw)
        assert record.request.kind == "rows" and record.request.rows_sent == 1000
        assert record.request.statement == f"result of select id from {table} passed 1000 rows"
        base = f"http://{gw.gateway.admin_address}"
        with httpx.Client(base_url=base, timeout=WAIT) as client:
            denied = client.post(f"/approvals/{approval_id}/deny", headers={"authorization": f"Bearer {ALICE_TOKEN}"}, json={"reason": "export through the reporting job"})
            assert denied.status_code == 200
        _, error = caller.outcome()
        assert isinstance(error, pg_errors.InsufficientPrivilege) and "export through the reporting job" in str(error)
        assert approval_steps(gw, approval_id) == ["requested", "denied"]


# --- one connection, at the protocol level: refusals end the statement, never the session ---------


THRESHOLD = 1000  # the bundle's bulk-read rows_over
BULK_ROWS = 5_000_000  # far more than socket buffers hold: the server is still running when paused


def raw_client(gw) -> RawClient:
    client = RawClient.connect(gw)
    client.sock.settimeout(WAIT)  # answers come late while a statement is held
    return client


def select_1(client: RawClient) -> list:
    client.send(Query("select 1"))
    answer = client.until_ready()
    assert [row.values for row in of_type(answer, DataRow)] == [(b"1",)]
    assert [m.tag for m in of_type(answer, CommandComplete)] == ["SELECT 1"] and answer[-1] == ReadyForQuery("I")
    return answer


def refusal(answer: list) -> ErrorResponse:
    """The one error of an answer that ends with ReadyForQuery and has no command tag."""
    (error,) = of_type(answer, ErrorResponse)
    assert error.sqlstate == "42501" and not of_type(answer, CommandComplete)
    assert isinstance(answer[-1], ReadyForQuery)
    return error


def bulk_view(gw) -> str:
    """A view the bulk-read review matches (``*.bulk_*``), with far more rows than its threshold."""
    return fresh_table(gw.server, f"create view {{t}} as select g from generate_series(1, {BULK_ROWS}) g", name=f"bulk_{uuid.uuid4().hex[:8]}")


def read_rows(client: RawClient, count: int) -> list:
    """Messages up to and including the ``count``-th DataRow."""
    messages, rows = [], 0
    while rows < count:
        message = client.read()
        assert message is not None, "the gateway closed the connection"
        assert not isinstance(message, (ErrorResponse, CommandComplete, ReadyForQuery)), message
        messages.append(message)
        rows += isinstance(message, DataRow)
    return messages


def backend_pid(client: RawClient) -> int:
    """The upstream backend serving this connection (the statement runs there, not in Bastion)."""
    client.send(Query("select pg_backend_pid()"))
    (row,) = of_type(client.until_ready(), DataRow)
    return int(row.values[0])


def activity(gw, pid: int) -> tuple[str, str]:
    ((state, query),) = gw.server.execute(f"select state, query from pg_stat_activity where pid = {pid}")
    return state, query


def server_log(gw, since: int = 0) -> str:
    with open(gw.server.log_file, "rb") as log:
        log.seek(since)
        return log.read().decode("utf-8", "replace")


def response_of(gw, approval_id: str) -> events.ResponseCompleted:
    (request_no,) = {e.request_no for e in gw.events_of(events.ApprovalEvent) if e.approval_id == approval_id}
    return gw.wait_for(lambda: next((e for e in gw.events_of(events.ResponseCompleted) if e.request_no == request_no), None), timeout=WAIT)


def test_a_denied_delete_leaves_the_same_connection_usable(pg_gateway):
    with start(pg_gateway) as gw:
        table = patients_table(gw)
        with raw_client(gw) as client:
            client.send(Query("begin"))
            assert client.until_ready()[-1] == ReadyForQuery("T")
            client.send(Query(f"delete from {table} where id = 2"))
            approval_id = wait_for_pending(gw)
            assert cli(gw, "deny", approval_id, "--reason", "not during the audit", token=ALICE_TOKEN).returncode == 0
            answer = client.until_ready()
            error = refusal(answer)
            assert "not during the audit" in error.message and approval_id in error.message
            # inside a transaction block the refusal fails the block, as a server error would
            assert answer[-1] == ReadyForQuery("E")
            client.send(Query("rollback"))
            assert client.until_ready()[-1] == ReadyForQuery("I")
            select_1(client)
            # and the next held statement of the same connection is held, and runs once approved
            client.send(Query(f"delete from {table} where id = 3"))
            second = wait_for_pending(gw)
            assert second != approval_id
            assert cli(gw, "approve", second, token=ALICE_TOKEN).returncode == 0
            answer = client.until_ready()
            assert [m.tag for m in of_type(answer, CommandComplete)] == ["DELETE 1"] and answer[-1] == ReadyForQuery("I")
            select_1(client)
        assert remaining(gw, table) == [1, 2]


def test_a_result_denied_at_its_threshold_stops_there_and_is_cancelled_upstream(pg_gateway):
    with start(pg_gateway) as gw:
        view = bulk_view(gw)
        sql = f"select g from {view}"
        with raw_client(gw) as client:
            pid = backend_pid(client)
            client.send(Query(sql))
            sent = read_rows(client, THRESHOLD)
            approval_id = wait_for_pending(gw)
            (record,) = pending(gw)
            assert record.request.kind == "rows" and record.request.rows_sent == THRESHOLD
            # paused: Bastion stops reading, so the server is still in the middle of the statement
            assert activity(gw, pid) == ("active", sql)
            log_start = gw.server.log_file.stat().st_size
            with httpx.Client(base_url=f"http://{gw.gateway.admin_address}", timeout=WAIT) as http:
                denied = http.post(f"/approvals/{approval_id}/deny", headers={"authorization": f"Bearer {ALICE_TOKEN}"}, json={"reason": "use the nightly export"})
                assert denied.status_code == 200, denied.text
            answer = client.until_ready()
            # exactly the threshold's rows reached the caller, then the reviewer's reason
            assert [int(row.values[0]) for row in of_type(sent + answer, DataRow)] == list(range(1, THRESHOLD + 1))
            error = refusal(answer)
            assert "use the nightly export" in error.message and answer[-1] == ReadyForQuery("I")
            # the server was told to stop: its backend no longer runs the statement, and says why
            gw.wait_for(lambda: activity(gw, pid)[0] == "idle", timeout=WAIT)
            cancelled = re.compile(rf"\[{pid}\] ERROR:\s+canceling statement due to user request\n(?:.*\n)*?.*\[{pid}\] STATEMENT:\s+{re.escape(sql)}")
            gw.wait_for(lambda: cancelled.search(server_log(gw, log_start)), timeout=WAIT)
            select_1(client)
        response = response_of(gw, approval_id)
        assert response.status == "denied" and response.command_tag == "" and response.rows < BULK_ROWS
        assert approval_steps(gw, approval_id) == ["requested", "denied"]


def test_a_statement_pipelined_behind_a_denied_result_is_not_cancelled(pg_gateway):
    """The denied result is small: the server has finished it (it sits in socket buffers) and is
    already running the caller's next statement, held on an advisory lock, when the reviewer says no."""
    with start(pg_gateway) as gw:
        table = fresh_table(gw.server, "create table {t} (id int)", name=f"bulk_{uuid.uuid4().hex[:8]}")
        gw.server.execute(f"insert into {table} select generate_series(1, {THRESHOLD + 500})")
        key = uuid.uuid4().int % 2**31
        with psycopg.connect(gw.server.dsn(), autocommit=True) as holder, raw_client(gw) as client:
            holder.execute(f"select pg_advisory_lock({key})")
            pid = backend_pid(client)
            second = f"select pg_advisory_lock({key}), 'second'"
            client.send(Query(f"select id from {table}"), Query(second))
            sent = read_rows(client, THRESHOLD)
            approval_id = wait_for_pending(gw)
            gw.wait_for(lambda: activity(gw, pid) == ("active", second), timeout=WAIT)  # the first is over
            with httpx.Client(base_url=f"http://{gw.gateway.admin_address}", timeout=WAIT) as http:
                denied = http.post(f"/approvals/{approval_id}/deny", headers={"authorization": f"Bearer {ALICE_TOKEN}"}, json={"reason": "too wide"})
                assert denied.status_code == 200, denied.text
            answer = client.until_ready()
            assert len(of_type(sent + answer, DataRow)) == THRESHOLD and "too wide" in refusal(answer).message
            holder.execute(f"select pg_advisory_unlock({key})")
            second_answer = client.until_ready()  # the second statement ran; no cancel hit it
            assert of_type(second_answer, ErrorResponse) == [] and [r.values for r in of_type(second_answer, DataRow)] == [(b"", b"second")]
            select_1(client)


# the same rules, but nobody can answer a bulk read in time (bulk-read is the last rule)
EXPIRING_BUNDLE = BUNDLE[: BUNDLE.rindex('timeout = "2m"')] + 'timeout = "1s"\n'
assert BUNDLE.rindex('timeout = "2m"') > BUNDLE.index('name = "bulk-read"')


def test_a_result_nobody_approves_in_time_stops_at_its_threshold(pg_gateway):
    with pg_gateway(bundle=EXPIRING_BUNDLE, tokens=TOKENS, groups=GROUPS) as gw:
        view = bulk_view(gw)
        with raw_client(gw) as client:
            client.send(Query(f"select g from {view}"))
            answer = client.until_ready()  # nobody reviews: the request expires
            assert len(of_type(answer, DataRow)) == THRESHOLD
            error = refusal(answer)
            assert "not approved in time" in error.message and answer[-1] == ReadyForQuery("I")
            select_1(client)
        (approval_id,) = {e.approval_id for e in gw.events_of(events.ApprovalEvent)}
        assert approval_steps(gw, approval_id) == ["requested", "expired"]
        response = response_of(gw, approval_id)
        assert response.status == "denied" and response.command_tag == "" and response.rows < BULK_ROWS


# --- a result paused at its row threshold, with the gateway in its own process ----------------------


ROWS_TOTAL = 3_000_000
ROW_BYTES = 100  # each row carries this much text: ~300 MB in all, far more than the bound below
RSS_GROWTH_BOUND = 64 * 1024 * 1024  # while paused, the gateway may grow by at most this much


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def write_serve_config(directory: Path, server, port: int, admin_port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "upstream.pw").write_text(server.password + "\n")
    (directory / "policy.toml").write_text(textwrap.dedent(BUNDLE))
    tokens = ", ".join(f'"{t}" = "{s}"' for t, s in TOKENS.items())
    groups = ", ".join(f'"{s}" = {json.dumps(g)}' for s, g in GROUPS.items())
    path = directory / "bastion.toml"
    path.write_text(
        f"""
[gateway]
state_dir = "var"
admin_listen = "127.0.0.1:{admin_port}"
policies = ["policy.toml"]
shutdown_grace = "2s"

[audit]
record_rows = 10

[[identity]]
kind = "test-tokens"
tokens = {{ {tokens} }}
groups = {{ {groups} }}

[[targets]]
name = "pg"
protocol = "postgres"
listen = "127.0.0.1:{port}"
upstream = "{server.host}:{server.port}"
credentials = {{ user = "{server.superuser}", password = {{ file = "upstream.pw" }} }}
allow_plaintext_auth = true
database = "postgres"

[approvals]
poll_interval = "50ms"
"""
    )
    return path


def test_a_large_result_pauses_at_its_threshold_with_flat_gateway_memory_until_approved(postgres_server, tmp_path):
    from bastion.protocols.postgres.messages import CommandComplete, DataRow, Query, ReadyForQuery
    from tests.pg_helpers import RawClient

    table = fresh_table(postgres_server, "create table {t} (id int)", name=f"bulk_{uuid.uuid4().hex[:8]}")
    port, admin_port = free_port(), free_port()
    config = write_serve_config(tmp_path, postgres_server, port, admin_port)
    gateway = subprocess.Popen(bastion_command("serve", "-c", str(config), plugins=PLUGINS), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, gateway, timeout=WAIT)
        client = RawClient.connect(type("Gw", (), {"host": "127.0.0.1", "port": port})())
        baseline = rss_bytes(gateway.pid)
        client.send(Query(f"select g, repeat('x', {ROW_BYTES}) from generate_series(1, {ROWS_TOTAL}) g, (select count(*) from {table}) c"))
        rows = 0
        while rows < 1000:
            message = client.read()
            assert message is not None, "the gateway closed the connection"
            rows += isinstance(message, DataRow)

        # the result is paused: a rows request waits for a reviewer, and the gateway's memory
        # stays flat although the server has ~300 MB more to send
        deadline = time.monotonic() + WAIT
        listing = None
        while time.monotonic() < deadline:
            listing = subprocess.run(bastion_command("approvals", "list", "--json", "-c", str(config), plugins=PLUGINS), capture_output=True, text=True, env={**os.environ, "BASTION_TOKEN": ALICE_TOKEN}, cwd=ROOT, timeout=WAIT)
            if json.loads(listing.stdout or '{"approvals": []}')["approvals"]:
                break
        (entry,) = json.loads(listing.stdout)["approvals"]
        assert entry["kind"] == "rows" and entry["rows_sent"] >= 1000
        for _ in range(5):  # sampled while paused: never more than the bound above the baseline
            assert rss_bytes(gateway.pid) - baseline < RSS_GROWTH_BOUND

        approve = subprocess.run(bastion_command("approvals", "approve", entry["id"], "-c", str(config), plugins=PLUGINS), capture_output=True, text=True, env={**os.environ, "BASTION_TOKEN": ALICE_TOKEN}, cwd=ROOT, timeout=WAIT)
        assert approve.returncode == 0, approve.stderr
        tag = None
        while True:
            message = client.read()
            assert message is not None
            rows += isinstance(message, DataRow)
            if isinstance(message, CommandComplete):
                tag = message.tag
            if isinstance(message, ReadyForQuery):
                break
        assert rows == ROWS_TOTAL and tag == f"SELECT {ROWS_TOTAL}"
        client.close()
    finally:
        gateway.terminate()
        try:
            gateway.wait(20)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(10)
