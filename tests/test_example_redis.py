"""The drop-in Redis plugin (examples/bastion-redis): its RESP codec, its hooks, and the proxy end
to end with a real redis-server and the real redis-py client through a real Gateway."""

from __future__ import annotations

import math
import socket
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

bastion_redis = pytest.importorskip("bastion_redis", reason="pip install -e examples/bastion-redis")

from bastion_redis import resp  # noqa: E402
from bastion_redis.commands import analyse, redact  # noqa: E402

CRLF = b"\r\n"


# --- helpers: feeding a codec ------------------------------------------------------------------


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [p for p in pieces if p]


def decode_commands(pieces: list[bytes], *, close: bool = True) -> list[resp.Command]:
    decoder = resp.CommandDecoder()
    commands = []
    for piece in [*pieces, b""] if close else pieces:
        decoder.receive_data(piece)
        while (event := decoder.next_event()) not in (resp.NEED_DATA, resp.END_OF_STREAM):
            commands.append(event)
    return commands


def frame_replies(pieces: list[bytes], *, close: bool = True) -> tuple[bytes, list[tuple[bytes, resp.ReplyEnd]]]:
    """(all bytes handed out, [(bytes of each reply, its end)])."""
    framer = resp.ReplyFramer()
    out, current, replies = bytearray(), bytearray(), []
    for piece in [*pieces, b""] if close else pieces:
        framer.receive_data(piece)
        while (event := framer.next_event()) not in (resp.NEED_DATA, resp.END_OF_STREAM):
            if isinstance(event, resp.ReplyData):
                out += event.data
                current += event.data
            else:
                replies.append((bytes(current), event))
                current = bytearray()
    assert not current, "bytes handed out after the last reply ended"
    return bytes(out), replies


# --- command strategies --------------------------------------------------------------------------

arguments = st.lists(st.binary(max_size=40), min_size=1, max_size=8).map(tuple)
cuts = st.lists(st.integers(min_value=0, max_value=2000), max_size=12)


def quote_inline(arg: bytes) -> bytes:
    """Quote any byte string for an inline command, escaping every byte (\\xHH)."""
    return b'"' + b"".join(b"\\x%02x" % byte for byte in arg) + b'"'


@given(arguments)
def test_command_round_trip(args):
    assert decode_commands([resp.encode_command(args)]) == [resp.Command(args)]


@given(st.lists(arguments, min_size=1, max_size=6), cuts)
def test_any_split_of_a_command_stream_decodes_the_same(commands, cut_points):
    stream = b"".join(resp.encode_command(args) for args in commands)
    assert [c.args for c in decode_commands(split_at(stream, cut_points))] == commands


@given(st.lists(arguments, min_size=1, max_size=4), cuts)
def test_quoted_inline_commands_decode_to_their_bytes(commands, cut_points):
    stream = b"".join(b" ".join(quote_inline(a) for a in args) + CRLF for args in commands)
    decoded = decode_commands(split_at(stream, cut_points))
    assert [c.args for c in decoded] == commands
    assert all(c.inline for c in decoded)


@given(st.lists(st.from_regex(rb"\A[a-zA-Z0-9:_.-]{1,12}\Z"), min_size=1, max_size=6))
def test_plain_inline_words_split_on_blanks(words):
    assert decode_commands([b"  ".join(words) + b"\n"]) == [resp.Command(tuple(words), inline=True)]


@given(st.binary(max_size=300), cuts)
def test_client_garbage_raises_only_protocol_error(garbage, cut_points):
    try:
        decode_commands(split_at(garbage, cut_points))
    except resp.ProtocolError:
        pass


