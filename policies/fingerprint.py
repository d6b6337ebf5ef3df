"""Parser-free text routines for SQL: cheap fingerprints, literal redaction, MySQL comment unwrapping.

Three jobs, none of which needs a SQL parser:

* :func:`fingerprint` is the cache key of :class:`bastion.policies.analysis.Analyzer`. It must cost
  a few microseconds, so it is a handful of regular expressions. It answers ``None`` whenever the
  text holds anything it cannot normalise *safely* (comments, dollar quotes, backslashes,
  non-ASCII…): two statements with the same fingerprint must differ only in literal values, case
  and whitespace, because they share one analysis.
* :func:`redact` and :func:`normalized` run a small hand-written lexer (one compiled pattern per
  dialect) that understands every quoting form of the dialect; the audit trail keeps
  :func:`redact`'s output, never a raw literal.
* :func:`unwrap_executable_comments` turns MySQL ``/*! … */`` and ``/*!50000 … */`` comments into
  the plain SQL the server executes, so the analysis sees what MySQL runs.

Pure: no I/O, no parser, no trio or pluggy.
"""

from __future__ import annotations

import hashlib
import re

import attrs

POSTGRES = "postgres"
MYSQL = "mysql"

_DIALECT_NAMES = {
    "postgres": POSTGRES,
    "postgresql": POSTGRES,
    "pg": POSTGRES,
    "mysql": MYSQL,
    "mariadb": MYSQL,
}

PLACEHOLDER = "?"

# The digest is an identifier for grouping and audit, not a security boundary: 16 hex digits
# (64 bits) keep collisions negligible for any realistic number of distinct statement shapes.
_DIGEST_HEX_DIGITS = 16


def canonical_dialect(dialect: str | None) -> str:
    """``postgres`` or ``mysql`` for any accepted spelling; anything else is a configuration error."""
    try:
        return _DIALECT_NAMES[(dialect or "").lower()]
    except KeyError:
        raise ValueError(f"unsupported SQL dialect {dialect!r}: expected postgres or mysql") from None


# --- the cheap fingerprint -----------------------------------------------------------------------
#
# The cheap normaliser gives up (returns None) on anything it cannot handle with certainty:
# backslashes (E'' strings, MySQL escapes), dollar signs other than $n parameters (dollar quotes),
# every character outside printable ASCII plus tab, newline and carriage return (non-ASCII
# whitespace and control characters are read differently by servers and tokenizers), and, outside
# string literals, comment markers, `#` (a MySQL comment), `?` (the placeholder it substitutes) and
# in MySQL `"` (a string or an identifier depending on sql_mode's ANSI_QUOTES).
#
# Written for speed: CPython's regex engine scans fast for a pattern that starts with a character
# class or a literal, and slowly for alternations and look-behinds, so the work is split into a
# one-class search, plain substring tests, a string pass and a digit pass.
_UNSAFE_CHARACTER = re.compile(r"[^\t\n\r\x20-\x23\x25-\x5b\x5d-\x7e]")
_DOLLAR_NOT_PARAMETER = re.compile(r"\$(?![0-9])")
_STRING = r"'[^']*'(?:'[^']*')*"
_STRING_LITERAL = re.compile(_STRING)
_DIGIT_RUN = re.compile(r"([0-9][0-9.]*)")
# a digit run glued to one of these is part of an identifier (t1, MySQL's 1abc), of a $n parameter
# or of an exponent (1e5): it is kept as it is
_GLUE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$")
_QUOTED_IDENTIFIER = {POSTGRES: r'"[^"]*"', MYSQL: r"`[^`]*`"}
_QUOTE_CHARACTER = {POSTGRES: '"', MYSQL: "`"}
_QUOTE_BY_NAME = {name: _QUOTE_CHARACTER[dialect] for name, dialect in _DIALECT_NAMES.items()}
_NUMBER = r"(?<![\w$])[0-9][0-9.]*+(?![\w$])"
# With quoted identifiers present, one pass consumes whole tokens so that a quote character inside
# an identifier is not taken for the start of a string; it also matches a stray quote character
# (an unterminated string or identifier).
_LITERAL_IDENTIFIER_OR_STRAY = {
    dialect: re.compile(f"({quoted})|{_STRING}|{_NUMBER}|(['\"`])")
    for dialect, quoted in _QUOTED_IDENTIFIER.items()
}
# never in an accepted input: the unsafe pattern refuses control characters
_STRAY_MARK = "\x00"
_LITERAL_MARK = "\x01"
_QUOTED_IDENTIFIER_PATTERN = {
    dialect: re.compile(quoted) for dialect, quoted in _QUOTED_IDENTIFIER.items()
}


