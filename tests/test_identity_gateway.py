"""Identity and credentials through a running PostgreSQL gateway, in this process so plugins can
watch: what ``bastion_authorize`` sees of the caller, and the upstream password resolved at each
connect (a ``bastion_resolve_secret`` plugin, a ``{ file = ... }`` reference), rotated on the
real server with no restart."""

from __future__ import annotations

import uuid
from functools import partial
from pathlib import Path

import jwt
import psycopg
import pytest
import trio

from bastion.core import events
from bastion.core.hookspecs import hookimpl
from tests.gateway_helpers import running_gateway, write_oidc_postgres_config

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

AUDIENCE = "https://bastion.test"
SUBJECT = "repo:acme/etl:ref:refs/heads/main"
# every test below is a handful of connections; this is a safety net, not a measurement
DEADLINE = 60


def write_config(directory: Path, server, issuer, *, user: str, password: str) -> Path:
    """A postgres target logging in upstream as ``user`` with the ``password`` reference (TOML)."""
    return write_oidc_postgres_config(directory, server, issuer.github.issuer_url, AUDIENCE, user=user, password=password)


def mint(issuer) -> str:
    claims = {"aud": AUDIENCE, "sub": SUBJECT, "repository": "acme/etl", "ref": "refs/heads/main", "run_id": "7", "teams": ["etl"]}
    return issuer.github.mint(claims)


def run_query(address, token: str, sql: str):
    """Connect through the gateway, run one query, hang up (blocking: call it in a thread)."""
    dsn = dict(host=address.host, port=address.port, user="etl", password=token, dbname="postgres", sslmode="disable", connect_timeout=10)
    with psycopg.connect(**dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchone()


async def query(gateway, token: str, sql: str):
    return await trio.to_thread.run_sync(partial(run_query, gateway.addresses["db"], token, sql))


class Watcher:
    """Sees every ``bastion_authorize`` call (and abstains) and every recorded event."""

    def __init__(self) -> None:
        self.authorized: list[tuple[str, object]] = []
        self.events: list[events.AuditEvent] = []

    @hookimpl
    def bastion_authorize(self, session, request):
        self.authorized.append((request.action, session.identity))
        return None

    @hookimpl
    def bastion_record(self, event):
        self.events.append(event)

    def of(self, cls: type) -> list:
        return [e for e in self.events if isinstance(e, cls)]


async def test_authorize_hooks_see_the_identity_the_session_record_holds(tmp_path, postgres_server, issuer):
    (tmp_path / "db.pw").write_text(postgres_server.password)
    config = write_config(tmp_path, postgres_server, issuer, user=postgres_server.superuser, password='{ file = "db.pw" }')
    watcher = Watcher()
    token = mint(issuer)
    claims = jwt.decode(token, options={"verify_signature": False})
    with trio.fail_after(DEADLINE):
        async with running_gateway(config, extra_plugins=[watcher]) as gateway:
            assert await query(gateway, token, "select 41 + 1") == (42,)
    (started,) = watcher.of(events.SessionStarted)
    identity = started.identity
    assert (identity.provider, identity.issuer, identity.subject) == ("github", issuer.github.issuer_url, SUBJECT)
    assert identity.groups == frozenset({"etl"}) and identity.auth_method == "jwt"
    assert identity.token_id == claims["jti"] and identity.expires_at.timestamp() == claims["exp"]
    assert identity.ci == {"repository": "acme/etl", "run_id": "7"}
    actions = [action for action, _ in watcher.authorized]
    assert actions[0] == "connect" and "select" in actions
    assert all(seen == identity for _, seen in watcher.authorized)


class Vault:
    """A vault plugin: resolves ``{ testvault = "..." }`` references to whatever it holds now."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.asked: list[tuple[str, str]] = []  # (reference, the value it answered)

    @hookimpl
    def bastion_resolve_secret(self, reference):
        if reference.kind != "testvault":
            return None
        self.asked.append((reference.value, self.value))
        return self.value


@pytest.fixture
def rotating_role(postgres_server):
    """A login role of its own (the shared superuser's password must not change); dropped after."""
    name = f"bastion_rot_{uuid.uuid4().hex[:8]}"
    postgres_server.execute(f"create role {name} login password 'first-{name}'")
    yield name
    postgres_server.execute(f"select pg_terminate_backend(pid) from pg_stat_activity where usename = '{name}'")
    postgres_server.execute(f"drop role {name}")


async def test_the_resolve_secret_hook_is_asked_at_every_connect(tmp_path, postgres_server, issuer, rotating_role):
    role = rotating_role
    vault = Vault(f"first-{role}")
    config = write_config(tmp_path, postgres_server, issuer, user=role, password='{ testvault = "db/clinic#password" }')
    token = mint(issuer)
    with trio.fail_after(DEADLINE):
        async with running_gateway(config, extra_plugins=[vault]) as gateway:
            assert await query(gateway, token, "select current_user") == (role,)
            asked_first = len(vault.asked)
            assert asked_first >= 1 and set(vault.asked) == {("db/clinic#password", f"first-{role}")}

            await trio.to_thread.run_sync(postgres_server.execute, f"alter role {role} password 'second-{role}'")
            # the vault still answers the old password: the server refuses Bastion's login, which
            # shows the server really rotated and the gateway kept nothing from the last connect
            with pytest.raises(psycopg.OperationalError, match="refused Bastion's own login"):
                await query(gateway, token, "select 1")
            assert len(vault.asked) > asked_first

            vault.value = f"second-{role}"  # the vault rotates too; no restart
            asked_before = len(vault.asked)
            assert await query(gateway, token, "select current_user") == (role,)
            assert vault.asked[asked_before:] and all(value == f"second-{role}" for _, value in vault.asked[asked_before:])


async def test_a_rewritten_password_file_is_read_at_the_next_connect(tmp_path, postgres_server, issuer, rotating_role):
    role = rotating_role
    secret_file = tmp_path / "role.pw"
    secret_file.write_text(f"first-{role}\n")
    config = write_config(tmp_path, postgres_server, issuer, user=role, password='{ file = "role.pw" }')
    token = mint(issuer)
    with trio.fail_after(DEADLINE):
        async with running_gateway(config) as gateway:
            assert await query(gateway, token, "select current_user") == (role,)
            await trio.to_thread.run_sync(postgres_server.execute, f"alter role {role} password 'second-{role}'")
            with pytest.raises(psycopg.OperationalError, match="refused Bastion's own login"):
                await query(gateway, token, "select 1")
            secret_file.write_text(f"second-{role}\n")
            assert await query(gateway, token, "select current_user") == (role,)
