"""Reading ``SET bastion.justification`` statements (bastion.protocols.postgres.gateway_settings)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.protocols.postgres.gateway_settings import (
    KNOWN_SETTINGS,
    GatewaySetting,
    SettingError,
    read_gateway_setting,
)

LIMIT = KNOWN_SETTINGS["justification"]
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=200)


@pytest.mark.parametrize(
    ("statement", "value"),
    [
        ("SET bastion.justification = 'ticket OPS-7'", "ticket OPS-7"),
        ("set bastion.justification to 'it''s the nightly run';", "it's the nightly run"),
        ("SET SESSION bastion.justification = $$a 'quoted' reason$$", "a 'quoted' reason"),
        ("SET LOCAL bastion.justification = $why$x$y$why$", "x$y"),
        ("SET bastion.justification = E'two\\nlines \\x41'", "two\nlines A"),
        ("  /* from the job */ SET bastion.Justification = backfill -- trailing\n", "backfill"),
        ("SET bastion.justification = DEFAULT", None),
        ("RESET bastion.justification ;", None),
    ],
)
def test_the_forms_postgresql_accepts_are_read(statement: str, value: str | None) -> None:
    assert read_gateway_setting(statement) == GatewaySetting("justification", value)


@pytest.mark.parametrize("statement", ["select 1", "SET search_path = public", "select 'bastion.justification'", "SHOW bastion.justification"])
def test_other_statements_are_not_ours(statement: str) -> None:
    assert read_gateway_setting(statement) is None


@pytest.mark.parametrize(
    ("statement", "sqlstate"),
    [
        ("select 1; SET bastion.justification = 'x'", "42601"),
        ("SET bastion.justification = 'x'; delete from t", "42601"),
        ("SET bastion.justification = 'unterminated", "42601"),
        ("SET bastion.approver = 'me'", "42704"),
        ("RESET bastion.everything", "42704"),
        ("SET bastion.justification = E'\\UFFFFFFFF'", "42601"),
        (f"SET bastion.justification = '{'x' * (LIMIT + 1)}'", "22001"),
    ],
)
def test_what_bastion_will_not_take_is_refused_not_forwarded(statement: str, sqlstate: str) -> None:
    with pytest.raises(SettingError) as raised:
        read_gateway_setting(statement)
    assert raised.value.sqlstate == sqlstate


@given(st.text(max_size=LIMIT).filter(lambda t: "\x00" not in t))
def test_any_quoted_value_reads_back(value: str) -> None:
    statement = "SET bastion.justification = '" + value.replace("'", "''") + "'"
    assert read_gateway_setting(statement) == GatewaySetting("justification", value)


@given(texts)
def test_any_text_is_read_or_refused_with_the_modules_own_error(text: str) -> None:
    try:
        setting = read_gateway_setting(text)
    except SettingError as exc:
        assert exc.sqlstate in {"42601", "42704", "22001"}
    else:
        assert setting is None or setting.name in KNOWN_SETTINGS


@given(texts, texts)
def test_a_setting_hidden_in_a_longer_text_is_always_refused(before: str, value: str) -> None:
    text = f"select {before!r}; SET bastion.justification = '" + value.replace("'", "''") + "'"
    with pytest.raises(SettingError):
        read_gateway_setting(text)
