"""Masking: decide once per result set what each column needs, then rewrite every row cheaply.

:func:`compile_plan` turns a result's columns and the masking rules in force into a
:class:`RowMasker` (or None when nothing needs masking); the protocol calls
:meth:`RowMasker.apply` for every row and :meth:`RowMasker.mask_copy_line` for COPY data.
:func:`mask_text` masks free text (error and notice fields), :func:`mask_literal_values` turns
Bind parameters into what the audit trail may keep. Nothing here does I/O; every failure raises
(:class:`MaskingError`) rather than let a raw value through.

Column matching
    A rule's column patterns are ``fnmatch`` globs (``*`` any run of characters *including* dots,
    ``?`` one character, ``[...]`` a set), matched case-insensitively against the whole of each
    name a result column has: its own name qualified with its table (``public.patients.ssn``;
    just ``ssn`` when the analysis knows no table) and every source it was derived from. So
    ``*.email`` matches ``public.users.email`` and ``users.email`` but neither ``email_verified``
    nor a bare ``email`` alias, and ``public.patients.ssn`` does not match ``patients.ssn``.

Which rule wins
    Whole-value rules (no recognizers) beat recognizer rules; among several the strongest
    strategy wins (null > redact > hash > partial). Recognizer rules add up: the column is scanned
    for the union of their recognizers, each with the strongest strategy any rule gives it.
    ``settings.default_recognizers`` scan (free-text scope) the text columns no rule matches.

Untraced columns (``Column.traced`` False) while any rule is in force
    ``mask-all``: scanned in column scope with every recognizer but ``zip`` (built-in and
    custom); values that cannot be read (binary formats of types without a decoder here) are
    replaced whole. ``deny``: the plan's ``deny_reason`` is set and the caller refuses the
    statement. A column a whole-value rule already masks is never the reason for either.

Strategies
    ``redact``  found text becomes ``[REDACTED]``; a whole value becomes its type's replacement.
    ``partial`` keeps the last 4 digits when at least 4 others stay hidden (``***-**-6789``),
                the domain of an e-mail (``****@example.org``), the year of a date of birth, the
                first 3 digits of a ZIP; letters and other digits become ``*``, separators stay.
                On whole values only for plain text types; other types fall back to redact.
    ``hash``    ``h:`` + the first 16 hex digits (64 bits) of HMAC-SHA256(hash_key, value): a
                stable pseudonym, so equal values still join. Found text is hashed in canonical
                form (digits only for numbers, lower-case e-mail, ISO date), whole values as their
                text representation (UTF-8, whatever the client encoding; binary values decoded
                first, so both formats agree). Integer, numeric, uuid and bytea columns get a
                pseudonym of their own type; other non-text types fall back to redact.
    ``null``    SQL NULL (a whole cell, also when only part of it was found).

What a masked whole value becomes (text format / binary format)::

    text, varchar, bpchar, name, unknown  [REDACTED]              / same bytes
    json                                  "[REDACTED]"            / same bytes
    jsonb                                 "[REDACTED]"            / 0x01 + "[REDACTED]"
    xml                                   [REDACTED]              / same bytes
    int2, int4, int8, oid                 0                       / 0, big-endian 2/4/8/4 bytes
    float4, float8                        0                       / 0.0 (4/8 zero bytes)
    numeric                               0                       / ndigits 0 weight 0 sign + dscale 0
    bool                                  f                       / 0x00
    date                                  1900-01-01              / int32 -36524 (days from 2000-01-01)
    timestamp                             1900-01-01 00:00:00     / int64 microseconds from 2000-01-01
    timestamptz                           1900-01-01 00:00:00+00  / as timestamp
    time, interval                        00:00:00                / zero microseconds (and days, months)
    timetz                                00:00:00+00             / zero microseconds, zone 0
    uuid                                  00000000-0000-0000-0000-000000000000 / 16 zero bytes
    bytea                                 \\x (empty)              / empty
    inet / cidr                           0.0.0.0 / 0.0.0.0/0     / family 2, 32/0 bits, 4 zero bytes
    macaddr                               00:00:00:00:00:00       / 6 zero bytes
    arrays of the types above             {}                      / empty array of the element type
    anything else                         NULL                    / MaskingUnsupported at compile

JSON
    Found text inside JSON strings is rewritten in place (masks hold no quote or backslash);
    found numbers (``123456789`` as a JSON number) are replaced whole by a JSON string of their
    mask, so the document stays valid JSON. Custom patterns that match quotes can break this.

Audit counts (:meth:`RowMasker.counts`)
    Masked cells (not spans) per ``column:recognizer`` for what recognizers found,
    ``column:rule`` for whole values, ``column:unreadable`` for binary values replaced because
    they could not be read; columns of the same name add up.

A type this module does not know is NULLed in text format when masked whole (a string the
client would have to parse as that type may not decode; what recognizers find in its text is
rewritten in place) and refused in binary format: :func:`compile_plan` raises
:class:`MaskingUnsupported` unless the strategy is ``null``. Extension types whose text is just
text (``citext``) can be declared with ``text_type_oids``. Types whose binary form is decoded
here (integers, floats, numeric, bool, date, timestamps, uuid, bytea, jsonb and the text types)
are scanned by recognizer rules; other binary values in a recognizer-scanned column are replaced
whole, because what cannot be read cannot be shown to be clean.
"""

from __future__ import annotations

import bisect
import codecs
import datetime
import fnmatch
import functools
import hashlib
import hmac
import re
import struct
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence

import attrs

from bastion.policies.model import Column, MaskingSettings, MaskRule, RecognizerRule, ResultShape
from bastion.policies.recognizers import (
    BUILTIN_RECOGNIZERS,
    FREE_TEXT_RECOGNIZERS,
    Recognizer,
    RecognizerError,
    Scanner,
    Span,
    compile_custom,
    compile_scanner,
    mask_keeping_last_digits,
)

__all__ = [
    "HASH_HEX_CHARS",
    "MIN_HASH_KEY_BYTES",
    "REDACTED",
    "STRATEGIES",
    "UNTRACED_MODES",
    "MaskingConfigError",
    "MaskingError",
    "MaskingUnsupported",
    "RowMasker",
    "check_policy",
    "column_matches",
    "column_names",
    "compile_plan",
    "mask_literal_values",
    "mask_text",
    "pseudonym",
    "type_replacement",
]


class MaskingError(Exception):
    """A value could not be masked; the caller must not send the row (or text) at all."""


class MaskingUnsupported(MaskingError):
    """A column cannot be masked in the format the client asked for: refuse the statement."""


class MaskingConfigError(MaskingError, ValueError):
    """The masking rules or settings are unusable (unknown strategy, recognizer, mode, key)."""


# --- constants -----------------------------------------------------------------------------------

REDACTED = b"[REDACTED]"
STRATEGIES = ("redact", "partial", "hash", "null")
_STRENGTH = {"partial": 0, "hash": 1, "redact": 2, "null": 3}  # what leaks least wins
UNTRACED_MODES = ("mask-all", "deny")

