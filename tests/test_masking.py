"""Masking plans: column matching, strategies, type-correct replacements that still decode,
recognizer rules, untraced columns, defaults, COPY text/CSV, free text and Bind parameters."""

from __future__ import annotations

import datetime
import decimal
import ipaddress
import json
import struct
import uuid

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bastion.policies.masking import (
    HASH_HEX_CHARS,
    REDACTED,
    MaskingConfigError,
    MaskingError,
    MaskingUnsupported,
    check_policy,
    column_matches,
    column_names,
    compile_plan,
    mask_literal_values,
    mask_text,
    pseudonym,
    type_replacement,
)
from bastion.policies.model import Column, MaskingSettings, MaskRule, RecognizerRule, ResultShape

KEY = b"k" * 32
OTHER_KEY = b"q" * 32
TEXT, INT4, INT8, DATE, TIME, JSONB, JSON, TEXT_ARRAY = 25, 23, 20, 1082, 1083, 3802, 114, 1009


def col(name: str, oid: int = TEXT, *, table: str | None = "public.patients", binary: bool = False, **kw) -> Column:
    return Column(name, type_oid=oid, binary=binary, table=table, **kw)


def plan_for(columns, rules, recognizers=(), masking=MaskingSettings(), **kw):
    return compile_plan(ResultShape(tuple(columns)), rules, recognizers, masking, hash_key=kw.pop("hash_key", KEY), **kw)


def masked(plan, *cells):
    row = list(cells)
    plan.apply(row)
    return row


# --- column matching -------------------------------------------------------------------------------


def test_column_names():
    assert column_names(col("Email", table="public.users")) == ("public.users.email",)
    assert column_names(Column("e", sources={"public.users.email", "public.b.x"})) == ("e", "public.b.x", "public.users.email")


@pytest.mark.parametrize(
    ("pattern", "column", "matches"),
    [
        ("*.email", col("email", table="public.users"), True),
        ("*.email", col("email", table="users"), True),
        ("*.EMAIL", col("Email", table="public.users"), True),  # case-insensitive
        ("*.email", col("email_verified", table="public.users"), False),  # whole name
        ("*.email", Column("email"), False),  # a bare alias has no dot
        ("email", Column("email"), True),
        ("*.email", Column("e", sources={"public.users.email"}), True),  # derived from it
        ("*.*.ssn", Column("x", table="public.t", sources={"public.patients.ssn"}), True),
        ("public.patients.ssn", col("ssn"), True),
        ("patients.ssn", col("ssn"), False),  # patterns match the whole qualified name
        ("*.patients.ssn", col("ssn"), True),
        ("public.patient?.s[st]n", col("ssn"), True),
        ("*.email", col("email", table="public.users", sources={"public.users.name"}), True),
    ],
)
def test_column_matching(pattern, column, matches):
    assert column_matches(pattern, column) is matches


# --- when nothing needs masking ---------------------------------------------------------------------


def test_no_rules_no_plan():
    assert plan_for([col("ssn")], []) is None


def test_no_matching_column_no_plan():
    assert plan_for([col("name"), col("age", INT4)], [MaskRule("ssn", columns=("*.ssn",))]) is None


# --- whole-value strategies -------------------------------------------------------------------------


def test_redact_whole_values():
    plan = plan_for([col("ssn"), col("name")], [MaskRule("ssn", columns=("*.ssn",))])
    assert masked(plan, b"123-45-6789", b"Ann") == [REDACTED, b"Ann"]
    assert masked(plan, None, b"Bob") == [None, b"Bob"]
    assert plan.counts() == {"ssn:ssn": 1}
    assert plan.masked_columns == (0,)


@pytest.mark.parametrize(
    ("value", "partial"),
    [
        (b"123-45-6789", b"***-**-6789"),
        (b"4111 1111 1111 1111", b"**** **** **** 1111"),
        (b"john.doe@example.org", b"****@example.org"),
        (b"John Smith", b"**** *****"),
        (b"12345", b"*****"),
        (b"1980-02-03", b"1980-**-**"),  # a date keeps its year only (Safe Harbor), not month and day
        (b"02/03/1980", b"**/**/1980"),
    ],
)
def test_partial_whole_values(value, partial):
    plan = plan_for([col("v")], [MaskRule("v", columns=("*.v",), strategy="partial")])
    assert masked(plan, value) == [partial]


def test_hash_whole_values_is_a_keyed_deterministic_pseudonym():
    rule = [MaskRule("v", columns=("*.v",), strategy="hash")]
    [first] = masked(plan_for([col("v")], rule), b"123-45-6789")
    [again] = masked(plan_for([col("v")], rule), b"123-45-6789")
    [other_key] = masked(plan_for([col("v")], rule, hash_key=OTHER_KEY), b"123-45-6789")
    [other_value] = masked(plan_for([col("v")], rule), b"123-45-6780")
    assert first == again == pseudonym(KEY, b"123-45-6789")
    assert first.startswith(b"h:") and len(first) == 2 + HASH_HEX_CHARS
    assert len({first, other_key, other_value}) == 3


def test_null_whole_values():
    plan = plan_for([col("v")], [MaskRule("v", columns=("*.v",), strategy="null")])
    assert masked(plan, b"secret") == [None]


def test_strongest_whole_value_rule_wins():
    rules = [MaskRule("soft", columns=("*.ssn",), strategy="partial"), MaskRule("hard", columns=("*.*.ssn",), strategy="null")]
    plan = plan_for([col("ssn")], rules)
    assert masked(plan, b"123-45-6789") == [None]
    assert plan.counts() == {"ssn:hard": 1}


