"""Secret references resolve when needed and never show their value."""

from __future__ import annotations

import pickle

import pytest

from bastion.core.secrets import Secret, SecretRef, SecretUnavailable, resolve

PLANTED = "s3cr3t-planted-value-7d1c"


def test_env_reference_is_read_at_resolve_time(monkeypatch):
    ref = SecretRef("env", "BASTION_TEST_SECRET")
    monkeypatch.setenv("BASTION_TEST_SECRET", "first")
    assert resolve(ref).reveal() == "first"
    monkeypatch.setenv("BASTION_TEST_SECRET", "rotated")
    assert resolve(ref).reveal() == "rotated"


def test_file_reference_strips_the_trailing_newline_and_follows_rotation(tmp_path):
    (tmp_path / "pw").write_text(PLANTED + "\n")
    ref = SecretRef("file", "pw", tmp_path)
    assert resolve(ref).reveal() == PLANTED
    (tmp_path / "pw").write_text("next\n")
    assert resolve(ref).reveal() == "next"


def test_missing_secrets_name_the_reference_not_a_value(tmp_path):
    with pytest.raises(SecretUnavailable, match="BASTION_NOT_SET"):
        resolve(SecretRef("env", "BASTION_NOT_SET"))
    with pytest.raises(SecretUnavailable, match="cannot read secret file"):
        resolve(SecretRef("file", "absent", tmp_path))


def test_plugin_kinds_go_through_the_resolver():
    seen = []

    def vault(ref):
        seen.append(ref)
        return PLANTED if ref.kind == "vault" else None

    assert resolve(SecretRef("vault", "db#pw"), vault).reveal() == PLANTED
    with pytest.raises(SecretUnavailable, match="no plugin resolves secrets of kind 'sops'"):
        resolve(SecretRef("sops", "x"), vault)
    assert [r.kind for r in seen] == ["vault", "sops"]


def test_a_secret_never_shows_its_value():
    secret = Secret(PLANTED)
    for text in (repr(secret), str(secret), f"{secret}", repr([secret]), repr({"password": secret})):
        assert PLANTED not in text
    with pytest.raises(TypeError):
        pickle.dumps(secret)
