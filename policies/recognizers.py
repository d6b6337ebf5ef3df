"""Recognizers: find personal data in text, validated, in one pass per value.

A recognizer is a loose candidate pattern plus a validator that decides (checksums, calendar,
number-plan rules, word boundaries). Masking works on bytes: UTF-8, or any ASCII-compatible
encoding after transcoding (see ``bastion.policies.masking``); every built-in pattern is ASCII.

Built-in recognizers (names as policy bundles spell them):

============ =============================================================================
``ssn``      US SSN ``123-45-6789``, ``123 45 6789`` or bare ``123456789``; rejects area 000,
             666, 900-999, group 00, serial 0000 and published sample numbers
             (078-05-1120, 219-09-9999). The bare form needs a keyword nearby (below).
``email``    ``local@domain.tld``; local part up to 64 bytes, domain labels checked.
``phone``    NANP ``(212) 555-0123``, ``212-555-0123``, ``212.555.0123``, ``+1 212 555 0123``,
             bare ``2125550123`` (keyword needed), with area and exchange starting 2-9;
             and E.164 ``+<country><number>``, 8-15 digits, separators allowed.
``card``     payment card, 13-19 digits, spaces or dashes allowed, Luhn checksum.
``npi``      US National Provider Identifier: 10 digits starting 1 or 2, Luhn over the
             number prefixed with 80840. Bare digits, so a keyword is needed (below).
``iban``     IBAN in upper case, electronic or print format (groups of four), country
             length table, ISO 7064 mod 97 == 1.
``dob``      dates of birth ``yyyy-mm-dd`` and ``mm/dd/yyyy`` that are real dates from 1800 on.
``ipv4``     dotted quad, every octet 0-255.
``ipv6``     candidates validated by :mod:`ipaddress`.
``zip``      US ZIP ``12345`` / ``12345-6789``: column scope only (below).
============ =============================================================================

Scopes. Dates, nine- and ten-digit numbers and five-digit numbers are everywhere, so where a
recognizer may fire depends on whether a policy rule vouches for the column:

* *column scope* (``scoped=True``): a masking rule names this column and this recognizer, or the
  column is untraced and masked by "mask-all". Every real date is a ``dob``, bare forms are
  accepted, ``zip`` is allowed.
* *free text* (``scoped=False``): default recognizers, error and notice text. ``dob``, the bare
  ``ssn`` and ``phone`` forms and ``npi`` count only with a keyword (``dob``, ``birth``,
  ``ssn``, ``phone``, ``npi``… see ``_KEYWORDS``) in the :data:`KEYWORD_WINDOW` bytes before the
  candidate; ``zip`` is refused (:class:`RecognizerError`) because five digits alone mean nothing.

Engines. The built-in patterns are stdlib :mod:`re` patterns, all combined into one alternation
(named by group index) that starts with a single byte class, the union of the bytes a candidate
can start with (digits, ``@``, ``:``, ``(``, ``+``): ``re`` skips every other byte in C before it
tries any form. Trying the forms at a digit costs far more, so a value is searched only when its
*shape* (each byte replaced by its class: digit, separator, upper-case letter, ``@:(+``) holds
what some form needs, such as a separator between two digits or nine digits in a row (see
"prefilter" below); most cells whose only digits are short numbers are never searched. They are
linear-safe: every quantifier is bounded (the longest candidate is under 600 bytes), no
quantified group nests another unbounded one, and the validators look at most a bounded distance
around a candidate, so the work per start position is bounded by a constant
(``test_adversarial_input_completes`` runs 60 kB of repeated worst-case units). The same
alternation built for ``re2`` (lookarounds removed) was measured slower on every input shape:
62 vs 131 MB/s on plain 133-byte cells, 22 vs 59 MB/s on cells with dates and numbers, 40 vs
59 MB/s on one 2.3 MB text, 6 us vs 0.9 us per call (CPU time, CPython 3.11). So ``re2`` is used
where the pattern is untrusted: custom recognizers from policy bundles. They form one RE2
alternation, a second pass that runs only when custom recognizers are active and only on values
that hold a byte one of them can start with.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import attrs
import re2

from bastion.policies.model import RecognizerRule

__all__ = [
    "BUILTIN_RECOGNIZERS",
    "FREE_TEXT_RECOGNIZERS",
    "KEYWORD_WINDOW",
    "Recognizer",
    "RecognizerError",
    "Scanner",
    "Span",
    "compile_custom",
    "compile_scanner",
    "iban_valid",
    "luhn_valid",
    "npi_valid",
    "ssn_valid",
]


class RecognizerError(ValueError):
    """A recognizer cannot be used: unknown name, invalid custom pattern, wrong scope."""


# --- limits ------------------------------------------------------------------------------------

KEYWORD_WINDOW = 40
"""Bytes before a candidate searched for a keyword: room for a label such as
``date of birth (mm/dd/yyyy): `` but not for the previous sentence's data."""

MAX_EMAIL_LOCAL_PART = 64  # RFC 5321's limit; also bounds the walk back from '@'
IPV6_MAX_CHARS = 45  # eight groups with an IPv4 tail: "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
MIN_BIRTH_YEAR = 1800  # older "dates of birth" are sentinels (0001-01-01), not people
PARTIAL_KEEP_DIGITS = 4  # "partial" keeps this many trailing digits…
PARTIAL_MIN_MASKED_DIGITS = 4  # …only when at least this many digits stay hidden
ZIP_KEEP_DIGITS = 3  # HIPAA Safe Harbor allows the first three ZIP digits (with exceptions below)

