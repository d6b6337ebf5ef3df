"""PostgreSQL through Bastion with psycopg 3 and a raw protocol client: login, statements, refusals,
prepared statements, pipelines, COPY, cursors, cancel, LISTEN/NOTIFY.

Every test runs a real gateway (tests/pg_helpers.py) in front of the ``postgres_server`` fixture.
Each is bounded by pytest-timeout (``pytestmark``); the raw client's socket reads time out too.
"""

from __future__ import annotations

import threading

import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from bastion.core import events
from bastion.protocols.postgres.messages import (
    Bind,
    BindComplete,
    CommandComplete,
    DataRow,
    Describe,
    ErrorResponse,
    Execute,
    Flush,
    Parse,
    ParseComplete,
    Query,
    ReadyForQuery,
    RowDescription,
    Sync,
)
from tests.pg_helpers import OTHER_TOKEN, SUBJECT, TOKEN, GrantAll, RawClient, fresh_table, of_type, pg_gateway, refuse_text  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]


def refused(request):
    text = request.message.text.lower()
    if "forbidden" in text:
        return ("test:no-forbidden", "statements mentioning forbidden are not allowed")
    if request.message.kind == "function-call":
        return ("test:no-fast-path", "fast-path calls are not granted")
    return None


# --- login -----------------------------------------------------------------------------------------


def test_select_in_text_and_binary_reports_the_real_backend_pid(pg_gateway):
    with pg_gateway() as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1, 'a'::text").fetchall() == [(1, "a")]
        assert conn.execute("select %s::int + 1, %s::text", [41, "x"]).fetchall() == [(42, "x")]
        assert conn.execute("select %s::int + 1, %s::bytea", [41, b"\x00\xff"], binary=True).fetchall() == [(42, b"\x00\xff")]
        assert conn.info.backend_pid == conn.execute("select pg_backend_pid()").fetchone()[0]
        # the session runs as Bastion's service account, whatever user the caller named
        assert conn.execute("select current_user").fetchone()[0] == gw.server.superuser


def test_the_session_is_recorded_with_the_caller_and_its_statements(pg_gateway):
    with pg_gateway() as gw:
        with psycopg.connect(gw.dsn(user="job-42"), autocommit=True) as conn:
            conn.execute("select 7")
        ended = gw.wait_for(lambda: gw.events_of(events.SessionEnded))
        started = gw.events_of(events.SessionStarted)[0]
        assert started.identity.subject == SUBJECT and started.client_user == "job-42" and started.database == "postgres"
        judged = [e for e in gw.events_of(events.RequestJudged) if e.statements == ("select ?",)]
        assert judged and judged[0].verdict == "allow"
        response = [e for e in gw.events_of(events.ResponseCompleted) if e.request_no == judged[0].request_no][0]
        assert response.status == "ok" and response.rows == 1 and response.command_tag == "SELECT 1"
        rows = [e for e in gw.events_of(events.ResultRows) if e.request_no == judged[0].request_no]
        assert rows[0].rows == (("7",),)
        assert ended[0].reason == "client terminated the session"


def test_a_wrong_token_is_refused_like_a_wrong_password(pg_gateway):
    with pg_gateway() as gw:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(gw.dsn(token="not-a-token"))
        assert 'password authentication failed for user "ci-bot"' in str(info.value)
        gw.wait_for(lambda: gw.events_of(events.AuthenticationFailed))
        assert not gw.events_of(events.SessionStarted)


def test_a_caller_without_a_grant_is_refused_with_the_rule(pg_gateway):
    class OnlyCiBot:
        from bastion.core.hookspecs import hookimpl

        @hookimpl
        def bastion_authorize(self, session, request):
            from bastion.policies.model import Decision

            if request.action == "connect" and session.identity.subject == "other-bot":
                return Decision.deny("test:no-connect", "other-bot may not connect")
            return None

    with pg_gateway(plugins=[OnlyCiBot()]) as gw:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(gw.dsn(token=OTHER_TOKEN))
        assert "test:no-connect" in str(info.value)
        with psycopg.connect(gw.dsn()) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