def test_whole_value_rule_beats_recognizer_rule():
    rules = [MaskRule("scan", columns=("*.note",), recognizers=("ssn",)), MaskRule("all", columns=("*.note",))]
    assert masked(plan_for([col("note")], rules), b"no ssn here") == [REDACTED]


# --- recognizer rules -------------------------------------------------------------------------------


def test_recognizer_rules_mask_only_what_they_find():
    rules = [
        MaskRule("ssn-in-notes", columns=("*.note",), recognizers=("ssn",), strategy="partial"),
        MaskRule("mail-in-notes", columns=("*.note",), recognizers=("email",), strategy="hash"),
    ]
    plan = plan_for([col("note")], rules)
    [note] = masked(plan, b"ssn 123-45-6789, mail Ann@Example.org; fine otherwise")
    assert note == b"ssn ***-**-6789, mail " + pseudonym(KEY, b"ann@example.org") + b"; fine otherwise"
    assert masked(plan, b"nothing here") == [b"nothing here"]
    assert plan.counts() == {"note:ssn": 1, "note:email": 1}


def test_same_recognizer_in_two_rules_gets_the_stronger_strategy():
    rules = [
        MaskRule("a", columns=("*.note",), recognizers=("ssn",), strategy="partial"),
        MaskRule("b", columns=("*.note",), recognizers=("ssn",), strategy="redact"),
    ]
    assert masked(plan_for([col("note")], rules), b"ssn 123-45-6789") == [b"ssn [REDACTED]"]


def test_found_text_hashes_in_canonical_form_so_joins_work():
    rules = [MaskRule("ssn", columns=("*.a", "*.b"), recognizers=("ssn",), strategy="hash")]
    plan = plan_for([col("a"), col("b")], rules, masking=MaskingSettings())
    a, b = masked(plan, b"123-45-6789", b"SSN: 123 45 6789")
    assert a == pseudonym(KEY, b"123456789")
    assert b == b"SSN: " + a


def test_null_strategy_with_recognizers_nulls_the_cell():
    plan = plan_for([col("note")], [MaskRule("n", columns=("*.note",), recognizers=("ssn",), strategy="null")])
    assert masked(plan, b"ssn 123-45-6789") == [None]
    assert masked(plan, b"clean") == [b"clean"]


def test_zip_in_a_rule_column():
    plan = plan_for([col("addr")], [MaskRule("zip", columns=("*.addr",), recognizers=("zip",), strategy="partial")])
    assert masked(plan, b"1 Main St, Cambridge MA 02139") == [b"1 Main St, Cambridge MA 021**"]


def test_custom_recognizer_in_a_rule():
    mrn = RecognizerRule("mrn", r"\bMRN[0-9]{6}\b")
    plan = plan_for([col("note")], [MaskRule("mrn", columns=("*.note",), recognizers=("mrn",))], [mrn])
    assert masked(plan, b"chart MRN123456 seen") == [b"chart [REDACTED] seen"]
    assert plan.counts() == {"note:mrn": 1}


# --- non-text columns ---------------------------------------------------------------------------------


def test_recognizers_on_an_integer_column_replace_the_whole_value():
    rule = [MaskRule("ssn", columns=("*.n",), recognizers=("ssn",))]
    text_plan = plan_for([col("n", INT8)], rule)
    assert masked(text_plan, b"123456789") == [b"0"]
    assert masked(text_plan, b"42") == [b"42"]
    binary_plan = plan_for([col("n", INT4, binary=True)], rule)
    assert masked(binary_plan, struct.pack("!i", 123456789)) == [struct.pack("!i", 0)]
    assert masked(binary_plan, struct.pack("!i", 42)) == [struct.pack("!i", 42)]


def test_dob_rule_on_a_binary_date_column():
    plan = plan_for([col("born", DATE, binary=True)], [MaskRule("dob", columns=("*.born",), recognizers=("dob",))])
    birthday = struct.pack("!i", (datetime.date(1980, 5, 1) - datetime.date(2000, 1, 1)).days)
    [value] = masked(plan, birthday)
    assert struct.unpack("!i", value)[0] == (datetime.date(1900, 1, 1) - datetime.date(2000, 1, 1)).days


def test_unreadable_binary_values_in_a_scanned_column_are_replaced():
    plan = plan_for([col("t", TIME, binary=True)], [MaskRule("ssn", columns=("*.t",), recognizers=("ssn",))])
    assert masked(plan, struct.pack("!q", 3_600_000_000)) == [bytes(8)]
    assert plan.counts() == {"t:unreadable": 1}


def test_jsonb_binary_keeps_its_version_byte():
    plan = plan_for([col("doc", JSONB, binary=True)], [MaskRule("d", columns=("*.doc",), recognizers=("ssn", "email"))])
    [doc] = masked(plan, b'\x01{"ssn": "123-45-6789", "mail": "a@b.org"}')
    assert doc[:1] == b"\x01"
    assert json.loads(doc[1:]) == {"ssn": "[REDACTED]", "mail": "[REDACTED]"}


def test_a_failure_blanks_the_planned_cells_and_raises():
    plan = plan_for([col("doc", JSONB, binary=True), col("x")], [MaskRule("d", columns=("*.doc", "*.x"), recognizers=("ssn",))])
    row = [b"\x02{}", b"ssn 123-45-6789"]
    with pytest.raises(MaskingError):
        plan.apply(row)
    assert row == [None, None]