HASH_PREFIX = b"h:"
HASH_HEX_CHARS = 16
"""Pseudonym length in hex digits: 64 bits keep accidental collisions below one in a billion
for a million distinct values while the pseudonym stays short enough to read in a result."""

MIN_HASH_KEY_BYTES = 16  # a shorter key could be brute-forced from pseudonyms of guessable values

COPY_FORMATS = ("text", "csv")


def pseudonym(key: bytes, value: bytes) -> bytes:
    """``h:`` + the first :data:`HASH_HEX_CHARS` hex digits of HMAC-SHA256(key, value)."""
    return HASH_PREFIX + hmac.new(key, value, hashlib.sha256).hexdigest()[:HASH_HEX_CHARS].encode("ascii")


class _Keyed:
    """HMAC-SHA256 (RFC 2104) with the key's inner and outer hash states computed once per plan:
    per value that halves the cost of ``hmac.new``. Equal to :func:`pseudonym` (tested)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block = hashlib.sha256().block_size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def _outer_of(self, value: bytes) -> hashlib._Hash:
        inner = self._inner.copy()
        inner.update(value)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer

    def digest(self, value: bytes) -> bytes:
        return self._outer_of(value).digest()

    def pseudonym(self, value: bytes) -> bytes:
        return HASH_PREFIX + self._outer_of(value).hexdigest()[:HASH_HEX_CHARS].encode("ascii")


@functools.lru_cache(maxsize=8)
def _keyed_for(key: bytes) -> _Keyed:
    """The precomputed HMAC states of a gateway's hash key (one or two per process), for values
    hashed one at a time (Bind parameters)."""
    return _Keyed(key)


# --- PostgreSQL types ------------------------------------------------------------------------------

_PG_EPOCH = datetime.date(2000, 1, 1)  # binary dates and timestamps count from here
_PG_EPOCH_TIME = datetime.datetime(2000, 1, 1)
_REPLACEMENT_DAYS = (datetime.date(1900, 1, 1) - _PG_EPOCH).days  # -36524
_MICROSECONDS_PER_DAY = 86_400_000_000
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@attrs.frozen
class _PgType:
    """How one type is masked. ``kind``: ``text`` (scanned and rewritten in place in either
    format), ``json``, ``jsonb``, ``xml``, ``text-array`` (rewritten in place in text format),
    ``scalar``/``array`` (found anything: the whole value is replaced)."""

    oid: int
    name: str
    kind: str
    text_replacement: bytes
    binary_replacement: bytes | None
    decode_binary: Callable[[bytes], bytes] | None = attrs.field(default=None, eq=False, repr=False)
    decode_text: Callable[[bytes], bytes] | None = attrs.field(default=None, eq=False, repr=False)
    hash_text: Callable[[bytes], bytes] | None = attrs.field(default=None, eq=False, repr=False)
    hash_binary: Callable[[bytes], bytes] | None = attrs.field(default=None, eq=False, repr=False)


def _int_type(oid: int, name: str, code: str) -> _PgType:
    size = struct.calcsize(code)
    signed = code.islower()
    value_bits = 8 * size - (1 if signed else 0)

    def from_digest(digest: bytes) -> int:
        return int.from_bytes(digest[:8], "big") >> (64 - value_bits)

    return _PgType(
        oid,
        name,
        "scalar",
        b"0",
        bytes(size),
        decode_binary=lambda v: str(struct.unpack(code, v)[0]).encode("ascii"),
        hash_text=lambda d: str(from_digest(d)).encode("ascii"),
        hash_binary=lambda d: struct.pack(code, from_digest(d)),
    )


def _float_text(code: str) -> Callable[[bytes], bytes]:
    return lambda v: repr(struct.unpack(code, v)[0]).encode("ascii")


def _numeric_text(value: bytes) -> bytes:
    ndigits, weight, sign, dscale = struct.unpack_from("!hhHh", value)
    if sign == 0xC000:
        return b"NaN"
    if sign in (0xD000, 0xF000):
        return b"Infinity" if sign == 0xD000 else b"-Infinity"
    groups = struct.unpack_from(f"!{ndigits}H", value, 8)
    digits = "".join(f"{group:04d}" for group in groups)
    point = (weight + 1) * 4  # decimal digits before the point
    if point <= 0:
        digits, point = "0" * -point + digits, 0
    digits = digits.ljust(point, "0")
    integer = digits[:point].lstrip("0") or "0"
    fraction = digits[point:].ljust(dscale, "0")[:dscale]
    text = f"{integer}.{fraction}" if dscale else integer
    return (("-" if sign == 0x4000 else "") + text).encode("ascii")


def _numeric_binary(number: int) -> bytes:
    """Binary numeric of a non-negative integer: base-10000 digit groups, no trailing zeros."""
    groups: list[int] = []
    while number:
        number, group = divmod(number, 10000)
        groups.append(group)
    groups.reverse()
    weight = len(groups) - 1 if groups else 0
    while groups and groups[-1] == 0:
        groups.pop()
    return struct.pack(f"!hhHh{len(groups)}H", len(groups), weight, 0, 0, *groups)


def _date_text(value: bytes) -> bytes:
    (days,) = struct.unpack("!i", value)
    if days in (_INT32_MIN, _INT32_MAX):
        return b"infinity"
    try:
        return (_PG_EPOCH + datetime.timedelta(days=days)).isoformat().encode("ascii")
    except OverflowError:  # outside Python's years 1-9999: holds no date of birth
        return b""


def _timestamp_text(value: bytes) -> bytes:
    (micros,) = struct.unpack("!q", value)
    if micros in (_INT64_MIN, _INT64_MAX):
        return b"infinity"
    try:
        return (_PG_EPOCH_TIME + datetime.timedelta(microseconds=micros)).isoformat(" ").encode("ascii")
    except OverflowError:
        return b""


_BYTEA_ESCAPE = re.compile(rb"\\([0-7]{3}|\\)")


def _bytea_text_value(value: bytes) -> bytes:
    if value.startswith(b"\\x"):
        return bytes.fromhex(value[2:].decode("ascii"))
    return _BYTEA_ESCAPE.sub(lambda m: b"\\" if m.group(1) == b"\\" else bytes([int(m.group(1), 8) & 0xFF]), value)


def _text_type(oid: int, name: str) -> _PgType:
    return _PgType(oid, name, "text", REDACTED, REDACTED)


def _array(oid: int, name: str, element: int, kind: str = "array") -> _PgType:
    # an empty array: no dimensions, no NULL flag, the element type
    return _PgType(oid, name, kind, b"{}", struct.pack("!iiI", 0, 0, element))


_TYPES: dict[int, _PgType] = {
    t.oid: t
    for t in (
        _PgType(16, "bool", "scalar", b"f", b"\x00", decode_binary=lambda v: b"t" if v == b"\x01" else b"f"),
        _PgType(
            17,
            "bytea",
            "scalar",
            b"\\x",
            b"",
            decode_binary=lambda v: v,
            decode_text=_bytea_text_value,
            hash_text=lambda d: b"\\x" + d[:8].hex().encode("ascii"),
            hash_binary=lambda d: d[:8],
        ),
        _text_type(19, "name"),
        _int_type(20, "int8", "!q"),
        _int_type(21, "int2", "!h"),
        _int_type(23, "int4", "!i"),
        _text_type(25, "text"),
        _int_type(26, "oid", "!I"),
        _PgType(114, "json", "json", b'"[REDACTED]"', b'"[REDACTED]"'),
        _PgType(142, "xml", "xml", REDACTED, REDACTED),
        _PgType(650, "cidr", "scalar", b"0.0.0.0/0", b"\x02\x00\x01\x04" + bytes(4)),
        _PgType(700, "float4", "scalar", b"0", bytes(4), decode_binary=_float_text("!f")),
        _PgType(701, "float8", "scalar", b"0", bytes(8), decode_binary=_float_text("!d")),
        _text_type(705, "unknown"),
        _PgType(829, "macaddr", "scalar", b"00:00:00:00:00:00", bytes(6)),
        _PgType(869, "inet", "scalar", b"0.0.0.0", b"\x02\x20\x00\x04" + bytes(4)),
        _text_type(1042, "bpchar"),
        _text_type(1043, "varchar"),
        _PgType(1082, "date", "scalar", b"1900-01-01", struct.pack("!i", _REPLACEMENT_DAYS), decode_binary=_date_text),
        _PgType(1083, "time", "scalar", b"00:00:00", bytes(8)),
        _PgType(
            1114,
            "timestamp",
            "scalar",
            b"1900-01-01 00:00:00",
            struct.pack("!q", _REPLACEMENT_DAYS * _MICROSECONDS_PER_DAY),
            decode_binary=_timestamp_text,
        ),
        _PgType(
            1184,
            "timestamptz",
            "scalar",
            b"1900-01-01 00:00:00+00",
            struct.pack("!q", _REPLACEMENT_DAYS * _MICROSECONDS_PER_DAY),
            decode_binary=_timestamp_text,
        ),
        _PgType(1186, "interval", "scalar", b"00:00:00", bytes(16)),
        _PgType(1266, "timetz", "scalar", b"00:00:00+00", bytes(12)),
        _PgType(
            1700,
            "numeric",
            "scalar",
            b"0",
            _numeric_binary(0),
            decode_binary=_numeric_text,
            hash_text=lambda d: str(int.from_bytes(d[:8], "big") >> 1).encode("ascii"),
            hash_binary=lambda d: _numeric_binary(int.from_bytes(d[:8], "big") >> 1),
        ),
        _PgType(
            2950,
            "uuid",
            "scalar",
            b"00000000-0000-0000-0000-000000000000",
            bytes(16),
            decode_binary=lambda v: str(uuid.UUID(bytes=v)).encode("ascii"),
            hash_text=lambda d: str(uuid.UUID(bytes=d[:16])).encode("ascii"),
            hash_binary=lambda d: d[:16],
        ),
        _PgType(3802, "jsonb", "jsonb", b'"[REDACTED]"', b'\x01"[REDACTED]"'),
        _array(143, "_xml", 142, "text-array"),
        _array(199, "_json", 114, "text-array"),
        _array(651, "_cidr", 650),
        _array(1000, "_bool", 16),
        _array(1001, "_bytea", 17),
        _array(1003, "_name", 19, "text-array"),
        _array(1005, "_int2", 21),
        _array(1007, "_int4", 23),
        _array(1009, "_text", 25, "text-array"),
        _array(1014, "_bpchar", 1042, "text-array"),
        _array(1015, "_varchar", 1043, "text-array"),
        _array(1016, "_int8", 20),
        _array(1021, "_float4", 700),
        _array(1022, "_float8", 701),
        _array(1028, "_oid", 26),
        _array(1040, "_macaddr", 829),
        _array(1041, "_inet", 869),
        _array(1115, "_timestamp", 1114),
        _array(1182, "_date", 1082),
        _array(1183, "_time", 1083),
        _array(1185, "_timestamptz", 1184),
        _array(1187, "_interval", 1186),
        _array(1231, "_numeric", 1700),
        _array(2951, "_uuid", 2950),
        _array(3807, "_jsonb", 3802, "text-array"),
    )
}

_TYPE_NAMES: dict[str, int] = {t.name: t.oid for t in _TYPES.values()} | {
    # spellings other than PostgreSQL's internal names, for shapes that carry only a type name
    "integer": 23, "int": 23, "smallint": 21, "bigint": 20, "real": 700, "double precision": 701,
    "decimal": 1700, "boolean": 16, "character varying": 1043, "character": 1042, "char": 1042,
    "timestamp without time zone": 1114, "timestamp with time zone": 1184,
    "time without time zone": 1083, "time with time zone": 1266,
}  # fmt: skip

_UNKNOWN_TEXT = _PgType(0, "unknown", "foreign", b"", None)  # NULL when replaced whole
_UNTYPED = _PgType(0, "text", "text", REDACTED, None)  # no type information at all: text


def _type_of(column: Column, text_type_oids: Collection[int]) -> _PgType:
    oid = column.type_oid
    if oid in text_type_oids:
        return _PgType(oid, column.type_name or str(oid), "text", REDACTED, REDACTED)
    if oid == 0:
        oid = _TYPE_NAMES.get(column.type_name.strip().lower(), 0)
        if oid == 0:
            return _UNTYPED if not column.binary else _PgType(0, column.type_name, "foreign", b"", None)
    return _TYPES.get(oid) or _PgType(oid, column.type_name or str(oid), "foreign", b"", None)


def type_replacement(type_oid: int, binary: bool) -> bytes | None:
    """The value a masked whole cell of this type becomes (None: SQL NULL).

    Raises :class:`MaskingUnsupported` for a binary-format type this module does not know.
    """
    pg_type = _TYPES.get(type_oid)
    if pg_type is None:
        if binary:
            raise MaskingUnsupported(f"cannot mask type oid {type_oid} in binary format")
        return None
    return pg_type.binary_replacement if binary else pg_type.text_replacement


# --- encodings -------------------------------------------------------------------------------------

_PG_CODEC_NAMES = {"sjis": "shift_jis", "uhc": "cp949", "koi8r": "koi8_r", "koi8u": "koi8_u", "euccn": "gb2312"}


@functools.lru_cache(maxsize=32)
def _codec(encoding: str) -> str | None:
    """The Python codec to transcode text through, or None when the bytes can be scanned as they
    are (UTF-8, and SQL_ASCII where the server does no conversion at all)."""
    squeezed = encoding.lower().replace("-", "").replace("_", "")
    if squeezed in ("utf8", "sqlascii", "ascii", "usascii"):
        return None
    name = _PG_CODEC_NAMES.get(squeezed) or ("cp" + squeezed[3:] if squeezed.startswith("win") else encoding)
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise MaskingConfigError(f"unknown client encoding {encoding!r}") from None


# --- column matching ---------------------------------------------------------------------------------


def column_names(column: Column) -> tuple[str, ...]:
    """The lower-case names a column is matched by: ``table.name`` (or ``name`` with no table)
    and every source it was derived from."""
    own = f"{column.table}.{column.name}" if column.table else column.name
    return tuple(dict.fromkeys(name.lower() for name in (own, *sorted(column.sources))))


def column_matches(pattern: str, column: Column) -> bool:
    """Whether a rule's column glob matches the column (see the module docstring)."""
    pattern = pattern.lower()
    return any(fnmatch.fnmatchcase(name, pattern) for name in column_names(column))