MAX_CUSTOM_PATTERN_CHARS = 1000  # an identifier pattern is tens of characters; more is a mistake
MAX_CUSTOM_PROGRAM_SIZE = 10_000  # RE2 instructions; `.{1000}` is ~8000, each custom slows every scan
CUSTOM_PATTERNS_MAX_MEMORY = 32 << 20  # RE2 DFA budget for the custom alternation (falls back to NFA)
_CUSTOM_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}\Z")  # names go into audit keys "column:name"


# --- checksums ---------------------------------------------------------------------------------

# digit byte -> its value, and -> the digit sum of twice its value ("double-add-double")
_LUHN_SINGLE = bytes((b - 48) % 256 for b in range(256))
_LUHN_DOUBLE = bytes((0, 2, 4, 6, 8, 1, 3, 5, 7, 9)[b - 48] if 48 <= b <= 57 else 0 for b in range(256))


def luhn_valid(digits: bytes | str) -> bool:
    """Luhn (mod 10) over ASCII digits; the last digit is the check digit."""
    if isinstance(digits, str):
        digits = digits.encode("ascii")
    if len(digits) < 2 or not digits.isdigit():
        return False
    backwards = digits[::-1]
    return (sum(backwards[0::2].translate(_LUHN_SINGLE)) + sum(backwards[1::2].translate(_LUHN_DOUBLE))) % 10 == 0


def npi_valid(digits: bytes | str) -> bool:
    """A 10-digit NPI starting with 1 or 2 whose Luhn check includes the 80840 card prefix."""
    if isinstance(digits, str):
        digits = digits.encode("ascii")
    return len(digits) == 10 and digits[:1] in (b"1", b"2") and luhn_valid(b"80840" + digits)


def mod97_valid(text: bytes | str) -> bool:
    """ISO 7064 mod 97-10 as IBANs use it: move the first four characters to the end, letters
    become 10..35, and the number must leave remainder 1."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.upper()
    if len(text) < 5 or not text.isascii() or not text.isalnum():
        return False
    rearranged = text[4:] + text[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


_IBAN_LENGTHS = {
    # ISO 13616 registry lengths for the countries whose IBANs turn up most.
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18,
    "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30,
    "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28,
    "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_valid(text: bytes | str) -> bool:
    """An IBAN (spaces ignored): known country, that country's length, mod 97 == 1."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    compact = text.replace(" ", "").upper()
    return _IBAN_LENGTHS.get(compact[:2]) == len(compact) and compact[2:4].isdigit() and mod97_valid(compact)


_SSN_PUBLISHED_SAMPLES = frozenset({b"078051120", b"219099999"})  # wallet insert, SSA pamphlet


def ssn_valid(digits: bytes | str) -> bool:
    """Nine digits that could be an issued SSN (structure only: SSNs carry no check digit)."""
    if isinstance(digits, str):
        digits = digits.encode("ascii")
    if len(digits) != 9 or not digits.isdigit():
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return not (
        area in (b"000", b"666")
        or area[:1] == b"9"
        or group == b"00"
        or serial == b"0000"
        or digits in _SSN_PUBLISHED_SAMPLES
    )


# --- byte helpers ------------------------------------------------------------------------------

_DIGIT_BYTES = frozenset(b"0123456789")
_ALNUM_BYTES = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HEX_BYTES = frozenset(b"0123456789ABCDEFabcdef")
_EMAIL_LOCAL_BYTES = frozenset(
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.!#$%&*+=?^_~-" + bytes(range(0x80, 0x100))
)
_NOT_DIGITS = bytes(b for b in range(256) if b not in _DIGIT_BYTES)
_NOT_ALNUM = bytes(b for b in range(256) if b not in _ALNUM_BYTES)
STAR = 0x2A  # '*', the mask character of "partial"


def _digits(span: bytes) -> bytes:
    return span.translate(None, _NOT_DIGITS)


def _alnum_at(data: bytes, index: int) -> bool:
    return 0 <= index < len(data) and data[index] in _ALNUM_BYTES


_KEYWORDS = {
    "ssn": (b"ssn", b"social sec", b"ss#", b"ss #", b"ss no"),
    "phone": (b"phone", b"tel", b"cell", b"mobile", b"fax"),
    "npi": (b"npi", b"provider"),
    "dob": (b"dob", b"d.o.b", b"birth", b"born"),
}


def _keyword_before(data: bytes, start: int, recognizer: str) -> bool:
    window = data[max(0, start - KEYWORD_WINDOW) : start].lower()
    return any(keyword in window for keyword in _KEYWORDS[recognizer])


def _bare_accepted(data: bytes, start: int, end: int, scoped: bool, recognizer: str) -> bool:
    """A separator-less number counts only as a whole word, and outside column scope only next
    to a keyword."""
    if _alnum_at(data, start - 1) or _alnum_at(data, end):
        return False
    return scoped or _keyword_before(data, start, recognizer)