def test_json_stays_valid_json():
    rules = [MaskRule("d", columns=("*.doc",), recognizers=("ssn", "email", "phone"), strategy="partial")]
    [doc] = masked(plan_for([col("doc", JSON)], rules), b'{"ssn": "123-45-6789", "mail": "a@b.org", "tel": "(212) 555-0123"}')
    assert json.loads(doc) == {"ssn": "***-**-6789", "mail": "****@b.org", "tel": "(***) ***-0123"}
    [whole] = masked(plan_for([col("doc", JSON)], [MaskRule("d", columns=("*.doc",))]), b'{"a": 1}')
    assert json.loads(whole) == "[REDACTED]"


def test_numbers_in_json_become_json_strings():
    rules = [MaskRule("d", columns=("*.doc", "*.b"), recognizers=("ssn", "npi"), strategy="partial")]
    plan = plan_for([col("doc", JSON), col("b", JSONB, binary=True)], rules)
    doc, binary = masked(plan, b'{"n": -123456789.5, "s": "x 123456789", "l": [1234567893]}', b"\x01123456789")
    assert json.loads(doc) == {"n": "-******789.5", "s": "x *****6789", "l": ["******7893"]}
    assert json.loads(binary[1:]) == "*****6789"


def test_text_arrays():
    rule = [MaskRule("a", columns=("*.tags",), recognizers=("ssn",))]
    assert masked(plan_for([col("tags", TEXT_ARRAY)], rule), b'{"123-45-6789",x}') == [b'{"[REDACTED]",x}']
    [empty] = masked(plan_for([col("tags", TEXT_ARRAY, binary=True)], rule), b"binary array bytes")
    assert struct.unpack("!iiI", empty) == (0, 0, TEXT)


# --- type-correct replacements -------------------------------------------------------------------------


def _decode_numeric(value: bytes) -> decimal.Decimal:
    ndigits, weight, sign, dscale = struct.unpack_from("!hhHh", value)
    groups = struct.unpack_from(f"!{ndigits}H", value, 8)
    number = sum(decimal.Decimal(g) * decimal.Decimal(10000) ** (weight - i) for i, g in enumerate(groups))
    return -number if sign == 0x4000 else number


_PG_EPOCH = datetime.datetime(2000, 1, 1)

# oid -> (decode binary, decode text, the value both must give)
_DECODERS = {
    16: (lambda v: struct.unpack("!?", v)[0], lambda t: t == "t", False),
    17: (lambda v: v, lambda t: bytes.fromhex(t[2:]), b""),
    19: (bytes.decode, str, "[REDACTED]"),
    20: (lambda v: struct.unpack("!q", v)[0], int, 0),
    21: (lambda v: struct.unpack("!h", v)[0], int, 0),
    23: (lambda v: struct.unpack("!i", v)[0], int, 0),
    25: (bytes.decode, str, "[REDACTED]"),
    26: (lambda v: struct.unpack("!I", v)[0], int, 0),
    114: (json.loads, json.loads, "[REDACTED]"),
    142: (bytes.decode, str, "[REDACTED]"),
    650: (lambda v: v[:4] + b"|" + v[4:], lambda t: ipaddress.ip_network(t), None),
    700: (lambda v: struct.unpack("!f", v)[0], float, 0.0),
    701: (lambda v: struct.unpack("!d", v)[0], float, 0.0),
    829: (lambda v: ":".join(f"{b:02x}" for b in v), str, "00:00:00:00:00:00"),
    869: (lambda v: str(ipaddress.ip_address(v[4:])) if v[:4] == b"\x02\x20\x00\x04" else None, str, "0.0.0.0"),
    1042: (bytes.decode, str, "[REDACTED]"),
    1043: (bytes.decode, str, "[REDACTED]"),
    1082: (
        lambda v: datetime.date(2000, 1, 1) + datetime.timedelta(days=struct.unpack("!i", v)[0]),
        datetime.date.fromisoformat,
        datetime.date(1900, 1, 1),
    ),
    1083: (lambda v: struct.unpack("!q", v)[0], lambda t: 0 if t == "00:00:00" else t, 0),
    1114: (
        lambda v: _PG_EPOCH + datetime.timedelta(microseconds=struct.unpack("!q", v)[0]),
        datetime.datetime.fromisoformat,
        datetime.datetime(1900, 1, 1),
    ),
    1184: (
        lambda v: (_PG_EPOCH + datetime.timedelta(microseconds=struct.unpack("!q", v)[0])).replace(tzinfo=datetime.UTC),
        datetime.datetime.fromisoformat,
        datetime.datetime(1900, 1, 1, tzinfo=datetime.UTC),
    ),
    1186: (lambda v: struct.unpack("!qii", v), lambda t: (0, 0, 0) if t == "00:00:00" else t, (0, 0, 0)),
    1266: (lambda v: struct.unpack("!qi", v), lambda t: (0, 0) if t == "00:00:00+00" else t, (0, 0)),
    1700: (_decode_numeric, decimal.Decimal, decimal.Decimal(0)),
    2950: (lambda v: uuid.UUID(bytes=v), uuid.UUID, uuid.UUID(int=0)),
    3802: (lambda v: json.loads(v[1:]) if v[:1] == b"\x01" else None, json.loads, "[REDACTED]"),
    1007: (lambda v: struct.unpack("!iiI", v), lambda t: (0, 0, 23) if t == "{}" else t, (0, 0, 23)),
    1009: (lambda v: struct.unpack("!iiI", v), lambda t: (0, 0, 25) if t == "{}" else t, (0, 0, 25)),
    1182: (lambda v: struct.unpack("!iiI", v), lambda t: (0, 0, 1082) if t == "{}" else t, (0, 0, 1082)),
}