def _rule_matches(rule: MaskRule, names: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in rule.columns for name in names)


# --- policy checks -------------------------------------------------------------------------------


def check_policy(
    rules: Sequence[MaskRule], recognizers: Sequence[RecognizerRule], settings: MaskingSettings
) -> None:
    """Refuse unusable masking configuration with :class:`MaskingConfigError` (for bundle loaders;
    :func:`compile_plan` checks the same)."""
    _check_policy(tuple(rules), tuple(recognizers), settings)


@functools.lru_cache(maxsize=64)
def _check_policy(rules: tuple[MaskRule, ...], recognizers: tuple[RecognizerRule, ...], settings: MaskingSettings) -> None:
    try:
        custom_names: set[str] = set()
        for recognizer in recognizers:
            if recognizer.name in custom_names:
                raise MaskingConfigError(f"custom recognizer {recognizer.name!r} is defined twice")
            compile_custom(recognizer)
            custom_names.add(recognizer.name)
        known = set(BUILTIN_RECOGNIZERS) | custom_names
        for rule in rules:
            if rule.strategy not in STRATEGIES:
                raise MaskingConfigError(f"mask rule {rule.name!r}: unknown strategy {rule.strategy!r} (use {', '.join(STRATEGIES)})")
            if not rule.columns:
                raise MaskingConfigError(f"mask rule {rule.name!r} names no columns")
            for name in rule.recognizers:
                if name not in known:
                    raise MaskingConfigError(f"mask rule {rule.name!r}: unknown recognizer {name!r}")
        if settings.untraced not in UNTRACED_MODES:
            raise MaskingConfigError(f"masking.untraced must be one of {', '.join(UNTRACED_MODES)}, not {settings.untraced!r}")
        for name in settings.default_recognizers:
            if name not in known:
                raise MaskingConfigError(f"default recognizer {name!r} is unknown")
            if name in BUILTIN_RECOGNIZERS and BUILTIN_RECOGNIZERS[name].column_only:
                raise MaskingConfigError(f"recognizer {name!r} only applies to columns a rule names, not as a default")
    except RecognizerError as exc:
        raise MaskingConfigError(str(exc)) from None


