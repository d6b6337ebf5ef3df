"""Bad input and bad peers: garbage, truncated and oversized messages, messages out of order,
clients that vanish mid-result or stop reading. Each must end only its own session, close the
upstream connection, and leave a record of why.
"""

from __future__ import annotations

import socket
import struct
import time

import psycopg
import pytest

from bastion.core import events
from bastion.plugins.identity_static import add_key
from bastion.protocols.postgres.codec import encode
from bastion.protocols.postgres.messages import (
    BackendKeyData,
    DataRow,
    ErrorResponse,
    PasswordMessage,
    Query,
    StartupMessage,
)
from tests.pg_helpers import SUBJECT, TOKEN, RawClient, of_type, pg_gateway  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

# how long the upstream backend of a broken session may take to go away
GONE_TIMEOUT = 20


def backend_gone(server, pid: int) -> bool:
    return not server.execute(f"select 1 from pg_stat_activity where pid = {pid}")


def wait_until(predicate, timeout: float = GONE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def ended_because(gw, fragment: str) -> events.SessionEnded:
    ended = gw.wait_for(lambda: [e for e in gw.events_of(events.SessionEnded) if fragment in e.reason])
    return ended[0]


@pytest.fixture
def bystander():
    """A healthy session kept open alongside the broken ones: it must not notice them."""
    connections = []

    def open_(gw):
        conn = psycopg.connect(gw.dsn(), autocommit=True)
        connections.append(conn)
        return conn

    yield open_
    for conn in connections:
        conn.close()


def test_garbage_instead_of_a_startup_packet(pg_gateway, bystander):
    with pg_gateway() as gw:
        healthy = bystander(gw)
        with socket.create_connection((gw.host, gw.port), timeout=10) as sock:
            sock.sendall(b"\x00\x00\x00\x08garbage!" + b"\xff" * 64)
            reply = sock.recv(4096)
            assert reply[:1] in (b"E", b"")  # a FATAL error, then the gateway hangs up
            assert sock.recv(4096) == b""
        ended_because(gw, "protocol error")
        assert healthy.execute("select 1").fetchone() == (1,)


def test_an_absurd_message_length_is_refused_before_reading_it(pg_gateway, bystander):
    with pg_gateway() as gw, RawClient.connect(gw) as client:
        healthy = bystander(gw)
        pid = of_type(client.login_messages, BackendKeyData)[0].process_id
        client.send(b"Q" + struct.pack(">i", 0x7FFFFFF0))  # a 2 GiB query that never comes
        error = client.read()
        assert isinstance(error, ErrorResponse) and error.severity == "FATAL" and error.sqlstate == "54000"
        assert client.read() is None
        wait_until(lambda: backend_gone(gw.server, pid))
        ended_because(gw, "protocol error")
        assert healthy.execute("select 1").fetchone() == (1,)


def test_an_invalid_message_type_is_a_protocol_violation(pg_gateway):
    with pg_gateway() as gw, RawClient.connect(gw) as client:
        pid = of_type(client.login_messages, BackendKeyData)[0].process_id
        client.send(b"R\x00\x00\x00\x08\x00\x00\x00\x00")  # a server's message, from a client
        error = client.read()
        assert isinstance(error, ErrorResponse) and error.sqlstate == "08P01"
        assert client.read() is None
        wait_until(lambda: backend_gone(gw.server, pid))


def test_a_password_message_after_login_is_out_of_order(pg_gateway):
    with pg_gateway() as gw, RawClient.connect(gw) as client:
        client.send(PasswordMessage("again"))
        error = client.read()
        assert isinstance(error, ErrorResponse) and error.sqlstate == "08P01"
        assert client.read() is None


def test_a_second_startup_packet_is_a_protocol_violation(pg_gateway):
    with pg_gateway() as gw, RawClient.connect(gw) as client:
        client.send(StartupMessage(parameters=(("user", SUBJECT),)))
        error = client.read()
        assert isinstance(error, ErrorResponse) and error.sqlstate == "08P01"


def test_a_truncated_message_and_a_hang_up(pg_gateway, bystander):
    with pg_gateway() as gw:
        healthy = bystander(gw)
        client = RawClient.connect(gw)
        pid = of_type(client.login_messages, BackendKeyData)[0].process_id
        client.send(encode(Query("select 1"))[:-3])  # the end of the message never comes
        client.close()
        wait_until(lambda: backend_gone(gw.server, pid))
        ended = ended_because(gw, "")
        assert ended.reason
        assert healthy.execute("select 1").fetchone() == (1,)


def test_a_client_that_vanishes_mid_result_ends_its_upstream(pg_gateway, bystander):
    with pg_gateway() as gw:
        healthy = bystander(gw)
        client = RawClient.connect(gw)
        pid = of_type(client.login_messages, BackendKeyData)[0].process_id
        client.send(Query("select repeat('x', 100) from generate_series(1, 5000000)"))
        for _ in range(100):
            assert client.read() is not None
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset, in the middle of the rows
        wait_until(lambda: backend_gone(gw.server, pid))
        gw.wait_for(lambda: gw.events_of(events.SessionEnded))
        assert healthy.execute("select 2").fetchone() == (2,)


def test_a_client_that_stops_reading_stalls_the_server_not_the_gateway(pg_gateway, bystander):
    """Backpressure: the server ends up blocked writing to Bastion (wait event ClientWrite),
    because Bastion stops reading it when the caller stops reading Bastion."""
    with pg_gateway() as gw:
        healthy = bystander(gw)
        client = RawClient.connect(gw)
        pid = of_type(client.login_messages, BackendKeyData)[0].process_id
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.send(Query("select repeat('x', 1000) from generate_series(1, 1000000)"))  # ~1 GB
        wait_until(lambda: gw.server.execute(f"select wait_event from pg_stat_activity where pid = {pid}") == [("ClientWrite",)])
        assert healthy.execute("select 3").fetchone() == (3,)
        # reading again lets the rows flow
        rows = 0
        while rows < 100:
            message = client.read()
            assert message is not None
            rows += isinstance(message, DataRow)
        client.close()
        wait_until(lambda: backend_gone(gw.server, pid))


def test_a_client_that_never_logs_in_is_timed_out(pg_gateway):
    with pg_gateway(gateway_extra='handshake_timeout = "1s"') as gw:
        with socket.create_connection((gw.host, gw.port), timeout=10) as sock:
            sock.sendall(encode(StartupMessage(parameters=(("user", SUBJECT),)))[:5])  # and nothing more
            assert sock.recv(4096)[:1] in (b"E", b"")
        ended_because(gw, "timed out")


def test_upstream_unavailable_is_reported_to_the_caller(pg_gateway, postgres_server, tmp_path):
    from tests.pg_helpers import run_pg_gateway
    from tests.servers import free_port

    class Nowhere:
        host = postgres_server.host
        port = free_port()  # nothing listens here
        superuser = postgres_server.superuser
        password = postgres_server.password
        bin_dir = postgres_server.bin_dir

    with run_pg_gateway(Nowhere, tmp_path / "nowhere") as gw:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(gw.dsn())
        assert "Bastion cannot reach the database server" in str(info.value)
        ended_because(gw, "upstream unavailable")


def test_a_wrong_upstream_password_does_not_reveal_the_service_account(pg_gateway, postgres_server, tmp_path):
    from tests.pg_helpers import run_pg_gateway

    class WrongPassword:
        host = postgres_server.host
        port = postgres_server.port
        superuser = postgres_server.superuser
        password = "not-the-password"
        bin_dir = postgres_server.bin_dir

    with run_pg_gateway(WrongPassword, tmp_path / "wrong") as gw:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(gw.dsn())
        message = str(info.value)
        assert "refused Bastion's own login" in message and postgres_server.superuser not in message.split("failed:", 1)[-1]
        assert TOKEN not in message


# --- bad tokens ----------------------------------------------------------------------------------
# The real providers sit in front of the helper's test tokens: a static-token file and an OIDC
# issuer (tests/issuer.py), so each bad token is refused by a provider for a specific reason.

GENERIC_REFUSAL = f'password authentication failed for user "{SUBJECT}"'


def real_identity_sections(tokens_file, issuer_url: str) -> str:
    """``[[identity]]`` sections for ``pg_gateway(gateway_extra=...)``: TOML lets them come
    before the helper's own ``test-tokens`` section, so they are asked first."""
    return f"""
[[identity]]
kind = "static-token"
name = "keys"
tokens_file = "{tokens_file}"

[[identity]]
kind = "oidc"
name = "github"
issuer = "{issuer_url}"
audience = "https://bastion.test"
"""


def at_least(count: int, found):
    """For ``gw.wait_for``: ``found()`` once it holds ``count`` items, else None."""
    return lambda: (lambda items: items if len(items) >= count else None)(found())


def refusal_over_the_wire(gw, token: str):
    """Log in with ``token`` as a raw client: the one message the gateway answers, then whether it hung up."""
    with RawClient(gw.host, gw.port) as client:
        client.send(StartupMessage(parameters=(("user", SUBJECT), ("database", "postgres"))))
        client.read()  # AuthenticationCleartextPassword
        client.sock.sendall(b"p" + struct.pack(">i", 4 + len(token) + 1) + token.encode() + b"\x00")
        answer = client.read()
        return answer, client.read() is None


@pytest.mark.parametrize(
    ("case", "token", "provider", "reason"),
    [
        ("malformed API key", "bst_0123456789ab_tooshort", "keys", "keys: malformed API key (bst_ prefix, wrong shape)"),
        ("20 KB token", "eyJ" + "A" * (20 * 1024), "github", "the token is larger than 16384 bytes"),
    ],
)
def test_a_bad_token_gets_only_the_generic_authentication_error(pg_gateway, issuer, tmp_path, bystander, case, token, provider, reason):
    add_key(tmp_path / "tokens.toml", "svc-backup", ["backup"])
    with pg_gateway(gateway_extra=real_identity_sections(tmp_path / "tokens.toml", issuer.github.issuer_url)) as gw:
        healthy = bystander(gw)
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(gw.dsn(token))
        said = str(info.value)
        assert said.endswith(f"FATAL:  {GENERIC_REFUSAL}"), said
        for detail in ("malformed", "larger", "16384", "bst_", token[:40]):
            assert detail not in said

        answer, hung_up = refusal_over_the_wire(gw, token)
        assert isinstance(answer, ErrorResponse)
        assert (answer.severity, answer.sqlstate, answer.message) == ("FATAL", "28P01", GENERIC_REFUSAL)
        assert answer.detail is None and answer.hint is None
        assert hung_up

        failures = gw.wait_for(at_least(2, lambda: gw.events_of(events.AuthenticationFailed)))
        assert [(e.client_user, e.provider, e.reason) for e in failures] == [(SUBJECT, provider, reason)] * 2, case
        for event in gw.events:
            assert token not in repr(event)
        # the gateway is still up: the open session and a new one both work
        assert healthy.execute("select 1").fetchone() == (1,)
        with psycopg.connect(gw.dsn()) as conn:
            assert conn.execute("select 2").fetchone() == (2,)


def test_a_token_beyond_the_password_message_limit_is_refused_without_echo(pg_gateway, issuer, tmp_path, bystander):
    """70 KB: more than PostgreSQL's limit for a password message (MAX_PASSWORD_MESSAGE_LENGTH),
    so the codec refuses it before any provider sees it. The gateway must hang up on this caller
    only, never echo the token, and record why."""
    from bastion.protocols.postgres.framing import MAX_PASSWORD_MESSAGE_LENGTH

    token = "eyJ" + "B" * (70 * 1024)
    add_key(tmp_path / "tokens.toml", "svc-backup", ["backup"])
    assert len(token) > MAX_PASSWORD_MESSAGE_LENGTH
    with pg_gateway(gateway_extra=real_identity_sections(tmp_path / "tokens.toml", issuer.github.issuer_url)) as gw:
        healthy = bystander(gw)
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(gw.dsn(token))
        assert token[:40] not in str(info.value)
        answer, hung_up = refusal_over_the_wire(gw, token)
        assert answer is None or (isinstance(answer, ErrorResponse) and answer.severity == "FATAL" and token[:40] not in str(answer.fields))
        assert hung_up
        gw.wait_for(at_least(2, lambda: [e for e in gw.events_of(events.AuthenticationFailed) if "65535" in e.reason]))
        for event in gw.events:
            assert token[:40] not in repr(event)
        assert healthy.execute("select 1").fetchone() == (1,)
        with psycopg.connect(gw.dsn()) as conn:
            assert conn.execute("select 2").fetchone() == (2,)


def test_a_token_beyond_the_password_message_limit_is_an_authentication_failure(pg_gateway, issuer, tmp_path):
    """What issue 4 asks of a huge token: the protocol's authentication error (or a plain hang-up,
    as PostgreSQL itself does), and an AuthenticationFailed record with the reason."""
    token = "eyJ" + "C" * (70 * 1024)
    add_key(tmp_path / "tokens.toml", "svc-backup", ["backup"])
    with pg_gateway(gateway_extra=real_identity_sections(tmp_path / "tokens.toml", issuer.github.issuer_url)) as gw:
        answer, hung_up = refusal_over_the_wire(gw, token)
        assert hung_up
        assert answer is None or (answer.sqlstate, answer.message) == ("28P01", GENERIC_REFUSAL)
        (failed,) = gw.wait_for(lambda: gw.events_of(events.AuthenticationFailed))
        assert failed.client_user == SUBJECT and "65535" in failed.reason