@pytest.mark.parametrize("oid", sorted(_DECODERS))
def test_type_correct_replacements_decode(oid):
    decode_binary, decode_text, expected = _DECODERS[oid]
    rule = [MaskRule("v", columns=("*.v",))]
    [binary] = masked(plan_for([col("v", oid, binary=True)], rule), b"\x00\x01 raw")
    [text] = masked(plan_for([col("v", oid)], rule), b"raw")
    assert type_replacement(oid, True) == binary and type_replacement(oid, False) == text
    if oid == 650:  # cidr: family 2, 0 bits, is_cidr, 4 address bytes -> the same network as its text
        assert binary == b"\x02\x00\x01\x04" + bytes(4)
        assert decode_text(text.decode()) == ipaddress.ip_network("0.0.0.0/0")
        return
    assert decode_binary(binary) == expected
    assert decode_text(text.decode()) == expected


@pytest.mark.parametrize("oid", sorted(_DECODERS))
def test_replacements_decode_in_a_real_client_library(oid):
    psycopg = pytest.importorskip("psycopg")
    from psycopg.adapt import Transformer
    from psycopg.pq import Format

    assert psycopg is not None
    transformer = Transformer()
    from_binary = transformer.get_loader(oid, Format.BINARY).load(type_replacement(oid, True))
    from_text = transformer.get_loader(oid, Format.TEXT).load(type_replacement(oid, False))
    if isinstance(from_binary, bytes) and isinstance(from_text, str):  # no psycopg loader (xml, macaddr)
        from_binary = from_binary.decode() if oid != 829 else ":".join(f"{b:02x}" for b in from_binary)
    assert from_binary == from_text


def test_unknown_types():
    rule = [MaskRule("v", columns=("*.v",))]
    with pytest.raises(MaskingUnsupported, match="binary format"):
        plan_for([col("v", 99999, binary=True)], rule)
    assert masked(plan_for([col("v", 99999)], rule), b"x") == [None]  # text: NULL always decodes
    assert masked(plan_for([col("v", 99999, binary=True)], [MaskRule("v", columns=("*.v",), strategy="null")]), b"x") == [None]
    assert masked(plan_for([col("v", 99999)], rule, text_type_oids={99999}), b"x") == [REDACTED]
    with pytest.raises(MaskingUnsupported):
        type_replacement(99999, True)


def test_type_from_name_when_the_protocol_has_no_oid():
    rule = [MaskRule("v", columns=("*.v",))]
    assert masked(plan_for([Column("v", "integer", table="t")], rule), b"5") == [b"0"]
    assert masked(plan_for([Column("v", table="t")], rule), b"5") == [REDACTED]


def test_hash_on_typed_columns_keeps_the_type_and_agrees_across_formats():
    rule = [MaskRule("v", columns=("*.v",), strategy="hash")]
    [as_text] = masked(plan_for([col("v", INT4)], rule), b"42")
    [as_binary] = masked(plan_for([col("v", INT4, binary=True)], rule), struct.pack("!i", 42))
    assert int(as_text) == struct.unpack("!i", as_binary)[0] >= 0
    [numeric_text] = masked(plan_for([col("v", 1700)], rule), b"42")
    [numeric_binary] = masked(plan_for([col("v", 1700, binary=True)], rule), struct.pack("!hhHhH", 1, 0, 0, 0, 42))
    assert decimal.Decimal(numeric_text.decode()) == _decode_numeric(numeric_binary)
    [uuid_text] = masked(plan_for([col("v", 2950)], rule), b"12345678-1234-5678-1234-567812345678")
    [uuid_binary] = masked(plan_for([col("v", 2950, binary=True)], rule), uuid.UUID("12345678-1234-5678-1234-567812345678").bytes)
    assert uuid.UUID(uuid_text.decode()).bytes == uuid_binary
    [date] = masked(plan_for([col("v", DATE)], rule), b"1980-05-01")
    assert date == b"1900-01-01"  # no pseudonym for dates: the fixed replacement


@given(st.integers(-(2**63), 2**63 - 1))
def test_property_int8_pseudonyms_agree_across_formats(number):
    rule = [MaskRule("v", columns=("*.v",), strategy="hash")]
    [as_text] = masked(plan_for([col("v", INT8)], rule), str(number).encode())
    [as_binary] = masked(plan_for([col("v", INT8, binary=True)], rule), struct.pack("!q", number))
    assert int(as_text) == struct.unpack("!q", as_binary)[0]


# --- untraced columns --------------------------------------------------------------------------------

_SSN_RULE = MaskRule("ssn", columns=("*.ssn",))


def test_untraced_mask_all_scans_with_every_recognizer_in_column_scope():
    plan = plan_for([col("f", table=None, traced=False)], [_SSN_RULE], masking=MaskingSettings(untraced="mask-all"))
    [value] = masked(plan, b"123456789 a@b.org 1980-05-01 02139")
    assert value == b"[REDACTED] [REDACTED] [REDACTED] 02139"  # zip only where a rule names it
    assert set(plan.counts()) == {"f:ssn", "f:email", "f:dob"}


def test_untraced_binary_values_that_cannot_be_read_are_replaced():
    plan = plan_for([col("t", TIME, binary=True, traced=False)], [_SSN_RULE])
    assert masked(plan, struct.pack("!q", 1)) == [bytes(8)]


def test_untraced_with_unknown_binary_type_is_refused():
    with pytest.raises(MaskingUnsupported):
        plan_for([col("t", 99999, binary=True, traced=False)], [_SSN_RULE])