def _strongest(strategies: Sequence[str]) -> str:
    return max(strategies, key=_STRENGTH.__getitem__)


# --- rewriting values --------------------------------------------------------------------------------


def _rewrite_spans(
    data: bytes,
    spans: Sequence[Span],
    strategies: Mapping[str, str],
    recognizers: Mapping[str, Recognizer],
    keyed: _Keyed,
    quote: Callable[[int], bool] | None = None,
) -> bytes | None:
    """``data`` with every span replaced by its strategy's mask; None when a strategy is null.
    ``quote(i)``: write span ``i``'s mask as a JSON string (it stood outside one)."""
    pieces: list[bytes] = []
    last = 0
    for index, (start, end, names) in enumerate(spans):
        if len(names) == 1:
            name = names[0]
            strategy = strategies[name]
        else:
            name = ""
            strategy = _strongest([strategies[n] for n in names])
        found = data[start:end]
        if strategy == "redact":
            replacement = REDACTED
        elif strategy == "partial":
            replacement = recognizers[name].partial(found) if name else mask_keeping_last_digits(found)
        elif strategy == "hash":
            replacement = keyed.pseudonym(recognizers[name].canonical(found) if name else found)
        else:
            return None
        if quote is not None and quote(index):
            replacement = b'"' + replacement + b'"'
        pieces.append(data[last:start])
        pieces.append(replacement)
        last = end
    pieces.append(data[last:])
    return b"".join(pieces)


# A whole value that is an e-mail address: partial keeps the domain. A byte of it is anything
# but '@' and whitespace; \s spelled out (what it means in a bytes pattern), because `re` tests a
# class of plain bytes with one bitmap lookup but \s as a category test per byte.
_ADDRESS_BYTE = rb"[^@\x20\t\n\r\x0b\x0c]"
_EMAIL_VALUE = re.compile(rb"%s{1,64}(@%s+\.%s+)" % (_ADDRESS_BYTE, _ADDRESS_BYTE, _ADDRESS_BYTE))


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)  # each step takes a byte: linear
_JSON_NUMBER_BYTES = frozenset(b"0123456789+-.eE")


def _json_spans(data: bytes, spans: list[Span]) -> tuple[list[Span], Callable[[int], bool]]:
    """Spans of JSON text, those outside strings (numbers) widened to the whole number, and which
    of them must be written as a JSON string: a mask in place of a number is no JSON value."""
    strings = [match.span() for match in _JSON_STRING.finditer(data)]
    starts = [start for start, _ in strings]
    widened: list[Span] = []
    outside: set[int] = set()
    for start, end, names in spans:
        at = bisect.bisect_right(starts, start) - 1
        if at >= 0 and strings[at][0] < start and end <= strings[at][1]:
            widened.append(Span(start, end, names))
            continue
        while start > 0 and data[start - 1] in _JSON_NUMBER_BYTES:
            start -= 1
        while end < len(data) and data[end] in _JSON_NUMBER_BYTES:
            end += 1
        if widened and start < widened[-1].end:  # cannot happen for number tokens; never overlap
            raise MaskingError("overlapping spans in JSON text")
        outside.add(len(widened))
        widened.append(Span(start, end, names))
    return widened, outside.__contains__


# A whole value that is a date (as the dob recognizer writes them): partial keeps the year only.
# Keeping the last four digits would keep month and day, which Safe Harbor does not allow.
_DATE_VALUE = re.compile(rb"\s*([0-9]{4}-[0-9]{1,2}-[0-9]{1,2}|[0-9]{1,2}/[0-9]{1,2}/[0-9]{4})\s*")
# yyyy-mm-dd or mm/dd/yyyy: a value longer once stripped is no date (bytes.strip() strips the
# bytes \s matches)
_DATE_VALUE_MAX_BYTES = 10
_AT = ord("@")  # `int in bytes` searches at once; `bytes in bytes` first fails to read an int


def _partial_whole_text(value: bytes) -> bytes:
    # Cheap tests first: most values are neither an address nor a date, and a regex call costs
    # more than the rest of the mask.
    email = _EMAIL_VALUE.fullmatch(value) if _AT in value else None
    if email is not None:
        return b"****" + email[1]
    date = _DATE_VALUE.fullmatch(value) if len(value.strip()) <= _DATE_VALUE_MAX_BYTES else None
    if date is not None:
        return BUILTIN_RECOGNIZERS["dob"].partial(date[1])
    return mask_keeping_last_digits(value)


