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


# --- end to end: redis-py -> Gateway -> redis-server ----------------------------------------------
#
# Everything is real: the plugin arrives through its entry point, callers log in with keys of the
# static-token provider, a policy bundle grants them redis commands (the built-in policy plugin),
# and the audit trail is read back from disk.

import contextlib  # noqa: E402
import textwrap  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import attrs  # noqa: E402
import redis  # noqa: E402
import trio  # noqa: E402
from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

from bastion.core import auditlog, events  # noqa: E402
from bastion.core.audit import audit_directory  # noqa: E402
from bastion.core.loading import load  # noqa: E402
from bastion.core.server import Gateway  # noqa: E402
from bastion.plugins import identity_static  # noqa: E402

# absolute bound on every network test: a hung proxy fails the test instead of the run
TEST_DEADLINE = 30
# client-side socket timeout, so a thread blocked on a read cannot outlive its test
CLIENT_TIMEOUT = 10

# ci-bot may run any command (the target's deny_commands still apply); reader may only read;
# anonymous (targets without require_auth) may only say hello and ping.
POLICY = """
[[grant]]
name = "ci-bot-cache"
identities = { subjects = ["ci-bot"] }
targets = ["cache"]
statements = ["*"]

[[grant]]
name = "reader-cache"
identities = { subjects = ["reader"] }
targets = ["cache"]
statements = ["get", "hgetall", "ping", "hello", "client setinfo"]

[[grant]]
name = "anonymous-ping"
identities = { subjects = ["anonymous"] }
targets = ["cache"]
statements = ["hello", "ping", "client setinfo"]
"""


@attrs.frozen
class Running:
    gateway: Gateway
    host: str
    port: int
    audit_directory: Path
    token: str = attrs.field(repr=False)  # ci-bot's key
    reader_token: str = attrs.field(repr=False)

    def client(self, **kwargs) -> redis.Redis:
        kwargs.setdefault("password", self.token)
        # no retries: a refused login or a dropped connection must show, not be papered over
        return redis.Redis(
            host=self.host, port=self.port, socket_timeout=CLIENT_TIMEOUT, retry=Retry(NoBackoff(), 0), **kwargs
        )

    def raw(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=CLIENT_TIMEOUT)

    def records(self) -> list[auditlog.AuditRecord]:
        """Every record of the audit trail, read back from disk (once the gateway has stopped)."""
        return list(auditlog.iter_records(self.audit_directory))

    def events(self) -> list[events.AuditEvent]:
        return [event for record in self.records() if (event := record.to_event()) is not None]

    def of_type(self, cls: type) -> list:
        return [e for e in self.events() if isinstance(e, cls)]