def test_untraced_deny():
    plan = plan_for([col("name"), col("f", table=None, traced=False)], [_SSN_RULE], masking=MaskingSettings(untraced="deny"))
    assert plan is not None and "'f'" in plan.deny_reason
    with pytest.raises(MaskingError):
        plan.apply([b"a", b"b"])
    with pytest.raises(MaskingError):
        plan.mask_copy_line(b"a\tb\n", "text")


def test_untraced_column_masked_whole_is_not_denied():
    plan = plan_for([col("ssn", traced=False)], [_SSN_RULE], masking=MaskingSettings(untraced="deny"))
    assert plan.deny_reason is None
    assert masked(plan, b"x") == [REDACTED]


def test_untraced_without_rules_is_left_alone():
    assert plan_for([col("f", traced=False)], [], masking=MaskingSettings(untraced="deny")) is None


# --- default recognizers ----------------------------------------------------------------------------


def test_default_recognizers_scan_uncovered_text_columns_in_free_text_scope():
    masking = MaskingSettings(default_recognizers=("ssn", "email", "dob"))
    columns = [col("note"), col("n", INT8), col("tags", TEXT_ARRAY, binary=True), col("mail")]
    plan = plan_for(columns, [MaskRule("mail", columns=("*.mail",), recognizers=("email",))], masking=masking)
    row = masked(plan, b"ref 123456789, ssn 123456789, on 2024-01-02", b"123456789", b"\x00", b"a@b.org ssn 123-45-6789")
    assert row == [b"ref 123456789, ssn [REDACTED], on 2024-01-02", b"123456789", b"\x00", b"[REDACTED] ssn 123-45-6789"]


def test_default_recognizers_without_rules():
    plan = plan_for([col("note")], [], masking=MaskingSettings(default_recognizers=("email",)))
    assert masked(plan, b"mail a@b.org") == [b"mail [REDACTED]"]


# --- configuration errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "recognizers", "masking", "message"),
    [
        ([MaskRule("r", columns=("*.x",), strategy="scramble")], [], MaskingSettings(), "unknown strategy"),
        ([MaskRule("r", columns=("*.x",), recognizers=("sssn",))], [], MaskingSettings(), "unknown recognizer"),
        ([MaskRule("r")], [], MaskingSettings(), "names no columns"),
        ([MaskRule("r", columns=("*.x",))], [], MaskingSettings(untraced="ignore"), "untraced"),
        ([], [], MaskingSettings(default_recognizers=("zip",)), "only applies to columns"),
        ([], [], MaskingSettings(default_recognizers=("nope",)), "unknown"),
        ([MaskRule("r", columns=("*.x",), recognizers=("m",))], [RecognizerRule("m", r"(a)\1")], MaskingSettings(), "invalid RE2"),
        ([], [RecognizerRule("m", "a"), RecognizerRule("m", "b")], MaskingSettings(default_recognizers=("m",)), "twice"),
    ],
)
def test_unusable_configuration_is_refused(rules, recognizers, masking, message):
    with pytest.raises(MaskingConfigError, match=message):
        check_policy(rules, recognizers, masking)
    with pytest.raises(MaskingConfigError, match=message):
        plan_for([col("x")], rules, recognizers, masking)


def test_hash_needs_a_real_key():
    with pytest.raises(MaskingConfigError, match="hash key"):
        plan_for([col("x")], [MaskRule("r", columns=("*.x",), strategy="hash")], hash_key=b"short")


def test_unknown_client_encoding():
    with pytest.raises(MaskingConfigError, match="encoding"):
        plan_for([col("x")], [MaskRule("r", columns=("*.x",))], encoding="EBCDIC-NOPE")


# --- client encodings ----------------------------------------------------------------------------------


def test_latin1_values_are_masked_in_their_encoding():
    plan = plan_for([col("note")], [MaskRule("n", columns=("*.note",), recognizers=("ssn",))], encoding="LATIN1")
    assert masked(plan, "Zoë ssn 123-45-6789".encode("latin-1")) == ["Zoë ssn [REDACTED]".encode("latin-1")]


def test_multibyte_encodings_are_scanned_as_characters_not_bytes():
    # in Shift-JIS "А" is 0x84 0x40, and 0x40 is '@': scanned as raw bytes it would look like an e-mail
    value = "Аx.org 表 ssn 123-45-6789".encode("shift_jis")
    plan = plan_for([col("note")], [MaskRule("n", columns=("*.note",), recognizers=("email", "ssn"))], encoding="SJIS")
    [result] = masked(plan, value)
    assert result.decode("shift_jis") == "Аx.org 表 ssn [REDACTED]"


def test_pseudonyms_do_not_depend_on_the_client_encoding():
    rule = [MaskRule("n", columns=("*.name",), strategy="hash")]
    [latin1] = masked(plan_for([col("name")], rule, encoding="LATIN1"), "Zoë".encode("latin-1"))
    [utf8] = masked(plan_for([col("name")], rule), "Zoë".encode())
    assert latin1 == utf8 == pseudonym(KEY, "Zoë".encode())


def test_jsonb_binary_in_another_encoding():
    rule = [MaskRule("d", columns=("*.doc",), recognizers=("ssn",))]
    plan = plan_for([col("doc", JSONB, binary=True)], rule, encoding="LATIN1")
    [doc] = masked(plan, b'\x01' + '{"n": "Zoë", "ssn": "123-45-6789"}'.encode("latin-1"))
    assert json.loads(doc[1:].decode("latin-1")) == {"n": "Zoë", "ssn": "[REDACTED]"}


