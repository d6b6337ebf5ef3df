"""PostgreSQL codec streams: framing at any split, phases, limits, and garbage in -> ProtocolError out."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.protocols import postgres as pg
from tests.test_pg_codec import backend_typed, frontend_typed, password_messages, startup_messages

# frontend streams: a StartupMessage, then typed messages ('p' only as a plain password, the
# decoder's default kind)
frontend_streams = st.tuples(
    startup_messages,
    st.lists(frontend_typed | password_messages.filter(lambda pair: pair[1] == "password").map(lambda pair: pair[0]), max_size=25),
).map(lambda pair: [pair[0], *pair[1]])
backend_streams = st.lists(backend_typed, max_size=25)


def drain(decoder: pg.FrontendDecoder | pg.BackendDecoder) -> list[object]:
    events = []
    while (event := decoder.next_event()) is not pg.NEED_DATA and event is not pg.END_OF_STREAM:
        events.append(event)
    return events


def feed_in_pieces(decoder: pg.FrontendDecoder | pg.BackendDecoder, wire: bytes, cuts: list[int]) -> list[object]:
    events = []
    start = 0
    for cut in sorted(set(cuts)) + [len(wire)]:
        if cut > start:  # b"" would announce the end of the stream
            decoder.receive_data(wire[start:cut])
            events += drain(decoder)
            start = cut
    return events


# --- streams at any split ---------------------------------------------------------------------------------


@given(frontend_streams, st.data())
def test_frontend_stream_decodes_the_same_whole_bytewise_and_at_random_splits(messages: list[object], data: st.DataObject) -> None:
    wire = b"".join(pg.encode(message) for message in messages)
    whole = pg.FrontendDecoder()
    whole.receive_data(wire)
    assert drain(whole) == messages
    assert whole.phase == "typed"

    bytewise = pg.FrontendDecoder()
    assert feed_in_pieces(bytewise, wire, list(range(len(wire)))) == messages

    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=30))
    assert feed_in_pieces(pg.FrontendDecoder(), wire, cuts) == messages


@given(backend_streams, st.data())
def test_backend_stream_decodes_the_same_whole_bytewise_and_at_random_splits(messages: list[object], data: st.DataObject) -> None:
    wire = b"".join(pg.encode(message) for message in messages)
    whole = pg.BackendDecoder()
    whole.receive_data(wire)
    assert drain(whole) == messages

    assert feed_in_pieces(pg.BackendDecoder(), wire, list(range(len(wire)))) == messages

    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=30))
    assert feed_in_pieces(pg.BackendDecoder(), wire, cuts) == messages


@given(backend_streams, backend_typed, st.data())
def test_a_trailing_partial_message_waits_and_is_refused_at_close(messages: list[object], last: object, data: st.DataObject) -> None:
    tail = pg.encode(last)
    partial = tail[: data.draw(st.integers(1, len(tail) - 1))]
    decoder = pg.BackendDecoder()
    decoder.receive_data(b"".join(pg.encode(message) for message in messages) + partial)
    assert drain(decoder) == messages
    assert decoder.next_event() is pg.NEED_DATA
    assert decoder.buffered == len(partial)
    decoder.receive_data(b"")
    with pytest.raises(pg.ProtocolError):
        decoder.next_event()


@given(backend_streams)
def test_a_clean_close_between_messages_is_end_of_stream(messages: list[object]) -> None:
    decoder = pg.BackendDecoder()
    decoder.receive_data(b"".join(pg.encode(message) for message in messages))
    decoder.receive_data(b"")
    assert drain(decoder) == messages
    assert decoder.next_event() is pg.END_OF_STREAM
    assert decoder.next_event() is pg.END_OF_STREAM
    with pytest.raises(pg.ProtocolError):
        decoder.receive_data(b"late")


@given(backend_streams)
def test_raw_frames_forward_byte_identical(messages: list[object]) -> None:
    wire = b"".join(pg.encode(message) for message in messages)
    splitter = pg.FrameSplitter("backend")
    splitter.receive_data(wire)
    frames = []
    while isinstance(frame := splitter.next_frame(), tuple):
        frames.append(frame)
    assert b"".join(pg.encode_frame(*frame) for frame in frames) == wire
    assert [pg.decode_backend(*frame) for frame in frames] == messages


def test_many_small_frames_after_one_large_buffer_are_all_returned() -> None:
    rows = [pg.DataRow((str(i).encode(), None)) for i in range(5000)]
    longest = max(len(pg.encode(row)) for row in rows)
    decoder = pg.BackendDecoder()
    wire = b"".join(pg.encode(row) for row in rows)
    events = []
    for start in range(0, len(wire), 7001):
        decoder.receive_data(wire[start : start + 7001])
        events += drain(decoder)
        assert decoder.buffered < longest  # only the row cut by the chunk's end waits
    assert events == rows
    assert decoder.buffered == 0


# --- phases -----------------------------------------------------------------------------------------------


def test_ssl_request_is_followed_by_another_startup_packet() -> None:
    decoder = pg.FrontendDecoder()
    decoder.receive_data(pg.encode(pg.SSLRequest()))
    assert decoder.next_event() == pg.SSLRequest()
    assert decoder.phase == "startup"
    startup = pg.StartupMessage(parameters=(("user", "ci"),))
    decoder.receive_data(pg.encode(startup) + pg.encode(pg.Query("select 1")))
    assert drain(decoder) == [startup, pg.Query("select 1")]


def test_gssenc_then_ssl_then_startup() -> None:
    decoder = pg.FrontendDecoder()
    decoder.receive_data(pg.encode(pg.GSSENCRequest()))
    assert decoder.next_event() == pg.GSSENCRequest()
    decoder.receive_data(pg.encode(pg.SSLRequest()))
    assert decoder.next_event() == pg.SSLRequest()
    decoder.receive_data(pg.encode(pg.StartupMessage()))
    assert decoder.next_event() == pg.StartupMessage()


@pytest.mark.parametrize("request_message", [pg.SSLRequest(), pg.GSSENCRequest()])
def test_data_sent_before_the_answer_to_an_encryption_request_is_refused(request_message: object) -> None:
    decoder = pg.FrontendDecoder()
    decoder.receive_data(pg.encode(request_message) + pg.encode(pg.StartupMessage()))
    with pytest.raises(pg.ProtocolError, match="unencrypted"):
        decoder.next_event()


def test_after_a_cancel_request_the_client_has_nothing_more_to_say() -> None:
    decoder = pg.FrontendDecoder()
    decoder.receive_data(pg.encode(pg.CancelRequest(42, b"\x01\x02\x03\x04")))
    assert decoder.next_event() == pg.CancelRequest(42, b"\x01\x02\x03\x04")
    assert decoder.phase == "finished"
    assert decoder.next_event() is pg.NEED_DATA
    decoder.receive_data(b"")
    assert decoder.next_event() is pg.END_OF_STREAM

    chatty = pg.FrontendDecoder()
    chatty.receive_data(pg.encode(pg.CancelRequest(42, b"\x01\x02\x03\x04")) + b"Q")
    chatty.next_event()
    with pytest.raises(pg.ProtocolError):
        chatty.next_event()


def test_nothing_may_follow_terminate() -> None:
    decoder = pg.FrontendDecoder()
    decoder.receive_data(pg.encode(pg.StartupMessage()) + pg.encode(pg.Terminate()))
    assert drain(decoder) == [pg.StartupMessage(), pg.Terminate()]
    decoder.receive_data(pg.encode(pg.Query("select 1")))
    with pytest.raises(pg.ProtocolError):
        decoder.next_event()


def test_password_kind_decides_how_p_messages_read() -> None:
    decoder = pg.FrontendDecoder()
    initial = pg.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=nonce")
    response = pg.SASLResponse(b"c=biws,r=nonce,p=proof")
    decoder.receive_data(pg.encode(pg.StartupMessage()))
    decoder.next_event()
    decoder.expect_password_kind(pg.password_kind_for(pg.AuthenticationSASL(("SCRAM-SHA-256",))))
    decoder.receive_data(pg.encode(initial))
    assert decoder.next_event() == initial
    decoder.expect_password_kind("sasl")
    decoder.receive_data(pg.encode(response))
    assert decoder.next_event() == response
    with pytest.raises(ValueError):
        decoder.expect_password_kind("telepathy")


def test_raw_frames_and_decode_in_the_frontend_decoder() -> None:
    decoder = pg.FrontendDecoder()
    startup = pg.StartupMessage(parameters=(("user", "u"),))
    decoder.receive_data(pg.encode(startup) + pg.encode(pg.Parse("s", "select $1", (23,))) + pg.encode(pg.Sync()))
    first = decoder.next_frame()
    assert first[0] == b"" and pg.encode_frame(*first) == pg.encode(startup)
    assert decoder.decode(first) == startup
    parse = decoder.next_frame()
    assert parse[0] == b"P"
    assert decoder.decode(parse) == pg.Parse("s", "select $1", (23,))
    assert decoder.next_frame() == (b"S", b"")
    assert decoder.next_frame() is pg.NEED_DATA


def test_backend_encryption_answer_then_plain_messages() -> None:
    decoder = pg.BackendDecoder()
    decoder.expect_encryption_response()
    decoder.receive_data(b"N" + pg.encode(pg.AuthenticationOk()))
    assert drain(decoder) == [pg.EncryptionResponse("N"), pg.AuthenticationOk()]


def test_backend_accepting_encryption_with_bytes_behind_is_refused() -> None:
    decoder = pg.BackendDecoder()
    decoder.expect_encryption_response()
    decoder.receive_data(b"S" + pg.encode(pg.AuthenticationOk()))
    with pytest.raises(pg.ProtocolError, match="unencrypted"):
        decoder.next_event()


def test_backend_may_answer_an_encryption_request_with_an_error() -> None:
    error = pg.ErrorResponse.build("08P01", "unsupported", severity="FATAL")
    decoder = pg.BackendDecoder()
    decoder.expect_encryption_response()
    wire = pg.encode(error)
    assert feed_in_pieces(decoder, wire, list(range(len(wire)))) == [error]


def test_backend_garbage_answer_to_an_encryption_request() -> None:
    decoder = pg.BackendDecoder()
    decoder.expect_encryption_response()
    decoder.receive_data(b"H")
    with pytest.raises(pg.ProtocolError):
        decoder.next_event()


def test_errors_are_sticky() -> None:
    decoder = pg.BackendDecoder()
    decoder.receive_data(b"?")
    with pytest.raises(pg.ProtocolError) as first:
        decoder.next_event()
    with pytest.raises(pg.ProtocolError) as again:
        decoder.next_event()
    assert again.value is first.value
    with pytest.raises(pg.ProtocolError):
        decoder.receive_data(pg.encode(pg.ReadyForQuery()))


def test_a_message_that_fails_to_decode_also_breaks_the_decoder() -> None:
    decoder = pg.FrontendDecoder()
    decoder.receive_data(pg.encode(pg.StartupMessage()) + b"Q\x00\x00\x00\x06\xff\x00" + pg.encode(pg.Sync()))
    decoder.next_event()
    with pytest.raises(pg.ProtocolError):
        decoder.next_event()
    with pytest.raises(pg.ProtocolError):
        decoder.next_event()  # the Sync behind it is not handed out


# --- limits -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
@pytest.mark.parametrize("make", [pg.BackendDecoder, lambda: pg.FrameSplitter("frontend")])
def test_a_header_announcing_2_gib_is_refused_after_5_bytes(make, length: int) -> None:
    decoder = make()
    decoder.receive_data(b"d" + struct.pack(">I", length))
    with pytest.raises(pg.ProtocolError) as caught:
        decoder.next_frame()
    assert caught.value.sqlstate == (pg.PROGRAM_LIMIT_EXCEEDED if length == 0x7FFFFFFF else pg.PROTOCOL_VIOLATION)
    assert decoder.buffered == 5


def test_a_frontend_header_over_the_default_is_refused_in_the_typed_phase() -> None:
    decoder = pg.FrontendDecoder()
    decoder.receive_data(pg.encode(pg.StartupMessage()))
    decoder.next_event()
    decoder.receive_data(b"Q" + struct.pack(">i", pg.DEFAULT_MAX_FRONTEND_MESSAGE_LENGTH + 1))
    with pytest.raises(pg.ProtocolError) as caught:
        decoder.next_event()
    assert caught.value.sqlstate == pg.PROGRAM_LIMIT_EXCEEDED


def test_max_message_length_is_configurable_and_counts_the_length_word() -> None:
    decoder = pg.BackendDecoder(max_message_length=4 + 10)
    decoder.receive_data(pg.encode(pg.CopyData(b"0123456789")))
    assert decoder.next_event() == pg.CopyData(b"0123456789")
    decoder.receive_data(b"d" + struct.pack(">i", 4 + 11))
    with pytest.raises(pg.ProtocolError):
        decoder.next_event()
    with pytest.raises(ValueError):
        pg.BackendDecoder(max_message_length=3)


def test_messages_without_data_have_a_small_limit() -> None:
    decoder = pg.FrameSplitter("frontend")
    decoder.receive_data(b"S" + struct.pack(">i", pg.SMALL_MESSAGE_LIMIT + 1))
    with pytest.raises(pg.ProtocolError):
        decoder.next_frame()
    passwords = pg.FrameSplitter("frontend")
    passwords.receive_data(b"p" + struct.pack(">i", pg.MAX_PASSWORD_MESSAGE_LENGTH + 1))
    with pytest.raises(pg.ProtocolError):
        passwords.next_frame()


@pytest.mark.parametrize("length", [-1, 0, 3])
def test_typed_lengths_below_4_are_refused(length: int) -> None:
    decoder = pg.FrameSplitter("backend")
    decoder.receive_data(b"Z" + struct.pack(">i", length))
    with pytest.raises(pg.ProtocolError) as caught:
        decoder.next_frame()
    assert caught.value.sqlstate == pg.PROTOCOL_VIOLATION


def test_an_unknown_type_byte_is_refused_at_once() -> None:
    for direction, byte in (("frontend", b"Z"), ("backend", b"Q"), ("backend", b"\x00")):
        decoder = pg.FrameSplitter(direction)
        decoder.receive_data(byte)
        with pytest.raises(pg.ProtocolError, match="type"):
            decoder.next_frame()


def test_startup_packet_too_long_is_refused_after_its_length_word() -> None:
    decoder = pg.FrontendDecoder()
    decoder.receive_data(struct.pack(">i", 4 + pg.MAX_STARTUP_PACKET_LENGTH + 1))
    with pytest.raises(pg.ProtocolError) as caught:
        decoder.next_event()
    assert caught.value.sqlstate == pg.PROGRAM_LIMIT_EXCEEDED


def test_startup_packet_at_the_limit_is_read() -> None:
    padding = "x" * (pg.MAX_STARTUP_PACKET_LENGTH - 4 - len("application_name\x00") - 2)
    startup = pg.StartupMessage(parameters=(("application_name", padding),))
    wire = pg.encode(startup)
    assert len(wire) - 4 == pg.MAX_STARTUP_PACKET_LENGTH
    decoder = pg.FrontendDecoder()
    decoder.receive_data(wire)
    assert decoder.next_event() == startup


@pytest.mark.parametrize("length", [-1, 0, 4, 7])
def test_startup_lengths_below_8_are_refused(length: int) -> None:
    decoder = pg.FrontendDecoder()
    decoder.receive_data(struct.pack(">i", length))
    with pytest.raises(pg.ProtocolError):
        decoder.next_event()


def test_direct_tls_and_http_are_refused_in_the_startup_phase() -> None:
    tls = pg.FrontendDecoder()
    tls.receive_data(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    with pytest.raises(pg.ProtocolError) as caught:
        tls.next_event()
    assert caught.value.sqlstate == pg.FEATURE_NOT_SUPPORTED
    http = pg.FrontendDecoder()
    http.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(pg.ProtocolError):
        http.next_event()


def test_protocol_2_is_refused_with_feature_not_supported() -> None:
    decoder = pg.FrontendDecoder()
    decoder.receive_data(struct.pack(">iI", 8, 2 << 16))
    with pytest.raises(pg.ProtocolError) as caught:
        decoder.next_event()
    assert caught.value.sqlstate == pg.FEATURE_NOT_SUPPORTED


# --- garbage in, ProtocolError out -------------------------------------------------------------------------

_fuzz = settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
_fuzz_streams = settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
short_frontend_streams = st.tuples(startup_messages, st.lists(frontend_typed, max_size=6)).map(lambda pair: [pair[0], *pair[1]])


def _exhaust(decoder: pg.FrontendDecoder | pg.BackendDecoder, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            decoder.receive_data(chunk)
            drain(decoder)
        decoder.receive_data(b"")
        drain(decoder)
    except pg.ProtocolError:
        pass


garbage = st.lists(st.binary(max_size=64), max_size=6)


@_fuzz
@given(garbage)
def test_garbage_in_the_startup_phase_raises_only_protocol_errors(chunks: list[bytes]) -> None:
    _exhaust(pg.FrontendDecoder(), chunks)


@_fuzz
@given(garbage, st.sampled_from(sorted(pg.PASSWORD_KINDS)))
def test_garbage_in_the_typed_phase_raises_only_protocol_errors(chunks: list[bytes], kind: str) -> None:
    decoder = pg.FrontendDecoder()
    decoder.receive_data(pg.encode(pg.StartupMessage()))
    decoder.next_event()
    decoder.expect_password_kind(kind)
    _exhaust(decoder, chunks)


@_fuzz
@given(garbage, st.booleans())
def test_garbage_from_a_server_raises_only_protocol_errors(chunks: list[bytes], encryption: bool) -> None:
    decoder = pg.BackendDecoder()
    if encryption:
        decoder.expect_encryption_response()
    _exhaust(decoder, chunks)


type_bytes = st.sampled_from(sorted(pg.FRONTEND_TYPES | pg.BACKEND_TYPES | {b""})) | st.binary(min_size=1, max_size=1)


@_fuzz
@given(type_bytes, st.binary(max_size=80), st.sampled_from(sorted(pg.PASSWORD_KINDS)))
def test_garbage_bodies_raise_only_protocol_errors(frame_type: bytes, body: bytes, kind: str) -> None:
    for decode in (lambda: pg.decode_frontend(frame_type, body, kind), lambda: pg.decode_backend(frame_type, body)):
        try:
            decode()
        except pg.ProtocolError:
            pass


def _mutations(wire: bytes) -> st.SearchStrategy[bytes]:
    """Valid bytes with a few changed, cut or inserted: garbage that gets past the first checks."""
    position = st.integers(0, max(len(wire) - 1, 0))
    flip = st.tuples(position, st.integers(0, 255)).map(lambda edit: wire[: edit[0]] + bytes([edit[1]]) + wire[edit[0] + 1 :])
    cut = position.map(lambda at: wire[:at] + wire[at + 1 :])
    insert = st.tuples(position, st.binary(min_size=1, max_size=4)).map(lambda edit: wire[: edit[0]] + edit[1] + wire[edit[0] :])
    return st.one_of(flip, cut, insert)


@_fuzz_streams
@given(st.data(), short_frontend_streams)
def test_mutated_client_streams_decode_or_raise_protocol_errors(data: st.DataObject, messages: list[object]) -> None:
    wire = b"".join(pg.encode(message) for message in messages)
    for _ in range(3):
        wire = data.draw(_mutations(wire))
    _exhaust(pg.FrontendDecoder(), [wire])


@_fuzz_streams
@given(st.data(), st.lists(backend_typed, min_size=1, max_size=6))
def test_mutated_server_streams_decode_or_raise_protocol_errors(data: st.DataObject, messages: list[object]) -> None:
    wire = b"".join(pg.encode(message) for message in messages)
    for _ in range(3):
        wire = data.draw(_mutations(wire))
    _exhaust(pg.BackendDecoder(), [wire])


@_fuzz
@given(st.data(), backend_typed)
def test_mutated_bodies_decode_or_raise_protocol_errors(data: st.DataObject, message: object) -> None:
    frame_type = pg.encode(message)[:1]
    body = data.draw(_mutations(pg.encode(message)[5:]))
    try:
        pg.decode_backend(frame_type, body)
    except pg.ProtocolError:
        pass


@pytest.mark.parametrize(("direction", "known"), [("frontend", pg.FRONTEND_TYPES), ("backend", pg.BACKEND_TYPES)])
def test_the_splitter_accepts_exactly_the_types_the_direction_has(direction: str, known: frozenset[bytes]) -> None:
    accepted = set()
    for code in range(256):
        splitter = pg.FrameSplitter(direction)
        splitter.receive_data(bytes((code,)) + struct.pack(">i", 4))
        try:
            assert splitter.next_frame() == (bytes((code,)), b"")
            accepted.add(bytes((code,)))
        except pg.ProtocolError:
            pass
    assert accepted == known


# --- raw runs ----------------------------------------------------------------------------------------------

result_streams = st.lists(
    st.one_of(st.builds(pg.DataRow, st.lists(st.none() | st.binary(max_size=8), max_size=3).map(tuple)), backend_typed),
    max_size=30,
)


@given(result_streams, st.data())
def test_raw_runs_and_frames_together_forward_the_stream_byte_identical(messages: list[object], data: st.DataObject) -> None:
    wire = b"".join(pg.encode(message) for message in messages)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(len(wire) - 1, 1)), max_size=10)))) + [len(wire)]
    decoder = pg.BackendDecoder()
    forwarded = []
    rows = 0
    start = 0
    for cut in cuts:
        if wire[start:cut]:
            decoder.receive_data(wire[start:cut])
            start = cut
        while True:
            raw, count = decoder.next_raw_run(b"D")
            if count:
                forwarded.append(raw)
                rows += count
                continue
            frame = decoder.next_frame()
            if frame is pg.NEED_DATA:
                break
            forwarded.append(pg.encode_frame(*frame))
            rows += frame[0] == b"D"
    assert b"".join(forwarded) == wire
    assert rows == sum(isinstance(message, pg.DataRow) for message in messages)


def test_a_raw_run_stops_before_a_bad_header_which_next_frame_refuses() -> None:
    decoder = pg.BackendDecoder(max_message_length=100)
    rows = pg.encode(pg.DataRow((b"a",))) * 3
    decoder.receive_data(rows + b"D" + struct.pack(">i", 101))
    assert decoder.next_raw_run(b"D") == (rows, 3)
    assert decoder.next_raw_run(b"D") == (b"", 0)
    with pytest.raises(pg.ProtocolError):
        decoder.next_frame()


def test_raw_runs_respect_the_decoders_phases() -> None:
    frontend = pg.FrontendDecoder()
    frontend.receive_data(pg.encode(pg.StartupMessage()))
    assert frontend.next_raw_run(b"d") == (b"", 0)  # a startup packet is never part of a run
    assert frontend.next_event() == pg.StartupMessage()
    frontend.receive_data(pg.encode(pg.CopyData(b"1\n")) * 2 + pg.encode(pg.CopyDone()))
    assert frontend.next_raw_run(b"d") == (pg.encode(pg.CopyData(b"1\n")) * 2, 2)
    assert frontend.next_event() == pg.CopyDone()
    with pytest.raises(ValueError):
        frontend.next_raw_run(b"dX")

    backend = pg.BackendDecoder()
    backend.expect_encryption_response()
    backend.receive_data(b"N" + pg.encode(pg.NoticeResponse.build("00000", "hi", severity="NOTICE")))
    assert backend.next_raw_run(b"N") == (b"", 0)  # the N here is the refusal, not a notice
    assert backend.next_event() == pg.EncryptionResponse("N")
    assert backend.next_raw_run(b"N")[1] == 1
