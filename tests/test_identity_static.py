"""The ``static-token`` identity provider and the ``bastion tokens`` command."""

from __future__ import annotations

import io
import os
import stat
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import tomli_w
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.plugins import identity_static
from bastion.plugins.identity_static import (
    KEY_PREFIX,
    StaticTokenOptions,
    StaticTokenProvider,
    TokensFileError,
    add_key,
    digest,
    new_key,
    parse_expiry,
    parse_key,
    parse_tokens,
    read_tokens,
    revoke_key,
    run_add,
    run_list,
    run_revoke,
)
from bastion.policies.model import AuthStatus, Credential
from tests.issuer import component_context


@pytest.fixture
def tokens_file(tmp_path) -> Path:
    return tmp_path / "tokens.toml"


def provider_for(path: Path) -> StaticTokenProvider:
    return StaticTokenProvider(StaticTokenOptions(tokens_file=path), component_context("keys"))


def authenticate(provider: StaticTokenProvider, secret: str | None):
    return trio.run(provider.authenticate, Credential(secret=secret))


# --- minting and storage ---------------------------------------------------------------------------


def test_minting_stores_only_a_digest_never_the_key(tokens_file):
    minted = add_key(tokens_file, "ci-nightly", ["etl", "readers"], description="nightly export")

    text = tokens_file.read_text()
    secret_part = minted.key.rsplit("_", 1)[1]
    assert minted.key not in text and secret_part not in text
    stored = tomllib.loads(text)["keys"][minted.entry.key_id]
    assert stored["hash"] == digest(minted.key)
    assert stored["subject"] == "ci-nightly" and stored["groups"] == ["etl", "readers"]
    assert stored["created"].tzinfo is not None and "expires" not in stored
    assert stat.S_IMODE(os.stat(tokens_file).st_mode) == 0o600


def test_keys_are_prefixed_and_carry_their_key_id(tokens_file):
    minted = add_key(tokens_file, "svc")
    assert minted.key.startswith(KEY_PREFIX)
    assert parse_key(minted.key) == minted.entry.key_id
    assert minted.key[len(KEY_PREFIX) : len(KEY_PREFIX) + 12] == minted.entry.key_id


def test_a_minted_key_authenticates_with_its_subject_groups_and_expiry(tokens_file):
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    minted = add_key(tokens_file, "ci-nightly", ["etl"], expires=expires)

    outcome = authenticate(provider_for(tokens_file), minted.key)

    assert outcome.status is AuthStatus.OK, outcome.reason
    identity = outcome.identity
    assert identity.provider == "keys"
    assert identity.subject == "ci-nightly"
    assert identity.groups == {"etl"}
    assert identity.auth_method == "api-key"
    assert identity.token_id == minted.entry.key_id
    assert identity.expires_at == expires


def test_a_wrong_secret_for_a_known_key_id_is_rejected(tokens_file):
    minted = add_key(tokens_file, "svc")
    forged = minted.key[:-4] + ("AAAA" if not minted.key.endswith("AAAA") else "BBBB")
    outcome = authenticate(provider_for(tokens_file), forged)
    assert outcome.status is AuthStatus.REJECT
    assert f"wrong secret for key id {minted.entry.key_id}" in outcome.reason


def test_an_unknown_key_id_is_left_to_the_next_provider(tokens_file):
    add_key(tokens_file, "svc")
    _, stranger = new_key()
    outcome = authenticate(provider_for(tokens_file), stranger)
    assert outcome.status is AuthStatus.UNKNOWN
    assert "is not in" in outcome.reason


@pytest.mark.parametrize("secret", [None, "", "eyJhbGciOi.x.y", "password", "BST_0123456789ab_" + "a" * 43])
def test_credentials_that_are_not_api_keys_are_unknown(tokens_file, secret):
    assert authenticate(provider_for(tokens_file), secret).status is AuthStatus.UNKNOWN


@pytest.mark.parametrize("secret", ["bst_", "bst_0123456789ab_short", "bst_0123456789AB_" + "a" * 43, "bst_0123456789ab_" + "a" * 44])
def test_malformed_api_keys_are_rejected(tokens_file, secret):
    outcome = authenticate(provider_for(tokens_file), secret)
    assert outcome.status is AuthStatus.REJECT
    assert "malformed" in outcome.reason


def test_an_expired_key_is_rejected(tokens_file):
    long_ago = datetime.now(UTC) - timedelta(days=10)
    minted = add_key(tokens_file, "svc", expires=long_ago + timedelta(days=1), now=long_ago)
    outcome = authenticate(provider_for(tokens_file), minted.key)
    assert outcome.status is AuthStatus.REJECT
    assert "expired" in outcome.reason