def test_invalid_bytes_for_the_encoding_raise():
    plan = plan_for([col("note")], [MaskRule("n", columns=("*.note",), recognizers=("ssn",))], encoding="SJIS")
    with pytest.raises(MaskingError):
        masked(plan, b"\x84")


# --- rows --------------------------------------------------------------------------------------------


def test_row_width_must_match_the_shape():
    plan = plan_for([col("ssn"), col("x")], [_SSN_RULE])
    with pytest.raises(MaskingError, match="cells"):
        plan.apply([b"1"])


# --- COPY --------------------------------------------------------------------------------------------

_COPY_COLUMNS = [col("ssn"), col("note"), col("other"), col("n", INT4)]
_COPY_RULES = [
    MaskRule("ssn", columns=("*.ssn",), strategy="partial"),
    MaskRule("note", columns=("*.note",), recognizers=("ssn", "email")),
    MaskRule("n", columns=("*.n",), strategy="redact"),
]


def test_copy_text_unescapes_masks_and_escapes_again():
    plan = plan_for(_COPY_COLUMNS, _COPY_RULES)
    line = b"123-45-6789\tline1\\nssn 123-45-6789\\t\\\\x\tkeep\\tme\t42\n"
    assert plan.mask_copy_line(line, "text") == b"***-**-6789\tline1\\nssn [REDACTED]\\t\\\\x\tkeep\\tme\t0\n"
    assert plan.mask_copy_line(b"\\N\t\\N\t\\N\t\\N\n", "text") == b"\\N\t\\N\t\\N\t\\N\n"
    assert plan.counts() == {"ssn:ssn": 1, "note:ssn": 1, "n:n": 1}


def test_copy_text_octal_and_hex_escapes_are_unescaped_before_scanning():
    plan = plan_for([col("note")], [MaskRule("note", columns=("*.note",), recognizers=("ssn",))])
    assert plan.mask_copy_line(b"ssn \\061\\x323-45-6789\n", "text") == b"ssn [REDACTED]\n"


def test_copy_text_custom_delimiter_and_null():
    plan = plan_for([col("note"), col("x")], [MaskRule("note", columns=("*.note",), recognizers=("ssn",))])
    line = b"a\\|b ssn 123-45-6789|NULL\n"
    assert plan.mask_copy_line(line, "text", delimiter=b"|", null=b"NULL") == b"a\\|b ssn [REDACTED]|NULL\n"


def test_copy_text_masked_null_and_field_count():
    plan = plan_for([col("ssn"), col("x")], [MaskRule("ssn", columns=("*.ssn",), strategy="null")])
    assert plan.mask_copy_line(b"123-45-6789\tx\n", "text") == b"\\N\tx\n"
    with pytest.raises(MaskingError, match="fields"):
        plan.mask_copy_line(b"only-one\n", "text")
    with pytest.raises(MaskingUnsupported):
        plan.mask_copy_line(b"PGCOPY\n\xff\r\n\0", "binary")


def test_copy_csv_quoting():
    plan = plan_for(_COPY_COLUMNS, _COPY_RULES)
    line = b'123-45-6789,"ssn 123-45-6789, ""quoted""\nnext line",,42\n'
    assert plan.mask_copy_line(line, "csv") == b'"***-**-6789","ssn [REDACTED], ""quoted""\nnext line",,"0"\n'
    # an unquoted empty field is NULL, a quoted one the empty string
    assert plan.mask_copy_line(b',"",,""\r\n', "csv") == b',"",,"0"\r\n'


def test_copy_csv_null_strategy_and_options():
    plan = plan_for([col("ssn"), col("x")], [MaskRule("ssn", columns=("*.ssn",), strategy="null")])
    assert plan.mask_copy_line(b'"123-45-6789",x\n', "csv") == b",x\n"
    assert plan.mask_copy_line(b"'123;45';x\n", "csv", delimiter=b";", quote=b"'", null=b"NA", header=True) == b"NA;x\n"
    with pytest.raises(MaskingError):
        plan.mask_copy_line(b'"unterminated,x\n', "csv")


def test_copy_csv_escape_character():
    plan = plan_for([col("note"), col("x")], [MaskRule("n", columns=("*.note",), recognizers=("ssn",))])
    line = b'"say \\"hi\\" c:\\dir\\n ssn 123-45-6789",x\n'
    assert plan.mask_copy_line(line, "csv", escape=b"\\") == b'"say \\"hi\\" c:\\\\dir\\\\n ssn [REDACTED]",x\n'


def test_copy_uses_text_format_even_when_rows_are_binary():
    plan = plan_for([col("n", INT4, binary=True)], [MaskRule("n", columns=("*.n",))])
    assert masked(plan, b"\x00\x00\x00\x07") == [bytes(4)]
    assert plan.mask_copy_line(b"7\n", "text") == b"0\n"


# --- free text ---------------------------------------------------------------------------------------


def test_mask_text_error_detail():
    text, counts = mask_text("Key (ssn)=(123-45-6789) already exists.")
    assert text == "Key (ssn)=([REDACTED]) already exists."
    assert counts == {"echoed-value": 1}
    text, counts = mask_text("Key (ssn)=(123-45-6789) already exists.", echoed_values=False)
    assert text == "Key (ssn)=([REDACTED]) already exists."
    assert counts == {"ssn": 1}
    assert mask_text("relation \"patients\" does not exist") == ("relation \"patients\" does not exist", {})


