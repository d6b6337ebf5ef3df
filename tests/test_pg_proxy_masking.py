"""Results through the PostgreSQL gateway with a real policy bundle: masking in text and binary
formats, COPY TO STDOUT, echoed values in errors, untraced columns, prepared statements described
or not, the catalog after DDL, and the records the audit trail keeps.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import errors as pg_errors

from bastion.core import events
from bastion.protocols.postgres.messages import Bind, DataRow, Execute, Parse, Query, Sync
from tests.pg_helpers import SUBJECT, RawClient, of_type, pg_gateway  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

BUNDLE = """
[[grant]]
name = "ci"
identities = { subjects = ["ci-bot"] }
targets = ["pg"]
statements = ["*"]
capabilities = ["function-call", "startup-options"]

[[mask]]
name = "ssn"
columns = ["*.ssn"]
strategy = "partial"

[[mask]]
name = "email"
columns = ["*.email"]
strategy = "redact"

[[mask]]
name = "notes"
columns = ["*.notes"]
recognizers = ["ssn", "email"]
strategy = "redact"

[masking]
untraced = "{untraced}"
"""

SSN = "123-45-6789"
MASKED_SSN = "***-**-6789"


def bundle(untraced: str = "mask-all") -> str:
    return BUNDLE.replace("{untraced}", untraced)


@pytest.fixture
def patients(postgres_server):
    name = f"patients_{uuid.uuid4().hex[:8]}"
    postgres_server.execute(
        f"create table {name} (id int primary key, name text, ssn text unique, email text, notes text);"
        f"insert into {name} values (1, 'Ann', '{SSN}', 'ann@example.org', 'called from ann@example.org about {SSN}'),"
        f" (2, 'Bob', '987-65-4321', 'bob@example.org', 'nothing to note')"
    )
    return name


def raw_values(messages):
    return [m.values for m in of_type(messages, DataRow)]


def test_masked_in_text_and_binary_formats(pg_gateway, patients):
    with pg_gateway(bundle=bundle()) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        text = conn.execute(f"select id, name, ssn, email, notes from {patients} order by id").fetchall()
        assert text[0][:4] == (1, "Ann", MASKED_SSN, "[REDACTED]")
        assert SSN not in text[0][4] and "ann@example.org" not in text[0][4] and text[0][4].startswith("called from")
        binary = conn.execute(f"select id, ssn from {patients} where id = %s", [1], binary=True).fetchall()
        assert binary == [(1, MASKED_SSN)]
        rows = [r for e in gw.events_of(events.ResultRows) for r in e.rows]
        assert rows and not any(SSN in (cell or "") for row in rows for cell in row)
        masked = [e.masked for e in gw.events_of(events.ResponseCompleted) if e.masked]
        assert masked and any(key.startswith("ssn") for m in masked for key in m)


def test_aliases_expressions_and_star_are_traced_to_their_sources(pg_gateway, patients):
    with pg_gateway(bundle=bundle()) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        assert conn.execute(f"select ssn as x from {patients} where id = 1").fetchone() == (MASKED_SSN,)
        assert SSN not in conn.execute(f"select upper(ssn) from {patients} where id = 1").fetchone()[0]
        row = conn.execute(f"select * from {patients} where id = 1").fetchone()
        assert row[2] == MASKED_SSN and row[3] == "[REDACTED]"
        assert SSN not in conn.execute(f"select p::text from {patients} p where id = 1").fetchone()[0]


def test_untraced_columns_are_scanned_with_every_recognizer(pg_gateway, patients, opaque):
    with pg_gateway(bundle=bundle("mask-all")) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        value = conn.execute(f"select {opaque}(notes) from {patients} where id = 1").fetchone()[0]
        assert SSN not in value and "ann@example.org" not in value


class ShapeSpy:
    """Keeps the result shapes the protocol hands to the transform hook."""

    def __init__(self) -> None:
        self.shapes = []

    from bastion.core.hookspecs import hookimpl

    @hookimpl
    def bastion_transform(self, session, request, shape):
        self.shapes.append(shape)
        return None


def test_result_columns_name_their_table_from_the_catalog_and_their_sources(pg_gateway, patients):
    spy = ShapeSpy()
    with pg_gateway(bundle=bundle(), plugins=[spy]) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        conn.execute(f"select ssn as x, upper(name) as n, 1 as one from {patients}").fetchall()
        conn.execute(f"select id, email from {patients} where id = %s", [1], binary=True).fetchall()
    x, n, one = spy.shapes[0].columns
    assert x.table == f"public.{patients}" and f"public.{patients}.ssn" in x.sources and x.traced
    assert n.table is None and f"public.{patients}.name" in n.sources
    assert one.table is None and not one.sources
    id_, email = spy.shapes[1].columns
    assert email.binary and email.type_oid == 25 and email.table == f"public.{patients}"


def test_the_catalog_is_refreshed_in_the_background_when_it_is_old(pg_gateway, postgres_server):
    with pg_gateway(options='catalog_refresh = "1s"') as gw:
        with psycopg.connect(gw.dsn()) as conn:
            conn.execute("select 1")
        name = f"late_{uuid.uuid4().hex[:8]}"
        postgres_server.execute(f"create table {name} (id int)")  # behind Bastion's back

        def known() -> bool:
            with psycopg.connect(gw.dsn()) as conn:  # each new session refreshes an old catalog
                conn.execute("select 1")
            return f"public.{name}" in gw.call(lambda: gw.gateway.targets["pg"].state["catalog"]).tables

        gw.wait_for(known, timeout=30)


def test_prepared_statements_without_a_describe_are_masked(pg_gateway, patients):
    """A client that executes a prepared statement without Describe (asyncpg does so after its
    first prepare) still gets masked rows: Bastion asks the server itself."""
    with pg_gateway(bundle=bundle()) as gw, RawClient.connect(gw) as client:
        client.send(Parse("s", f"select ssn from {patients} where id = $1"), Sync())
        client.until_ready()
        client.send(Bind(statement="s", params=(b"1",)), Execute(), Sync())
        assert raw_values(client.until_ready()) == [(MASKED_SSN.encode(),)]


def test_copy_to_stdout_is_masked_line_by_line(pg_gateway, patients):
    with pg_gateway(bundle=bundle()) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        with conn.cursor().copy(f"copy (select id, ssn from {patients} order by id) to stdout") as copy:
            assert list(copy.rows()) == [("1", MASKED_SSN), ("2", "***-**-4321")]
        with conn.cursor().copy(f"copy {patients} (id, ssn, email) to stdout with (format csv, header)") as copy:
            data = b"".join(bytes(chunk) for chunk in copy).decode()
        assert data.splitlines()[0] == "id,ssn,email"
        assert SSN not in data and "ann@example.org" not in data
        with pytest.raises(pg_errors.InsufficientPrivilege):
            with conn.cursor().copy(f"copy {patients} (id, ssn) to stdout (format binary)") as copy:
                list(copy)
        assert conn.execute("select 1").fetchone() == (1,)


def test_values_echoed_in_an_error_are_masked(pg_gateway, patients):
    with pg_gateway(bundle=bundle()) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        with pytest.raises(pg_errors.UniqueViolation) as info:
            conn.execute(f"insert into {patients} (id, ssn) values (%s, %s)", [3, SSN])
        assert SSN not in (info.value.diag.message_detail or "")
        assert "already exists" in info.value.diag.message_detail


@pytest.fixture
def opaque(postgres_server):
    """A function the analysis cannot see into: what it returns is untraced."""
    postgres_server.execute("create or replace function opaque(text) returns text language sql as 'select $1'")
    return "opaque"


def test_an_untraced_column_is_refused_when_the_policy_says_deny(pg_gateway, patients, opaque):
    with pg_gateway(bundle=bundle("deny")) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        with pytest.raises(pg_errors.InsufficientPrivilege) as info:
            conn.execute(f"select {opaque}(name) from {patients} p")
        assert "withheld" in info.value.diag.message_primary
        assert conn.execute(f"select id from {patients} order by id").fetchall() == [(1,), (2,)]
        denied = [e for e in gw.events_of(events.ResponseCompleted) if e.status == "denied"]
        assert denied and denied[0].bytes == 0


def test_a_withheld_result_in_a_transaction_fails_the_transaction(pg_gateway, patients, opaque):
    with pg_gateway(bundle=bundle("deny")) as gw, psycopg.connect(gw.dsn()) as conn:
        conn.execute(f"update {patients} set name = 'changed' where id = 2")
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute(f"select {opaque}(name) from {patients}")
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute(f"select name from {patients} where id = 2").fetchone() == ("Bob",)


def test_a_table_created_through_the_gateway_is_known_to_its_next_statement(pg_gateway):
    name = f"made_{uuid.uuid4().hex[:8]}"
    with pg_gateway(bundle=bundle()) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {name} (id int, ssn text)")
        conn.execute(f"insert into {name} values (1, %s)", [SSN])
        assert conn.execute(f"select * from {name}").fetchone() == (1, MASKED_SSN)
        catalog = gw.call(lambda: gw.gateway.targets["pg"].state["catalog"])
        assert f"public.{name}" in catalog.tables


def test_fast_path_calls_are_allowed_by_the_capability(pg_gateway):
    from bastion.protocols.postgres.messages import FunctionCall, FunctionCallResponse

    with pg_gateway(bundle=bundle()) as gw, RawClient.connect(gw) as client:
        client.send(FunctionCall(function_oid=1299, result_format=0))  # now()
        answer = client.until_ready()
        assert isinstance(answer[0], FunctionCallResponse)


def test_the_real_policy_refuses_fast_path_calls_without_the_capability(pg_gateway):
    plain = bundle().replace('capabilities = ["function-call", "startup-options"]\n', "")
    with pg_gateway(bundle=plain) as gw, RawClient.connect(gw) as client:
        from bastion.protocols.postgres.messages import FunctionCall

        client.send(FunctionCall(function_oid=1299, result_format=0))
        answer = client.until_ready()
        assert answer[0].sqlstate == "42501"
        client.send(Query("select 1"))
        assert raw_values(client.until_ready()) == [(b"1",)]


GUARDED = BUNDLE.replace("{untraced}", "mask-all") + """
[[guardrail]]
name = "no-server-side-files"
detect = ["copy-program", "copy-file", "file-access"]
action = "deny"
"""


def test_copy_program_and_unparsable_statements_are_refused_and_the_session_goes_on(pg_gateway, patients):
    with pg_gateway(bundle=GUARDED) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        with pytest.raises(pg_errors.InsufficientPrivilege) as info:
            conn.execute(f"copy {patients} to program 'cat > /tmp/out'")
        assert "no-server-side-files" in info.value.diag.message_detail
        with pytest.raises(pg_errors.InsufficientPrivilege) as info:
            conn.execute("selec garbage from nowhere")
        assert "default-deny" in info.value.diag.message_detail or "unknown" in info.value.diag.message_primary
        assert conn.execute("select 1").fetchone() == (1,)
        verdicts = [e.verdict for e in gw.events_of(events.RequestJudged)]
        assert verdicts.count("deny") == 2


def test_the_caller_user_name_grants_nothing(pg_gateway, patients):
    with pg_gateway(bundle=bundle()) as gw, psycopg.connect(gw.dsn(user="postgres"), autocommit=True) as conn:
        assert conn.execute(f"select ssn from {patients} where id = 1").fetchone() == (MASKED_SSN,)
        started = gw.events_of(events.SessionStarted)[0]
        assert started.identity.subject == SUBJECT and started.client_user == "postgres"
