"""A session whose token expires is ended at expiry (plus ``gateway.expiry_grace``), with a FATAL
error, and that is recorded; the identity a real OIDC token yields is recorded field by field."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime

import jwt
import psycopg
import pytest

from tests.gateway_helpers import bastion_serve, write_oidc_postgres_config
from tests.servers import free_port

AUDIENCE = "https://bastion.test"
SUBJECT = "repo:acme/etl:ref:refs/heads/main"


def write_config(directory, postgres_server, issuer, *, gateway_extra: str = ""):
    """A postgres target behind the test issuer's GitHub-shaped OIDC provider; (config, port, admin)."""
    port, admin = free_port(), free_port()
    (directory / "db-password").write_text(postgres_server.password)
    config = write_oidc_postgres_config(
        directory,
        postgres_server,
        issuer.github.issuer_url,
        AUDIENCE,
        listen=f"127.0.0.1:{port}",
        admin_listen=f"127.0.0.1:{admin}",
        gateway_extra=gateway_extra,
        identity_extra='leeway = "1s"',
    )
    return config, port, admin


def mint(issuer, lifetime: int) -> str:
    claims = {"aud": AUDIENCE, "sub": SUBJECT, "repository": "acme/etl", "ref": "refs/heads/main", "run_id": "42", "teams": ["etl", "phi-readers"]}
    return issuer.github.mint(claims, lifetime=lifetime)


def connect(port: int, token: str) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, user="etl", password=token, dbname="postgres", sslmode="disable", autocommit=True, connect_timeout=10)


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def audit_records(config) -> list[dict]:
    listing = subprocess.run([sys.executable, "-m", "bastion.core.cli", "audit", "export", "-c", str(config), "--format", "jsonl"], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in listing.stdout.splitlines()]


def events_of(records: list[dict], kind: str) -> list[dict]:
    return [r["event"] for r in records if r["type"] == kind]


def test_the_session_ends_when_the_token_expires(tmp_path, postgres_server, issuer):
    config, port, admin = write_config(tmp_path, postgres_server, issuer)
    with bastion_serve(config, admin):
        # minted once the gateway listens: a slow start must not eat the token's short life
        token = mint(issuer, lifetime=5)
        claims = jwt.decode(token, options={"verify_signature": False})
        conn = connect(port, token)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        sleep_until(claims["exp"] + 1.0)
        with pytest.raises(psycopg.OperationalError) as ended:
            conn.execute("SELECT 2")
        assert "credential expired" in str(ended.value)
        conn.close()
        with pytest.raises(psycopg.OperationalError):  # and the expired token no longer gets in
            connect(port, token)
    records = audit_records(config)
    (started,) = events_of(records, "session-started")
    assert started["identity"] == {
        "provider": "github",
        "subject": SUBJECT,
        "issuer": issuer.github.issuer_url,
        "groups": ["etl", "phi-readers"],
        "auth_method": "jwt",
        "token_id": claims["jti"],
        "expires_at": datetime.fromtimestamp(claims["exp"], UTC).isoformat(),
        "ci": {"repository": "acme/etl", "run_id": "42"},
    }
    ended_events = events_of(records, "session-ended")
    assert [e["reason"] for e in ended_events if e["session_id"] == started["session_id"]] == ["credential expired"]
    failed = events_of(records, "authentication-failed")
    assert failed and "expired" in failed[-1]["reason"]


def test_the_session_outlives_its_token_by_the_expiry_grace_then_ends(tmp_path, postgres_server, issuer):
    grace = 6
    config, port, admin = write_config(tmp_path, postgres_server, issuer, gateway_extra=f'expiry_grace = "{grace}s"')
    with bastion_serve(config, admin):
        token = mint(issuer, lifetime=3)
        expires = jwt.decode(token, options={"verify_signature": False})["exp"]
        conn = connect(port, token)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        sleep_until(expires + 1.0)
        # the token is dead, the session is not: it is inside the grace
        assert conn.execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.OperationalError):  # the grace keeps a session, it admits no one
            connect(port, token)
        sleep_until(expires + grace + 1.0)
        with pytest.raises(psycopg.OperationalError) as ended:
            conn.execute("SELECT 3")
        assert "credential expired" in str(ended.value)
        conn.close()
    records = audit_records(config)
    started = [e for e in events_of(records, "session-started") if e["decision"] == "allow"]
    assert len(started) == 1
    (ended_event,) = [e for e in events_of(records, "session-ended") if e["session_id"] == started[0]["session_id"]]
    assert ended_event["reason"] == "credential expired"
    assert ended_event["requests"] == 2  # SELECT 1 and SELECT 2; SELECT 3 never ran
    # not ended before the grace was up (the deadline is set from the wall clock; allow for the
    # few milliseconds between reading it and arming the timer)
    assert ended_event["at"] >= expires + grace - 0.25
