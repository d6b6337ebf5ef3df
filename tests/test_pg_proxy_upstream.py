"""Bastion's own login upstream: SCRAM (the fixture's default), MD5, cleartext, TLS with a verified
certificate, a server that refuses TLS; and the session's end: shutdown, idle timeout.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest

from bastion.core import events
from tests import servers
from tests.pg_helpers import run_pg_gateway

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


class Upstream:
    """What run_pg_gateway needs of a server: where it is and what Bastion logs in with."""

    def __init__(self, server, user: str, password: str) -> None:
        self.host, self.port, self.bin_dir = server.host, server.port, server.bin_dir
        self.superuser, self.password = user, password


def add_hba_lines(server, lines: str) -> None:
    """Put authentication rules for test roles first in pg_hba.conf and reload."""
    path = server.data_dir / "pg_hba.conf"
    content = path.read_text()
    if lines not in content:
        path.write_text(lines + content)
    server.execute("select pg_reload_conf()")


@pytest.fixture
def md5_and_plain_roles(postgres_server):
    suffix = uuid.uuid4().hex[:8]
    md5_user, plain_user = f"md5_{suffix}", f"plain_{suffix}"
    password = "pw-" + uuid.uuid4().hex
    postgres_server.execute(
        f"set password_encryption = 'md5'; create role {md5_user} login superuser password '{password}';"
        f"reset password_encryption; create role {plain_user} login superuser password '{password}'"
    )
    add_hba_lines(postgres_server, f"host all {md5_user} 127.0.0.1/32 md5\nhost all {plain_user} 127.0.0.1/32 password\n")
    return md5_user, plain_user, password


@pytest.mark.parametrize("method", ["md5", "password"])
def test_bastion_logs_in_with_md5_or_a_cleartext_password(postgres_server, md5_and_plain_roles, tmp_path, method):
    md5_user, plain_user, password = md5_and_plain_roles
    user = md5_user if method == "md5" else plain_user
    with run_pg_gateway(Upstream(postgres_server, user, password), tmp_path) as gw, psycopg.connect(gw.dsn()) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
        method_used = postgres_server.execute(
            f"select count(*) from pg_stat_activity where usename = '{user}' and pid = {conn.info.backend_pid}"
        )
        assert method_used == [(1,)]


def test_a_wrong_scram_password_is_an_upstream_failure(postgres_server, tmp_path):
    with run_pg_gateway(Upstream(postgres_server, postgres_server.superuser, "wrong"), tmp_path) as gw:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(gw.dsn())
        ended = gw.wait_for(lambda: gw.events_of(events.SessionEnded))
        assert ended[0].reason == "upstream unavailable"


@pytest.fixture(scope="module")
def tls_server():
    """A PostgreSQL of its own with TLS on, and the CA that signed its certificate."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    directory = Path(tempfile.mkdtemp(prefix="bastion-pg-tls-"))
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(directory / "server.crt"))
    cert.private_key_pem.write_to_path(str(directory / "server.key"))
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    os.chmod(directory / "server.key", 0o600)
    user = servers._service_user("postgres")
    if user is not None:
        for path in (directory, directory / "server.key", directory / "server.crt"):
            shutil.chown(path, user)
    conf = f"ssl = on\nssl_cert_file = '{directory / 'server.crt'}'\nssl_key_file = '{directory / 'server.key'}'\n"
    with servers.run_postgres(extra_conf=conf) as server:
        yield server, directory / "ca.crt"
    shutil.rmtree(directory, ignore_errors=True)


def test_bastion_reaches_the_upstream_over_verified_tls(tls_server, tmp_path):
    server, ca_file = tls_server
    options = f'upstream_tls = {{ ca = "{ca_file}" }}'
    with run_pg_gateway(server, tmp_path, options=options) as gw, psycopg.connect(gw.dsn()) as conn:
        assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone() == (True,)


def test_an_upstream_certificate_that_does_not_verify_is_refused(tls_server, tmp_path):
    server, _ = tls_server
    other_ca = pytest.importorskip("trustme").CA()
    other_ca.cert_pem.write_to_path(str(tmp_path / "other-ca.crt"))
    options = f'upstream_tls = {{ ca = "{tmp_path / "other-ca.crt"}" }}'
    with run_pg_gateway(server, tmp_path / "gw", options=options) as gw:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(gw.dsn())
        assert "Bastion cannot reach the database server" in str(info.value)
        ended = gw.wait_for(lambda: gw.events_of(events.SessionEnded))
        assert ended[0].reason == "upstream unavailable" and "TLS" in ended[0].error


def test_an_upstream_without_tls_is_refused_when_tls_is_configured(postgres_server, tmp_path):
    pytest.importorskip("trustme").CA().cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    options = f'upstream_tls = {{ ca = "{tmp_path / "ca.crt"}" }}'
    with run_pg_gateway(postgres_server, tmp_path / "gw", options=options) as gw:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(gw.dsn())
        ended = gw.wait_for(lambda: gw.events_of(events.SessionEnded))
        assert "does not accept TLS" in ended[0].error


# --- the end of a session ------------------------------------------------------------------------


def test_shutdown_says_goodbye_with_admin_shutdown(postgres_server, tmp_path):
    with run_pg_gateway(postgres_server, tmp_path, gateway_extra='shutdown_grace = "0s"') as gw:
        conn = psycopg.connect(gw.dsn(), autocommit=True)
        pid = conn.info.backend_pid
        assert conn.execute("select 1").fetchone() == (1,)
        gw.call(gw.gateway.shutdown, "test shutdown")
        ended = gw.wait_for(lambda: gw.events_of(events.SessionEnded))
        assert ended[0].reason == "gateway shutdown"
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert getattr(info.value, "sqlstate", None) == "57P01" or "administrator command" in str(info.value)
        conn.close()
    assert not postgres_server.execute(f"select 1 from pg_stat_activity where pid = {pid}")


def test_an_idle_session_is_ended_after_the_target_idle_timeout(postgres_server, tmp_path):
    with run_pg_gateway(postgres_server, tmp_path, options='idle_timeout = "1s"') as gw:
        conn = psycopg.connect(gw.dsn(), autocommit=True)
        ended = gw.wait_for(lambda: [e for e in gw.events_of(events.SessionEnded) if e.reason == "idle timeout"])
        assert ended
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert "idle-session timeout" in str(info.value) or info.value.sqlstate == "57P05"
        conn.close()


def test_parameter_status_changes_reach_the_caller(postgres_server, tmp_path):
    with run_pg_gateway(postgres_server, tmp_path) as gw, psycopg.connect(gw.dsn(), autocommit=True) as conn:
        conn.execute("set application_name = 'renamed'")
        assert conn.info.parameter_status("application_name") == "renamed"
        conn.execute("set timezone = 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"


def test_an_unsupported_client_encoding_set_mid_session_ends_it_with_a_reason(postgres_server, tmp_path):
    with run_pg_gateway(postgres_server, tmp_path) as gw:
        with psycopg.connect(gw.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="client_encoding LATIN1 is not supported through Bastion"):
                conn.execute("set client_encoding to latin1")
        with psycopg.connect(gw.dsn(), autocommit=True) as other:  # the gateway goes on
            assert other.execute("select 1").fetchone() == (1,)
        ended = gw.wait_for(lambda: [e for e in gw.events_of(events.SessionEnded) if "client_encoding" in e.reason])
        assert "LATIN1" in ended[0].reason