def test_a_database_the_target_does_not_serve_does_not_exist(pg_gateway):
    with pg_gateway() as gw:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(gw.dsn(dbname="template1"))
        assert 'database "template1" does not exist' in str(info.value)


def test_listed_databases_are_served(pg_gateway, postgres_server):
    if not postgres_server.execute("select 1 from pg_database where datname = 'second'"):
        postgres_server.execute("create database second")
    with pg_gateway(options='databases = ["second"]') as gw, psycopg.connect(gw.dsn(dbname="second")) as conn:
        assert conn.execute("select current_database()").fetchone() == ("second",)


def test_startup_options_are_refused_unless_allowed_or_granted(pg_gateway):
    def no_startup_parameters(request):
        if request.action == "startup-options":
            return ("test:no-options", "startup options are not granted")
        return None

    with pg_gateway(policy=GrantAll(no_startup_parameters)) as gw:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(gw.dsn(options="-c role=pg_read_all_data"))
        assert 'startup parameter "options"' in str(info.value)
        judged = gw.wait_for(lambda: [e for e in gw.events_of(events.RequestJudged) if e.kind == "startup-parameter"])
        assert judged[0].verdict == "deny"
    with pg_gateway(policy=GrantAll(no_startup_parameters), options="allow_startup_options = true") as gw:
        with psycopg.connect(gw.dsn(options="-c statement_timeout=1234")) as conn:
            assert conn.execute("show statement_timeout").fetchone() == ("1234ms",)
    with pg_gateway() as gw, psycopg.connect(gw.dsn(options="-c statement_timeout=4321")) as conn:  # granted
        assert conn.execute("show statement_timeout").fetchone() == ("4321ms",)


def test_startup_parameters_outside_the_list_are_refused(pg_gateway):
    from bastion.protocols.postgres.messages import PasswordMessage, StartupMessage

    with pg_gateway() as gw, RawClient(gw.host, gw.port) as client:  # libpq cannot send these
        client.send(StartupMessage(parameters=(("user", SUBJECT), ("database", "postgres"), ("role", "pg_read_all_data"))))
        client.read()
        client.send(PasswordMessage(TOKEN))
        answer = client.until_ready()
        assert answer[0].sqlstate == "42501" and 'startup parameter "role"' in answer[0].message


def test_forwarded_startup_parameters_reach_the_server(pg_gateway):
    with pg_gateway() as gw, psycopg.connect(gw.dsn(application_name="nightly-export")) as conn:
        assert conn.execute("show application_name").fetchone() == ("nightly-export",)
        assert conn.info.parameter_status("application_name") == "nightly-export"


def test_tls_is_required_for_tokens_and_used_when_offered(pg_gateway):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    with pg_gateway(tls=ca) as gw:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(gw.dsn(sslmode="disable"))
        assert "only over TLS" in str(info.value)
        with psycopg.connect(gw.dsn(sslmode="verify-full", sslrootcert=str(gw.ca_file))) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            assert conn.pgconn.ssl_in_use
        assert gw.wait_for(lambda: [e for e in gw.events_of(events.SessionStarted) if e.tls])


def test_encryption_requests_are_answered_before_the_startup_message(pg_gateway):
    from bastion.protocols.postgres.codec import encode
    from bastion.protocols.postgres.messages import (
        AuthenticationCleartextPassword,
        GSSENCRequest,
        PasswordMessage,
        SSLRequest,
        StartupMessage,
    )

    with pg_gateway() as gw, RawClient(gw.host, gw.port) as client:
        client.sock.sendall(encode(GSSENCRequest()))
        assert client.sock.recv(1) == b"N"  # no GSSAPI encryption
        client.sock.sendall(encode(SSLRequest()))
        assert client.sock.recv(1) == b"N"  # this target has no TLS listener
        client.send(StartupMessage(parameters=(("user", SUBJECT), ("database", "postgres"))))
        assert isinstance(client.read(), AuthenticationCleartextPassword)
        client.send(PasswordMessage(TOKEN))
        assert isinstance(client.until_ready()[-1], ReadyForQuery)