CellCounter = list[int]  # [count]: see _Tally


class _Tally:
    """Masked-cell counts per audit key, shared by a plan's steps.

    Each key counts in a one-element list (a :data:`CellCounter`) that the steps get when they
    are built and bump per masked cell: an item of a plain list is the cheapest counter CPython
    has (a ``Counter`` item, a dict subclass, cost several times as much per cell).
    """

    __slots__ = ("_cells",)

    def __init__(self) -> None:
        self._cells: dict[str, CellCounter] = {}

    def cell(self, key: str) -> CellCounter:
        """The counter of ``key``: bump ``cell[0]``. Steps sharing a key share its counter."""
        return self._cells.setdefault(key, [0])

    def counts(self) -> dict[str, int]:
        return {key: cell[0] for key, cell in self._cells.items() if cell[0]}


CellMask = Callable[[bytes], "bytes | None"]


# One column of a plan: (column index, mask, counter). The mask rewrites the column's non-NULL
# cells; the counter, when not None, counts every cell given to the mask (whole-value masks: the
# plan counts them, cheaper than a counting wrapper around each mask); a scanning mask counts
# what it finds itself. A plain tuple: unpacking one per step and row is cheapest.
_Step = tuple[int, CellMask, "CellCounter | None"]


@attrs.frozen
class _Context:
    keyed: _Keyed = attrs.field(repr=False)
    codec: str | None
    tally: _Tally = attrs.field(eq=False)


def _whole_value_mask(pg_type: _PgType, binary: bool, strategy: str, context: _Context) -> CellMask:
    """A function replacing a whole value of this type (it counts nothing: see ``_Step``).
    Raises MaskingUnsupported up front for what cannot be replaced in this format."""
    constant: bytes | None = None
    compute: CellMask | None = None
    kind = pg_type.kind
    if strategy == "null":
        constant = None
    elif kind == "foreign":
        if binary:
            raise MaskingUnsupported(
                f"cannot mask a {pg_type.name or 'value'} (type oid {pg_type.oid}) in binary format; "
                "ask for text format or use the null strategy"
            )
        constant = None
    else:
        constant = pg_type.binary_replacement if binary else pg_type.text_replacement
        if constant is None:
            raise MaskingUnsupported(f"cannot mask type {pg_type.name} in binary format")
        compute = _computed_whole_value(pg_type, binary, strategy, context)
    return compute if compute is not None else (lambda value: constant)


def _computed_whole_value(pg_type: _PgType, binary: bool, strategy: str, context: _Context) -> CellMask | None:
    """The mask of a whole value that depends on the value (partial, hash); None: a constant."""
    kind = pg_type.kind
    keyed = context.keyed
    if strategy == "partial" and kind == "text":
        return _transcoded(_partial_whole_text, context.codec)
    if strategy != "hash":
        return None
    # text is hashed as UTF-8 whatever the client encoding, so pseudonyms do not depend on it
    if kind in ("text", "xml"):
        return _transcoded(keyed.pseudonym, context.codec)
    if kind == "json" or (kind == "jsonb" and not binary):
        return _transcoded(lambda value: b'"' + keyed.pseudonym(value) + b'"', context.codec)
    if kind == "jsonb":
        quoted = _transcoded(keyed.pseudonym, context.codec)
        return lambda value: b'\x01"' + quoted(value[1:]) + b'"'
    make = pg_type.hash_binary if binary else pg_type.hash_text
    if make is None:
        return None
    readable = _readable(pg_type, binary)
    if readable is None:
        return lambda value: make(keyed.digest(value))
    return lambda value: make(keyed.digest(readable(value)))


def _readable(pg_type: _PgType, binary: bool) -> Callable[[bytes], bytes] | None:
    """Turns a value into bytes worth scanning (text), or None when that is the value itself."""
    if binary:
        return pg_type.decode_binary
    return pg_type.decode_text


def _transcoded(mask: CellMask, codec: str | None) -> CellMask:
    """Runs a text mask on UTF-8: values in another client encoding are converted there and back."""
    if codec is None:
        return mask

    def run(value: bytes) -> bytes | None:
        try:
            utf8 = value.decode(codec).encode("utf-8")
        except UnicodeError as exc:
            raise MaskingError(f"a value is not valid {codec}") from exc
        masked = mask(utf8)
        return None if masked is None else masked.decode("utf-8").encode(codec)

    return run


def _scanning_mask(
    pg_type: _PgType,
    binary: bool,
    scanner: Scanner,
    strategies: Mapping[str, str],
    label_prefix: str,
    context: _Context,
) -> tuple[CellMask, CellCounter | None]:
    """A function masking what ``scanner`` finds in a cell, counting per recognizer, and the
    counter of its cells when it counts none itself (a value that cannot be read goes whole)."""
    # the scanner finds only the recognizers of ``strategies``
    masked_by = {name: context.tally.cell(label_prefix + name) for name in strategies}
    keyed = context.keyed
    recognizers = scanner.recognizers
    find = scanner.find
    kind = pg_type.kind

    if _scannable_in_place(pg_type, binary):
        is_json = kind in ("json", "jsonb")

        def rewrite(data: bytes) -> bytes | None:
            spans = find(data)
            if not spans:
                return data
            for name in {n for span in spans for n in span.recognizers}:
                masked_by[name][0] += 1
            if is_json:
                spans, quote = _json_spans(data, spans)
                return _rewrite_spans(data, spans, strategies, recognizers, keyed, quote)
            return _rewrite_spans(data, spans, strategies, recognizers, keyed)

        in_encoding = _transcoded(rewrite, context.codec)
        if kind == "jsonb" and binary:
            return (lambda value: _jsonb_binary(value, in_encoding)), None
        return in_encoding, None

    # a non-text value: what is found makes the whole value go
    readable = _readable(pg_type, binary)
    if readable is None and binary:
        # cannot be read, so cannot be shown clean: replaced whole
        replace = _whole_value_mask(pg_type, binary, _strongest(list(strategies.values())), context)
        return replace, context.tally.cell(label_prefix + "unreadable")

    replacements = {
        strategy: _whole_value_mask(pg_type, binary, strategy, context) for strategy in set(strategies.values())
    }

    def scan_whole(value: bytes) -> bytes | None:
        try:
            text = readable(value) if readable is not None else value
        except (ValueError, struct.error) as exc:
            raise MaskingError(f"a {pg_type.name} value could not be decoded") from exc
        spans = find(text)
        if not spans:
            return value
        names = {n for span in spans for n in span.recognizers}
        for name in names:
            masked_by[name][0] += 1
        return replacements[_strongest([strategies[n] for n in names])](value)

    return scan_whole, None