# --- validators: (data, start, end, scoped) -> accepted (start, end) or None -------------------
# The combined pattern reports where a candidate starts; some validators move the start left
# (email from '@', IBAN from its check digits, IPv6 to the start of its first group) or the end
# left (a card followed by another number).

Bounds = tuple[int, int]
Validator = Callable[[bytes, int, int, bool], "Bounds | None"]


def _validate_ssn(data: bytes, start: int, end: int, scoped: bool) -> Bounds | None:
    span = data[start:end]
    if len(span) == 9 and not _bare_accepted(data, start, end, scoped, "ssn"):
        return None
    return (start, end) if ssn_valid(_digits(span)) else None


def _nanp_valid(national: bytes) -> bool:
    return len(national) == 10 and national[0] >= 0x32 and national[3] >= 0x32


def _validate_phone(data: bytes, start: int, end: int, scoped: bool) -> Bounds | None:
    span = data[start:end]
    digits = _digits(span)
    if span[:1] == b"+":
        if _alnum_at(data, start - 1) or not 8 <= len(digits) <= 15 or digits[:1] == b"0":
            return None
        if digits[:1] == b"1":  # +1 is the NANP: the national number must be a valid one
            return (start, end) if len(digits) == 11 and _nanp_valid(digits[1:]) else None
        return start, end
    national = digits[1:] if len(digits) == 11 and digits[:1] == b"1" else digits
    if not _nanp_valid(national):
        return None
    if len(span) == len(digits) and not _bare_accepted(data, start, end, scoped, "phone"):
        return None
    return start, end


_CARD_SEPARATOR = re.compile(rb"[\x20-]")


def _validate_card(data: bytes, start: int, end: int, scoped: bool) -> Bounds | None:
    if data[start] == 0x30:  # no card network issues numbers starting with 0
        return None
    span = data[start:end]
    groups = _CARD_SEPARATOR.split(span)
    if len(groups) == 1:
        if _alnum_at(data, start - 1) or _alnum_at(data, end):
            return None
        return (start, end) if luhn_valid(span) else None
    # The pattern took as many groups as it could; fewer are the card when another number
    # follows after a separator ("4111 1111 1111 1111 2024").
    for count in range(len(groups), 2, -1):
        digits = b"".join(groups[:count])
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return start, start + sum(map(len, groups[:count])) + count - 1
    return None


def _validate_npi(data: bytes, start: int, end: int, scoped: bool) -> Bounds | None:
    if not _bare_accepted(data, start, end, scoped, "npi"):
        return None
    return (start, end) if npi_valid(data[start:end]) else None


def _date_parts(span: bytes) -> tuple[int, int, int] | None:
    """(year, month, day) of ``yyyy-mm-dd`` or ``m/d/yyyy``, or None."""
    if span[4:5] == b"-":
        year, month, day = span[:4], span[5:7], span[8:10]
    else:
        month, day, year = span.split(b"/")
    try:
        parsed = datetime.date(int(year), int(month), int(day))
    except ValueError:
        return None
    return parsed.year, parsed.month, parsed.day


def _validate_dob(data: bytes, start: int, end: int, scoped: bool) -> Bounds | None:
    parts = _date_parts(data[start:end])
    if parts is None or parts[0] < MIN_BIRTH_YEAR:
        return None
    if not scoped and not _keyword_before(data, start, "dob"):
        return None
    return start, end


def _validate_ipv4(data: bytes, start: int, end: int, scoped: bool) -> Bounds | None:
    octets = data[start:end].split(b".")
    return (start, end) if all(int(octet) <= 255 for octet in octets) else None


def _validate_ipv6(data: bytes, start: int, end: int, scoped: bool) -> Bounds | None:
    # the candidate may start inside the first group ("fe80::1" is found at its '8')
    while start > 0 and data[start - 1] in _HEX_BYTES and end - start < IPV6_MAX_CHARS:
        start -= 1
    if _alnum_at(data, start - 1):
        return None
    if start > 1 and data[start - 1] in b":." and data[start - 2] in _HEX_BYTES:
        return None  # continues a longer address-like run; "ip:fe80::1" is fine
    while end > start and data[end - 1] in b".:" and data[end - 2 : end] != b"::":
        end -= 1
    if _alnum_at(data, end) or end - start < 3:
        return None
    candidate = data[start:end]
    # cheap filters before ipaddress: times (10:30:00), MAC addresses, colon runs
    compressions = candidate.count(b"::")
    if compressions > 1 or b":::" in candidate or (compressions == 0 and candidate.count(b":") < 6):
        return None
    try:
        ipaddress.IPv6Address(candidate.decode("ascii"))
    except ValueError:
        return None
    return start, end


def _validate_email(data: bytes, start: int, end: int, scoped: bool) -> Bounds | None:
    at = start  # the candidate starts at '@'
    local_start = at
    while local_start > 0 and at - local_start < MAX_EMAIL_LOCAL_PART and data[local_start - 1] in _EMAIL_LOCAL_BYTES:
        local_start -= 1
    while local_start < at and data[local_start] == 0x2E:  # a local part does not start with '.'
        local_start += 1
    if local_start == at:
        return None
    if data[local_start:at].strip(b"*") == b"":
        # ``****@example.org`` is what the partial strategy leaves: already masked, not an address
        return None
    labels = data[at + 1 : end].split(b".")
    top = labels[-1]
    if len(top) < 2 or top.isdigit():
        return None
    if any(label.startswith(b"-") or label.endswith(b"-") for label in labels):
        return None
    return local_start, end