@pytest.mark.parametrize(
    ("detail", "masked_detail"),
    [
        ("Key (name, dob)=(Ann Lee, 1980-05-01) already exists.", "Key (name, dob)=([REDACTED]) already exists."),
        ("Key (lower(email::text))=(ann@x.org) already exists.", "Key (lower(email::text))=([REDACTED]) already exists."),
        ('Key (patient_id)=(7) is not present in table "patients".', 'Key (patient_id)=([REDACTED]) is not present in table "patients".'),
        ('Key (id)=(7) is still referenced from table "visits".', 'Key (id)=([REDACTED]) is still referenced from table "visits".'),
        (
            "Key (room, during)=(12, [2024-01-01,2024-01-02)) conflicts with existing key (room, during)=(12, [2024-01-01,2024-01-03)).",
            "Key (room, during)=([REDACTED]) conflicts with existing key (room, during)=([REDACTED]).",
        ),
        ("Failing row contains (1, Ann Lee, diabetes, null).", "Failing row contains ([REDACTED])."),
        ('invalid input syntax for type integer: "Ann Lee"', 'invalid input syntax for type integer: "[REDACTED]"'),
        ('invalid input value for enum mood: "grumpy"', 'invalid input value for enum mood: "[REDACTED]"'),
        ('value "99999999999" is out of range for type integer', 'value "[REDACTED]" is out of range for type integer'),
        ('date/time field value out of range: "1980-13-45"', 'date/time field value out of range: "[REDACTED]"'),
    ],
)
def test_mask_text_redacts_values_postgres_echoes(detail, masked_detail):
    assert mask_text(detail)[0] == masked_detail


def test_mask_text_strategies_and_recognizers():
    text = "Ann <ann@example.org> ssn 123-45-6789, né 1980-05-01"
    assert mask_text(text, strategy="partial")[0] == "Ann <****@example.org> ssn ***-**-6789, né 1980-05-01"
    hashed, _ = mask_text(text, ["email"], "hash", hash_key=KEY)
    assert hashed == f"Ann <{pseudonym(KEY, b'ann@example.org').decode()}> ssn 123-45-6789, né 1980-05-01"
    mrn = RecognizerRule("mrn", r"MRN[0-9]{6}")
    assert mask_text("see MRN123456", custom=[mrn]) == ("see [REDACTED]", {"mrn": 1})


def test_mask_text_refusals():
    with pytest.raises(MaskingConfigError):
        mask_text("x", ["zip"])
    with pytest.raises(MaskingConfigError):
        mask_text("x", strategy="null")
    with pytest.raises(MaskingConfigError):
        mask_text("x", strategy="hash", hash_key=b"")


# --- Bind parameters --------------------------------------------------------------------------------


def test_parameters_are_recorded_as_placeholders():
    values = [b"123-45-6789", None, struct.pack("!i", 7), b"Ann"]
    assert mask_literal_values(values, [0, 0, 1, 0], [25, 0, 23, 0]) == [
        "<text, 11 bytes>",
        None,
        "<int4, 4 bytes, binary>",
        "<value, 3 bytes>",
    ]
    first = mask_literal_values(values, [1], hash_key=KEY)
    assert first == mask_literal_values(values, [1], hash_key=KEY)
    assert first[0] == f"<value, 11 bytes, binary, {pseudonym(KEY, b'123-45-6789').decode()}>"
    assert first != mask_literal_values(values, [1], hash_key=OTHER_KEY)
    assert all("123" not in (v or "") and "Ann" not in (v or "") for v in first)


# --- properties --------------------------------------------------------------------------------------

_ALL = ("ssn", "email", "phone", "card", "npi", "iban", "dob", "ipv4", "ipv6")


@st.composite
def valid_ssns(draw) -> str:
    area = draw(st.integers(1, 899).filter(lambda a: a != 666))
    ssn = f"{area:03d}-{draw(st.integers(1, 99)):02d}-{draw(st.integers(1, 9999)):04d}"
    return "123-45-6789" if ssn in ("078-05-1120", "219-09-9999") else ssn


def _luhn_complete(body: str) -> str:
    total = sum(
        (2 * int(ch) - 9 if 2 * int(ch) > 9 else 2 * int(ch)) if i % 2 == 0 else int(ch)
        for i, ch in enumerate(reversed(body))
    )
    return body + str((10 - total % 10) % 10)


@st.composite
def valid_cards(draw) -> str:
    body = str(draw(st.integers(1, 9))) + "".join(str(draw(st.integers(0, 9))) for _ in range(14))
    return _luhn_complete(body)


_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