def test_revocation_and_new_keys_take_effect_without_a_restart(tokens_file):
    first = add_key(tokens_file, "svc-a")
    provider = provider_for(tokens_file)
    assert authenticate(provider, first.key).status is AuthStatus.OK

    revoke_key(tokens_file, first.entry.key_id)
    second = add_key(tokens_file, "svc-b")

    revoked = authenticate(provider, first.key)
    assert revoked.status is AuthStatus.REJECT and "revoked" in revoked.reason
    assert authenticate(provider, second.key).identity.subject == "svc-b"
    assert read_tokens(tokens_file)[first.entry.key_id].revoked is not None  # kept for the record


def test_a_broken_tokens_file_refuses_every_key_until_fixed(tokens_file):
    minted = add_key(tokens_file, "svc")
    provider = provider_for(tokens_file)
    assert authenticate(provider, minted.key).status is AuthStatus.OK
    good = tokens_file.read_text()

    tokens_file.write_text(good + "\nthis is not toml\n")
    broken = authenticate(provider, minted.key)
    tokens_file.write_text(good)
    fixed = authenticate(provider, minted.key)

    assert broken.status is AuthStatus.REJECT and "unusable" in broken.reason
    assert fixed.status is AuthStatus.OK


def test_a_missing_tokens_file_holds_no_keys(tokens_file):
    _, key = new_key()
    assert authenticate(provider_for(tokens_file), key).status is AuthStatus.UNKNOWN


def test_revoking_an_unknown_key_id_fails(tokens_file):
    add_key(tokens_file, "svc")
    with pytest.raises(KeyError):
        revoke_key(tokens_file, "0123456789ab")


# --- the command's core --------------------------------------------------------------------------------


def test_add_prints_the_key_alone_on_the_last_line(tokens_file):
    out = io.StringIO()
    status = run_add(tokens_file, "ci-nightly", ["etl", "readers"], parse_expiry("30d"), out=out)

    assert status == 0
    lines = out.getvalue().splitlines()
    key = lines[-1]
    assert parse_key(key) is not None and key == key.strip()
    assert all(key not in line for line in lines[:-1])
    assert authenticate(provider_for(tokens_file), key).identity.groups == {"etl", "readers"}


def test_list_shows_keys_without_secrets_and_revoke_marks_them(tokens_file):
    minted = add_key(tokens_file, "svc")
    assert run_revoke(tokens_file, minted.entry.key_id, out=io.StringIO()) == 0
    out = io.StringIO()
    assert run_list(tokens_file, out=out) == 0
    listing = out.getvalue()
    assert minted.entry.key_id in listing and "revoked" in listing
    assert minted.key not in listing
    assert run_revoke(tokens_file, "ffffffffffff", out=io.StringIO()) == 1


def test_invalid_names_are_refused(tokens_file):
    with pytest.raises(ValueError, match="not a valid name"):
        add_key(tokens_file, "two words")
    with pytest.raises(ValueError, match="not a valid name"):
        add_key(tokens_file, "svc", ["ok", "bad\ngroup"])
    assert not tokens_file.exists()


def test_the_bastion_tokens_command_end_to_end(tmp_path, monkeypatch, capsys):
    """Through bastion.core.cli, with this plugin registered the way the integrator will."""
    from bastion.core import cli, plugins

    if "bastion.plugins.identity_static" not in plugins.BUILTIN_PLUGINS.values():  # until the integrator registers it
        monkeypatch.setitem(plugins.BUILTIN_PLUGINS, "identity-static", "bastion.plugins.identity_static")
    config = tmp_path / "bastion.toml"
    config.write_text(
        '[gateway]\nadmin_listen = "127.0.0.1:0"\n\n'
        '[[targets]]\nname = "db"\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:1"\n\n'
        '[[identity]]\nkind = "static-token"\ntokens_file = "keys/tokens.toml"\n'
    )

    status = cli.main(["tokens", "add", "-c", str(config), "ci-nightly", "--groups", "etl,readers", "--expires", "2099-01-01"])

    assert status == 0, capsys.readouterr().err
    key = capsys.readouterr().out.splitlines()[-1]
    tokens_file = tmp_path / "keys" / "tokens.toml"
    (entry,) = read_tokens(tokens_file).values()
    assert entry.key_id == parse_key(key)
    assert entry.expires == datetime(2099, 1, 1, tzinfo=UTC)
    assert cli.main(["tokens", "list", "-c", str(config)]) == 0
    assert entry.key_id in capsys.readouterr().out
    assert cli.main(["tokens", "revoke", "-c", str(config), entry.key_id]) == 0
    with pytest.raises(SystemExit) as usage:
        cli.main(["tokens", "add", "-c", str(config), "svc", "--expires", "yesterday"])
    assert usage.value.code == 2


# --- parsers: properties ---------------------------------------------------------------------------------


