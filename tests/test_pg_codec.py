"""PostgreSQL codec: every message round-trips, known wire bytes, encoder and helper behaviour.

The hypothesis strategies here are shared with tests/test_pg_codec_stream.py.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.protocols import postgres as pg

# --- strategies -------------------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
names = texts.filter(bool)
blobs = st.binary(max_size=40)
int16 = st.integers(-(2**15), 2**15 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)
formats = st.sampled_from([0, 1]) | int16
values = st.lists(st.none() | blobs, max_size=6).map(tuple)
keys = st.binary(min_size=4, max_size=256)


def tuples(strategy: st.SearchStrategy, max_size: int = 5) -> st.SearchStrategy:
    return st.lists(strategy, max_size=max_size).map(tuple)


startup_messages = st.builds(
    pg.StartupMessage,
    st.sampled_from([pg.PROTOCOL_VERSION_3_0, pg.PROTOCOL_VERSION_3_2]) | st.integers(3 << 16, (3 << 16) | 0xFFFF),
    st.lists(st.tuples(names, texts), max_size=5, unique_by=lambda pair: pair[0]).map(tuple),
)
startup_requests = st.one_of(
    startup_messages,
    st.just(pg.SSLRequest()),
    st.just(pg.GSSENCRequest()),
    st.builds(pg.CancelRequest, int32, keys),
)

# 'p' messages, each with the password kind that reads it back
password_messages = st.one_of(
    st.tuples(st.builds(pg.PasswordMessage, texts), st.just("password")),
    st.tuples(st.builds(pg.SASLInitialResponse, names, st.none() | blobs), st.just("sasl-initial")),
    st.tuples(st.builds(pg.SASLResponse, blobs), st.just("sasl")),
    st.tuples(st.builds(pg.GSSResponse, blobs), st.just("gss")),
)

# typed client messages other than 'p' and Terminate (which ends a stream)
frontend_typed = st.one_of(
    st.builds(pg.Query, texts),
    st.builds(pg.Parse, texts, texts, tuples(uint32)),
    st.builds(pg.Bind, texts, texts, tuples(formats), values, tuples(formats)),
    st.builds(pg.Describe, st.sampled_from(["S", "P"]), texts),
    st.builds(pg.Close, st.sampled_from(["S", "P"]), texts),
    st.builds(pg.Execute, texts, int32),
    st.just(pg.Sync()),
    st.just(pg.Flush()),
    st.builds(pg.FunctionCall, uint32, tuples(formats), values, int16),
    st.builds(pg.CopyData, blobs),
    st.just(pg.CopyDone()),
    st.builds(pg.CopyFail, texts),
)

field_descriptions = st.builds(pg.FieldDescription, texts, uint32, int16, uint32, int16, int32, int16)
error_fields = tuples(
    st.tuples(st.characters(min_codepoint=1, max_codepoint=255), texts),
    max_size=8,
)

authentication = st.one_of(
    st.just(pg.AuthenticationOk()),
    st.just(pg.AuthenticationKerberosV5()),
    st.just(pg.AuthenticationCleartextPassword()),
    st.builds(pg.AuthenticationMD5Password, st.binary(min_size=4, max_size=4)),
    st.just(pg.AuthenticationGSS()),
    st.builds(pg.AuthenticationGSSContinue, blobs),
    st.just(pg.AuthenticationSSPI()),
    st.builds(pg.AuthenticationSASL, tuples(names | st.sampled_from(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]))),
    st.builds(pg.AuthenticationSASLContinue, blobs),
    st.builds(pg.AuthenticationSASLFinal, blobs),
)

backend_typed = st.one_of(
    authentication,
    st.builds(pg.ParameterStatus, texts, texts),
    st.builds(pg.BackendKeyData, int32, keys),
    st.builds(pg.NegotiateProtocolVersion, st.integers(0, 2**31 - 1), tuples(texts)),
    st.builds(pg.CopyInResponse, st.integers(-128, 127), tuples(formats)),
    st.builds(pg.CopyOutResponse, st.integers(-128, 127), tuples(formats)),
    st.builds(pg.CopyBothResponse, st.integers(-128, 127), tuples(formats)),
    st.builds(pg.CopyData, blobs),
    st.just(pg.CopyDone()),
    st.builds(pg.RowDescription, tuples(field_descriptions)),
    st.builds(pg.DataRow, values),
    st.builds(pg.CommandComplete, texts),
    st.just(pg.EmptyQueryResponse()),
    st.just(pg.PortalSuspended()),
    st.just(pg.NoData()),
    st.just(pg.ParseComplete()),
    st.just(pg.BindComplete()),
    st.just(pg.CloseComplete()),
    st.builds(pg.ParameterDescription, tuples(uint32)),
    st.builds(pg.FunctionCallResponse, st.none() | blobs),
    st.builds(pg.NotificationResponse, int32, texts, texts),
    st.builds(pg.ErrorResponse, error_fields),
    st.builds(pg.NoticeResponse, error_fields),
    st.builds(pg.ReadyForQuery, st.sampled_from(["I", "T", "E"])),
)


def split_typed(wire: bytes) -> tuple[bytes, bytes]:
    """A typed message's (type, body), checking the length word against the actual size."""
    (length,) = struct.unpack(">i", wire[1:5])
    assert length == len(wire) - 1
    return wire[:1], wire[5:]


