"""Two gateway instances sharing one PostgreSQL approval store, end to end.

Gateway A holds a psycopg caller's DELETE; a reviewer finds and decides it through gateway B
(its HTTP API, or ``bastion approvals`` with B's configuration). The store's NOTIFY wakes the
session on A — A is never asked directly — and A records every step of its own request.
The store lives in a database of its own on the test PostgreSQL server.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import httpx
import psycopg
import pytest
from psycopg import errors as pg_errors

from bastion.core import events
from bastion.core.approvals_store import PostgresStore
from tests.approvals_helpers import bastion_command
from tests.pg_helpers import pg_gateway  # noqa: F401  (a fixture)
from tests.test_approvals_pg import ALICE_TOKEN, BUNDLE, GROUPS, PLUGINS, ROOT, TOKENS, WAIT, Caller, approval_steps, patients_table, remaining

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]


@pytest.fixture
def store_database(postgres_server):
    """A database of its own for the shared approval store."""
    name = f"approvals_{uuid.uuid4().hex[:10]}"
    postgres_server.execute(f"create database {name}")
    yield name
    postgres_server.execute(f"drop database {name} with (force)")


def shared_store(server, dbname: str) -> str:
    """``[approvals]`` for the shared store, as TOML. write_pg_config puts ``gateway_extra`` at the
    end of ``[gateway]``; the tables below start after it and end where ``[audit]`` begins."""
    return f"""
[approvals]
store = "postgres"
reminder_interval = 0  # no reminder re-reads the store: only the store's NOTIFY wakes a session

[approvals.postgres]
host = "{server.host}"
port = {server.port}
dbname = "{dbname}"
user = "{server.superuser}"
password = {{ file = "upstream.pw" }}
sslmode = "disable"
"""


def two_gateways(pg_gateway, postgres_server, dbname: str):
    extra = shared_store(postgres_server, dbname)
    return (
        pg_gateway(bundle=BUNDLE, tokens=TOKENS, groups=GROUPS, gateway_extra=extra),
        pg_gateway(bundle=BUNDLE, tokens=TOKENS, groups=GROUPS, gateway_extra=extra),
    )


def listed_by(gw, token: str) -> list[dict]:
    """Pending requests, as ``GET /approvals`` on this gateway's admin listener lists them."""
    with httpx.Client(base_url=f"http://{gw.gateway.admin_address}", timeout=WAIT) as http:
        answer = http.get("/approvals", params={"state": "pending"}, headers={"authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    return answer.json()["approvals"]


def wait_listed_by(gw, token: str) -> dict:
    (entry,) = gw.wait_for(lambda: listed_by(gw, token), timeout=WAIT)
    return entry


def cli(gw, *args: str, token: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BASTION_TOKEN": token}
    env.pop("BASTION_CONFIG", None)
    command = bastion_command("approvals", *args, "-c", str(gw.directory / "bastion.toml"), plugins=PLUGINS)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=WAIT)


def test_a_delete_held_on_one_gateway_is_approved_through_the_other(pg_gateway, postgres_server, store_database):
    a_started, b_started = two_gateways(pg_gateway, postgres_server, store_database)
    with a_started as a, b_started as b:
        for gw in (a, b):
            assert isinstance(gw.gateway.runtime.approvals.store, PostgresStore)
        assert a.gateway.runtime.approvals.instance_id != b.gateway.runtime.approvals.instance_id
        table = patients_table(a)
        caller = Caller(a.dsn(), f"delete from {table} where id = 2")
        caller.start()

        entry = wait_listed_by(b, ALICE_TOKEN)  # B lists what A holds
        approval_id = entry["id"]
        assert entry["requester"]["subject"] == "ci-bot" and entry["statement"] == f"delete from {table} where id = ?"
        assert remaining(a, table) == [1, 2, 3]  # held on A: nothing reached the server
        with httpx.Client(base_url=f"http://{b.gateway.admin_address}", timeout=WAIT) as http:
            approved = http.post(f"/approvals/{approval_id}/approve", headers={"authorization": f"Bearer {ALICE_TOKEN}"}, json={"comment": "from gateway b"})
        assert approved.status_code == 200 and approved.json()["state"] == "approved", approved.text

        # B told nobody but the store: the NOTIFY wakes A's session, which runs the DELETE
        assert caller.outcome() == (1, None)
        assert remaining(a, table) == [1, 3]
        judged = next(e for e in a.events_of(events.RequestJudged) if e.statements == (f"delete from {table} where id = ?",))
        assert judged.verdict == "allow" and any(f"approved by alice (approval {approval_id})" in r for r in judged.reasons)
        # every step is recorded once, by the gateway that holds the session
        a.wait_for(lambda: approval_steps(a, approval_id) == ["requested", "approval", "approved"], timeout=WAIT)
        assert approval_steps(b, approval_id) == []
        assert listed_by(a, ALICE_TOKEN) == [] and listed_by(b, ALICE_TOKEN) == []


def test_a_delete_held_on_one_gateway_is_denied_with_the_command_line_of_the_other(pg_gateway, postgres_server, store_database):
    a_started, b_started = two_gateways(pg_gateway, postgres_server, store_database)
    with a_started as a, b_started as b:
        table = patients_table(a)
        caller = Caller(a.dsn(), f"delete from {table}")
        caller.start()
        approval_id = wait_listed_by(a, ALICE_TOKEN)["id"]

        listing = cli(b, "list", "--json", token=ALICE_TOKEN)  # B's configuration: the shared store
        assert listing.returncode == 0, listing.stderr
        assert [e["id"] for e in json.loads(listing.stdout)["approvals"]] == [approval_id]
        denied = cli(b, "deny", approval_id, "--reason", "not from the batch host", token=ALICE_TOKEN)
        assert denied.returncode == 0, denied.stderr

        _, error = caller.outcome()  # and the caller's connection goes on (see Caller)
        assert isinstance(error, pg_errors.InsufficientPrivilege) and "not from the batch host" in str(error)
        assert remaining(a, table) == [1, 2, 3]
        a.wait_for(lambda: approval_steps(a, approval_id) == ["requested", "denied"], timeout=WAIT)
        assert approval_steps(b, approval_id) == []
        with psycopg.connect(b.dsn(), autocommit=True) as conn:  # B serves callers as before
            assert conn.execute("select 1").fetchone() == (1,)