def _scannable_in_place(pg_type: _PgType, binary: bool) -> bool:
    """Text whose found spans can be rewritten where they stand, the value staying valid."""
    if pg_type.kind in ("text", "json", "jsonb", "xml"):
        return True
    return pg_type.kind in ("text-array", "foreign") and not binary


def _jsonb_binary(value: bytes, rewrite: CellMask) -> bytes | None:
    if value[:1] != b"\x01":
        raise MaskingError("unknown jsonb binary version")
    masked = rewrite(value[1:])
    return None if masked is None else b"\x01" + masked


# --- COPY -------------------------------------------------------------------------------------------

_COPY_TEXT_UNESCAPE = re.compile(rb"\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|.)", re.DOTALL)
_COPY_TEXT_SIMPLE = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_COPY_TEXT_ESCAPES = {
    0x5C: b"\\\\", 0x08: b"\\b", 0x0C: b"\\f", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t", 0x0B: b"\\v"
}  # fmt: skip


def _copy_text_unescape(field: bytes) -> bytes:
    if b"\\" not in field:
        return field

    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code in _COPY_TEXT_SIMPLE:
            return _COPY_TEXT_SIMPLE[code]
        if code[:1] == b"x" and len(code) > 1:
            return bytes([int(code[1:], 16)])
        if 0x30 <= code[0] <= 0x37:  # octal
            return bytes([int(code, 8) & 0xFF])
        return code

    return _COPY_TEXT_UNESCAPE.sub(one, field)


@functools.lru_cache(maxsize=16)
def _copy_text_escaper(delimiter: bytes) -> Callable[[bytes], bytes]:
    escapes = dict(_COPY_TEXT_ESCAPES)
    escapes.setdefault(delimiter[0], b"\\" + delimiter)
    pattern = re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in escapes) + b"]")
    return lambda value: pattern.sub(lambda m: escapes[m.group()[0]], value)


@functools.lru_cache(maxsize=16)
def _copy_text_splitter(delimiter: bytes) -> re.Pattern[bytes]:
    return re.compile(rb"\\.|" + re.escape(delimiter), re.DOTALL)


def _split_copy_text(body: bytes, delimiter: bytes) -> list[bytes]:
    if b"\\" not in body:
        return body.split(delimiter)
    fields: list[bytes] = []
    start = 0
    for match in _copy_text_splitter(delimiter).finditer(body):
        if match.group() == delimiter:
            fields.append(body[start : match.start()])
            start = match.end()
    fields.append(body[start:])
    return fields


def _split_csv(body: bytes, delimiter: bytes, quote: bytes, escape: bytes) -> list[tuple[bytes, bytes, bool]]:
    """(raw field, value, quoted) per field of one CSV row."""
    fields: list[tuple[bytes, bytes, bool]] = []
    position = 0
    length = len(body)
    while True:
        if body[position : position + 1] == quote:
            start = position
            position += 1
            value = bytearray()
            while True:
                next_quote = body.find(quote, position)
                next_escape = body.find(escape, position) if escape != quote else -1
                if next_quote < 0:
                    raise MaskingError("unterminated quoted CSV field")
                if 0 <= next_escape < next_quote:
                    # ESCAPE escapes only a quote or itself; anywhere else it is data
                    escaped = body[next_escape + 1 : next_escape + 2]
                    if escaped in (quote, escape):
                        value += body[position:next_escape] + escaped
                        position = next_escape + 2
                    else:
                        value += body[position : next_escape + 1]
                        position = next_escape + 1
                    continue
                value += body[position:next_quote]
                if escape == quote and body[next_quote + 1 : next_quote + 2] == quote:
                    value += quote
                    position = next_quote + 2
                    continue
                position = next_quote + 1
                break
            fields.append((body[start:position], bytes(value), True))
            if position == length:
                return fields
            if body[position : position + 1] != delimiter:
                raise MaskingError("malformed CSV row: text after a closing quote")
            position += 1
        else:
            end = body.find(delimiter, position)
            if end < 0:
                fields.append((body[position:], body[position:], False))
                return fields
            fields.append((body[position:end], body[position:end], False))
            position = end + 1


def _csv_quote(value: bytes, quote: bytes, escape: bytes) -> bytes:
    if escape != quote:
        value = value.replace(escape, escape + escape)
    return quote + value.replace(quote, escape + quote) + quote


def _line_ending(line: bytes) -> tuple[bytes, bytes]:
    if line.endswith(b"\r\n"):
        return line[:-2], b"\r\n"
    if line.endswith(b"\n"):
        return line[:-1], b"\n"
    return line, b""


# --- the plan ---------------------------------------------------------------------------------------