def split_untyped(wire: bytes) -> bytes:
    (length,) = struct.unpack(">i", wire[:4])
    assert length == len(wire)
    return wire[4:]


# --- round trips --------------------------------------------------------------------------------------


@given(startup_requests)
def test_startup_requests_round_trip(message: pg.StartupRequest) -> None:
    body = split_untyped(pg.encode(message))
    assert pg.decode_startup(body) == message
    assert pg.decode_frontend(b"", body) == message


@given(password_messages)
def test_password_messages_round_trip_by_kind(pair: tuple[object, str]) -> None:
    message, kind = pair
    frame_type, body = split_typed(pg.encode(message))
    assert frame_type == b"p"
    assert pg.decode_frontend(frame_type, body, kind) == message


@given(frontend_typed | st.just(pg.Terminate()))
def test_frontend_messages_round_trip(message: object) -> None:
    frame_type, body = split_typed(pg.encode(message))
    assert frame_type == type(message).TYPE
    assert pg.decode_frontend(frame_type, body) == message


@given(backend_typed)
def test_backend_messages_round_trip(message: object) -> None:
    frame_type, body = split_typed(pg.encode(message))
    assert frame_type == type(message).TYPE
    assert pg.decode_backend(frame_type, body) == message


@pytest.mark.parametrize("code", ["S", "G", "N"])
def test_encryption_response_round_trips_as_one_byte(code: str) -> None:
    wire = pg.encode(pg.EncryptionResponse(code))
    assert wire == code.encode()
    assert pg.decode_backend(b"", wire) == pg.EncryptionResponse(code)
    assert pg.EncryptionResponse(code).accepted is (code != "N")


@given(frontend_typed | backend_typed)
def test_encode_frame_rebuilds_the_wire_bytes(message: object) -> None:
    wire = pg.encode(message)
    assert pg.encode_frame(*split_typed(wire)) == wire


@given(startup_requests)
def test_encode_frame_rebuilds_startup_packets(message: pg.StartupRequest) -> None:
    wire = pg.encode(message)
    assert pg.encode_frame(b"", split_untyped(wire)) == wire


def test_decoders_accept_bytearray_and_memoryview_bodies_and_return_bytes() -> None:
    body = split_typed(pg.encode(pg.DataRow((b"a", None, b"bc"))))[1]
    for view in (bytearray(body), memoryview(body)):
        row = pg.decode_backend(b"D", view)
        assert row == pg.DataRow((b"a", None, b"bc"))
        assert all(type(value) is bytes for value in row.values if value is not None)
        hash(row)


# --- known wire bytes -----------------------------------------------------------------------------------


def test_ready_for_query_vector() -> None:
    assert pg.encode(pg.ReadyForQuery("I")) == b"Z\x00\x00\x00\x05I"
    assert pg.decode_backend(b"Z", b"T") == pg.ReadyForQuery("T")