HEX = "0123456789abcdef"
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
near_keys = st.builds(
    lambda prefix, key_id, secret: f"{prefix}{key_id}_{secret}",
    st.sampled_from(["bst_", "bst", "BST_", "bst__"]),
    st.text(HEX + "G_", min_size=11, max_size=13),
    st.text(BASE64URL + "=.", min_size=41, max_size=45),
)


@settings(max_examples=200)
@given(st.text(max_size=80) | near_keys)
def test_parse_key_never_raises_and_accepts_only_the_exact_shape(text):
    key_id = parse_key(text)
    if key_id is not None:
        assert text.startswith(f"{KEY_PREFIX}{key_id}_") and len(text) == identity_static.KEY_LENGTH
        assert set(text[len(KEY_PREFIX) + 13 :]) <= set(BASE64URL)


@settings(max_examples=50)
@given(st.integers(min_value=0, max_value=10))
def test_fresh_keys_always_parse_to_their_own_id(_):
    key_id, key = new_key()
    assert parse_key(key) == key_id
    assert digest(key) != digest(new_key()[1])


NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


expiry_like = st.builds(
    lambda number, unit: f"{number}{unit}", st.integers(min_value=-5, max_value=10**12), st.sampled_from(["d", "h", "w", "y", "m", "s", "ms", "x", ""])
) | st.builds(
    lambda day, time_part: day.isoformat() + time_part,
    st.dates(),
    st.sampled_from(["", "T08:30:00Z", "T08:30", "T25:00:00", " 12", "T08:30:00+02:00"]),
)


@settings(max_examples=300)
@given(st.text(max_size=30) | expiry_like)
def test_parse_expiry_gives_a_future_moment_or_a_sentence(text):
    try:
        moment = parse_expiry(text, now=NOW)
    except ValueError as exc:
        assert str(exc)
        return
    assert moment > NOW and moment.tzinfo is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", NOW + timedelta(days=30)),
        ("12h", NOW + timedelta(hours=12)),
        ("2027-01-01", datetime(2027, 1, 1, tzinfo=UTC)),
        ("2027-01-01T08:30:00+02:00", datetime(2027, 1, 1, 6, 30, tzinfo=UTC)),
    ],
)
def test_parse_expiry_examples(text, expected):
    assert parse_expiry(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["2020-01-01", "0d", "tomorrow", "2027-02-30", "-5d"])
def test_parse_expiry_refuses_the_past_and_nonsense(text):
    with pytest.raises(ValueError):
        parse_expiry(text, now=NOW)


toml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.datetimes(timezones=st.none() | st.just(UTC)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
def valid_or_any(value):
    """Mostly the valid value, sometimes anything: entries near the valid shape find more bugs."""
    return st.just(value) | st.just(value) | toml_values


plausible_entries = st.fixed_dictionaries(
    {"subject": valid_or_any("svc"), "hash": valid_or_any(digest("bst_x")), "created": valid_or_any(NOW)},
    optional={
        "groups": valid_or_any(["etl"]),
        "expires": valid_or_any(NOW),
        "revoked": valid_or_any(NOW),
        "description": valid_or_any("a note"),
        "extra": toml_values,
    },
)
plausible_files = st.fixed_dictionaries(
    {},
    optional={
        "version": valid_or_any(1),
        "keys": st.dictionaries(st.text(HEX, min_size=12, max_size=12) | st.text(max_size=13), plausible_entries, max_size=3)
        | toml_values,
        "other": toml_values,
    },
)


@settings(max_examples=150)
@given(plausible_files)
def test_the_tokens_file_parser_gives_keys_or_a_located_error(document):
    try:
        keys = parse_tokens(document)
    except TokensFileError as exc:
        assert str(exc)
        return
    for key_id, entry in keys.items():
        assert entry.key_id == key_id and entry.created.tzinfo is not None
        assert entry.digest.startswith("sha256:")


@settings(max_examples=100)
@given(
    subject=st.builds(str.__add__, st.sampled_from("abc"), st.text("abcdefxyz0123456789.-", max_size=20)),
    groups=st.lists(st.builds(str.__add__, st.sampled_from("xyz"), st.text("abc:/-", max_size=10)), max_size=4),
    expires=st.none() | st.datetimes(min_value=datetime(2030, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)),
)
def test_stored_entries_round_trip_through_toml(subject, groups, expires):
    entry = identity_static.StoredKey(
        key_id="0123456789ab",
        subject=subject,
        digest=digest("bst_x"),
        created=NOW,
        groups=frozenset(groups),
        expires=expires,
    )
    document = tomllib.loads(tomli_w.dumps({"version": 1, "keys": {entry.key_id: entry.to_toml()}}))
    assert parse_tokens(document) == {entry.key_id: entry}


def test_the_plugin_registers_the_static_token_kind():
    (spec,) = identity_static.bastion_register_identity_providers()
    assert spec.kind == "static-token" and spec.options is StaticTokenOptions
