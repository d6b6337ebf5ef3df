"""The ``[approvals]`` section: defaults, every key, and located errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bastion.core.approvals_store import PostgresStore, SqliteStore, build_store
from bastion.core.config import ConfigError, Registry, load_config
from bastion.core.hooks import Hooks
from bastion.core.plugins import build_plugin_manager
from bastion.core.secrets import SecretRef

MINIMAL = """
[[targets]]
name = "raw"
protocol = "tcp"
listen = "127.0.0.1:7000"
upstream = "127.0.0.1:7001"
"""


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Hooks(build_plugin_manager(entry_points=False)).registry()


def load_text(tmp_path: Path, text: str, registry: Registry):
    path = tmp_path / "bastion.toml"
    path.write_text(textwrap.dedent(MINIMAL + text))
    return load_config(path, registry)


def errors_of(tmp_path: Path, text: str, registry: Registry) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, registry)
    return info.value.errors


def test_without_a_section_approvals_use_sqlite_in_the_state_directory(tmp_path, registry):
    config = load_text(tmp_path, "", registry)
    approvals = config.approvals
    assert approvals.enabled and approvals.store == "sqlite" and approvals.path is None
    assert approvals.default_timeout == 900 and approvals.admin_groups == () and approvals.webhooks == ()
    store = build_store(config, lambda ref: None)
    assert isinstance(store, SqliteStore) and store.path == tmp_path.resolve() / "var" / "approvals.sqlite"


def test_every_key(tmp_path, registry):
    config = load_text(
        tmp_path,
        """
        [approvals]
        store = "postgres"
        default_timeout = "10m"
        admin_groups = ["security-admins"]
        public_url = "https://bastion.example.org:8700"
        notice = "held as {id}; approve with {cli} or {http} before {expires}"
        reminder_interval = "2m"
        poll_interval = "250ms"

        [approvals.postgres]
        host = "db.internal"
        port = 5433
        dbname = "bastion"
        user = "bastion_approvals"
        password = { env = "APPROVALS_DB_PASSWORD" }
        sslmode = "verify-full"
        table_prefix = "clinic_approval"

        [[approvals.webhooks]]
        url = "https://hooks.example.org/bastion"
        secret = { file = "webhook.secret" }
        events = ["requested", "denied"]
        max_attempts = 3
        """,
        registry,
    )
    approvals = config.approvals
    assert approvals.default_timeout == 600 and approvals.reminder_interval == 120 and approvals.poll_interval == 0.25
    assert approvals.postgres.password == SecretRef("env", "APPROVALS_DB_PASSWORD")
    (webhook,) = approvals.webhooks
    assert webhook.events == ("requested", "denied") and webhook.secret.kind == "file" and webhook.max_attempts == 3
    store = build_store(config, lambda ref: None)
    assert isinstance(store, PostgresStore) and store.prefix == "clinic_approval"
    assert store.description == "PostgreSQL bastion_approvals@db.internal:5433/bastion"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[approvals]\nstore = "redis"', 'approvals.store: expected "sqlite" or "postgres", got "redis"'),
        ('[approvals]\nstore = "postgres"', 'approvals.postgres: required with store = "postgres" (dbname, user, password…)'),
        ('[approvals]\ncolour = "blue"', 'approvals: unknown key "colour"'),
        ('[approvals]\npoll_interval = 0', "approvals.poll_interval: must be more than 0"),
        ('[approvals]\ndefault_timeout = "soon"', "approvals.default_timeout: expected a duration like \"30s\", \"15m\" or \"2h\", got 'soon'"),
        ('[approvals]\nnotice = "approve {idd}"', "approvals.notice: unknown placeholder {idd} (known: {id}, {expires}, {timeout}, {approvers}, {rules}, {cli}, {http})"),
        ('[approvals]\npublic_url = "bastion:8700"', 'approvals.public_url: expected an http:// or https:// address, got "bastion:8700"'),
        ('[approvals.postgres]\ndbname = "b"\nuser = "u"\npassword = "hunter2"', "approvals.postgres.password: inline secrets are not accepted; write { env = \"NAME\" } or { file = \"path\" }"),
        ('[approvals.postgres]\ndbname = "b"\nuser = "u"\ntable_prefix = "Bad-Name"', 'approvals.postgres.table_prefix: use lower-case letters, digits and _ (at most 41), got "Bad-Name"'),
        ('[[approvals.webhooks]]\nurl = "ftp://x"\nsecret = { env = "S" }', 'approvals.webhooks[0].url: expected an http:// or https:// address, got "ftp://x"'),
        ('[[approvals.webhooks]]\nurl = "https://x"\nsecret = { env = "S" }\nevents = ["approve"]', 'approvals.webhooks[0].events: unknown event "approve" (known: requested, approval, approved, denied, expired, cancelled, window)'),
        ('[[approvals.webhooks]]\nurl = "https://x"', "approvals.webhooks[0].secret: required key is missing"),
    ],
    ids=["store", "postgres-missing", "unknown-key", "poll", "duration", "notice", "public-url", "inline-secret", "prefix", "webhook-url", "webhook-event", "webhook-secret"],
)
def test_errors_name_their_place(tmp_path, registry, text, expected):
    assert expected in errors_of(tmp_path, text, registry)


def test_approvals_can_be_switched_off(tmp_path, registry):
    from bastion.core.approvals import ApprovalService

    config = load_text(tmp_path, "[approvals]\nenabled = false\n", registry)
    assert ApprovalService.for_gateway(config, runtime=None) is None