def test_special_request_codes_are_the_documented_ones() -> None:
    assert pg.SSL_REQUEST_CODE == 80877103
    assert pg.CANCEL_REQUEST_CODE == 80877102
    assert pg.GSSENC_REQUEST_CODE == 80877104
    assert pg.encode(pg.SSLRequest()) == struct.pack(">ii", 8, 80877103)
    assert pg.encode(pg.GSSENCRequest()) == struct.pack(">ii", 8, 80877104)
    assert pg.encode(pg.CancelRequest(1234, b"\x00\x00\x00\x07")) == struct.pack(">iiii", 16, 80877102, 1234, 7)


def test_cancel_request_with_a_protocol_3_2_key() -> None:
    key = bytes(range(32))
    wire = struct.pack(">iii", 12 + 32, 80877102, 99) + key
    assert pg.encode(pg.CancelRequest(99, key)) == wire
    assert pg.decode_startup(wire[4:]) == pg.CancelRequest(99, key)


def test_startup_message_vector() -> None:
    wire = b"\x00\x00\x00\x25\x00\x03\x00\x00user\x00ci\x00database\x00app\x00application_name\x00\x00\x00"
    wire = struct.pack(">i", len(wire)) + wire[4:]
    message = pg.decode_startup(wire[4:])
    assert message == pg.StartupMessage(196608, (("user", "ci"), ("database", "app"), ("application_name", "")))
    assert (message.major, message.minor, message.user, message.database) == (3, 0, "ci", "app")
    assert message.get("nope", "x") == "x"
    assert pg.encode(message) == wire


def test_simple_messages_vectors() -> None:
    assert pg.encode(pg.Query("select 1")) == b"Q\x00\x00\x00\x0dselect 1\x00"
    assert pg.encode(pg.Sync()) == b"S\x00\x00\x00\x04"
    assert pg.encode(pg.Terminate()) == b"X\x00\x00\x00\x04"
    assert pg.encode(pg.Execute("", 0)) == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
    assert pg.encode(pg.Describe("P", "p1")) == b"D\x00\x00\x00\x08Pp1\x00"
    assert pg.encode(pg.CommandComplete("SELECT 1")) == b"C\x00\x00\x00\x0dSELECT 1\x00"
    assert pg.encode(pg.ParseComplete()) == b"1\x00\x00\x00\x04"
    assert pg.encode(pg.AuthenticationOk()) == b"R\x00\x00\x00\x08\x00\x00\x00\x00"


def test_data_row_vector_with_null() -> None:
    wire = b"D\x00\x00\x00\x13\x00\x03\x00\x00\x00\x01a\xff\xff\xff\xff\x00\x00\x00\x00"
    assert pg.encode(pg.DataRow((b"a", None, b""))) == wire
    assert pg.decode_backend(*split_typed(wire)) == pg.DataRow((b"a", None, b""))


def test_row_description_vector() -> None:
    field = pg.FieldDescription("id", 16384, 1, 23, 4, -1, 0)
    wire = b"T" + struct.pack(">ih", 4 + 2 + 3 + 18, 1) + b"id\x00" + struct.pack(">IhIhih", 16384, 1, 23, 4, -1, 0)
    assert pg.encode(pg.RowDescription((field,))) == wire
    assert pg.decode_backend(*split_typed(wire)) == pg.RowDescription((field,))


def test_bind_vector() -> None:
    message = pg.Bind("", "s1", (1,), (b"\x00\x00\x00\x2a", None), (1,))
    wire = (
        b"B"
        + struct.pack(">i", 4 + 1 + 3 + 2 + 2 + 2 + 8 + 4 + 2 + 2)
        + b"\x00s1\x00"
        + struct.pack(">hh", 1, 1)
        + struct.pack(">h", 2)
        + struct.pack(">i", 4)
        + b"\x00\x00\x00\x2a"
        + struct.pack(">i", -1)
        + struct.pack(">hh", 1, 1)
    )
    assert pg.encode(message) == wire
    assert pg.decode_frontend(*split_typed(wire)) == message


