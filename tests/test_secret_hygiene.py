"""A planted secret never shows: not in logs, records, errors, reprs, nor `bastion check` output."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import psycopg
import pytest

from bastion.core.loading import load
from tests.servers import free_port

BASTION = [sys.executable, "-m", "bastion.core.cli"]
UPSTREAM_SECRET = "Upstr3am-Planted-Secret-9f2c41"
PHI = "078-05-1121"  # never sent raw to anything but the database


def _everything_under(directory: Path) -> bytes:
    """Every file's bytes, and for compressed ones their inflated bytes too."""
    blobs = []
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            blobs.append(data)
            for opener in (gzip.decompress, zlib.decompress):
                try:
                    blobs.append(opener(data))
                except Exception:
                    pass
    return b"\n".join(blobs)


@pytest.fixture
def deployment(tmp_path, postgres_server):
    postgres_server.execute(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hygiene') THEN CREATE ROLE hygiene LOGIN PASSWORD '{UPSTREAM_SECRET}'; END IF; END $$"
    )
    (tmp_path / "db-password").write_text(UPSTREAM_SECRET + "\n")
    (tmp_path / "grants.toml").write_text(
        textwrap.dedent(
            """
            [[grant]]
            name = "jobs"
            identities = { groups = ["jobs"] }
            targets = ["db"]
            statements = ["select"]
            """
        )
    )
    port, admin = free_port(), free_port()
    config = tmp_path / "bastion.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            state_dir = "state"
            admin_listen = "127.0.0.1:{admin}"
            policies = ["grants.toml"]
            log_level = "debug"

            [[identity]]
            kind = "static-token"
            tokens_file = "tokens.toml"

            [[targets]]
            name = "db"
            protocol = "postgres"
            listen = "127.0.0.1:{port}"
            upstream = "{postgres_server.host}:{postgres_server.port}"
            database = "postgres"
            allow_plaintext_auth = true
            [targets.credentials]
            user = "hygiene"
            password = {{ file = "db-password" }}
            """
        )
    )
    return config, port, admin


def test_planted_secrets_and_tokens_never_leak(deployment, tmp_path):
    config, port, admin = deployment
    outputs: list[str] = []
    minted = subprocess.run([*BASTION, "tokens", "add", "-c", str(config), "ci-job", "--groups", "jobs"], capture_output=True, text=True, check=True)
    token = minted.stdout.strip().splitlines()[-1]
    outputs.append(minted.stderr)
    outputs.append("\n".join(minted.stdout.strip().splitlines()[:-1]))  # everything but the key itself
    check = subprocess.run([*BASTION, "check", "-c", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    outputs += [check.stdout, check.stderr]

    server = subprocess.Popen([*BASTION, "--log-level", "debug", "serve", "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", admin), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        dsn = dict(host="127.0.0.1", port=port, user="ci-job", dbname="postgres", sslmode="disable")
        with psycopg.connect(**dsn, password=token, autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("hygiene",)
            assert conn.execute(f"SELECT '{PHI}' AS note").fetchone() == (PHI,)  # the caller may see its own literal
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                conn.execute(f"DELETE FROM pg_class WHERE relname = '{PHI}'")
            outputs.append(str(refused.value))
            with pytest.raises(psycopg.Error) as failed:
                conn.execute("SELECT * FROM no_such_table")
            outputs.append(str(failed.value))
        with pytest.raises(psycopg.OperationalError) as wrong:
            psycopg.connect(**dsn, password=token[:-4] + "AAAA")
        outputs.append(str(wrong.value))
        with pytest.raises(psycopg.OperationalError) as upstream_secret_as_token:
            psycopg.connect(**dsn, password=UPSTREAM_SECRET)
        outputs.append(str(upstream_secret_as_token.value))
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
    outputs += [out, err]
    assert server.returncode == 0, err
    assert "28P01" in outputs[-4] or "authentication failed" in outputs[-4]

    export = subprocess.run([*BASTION, "audit", "export", "-c", str(config), "--format", "jsonl"], capture_output=True, text=True, check=True)
    replay = subprocess.run([*BASTION, "sessions", "list", "-c", str(config), "--json"], capture_output=True, text=True, check=True)
    outputs += [export.stdout, replay.stdout]
    assert '"ci-job"' in export.stdout  # the trail does hold the session

    loaded = load(config)
    outputs += [repr(loaded.config), str(loaded.config), repr(loaded.policy)]

    text = "\n".join(outputs)
    stored = _everything_under(tmp_path / "state")
    for secret in (UPSTREAM_SECRET, token, token.split("_")[-1]):
        assert secret not in text
        assert secret.encode() not in stored
    assert PHI not in export.stdout and PHI.encode() not in stored
    tokens_file = (tmp_path / "tokens.toml").read_text()
    assert token not in tokens_file and token.split("_")[-1] not in tokens_file
