"""The shortcuts masking takes per cell give what the straightforward path gives.

* The scanner's prefilter (a value whose shape holds none of the forms' needs is not searched)
  never skips a value in which the combined pattern finds a candidate, and every form's needs
  hold for whatever that form matches; so ``find`` equals the search run on every value.
* ``mask_keeping_last_digits`` equals its definition written out byte by byte.
* A whole-value "partial" mask tests for an address or a date only where one can be (and spells
  out what \\s matches in the address pattern); the result equals both regexes on every value.

Inputs are built from pieces of everything the recognizers look for (valid and almost valid),
separators, letters, whitespace and arbitrary bytes, so that candidates are common.
"""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from bastion.policies import masking, recognizers
from bastion.policies.recognizers import (
    _FORMS,
    BUILTIN_RECOGNIZERS,
    FREE_TEXT_RECOGNIZERS,
    _SHAPE,
    _merge,
    _single,
    compile_scanner,
    mask_keeping_last_digits,
)

# one of each shape the recognizers take, and near misses
_PIECES = [
    b"123-45-6789", b"123 45 6789", b"123456789", b"ssn ", b"SSN: ", b"phone ", b"dob ", b"npi ", b"born ",
    b"2125550123", b"(212) 555-0123", b"212.555.0123", b"+1 212 555 0123", b"+1(212)555-0123", b"+44 20 7946 0958",
    b"4111 1111 1111 1111", b"4111-1111-1111-1111", b"4111111111111111", b"1234567893",
    b"DE89 3704 0044 0532 0130 00", b"DE89370400440532013000", b"GB29NWBK60161331926819",
    b"192.168.0.1", b"10.0.0.255", b"fe80::1", b"::1", b"2001:db8::8a2e:370:7334", b"::ffff:192.0.2.1",
    b"1999-12-31", b"12/31/1999", b"1/2/2003", b"12345", b"12345-6789", b"10:30:00",
    b"a@b.co", b"x.y@example.org", b"****@example.org",
]  # fmt: skip
_ALPHABET = b"0123456789 -./:@+()abcdefDEFGBxyz\n\t\r\x0b\x0c,;#*\x80\xc3\xa9\xff"

texts = st.lists(
    st.one_of(
        st.sampled_from(_PIECES),
        st.lists(st.sampled_from(_ALPHABET), max_size=8).map(bytes),
        st.binary(max_size=6),
        # a piece with one byte changed: the near misses
        st.tuples(st.sampled_from(_PIECES), st.integers(0, 40), st.sampled_from(_ALPHABET)).map(
            lambda t: t[0][: t[1]] + bytes([t[2]]) + t[0][t[1] + 1 :]
        ),
    ),
    max_size=8,
).map(b"".join)

_SCANNERS = [
    compile_scanner(FREE_TEXT_RECOGNIZERS, scoped=False),
    compile_scanner(FREE_TEXT_RECOGNIZERS, scoped=True),
    compile_scanner(list(BUILTIN_RECOGNIZERS), scoped=True),  # with zip
    *(compile_scanner([name], scoped=True) for name in BUILTIN_RECOGNIZERS),
    *(compile_scanner([name], scoped=False) for name in FREE_TEXT_RECOGNIZERS),
]


def _find_without_prefilter(scanner: recognizers.Scanner, data: bytes) -> list[recognizers.Span]:
    spans = scanner._find_builtin(data)
    return _merge(spans) if len(spans) > 1 else spans


# --- the scanner's prefilter --------------------------------------------------------------------


@settings(max_examples=600)
@given(texts)
@example(b"Seen on visit 1234; follow up by phone, nothing else of note in this long free text field.")
@example(b"")
def test_property_prefilter_finds_what_the_whole_search_finds(data):
    for scanner in _SCANNERS:
        assert scanner.find(data) == _find_without_prefilter(scanner, data), scanner


@settings(max_examples=600)
@given(texts)
def test_property_prefilter_skips_only_values_without_candidates(data):
    # stronger than equal results: the combined pattern has no candidate at all, valid or not
    for scanner in _SCANNERS:
        if not scanner._may_match(data):
            assert scanner._pattern.search(data) is None, scanner


_SINGLE_FORMS = [(form, re.compile(_single(form))) for form in _FORMS]


def _shape(data: bytes) -> str:
    return data.translate(_SHAPE).decode("ascii")


@settings(max_examples=600)
@given(texts)
def test_property_every_form_matches_only_where_its_needs_hold(data):
    shape = _shape(data)
    for form, pattern in _SINGLE_FORMS:
        if pattern.search(data) is not None:
            assert any(need in shape for need in form.needs), (form.recognizer, form.rest)


