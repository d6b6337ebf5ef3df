"""A sans-IO codec for RESP, the Redis serialization protocol (RESP2 and RESP3).

Two directions, two very different jobs:

* :class:`CommandDecoder` reads what a *client* sends: arrays of bulk strings
  (``*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n``) and inline commands typed by a human
  (``GET k\\r\\n``). Each command is decoded whole into a :class:`Command`, because the gateway
  must judge it before a byte of it is forwarded. The gateway forwards
  :func:`encode_command` of the decoded arguments, never the client's own bytes, so the upstream
  executes exactly what was judged, whatever quirks the client's framing had.

* :class:`ReplyFramer` reads what the *server* sends back. It never builds values: it only finds
  where each reply ends, so the proxy can stream a 500 MB bulk reply through a few kilobytes of
  buffer and still know which command a reply answers. It understands every RESP2 and RESP3
  type, including attributes (``|``, which precede a reply and are not one) and pushes
  (``>``, out-of-band data that answers no command).

Both follow the h11 pattern: ``receive_data(bytes)`` (``b""`` means the peer closed), then call
``next_event()`` until it returns :data:`NEED_DATA`. Every framing problem raises
:class:`ProtocolError`, and nothing else.

RESP3 streamed types (``$?``, ``*?``…) are refused: Redis never sends them, and a gateway that
cannot frame a reply must not guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

# --- limits ------------------------------------------------------------------------------------

# Redis' own limit for an inline command line (PROTO_INLINE_MAX_SIZE); humans type short lines.
MAX_INLINE_LENGTH = 64 * 1024
# Redis refuses a multibulk with more arguments than this, so a larger count can only be an attack.
MAX_COMMAND_ARGS = 1024 * 1024
# A command is held whole until it is judged: this bounds what one session makes the gateway hold.
# Redis accepts values up to 512 MB; values that large have no business crossing an access gateway.
MAX_COMMAND_BYTES = 64 * 1024 * 1024
# `*<count>` and `$<length>` lines: a signed 64-bit number is at most 20 characters.
MAX_HEADER_LENGTH = 32
# Simple strings, simple errors and numbers in replies. Redis keeps these to one short line (long
# text comes as bulk strings), so a longer line means a broken stream, not a big answer.
MAX_REPLY_LINE = 64 * 1024
# Nesting of aggregates in a reply. The deepest Redis replies (EXEC of XINFO STREAM FULL, COMMAND
# DOCS) nest well under 16; the limit keeps a hostile upstream from growing the framer's stack.
MAX_REPLY_DEPTH = 128
# Replies are streamed, not held, so these only say what a sane length or element count is.
MAX_REPLY_BULK = 1 << 40
MAX_REPLY_ELEMENTS = 1 << 40
# how much of a top-level error the framer keeps to name its code (WRONGTYPE, NOPERM…)
ERROR_CODE_LENGTH = 32


class ProtocolError(Exception):
    """The byte stream is not valid RESP (or exceeds a limit). The connection cannot continue."""


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""``next_event`` has nothing more until ``receive_data`` is called again."""

END_OF_STREAM = _Sentinel("END_OF_STREAM")
"""The peer closed the connection cleanly, between two messages."""


# --- events ------------------------------------------------------------------------------------


@attrs.frozen
class Command:
    """One client command: ``args[0]`` is the command name, as sent (any case)."""

    args: tuple[bytes, ...]
    inline: bool = False

    @property
    def name(self) -> str:
        """Upper-case command name (latin-1, so any byte string has one)."""
        return self.args[0].decode("latin-1").upper()


@attrs.frozen
class ReplyData:
    """Bytes of the reply currently being framed, to forward as they are.

    ``kind`` is the reply's type as far as it is known (None while only an attribute has been
    seen), so a proxy can tell a push from a reply before the push has ended.
    """

    data: bytes
    kind: str | None = None