def _validate_iban(data: bytes, start: int, end: int, scoped: bool) -> Bounds | None:
    start -= 2  # the candidate starts at the first check digit; the country code precedes it
    if _alnum_at(data, start - 1):
        return None
    expected = _IBAN_LENGTHS.get(data[start : start + 2].decode("ascii"))
    if expected is None:
        return None
    characters = 0
    position = start
    while characters < expected and position < end:
        byte = data[position]
        if byte == 0x20:
            # print format: a single space after every group of four, nowhere else
            if characters % 4 or data[position - 1] == 0x20:
                return None
        else:
            characters += 1
        position += 1
    if characters != expected or _alnum_at(data, position):
        return None
    return (start, position) if mod97_valid(data[start:position].replace(b" ", b"")) else None


def _validate_zip(data: bytes, start: int, end: int, scoped: bool) -> Bounds | None:
    if _alnum_at(data, start - 1) or _alnum_at(data, end) or data[start : start + 5] == b"00000":
        return None
    return start, end


# --- partial masks and hash inputs ----------------------------------------------------------------

_STAR_LETTERS = bytes(
    STAR if (b in _ALNUM_BYTES and b not in _DIGIT_BYTES) or b >= 0x80 else b for b in range(256)
)
_STAR_ALNUM = bytes(STAR if b in _ALNUM_BYTES or b >= 0x80 else b for b in range(256))
_DIGIT_MARKS = bytes(0x30 if b in _DIGIT_BYTES else 0x2E for b in range(256))  # digit: "0", else "."


def mask_keeping_last_digits(value: bytes) -> bytes:
    """Letters (and non-ASCII bytes) become ``*``; digits too, except the last
    :data:`PARTIAL_KEEP_DIGITS` when at least :data:`PARTIAL_MIN_MASKED_DIGITS` others stay
    hidden. Separators stay."""
    # Every byte as "digit or not", so that bytes methods in C count the digits and find the
    # one where the kept tail starts (a regex over the reversed value cost far more per cell).
    marks = value.translate(_DIGIT_MARKS)
    if marks.count(b"0") - PARTIAL_KEEP_DIGITS < PARTIAL_MIN_MASKED_DIGITS:
        return value.translate(_STAR_ALNUM)
    tail = value[-PARTIAL_KEEP_DIGITS:]
    if tail.isdigit():  # the usual case (SSNs, phone and card numbers): the tail stays as it is
        return value[:-PARTIAL_KEEP_DIGITS].translate(_STAR_ALNUM) + tail
    cut = len(marks.rsplit(b"0", PARTIAL_KEEP_DIGITS)[0])  # where the last digits kept begin
    return value.translate(_STAR_ALNUM)[:cut] + value[cut:].translate(_STAR_LETTERS)


def _partial_email(span: bytes) -> bytes:
    return b"****" + span[span.rindex(b"@") :]


def _partial_dob(span: bytes) -> bytes:
    # HIPAA Safe Harbor lets the year stand
    if span[4:5] == b"-":
        return span[:4] + span[4:].translate(_STAR_ALNUM)
    year_at = span.rindex(b"/") + 1
    return span[:year_at].translate(_STAR_ALNUM) + span[year_at:]


# Three-digit ZIP areas with 20,000 people or fewer (2000 census, 67 FR 53182): Safe Harbor
# requires them written as 000.
_SPARSE_ZIP_AREAS = frozenset(
    b"036 059 063 102 203 556 692 790 821 823 830 831 878 879 884 890 893".split()
)


def _partial_zip(span: bytes) -> bytes:
    area = span[:ZIP_KEEP_DIGITS]
    if area in _SPARSE_ZIP_AREAS:
        area = b"000"
    return area + span[ZIP_KEEP_DIGITS:].translate(_STAR_ALNUM)


def _partial_all(span: bytes) -> bytes:
    return span.translate(_STAR_ALNUM)


def _canonical_digits(span: bytes) -> bytes:
    return _digits(span)


def _canonical_phone(span: bytes) -> bytes:
    digits = _digits(span)
    return digits[1:] if len(digits) == 11 and digits[:1] == b"1" else digits


def _canonical_dob(span: bytes) -> bytes:
    parts = _date_parts(span)
    return b"%04d-%02d-%02d" % parts if parts else span


def _canonical_ip(span: bytes) -> bytes:
    try:
        return str(ipaddress.ip_address(span.decode("ascii"))).encode("ascii")
    except ValueError:
        return span


def _canonical_alnum_upper(span: bytes) -> bytes:
    return span.translate(None, _NOT_ALNUM).upper()


def _identity(span: bytes) -> bytes:
    return span


# --- recognizers -------------------------------------------------------------------------------


@attrs.frozen
class Recognizer:
    """What masking needs to know about a recognizer besides finding it.

    ``partial`` turns a found span into its "partial" mask; ``canonical`` is the span as the
    keyed hash sees it, so that ``123-45-6789`` and ``123456789`` get the same pseudonym.
    ``column_only``: usable only in column scope (``zip``).
    """

    name: str
    description: str
    partial: Callable[[bytes], bytes] = attrs.field(eq=False, repr=False)
    canonical: Callable[[bytes], bytes] = attrs.field(eq=False, repr=False)
    column_only: bool = False
    custom: bool = False