def write_config(directory: Path, upstream_port: int, target_extra: str = "", shutdown_grace: str = "2s") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.toml").write_text(POLICY)
    path = directory / "bastion.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            admin_listen = "127.0.0.1:0"
            state_dir = "var"
            shutdown_grace = "{shutdown_grace}"
            policies = ["policy.toml"]

            [[identity]]
            kind = "static-token"
            tokens_file = "tokens.toml"

            [[targets]]
            name = "cache"
            protocol = "redis"
            listen = "127.0.0.1:0"
            upstream = "127.0.0.1:{upstream_port}"
            allow_plaintext_auth = true
            """
        )
        + textwrap.dedent(target_extra)
    )
    return path


@contextlib.asynccontextmanager
async def serving(directory: Path, upstream_port: int, target_extra: str = "", **config_options):
    path = write_config(directory, upstream_port, target_extra, **config_options)
    token = identity_static.add_key(directory / "tokens.toml", "ci-bot").key
    reader_token = identity_static.add_key(directory / "tokens.toml", "reader").key
    # a no-op once the integrator lists static-token among the built-in plugins
    loaded = load(path, extra_plugins=[identity_static])
    assert "redis" in loaded.hooks.protocols(), "the plugin comes through its entry point"
    gateway = Gateway(loaded.config, loaded.hooks, policy=loaded.policy)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        address = gateway.addresses["cache"]
        try:
            yield Running(
                gateway, address.host, address.port, audit_directory(loaded.config.gateway.state_dir), token, reader_token
            )
        finally:
            gateway.shutdown("test finished")


def with_gateway(tmp_path: Path, redis_server, work: Callable[[Running], object], target_extra: str = "", **config_options):
    """Run ``work(running)`` (blocking client code) in a thread while a gateway serves; returns
    (its result, the Running gateway, whose audit trail can be read once it has stopped)."""

    async def main():
        with trio.fail_after(TEST_DEADLINE):
            async with serving(tmp_path, redis_server.port, target_extra, **config_options) as running:
                result = await trio.to_thread.run_sync(work, running)
        return result, running

    return trio.run(main)


def direct(redis_server) -> redis.Redis:
    """A connection straight to the server, to check what really happened there."""
    return redis.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=CLIENT_TIMEOUT)


def key() -> str:
    return "bastion-test:" + uuid.uuid4().hex


def read_reply(sock: socket.socket, expected_replies: int = 1) -> bytes:
    """Read until ``expected_replies`` complete replies arrived (framed with the plugin's framer)."""
    framer, data, ends = resp.ReplyFramer(), bytearray(), 0
    while ends < expected_replies:
        chunk = sock.recv(65536)
        framer.receive_data(chunk)
        while (event := framer.next_event()) not in (resp.NEED_DATA, resp.END_OF_STREAM):
            if isinstance(event, resp.ReplyData):
                data += event.data
            else:
                ends += 1
        if not chunk:
            break
    return bytes(data)


def auth(sock: socket.socket, token: str) -> None:
    sock.sendall(resp.encode_command([b"AUTH", token.encode()]))
    assert read_reply(sock) == b"+OK\r\n"


@pytest.mark.redis
@pytest.mark.parametrize("protocol", [2, 3])
def test_allowed_commands_work(tmp_path, redis_server, protocol):
    name, secret_value = key(), "value-" + uuid.uuid4().hex

    def work(running: Running):
        with running.client(protocol=protocol) as client:
            assert client.set(name, secret_value) is True
            assert client.get(name) == secret_value.encode()
            assert client.hset(name + ":h", mapping={"a": "1", "b": "2"}) == 2
            assert client.hgetall(name + ":h") == {b"a": b"1", b"b": b"2"}
            assert client.incr(name + ":n") == 1
            assert client.get(name + ":missing") is None

    _, running = with_gateway(tmp_path, redis_server, work)
    assert direct(redis_server).get(name) == secret_value.encode()
    started = running.of_type(events.SessionStarted)
    assert [e.identity.subject for e in started] == ["ci-bot"]


@pytest.mark.redis
def test_denied_commands_are_refused_and_the_connection_stays_usable(tmp_path, redis_server):
    name = key()
    direct(redis_server).set(name, "kept")

    def work(running: Running):
        with running.client() as client:
            with pytest.raises(redis.exceptions.NoPermissionError, match="FLUSHALL is not allowed on target cache"):
                client.flushall()
            with pytest.raises(redis.exceptions.NoPermissionError, match="redis:deny-commands"):
                client.config_set("maxmemory-policy", "allkeys-lru")
            assert client.config_get("maxmemory-policy")  # CONFIG GET is not on the deny list
            assert client.get(name) == b"kept"

    _, running = with_gateway(tmp_path, redis_server, work)
    assert direct(redis_server).get(name) == b"kept"
    assert direct(redis_server).config_get("maxmemory-policy")["maxmemory-policy"] != "allkeys-lru"
    judged = {e.actions[0]: e for e in running.of_type(events.RequestJudged)}
    assert judged["flushall"].verdict == "deny" and "redis:deny-commands" in judged["flushall"].rules
    assert judged["config set"].verdict == "deny"
    assert judged["get"].verdict == "allow"


@pytest.mark.redis
def test_the_policy_bundle_decides_what_each_identity_may_run(tmp_path, redis_server):
    name = key()
    direct(redis_server).set(name, "original")

    def work(running: Running):
        with running.client(password=running.reader_token) as client:
            assert client.get(name) == b"original"
            with pytest.raises(redis.exceptions.NoPermissionError, match="default-deny"):
                client.set(name, "changed")
            assert client.ping() is True

    _, running = with_gateway(tmp_path, redis_server, work)
    assert direct(redis_server).get(name) == b"original"
    judged = {e.actions[0]: e for e in running.of_type(events.RequestJudged)}
    assert judged["set"].identity == "reader" and judged["set"].verdict == "deny"
    assert judged["get"].verdict == "allow" and any("reader-cache" in rule for rule in judged["get"].rules)


@pytest.mark.redis
def test_a_pipelined_mix_gets_its_replies_in_order(tmp_path, redis_server):
    name = key()

    def work(running: Running):
        with running.client() as client:
            pipe = client.pipeline(transaction=False)
            pipe.set(name, "1")
            pipe.flushall()
            pipe.get(name)
            pipe.config_set("maxmemory", "1")
            pipe.incr(name)
            pipe.keys("*")
            pipe.get(name)
            return pipe.execute(raise_on_error=False)

    results, running = with_gateway(tmp_path, redis_server, work)
    assert results[0] is True
    assert isinstance(results[1], redis.exceptions.NoPermissionError)
    assert results[2] == b"1"
    assert isinstance(results[3], redis.exceptions.NoPermissionError)
    assert results[4] == 2
    assert isinstance(results[5], redis.exceptions.NoPermissionError)
    assert results[6] == b"2"
    responses = {e.request_no: e.status for e in running.of_type(events.ResponseCompleted)}
    requests = {e.request_no: e.actions[0] for e in running.of_type(events.RequestJudged)}
    ordered = [(requests[n], responses[n]) for n in sorted(requests) if requests[n] in ("set", "flushall", "get", "config set", "incrby", "keys")]
    assert ordered[-7:] == [
        ("set", "ok"), ("flushall", "denied"), ("get", "ok"), ("config set", "denied"),
        ("incrby", "ok"), ("keys", "denied"), ("get", "ok"),
    ]  # fmt: skip


@pytest.mark.redis
@pytest.mark.parametrize("pending_limit", [None, 4])
def test_a_deep_raw_pipeline_of_mixed_commands_keeps_reply_order(tmp_path, redis_server, monkeypatch, pending_limit):
    """Many more commands than fit in one read, every third one refused; with a tiny limit on
    replies due, the proxy keeps stopping to read the caller, and order must still hold."""
    from bastion_redis import handler

    if pending_limit is not None:
        monkeypatch.setattr(handler, "MAX_PENDING_REPLIES", pending_limit)
    name = key() + ":" + "k" * 400  # long keys: the pipeline is far bigger than one read
    count = 450

    def work(running: Running):
        with running.raw() as sock:
            auth(sock, running.token)
            stream = b"".join(
                resp.encode_command([b"FLUSHDB"] if i % 3 == 2 else [b"INCR", name.encode()]) for i in range(count)
            )
            sock.sendall(stream)
            return read_reply(sock, count)

    data, _ = with_gateway(tmp_path, redis_server, work)
    _, framed = frame_replies([data], close=False)
    expected, n = [], 0
    for i in range(count):
        if i % 3 == 2:
            expected.append("NOPERM")
        else:
            n += 1
            expected.append(b":%d\r\n" % n)
    assert [end.error_code if end.error else reply for reply, end in framed] == expected


@pytest.mark.redis
def test_commands_pipelined_behind_auth_run_once_authenticated(tmp_path, redis_server):
    def work(running: Running):
        with running.raw() as sock:
            sock.sendall(resp.encode_command([b"AUTH", b"default", running.token.encode()]) + b"PING\r\nQUIT\r\n")
            replies = read_reply(sock, 3)
            assert sock.recv(100) == b"", "QUIT ends the connection"
            return replies

    replies, running = with_gateway(tmp_path, redis_server, work)
    assert replies == b"+OK\r\n+PONG\r\n+OK\r\n"
    assert [e.reason for e in running.of_type(events.SessionEnded)] == ["client quit"]


@pytest.mark.redis
def test_wrong_token_is_refused_and_recorded(tmp_path, redis_server):
    def work(running: Running):
        with pytest.raises(redis.exceptions.AuthenticationError):
            running.client(password="not-the-token").ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            running.client(password="not-the-token", protocol=2).ping()
        with running.raw() as sock:
            sock.sendall(b"GET x\r\n")
            noauth = read_reply(sock)
            sock.sendall(b"HELLO 3\r\n")
            hello = read_reply(sock)
            return noauth, hello

    (noauth, hello), running = with_gateway(tmp_path, redis_server, work)
    assert noauth.startswith(b"-NOAUTH ")
    assert hello.startswith(b"-NOAUTH ")
    failures = running.of_type(events.AuthenticationFailed)
    assert len(failures) == 2
    assert all(b"not-the-token" not in record.body for record in running.records())
    assert not running.of_type(events.SessionStarted)
    assert not running.of_type(events.RequestJudged)


@pytest.mark.redis
def test_the_audit_trail_records_every_command_but_never_a_value(tmp_path, redis_server):
    name, secret_value = key(), "123-45-" + uuid.uuid4().hex

    def work(running: Running):
        with running.client() as client:
            client.set(name, secret_value)
            client.get(name)
            client.hset(name + ":h", "ssn", secret_value)
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.flushdb()

    _, running = with_gateway(tmp_path, redis_server, work)
    judged = running.of_type(events.RequestJudged)
    statements = [e.statements[0] for e in judged]
    for statement in ("SET ? ?", "GET ?", "HSET ? ? ?", "FLUSHDB"):
        assert statement in statements
    assert all(e.kind == "command" for e in judged)
    responses = {e.request_no: e for e in running.of_type(events.ResponseCompleted)}
    assert set(responses) == {e.request_no for e in judged}, "every command has its response recorded"
    get_no = next(e.request_no for e in judged if e.statements[0] == "GET ?")
    assert responses[get_no].command_tag == "bulk-string" and responses[get_no].bytes > len(secret_value)
    for record in running.records():  # the exact bytes the hash chain covers
        for needle in (secret_value, name, running.token):
            assert needle.encode() not in record.body, f"{needle} is in a {record.type} record"


@pytest.mark.redis
def test_client_garbage_ends_the_session_and_the_gateway_keeps_serving(tmp_path, redis_server):
    def work(running: Running):
        with running.raw() as sock:
            auth(sock, running.token)
            sock.sendall(b"*1\r\n$3\r\nGETX\r\n")
            error = read_reply(sock)
            assert sock.recv(100) == b"", "the gateway closes the connection"
        with running.raw() as sock:
            sock.sendall(b"*1\r\n:5\r\n")  # before authenticating
            before_auth = read_reply(sock)
        with running.client() as client:
            assert client.ping() is True
        return error, before_auth

    (error, before_auth), running = with_gateway(tmp_path, redis_server, work)
    assert error.startswith(b"-ERR Protocol error")
    assert before_auth.startswith(b"-ERR Protocol error")
    reasons = [e.reason for e in running.of_type(events.SessionEnded)]
    assert reasons.count("client protocol error") == 2


@pytest.mark.redis
def test_a_refused_command_spoils_its_transaction(tmp_path, redis_server):
    name = key()

    def work(running: Running):
        with running.raw() as sock:
            auth(sock, running.token)
            sock.sendall(
                b"MULTI\r\n" + resp.encode_command([b"SET", name.encode(), b"x"]) + b"FLUSHALL\r\nEXEC\r\n"
            )
            replies = read_reply(sock, 4)
        with running.client() as client:
            pipe = client.pipeline(transaction=True)
            pipe.set(name, "should-not-be-set")
            pipe.flushall()
            with pytest.raises(redis.exceptions.NoPermissionError):
                pipe.execute()  # redis-py reports the refusal that aborted the transaction
            assert client.set(name + ":after", "1") is True  # the connection is still in step
        return replies

    replies, _ = with_gateway(tmp_path, redis_server, work)
    _, framed = frame_replies([replies], close=False)
    assert [end.error_code or data for data, end in framed] == [b"+OK\r\n", b"+QUEUED\r\n", "NOPERM", "EXECABORT"]
    assert direct(redis_server).get(name) is None
    assert direct(redis_server).get(name + ":after") == b"1"


@pytest.mark.redis
def test_pubsub_passes_messages_through(tmp_path, redis_server):
    channel = key()

    def work(running: Running):
        with running.client() as client:
            pubsub = client.pubsub()
            pubsub.subscribe(channel)
            assert pubsub.get_message(timeout=CLIENT_TIMEOUT)["type"] == "subscribe"
            with running.client() as publisher:
                assert publisher.publish(channel, "hello") == 1
            message = pubsub.get_message(timeout=CLIENT_TIMEOUT)
            pubsub.close()
            return message

    message, running = with_gateway(tmp_path, redis_server, work)
    assert message["type"] == "message" and message["data"] == b"hello"
    assert "subscribe" in [e.actions[0] for e in running.of_type(events.RequestJudged)]


@pytest.mark.redis
def test_the_gateway_logs_in_upstream_with_the_targets_credentials(tmp_path, redis_server, monkeypatch):
    user, password = "bastion-" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    admin = direct(redis_server)
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], commands=["+@all"], keys=["*"], channels=["*"])
    monkeypatch.setenv("BASTION_TEST_REDIS_PASSWORD", password)
    extra = f'credentials = {{ user = "{user}", password = {{ env = "BASTION_TEST_REDIS_PASSWORD" }} }}\n'

    def work(running: Running):
        with running.client() as client:
            client.client_setname("through-bastion")
            names = {c["name"]: c["user"] for c in direct(redis_server).client_list()}
            return names.get("through-bastion")

    try:
        upstream_user, _ = with_gateway(tmp_path, redis_server, work, extra)
        assert upstream_user == user
        monkeypatch.setenv("BASTION_TEST_REDIS_PASSWORD", "wrong")

        def refused(running: Running):
            with pytest.raises(redis.exceptions.ResponseError, match="cannot open a session"):
                running.client().ping()

        _, running = with_gateway(tmp_path / "wrong", redis_server, refused, extra)
        assert [e.reason for e in running.of_type(events.SessionEnded)] == ["upstream unavailable"]
    finally:
        admin.acl_deluser(user)