@st.composite
def valid_emails(draw) -> str:
    local = draw(st.sampled_from(_ALNUM)) + draw(st.text(_ALNUM + "._+-", max_size=15))
    domain = draw(st.text(_ALNUM, min_size=1, max_size=10)) + "." + draw(st.text("abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=5))
    return f"{local}@{domain}"


_filler = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_values = st.one_of(valid_ssns(), valid_cards(), valid_emails())


@given(st.lists(st.tuples(_filler, _values), min_size=1, max_size=4), _filler, st.sampled_from(["redact", "partial", "hash"]))
def test_property_embedded_values_never_survive(pieces, tail, strategy):
    text = " ".join(f"{filler} {value}" for filler, value in pieces) + " " + tail
    plan = plan_for([col("note")], [MaskRule("n", columns=("*.note",), recognizers=_ALL, strategy=strategy)])
    [result] = masked(plan, text.encode())
    for _, value in pieces:
        assert value.encode() not in result


@given(st.lists(st.tuples(st.text(st.sampled_from("abc ,;:()\n"), max_size=12), _values), min_size=1, max_size=4))
def test_property_redact_is_idempotent(pieces):
    text = " ".join(f"{filler} {value}" for filler, value in pieces).encode()
    plan = plan_for([col("note")], [MaskRule("n", columns=("*.note",), recognizers=_ALL)])
    [once] = masked(plan, text)
    [twice] = masked(plan, once)
    assert once == twice


@given(st.lists(st.tuples(st.text(st.sampled_from("abc ,;:()\n"), max_size=12), valid_ssns()), min_size=1, max_size=4))
def test_property_partial_is_idempotent(pieces):
    text = " ".join(f"{filler} {value}" for filler, value in pieces).encode()
    plan = plan_for([col("note")], [MaskRule("n", columns=("*.note",), recognizers=("ssn", "email"), strategy="partial")])
    [once] = masked(plan, text)
    [twice] = masked(plan, once)
    assert once == twice


@settings(max_examples=200)
@given(st.binary(max_size=200), st.sampled_from(["redact", "partial", "hash", "null"]))
def test_property_random_cells_never_raise(data, strategy):
    columns = [col("note"), col("doc", JSON), col("whole")]
    rules = [
        MaskRule("n", columns=("*.note", "*.doc"), recognizers=_ALL, strategy=strategy),
        MaskRule("w", columns=("*.whole",), strategy=strategy),
    ]
    plan = plan_for(columns, rules)
    row = [data, data, data]
    plan.apply(row)
    assert all(cell is None or isinstance(cell, bytes) for cell in row)


@given(st.text(max_size=200))
def test_property_mask_text_never_raises_keeps_clean_text_and_is_idempotent(text):
    result, counts = mask_text(text)
    if not counts:
        assert result == text
    assert mask_text(result)[0] == result


@given(st.binary(min_size=1, max_size=40), st.binary(min_size=1, max_size=40))
def test_property_hash_is_deterministic_and_key_dependent(value, other):
    assert pseudonym(KEY, value) == pseudonym(KEY, value)
    assert pseudonym(KEY, value) != pseudonym(OTHER_KEY, value)
    if value != other:
        assert pseudonym(KEY, value) != pseudonym(KEY, other)


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20), _values)
_json_docs = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(_json_docs, st.sampled_from(["redact", "partial", "hash"]))
@example(100010001, "redact")
def test_property_masked_json_stays_valid(doc, strategy):
    rule = [MaskRule("d", columns=("*.doc",), recognizers=_ALL, strategy=strategy)]
    text = json.dumps(doc).encode()
    [as_json] = masked(plan_for([col("doc", JSON)], rule), text)
    [as_jsonb] = masked(plan_for([col("doc", JSONB, binary=True)], rule), b"\x01" + text)
    loaded = json.loads(as_json)
    if type(loaded) is not type(doc):  # a number found as a whole becomes a JSON string (a document that is an SSN)
        assert type(doc) is int and type(loaded) is str
    assert json.loads(as_jsonb[1:]) == loaded


def _copy_text_escape(value: bytes) -> bytes:
    """PostgreSQL's COPY text escaping, written here independently of the module."""
    out = bytearray()
    for byte in value:
        out += {0x5C: b"\\\\", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t", 0x08: b"\\b", 0x0C: b"\\f", 0x0B: b"\\v"}.get(
            byte, bytes([byte])
        )
    return bytes(out)


def _copy_text_parse(line: bytes) -> list[bytes | None]:
    assert line.endswith(b"\n")
    fields: list[bytes | None] = []
    for raw in line[:-1].split(b"\t"):
        if raw == b"\\N":
            fields.append(None)
            continue
        out, i = bytearray(), 0
        while i < len(raw):
            if raw[i] == 0x5C:
                nxt = raw[i + 1 : i + 2]
                out += {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f", b"v": b"\v"}.get(nxt, nxt)
                i += 2
            else:
                out.append(raw[i])
                i += 1
        fields.append(bytes(out))
    return fields


def _csv_parse(line: bytes) -> list[bytes | None]:
    assert line.endswith(b"\n")
    body, fields, i = line[:-1], [], 0
    while True:
        if body[i : i + 1] == b'"':
            out, i = bytearray(), i + 1
            while True:
                j = body.index(b'"', i)
                out += body[i:j]
                if body[j + 1 : j + 2] == b'"':
                    out += b'"'
                    i = j + 2
                else:
                    i = j + 1
                    break
            fields.append(bytes(out))
        else:
            j = body.find(b",", i)
            raw = body[i:] if j < 0 else body[i:j]
            fields.append(None if raw == b"" else raw)
            i = len(body) if j < 0 else j
        if i >= len(body):
            return fields
        i += 1


_cell = st.one_of(st.none(), st.builds(lambda t, v: f"{t} {v}".encode(), st.text(max_size=15), _values), st.binary(max_size=20))


@given(st.tuples(_cell, _cell, _cell))
def test_property_copy_agrees_with_rows(row):
    row = [None if c is None else c.replace(b"\x00", b"") for c in row]  # COPY text cannot carry NUL
    rules = [
        MaskRule("whole", columns=("*.a",), strategy="partial"),
        MaskRule("scan", columns=("*.b",), recognizers=_ALL, strategy="partial"),
    ]
    plan = plan_for([col("a"), col("b"), col("c")], rules)
    expected = masked(plan, *row)
    text_line = b"\t".join(b"\\N" if c is None else _copy_text_escape(c) for c in row) + b"\n"
    assert _copy_text_parse(plan.mask_copy_line(text_line, "text")) == expected
    csv_line = b",".join(b"" if c is None else b'"' + c.replace(b'"', b'""') + b'"' for c in row) + b"\n"
    assert _csv_parse(plan.mask_copy_line(csv_line, "csv")) == expected