def test_authentication_vectors() -> None:
    md5 = b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt"
    assert pg.encode(pg.AuthenticationMD5Password(b"salt")) == md5
    sasl = b"R\x00\x00\x00\x2a\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
    message = pg.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    assert pg.encode(message) == sasl
    assert pg.decode_backend(*split_typed(sasl)) == message
    initial = pg.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc")
    wire = b"p" + struct.pack(">i", 4 + 14 + 4 + 11) + b"SCRAM-SHA-256\x00" + struct.pack(">i", 11) + b"n,,n=,r=abc"
    assert pg.encode(initial) == wire


def test_backend_key_data_with_a_long_key() -> None:
    key = b"k" * 256
    wire = pg.encode(pg.BackendKeyData(7, key))
    assert wire == b"K" + struct.pack(">ii", 4 + 4 + 256, 7) + key
    assert pg.decode_backend(*split_typed(wire)) == pg.BackendKeyData(7, key)


def test_error_response_vector_and_accessors() -> None:
    wire = b"E\x00\x00\x00\x29SERROR\x00VERROR\x00C42P01\x00Mno such table\x00\x00"
    error = pg.decode_backend(*split_typed(wire))
    assert error == pg.ErrorResponse((("S", "ERROR"), ("V", "ERROR"), ("C", "42P01"), ("M", "no such table")))
    assert (error.severity, error.sqlstate, error.message, error.detail, error.hint) == (
        "ERROR",
        "42P01",
        "no such table",
        None,
        None,
    )
    assert error.get(pg.ErrorField.SQLSTATE) == "42P01"
    assert pg.encode(error) == wire


def test_error_response_build_makes_a_complete_error() -> None:
    error = pg.ErrorResponse.build("28000", "bad\x00token", severity="FATAL", detail="d", hint="h")
    assert error.fields == (
        ("S", "FATAL"),
        ("V", "FATAL"),
        ("C", "28000"),
        ("M", "bad\ufffdtoken"),
        ("D", "d"),
        ("H", "h"),
    )
    assert pg.decode_backend(*split_typed(pg.encode(error))) == error
    notice = pg.NoticeResponse.build("01000", "careful", severity="WARNING")
    assert notice.severity == "WARNING" and isinstance(notice, pg.NoticeResponse)
    assert notice != pg.ErrorResponse(notice.fields)


def test_severity_prefers_the_nonlocalized_field() -> None:
    assert pg.ErrorResponse((("S", "FEHLER"), ("V", "ERROR"))).severity == "ERROR"
    assert pg.ErrorResponse((("S", "FEHLER"),)).severity == "FEHLER"


def test_protocol_error_becomes_a_fatal_error_response() -> None:
    error = pg.ProtocolError("too long", pg.PROGRAM_LIMIT_EXCEEDED)
    response = error.error_response()
    assert (response.severity, response.sqlstate, response.message) == ("FATAL", "54000", "too long")
    assert pg.ProtocolError("x").sqlstate == "08P01"


# --- decoding refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame_type", "body"),
    [
        (b"Q", b"select 1\x00; drop table t\x00"),  # a NUL would hide a second statement
        (b"Q", b"select 1"),  # no terminator
        (b"S", b"\x00"),  # Sync has no body
        (b"D", b"Xname\x00"),  # Describe of neither statement nor portal
        (b"E", b"\x00\x00\x00\x00"),  # Execute cut short
        (b"B", b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),  # value length -2
        (b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x09ab\x00\x00"),  # value past the end
        (b"P", b"\x00q\x00\x00\x02\x00\x00\x00\x17"),  # two oids announced, one sent
        (b"Z", b"I"),  # a backend type byte
    ],
)
def test_malformed_frontend_frames_are_protocol_errors(frame_type: bytes, body: bytes) -> None:
    with pytest.raises(pg.ProtocolError) as caught:
        pg.decode_frontend(frame_type, body)
    assert caught.value.sqlstate == pg.PROTOCOL_VIOLATION