@pytest.mark.redis
def test_resp3_pushes_are_relayed_and_never_taken_for_a_reply(tmp_path, redis_server):
    name = key()

    def work(running: Running):
        with running.raw() as sock:
            sock.sendall(resp.encode_command([b"HELLO", b"3", b"AUTH", b"default", running.token.encode()]))
            hello = read_reply(sock)
            sock.sendall(b"CLIENT TRACKING ON\r\n" + resp.encode_command([b"GET", name.encode()]))
            tracking = read_reply(sock, 2)
            direct(redis_server).set(name, "changed")  # invalidates the key the connection read
            sock.sendall(b"PING\r\n")
            return hello, tracking, read_reply(sock, 2)

    (hello, tracking, last), _ = with_gateway(tmp_path, redis_server, work)
    _, framed = frame_replies([hello], close=False)
    assert framed[0][1].kind == "map" and b"proto" in hello
    assert tracking == b"+OK\r\n_\r\n"
    _, framed = frame_replies([last], close=False)
    assert [(end.kind, data) for data, end in framed][1] == ("simple-string", b"+PONG\r\n")
    assert framed[0][1].push and b"invalidate" in framed[0][0]


@pytest.mark.redis
def test_a_large_value_streams_through_intact(tmp_path, redis_server):
    name, value = key(), bytes(range(256)) * (8 * 1024 + 3)  # about 2 MB, many relay chunks

    def work(running: Running):
        with running.client() as client:
            client.set(name, value)
            return client.get(name)

    assert with_gateway(tmp_path, redis_server, work)[0] == value
    direct(redis_server).delete(name)