def test_every_form_has_needs_in_the_shape_alphabet():
    for form in _FORMS:
        assert form.needs and all(set(need) <= set("0-A!x") for need in form.needs), form


def test_plain_notes_are_not_searched():
    scanner = compile_scanner(FREE_TEXT_RECOGNIZERS, scoped=True)
    assert not scanner._may_match(b"Seen on visit 1234; follow up by phone, nothing else of note.")
    assert not scanner._may_match("Température 37, poids 80 kg".encode())
    assert scanner._may_match(b"seen 12/3")  # a date, perhaps
    assert scanner._may_match(b"mail me@x")


def test_shape():
    assert _shape("Ab 1-2.3/4 @:(+ é".encode()) == "Ax-0-0-0-0-!!!!-xx"


# --- partial masks -----------------------------------------------------------------------------


def _keeping_last_digits_by_definition(value: bytes) -> bytes:
    digit_at = [i for i, byte in enumerate(value) if 0x30 <= byte <= 0x39]
    keep_from = digit_at[-4] if len(digit_at) >= 8 else len(value)  # 4 kept when 4 others stay hidden
    out = bytearray()
    for i, byte in enumerate(value):
        letter_or_digit = chr(byte).isalnum() and byte < 0x80
        if byte >= 0x80 or (letter_or_digit and not (chr(byte).isdigit() and i >= keep_from)):
            out.append(0x2A)
        else:
            out.append(byte)
    return bytes(out)


@settings(max_examples=500)
@given(st.one_of(texts, st.binary(max_size=40)))
@example(b"123-45-6789")
@example(b"1234567")
@example(b"12345678")
@example(b"ab1c2d3e4f5g6h7i8j")
def test_property_mask_keeping_last_digits_by_definition(value):
    assert mask_keeping_last_digits(value) == _keeping_last_digits_by_definition(value)


# the address pattern as written first, with \s
_EMAIL_VALUE = re.compile(rb"[^@\s]{1,64}(@[^@\s]+\.[^@\s]+)")


def _partial_whole_text_every_test(value: bytes) -> bytes:
    email = _EMAIL_VALUE.fullmatch(value)
    if email is not None:
        return b"****" + email.group(1)
    date = masking._DATE_VALUE.fullmatch(value)
    if date is not None:
        return BUILTIN_RECOGNIZERS["dob"].partial(date[1])
    return mask_keeping_last_digits(value)


_WHITESPACE = st.lists(st.sampled_from(b" \t\n\r\x0b\x0c\x1c\x85\xa0"), max_size=3).map(bytes)


@settings(max_examples=500)
@given(_WHITESPACE, st.one_of(texts, st.sampled_from(_PIECES), st.binary(max_size=14)), _WHITESPACE)
@example(b" \t", b"1999-12-31", b"\n")
@example(b"\x0b", b"12/31/1999", b"\x0c")
@example(b"", b"123-45-6789", b"")
@example(b"", b"a\x0bb@example.org", b"")
@example(b"", b"ab@exa\x1cmple.org", b"")
def test_property_partial_whole_value_tests_only_where_needed(before, value, after):
    value = before + value + after
    assert masking._partial_whole_text(value) == _partial_whole_text_every_test(value)


# --- counts --------------------------------------------------------------------------------------


def test_cells_are_counted_once_each_in_rows_and_copy_lines():
    # whole-value steps are counted by the plan, scanning masks count what they find
    from bastion.policies.model import Column, MaskingSettings, MaskRule, ResultShape

    shape = ResultShape(
        columns=(
            Column("ssn", type_oid=25, table="t"),
            Column("note", type_oid=25, table="t"),
            Column("ssn", type_oid=25, table="u"),  # same name: the counts add up
        )
    )
    rules = [MaskRule("hide", ("*.ssn",), "partial"), MaskRule("notes", ("*.note",), "redact", ("ssn", "email"))]
    plan = masking.compile_plan(shape, rules, (), MaskingSettings(), hash_key=b"k" * 32)
    assert plan.counts() == {}
    row = [b"123-45-6789", b"mail a@b.co, ssn 123-45-6789", None]
    plan.apply(row)
    assert row == [b"***-**-6789", b"mail [REDACTED], ssn [REDACTED]", None]
    assert plan.counts() == {"ssn:hide": 1, "note:ssn": 1, "note:email": 1}
    plan.mask_copy_line(b"123-45-6789\tnothing here\t987-65-4321\n", "text")
    assert plan.counts() == {"ssn:hide": 3, "note:ssn": 1, "note:email": 1}
    plan.mask_copy_line(b'123-45-6789,"ssn 123-45-6789",\n', "csv")  # the last field is NULL
    assert plan.counts() == {"ssn:hide": 4, "note:ssn": 2, "note:email": 1}