@pytest.mark.parametrize(
    ("frame_type", "body"),
    [
        (b"Z", b"X"),  # no such transaction status
        (b"Z", b"II"),
        (b"R", b"\x00\x00\x00\x06"),  # SCM credentials: long gone from PostgreSQL
        (b"R", b"\x00\x00\x00\x00\x00"),  # AuthenticationOk with a tail
        (b"R", b"\x00\x00\x00\x05abc"),  # MD5 salt of 3 bytes
        (b"K", b"\x00\x00\x00\x01abc"),  # key shorter than 4 bytes
        (b"K", b"\x00\x00\x00\x01" + b"k" * 257),  # key longer than 256 bytes
        (b"D", b"\x00\x01\x00\x00\x00\x01ab"),  # bytes after the last value
        (b"E", b"SERROR\x00"),  # no terminating field
        (b"v", b"\x00\x00\x00\x00\xff\xff\xff\xff"),  # negative option count
        (b"", b"X"),  # no such answer to an encryption request
        (b"Q", b""),  # a frontend type byte
    ],
)
def test_malformed_backend_frames_are_protocol_errors(frame_type: bytes, body: bytes) -> None:
    with pytest.raises(pg.ProtocolError):
        pg.decode_backend(frame_type, body)


def test_invalid_utf8_is_character_not_in_repertoire() -> None:
    with pytest.raises(pg.ProtocolError) as caught:
        pg.decode_frontend(b"Q", b"select '\xff'\x00")
    assert caught.value.sqlstate == pg.CHARACTER_NOT_IN_REPERTOIRE
    with pytest.raises(pg.ProtocolError) as caught:
        pg.decode_startup(b"\x00\x03\x00\x00user\x00\xc3\x28\x00\x00")
    assert caught.value.sqlstate == pg.CHARACTER_NOT_IN_REPERTOIRE


def test_error_text_that_is_not_utf8_is_kept_with_replacement_characters() -> None:
    error = pg.decode_backend(b"E", b"SFATAL\x00Mdatenbank \xfc\x00\x00")
    assert error.message == "datenbank \ufffd"


@pytest.mark.parametrize(
    ("body", "sqlstate"),
    [
        (b"\x00\x03\x00\x00user\x00a\x00user\x00b\x00\x00", pg.PROTOCOL_VIOLATION),  # user given twice
        (b"\x00\x03\x00\x00user\x00a\x00", pg.PROTOCOL_VIOLATION),  # no terminator
        (b"\x00\x03\x00\x00user\x00\x00", pg.PROTOCOL_VIOLATION),  # a name without its value
        (b"\x00\x03\x00\x00\x00a\x00\x00", pg.PROTOCOL_VIOLATION),  # bytes after the terminator
        (b"\x00\x02\x00\x00", pg.FEATURE_NOT_SUPPORTED),  # protocol 2.0
        (b"\x04\xd2\x16\x31", pg.PROTOCOL_VIOLATION),  # 1234.5681: no such request
        (b"\x04\xd2\x16\x2f\x00", pg.PROTOCOL_VIOLATION),  # SSLRequest with a body
        (struct.pack(">Ii", 80877102, 1) + b"abc", pg.PROTOCOL_VIOLATION),  # 3-byte cancel key
        (struct.pack(">Ii", 80877102, 1) + b"k" * 257, pg.PROTOCOL_VIOLATION),  # 257-byte key
        (b"\x00\x03", pg.PROTOCOL_VIOLATION),  # not even a version
    ],
)
def test_malformed_startup_packets_are_refused(body: bytes, sqlstate: str) -> None:
    with pytest.raises(pg.ProtocolError) as caught:
        pg.decode_startup(body)
    assert caught.value.sqlstate == sqlstate


def test_unknown_password_kind_is_a_caller_error() -> None:
    with pytest.raises(ValueError):
        pg.decode_frontend(b"p", b"secret\x00", "kerberos")


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"secret", "password"),  # no terminator
        (b"SCRAM-SHA-256\x00\x00\x00\x00\x05abc", "sasl-initial"),  # length says 5, 3 follow
        (b"SCRAM-SHA-256\x00\xff\xff\xff\xffabc", "sasl-initial"),  # no data, yet data
        (b"SCRAM-SHA-256\x00\x00\x00", "sasl-initial"),  # length cut short
    ],
)
def test_malformed_password_messages_are_refused(body: bytes, kind: str) -> None:
    with pytest.raises(pg.ProtocolError):
        pg.decode_frontend(b"p", body, kind)