@pytest.mark.parametrize(
    "stream, why",
    [
        (b"*1\r\n:1\r\n", "expected a bulk string"),
        (b"*1\r\n$-1\r\n", "cannot be null"),
        (b"*1\r\n$3\r\nGETX\r\n", "does not end where its length says"),
        (b"*x\r\n", "invalid argument count"),
        (b"*%d\r\n" % (resp.MAX_COMMAND_ARGS + 1), "at most"),
        (b"*1\r\n$%d\r\n" % (resp.MAX_COMMAND_BYTES + 1), "at most"),
        (b"GET " + b"a" * resp.MAX_INLINE_LENGTH, "longer than"),
        (b'GET "unterminated\r\n', "unbalanced quotes"),
        (b'GET "a"b\r\n', "closing quote"),
        (b"*2\r\n$3\r\nGET\r\n", "closed in the middle of a command"),
    ],
)
def test_malformed_commands_are_refused(stream, why):
    with pytest.raises(resp.ProtocolError, match=why):
        decode_commands([stream])


def test_empty_arrays_and_blank_lines_are_skipped_as_redis_does():
    assert decode_commands([b"*0\r\n*-1\r\n\r\n   \r\nPING\r\n"]) == [resp.Command((b"PING",), inline=True)]


def test_decoder_holds_no_more_than_the_unfinished_command():
    decoder = resp.CommandDecoder()
    decoder.receive_data(resp.encode_command([b"SET", b"k", b"v"]) * 1000 + b"*2\r\n$3\r\nGET")
    assert sum(1 for _ in iter(decoder.next_event, resp.NEED_DATA)) == 1000
    decoder.receive_data(b"\r\n")
    assert len(decoder._buffer.data) < 32


# --- reply strategies ----------------------------------------------------------------------------

line_text = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
scalars = st.one_of(
    line_text.map(lambda s: ("simple-string", b"+" + s + CRLF)),
    line_text.map(lambda s: ("error", b"-ERR " + s + CRLF)),
    st.integers(-(2**63), 2**63 - 1).map(lambda n: ("integer", b":%d\r\n" % n)),
    st.just(("null", b"_\r\n")),
    st.just(("null", b"$-1\r\n")),
    st.just(("null", b"*-1\r\n")),
    st.floats(allow_nan=True).map(lambda f: ("double", b"," + repr(f).encode() + CRLF)),
    st.booleans().map(lambda b: ("boolean", b"#t\r\n" if b else b"#f\r\n")),
    st.integers(-(10**40), 10**40).map(lambda n: ("big-number", b"(%d\r\n" % n)),
    st.binary(max_size=60).map(lambda s: ("bulk-string", b"$%d\r\n%s\r\n" % (len(s), s))),
    st.binary(max_size=30).map(lambda s: ("bulk-error", b"!%d\r\nERR %s\r\n" % (len(s) + 4, s))),
    st.binary(max_size=30).map(lambda s: ("verbatim-string", b"=%d\r\ntxt:%s\r\n" % (len(s) + 4, s))),
)


def aggregates(children):
    def sequence(marker: bytes, kind: str):
        return st.lists(children, max_size=4).map(
            lambda items: (kind, marker + b"%d\r\n" % len(items) + b"".join(b for _, b in items))
        )

    maps = st.lists(st.tuples(children, children), max_size=3).map(
        lambda pairs: ("map", b"%%%d\r\n" % len(pairs) + b"".join(k + v for (_, k), (_, v) in pairs))
    )
    attributed = st.tuples(st.lists(st.tuples(children, children), min_size=0, max_size=2), children).map(
        lambda t: (t[1][0], b"|%d\r\n" % len(t[0]) + b"".join(k + v for (_, k), (_, v) in t[0]) + t[1][1])
    )
    return st.one_of(sequence(b"*", "array"), sequence(b"~", "set"), sequence(b">", "push"), maps, attributed)


replies = st.recursive(scalars, aggregates, max_leaves=12)


@given(st.lists(replies, min_size=1, max_size=5), cuts)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_split_of_a_reply_stream_frames_the_same(stream_replies, cut_points):
    stream = b"".join(encoded for _, encoded in stream_replies)
    out, framed = frame_replies(split_at(stream, cut_points))
    assert out == stream
    assert [(data, end.kind, end.size) for data, end in framed] == [
        (encoded, kind, len(encoded)) for kind, encoded in stream_replies
    ]