class RowMasker:
    """A compiled masking plan for one result set.

    ``apply`` rewrites a row in place, ``mask_copy_line`` a COPY row, ``counts`` tells the audit
    trail how many cells were masked per ``column:recognizer`` (or ``column:rule``) key.
    ``deny_reason`` set means: refuse the statement (then ``apply`` raises).
    """

    __slots__ = ("deny_reason", "width", "_steps", "_text_steps", "_tally")

    def __init__(
        self,
        width: int,
        steps: Sequence[_Step],
        text_steps: Sequence[_Step],
        tally: _Tally,
        deny_reason: str | None = None,
    ) -> None:
        self.width = width
        self.deny_reason = deny_reason
        self._steps = tuple(steps)
        self._text_steps = tuple(text_steps)
        self._tally = tally

    def __repr__(self) -> str:
        if self.deny_reason:
            return f"RowMasker(deny: {self.deny_reason})"
        return f"RowMasker(columns={list(self.masked_columns)})"

    @property
    def masked_columns(self) -> tuple[int, ...]:
        return tuple(index for index, _, _ in self._steps)

    def counts(self) -> dict[str, int]:
        return self._tally.counts()

    def apply(self, cells: list[bytes | None]) -> None:
        """Mask one row in place. On any failure every cell the plan touches is set to NULL and
        :class:`MaskingError` is raised: the row must not be sent."""
        if self.deny_reason is not None:
            raise MaskingError(self.deny_reason)
        if len(cells) != self.width:
            raise MaskingError(f"row has {len(cells)} cells, the result has {self.width} columns")
        try:
            for index, mask, counter in self._steps:
                value = cells[index]
                if value is not None:
                    if counter is not None:
                        counter[0] += 1
                    cells[index] = mask(value)
        except Exception as exc:
            for index, _, _ in self._steps:
                cells[index] = None
            if isinstance(exc, MaskingError):
                raise
            raise MaskingError(f"masking failed ({type(exc).__name__})") from exc

    def mask_copy_line(
        self,
        line: bytes,
        copy_format: str,
        *,
        delimiter: bytes | None = None,
        null: bytes | None = None,
        quote: bytes = b'"',
        escape: bytes | None = None,
        header: bool = False,
    ) -> bytes:
        """Mask one row of COPY ... TO STDOUT data (PostgreSQL sends one row per CopyData).

        ``text``: tab-separated, ``\\N`` for NULL, backslash escapes (unescaped before masking,
        escaped again after). ``csv``: comma-separated, unquoted empty field for NULL, ``"``
        quoting with doubled quotes; masked fields are always written quoted. Non-default COPY
        options go in ``delimiter``/``null``/``quote``/``escape``. ``header`` (COPY's HEADER
        option) is accepted and ignored: the header line names columns, holds no row, and must
        not be passed here. Unchanged fields keep their original bytes.
        """
        if self.deny_reason is not None:
            raise MaskingError(self.deny_reason)
        if copy_format not in COPY_FORMATS:
            raise MaskingUnsupported(f"cannot mask COPY data in {copy_format!r} format")
        if not self._text_steps:
            return line
        body, ending = _line_ending(line)
        try:
            if copy_format == "text":
                return self._mask_copy_text(body, delimiter or b"\t", b"\\N" if null is None else null) + ending
            return self._mask_copy_csv(body, delimiter or b",", b"" if null is None else null, quote, escape or quote) + ending
        except MaskingError:
            raise
        except Exception as exc:
            raise MaskingError(f"masking a COPY row failed ({type(exc).__name__})") from exc

    def _mask_copy_text(self, body: bytes, delimiter: bytes, null: bytes) -> bytes:
        fields = _split_copy_text(body, delimiter)
        if len(fields) != self.width:
            raise MaskingError(f"COPY row has {len(fields)} fields, the result has {self.width} columns")
        escape = _copy_text_escaper(delimiter)
        for index, mask, counter in self._text_steps:
            raw = fields[index]
            if raw == null:
                continue
            value = _copy_text_unescape(raw)
            if counter is not None:
                counter[0] += 1
            masked = mask(value)
            if masked is None:
                fields[index] = null
            elif masked is not value:
                fields[index] = escape(masked)
        return delimiter.join(fields)

    def _mask_copy_csv(self, body: bytes, delimiter: bytes, null: bytes, quote: bytes, escape: bytes) -> bytes:
        fields = _split_csv(body, delimiter, quote, escape)
        if len(fields) != self.width:
            raise MaskingError(f"COPY row has {len(fields)} fields, the result has {self.width} columns")
        out = [raw for raw, _, _ in fields]
        for index, mask, counter in self._text_steps:
            raw, value, quoted = fields[index]
            if not quoted and raw == null:
                continue
            if counter is not None:
                counter[0] += 1
            masked = mask(value)
            if masked is None:
                out[index] = null
            elif masked is not value:
                out[index] = _csv_quote(masked, quote, escape)
        return delimiter.join(out)


def compile_plan(
    shape: ResultShape,
    rules: Sequence[MaskRule],
    recognizers: Sequence[RecognizerRule],
    settings: MaskingSettings,
    *,
    hash_key: bytes,
    encoding: str = "utf-8",
    text_type_oids: Collection[int] = (),
) -> RowMasker | None:
    """Compile the masking of one result set; None when no column needs anything.

    ``rules`` are the rules in force for this identity (exemptions already applied);
    ``recognizers`` the custom recognizers of the policy; ``encoding`` the client encoding of
    text values; ``text_type_oids`` extension types to treat as text (``citext``).
    Raises :class:`MaskingConfigError` for unusable rules and :class:`MaskingUnsupported` when a
    column cannot be masked in its format; a returned plan may carry ``deny_reason`` instead.
    """
    rules = tuple(rules)
    recognizers = tuple(recognizers)
    if not rules and not settings.default_recognizers:
        return None
    _check_policy(rules, recognizers, settings)
    if any(rule.strategy == "hash" for rule in rules) and len(hash_key) < MIN_HASH_KEY_BYTES:
        raise MaskingConfigError(f"the hash strategy needs a hash key of at least {MIN_HASH_KEY_BYTES} bytes")
    context = _Context(_Keyed(hash_key), _codec(encoding), _Tally())
    custom_names = tuple(r.name for r in recognizers)
    steps: list[_Step] = []
    text_steps: list[_Step] = []
    needs_text_steps = any(column.binary for column in shape.columns)

    for index, column in enumerate(shape.columns):
        names = column_names(column)
        matched = [rule for rule in rules if _rule_matches(rule, names)]
        whole_rules = [rule for rule in matched if not rule.recognizers]
        untraced = not column.traced and bool(rules)
        pg_type = _type_of(column, text_type_oids)
        label_prefix = f"{column.name}:"

        if whole_rules:
            strategy = _strongest([rule.strategy for rule in whole_rules])
            rule = next(r for r in whole_rules if r.strategy == strategy)
            label = label_prefix + rule.name

            def build(
                binary: bool, pg_type: _PgType = pg_type, strategy: str = strategy, label: str = label
            ) -> tuple[CellMask, CellCounter | None] | None:
                return _whole_value_mask(pg_type, binary, strategy, context), context.tally.cell(label)

        else:
            strategies: dict[str, str] = {}
            for rule in matched:
                for name in rule.recognizers:
                    strategies[name] = _strongest([strategies.get(name, rule.strategy), rule.strategy])
            scoped = bool(matched)
            if untraced:
                if settings.untraced == "deny":
                    return RowMasker(
                        len(shape.columns),
                        (),
                        (),
                        context.tally,
                        deny_reason=(
                            f"result column {column.name!r} could not be traced to its sources while "
                            "masking rules are in force (masking.untraced = deny)"
                        ),
                    )
                for name in FREE_TEXT_RECOGNIZERS + custom_names:
                    strategies.setdefault(name, "redact")
                scoped = True
            elif not matched and settings.default_recognizers:
                strategies = dict.fromkeys(settings.default_recognizers, "redact")
            if not strategies:
                continue
            only_in_place = not matched and not untraced  # defaults never replace whole values
            try:
                scanner = compile_scanner(strategies, recognizers, scoped=scoped)
            except RecognizerError as exc:
                raise MaskingConfigError(str(exc)) from None

            def build(
                binary: bool,
                pg_type: _PgType = pg_type,
                scanner: Scanner = scanner,
                strategies: dict[str, str] = strategies,
                label_prefix: str = label_prefix,
                only_in_place: bool = only_in_place,
            ) -> tuple[CellMask, CellCounter | None] | None:
                if only_in_place and not _scannable_in_place(pg_type, binary):
                    return None
                return _scanning_mask(pg_type, binary, scanner, strategies, label_prefix, context)

        built = build(column.binary)
        if built is not None:
            steps.append((index, *built))
        if needs_text_steps:
            built = build(False)
            if built is not None:
                text_steps.append((index, *built))

    if not steps and not text_steps:
        return None
    return RowMasker(len(shape.columns), steps, text_steps if needs_text_steps else steps, context.tally)


# --- free text and parameters ------------------------------------------------------------------------