# --- encoding refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        pg.Query("select 1\x00; drop table t"),
        pg.StartupMessage(parameters=(("", "x"),)),
        pg.StartupMessage(parameters=(("user", "a\x00b"),)),
        pg.Execute("", 2**31),
        pg.Parse("", "q", (-1,)),
        pg.Bind(param_formats=(2**15,)),
        pg.Bind(params=(b"",) * 65536),
        pg.CancelRequest(1, b"abc"),
        pg.BackendKeyData(1, b"k" * 257),
        pg.AuthenticationMD5Password(b"12345"),
        pg.AuthenticationSASL(("",)),
        pg.ReadyForQuery("X"),  # type: ignore[arg-type]
        pg.Describe("X", "n"),  # type: ignore[arg-type]
        pg.EncryptionResponse("Y"),  # type: ignore[arg-type]
        pg.ErrorResponse((("SV", "x"),)),
        pg.ErrorResponse((("\x00", "x"),)),
        pg.RowDescription((pg.FieldDescription("a", table_oid=-1),)),
    ],
)
def test_encoding_values_the_protocol_cannot_carry_raises_value_error(message: object) -> None:
    with pytest.raises(ValueError):
        pg.encode(message)


def test_encoding_something_else_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        pg.encode("Q")  # type: ignore[arg-type]


# --- helpers ---------------------------------------------------------------------------------------------


def test_resolve_formats_follows_the_zero_one_or_n_rule() -> None:
    assert pg.resolve_formats((), 3) == (0, 0, 0)
    assert pg.resolve_formats((1,), 3) == (1, 1, 1)
    assert pg.resolve_formats((0, 1, 0), 3) == (0, 1, 0)
    with pytest.raises(pg.ProtocolError):
        pg.resolve_formats((0, 1), 3)
    with pytest.raises(pg.ProtocolError):
        pg.resolve_formats((2,), 1)


def test_password_kind_for_each_authentication_request() -> None:
    assert pg.password_kind_for(pg.AuthenticationCleartextPassword()) == "password"
    assert pg.password_kind_for(pg.AuthenticationMD5Password(b"salt")) == "password"
    assert pg.password_kind_for(pg.AuthenticationSASL(("SCRAM-SHA-256",))) == "sasl-initial"
    assert pg.password_kind_for(pg.AuthenticationSASLContinue(b"r=")) == "sasl"
    assert pg.password_kind_for(pg.AuthenticationGSS()) == "gss"
    assert pg.password_kind_for(pg.AuthenticationSASLFinal(b"v=")) is None
    assert pg.password_kind_for(pg.AuthenticationOk()) is None


@pytest.mark.parametrize(
    ("tag", "command", "rows"),
    [
        ("SELECT 5", "SELECT", 5),
        ("INSERT 0 12", "INSERT", 12),
        ("UPDATE 0", "UPDATE", 0),
        ("CREATE TABLE", "CREATE TABLE", None),
        ("COPY 3", "COPY", 3),
        ("", "", None),
    ],
)
def test_command_complete_tag_parts(tag: str, command: str, rows: int | None) -> None:
    complete = pg.CommandComplete(tag)
    assert (complete.command, complete.row_count) == (command, rows)


def test_secrets_stay_out_of_reprs() -> None:
    assert "hunter2" not in repr(pg.PasswordMessage("hunter2"))
    assert "r=secret" not in repr(pg.SASLResponse(b"r=secret"))
    assert "123-45-6789" not in repr(pg.DataRow((b"123-45-6789",)))


# --- the relay's per-row helpers -------------------------------------------------------------------------


@given(st.lists(st.none() | st.binary(max_size=40), max_size=20))
def test_row_values_helpers_agree_with_the_message_codec(row):
    from bastion.protocols.postgres import codec

    wire = codec.encode(pg.DataRow(tuple(row)))
    assert codec.encode_data_row_values(row) == wire
    assert codec.data_row_values(wire[5:]) == row


@given(st.binary(max_size=60))
def test_row_values_of_arbitrary_bytes_are_values_or_a_protocol_error(body):
    from bastion.protocols.postgres import codec

    try:
        expected = list(codec.decode_backend(b"D", body).values)
    except pg.ProtocolError:
        with pytest.raises(pg.ProtocolError):
            codec.data_row_values(body)
    else:
        assert codec.data_row_values(body) == expected