def test_a_newer_protocol_version_is_negotiated_down_to_3_0(pg_gateway):
    from bastion.protocols.postgres.messages import (
        PROTOCOL_VERSION_3_2,
        AuthenticationCleartextPassword,
        NegotiateProtocolVersion,
        PasswordMessage,
        StartupMessage,
    )

    with pg_gateway() as gw, RawClient(gw.host, gw.port) as client:
        parameters = (("user", SUBJECT), ("database", "postgres"), ("_pq_.bastion_test", "on"))
        client.send(StartupMessage(PROTOCOL_VERSION_3_2, parameters))
        negotiated = client.read()
        assert isinstance(negotiated, NegotiateProtocolVersion)
        assert negotiated.newest_minor_version == 0 and negotiated.unrecognized_options == ("_pq_.bastion_test",)
        assert isinstance(client.read(), AuthenticationCleartextPassword)
        client.send(PasswordMessage(TOKEN))
        assert isinstance(client.until_ready()[-1], ReadyForQuery)
        client.send(Query("select 1"))
        assert of_type(client.until_ready(), DataRow)[0].values == (b"1",)


# --- refusals --------------------------------------------------------------------------------------


def test_a_refused_query_leaves_the_session_usable(pg_gateway):
    with pg_gateway(policy=GrantAll(refused)) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        with pytest.raises(pg_errors.InsufficientPrivilege) as info:
            conn.execute("select 'forbidden'")
        assert "test:no-forbidden" in info.value.diag.message_detail
        assert "statements mentioning forbidden are not allowed" in info.value.diag.message_primary
        assert conn.execute("select 2").fetchone() == (2,)
        judged = [e for e in gw.events_of(events.RequestJudged) if e.verdict == "deny"]
        assert judged and judged[0].rules == ("test:no-forbidden",)


def test_a_refused_statement_in_a_transaction_aborts_it_as_a_server_error_would(pg_gateway):
    with pg_gateway(policy=GrantAll(refused)) as gw, psycopg.connect(gw.dsn()) as conn:
        conn.execute("create temporary table kept (v int)")
        conn.execute("insert into kept values (1)")
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("select 'forbidden'")
        assert conn.info.transaction_status == TransactionStatus.INERROR
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select 3").fetchone() == (3,)


def test_a_refused_prepared_statement_leaves_the_session_usable(pg_gateway):
    with pg_gateway(policy=GrantAll(refused)) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("select %s::text || 'forbidden'", ["x"])
        assert conn.execute("select %s::int", [5]).fetchone() == (5,)
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("select %s::text || 'forbidden'", ["x"], prepare=True)
        assert conn.execute("select %s::int * 2", [5], prepare=True).fetchone() == (10,)


def test_a_refusal_in_a_pipeline_aborts_the_rest_up_to_the_sync(pg_gateway):
    with pg_gateway(policy=GrantAll(refused)) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        with conn.pipeline() as pipeline:
            first = conn.execute("select %s::int", [1])
            bad = conn.execute("select 'forbidden' || %s", ["x"])
            after = conn.execute("select %s::int", [3])
            with pytest.raises(pg_errors.InsufficientPrivilege):
                pipeline.sync()
            assert first.fetchone() == (1,)
            with pytest.raises(psycopg.ProgrammingError):  # as after a server error: never run
                after.fetchone()
            again = conn.execute("select %s::int", [4])
            pipeline.sync()
            assert again.fetchone() == (4,)
        assert conn.execute("select 5").fetchone() == (5,)


