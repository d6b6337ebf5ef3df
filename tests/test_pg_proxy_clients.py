"""Real clients through Bastion's PostgreSQL gateway: psql, asyncpg, pgbench.

psql and pgbench run as subprocesses with a timeout; asyncpg runs on its own asyncio loop in the
test's thread, bounded by ``asyncio.wait_for``. Every test also has pytest-timeout's bound.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import threading
import time

import pytest

from bastion.core import events
from tests.pg_helpers import TOKEN, GrantAll, fresh_table, pg_gateway  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

ASYNCPG_DEADLINE = 60


def refused(request):
    if "forbidden" in request.message.text.lower():
        return ("test:no-forbidden", "statements mentioning forbidden are not allowed")
    return None


# --- psql ------------------------------------------------------------------------------------------


def test_psql_command(pg_gateway):
    with pg_gateway() as gw:
        result = gw.psql("-At", "-c", "select 40 + 2")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "42"


def test_psql_session_driven_through_stdin_survives_a_refusal(pg_gateway):
    script = "\n".join(
        [
            "create temporary table notes (id int, body text);",
            "insert into notes values (1, 'one'), (2, 'two');",
            "select 'forbidden';",
            "begin;",
            "insert into notes values (3, 'three');",
            "select 'forbidden';",
            "select 'never runs';",
            "rollback;",
            "select count(*) as notes from notes;",
            "\\echo done",
        ]
    )
    with pg_gateway(policy=GrantAll(refused)) as gw:
        result = gw.psql("-At", input=script + "\n")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-2:] == ["2", "done"]
        assert result.stderr.count("Bastion refused this statement") == 2
        assert "current transaction is aborted" in result.stderr  # the block failed, as on the server


def test_psql_copy_in_and_out(pg_gateway, postgres_server, tmp_path):
    table = fresh_table(postgres_server, "create table {t} (id int, name text)")
    source = tmp_path / "in.csv"
    source.write_text("".join(f"{i},name {i}\n" for i in range(500)))
    target = tmp_path / "out.csv"
    with pg_gateway() as gw:
        loaded = gw.psql("-c", f"\\copy {table} from '{source}' with (format csv)")
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.strip() == "COPY 500"
        dumped = gw.psql("-c", f"\\copy (select * from {table} order by id) to '{target}' with (format csv)")
        assert dumped.returncode == 0, dumped.stderr
        assert target.read_text() == source.read_text()


def test_psql_watch_repeats_until_interrupted(pg_gateway):
    with pg_gateway() as gw:
        process = subprocess.Popen(
            [str(gw.server.bin_dir / "psql"), "-X", "-At"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=gw.env(),
            text=True,
        )
        try:
            process.stdin.write("select 'tick' \\watch 0.2\n")
            process.stdin.flush()
            ticks = 0
            deadline = time.monotonic() + 30
            while ticks < 3 and time.monotonic() < deadline:
                line = process.stdout.readline()
                if not line:
                    break
                ticks += line.strip() == "tick"
            assert ticks >= 3
            process.send_signal(signal.SIGINT)
            process.stdin.close()
            status = process.wait(timeout=20)
            stderr = process.stderr.read()
            # Ctrl-C ends the watch. When it lands while a query runs, psql sends a cancel (through
            # the gateway) and, reading a script, stops with status 3 as it does against the server
            assert status == 0 or (status == 3 and "Cancel request sent" in stderr), (status, stderr)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_psql_ctrl_c_cancels_a_long_statement_quickly(pg_gateway, postgres_server):
    with pg_gateway() as gw:
        process = subprocess.Popen(
            [str(gw.server.bin_dir / "psql"), "-X", "-c", "select pg_sleep(30) as bastion_sleeps"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=gw.env(),
            text=True,
        )
        try:
            running = "select count(*) from pg_stat_activity where query like '%bastion_sleeps%' and pid <> pg_backend_pid()"
            deadline = time.monotonic() + 20
            while postgres_server.execute(running)[0][0] == 0:
                assert time.monotonic() < deadline, "the statement never started"
                time.sleep(0.05)
            interrupted = time.monotonic()
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=15)
            took = time.monotonic() - interrupted
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert "canceling statement due to user request" in stderr
        assert process.returncode == 1
        assert took < 15  # not the 30 s of the statement (a bound, not a timing assertion)
        gw.wait_for(lambda: [e for e in gw.events_of(events.CancelForwarded) if e.outcome == "forwarded"])


# --- asyncpg ---------------------------------------------------------------------------------------


def run_async(coroutine_function, *args):
    async def bounded():
        return await asyncio.wait_for(coroutine_function(*args), ASYNCPG_DEADLINE)

    return asyncio.run(bounded())


def test_asyncpg_binary_protocol_prepared_statements_and_copy(pg_gateway, postgres_server):
    asyncpg = pytest.importorskip("asyncpg")
    table = fresh_table(postgres_server, "create table {t} (id int primary key, name text, seen timestamptz, score numeric)")

    async def scenario(gw):
        conn = await asyncpg.connect(host=gw.host, port=gw.port, user="ci-bot", password=TOKEN, database="postgres", ssl=False)
        try:
            assert await conn.fetchval("select $1::int + 1", 41) == 42
            statement = await conn.prepare(f"insert into {table} (id, name, seen, score) values ($1, $2, now(), $3)")
            for i in range(5):
                await statement.fetch(i, f"name {i}", i * 1.5)
            await conn.executemany(f"insert into {table} (id, name, score) values ($1, $2, $3)", [(i, f"bulk {i}", 0) for i in range(5, 50)])
            rows = await conn.fetch(f"select id, name from {table} where id < $1 order by id", 3)
            assert [tuple(r) for r in rows] == [(0, "name 0"), (1, "name 1"), (2, "name 2")]
            await conn.copy_records_to_table(table, records=[(i, f"copied {i}", None, 1) for i in range(50, 60)], columns=["id", "name", "seen", "score"])
            assert await conn.fetchval(f"select count(*) from {table}") == 60
            async with conn.transaction():
                seen = [r["id"] async for r in conn.cursor(f"select id from {table} order by id", prefetch=7)]
            assert seen == list(range(60))
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.fetchval("select 'forbidden' || $1", "x")
            assert await conn.fetchval("select 7") == 7
            assert await conn.fetchval("select pg_backend_pid()") == conn.get_server_pid()
        finally:
            await conn.close()

    with pg_gateway(policy=GrantAll(refused)) as gw:
        run_async(scenario, gw)


def test_asyncpg_custom_types_are_introspected_through_the_gateway(pg_gateway, postgres_server):
    asyncpg = pytest.importorskip("asyncpg")
    if not postgres_server.execute("select 1 from pg_type where typname = 'mood'"):
        postgres_server.execute("create type mood as enum ('sad', 'ok', 'happy')")
    async def scenario(gw):
        conn = await asyncpg.connect(host=gw.host, port=gw.port, user="ci-bot", password=TOKEN, database="postgres", ssl=False)
        try:
            assert await conn.fetchval("select $1::mood", "happy") == "happy"
            assert await conn.fetchval("select array['sad', 'ok']::mood[]") == ["sad", "ok"]
        finally:
            await conn.close()

    with pg_gateway() as gw:
        run_async(scenario, gw)


# --- pgbench ---------------------------------------------------------------------------------------


def pgbench(gw, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(gw.server.bin_dir / "pgbench"), *args],
        capture_output=True,
        text=True,
        env=gw.env(),
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_pgbench_initialises_and_runs_select_only_in_every_query_mode(pg_gateway):
    with pg_gateway(record_rows=0) as gw:
        init = pgbench(gw, "-i", "-s", "1", "-q")
        assert init.returncode == 0, init.stderr
        for mode in ("simple", "extended", "prepared"):
            run = pgbench(gw, "-S", "-M", mode, "-T", "2", "-c", "2", "-j", "1")
            assert run.returncode == 0, run.stderr
            assert "number of failed transactions: 0" in run.stdout
            processed = int(re.search(r"number of transactions actually processed: (\d+)", run.stdout)[1])
            assert processed > 0
        refused_count = len([e for e in gw.events_of(events.RequestJudged) if e.verdict != "allow"])
        assert refused_count == 0


def test_many_sessions_at_once_are_independent(pg_gateway):
    psycopg = pytest.importorskip("psycopg")
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with psycopg.connect(pg_helpers_dsn(n)) as conn:
                for i in range(20):
                    assert conn.execute("select %s::int * 2", [i + n]).fetchone() == ((i + n) * 2,)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    with pg_gateway() as gw:

        def pg_helpers_dsn(n: int) -> str:
            return gw.dsn(application_name=f"worker-{n}")

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