def _keep_identifier(match: re.Match[str]) -> str:
    if match.group(1):
        return match.group(1)
    return _STRAY_MARK if match.group(2) else _LITERAL_MARK


def fingerprint(sql: str, dialect: str) -> str | None:
    """Literals replaced by ``?``, whitespace collapsed, case folded; ``None`` if unsafe to do cheaply.

    Two statements that differ only in the values of their string and numeric literals (and in
    case or whitespace outside quoted identifiers) get the same fingerprint; statements that
    differ in anything else get different ones. The result is a cache key, so whenever the text
    has something this normaliser cannot handle with certainty the answer is ``None`` and the
    caller must analyse the statement in full.
    """
    quote = _QUOTE_BY_NAME.get(dialect)
    if quote is None:  # another spelling ("PostgreSQL"), or a configuration error that raises
        dialect = canonical_dialect(dialect)
        quote = _QUOTE_CHARACTER[dialect]
    found = _UNSAFE_CHARACTER.search(sql)
    if found is not None and (found.group() != "$" or _DOLLAR_NOT_PARAMETER.search(sql)):
        return None
    if quote in sql:
        # Quoted identifiers are case- and whitespace-sensitive: keep the text as it is apart
        # from the literals (a cache miss for a differently spelled statement costs only time).
        canonical = _DIALECT_NAMES[dialect]
        text = _LITERAL_IDENTIFIER_OR_STRAY[canonical].sub(_keep_identifier, sql)
        outside = _QUOTED_IDENTIFIER_PATTERN[canonical].sub("", text)
        if _STRAY_MARK in text or _outside_literals_unsafe(outside, canonical):
            return None
        return text.replace(_LITERAL_MARK, PLACEHOLDER).strip()
    text = sql
    if "'" in text:
        # Strings are replaced first (by a mark no input may contain), so what the checks below
        # see is only the text outside them. Up to the first comment, this plain string pass
        # reads the text exactly as the server does; so if no comment marker is left outside the
        # strings, there was no comment at all.
        text = _STRING_LITERAL.sub(_LITERAL_MARK, text)
        if "'" in text:  # an unterminated string: not something to share an analysis with
            return None
    if (
        "--" in text
        or "/*" in text
        or "*/" in text
        or "#" in text  # a MySQL comment
        or "?" in text  # the placeholder itself
        or (quote == "`" and '"' in text)  # MySQL: a string or an identifier, by sql_mode
    ):
        return None
    if text is not sql:
        text = text.replace(_LITERAL_MARK, PLACEHOLDER)
    parts = _DIGIT_RUN.split(text)
    if len(parts) > 1:
        glue = _GLUE
        for index in range(1, len(parts), 2):
            before, after = parts[index - 1], parts[index + 1]
            if not ((before and before[-1] in glue) or (after and after[0] in glue)):
                parts[index] = PLACEHOLDER
        text = "".join(parts)
    text = text.lower()
    if "  " in text or "\n" in text or "\t" in text or "\r" in text:
        return " ".join(text.split())
    return text.strip()


def _outside_literals_unsafe(text: str, dialect: str) -> bool:
    """Comment markers, `#`, `?` (the placeholder) or a MySQL double quote outside the strings."""
    return (
        "--" in text
        or "/*" in text
        or "*/" in text
        or "#" in text
        or "?" in text
        or (dialect == MYSQL and '"' in text)
    )