BUILTIN_RECOGNIZERS: dict[str, Recognizer] = {
    r.name: r
    for r in (
        Recognizer("ssn", "US social security number", mask_keeping_last_digits, _canonical_digits),
        Recognizer("email", "e-mail address", _partial_email, bytes.lower),
        Recognizer("phone", "NANP or E.164 phone number", mask_keeping_last_digits, _canonical_phone),
        Recognizer("card", "payment card number (Luhn)", mask_keeping_last_digits, _canonical_digits),
        Recognizer("npi", "US national provider identifier", mask_keeping_last_digits, _canonical_digits),
        Recognizer("iban", "international bank account number", mask_keeping_last_digits, _canonical_alnum_upper),
        Recognizer("dob", "date of birth", _partial_dob, _canonical_dob),
        Recognizer("ipv4", "IPv4 address", _partial_all, _canonical_ip),
        Recognizer("ipv6", "IPv6 address", _partial_all, _canonical_ip),
        Recognizer("zip", "US ZIP code", _partial_zip, _canonical_digits, column_only=True),
    )
}

FREE_TEXT_RECOGNIZERS: tuple[str, ...] = tuple(n for n, r in BUILTIN_RECOGNIZERS.items() if not r.column_only)
"""Every built-in recognizer that may run outside column scope (all but ``zip``)."""


# --- prefilter --------------------------------------------------------------------------------
# One `re` search costs little per plain byte but thousands of instructions per digit it has to
# try as a start, and most cells with digits hold short numbers no form takes ("visit 1234;").
# So a scan first looks at the value's *shape*, every byte replaced by its class:
#
#   "0"  a digit                       "-"  a byte forms allow between digits: - . / space
#   "A"  an upper-case letter          "!"  a byte other forms start with: @ : ( +
#   "x"  anything else
#
# Each form lists in ``needs`` strings at least one of which the shape of any text it matches
# holds (the comment at each form says why), and a value whose shape holds none of a scanner's
# needs is not searched: nothing could match. Substring tests on a str run in C, without
# per-position work; the property tests compare the filtered scan with the plain one.

_SHAPE = bytes(
    0x30 if b in _DIGIT_BYTES
    else 0x2D if b in b"-./ "
    else 0x41 if 0x41 <= b <= 0x5A
    else 0x21 if b in b"@:(+"
    else 0x78
    for b in range(256)
)  # fmt: skip


def _fewest_needs(needs: Iterable[str]) -> tuple[str, ...]:
    """The needs worth testing: one that contains another is implied by it."""
    unique = set(needs)
    return tuple(sorted(need for need in unique if not any(other != need and other in need for other in unique)))


@attrs.frozen
class _Form:
    """One candidate shape: ``first`` is the set of bytes it can start with, ``rest`` the stdlib
    ``re`` pattern for the remainder (only non-capturing groups, every quantifier bounded).
    ``needs``: the shape of any text the form matches holds one of these (see the prefilter).
    ``run_start``: the first byte is a digit that does not continue an earlier number."""

    recognizer: str
    first: bytes
    rest: bytes
    validate: Validator = attrs.field(eq=False, repr=False)
    needs: tuple[str, ...]
    run_start: bool = False


_D = b"0123456789"
_RUN_START = rb"(?<=[0-9])(?<![0-9].)"  # the digit just consumed does not continue an earlier number
_NO_MORE_DIGITS = rb"(?![0-9])"
_SEP = rb"[-.\x20]?"
_NANP_AFTER_AREA = rb"[2-9][0-9]{2}" + _SEP + rb"[0-9]{4}" + _NO_MORE_DIGITS


def _number(recognizer: str, first: bytes, rest: bytes, validate: Validator, needs: tuple[str, ...]) -> _Form:
    return _Form(recognizer, first, rest, validate, needs, run_start=True)


# Needs in the shape alphabet: a separator between two digits; nine digits in a row (no form
# but zip, five, takes a shorter number without separators); a byte of "@:(+".
_SEPARATED = "0-0"
_NINE_DIGITS = "0" * 9
_MARK = "!"


