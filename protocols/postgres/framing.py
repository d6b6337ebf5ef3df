"""Cutting the byte stream into frames, and the h11-style decoders built on it.

A gateway sits on the path of every row, so the hot loop does as little as possible:
:class:`FrameSplitter` only finds where each message ends and hands out ``(type, body)`` tuples
(:data:`Frame`) without looking inside bodies. The caller decodes the frames it cares about
(:func:`~bastion.protocols.postgres.codec.decode_backend`) and forwards the others as bytes
(:func:`~bastion.protocols.postgres.codec.encode_frame`). ``next_raw_run(b"D")`` takes a whole
run of frames of given types as one bytes object and a count, for the common case of passing
many rows through untouched.

:class:`FrontendDecoder` reads what a client sends: it starts in the untyped startup phase,
moves to typed messages after a StartupMessage, and stays untyped after an SSLRequest or
GSSENCRequest (the next packet is again a startup packet). :class:`BackendDecoder` reads what a
server sends. Both offer ``next_frame()`` for raw frames and ``next_event()`` for decoded
messages; both return :data:`NEED_DATA` when more bytes are needed and :data:`END_OF_STREAM`
once the peer closed cleanly between two messages (``receive_data(b"")`` announces the close).

Lengths are checked the moment a header is complete, before a byte of the body is waited for:
a header announcing a message over the limit raises at once, whatever follows. After a
:class:`ProtocolError` the decoder is broken for good and raises the same error again.
"""

from __future__ import annotations

import struct
from typing import Literal, NoReturn

from bastion.protocols.postgres.codec import (
    BACKEND_TYPES,
    FRONTEND_TYPES,
    PASSWORD_KIND_PASSWORD,
    PASSWORD_KINDS,
    decode_backend,
    decode_frontend,
    decode_startup,
)
from bastion.protocols.postgres.errors import (
    FEATURE_NOT_SUPPORTED,
    PROGRAM_LIMIT_EXCEEDED,
    ProtocolError,
)
from bastion.protocols.postgres.messages import (
    BackendMessage,
    CancelRequest,
    FrontendMessage,
    StartupMessage,
    StartupRequest,
)

# --- limits -------------------------------------------------------------------------------------------
# Message lengths count as the protocol does: the 4 length bytes and the body, not the type byte.

# PostgreSQL refuses startup packets whose body (after the length word) is longer than this:
# a startup packet holds a few short parameters, so a longer one is garbage or an attack.
MAX_STARTUP_PACKET_LENGTH = 10000
# the length word and the version code: anything shorter cannot say what it is
MIN_STARTUP_PACKET_LENGTH = 8
# The length word counts itself, so 4 is an empty body; less is a lie.
MIN_MESSAGE_LENGTH = 4
# PostgreSQL's own limit for messages that carry no data, only names or nothing at all (Sync,
# Execute, Describe, Close, Terminate…). Refusing a longer one early catches a desynchronised
# stream before it is taken for a huge message.
SMALL_MESSAGE_LIMIT = 10000
# PostgreSQL's limit for authentication answers ('p'): passwords, SASL and GSSAPI tokens.
MAX_PASSWORD_MESSAGE_LENGTH = 65535
# Default for a client's Query, Parse, Bind, FunctionCall and CopyData. The gateway holds each
# of these whole to judge it; PostgreSQL allows 1 GiB, but statements and parameters of that size
# have no business crossing an access gateway, and every session could make it hold one.
# Raise it per decoder for bulk loads.
DEFAULT_MAX_FRONTEND_MESSAGE_LENGTH = 64 * 1024 * 1024
# Default for server messages: PostgreSQL's own allocation limit (MaxAllocSize), the largest
# row or value a server can produce without special settings. The server is the trusted side.
DEFAULT_MAX_BACKEND_MESSAGE_LENGTH = 1024 * 1024 * 1024 - 1
# The length word is a signed 32-bit number.
_LARGEST_LENGTH = 0x7FFFFFFF

# TLS records start with 0x16 (handshake): a client trying PostgreSQL 17's direct TLS
# (sslnegotiation=direct) sends a ClientHello where a startup packet belongs.
_TLS_HANDSHAKE_BYTE = 0x16

# Client messages that carry no data: Terminate, Close, Describe, Execute, Flush, Sync, CopyDone,
# CopyFail (the others, Query, Parse, Bind, FunctionCall and CopyData, may be large).
_FRONTEND_SMALL_TYPES = b"XCDEHScf"
# Server messages of a fixed small size: ReadyForQuery, Parse/Bind/CloseComplete, NoData,
# PortalSuspended, EmptyQueryResponse, CopyDone, BackendKeyData (at most 8 + 256 bytes).
_BACKEND_SMALL_TYPES = b"Z123nsIcK"