_KEY_COLUMNS = r"\([^()\n]*(?:\([^()\n]*\)[^()\n]*)*\)"  # "(a, lower(b))": one level of nesting
_ECHOED_VALUES = tuple(
    re.compile(pattern, re.MULTILINE)
    for pattern in (
        # unique, foreign-key and exclusion violations: Key (columns)=(values) ...
        r"(Key " + _KEY_COLUMNS + r"=\()(.*?)(\) (?:already exists|is not present in table|"
        r"is still referenced from table|conflicts with existing key))",
        r"(conflicts with existing key " + _KEY_COLUMNS + r"=\()(.*)(\)\.?)$",
        # check and not-null violations echo the whole new row
        r"(Failing row contains \()(.*)(\)\.?)$",
        # bad input echoes the literal
        r'(invalid input (?:syntax|value) for (?:type|enum) [^:"\n]{1,64}: ")(.*)(")$',
        r'(value ")(.*?)(" is out of range for type )',
        r'(out of range: ")(.*)(")$',
    )
)
ECHOED_VALUE_KEY = "echoed-value"


def _redact_echoed_values(text: str) -> tuple[str, int]:
    """PostgreSQL error texts that quote row values (English server messages): the quoted
    values go whole, since names and diagnoses match no recognizer."""
    total = 0
    for pattern in _ECHOED_VALUES:
        text, count = pattern.subn(lambda m: m.group(1) + REDACTED.decode() + m.group(3), text)
        total += count
    return text, total


def mask_text(
    text: str,
    recognizers: Sequence[str] | None = None,
    strategy: str = "redact",
    *,
    custom: Sequence[RecognizerRule] = (),
    hash_key: bytes = b"",
    echoed_values: bool = True,
) -> tuple[str, dict[str, int]]:
    """Mask free text: error and notice fields, hints.

    First, with ``echoed_values``, the row values PostgreSQL quotes in its error texts go whole
    (``Key (ssn)=(…) already exists``, ``Failing row contains (…)``, ``invalid input syntax for
    type integer: "…"``): a name or a diagnosis in them matches no recognizer. Then what the
    recognizers find is masked with ``strategy``. ``recognizers`` defaults to every recognizer
    that works on free text (all built-ins but ``zip``, and every ``custom`` one), in free-text
    scope (see ``bastion.policies.recognizers``).

    Returns the masked text and counts: spans per recognizer, and echoed values under
    ``echoed-value``.
    """
    if strategy not in STRATEGIES or strategy == "null":
        raise MaskingConfigError(f"free text can be masked with redact, partial or hash, not {strategy!r}")
    if strategy == "hash" and len(hash_key) < MIN_HASH_KEY_BYTES:
        raise MaskingConfigError(f"the hash strategy needs a hash key of at least {MIN_HASH_KEY_BYTES} bytes")
    names = tuple(recognizers) if recognizers is not None else FREE_TEXT_RECOGNIZERS + tuple(r.name for r in custom)
    try:
        scanner = compile_scanner(names, tuple(custom), scoped=False)
    except RecognizerError as exc:
        raise MaskingConfigError(str(exc)) from None
    counts: Counter[str] = Counter()
    if echoed_values:
        text, echoed = _redact_echoed_values(text)
        if echoed:
            counts[ECHOED_VALUE_KEY] = echoed
    data = text.encode("utf-8", "surrogateescape")
    spans = scanner.find(data)
    if not spans:
        return text, dict(counts)
    counts.update(name for span in spans for name in span.recognizers)
    strategies = dict.fromkeys(scanner.names, strategy)
    masked = _rewrite_spans(data, spans, strategies, scanner.recognizers, _Keyed(hash_key))
    if masked is None:  # pragma: no cover - null is refused above
        raise MaskingError("free text cannot be NULLed")
    return masked.decode("utf-8", "surrogateescape"), dict(counts)


# every echoed-value pattern above needs one of these characters
_ECHO_MARKS = ("(", '"')


class TextMasker:
    """``mask_text(text, custom=custom)[0]`` (every free-text recognizer, redact, echoed values),
    with everything that does not depend on the text done once.

    The audit trail masks every cell of every recorded row again, so this is per cell: a value in
    which no recognizer finds anything (most of them) costs a substring test, an encode and one
    scan. Raises :class:`MaskingConfigError` when built, as ``mask_text`` would on every call.
    """

    __slots__ = ("_find", "_recognizers", "_strategies", "_keyed")

    def __init__(self, custom: Sequence[RecognizerRule] = ()) -> None:
        custom = tuple(custom)
        try:
            scanner = compile_scanner(FREE_TEXT_RECOGNIZERS + tuple(r.name for r in custom), custom, scoped=False)
        except RecognizerError as exc:
            raise MaskingConfigError(str(exc)) from None
        self._find = scanner.find
        self._recognizers = scanner.recognizers
        self._strategies = dict.fromkeys(scanner.names, "redact")
        self._keyed = _Keyed(b"")

    def __call__(self, text: str) -> str:
        if _ECHO_MARKS[0] in text or _ECHO_MARKS[1] in text:
            text = _redact_echoed_values(text)[0]
        data = text.encode("utf-8", "surrogateescape")
        spans = self._find(data)
        if not spans:
            return text
        masked = _rewrite_spans(data, spans, self._strategies, self._recognizers, self._keyed)
        assert masked is not None  # redact never NULLs
        return masked.decode("utf-8", "surrogateescape")


def mask_literal_values(
    values: Sequence[bytes | None],
    formats: Sequence[int] = (),
    type_oids: Sequence[int] = (),
    *,
    hash_key: bytes = b"",
) -> list[str | None]:
    """What the audit trail keeps of Bind parameters: never the value.

    Each parameter becomes a placeholder ``<text, 11 bytes>`` / ``<int4, 4 bytes, binary>``
    (``value`` when ``type_oids`` does not say), and with a ``hash_key`` the placeholder ends
    with the pseudonym of the raw parameter bytes (``<text, 11 bytes, h:3f9a0c1d2e4b5a69>``) so
    that an investigation can tell equal values apart without seeing them. NULL stays None.
    Like literals in the recorded statement text, parameters are never kept, not even when no
    recognizer finds anything in them: a name or a diagnosis matches no pattern. ``formats`` follows Bind: none means all text,
    one applies to all, otherwise one per parameter.
    """
    if hash_key and len(hash_key) < MIN_HASH_KEY_BYTES:
        raise MaskingConfigError(f"a hash key must have at least {MIN_HASH_KEY_BYTES} bytes")
    keyed = _keyed_for(bytes(hash_key)) if hash_key else None
    recorded: list[str | None] = []
    for position, value in enumerate(values):
        if value is None:
            recorded.append(None)
            continue
        if not formats:
            binary = False
        elif len(formats) == 1:
            binary = formats[0] == 1
        else:
            binary = position < len(formats) and formats[position] == 1
        oid = type_oids[position] if position < len(type_oids) else 0
        parts = [_TYPES[oid].name if oid in _TYPES else "value", f"{len(value)} bytes"]
        if binary:
            parts.append("binary")
        if keyed is not None:
            parts.append(keyed.pseudonym(bytes(value)).decode("ascii"))
        recorded.append(f"<{', '.join(parts)}>")
    return recorded