_FORMS: tuple[_Form, ...] = (
    # Order decides only which recognizer claims text two of them would accept at the same start;
    # forms whose candidates are often rejected (times, dates without a keyword, digit groups)
    # come last among the numbers, because a rejected candidate is offered to every later form.
    # Consecutive number forms share one run-start check in the combined pattern.
    # The last argument is the form's needs (prefilter above): each comment says why. Where a
    # pattern allows a separator, it stands between two digits, so "0-0" covers every separator.
    #
    # e-mail, from the '@': domain labels of at most 63 bytes (DNS), up to 9 of them; the
    # validator walks back over the local part
    _Form("email", b"@", rb"[A-Za-z0-9\x80-\xff-]{1,63}(?:\.[A-Za-z0-9\x80-\xff-]{1,63}){1,8}", _validate_email,
          (_MARK,)),
    # 123-45-6789, 123 45 6789 or nine digits
    _number("ssn", _D, rb"[0-9]{2}(?:-[0-9]{2}-|\x20[0-9]{2}\x20|[0-9]{2})[0-9]{4}" + _NO_MORE_DIGITS, _validate_ssn,
            (_SEPARATED, _NINE_DIGITS)),
    # ten digits
    _number("npi", b"12", rb"[0-9]{9}" + _NO_MORE_DIGITS, _validate_npi, (_NINE_DIGITS,)),
    # ten digits, separators optional
    _number("phone", b"23456789", rb"[0-9]{2}" + _SEP + _NANP_AFTER_AREA, _validate_phone, (_SEPARATED, _NINE_DIGITS)),
    # 1, then ten digits with optional separators or "(212)"
    _number("phone", b"1", _SEP + rb"(?:\([2-9][0-9]{2}\)\x20?|[2-9][0-9]{2}" + _SEP + b")" + _NANP_AFTER_AREA, _validate_phone,
            (_MARK, _SEPARATED, _NINE_DIGITS)),
    # country code, then the two check digits
    _number("iban", _D, rb"(?<=[A-Z][A-Z][0-9])[0-9](?:\x20?[A-Z0-9]){11,30}", _validate_iban, ("AA00",)),
    # a '.' between digits
    _number("ipv4", _D, rb"(?<!\..)[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![0-9]|\.[0-9])", _validate_ipv4,
            (_SEPARATED,)),
    # five digits
    _number("zip", _D, rb"[0-9]{4}(?:-[0-9]{4})?" + _NO_MORE_DIGITS, _validate_zip, ("0" * 5,)),
    # a '-' or '/' between digits
    _number("dob", b"12", rb"[0-9]{3}-[0-9]{2}-[0-9]{2}" + _NO_MORE_DIGITS, _validate_dob, (_SEPARATED,)),
    _number("dob", _D, rb"[0-9]?/[0-9]{1,2}/[0-9]{4}" + _NO_MORE_DIGITS, _validate_dob, (_SEPARATED,)),
    # bare, or grouped as cards are printed: a group of four, then groups of 3-6 digits
    # (4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3) separated by a space or a dash
    _number("card", _D, rb"(?:[0-9]{12,18}|[0-9]{3}(?:[\x20-][0-9]{3,6}){2,4})" + _NO_MORE_DIGITS, _validate_card,
            (_SEPARATED, _NINE_DIGITS)),
    # with a ':'
    _number("ipv6", _D, rb"[0-9A-Fa-f]{0,3}:[0-9A-Fa-f:.]{1,%d}" % (IPV6_MAX_CHARS - 1), _validate_ipv6, (_MARK,)),
    _Form("phone", b"(", rb"[2-9][0-9]{2}\)\x20?" + _NANP_AFTER_AREA, _validate_phone, (_MARK,)),
    _Form("phone", b"+", rb"1\x20?\([2-9][0-9]{2}\)\x20?" + _NANP_AFTER_AREA, _validate_phone, (_MARK,)),
    _Form("phone", b"+", rb"[1-9](?:" + _SEP + rb"[0-9]){7,14}" + _NO_MORE_DIGITS, _validate_phone, (_MARK,)),
    _Form("ipv6", b":", rb"(?<![0-9].)(?!::)[0-9A-Fa-f:.]{1,%d}" % (IPV6_MAX_CHARS - 1), _validate_ipv6,
          (_MARK,)),  # not ":::"
)


def _alternation(forms: Sequence[_Form]) -> bytes:
    """One capturing group per form, in order; runs of number forms share their run-start check."""
    parts: list[bytes] = []
    numbers: list[bytes] = []
    for form in forms:
        if form.run_start:
            own_check = b"" if set(form.first) == set(_D) else b"(?<=%s)" % _byte_class(form.first)
            numbers.append(b"(%s%s)" % (own_check, form.rest))
            continue
        if numbers:
            parts.append(_RUN_START + b"(?:" + b"|".join(numbers) + b")")
            numbers = []
        parts.append(b"((?<=%s)%s)" % (_byte_class(form.first), form.rest))
    if numbers:
        parts.append(_RUN_START + b"(?:" + b"|".join(numbers) + b")")
    return b"|".join(parts)


def _single(form: _Form) -> bytes:
    return _byte_class(form.first) + (_RUN_START if form.run_start else b"") + form.rest


def _byte_class(allowed: Iterable[int]) -> bytes:
    return b"[" + b"".join(re.escape(bytes([b])) for b in sorted(set(allowed))) + b"]"


# --- custom recognizers --------------------------------------------------------------------------

_CUSTOM_VALIDATORS: dict[str, Callable[[bytes], bool]] = {
    "luhn": lambda span: luhn_valid(_digits(span)),
    "mod97": lambda span: mod97_valid(span.translate(None, _NOT_ALNUM)),
}
_ZERO_WIDTH_PROBES = (b"", b" ", b"a", b"A", b"0", b"-", b"\n", "é".encode())


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would print every rejected pattern to stderr
    options.max_mem = CUSTOM_PATTERNS_MAX_MEMORY
    return options


