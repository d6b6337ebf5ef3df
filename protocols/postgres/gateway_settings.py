"""Settings a caller gives Bastion itself, in SQL the caller's tools already speak.

A caller says why it is about to do something with ``SET bastion.justification = '…'``; Bastion
answers that statement itself and never forwards it (the server would keep it as a placeholder
setting, visible to anyone who runs ``SHOW``, and the reviewer would never see it). This module only
reads the statement text; the relay decides what to answer.

The grammar is PostgreSQL's for one ``SET`` or ``RESET`` of a placeholder parameter:

    SET [SESSION | LOCAL] bastion.<name> { TO | = } { '<string>' | E'<string>' | $tag$<string>$tag$ | <word> | DEFAULT }
    RESET bastion.<name>

optionally followed by one semicolon. Anything else that tries to set a ``bastion.`` parameter (two
statements in one string, ``SET bastion.x`` inside a longer script) is refused rather than forwarded,
so the caller never believes a justification was given when it was not.
"""

from __future__ import annotations

import re

import attrs

# What a caller may set. Each maps to how long its value may be (a reviewer reads it on one screen).
KNOWN_SETTINGS = {"justification": 2000}

UNDEFINED_SETTING = "42704"  # undefined_object: an unknown bastion.* parameter
SYNTAX_ERROR = "42601"  # syntax_error: a bastion.* SET Bastion cannot read on its own
TOO_LONG = "22001"  # string_data_right_truncation

_SPACE = r"(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)"  # whitespace and comments, between tokens
_STATEMENT = re.compile(
    rf"""^{_SPACE}*
    (?:
        (?P<set>set) {_SPACE}+ (?:(?:session|local) {_SPACE}+)?
            bastion\.(?P<set_name>[a-z_][a-z0-9_]*) {_SPACE}* (?:=|to\b) {_SPACE}*
            (?:
                '(?P<plain>(?:[^']|'')*)'
              | [eE]'(?P<escaped>(?:[^'\\]|''|\\.)*)'
              | \$\$(?P<dollar>.*?)\$\$
              | \$(?P<tag>[a-z_][a-z0-9_]*)\$(?P<tagged>.*?)\$(?P=tag)\$
              | (?P<default>default)\b
              | (?P<word>[a-z0-9_.+-]+)
            )
      | (?P<reset>reset) {_SPACE}+ bastion\.(?P<reset_name>[a-z_][a-z0-9_]*)
    )
    {_SPACE}* ;? {_SPACE}* $""",
    re.IGNORECASE | re.DOTALL | re.VERBOSE,
)
# Any attempt at a bastion.* parameter, wherever it is in the text.
_MENTION = re.compile(r"\b(?:set|reset)\s+(?:(?:session|local)\s+)?bastion\.", re.IGNORECASE)
_BACKSLASH_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)
_SIMPLE_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


@attrs.frozen
class GatewaySetting:
    """``SET bastion.<name> = <value>``; ``value`` is None for RESET and SET … DEFAULT."""

    name: str
    value: str | None


class SettingError(ValueError):
    """The text tries to set a ``bastion.`` parameter in a way Bastion does not accept."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


def read_gateway_setting(text: str) -> GatewaySetting | None:
    """The Bastion setting ``text`` makes, None when it sets none (forward it as usual).

    Raises :class:`SettingError` when the text mentions one but is not exactly one setting of a
    known parameter with an acceptable value.
    """
    if "bastion." not in text.lower():  # the fast path: almost every statement
        return None
    match = _STATEMENT.match(text)
    if match is None:
        if _MENTION.search(text):
            raise SettingError(
                SYNTAX_ERROR,
                "Bastion answers SET bastion.* itself: send it on its own, as SET bastion.justification = '…'",
            )
        return None
    name = (match["set_name"] or match["reset_name"]).lower()
    if name not in KNOWN_SETTINGS:
        raise SettingError(UNDEFINED_SETTING, f'unrecognized Bastion parameter "bastion.{name}" (known: {", ".join(sorted("bastion." + k for k in KNOWN_SETTINGS))})')
    value = _value(match)
    if value is not None and len(value) > KNOWN_SETTINGS[name]:
        raise SettingError(TOO_LONG, f"bastion.{name} is longer than {KNOWN_SETTINGS[name]} characters")
    return GatewaySetting(name, value)


def _value(match: re.Match[str]) -> str | None:
    if match["reset"] or match["default"]:
        return None
    if match["plain"] is not None:
        return match["plain"].replace("''", "'")
    if match["escaped"] is not None:
        try:
            return _BACKSLASH_ESCAPE.sub(_unescape, match["escaped"].replace("''", "'"))
        except (ValueError, OverflowError):  # \U beyond Unicode, say
            raise SettingError(SYNTAX_ERROR, "invalid escape in the E'…' string") from None
    if match["dollar"] is not None:
        return match["dollar"]
    if match["tagged"] is not None:
        return match["tagged"]
    return match["word"]


def _unescape(found: re.Match[str]) -> str:
    code = found[1]
    if code[0] == "x":
        return chr(int(code[1:], 16))
    if code[0] in "uU" and len(code) > 1:
        return chr(int(code[1:], 16))
    if code[0] in "01234567":
        return chr(int(code, 8) & 0xFF)
    return _SIMPLE_ESCAPES.get(code, code)


__all__ = ["GatewaySetting", "SettingError", "read_gateway_setting", "KNOWN_SETTINGS"]