# --- the full lexer ----------------------------------------------------------------------------

_WHITESPACE = r"[ \t\n\r\f\v]+"
_IDENTIFIER_START = r"A-Za-z_\x80-\U0010ffff"

# Terminated forms come first; `open` catches a quote that never closes (the rest of the text).
_POSTGRES_TOKEN = re.compile(
    rf"""
    (?P<space>{_WHITESPACE})
  | (?P<line_comment>--[^\n\r]*)
  | (?P<block_comment>/\*)
  | (?P<quoted>"(?:[^"]|"")*")
  | (?P<escape_string>[eE]'(?:[^'\\]|\\.|'')*')
  | (?P<dollar>\$(?:[{_IDENTIFIER_START}][\w\x80-\U0010ffff]*)?\$)
  | (?P<string>'(?:[^']|'')*')
  | (?P<open>(?:[eE]?'|").*)
  | (?P<parameter>\$\d+)
  | (?P<number>0[xXoObB][0-9A-Fa-f_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?)
  | (?P<word>[{_IDENTIFIER_START}][\w$\x80-\U0010ffff]*)
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)

_MYSQL_TOKEN = re.compile(
    rf"""
    (?P<space>{_WHITESPACE})
  | (?P<line_comment>(?:\#|--(?=[\x00-\x20]|$))[^\n]*)
  | (?P<block_comment>/\*)
  | (?P<quoted>`(?:[^`]|``)*`)
  | (?P<string>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")
  | (?P<open>['"`].*)
  | (?P<number>0[xXbB][0-9A-Fa-f]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?![\w$\x80-\U0010ffff]))
  | (?P<word>[\w$\x80-\U0010ffff]+)
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)

_TOKEN = {POSTGRES: _POSTGRES_TOKEN, MYSQL: _MYSQL_TOKEN}


@attrs.frozen
class Lexed:
    """What the full lexer made of a text.

    ``redacted``: literals replaced by ``?``, comments dropped, whitespace collapsed, case kept.
    ``normalized``: the same with unquoted words lower-cased (the basis of :func:`digest`).
    ``unterminated``: a string, quoted identifier or comment runs to the end of the text.
    ``odd_characters``: outside literals and comments there is a character that is whitespace or a
    control character to Python but not to the server (non-breaking space, U+2028…): the server
    and a tokenizer may then split the text differently.
    ``separators``: offsets of the semicolons that end statements (outside literals and comments).
    """

    redacted: str
    normalized: str
    unterminated: bool
    odd_characters: bool
    separators: tuple[int, ...] = ()


def _is_odd(text: str) -> bool:
    return any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text)


def _block_comment_end(sql: str, start: int, nested: bool) -> int:
    """Index just past the comment opened at ``start``; -1 if it never closes.

    Both searches only ever move forward, so a text full of openers costs linear time.
    """
    depth, index = 1, start + 2
    close = sql.find("*/", index)
    while depth:
        if close < 0:
            return -1
        if nested:
            opened = sql.find("/*", index, close)
            if opened >= 0:
                depth, index = depth + 1, opened + 2
                if close < index:  # "/*/": the star belongs to the opener
                    close = sql.find("*/", index)
                continue
        depth, index = depth - 1, close + 2
        close = sql.find("*/", index)
    return index


_SPACES = re.compile(" +")


