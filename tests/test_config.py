"""Configuration: precise, located errors; defaults; secrets never inline."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.core.config import Address, ConfigError, Duration, Registry, load_config
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
    path.write_text(textwrap.dedent(text))
    return load_config(path, registry)


def errors_of(tmp_path: Path, text: str, registry: Registry) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, registry)
    return info.value.errors


def test_minimal_config_gets_the_embedded_defaults(tmp_path, registry):
    config = load_text(tmp_path, MINIMAL, registry)
    assert config.gateway.state_dir == tmp_path.resolve() / "var"
    assert config.gateway.admin_listen == Address("127.0.0.1", 8700)
    assert config.audit.fail_closed is True
    assert config.audit.record_rows == "all"
    (target,) = config.targets
    assert target.listen == Address("127.0.0.1", 7000)
    assert target.options.authentication == "none"


def test_listen_without_host_is_reported_with_its_path(tmp_path, registry):
    errors = errors_of(tmp_path, MINIMAL.replace('"127.0.0.1:7000"', '"6432"'), registry)
    assert errors == ['targets[0].listen: expected "host:port", got "6432"']


def test_unknown_keys_are_rejected_everywhere(tmp_path, registry):
    text = MINIMAL + 'colour = "blue"\n[gateway]\nstate_dirr = "x"\n[audit]\nfail_open = true\n'
    errors = errors_of(tmp_path, text, registry)
    assert 'gateway: unknown key "state_dirr"' in errors
    assert 'targets[0]: unknown key "colour"' in errors
    assert 'audit: unknown key "fail_open"' in errors


def test_unknown_section_and_protocol(tmp_path, registry):
    errors = errors_of(tmp_path, MINIMAL.replace('"tcp"', '"gopher"') + "[extras]\n", registry)
    assert any(e.startswith("targets[0].protocol: unknown protocol 'gopher' (known:") for e in errors)
    assert any(e.startswith('extras: unknown section "extras"') for e in errors)


def test_wrong_types_say_what_was_expected(tmp_path, registry):
    errors = errors_of(tmp_path, MINIMAL + "[gateway]\nmax_sessions = \"many\"\nshutdown_grace = \"soon\"\n", registry)
    assert "gateway.max_sessions: expected an integer, got 'many'" in errors
    assert any(e.startswith("gateway.shutdown_grace: expected a duration") for e in errors)


def test_inline_secrets_are_refused(tmp_path, registry):
    text = MINIMAL + '[targets.credentials]\nuser = "app"\npassword = "hunter2"\n'
    errors = errors_of(tmp_path, text, registry)
    assert errors == ['targets[0].credentials.password: inline secrets are not accepted; write { env = "NAME" } or { file = "path" }']
    assert "hunter2" not in "\n".join(errors)


def test_secret_references_resolve_relative_files(tmp_path, registry):
    text = MINIMAL + '[targets.credentials]\nuser = "app"\npassword = { file = "secrets/db" }\n'
    config = load_text(tmp_path, text, registry)
    ref = config.targets[0].credentials.password
    assert ref == SecretRef("file", "secrets/db")
    assert ref.base_dir == tmp_path.resolve()


def test_missing_targets_and_required_keys(tmp_path, registry):
    assert errors_of(tmp_path, "[gateway]\n", registry) == ["targets: at least one [[targets]] section is needed"]
    errors = errors_of(tmp_path, '[[targets]]\nname = "x"\nprotocol = "tcp"\n', registry)
    assert "targets[0].listen: required key is missing" in errors
    assert "targets[0].upstream: required key is missing" in errors


def test_duplicate_names_and_listeners(tmp_path, registry):
    errors = errors_of(tmp_path, MINIMAL + MINIMAL, registry)
    assert 'targets[1].name: another target is already called "raw"' in errors
    assert "targets[1].listen: 127.0.0.1:7000 is already used by targets[0].listen" in errors


def test_plaintext_auth_only_on_loopback(tmp_path, registry):
    text = MINIMAL.replace("127.0.0.1:7000", "0.0.0.0:7000") + "allow_plaintext_auth = true\n"
    errors = errors_of(tmp_path, text, registry)
    assert errors == ["targets[0].allow_plaintext_auth: only allowed when the listener is on loopback, not 0.0.0.0:7000"]


def test_plugin_typed_sections_check_their_own_keys(tmp_path, registry):
    errors = errors_of(tmp_path, MINIMAL + 'authentication = "kerberos"\n', registry)
    assert len(errors) == 1 and errors[0].startswith("targets[0].authentication:")
    errors = errors_of(tmp_path, MINIMAL + '[[identity]]\nkind = "carrier-pigeon"\n', registry)
    assert errors[0].startswith("identity[0].kind: unknown identity provider 'carrier-pigeon'")


def test_invalid_toml_names_the_file_and_line(tmp_path, registry):
    path = tmp_path / "bastion.toml"
    path.write_text("[gateway\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, registry)
    assert str(path) in str(info.value) and "line 1" in str(info.value)


def test_record_rows_accepts_all_none_or_a_number(tmp_path, registry):
    assert load_text(tmp_path, MINIMAL + "[audit]\nrecord_rows = 100\n", registry).audit.record_rows == 100
    errors = errors_of(tmp_path, MINIMAL + '[audit]\nrecord_rows = "some"\n', registry)
    assert errors == ['audit.record_rows: expected "all", "none" or a number of rows, got "some"']


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:5432", Address("127.0.0.1", 5432)), ("[::1]:6432", Address("::1", 6432)), ("db.internal:5432", Address("db.internal", 5432))],
)
def test_address_parsing(text, expected):
    assert Address.parse(text) == expected
    assert str(Address.parse(text)) == text


@given(st.text(max_size=40))
@settings(max_examples=300)
def test_address_parser_only_raises_value_error(text):
    try:
        address = Address.parse(text)
    except ValueError:
        return
    assert 0 <= address.port <= 65535 and str(address)


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("15m", 900), ("2h", 7200), ("1d", 86400), ("6y", 6 * 365 * 86400), (5, 5)])
def test_durations(text, seconds):
    assert Duration.parse(text) == seconds


@given(st.one_of(st.text(max_size=12), st.integers(), st.floats(allow_nan=False)))
def test_duration_parser_only_raises_value_error(value):
    try:
        assert Duration.parse(value) >= 0
    except ValueError:
        pass