@attrs.frozen
class CustomRecognizer:
    """A validated custom recognizer: its RE2 pattern compiled on its own (for checks) and the
    number of capturing groups it brings into the combined alternation."""

    rule: RecognizerRule
    groups: int
    first_bytes: bytes  # bytes a match can start with (from RE2's possible match range)

    @property
    def name(self) -> str:
        return self.rule.name


@functools.lru_cache(maxsize=256)
def compile_custom(rule: RecognizerRule) -> CustomRecognizer:
    """Check a custom recognizer from a policy bundle; :class:`RecognizerError` says what is wrong.

    Patterns are RE2 (no backreferences, no lookaround: matching stays linear in the input); they
    must not match the empty string, and are limited in length and compiled size.
    """
    name = rule.name
    if not isinstance(name, str) or not _CUSTOM_NAME.match(name):
        raise RecognizerError(f"custom recognizer name {name!r}: use lower-case letters, digits, '_', '-', '.'")
    if name in BUILTIN_RECOGNIZERS:
        raise RecognizerError(f"custom recognizer {name!r}: the name belongs to a built-in recognizer")
    if rule.validator is not None and rule.validator not in _CUSTOM_VALIDATORS:
        raise RecognizerError(
            f"custom recognizer {name!r}: unknown validator {rule.validator!r} (use one of {sorted(_CUSTOM_VALIDATORS)})"
        )
    if not isinstance(rule.pattern, str) or not rule.pattern:
        raise RecognizerError(f"custom recognizer {name!r}: the pattern is empty")
    if len(rule.pattern) > MAX_CUSTOM_PATTERN_CHARS:
        raise RecognizerError(f"custom recognizer {name!r}: the pattern is longer than {MAX_CUSTOM_PATTERN_CHARS} characters")
    try:
        compiled = re2.compile(rule.pattern.encode("utf-8"), _re2_options())
    except re2.error as exc:
        detail = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise RecognizerError(
            f"custom recognizer {name!r}: invalid RE2 pattern ({detail}); RE2 has no backreferences or lookaround"
        ) from None
    if compiled.programsize > MAX_CUSTOM_PROGRAM_SIZE:
        raise RecognizerError(
            f"custom recognizer {name!r}: the pattern compiles to {compiled.programsize} instructions "
            f"(limit {MAX_CUSTOM_PROGRAM_SIZE}); bound its repetitions"
        )
    for probe in _ZERO_WIDTH_PROBES:
        match = compiled.search(probe)
        if match is not None and match.end() == match.start():
            raise RecognizerError(f"custom recognizer {name!r}: the pattern matches the empty string")
    return CustomRecognizer(rule, compiled.groups, _first_bytes(compiled))


def _first_bytes(compiled: re2._Regexp) -> bytes:
    try:
        low, high = compiled.possiblematchrange(1)
    except Exception:  # no usable range: every byte may start a match
        return bytes(range(256))
    if not low or not high:
        return bytes(range(256))
    return bytes(range(low[0], high[0] + 1))


def _custom_recognizer(rule: RecognizerRule) -> Recognizer:
    return Recognizer(rule.name, f"custom: {rule.pattern}", mask_keeping_last_digits, _identity, custom=True)


# --- scanner -------------------------------------------------------------------------------------


class Span(NamedTuple):
    """Bytes ``[start, end)`` of a value hold what ``recognizers`` found (several when spans
    from different recognizers overlapped and were merged). A tuple: scanning builds many."""

    start: int
    end: int
    recognizers: tuple[str, ...]