@given(st.binary(max_size=300), cuts)
def test_reply_garbage_raises_only_protocol_error(garbage, cut_points):
    try:
        frame_replies(split_at(garbage, cut_points))
    except resp.ProtocolError:
        pass


def test_error_replies_name_their_code():
    _, framed = frame_replies([b"-WRONGTYPE Operation against a key\r\n!21\r\nSYNTAX invalid syntax\r\n"])
    assert [(end.kind, end.error_code, end.error) for _, end in framed] == [
        ("error", "WRONGTYPE", True),
        ("bulk-error", "SYNTAX", True),
    ]


def test_a_big_bulk_reply_streams_through_without_being_held():
    framer = resp.ReplyFramer()
    framer.receive_data(b"$%d\r\n" % (10 * 1024 * 1024))
    chunk = b"x" * 65536
    handed_out = 0
    for _ in range(160):
        framer.receive_data(chunk)
        while isinstance(event := framer.next_event(), resp.ReplyData):
            handed_out += len(event.data)
        assert len(framer._buffer.data) <= 2 * len(chunk)
    framer.receive_data(CRLF)
    events = list(iter(framer.next_event, resp.NEED_DATA))
    assert isinstance(events[-1], resp.ReplyEnd) and events[-1].kind == "bulk-string"


@pytest.mark.parametrize(
    "stream, why",
    [
        (b"$?\r\n;3\r\nabc\r\n;0\r\n", "streamed"),
        (b"*?\r\n", "streamed"),
        (b"@1\r\n", "unknown reply type"),
        (b":12a\r\n", "invalid integer"),
        (b"#x\r\n", "invalid boolean"),
        (b"$3\r\nabcd\r\n", "does not end where"),
        (b"*1\r\n" * (resp.MAX_REPLY_DEPTH + 1), "nested deeper"),
        (b"+" + b"a" * (resp.MAX_REPLY_LINE + 2), "longer than"),
        (b"*2\r\n:1\r\n", "middle of a reply"),
    ],
)
def test_malformed_replies_are_refused(stream, why):
    with pytest.raises(resp.ProtocolError, match=why):
        frame_replies([stream])


def test_a_push_is_marked_so_it_is_never_taken_for_a_reply():
    _, framed = frame_replies([b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n:1\r\n"])
    assert [end.push for _, end in framed] == [True, False]


# --- parse: actions and redaction ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, action, redacted",
    [
        ((b"get", b"patient:123-45-6789"), "get", "GET ?"),
        ((b"SET", b"k", b"v", b"EX", b"10"), "set", "SET ? ? ? ?"),
        ((b"config", b"SET", b"maxmemory", b"1"), "config set", "CONFIG SET ? ?"),
        ((b"CLIENT", b"setname", b"x"), "client setname", "CLIENT SETNAME ?"),
        ((b"CONFIG",), "config", "CONFIG"),
        ((b"MSET", *[b"k"] * 20), "mset", "MSET ? ? ? ? ? ? ? ? … (20 arguments)"),
        # the first argument of an ordinary command is a key, however much it looks like a word
        ((b"DEL", b"set"), "del", "DEL ?"),
    ],
)
def test_actions_and_redacted_text(args, action, redacted):
    command = analyse(args)
    assert (command.action, redact(command)) == (action, redacted)


@given(st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=6))
def test_redacted_text_never_carries_an_argument_of_an_ordinary_command(values):
    command = analyse((b"HSET", *values))
    assert redact(command) == "HSET" + " ?" * min(len(values), 8) + (f" … ({len(values)} arguments)" if len(values) > 8 else "")


def test_a_command_name_that_is_no_command_word_is_unknown():
    from bastion.policies.model import Message

    from bastion_redis.commands import to_request

    request = to_request(Message("redis", "command", args=(b"123-45-6789", b"x")))
    assert request.action == "unknown"
    assert "123-45-6789" not in request.redacted_text