def test_extended_protocol_refusal_skips_to_sync_and_answers_it(pg_gateway):
    with pg_gateway(policy=GrantAll(refused)) as gw, RawClient.connect(gw) as client:
        client.send(
            Parse("", "select 1"),
            Bind(),
            Execute(),
            Parse("", "select 'forbidden'"),
            Bind(),
            Execute(),
            Parse("", "select 2"),  # skipped: it follows the refusal before the Sync
            Bind(),
            Execute(),
            Sync(),
            Query("select 3"),
        )
        first = client.until_ready()
        assert [type(m) for m in first] == [ParseComplete, BindComplete, DataRow, CommandComplete, ErrorResponse, ReadyForQuery]
        assert first[4].sqlstate == "42501" and first[-1].status == "I"
        second = client.until_ready()
        assert of_type(second, DataRow)[0].values == (b"3",)


def test_a_server_error_in_a_pipeline_skips_the_rest_and_records_it(pg_gateway):
    with pg_gateway() as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        with conn.pipeline() as pipeline:
            conn.execute("select %s::int", [1])
            conn.execute("select 1 / %s::int", [0])
            skipped = conn.execute("select %s::int", [3])
            with pytest.raises(pg_errors.DivisionByZero):
                pipeline.sync()
            with pytest.raises(psycopg.ProgrammingError):
                skipped.fetchone()
        assert conn.execute("select 4").fetchone() == (4,)
        not_run = gw.wait_for(lambda: [e for e in gw.events_of(events.ResponseCompleted) if e.error_message.startswith("not run")])
        assert len(not_run) == 1 and not_run[0].status == "error"
        failed = [e for e in gw.events_of(events.ResponseCompleted) if e.error_code == "22012"]
        assert len(failed) == 1 and failed[0].request_no < not_run[0].request_no


def test_fast_path_function_calls_are_refused_unless_granted(pg_gateway):
    with pg_gateway(policy=GrantAll(refused)) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        # psycopg reaches the fast path through large objects' lo_* functions in libpq
        from bastion.protocols.postgres.messages import FunctionCall

        with RawClient.connect(gw) as client:
            client.send(FunctionCall(function_oid=1299, result_format=0))  # now()
            answer = client.until_ready()
            assert answer[0].sqlstate == "42501" and "fast-path" in answer[0].message
            client.send(Query("select 1"))
            assert of_type(client.until_ready(), DataRow)[0].values == (b"1",)
        assert conn.execute("select 1").fetchone() == (1,)


def test_an_audit_trail_that_cannot_record_refuses_statements(pg_gateway):
    with pg_gateway() as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        gw.trail.failing = True
        with pytest.raises(pg_errors.InsufficientPrivilege) as info:
            conn.execute("select 1")
        assert "audit trail cannot record" in info.value.diag.message_primary
        gw.trail.failing = False
        assert conn.execute("select 2").fetchone() == (2,)


# --- prepared statements and portals ---------------------------------------------------------------