_I32 = struct.Struct(">i")
_TYPE_BYTES = tuple(bytes((code,)) for code in range(256))


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""No complete message is buffered: call ``receive_data`` again."""

END_OF_STREAM = _Sentinel("END_OF_STREAM")
"""The peer closed the connection cleanly, between two messages."""

Frame = tuple[bytes, bytes]
"""``(type, body)``: the type byte (``b"D"``; ``b""`` for untyped startup-phase packets and the
one-byte answer to an encryption request) and the body after the length word."""

Direction = Literal["frontend", "backend"]


def _limit_table(direction: Direction, max_message_length: int) -> tuple[int, ...]:
    """The largest length word accepted for each type byte; 0 marks a type that does not exist."""
    limits = [0] * 256
    if direction == "frontend":
        types, small_types = FRONTEND_TYPES, _FRONTEND_SMALL_TYPES
    elif direction == "backend":
        types, small_types = BACKEND_TYPES, _BACKEND_SMALL_TYPES
    else:
        raise ValueError(f"direction is 'frontend' or 'backend', not {direction!r}")
    for type_byte in types:
        limits[type_byte[0]] = max_message_length
    for code in small_types:
        limits[code] = min(SMALL_MESSAGE_LIMIT, max_message_length)
    if direction == "frontend":
        limits[ord("p")] = min(MAX_PASSWORD_MESSAGE_LENGTH, max_message_length)
    return tuple(limits)


class FrameSplitter:
    """Cuts typed frames (type byte, length, body) from a byte stream without decoding them.

    ``direction`` says who sends the stream, which decides the valid type bytes and their limits;
    ``max_message_length`` bounds the length word of the large messages (see the module limits).

    Usage, h11 style::

        splitter.receive_data(chunk)          # b"" when the peer closed
        while isinstance(frame := splitter.next_frame(), tuple):
            frame_type, body = frame          # forward encode_frame(*frame), or decode it
        if frame is END_OF_STREAM: ...

    Received bytes live in one bytearray with a read offset; consumed bytes are dropped when
    they make up half of it, so many small frames cost linear time.
    """

    __slots__ = ("_buffer", "_pos", "_limits", "_closed", "_error", "direction", "max_message_length")

    def __init__(self, direction: Direction, max_message_length: int | None = None) -> None:
        if max_message_length is None:
            max_message_length = (
                DEFAULT_MAX_FRONTEND_MESSAGE_LENGTH if direction == "frontend" else DEFAULT_MAX_BACKEND_MESSAGE_LENGTH
            )
        if not MIN_MESSAGE_LENGTH <= max_message_length <= _LARGEST_LENGTH:
            raise ValueError(f"max_message_length must be in [{MIN_MESSAGE_LENGTH}, {_LARGEST_LENGTH}]")
        self.direction = direction
        self.max_message_length = max_message_length
        self._limits = _limit_table(direction, max_message_length)
        self._buffer = bytearray()
        self._pos = 0
        self._closed = False
        self._error: ProtocolError | None = None

    # --- input -----------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the peer; ``b""`` means the peer closed the connection."""
        if self._error is not None:
            raise self._error
        if self._closed:
            if data:
                self._fail(ProtocolError("data received after the end of the stream"))
            return
        if not data:
            self._closed = True
            return
        buffer = self._buffer
        pos = self._pos
        if pos and pos * 2 >= len(buffer):
            del buffer[:pos]
            self._pos = 0
        buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as frames."""
        return len(self._buffer) - self._pos

    @property
    def closed(self) -> bool:
        """True once ``receive_data(b"")`` announced the end of the stream."""
        return self._closed

    # --- output ----------------------------------------------------------------------------------

    def _typed_frame(self) -> Frame | _Sentinel:
        """The next complete frame, :data:`NEED_DATA` or :data:`END_OF_STREAM`."""
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        pos = self._pos
        if len(buffer) - pos >= 5:
            type_code = buffer[pos]
            (length,) = _I32.unpack_from(buffer, pos + 1)
            if MIN_MESSAGE_LENGTH <= length <= self._limits[type_code]:
                end = pos + 1 + length
                if end <= len(buffer):
                    self._pos = end
                    return _TYPE_BYTES[type_code], bytes(buffer[pos + 5 : end])
                return self._starved()
            self._fail(self._bad_header(type_code, length))
        if len(buffer) > pos and not self._limits[buffer[pos]]:
            self._fail(self._bad_header(buffer[pos], MIN_MESSAGE_LENGTH))
        return self._starved()

    # the splitter's own next_frame is the typed reader itself: one call less per frame
    next_frame = _typed_frame

    def next_raw_run(self, types: bytes) -> tuple[bytes, int]:
        """Take the complete frames at the front of the buffer whose type byte is in ``types``
        (e.g. ``b"D"`` for DataRows) and return their wire bytes, headers included, and how many
        there were: a pass-through for a run of frames that need no decoding, at one copy.

        It stops before anything else: another type, an incomplete frame, or a header over the
        limits (which the next ``next_frame()`` then refuses). ``(b"", 0)`` means none could be
        taken; the caller goes on with ``next_frame()``.
        """
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        start = pos = self._pos
        size = len(buffer)
        limits = self._limits
        unpack = _I32.unpack_from
        count = 0
        while size - pos >= 5:
            type_code = buffer[pos]
            if type_code not in types:
                break
            (length,) = unpack(buffer, pos + 1)
            end = pos + 1 + length
            if not MIN_MESSAGE_LENGTH <= length <= limits[type_code] or end > size:
                break
            pos = end
            count += 1
        if not count:
            return b"", 0
        self._pos = pos
        return bytes(buffer[start:pos]), count

    def _untyped_frame(self) -> Frame | _Sentinel:
        """A startup-phase packet: a length word, then a body starting with a version code."""
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        pos = self._pos
        if len(buffer) - pos < 4:
            return self._starved()
        (length,) = _I32.unpack_from(buffer, pos)
        if length < MIN_STARTUP_PACKET_LENGTH:
            self._fail(ProtocolError(f"invalid length {length} of startup packet"))
        if length - 4 > MAX_STARTUP_PACKET_LENGTH:
            if buffer[pos] == _TLS_HANDSHAKE_BYTE:
                self._fail(ProtocolError("direct TLS connections are not supported: use sslmode with an SSLRequest", FEATURE_NOT_SUPPORTED))
            self._fail(ProtocolError(f"startup packet longer than {MAX_STARTUP_PACKET_LENGTH} bytes", PROGRAM_LIMIT_EXCEEDED))
        end = pos + length
        if end > len(buffer):
            return self._starved()
        self._pos = end
        return b"", bytes(buffer[pos + 4 : end])

    def _starved(self) -> _Sentinel:
        if not self._closed:
            return NEED_DATA
        if self._pos == len(self._buffer):
            return END_OF_STREAM
        self._fail(ProtocolError("connection closed in the middle of a message"))

    def _bad_header(self, type_code: int, length: int) -> ProtocolError:
        limit = self._limits[type_code]
        if not limit:
            return ProtocolError(f"invalid {self.direction} message type {_TYPE_BYTES[type_code]!r}")
        if length < MIN_MESSAGE_LENGTH:
            return ProtocolError(f"invalid message length {length}")
        return ProtocolError(
            f"{_TYPE_BYTES[type_code]!r} message of {length} bytes exceeds the limit of {limit}",
            PROGRAM_LIMIT_EXCEEDED,
        )

    def _fail(self, error: ProtocolError) -> NoReturn:
        self._error = error
        raise error


class FrontendDecoder(FrameSplitter):
    """Reads a client's stream: startup-phase packets first, then typed messages.

    ``next_event()`` returns a decoded message; ``next_frame()`` returns the raw frame instead
    (``b""``-typed for startup-phase packets) for a caller that decodes only some types with
    :meth:`decode`. Do not mix the two for one message.

    Phases (:attr:`phase`): ``"startup"`` until a StartupMessage, then ``"typed"``; after an
    SSLRequest or GSSENCRequest the next packet is again a startup packet. After a CancelRequest
    or Terminate the client has nothing more to say (``"finished"``): any further byte is an error.

    A client must wait for the answer to an SSLRequest/GSSENCRequest, so bytes already buffered
    behind one were sent in the clear before encryption: they are refused (they would otherwise
    be read as if they had come through TLS). Feed the decoder what the socket gave as it comes,
    and answer the request before reading more.
    """

    __slots__ = ("_phase", "_password_kind", "_startup")

    def __init__(self, max_message_length: int | None = None) -> None:
        super().__init__("frontend", max_message_length)
        self._phase = "startup"
        self._password_kind = PASSWORD_KIND_PASSWORD
        self._startup: StartupRequest | None = None

    @property
    def phase(self) -> str:
        return self._phase

    @property
    def password_kind(self) -> str:
        return self._password_kind

    def expect_password_kind(self, kind: str) -> None:
        """How to read the next 'p' messages: one of ``codec.PASSWORD_KINDS`` (``"password"``,
        ``"sasl-initial"``, ``"sasl"``, ``"gss"``). Set it whenever an Authentication request
        goes to the client; ``codec.password_kind_for(request)`` gives the kind."""
        if kind not in PASSWORD_KINDS:
            raise ValueError(f"unknown password kind {kind!r}; expected one of {sorted(PASSWORD_KINDS)}")
        self._password_kind = kind

    def next_frame(self) -> Frame | _Sentinel:
        if self._phase == "typed":
            frame = self._typed_frame()
            if frame.__class__ is tuple and frame[0] == b"X":
                self._phase = "finished"
            return frame
        if self._phase == "startup":
            frame = self._untyped_frame()
            if frame.__class__ is tuple:
                self._startup = self._after_startup_packet(frame[1])
            return frame
        return self._finished()

    def next_raw_run(self, types: bytes) -> tuple[bytes, int]:
        """As :meth:`FrameSplitter.next_raw_run`, in the typed phase only. Terminate (``b"X"``)
        ends the client's stream, so it must come through ``next_frame()``."""
        if b"X" in types:
            raise ValueError("Terminate ends the stream: read it with next_frame()")
        if self._phase != "typed":
            return b"", 0
        return FrameSplitter.next_raw_run(self, types)

    def next_event(self) -> FrontendMessage | _Sentinel:
        """The next message, :data:`NEED_DATA` or :data:`END_OF_STREAM`."""
        frame = self.next_frame()
        if frame.__class__ is not tuple:
            return frame
        if frame[0] == b"":
            startup, self._startup = self._startup, None
            return startup
        return self.decode(frame)

    def decode(self, frame: Frame) -> FrontendMessage:
        """Decode a frame this decoder returned, reading 'p' by the current password kind."""
        try:
            return decode_frontend(frame[0], frame[1], self._password_kind)
        except ProtocolError as error:
            self._fail(error)

    def _after_startup_packet(self, packet: bytes) -> StartupRequest:
        try:
            message = decode_startup(packet)
        except ProtocolError as error:
            self._fail(error)
        if isinstance(message, StartupMessage):
            self._phase = "typed"
        elif isinstance(message, CancelRequest):
            self._phase = "finished"
        elif self.buffered:
            self._fail(ProtocolError(f"received unencrypted data after {type(message).__name__}"))
        return message

    def _finished(self) -> _Sentinel:
        if self._error is not None:
            raise self._error
        if self.buffered:
            self._fail(ProtocolError("data received after the client's last message"))
        return END_OF_STREAM if self._closed else NEED_DATA