def _collapse(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def lex(sql: str, dialect: str) -> Lexed:
    """Run the dialect's full lexer over ``sql`` (see :class:`Lexed`)."""
    dialect = canonical_dialect(dialect)
    pattern = _TOKEN[dialect]
    redacted: list[str] = []
    normalized: list[str] = []
    separators: list[int] = []
    unterminated = odd = False
    index, length = 0, len(sql)
    while index < length:
        match = pattern.match(sql, index)
        assert match is not None  # the `other` branch matches any single character
        group, text = match.lastgroup, match.group()
        index = match.end()
        if group in ("space", "line_comment"):
            redacted.append(" ")
            normalized.append(" ")
        elif group == "block_comment":
            end = _block_comment_end(sql, match.start(), nested=dialect == POSTGRES)
            if end < 0:
                unterminated, index = True, length
            else:
                index = end
            redacted.append(" ")
            normalized.append(" ")
        elif group == "dollar":
            close = sql.find(text, index)
            if close < 0:
                unterminated, index = True, length
            else:
                index = close + len(text)
            redacted.append(PLACEHOLDER)
            normalized.append(PLACEHOLDER)
        elif group in ("string", "escape_string", "number", "open"):
            unterminated = unterminated or group == "open"
            redacted.append(PLACEHOLDER)
            normalized.append(PLACEHOLDER)
        elif group == "quoted":
            redacted.append(text)
            normalized.append(text)
        else:  # word, parameter, other
            if text == ";":
                separators.append(match.start())
            odd = odd or _is_odd(text)
            redacted.append(text)
            normalized.append(text.lower() if group == "word" else text)
    return Lexed(
        redacted=_collapse("".join(redacted)),
        normalized=_collapse("".join(normalized)),
        unterminated=unterminated,
        odd_characters=odd,
        separators=tuple(separators),
    )


def redact(sql: str, dialect: str) -> str:
    """The statement with every literal replaced by ``?`` and comments removed, for the audit trail."""
    return lex(sql, dialect).redacted


def normalized(sql: str, dialect: str) -> str:
    """:func:`redact` with unquoted words lower-cased: equal for statements of the same shape."""
    return lex(sql, dialect).normalized


def digest(normalized_text: str) -> str:
    """A short stable identifier of a normalised statement, for the audit trail and grouping."""
    data = normalized_text.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:_DIGEST_HEX_DIGITS]


# --- MySQL executable comments -------------------------------------------------------------------

# What MySQL's lexer skips without executing: strings, quoted identifiers and ordinary comments.
# Everything is scanned so that a `/*!` inside a string is left alone.
_MYSQL_SCAN = re.compile(
    r"""
    (?P<executable>/\*M?!(?:\d{5}(?:\d(?=[ \t\n\r]))?)?)
  | (?P<comment>/\*.*?(?:\*/|\Z))
  | (?P<line_comment>(?:\#|--(?=[\x00-\x20]|$))[^\n]*)
  | (?P<skip>'(?:[^'\\]|\\.|'')*'?|"(?:[^"\\]|\\.|"")*"?|`(?:[^`]|``)*`?)
  | (?P<close>\*/)
    """,
    re.VERBOSE | re.DOTALL,
)


def has_executable_comment(sql: str) -> bool:
    """Cheap pre-check: does the text contain anything that may open a MySQL executable comment?"""
    return "/*!" in sql or "/*M!" in sql


def unwrap_executable_comments(sql: str) -> str:
    """Replace MySQL's ``/*!``, ``/*!50000``, ``/*M!100100`` openers and their ``*/`` by spaces.

    MySQL executes the content of such comments (MariaDB also the ``/*M!`` form); a version number
    that the server is too old for would make it skip them, but Bastion cannot know the server's
    version for certain, so the content is always treated as executed. Offsets are preserved.
    Inside an executable comment the content is lexed normally, so its first ``*/`` that is not
    inside a string closes it.
    """
    if not has_executable_comment(sql):
        return sql
    pieces: list[str] = []
    index, open_executable = 0, False
    for match in _MYSQL_SCAN.finditer(sql):
        group = match.lastgroup
        if group == "executable" and not open_executable:
            pieces.append(sql[index : match.start()])
            pieces.append(" " * (match.end() - match.start()))
            index, open_executable = match.end(), True
        elif group == "close" and open_executable:
            pieces.append(sql[index : match.start()])
            pieces.append("  ")
            index, open_executable = match.end(), False
    pieces.append(sql[index:])
    return "".join(pieces)