@attrs.frozen
class ReplyEnd:
    """The reply whose bytes were just given has ended.

    ``kind`` names the RESP type of the reply (``simple-string``, ``error``, ``integer``,
    ``bulk-string``, ``array``, ``map``, ``set``, ``push``, ``null``, ``double``, ``boolean``,
    ``big-number``, ``bulk-error``, ``verbatim-string``); ``size`` counts its bytes;
    ``error_code`` is the first word of an error reply (``WRONGTYPE``), else empty.
    A push is out-of-band data, not the answer to a command.
    """

    kind: str
    size: int
    error_code: str = ""

    @property
    def push(self) -> bool:
        return self.kind == "push"

    @property
    def error(self) -> bool:
        return self.kind in ("error", "bulk-error")


# --- encoding ----------------------------------------------------------------------------------


def encode_command(args: Iterable[bytes]) -> bytes:
    """A command as an array of bulk strings: the one framing every Redis server accepts."""
    args = list(args)
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(b"\r\n")
    return b"".join(parts)


def encode_error(message: str) -> bytes:
    """A simple error reply. ``message`` starts with the code (``NOPERM …``); line breaks in it
    would end the reply early, so they become spaces."""
    text = " ".join(message.splitlines()) or "ERR"
    return b"-" + text.encode("utf-8", "replace") + b"\r\n"


def encode_simple(text: str) -> bytes:
    return b"+" + " ".join(text.splitlines()).encode("utf-8", "replace") + b"\r\n"


# --- shared ------------------------------------------------------------------------------------

_INTEGER = re.compile(rb"-?(?:0|[1-9][0-9]*)")