class BackendDecoder(FrameSplitter):
    """Reads a server's stream: typed messages, plus the one-byte answer to an encryption request.

    Call :meth:`expect_encryption_response` after sending an SSLRequest or GSSENCRequest
    upstream: the next event is then an ``EncryptionResponse`` (or an ErrorResponse from a
    server that refuses the request outright). Bytes buffered behind an accepting answer were
    not encrypted and are refused (a man in the middle could have injected them).
    """

    __slots__ = ("_encryption_pending",)

    def __init__(self, max_message_length: int | None = None) -> None:
        super().__init__("backend", max_message_length)
        self._encryption_pending = False

    def expect_encryption_response(self) -> None:
        self._encryption_pending = True

    def next_frame(self) -> Frame | _Sentinel:
        if self._encryption_pending:
            return self._encryption_frame()
        return self._typed_frame()

    def next_raw_run(self, types: bytes) -> tuple[bytes, int]:
        """As :meth:`FrameSplitter.next_raw_run`; nothing while an encryption answer is due."""
        if self._encryption_pending:
            return b"", 0
        return FrameSplitter.next_raw_run(self, types)

    def next_event(self) -> BackendMessage | _Sentinel:
        """The next message, :data:`NEED_DATA` or :data:`END_OF_STREAM`."""
        frame = self.next_frame()
        if frame.__class__ is not tuple:
            return frame
        return self.decode(frame)

    def decode(self, frame: Frame) -> BackendMessage:
        try:
            return decode_backend(frame[0], frame[1])
        except ProtocolError as error:
            self._fail(error)

    def _encryption_frame(self) -> Frame | _Sentinel:
        if self._error is not None:
            raise self._error
        if not self.buffered:
            return self._starved()
        code = self._buffer[self._pos]
        if code == ord("E"):
            self._encryption_pending = False
            return self._typed_frame()
        if code not in b"SGN":
            self._fail(ProtocolError(f"invalid answer {_TYPE_BYTES[code]!r} to an encryption request"))
        self._pos += 1
        self._encryption_pending = False
        if code != ord("N") and self.buffered:
            self._fail(ProtocolError("received unencrypted data after the server accepted encryption"))
        return b"", _TYPE_BYTES[code]


__all__ = [
    "DEFAULT_MAX_BACKEND_MESSAGE_LENGTH",
    "DEFAULT_MAX_FRONTEND_MESSAGE_LENGTH",
    "END_OF_STREAM",
    "MAX_PASSWORD_MESSAGE_LENGTH",
    "MAX_STARTUP_PACKET_LENGTH",
    "MIN_MESSAGE_LENGTH",
    "MIN_STARTUP_PACKET_LENGTH",
    "NEED_DATA",
    "SMALL_MESSAGE_LIMIT",
    "BackendDecoder",
    "Frame",
    "FrameSplitter",
    "FrontendDecoder",
]