@pytest.mark.redis
def test_without_require_auth_callers_are_anonymous(tmp_path, redis_server):
    def work(running: Running):
        with running.client(password=None) as client:
            return client.ping()

    assert with_gateway(tmp_path, redis_server, work, "require_auth = false\n")[0] is True


def test_deny_commands_entries_are_checked_when_the_configuration_loads(tmp_path):
    from bastion.core.config import ConfigError

    path = write_config(tmp_path, 6379, 'deny_commands = ["flushall", "CONFIG SET maxmemory"]\n')
    with pytest.raises(ConfigError, match=r"targets\[0\].*deny_commands: \"CONFIG SET maxmemory\" is not a command"):
        load(path, extra_plugins=[identity_static])
    path = write_config(tmp_path, 6379, 'deny_commands = ["  Flushall ", "config   SET"]\n')
    loaded = load(path, extra_plugins=[identity_static])
    assert loaded.config.targets[0].options.deny_commands == ("flushall", "config set")


@pytest.mark.redis
def test_an_idle_caller_is_disconnected_but_a_waiting_one_is_not(tmp_path, redis_server):
    name = key()

    def work(running: Running):
        with running.raw() as sock:
            auth(sock, running.token)
            # BLPOP waits longer than idle_timeout: the caller is waiting for a reply, not idle
            sock.sendall(resp.encode_command([b"BLPOP", name.encode(), b"0.6"]))
            waited = read_reply(sock)
            idle = sock.recv(100)  # then nothing is due, and the gateway hangs up
        return waited, idle

    (waited, idle), running = with_gateway(tmp_path, redis_server, work, 'idle_timeout = "200ms"\n')
    assert waited in (b"*-1\r\n", b"_\r\n")
    assert idle == b""
    assert [e.reason for e in running.of_type(events.SessionEnded)] == ["idle timeout"]