def _integer(text: bytes, what: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise ProtocolError(f"invalid {what} {text[:MAX_HEADER_LENGTH]!r}")
    return int(text)


class _Buffer:
    """Received bytes and a read position; consumed bytes are dropped once per receive, not per
    message, so a pipeline of many small commands costs linear time."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0
        self.closed = False

    def feed(self, data: bytes, keep_from: int | None = None) -> int:
        """Append ``data``; returns how far the kept region moved (for callers' own offsets)."""
        if self.closed and data:
            raise ProtocolError("data received after the end of the stream")
        drop = self.pos if keep_from is None else keep_from
        if drop:
            del self.data[:drop]
            self.pos -= drop
        if data:
            self.data += data
        else:
            self.closed = True
        return drop

    @property
    def available(self) -> int:
        return len(self.data) - self.pos

    def line(self, limit: int, what: str) -> bytes | None:
        """The line at the read position without its CRLF, or None when it is not complete."""
        end = self.data.find(b"\r\n", self.pos, self.pos + limit + 2)
        if end < 0:
            if self.available > limit + 1:
                raise ProtocolError(f"{what} longer than {limit} bytes")
            return None
        line = bytes(self.data[self.pos : end])
        self.pos = end + 2
        return line


# --- client commands ---------------------------------------------------------------------------


class CommandDecoder:
    """Decode client commands. ``next_event()`` returns a :class:`Command`, :data:`NEED_DATA` or
    :data:`END_OF_STREAM`; empty arrays and blank inline lines are skipped, as Redis skips them."""

    def __init__(self) -> None:
        self._buffer = _Buffer()
        self._expected: int | None = None  # arguments of the array being read
        self._args: list[bytes] = []
        self._bulk_length: int | None = None  # announced length of the next argument
        self._command_bytes = 0

    def receive_data(self, data: bytes) -> None:
        self._buffer.feed(bytes(data))

    def next_event(self) -> Command | _Sentinel:
        buffer = self._buffer
        while True:
            if self._expected is None:
                if not buffer.available:
                    return END_OF_STREAM if buffer.closed else NEED_DATA
                if buffer.data[buffer.pos] == ord("*"):
                    header = buffer.line(MAX_HEADER_LENGTH, "an array header")
                    if header is None:
                        return self._incomplete()
                    count = _integer(header[1:], "argument count")
                    if count > MAX_COMMAND_ARGS:
                        raise ProtocolError(f"a command may have at most {MAX_COMMAND_ARGS} arguments, not {count}")
                    if count <= 0:
                        continue  # Redis ignores empty (and null) arrays
                    self._expected, self._args, self._command_bytes = count, [], 0
                    continue
                command = self._inline()
                if command is NEED_DATA:
                    return self._incomplete()
                if command is not None:
                    return command
                continue
            if self._bulk_length is None:
                header = buffer.line(MAX_HEADER_LENGTH, "a bulk string header")
                if header is None:
                    return self._incomplete()
                if not header.startswith(b"$"):
                    raise ProtocolError(f"expected a bulk string in the command, got {header[:1]!r}")
                length = _integer(header[1:], "bulk length")
                if length < 0:
                    raise ProtocolError("a command argument cannot be null")
                self._command_bytes += length
                if self._command_bytes > MAX_COMMAND_BYTES:
                    raise ProtocolError(f"a command may carry at most {MAX_COMMAND_BYTES} bytes")
                self._bulk_length = length
            length = self._bulk_length
            if buffer.available < length + 2:
                return self._incomplete()
            end = buffer.pos + length
            if buffer.data[end : end + 2] != b"\r\n":
                raise ProtocolError("a bulk string does not end where its length says")
            self._args.append(bytes(buffer.data[buffer.pos : end]))
            buffer.pos = end + 2
            self._bulk_length = None
            if len(self._args) == self._expected:
                args, self._args, self._expected = tuple(self._args), [], None
                return Command(args)

    def _incomplete(self) -> _Sentinel:
        if self._buffer.closed:
            raise ProtocolError("the connection closed in the middle of a command")
        return NEED_DATA

    def _inline(self) -> Command | None | _Sentinel:
        buffer = self._buffer
        end = buffer.data.find(b"\n", buffer.pos, buffer.pos + MAX_INLINE_LENGTH + 1)
        if end < 0:
            if buffer.available > MAX_INLINE_LENGTH:
                raise ProtocolError(f"an inline command longer than {MAX_INLINE_LENGTH} bytes")
            return NEED_DATA
        line = bytes(buffer.data[buffer.pos : end]).removesuffix(b"\r")
        buffer.pos = end + 1
        args = split_inline(line)
        return Command(tuple(args), inline=True) if args else None


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}
_HEX = b"0123456789abcdefABCDEF"


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command line into arguments, with Redis' quoting rules.

    Words are separated by blanks. ``"…"`` quotes allow ``\\n \\r \\t \\b \\a \\xHH`` and
    ``\\<any>`` escapes; ``'…'`` quotes allow only ``\\'``. A closing quote must be followed by a
    blank or the end of the line. Unbalanced quotes raise :class:`ProtocolError`.
    """
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \t\n\r\v\f":
            i += 1
        if i >= n:
            return args
        word = bytearray()
        quote = None
        while True:
            if quote is None:
                if i >= n or line[i] in b" \t\n\r\v\f":
                    break
                if line[i] in b"\"'":
                    quote = line[i]
                else:
                    word.append(line[i])
                i += 1
                continue
            if i >= n:
                raise ProtocolError("unbalanced quotes in an inline command")
            char = line[i]
            if quote == ord('"') and char == ord("\\") and i + 1 < n:
                following = line[i + 1]
                if following == ord("x") and i + 3 < n and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    word.append(int(line[i + 2 : i + 4], 16))
                    i += 4
                    continue
                word += _ESCAPES.get(following, bytes([following]))
                i += 2
                continue
            if quote == ord("'") and char == ord("\\") and i + 1 < n and line[i + 1] == ord("'"):
                word.append(ord("'"))
                i += 2
                continue
            if char == quote:
                i += 1
                if i < n and line[i] not in b" \t\n\r\v\f":
                    raise ProtocolError("a closing quote must be followed by a space in an inline command")
                break
            word.append(char)
            i += 1
        args.append(bytes(word))


# --- server replies ----------------------------------------------------------------------------

_SIMPLE_KINDS = {
    ord("+"): "simple-string",
    ord("-"): "error",
    ord(":"): "integer",
    ord("_"): "null",
    ord(","): "double",
    ord("#"): "boolean",
    ord("("): "big-number",
}
_BULK_KINDS = {ord("$"): "bulk-string", ord("!"): "bulk-error", ord("="): "verbatim-string"}
# aggregate type -> (kind, elements per announced count)
_AGGREGATE_KINDS = {
    ord("*"): ("array", 1),
    ord("~"): ("set", 1),
    ord(">"): ("push", 1),
    ord("%"): ("map", 2),
    ord("|"): ("attribute", 2),
}
_NUMBER = re.compile(rb"[-+]?[0-9]+")
_DOUBLE = re.compile(rb"[-+]?(?:inf|nan|[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)")


class ReplyFramer:
    """Find where each server reply ends, without building it.

    ``next_event()`` returns :class:`ReplyData` (bytes of the current reply, in order),
    :class:`ReplyEnd` (after the last bytes of a reply), :data:`NEED_DATA` or
    :data:`END_OF_STREAM`. Memory is bounded by one unfinished line plus what was last received:
    bulk payloads are handed out as they arrive.
    """

    def __init__(self) -> None:
        self._buffer = _Buffer()
        self._emit_from = 0  # start of the scanned bytes not yet handed out
        self._stack: list[list] = []  # open aggregates: [elements left, is attribute]
        self._bulk_left: int | None = None  # payload bytes of the current bulk still to come
        self._bulk_crlf = False  # the payload is done; its CRLF is next
        self._kind: str | None = None  # kind of the reply being framed, once its header is seen
        self._top_error = False  # the payload being skipped is a top-level bulk error
        self._error_head = bytearray()
        self._size = 0
        self._ended: ReplyEnd | None = None  # to return once the reply's last bytes are out

    def receive_data(self, data: bytes) -> None:
        self._emit_from -= self._buffer.feed(bytes(data), keep_from=self._emit_from)

    def next_event(self) -> ReplyData | ReplyEnd | _Sentinel:
        buffer = self._buffer
        if self._ended is None:
            self._scan()
        if buffer.pos > self._emit_from:
            data = bytes(buffer.data[self._emit_from : buffer.pos])
            self._emit_from = buffer.pos
            self._size += len(data)
            return ReplyData(data, self._ended.kind if self._ended is not None else self._kind)
        if self._ended is not None:
            ended, self._ended = self._ended, None
            ended = attrs.evolve(ended, size=self._size)
            self._size = 0
            return ended
        if buffer.closed and not buffer.available and not self._mid_reply():
            return END_OF_STREAM
        if buffer.closed:
            raise ProtocolError("the server closed the connection in the middle of a reply")
        return NEED_DATA

    def _mid_reply(self) -> bool:
        return self._kind is not None or bool(self._stack) or self._bulk_left is not None or self._bulk_crlf

    def _scan(self) -> None:
        """Advance over complete pieces until a reply ends or the buffer runs out."""
        buffer = self._buffer
        while True:
            if self._bulk_left is not None:
                take = min(self._bulk_left, buffer.available)
                room = ERROR_CODE_LENGTH - len(self._error_head)
                if self._top_error and room > 0:
                    self._error_head += buffer.data[buffer.pos : buffer.pos + min(take, room)]
                buffer.pos += take
                self._bulk_left -= take
                if self._bulk_left:
                    return
                self._bulk_left, self._bulk_crlf = None, True
            if self._bulk_crlf:
                if buffer.available < 2:
                    return
                if buffer.data[buffer.pos : buffer.pos + 2] != b"\r\n":
                    raise ProtocolError("a bulk reply does not end where its length says")
                buffer.pos += 2
                self._bulk_crlf = False
                if self._value_done():
                    return
                continue
            if not buffer.available:
                return
            line = buffer.line(MAX_REPLY_LINE, "a reply line")
            if line is None:
                return
            if self._header(line):
                return

    def _header(self, line: bytes) -> bool:
        """Handle one type line; True when it completes the reply."""
        if not line:
            raise ProtocolError("an empty line where a reply type was expected")
        marker, payload = line[0], line[1:]
        top = self._kind is None and not self._stack
        if marker in _SIMPLE_KINDS:
            kind = _SIMPLE_KINDS[marker]
            _check_simple(kind, payload)
            if top:
                self._kind = kind
                if kind == "error":
                    self._error_head = bytearray(payload[:ERROR_CODE_LENGTH])
            return self._value_done()
        if payload == b"?":
            raise ProtocolError("streamed RESP3 types are not supported")
        if marker in _BULK_KINDS:
            kind = _BULK_KINDS[marker]
            length = _integer(payload, "bulk length")
            if top:
                self._kind = kind
                self._top_error = kind == "bulk-error"
                self._error_head = bytearray()
            if length == -1 and kind == "bulk-string":  # RESP2 null
                if top:
                    self._kind = "null"
                return self._value_done()
            if not 0 <= length <= MAX_REPLY_BULK:
                raise ProtocolError(f"invalid bulk length {length}")
            self._bulk_left = length
            return False
        if marker in _AGGREGATE_KINDS:
            kind, per_count = _AGGREGATE_KINDS[marker]
            count = _integer(payload, "element count")
            if kind == "attribute":
                top = False  # the reply it decorates follows it
            elif top:
                self._kind = kind
            if count == -1 and kind == "array":  # RESP2 null array
                if top:
                    self._kind = "null"
                return self._value_done()
            if not 0 <= count <= MAX_REPLY_ELEMENTS:
                raise ProtocolError(f"invalid element count {count}")
            if count == 0:
                return False if kind == "attribute" else self._value_done()
            if len(self._stack) >= MAX_REPLY_DEPTH:
                raise ProtocolError(f"a reply nested deeper than {MAX_REPLY_DEPTH} levels")
            self._stack.append([count * per_count, kind == "attribute"])
            return False
        raise ProtocolError(f"unknown reply type {bytes([marker])!r}")

    def _value_done(self) -> bool:
        """A value ended: count it against its enclosing aggregates; True when the reply ended."""
        self._top_error = False
        while self._stack:
            frame = self._stack[-1]
            frame[0] -= 1
            if frame[0]:
                return False
            self._stack.pop()
            if frame[1]:
                return False  # an attribute is not a value: the one it decorates follows
        if self._kind is None:  # only an attribute so far
            return False
        code = ""
        if self._kind in ("error", "bulk-error"):
            code = bytes(self._error_head).split(b" ", 1)[0].decode("ascii", "replace")
        self._ended = ReplyEnd(self._kind, 0, code)
        self._kind = None
        self._error_head = bytearray()
        return True


_SIMPLE_VALID = {
    "simple-string": lambda p: b"\r" not in p and b"\n" not in p,
    "error": lambda p: b"\r" not in p and b"\n" not in p,
    "integer": lambda p: _NUMBER.fullmatch(p) is not None,
    "null": lambda p: p == b"",
    "double": lambda p: _DOUBLE.fullmatch(p.lower()) is not None,
    "boolean": lambda p: p in (b"t", b"f"),
    "big-number": lambda p: _NUMBER.fullmatch(p) is not None,
}


def _check_simple(kind: str, payload: bytes) -> None:
    if not _SIMPLE_VALID[kind](payload):
        raise ProtocolError(f"invalid {kind} {payload[:MAX_HEADER_LENGTH]!r}")


__all__ = [
    "Command",
    "CommandDecoder",
    "END_OF_STREAM",
    "NEED_DATA",
    "ProtocolError",
    "ReplyData",
    "ReplyEnd",
    "ReplyFramer",
    "encode_command",
    "encode_error",
    "encode_simple",
    "split_inline",
]