def test_prepared_statements_are_judged_and_recorded_at_every_execution(pg_gateway):
    with pg_gateway() as gw, psycopg.connect(gw.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for value in range(3):
            assert conn.execute("select %s::int + 100", [value]).fetchone() == (100 + value,)
        executions = [e for e in gw.events_of(events.RequestJudged) if e.kind == "execute" and e.statements == ("select $1::int + ?",)]
        assert len(executions) == 3
        assert all(e.parameters and "bytes" in e.parameters[0] for e in executions)  # never the value


def test_a_statement_bastion_did_not_see_prepared_cannot_be_bound(pg_gateway):
    with pg_gateway() as gw, RawClient.connect(gw) as client:
        client.send(Query("prepare sneaky as select 42"))
        client.until_ready()
        client.send(Bind(statement="sneaky"), Execute(), Sync())
        answer = client.until_ready()
        assert answer[0].sqlstate == "26000" and answer[-1].status == "I"
        client.send(Query("execute sneaky"))  # SQL EXECUTE is a statement: judged like any other
        assert of_type(client.until_ready(), DataRow)[0].values == (b"42",)


def test_a_failed_parse_does_not_change_what_a_name_means(pg_gateway):
    """Parse S1 (allowed), then a second Parse S1 that the server rejects as a duplicate: a Bind of
    S1 must still be judged as the statement the server really has."""
    with pg_gateway(policy=GrantAll(refused)) as gw, RawClient.connect(gw) as client:
        client.send(Parse("s1", "select 'first'"), Sync())
        assert isinstance(client.until_ready()[0], ParseComplete)
        client.send(Parse("s1", "select 'second'"), Sync())
        assert client.until_ready()[0].sqlstate == "42P05"
        client.send(Bind(statement="s1"), Execute(), Sync())
        answer = client.until_ready()
        assert of_type(answer, DataRow)[0].values == (b"first",)
        recorded = [e for e in gw.events_of(events.RequestJudged) if e.kind == "execute"]
        assert recorded[-1].statements == ("select ?",)


def test_names_defined_in_an_unanswered_batch_wait_for_its_answer(pg_gateway):
    with pg_gateway(policy=GrantAll(refused)) as gw, RawClient.connect(gw) as client:
        # batch 1 fails before the Parse of s2, so the server never prepares s2;
        # batch 2 (sent at once, before any answer) binds s2 and must be told it does not exist
        client.send(Parse("", "selec broken"), Parse("s2", "select 'two'"), Sync(), Bind(statement="s2"), Execute(), Sync())
        first = client.until_ready()
        assert first[0].sqlstate == "42601"
        second = client.until_ready()
        assert second[0].sqlstate == "26000"


def test_row_limited_portals_suspend_and_resume(pg_gateway):
    with pg_gateway() as gw, RawClient.connect(gw) as client:
        client.send(Query("begin"))
        client.until_ready()
        client.send(Parse("", "select generate_series(1, 5)"), Bind(portal="p"), Describe("P", "p"), Execute("p", 2), Sync())
        first = client.until_ready()
        assert [m.values for m in of_type(first, DataRow)] == [(b"1",), (b"2",)]
        client.send(Execute("p", 0), Sync())
        rest = client.until_ready()
        assert [m.values for m in of_type(rest, DataRow)] == [(b"3",), (b"4",), (b"5",)]
        client.send(Query("commit"))
        client.until_ready()


def test_flush_returns_answers_before_sync(pg_gateway):
    with pg_gateway() as gw, RawClient.connect(gw) as client:
        client.send(Parse("q", "select 1"), Flush())
        assert isinstance(client.read(), ParseComplete)
        client.send(Bind(statement="q"), Execute(), Sync())
        assert of_type(client.until_ready(), DataRow)[0].values == (b"1",)


# --- psycopg features -----------------------------------------------------------------------------


def test_server_side_cursors_fetch_in_pieces(pg_gateway):
    with pg_gateway() as gw, psycopg.connect(gw.dsn()) as conn:
        with conn.cursor(name="big") as cursor:
            cursor.itersize = 7
            cursor.execute("select generate_series(1, 50)")
            assert [row[0] for row in cursor] == list(range(1, 51))


def test_copy_in_and_out_in_text_and_binary(pg_gateway, postgres_server):
    table = fresh_table(postgres_server, "create table {t} (id int, name text)")
    rows = [(i, f"name {i}") for i in range(1000)]
    with pg_gateway() as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        with conn.cursor() as cursor:
            with cursor.copy(f"copy {table} (id, name) from stdin") as copy:
                for row in rows:
                    copy.write_row(row)
            with cursor.copy(f"copy {table} to stdout") as copy:
                assert sorted(copy.rows()) == sorted((str(i), n) for i, n in rows)
            with cursor.copy(f"copy {table} to stdout (format binary)") as copy:
                copy.set_types(["int4", "text"])
                assert sorted(copy.rows()) == sorted(rows)
        assert conn.execute(f"select count(*) from {table}").fetchone() == (1000,)


def test_copy_from_stdin_failure_is_reported_and_the_session_goes_on(pg_gateway, postgres_server):
    table = fresh_table(postgres_server, "create table {t} (id int primary key)")
    with pg_gateway() as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        with pytest.raises(pg_errors.UniqueViolation) as info:
            with conn.cursor().copy(f"copy {table} from stdin") as copy:
                copy.write_row((1,))
                copy.write_row((1,))
        assert "Key (id)=(1) already exists" in info.value.diag.message_detail
        assert conn.execute("select 1").fetchone() == (1,)


def test_cancel_stops_a_running_statement(pg_gateway):
    # libpq's PQcancel blocks holding the GIL: the gateway runs in a process of its own
    with pg_gateway(process="") as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        try:
            with pytest.raises(pg_errors.QueryCanceled):
                conn.execute("select pg_sleep(30)")
        finally:
            timer.cancel()
        assert conn.execute("select 1").fetchone() == (1,)
        forwarded = gw.wait_for(lambda: [e for e in gw.events_of(events.CancelForwarded) if e.outcome == "forwarded"])
        assert forwarded[0].session_id == gw.events_of(events.SessionStarted)[0].session_id


def test_a_cancel_with_a_wrong_key_is_ignored(pg_gateway):
    from bastion.protocols.postgres.codec import encode
    from bastion.protocols.postgres.messages import BackendKeyData, CancelRequest

    with pg_gateway() as gw, RawClient.connect(gw) as client:
        key = of_type(client.login_messages, BackendKeyData)[0]
        wrong = bytes(b ^ 0xFF for b in key.secret_key)
        with RawClient(gw.host, gw.port) as canceller:
            canceller.send(encode(CancelRequest(key.process_id, wrong)))
            assert canceller.read() is None
        gw.wait_for(lambda: [e for e in gw.events_of(events.CancelForwarded) if e.outcome == "unknown-key"])
        client.send(Query("select 1"))
        assert of_type(client.until_ready(), DataRow)[0].values == (b"1",)


def test_the_server_key_never_reaches_the_caller(pg_gateway):
    from bastion.protocols.postgres.messages import BackendKeyData

    with pg_gateway() as gw, RawClient.connect(gw) as client:
        key = of_type(client.login_messages, BackendKeyData)[0]
        client.send(Query("select pg_backend_pid()"))
        assert of_type(client.until_ready(), DataRow)[0].values == (str(key.process_id).encode(),)
        from bastion.plugins.postgres_login import CANCEL_KEYS

        entries = gw.call(lambda: list(gw.gateway.targets["pg"].state[CANCEL_KEYS][key.process_id]))
        assert entries[0].bastion_key == key.secret_key and entries[0].upstream_key != key.secret_key


def test_listen_and_notify_pass_through(pg_gateway):
    with pg_gateway() as gw, psycopg.connect(gw.dsn(), autocommit=True) as listener, psycopg.connect(gw.dsn(), autocommit=True) as sender:
        listener.execute("listen jobs")
        sender.execute("notify jobs, 'done'")
        notification = next(listener.notifies(timeout=10))
        assert (notification.channel, notification.payload) == ("jobs", "done")
        assert notification.pid == sender.info.backend_pid


def test_error_details_reach_the_caller(pg_gateway, postgres_server):
    table = fresh_table(postgres_server, "create table {t} (id int primary key)")
    with pg_gateway() as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        conn.execute(f"insert into {table} values (1)")
        with pytest.raises(pg_errors.UniqueViolation) as info:
            conn.execute(f"insert into {table} values (%s)", [1])
        assert info.value.diag.message_detail == "Key (id)=(1) already exists."
        error = [e for e in gw.events_of(events.ResponseCompleted) if e.error_code == "23505"]
        assert error and error[0].status == "error"