class Scanner:
    """A compiled combination of recognizers, for one scope. Build with :func:`compile_scanner`."""

    __slots__ = (
        "names",
        "scoped",
        "recognizers",
        "_custom_may_match",
        "_pattern",
        "_needs",
        "_forms",
        "_retries",
        "_custom_pattern",
        "_custom_groups",
        "_custom_checks",
    )

    def __init__(self, builtin: Sequence[str], custom: Sequence[CustomRecognizer], scoped: bool) -> None:
        self.names: tuple[str, ...] = tuple(builtin) + tuple(c.name for c in custom)
        self.scoped = scoped
        self.recognizers: dict[str, Recognizer] = {n: BUILTIN_RECOGNIZERS[n] for n in builtin}
        self.recognizers.update((c.name, _custom_recognizer(c.rule)) for c in custom)
        forms = [form for form in _FORMS if form.recognizer in self.recognizers]
        self._forms = forms
        self._needs = _fewest_needs(need for form in forms for need in form.needs)
        if forms:
            # The pattern starts with one byte class (every byte a candidate can start with), so
            # `re` skips all other bytes in C before trying any form.
            first = _byte_class(b for form in forms for b in form.first)
            self._pattern = re.compile(first + b"(?:" + _alternation(forms) + b")")
            assert self._pattern.groups == len(forms), "built-in forms must not capture"
            singles = [re.compile(_single(f)).match for f in forms]
            # per form and first byte: the later forms a rejected candidate is offered to
            self._retries: list[dict[int, tuple[tuple[_Form, Callable], ...]]] = [
                {
                    byte: tuple((forms[j], singles[j]) for j in range(i + 1, len(forms)) if byte in forms[j].first)
                    for byte in form.first
                }
                for i, form in enumerate(forms)
            ]
        else:
            self._pattern = None
            self._retries = []
        if custom:
            # one RE2 call costs microseconds, so first a byte-class search in C: does the value
            # hold any byte a custom match can start with at all?
            self._custom_may_match = re.compile(_byte_class(b for c in custom for b in c.first_bytes)).search
            self._custom_pattern = re2.compile(
                b"|".join(b"(%s)" % c.rule.pattern.encode("utf-8") for c in custom), _re2_options()
            )
            self._custom_groups: list[tuple[int, str]] = []
            self._custom_checks: dict[str, Callable[[bytes], bool] | None] = {}
            index = 1
            for recognizer in custom:
                self._custom_groups.append((index, recognizer.name))
                self._custom_checks[recognizer.name] = _CUSTOM_VALIDATORS.get(recognizer.rule.validator or "")
                index += 1 + recognizer.groups
        else:
            self._custom_pattern = None

    def __repr__(self) -> str:
        return f"Scanner({', '.join(self.names)}; {'column' if self.scoped else 'free-text'} scope)"

    def find(self, data: bytes) -> list[Span]:
        """Spans of ``data`` holding what the recognizers found, sorted, not overlapping."""
        spans = self._find_builtin(data) if self._pattern is not None and self._may_match(data) else []
        if self._custom_pattern is not None and self._custom_may_match(data) is not None:
            spans.extend(self._find_custom(data))
            spans.sort()
        return _merge(spans) if len(spans) > 1 else spans

    def _may_match(self, data: bytes) -> bool:
        """False when no built-in form can match anywhere in ``data`` (the prefilter above)."""
        # a str, because `str in str` is the cheap substring test (`bytes in bytes` first tries
        # to read its operand as an int, and fails slowly)
        shape = data.translate(_SHAPE).decode("ascii")
        for need in self._needs:
            if need in shape:
                return True
        return False

    def _find_builtin(self, data: bytes) -> list[Span]:
        """What the built-in forms find in ``data``: the whole search, whatever the shape."""
        spans: list[Span] = []
        search = self._pattern.search
        forms = self._forms
        retries = self._retries
        scoped = self.scoped
        position = 0
        while (match := search(data, position)) is not None:
            start = match.start()
            index = match.lastindex - 1
            form = forms[index]
            bounds = form.validate(data, start, match.end(), scoped)
            if bounds is None:
                # the alternation stopped at the first form that matched here: give the later
                # forms their chance before moving on
                for other, match_here in retries[index][data[start]]:
                    single = match_here(data, start)
                    if single is not None and (bounds := other.validate(data, start, single.end(), scoped)) is not None:
                        form = other
                        break
            if bounds is None:
                position = start + 1
                continue
            spans.append(Span(bounds[0], bounds[1], (form.recognizer,)))
            position = bounds[1]
        return spans

    def _find_custom(self, data: bytes) -> list[Span]:
        spans: list[Span] = []
        search = self._custom_pattern.search
        position = 0
        while position <= len(data) and (match := search(data, position)) is not None:
            start, end = match.span()
            if end == start:  # cannot happen for checked patterns; never loop on it
                position = start + 1
                continue
            name = next(n for index, n in self._custom_groups if match.start(index) >= 0)
            check = self._custom_checks[name]
            if check is not None and not check(data[start:end]):
                position = start + 1
                continue
            spans.append(Span(start, end, (name,)))
            position = end
        return spans


def _merge(spans: list[Span]) -> list[Span]:
    spans.sort()
    merged = [spans[0]]
    for span in spans[1:]:
        last = merged[-1]
        if span.start < last.end:
            names = last.recognizers + tuple(n for n in span.recognizers if n not in last.recognizers)
            merged[-1] = Span(last.start, max(last.end, span.end), names)
        else:
            merged.append(span)
    return merged


def compile_scanner(names: Iterable[str], custom: Sequence[RecognizerRule] = (), *, scoped: bool) -> Scanner:
    """A scanner for the named recognizers (built-in or among ``custom``), in one scope.

    Raises :class:`RecognizerError` for an unknown name, an invalid custom recognizer, or a
    column-only recognizer (``zip``) outside column scope. Compiled scanners are cached.
    """
    return _compile_scanner(tuple(dict.fromkeys(names)), tuple(custom), scoped)


@functools.lru_cache(maxsize=256)
def _compile_scanner(names: tuple[str, ...], custom: tuple[RecognizerRule, ...], scoped: bool) -> Scanner:
    by_name: dict[str, RecognizerRule] = {}
    for rule in custom:
        if rule.name in by_name and by_name[rule.name] != rule:
            raise RecognizerError(f"custom recognizer {rule.name!r} is defined twice")
        by_name[rule.name] = rule
    builtin: list[str] = []
    customs: list[CustomRecognizer] = []
    for name in names:
        if name in BUILTIN_RECOGNIZERS:
            if BUILTIN_RECOGNIZERS[name].column_only and not scoped:
                raise RecognizerError(
                    f"recognizer {name!r} only applies to columns a masking rule names (it is too noisy for free text)"
                )
            builtin.append(name)
        elif name in by_name:
            customs.append(compile_custom(by_name[name]))
        else:
            known = sorted(BUILTIN_RECOGNIZERS) + sorted(by_name)
            raise RecognizerError(f"unknown recognizer {name!r} (known: {', '.join(known)})")
    return Scanner(builtin, customs, scoped)
