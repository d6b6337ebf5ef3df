"""A session whose token expires is ended at expiry, with a FATAL error, and that is recorded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import psycopg
import pytest

from tests.gateway_helpers import bastion_serve
from tests.servers import free_port

AUDIENCE = "https://bastion.test"


def test_the_session_ends_when_the_token_expires(tmp_path, postgres_server, issuer):
    port, admin = free_port(), free_port()
    (tmp_path / "db-password").write_text(postgres_server.password)
    (tmp_path / "grants.toml").write_text(
        textwrap.dedent(
            """
            [[grant]]
            name = "ci"
            identities = { subjects = ["repo:acme/etl:*"] }
            targets = ["db"]
            statements = ["select"]
            """
        )
    )
    config = tmp_path / "bastion.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            state_dir = "state"
            admin_listen = "127.0.0.1:{admin}"
            policies = ["grants.toml"]

            [[identity]]
            kind = "oidc"
            name = "github"
            issuer = "{issuer.github.issuer_url}"
            audience = "{AUDIENCE}"
            subject_template = "repo:{{repository}}:ref:{{ref}}"
            ci_claims = ["repository", "run_id"]
            leeway = "1s"

            [[targets]]
            name = "db"
            protocol = "postgres"
            listen = "127.0.0.1:{port}"
            upstream = "{postgres_server.host}:{postgres_server.port}"
            database = "postgres"
            allow_plaintext_auth = true
            [targets.credentials]
            user = "postgres"
            password = {{ file = "db-password" }}
            """
        )
    )
    lifetime = 4
    token = issuer.github.mint({"aud": AUDIENCE, "sub": "repo:acme/etl:ref:refs/heads/main", "repository": "acme/etl", "ref": "refs/heads/main", "run_id": "42"}, lifetime=lifetime)
    expires = time.time() + lifetime
    with bastion_serve(config, admin):
        conn = psycopg.connect(host="127.0.0.1", port=port, user="etl", password=token, dbname="postgres", sslmode="disable", autocommit=True)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        time.sleep(max(0.0, expires - time.time()) + 1.0)
        with pytest.raises(psycopg.OperationalError) as ended:
            conn.execute("SELECT 2")
        assert "credential expired" in str(ended.value)
        conn.close()
        with pytest.raises(psycopg.OperationalError):  # and the expired token no longer gets in
            psycopg.connect(host="127.0.0.1", port=port, user="etl", password=token, dbname="postgres", sslmode="disable")
    listing = subprocess.run([sys.executable, "-m", "bastion.core.cli", "audit", "export", "-c", str(config), "--format", "jsonl"], capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in listing.stdout.splitlines()]
    started = [r["event"] for r in records if r["type"] == "session-started"]
    assert started[0]["identity"]["subject"] == "repo:acme/etl:ref:refs/heads/main"
    assert started[0]["identity"]["ci"] == {"repository": "acme/etl", "run_id": "42"}
    ended_events = [r["event"] for r in records if r["type"] == "session-ended"]
    assert [e["reason"] for e in ended_events if e["session_id"] == started[0]["session_id"]] == ["credential expired"]
    failed = [r["event"] for r in records if r["type"] == "authentication-failed"]
    assert failed and "expired" in failed[-1]["reason"]