@pytest.mark.redis
def test_on_shutdown_a_waiting_caller_is_told_why_the_connection_closes(tmp_path, redis_server):
    name = key()

    def work(running: Running):
        with running.raw() as sock:
            auth(sock, running.token)
            sock.sendall(resp.encode_command([b"BLPOP", name.encode(), b"0"]))
            while not any(c.get("cmd") == "blpop" for c in direct(redis_server).client_list()):
                trio.from_thread.run_sync(lambda: None)  # the BLPOP has not reached the server yet
            trio.from_thread.run_sync(running.gateway.shutdown, "test shutdown")
            return read_reply(sock)

    reply, running = with_gateway(tmp_path, redis_server, work, shutdown_grace="0s")
    assert reply == b"-ERR Bastion closed the connection: gateway shutdown\r\n"
    assert [e.reason for e in running.of_type(events.SessionEnded)] == ["gateway shutdown"]


@pytest.mark.redis
def test_a_command_whose_reply_never_came_is_recorded_as_cancelled(tmp_path, redis_server):
    name = key()

    def work(running: Running):
        with running.raw() as sock:
            auth(sock, running.token)
            sock.sendall(resp.encode_command([b"BLPOP", name.encode(), b"0"]))
            while not any(c.get("cmd") == "blpop" for c in direct(redis_server).client_list()):
                trio.from_thread.run_sync(lambda: None)  # the BLPOP has not reached the server yet
        # the caller hangs up with the BLPOP still waiting

    _, running = with_gateway(tmp_path, redis_server, work)
    blpop = next(e.request_no for e in running.of_type(events.RequestJudged) if e.actions == ("blpop",))
    assert [e.status for e in running.of_type(events.ResponseCompleted) if e.request_no == blpop] == ["cancelled"]


def test_the_plugin_is_found_through_its_entry_point_and_can_be_switched_off(tmp_path):
    from bastion.core.config import ConfigError
    from bastion.core.plugins import build_plugin_manager, describe_plugins

    rows = {name: (origin, hooks) for name, origin, hooks in describe_plugins(build_plugin_manager())}
    origin, hooks = rows["redis"]
    assert origin.startswith("bastion-redis ")
    assert {"bastion_register_protocols", "bastion_parse", "bastion_authorize"} <= set(hooks)

    path = write_config(tmp_path, 6379)
    path.write_text(path.read_text().replace("[gateway]", '[gateway]\ndisable_plugins = ["redis"]', 1))
    with pytest.raises(ConfigError, match="unknown protocol 'redis'"):
        load(path, extra_plugins=[identity_static])
