"""Frame bodies to message values and back: the decoding and encoding half of the codec.

A *frame* is what :mod:`~bastion.protocols.postgres.framing` cuts from the stream: the type
byte and the body (the bytes after the 4-byte length). These functions turn one into a message:

* :func:`decode_frontend` / :func:`decode_backend` take ``(frame_type, body)``. The same type
  byte means different messages in each direction, hence two functions. ``frame_type`` is
  ``b""`` for untyped frames: startup-phase packets from a client (:func:`decode_startup`), and
  the server's one-byte answer to an encryption request.
* :func:`encode` turns any message, of either direction, into its complete wire bytes.
* :func:`encode_frame` rebuilds a frame's wire bytes, to forward a frame without decoding it.

Every decoding failure, including the ones Python raises deep inside (``struct.error``,
``UnicodeDecodeError``, ``IndexError``), leaves as :class:`ProtocolError`. Encoding a value the
protocol cannot carry (a NUL inside a string, a number out of range) raises ``ValueError``:
that is the caller's bug, not the peer's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from bastion.protocols.postgres.errors import (
    CHARACTER_NOT_IN_REPERTOIRE,
    FEATURE_NOT_SUPPORTED,
    PROTOCOL_VIOLATION,
    ProtocolError,
)
from bastion.protocols.postgres.messages import (
    AuthenticationCleartextPassword,
    AuthenticationGSS,
    AuthenticationGSSContinue,
    AuthenticationKerberosV5,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    AuthenticationSSPI,
    BackendKeyData,
    BackendMessage,
    Bind,
    BindComplete,
    CancelRequest,
    Close,
    CloseComplete,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyFail,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    Describe,
    EmptyQueryResponse,
    EncryptionResponse,
    ErrorResponse,
    Execute,
    FieldDescription,
    Flush,
    FrontendMessage,
    FunctionCall,
    FunctionCallResponse,
    GSSENCRequest,
    GSSResponse,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    Parse,
    ParseComplete,
    PasswordMessage,
    PortalSuspended,
    Query,
    ReadyForQuery,
    RowDescription,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    StartupMessage,
    StartupRequest,
    Sync,
    Terminate,
)

# --- protocol constants ---------------------------------------------------------------------------

# Special "protocol versions" of untyped startup packets: 1234 in the major half, so no real
# version can collide with them.
CANCEL_REQUEST_CODE = (1234 << 16) | 5678  # 80877102
SSL_REQUEST_CODE = (1234 << 16) | 5679  # 80877103
GSSENC_REQUEST_CODE = (1234 << 16) | 5680  # 80877104
_SPECIAL_REQUEST_MAJOR = 1234
SUPPORTED_MAJOR_VERSION = 3

# Cancel keys: exactly 4 bytes in protocol 3.0; 3.2 made them variable, and the protocol caps
# them at 256 bytes (with 4 as the minimum) so a client can size its buffer.
MIN_CANCEL_KEY_LENGTH = 4
MAX_CANCEL_KEY_LENGTH = 256

# What the body of a 'p' message is depends on what the server asked for; nothing in the body
# tells. These are the values FrontendDecoder.expect_password_kind takes.
PASSWORD_KIND_PASSWORD = "password"  # PasswordMessage: cleartext or md5 hash
PASSWORD_KIND_SASL_INITIAL = "sasl-initial"  # SASLInitialResponse
PASSWORD_KIND_SASL = "sasl"  # SASLResponse
PASSWORD_KIND_GSS = "gss"  # GSSResponse (GSSAPI and SSPI)
PASSWORD_KINDS = frozenset(
    {PASSWORD_KIND_PASSWORD, PASSWORD_KIND_SASL_INITIAL, PASSWORD_KIND_SASL, PASSWORD_KIND_GSS}
)

FORMAT_TEXT = 0
FORMAT_BINARY = 1

_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_HEADER = struct.Struct(">ci")  # type byte, length including itself
_DATA_ROW_HEAD = struct.Struct(">ciH")  # DataRow: header and column count
_FIELD_TAIL = struct.Struct(">IhIhih")  # RowDescription field after its name
_NULL_LENGTH = _I32.pack(-1)

_U16_MAX = 0xFFFF


def _violation(message: str) -> ProtocolError:
    return ProtocolError(message, PROTOCOL_VIOLATION)


# --- decoding helpers -----------------------------------------------------------------------------


def _cstring(body: bytes, pos: int) -> tuple[str, int]:
    end = body.index(0, pos)
    return body[pos:end].decode(), end + 1


def _only_cstring(body: bytes, what: str) -> str:
    """A body that is exactly one NUL-terminated string (a NUL inside would smuggle a tail)."""
    if body.find(0) != len(body) - 1:
        raise _violation(f"{what} is not one NUL-terminated string")
    return body[:-1].decode()


def _end(body: bytes, pos: int, what: str) -> None:
    if pos != len(body):
        raise _violation(f"{what} has {len(body) - pos} bytes more than its fields")


def _counted(body: bytes, pos: int, fmt: str) -> tuple[tuple[int, ...], int]:
    """A UInt16 count and that many Int16 (``fmt`` "h") or UInt32 (``fmt`` "I") numbers."""
    (count,) = _U16.unpack_from(body, pos)
    pos += 2
    values = struct.unpack_from(f">{count}{fmt}", body, pos)
    return values, pos + count * (2 if fmt == "h" else 4)


def _values(body: bytes, pos: int) -> tuple[tuple[bytes | None, ...], int]:
    """A UInt16 count and that many Int32-length-prefixed values, -1 meaning NULL."""
    (count,) = _U16.unpack_from(body, pos)
    pos += 2
    values: list[bytes | None] = []
    append = values.append
    unpack = _I32.unpack_from
    for _ in range(count):
        (length,) = unpack(body, pos)
        pos += 4
        if length >= 0:
            end = pos + length
            append(body[pos:end])
            pos = end
        elif length == -1:
            append(None)
        else:
            raise _violation(f"value length {length}")
    if pos > len(body):
        raise _violation("value runs past the end of the message")
    return tuple(values), pos


def _empty(message: Any, what: str) -> Callable[[bytes], Any]:
    def decode(body: bytes) -> Any:
        if body:
            raise _violation(f"{what} must have an empty body")
        return message

    return decode


# --- startup phase ----------------------------------------------------------------------------------


def decode_startup(packet: bytes) -> StartupRequest:
    """Decode an untyped startup-phase packet: everything after its 4-byte length word.

    Which message it is follows from the first 4 bytes (the protocol version or request code).
    Protocol 2 and earlier are refused with 0A000, as PostgreSQL 14+ does.
    """
    try:
        return _decode_startup(_as_bytes(packet))
    except ProtocolError:
        raise
    except UnicodeDecodeError as exc:
        raise ProtocolError("startup packet has a string that is not UTF-8", CHARACTER_NOT_IN_REPERTOIRE) from exc
    except (struct.error, ValueError, IndexError) as exc:
        raise _violation("malformed startup packet") from exc


def _decode_startup(body: bytes) -> StartupRequest:
    (code,) = _U32.unpack_from(body, 0)
    if code >> 16 == SUPPORTED_MAJOR_VERSION:
        return _decode_startup_message(code, body)
    if code == SSL_REQUEST_CODE:
        if len(body) != 4:
            raise _violation("SSLRequest has a body")
        return _SSL_REQUEST
    if code == GSSENC_REQUEST_CODE:
        if len(body) != 4:
            raise _violation("GSSENCRequest has a body")
        return _GSSENC_REQUEST
    if code == CANCEL_REQUEST_CODE:
        (process_id,) = _I32.unpack_from(body, 4)
        key = body[8:]
        if not MIN_CANCEL_KEY_LENGTH <= len(key) <= MAX_CANCEL_KEY_LENGTH:
            raise _violation(f"CancelRequest key of {len(key)} bytes")
        return CancelRequest(process_id, key)
    if code >> 16 == _SPECIAL_REQUEST_MAJOR:
        raise _violation(f"unknown startup request code {code}")
    raise ProtocolError(
        f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: only 3.x is supported",
        FEATURE_NOT_SUPPORTED,
    )


def _decode_startup_message(version: int, body: bytes) -> StartupMessage:
    if body[-1:] != b"\x00":
        raise _violation("startup packet does not end with its terminator")
    parameters = []
    seen = set()
    pos = 4
    last = len(body) - 1
    while pos < last:
        name, pos = _cstring(body, pos)
        value, pos = _cstring(body, pos)
        if not name:
            raise _violation("startup packet has bytes after its terminator")
        if name in seen:
            raise _violation(f"startup parameter {name[:64]!r} given twice")
        seen.add(name)
        parameters.append((name, value))
    _end(body, pos + 1, "startup packet")
    return StartupMessage(version, tuple(parameters))


_SSL_REQUEST = SSLRequest()
_GSSENC_REQUEST = GSSENCRequest()


# --- frontend -----------------------------------------------------------------------------------------


def _decode_password(body: bytes) -> PasswordMessage:
    return PasswordMessage(_only_cstring(body, "password message"))


def _decode_sasl_initial(body: bytes) -> SASLInitialResponse:
    mechanism, pos = _cstring(body, 0)
    (length,) = _I32.unpack_from(body, pos)
    pos += 4
    if length == -1:
        _end(body, pos, "SASLInitialResponse")
        return SASLInitialResponse(mechanism, None)
    if length != len(body) - pos:
        raise _violation("SASLInitialResponse length does not match its data")
    return SASLInitialResponse(mechanism, body[pos:])


_PASSWORD_DECODERS: dict[str, Callable[[bytes], FrontendMessage]] = {
    PASSWORD_KIND_PASSWORD: _decode_password,
    PASSWORD_KIND_SASL_INITIAL: _decode_sasl_initial,
    PASSWORD_KIND_SASL: SASLResponse,
    PASSWORD_KIND_GSS: GSSResponse,
}


def _decode_query(body: bytes) -> Query:
    return Query(_only_cstring(body, "Query"))


def _decode_parse(body: bytes) -> Parse:
    name, pos = _cstring(body, 0)
    query, pos = _cstring(body, pos)
    oids, pos = _counted(body, pos, "I")
    _end(body, pos, "Parse")
    return Parse(name, query, oids)


def _decode_bind(body: bytes) -> Bind:
    portal, pos = _cstring(body, 0)
    statement, pos = _cstring(body, pos)
    param_formats, pos = _counted(body, pos, "h")
    params, pos = _values(body, pos)
    result_formats, pos = _counted(body, pos, "h")
    _end(body, pos, "Bind")
    return Bind(portal, statement, param_formats, params, result_formats)


def _target(body: bytes, what: str) -> tuple[str, str]:
    kind = body[:1]
    if kind != b"S" and kind != b"P":
        raise _violation(f"{what} of kind {kind!r}: expected S or P")
    return kind.decode(), _only_cstring(body[1:], what)


def _decode_describe(body: bytes) -> Describe:
    return Describe(*_target(body, "Describe"))


def _decode_close(body: bytes) -> Close:
    return Close(*_target(body, "Close"))


def _decode_execute(body: bytes) -> Execute:
    portal, pos = _cstring(body, 0)
    (max_rows,) = _I32.unpack_from(body, pos)
    _end(body, pos + 4, "Execute")
    return Execute(portal, max_rows)


def _decode_function_call(body: bytes) -> FunctionCall:
    (oid,) = _U32.unpack_from(body, 0)
    arg_formats, pos = _counted(body, 4, "h")
    args, pos = _values(body, pos)
    (result_format,) = _I16.unpack_from(body, pos)
    _end(body, pos + 2, "FunctionCall")
    return FunctionCall(oid, arg_formats, args, result_format)


def _decode_copy_fail(body: bytes) -> CopyFail:
    return CopyFail(_only_cstring(body, "CopyFail"))


_FRONTEND_DECODERS: dict[bytes, Callable[[bytes], FrontendMessage]] = {
    b"Q": _decode_query,
    b"P": _decode_parse,
    b"B": _decode_bind,
    b"D": _decode_describe,
    b"E": _decode_execute,
    b"C": _decode_close,
    b"S": _empty(Sync(), "Sync"),
    b"H": _empty(Flush(), "Flush"),
    b"F": _decode_function_call,
    b"d": CopyData,
    b"c": _empty(CopyDone(), "CopyDone"),
    b"f": _decode_copy_fail,
    b"X": _empty(Terminate(), "Terminate"),
}
FRONTEND_TYPES = frozenset(_FRONTEND_DECODERS) | {b"p"}


def decode_frontend(frame_type: bytes, body: bytes, password_kind: str = PASSWORD_KIND_PASSWORD) -> FrontendMessage:
    """Decode a frame a client sent. ``frame_type`` ``b""`` is a startup-phase packet.

    ``password_kind`` says how to read a ``'p'`` frame (one of :data:`PASSWORD_KINDS`): it is
    whatever the server's last Authentication request asked for.
    """
    decoder = _FRONTEND_DECODERS.get(frame_type)
    if decoder is None:
        if frame_type == b"p":
            decoder = _PASSWORD_DECODERS.get(password_kind)
            if decoder is None:
                raise ValueError(f"unknown password kind {password_kind!r}")
        elif frame_type == b"":
            return decode_startup(body)
        else:
            raise _violation(f"invalid frontend message type {frame_type!r}")
    if body.__class__ is not bytes:
        body = _as_bytes(body)
    try:
        return decoder(body)
    except ProtocolError:
        raise
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{frame_type!r} message has a string that is not UTF-8", CHARACTER_NOT_IN_REPERTOIRE) from exc
    except (struct.error, ValueError, IndexError) as exc:
        raise _violation(f"malformed {frame_type!r} message") from exc


# --- backend ------------------------------------------------------------------------------------------


def _decode_sasl_mechanisms(body: bytes) -> AuthenticationSASL:
    mechanisms = []
    pos = 4
    while True:
        name, pos = _cstring(body, pos)
        if not name:
            break
        mechanisms.append(name)
    _end(body, pos, "AuthenticationSASL")
    return AuthenticationSASL(tuple(mechanisms))


def _fixed_auth(message: Any) -> Callable[[bytes], Any]:
    def decode(body: bytes) -> Any:
        _end(body, 4, type(message).__name__)
        return message

    return decode


def _decode_md5(body: bytes) -> AuthenticationMD5Password:
    if len(body) != 8:
        raise _violation("AuthenticationMD5Password salt is not 4 bytes")
    return AuthenticationMD5Password(body[4:])


_AUTHENTICATION_DECODERS: dict[int, Callable[[bytes], BackendMessage]] = {
    AuthenticationOk.CODE: _fixed_auth(AuthenticationOk()),
    AuthenticationKerberosV5.CODE: _fixed_auth(AuthenticationKerberosV5()),
    AuthenticationCleartextPassword.CODE: _fixed_auth(AuthenticationCleartextPassword()),
    AuthenticationMD5Password.CODE: _decode_md5,
    AuthenticationGSS.CODE: _fixed_auth(AuthenticationGSS()),
    AuthenticationGSSContinue.CODE: lambda body: AuthenticationGSSContinue(body[4:]),
    AuthenticationSSPI.CODE: _fixed_auth(AuthenticationSSPI()),
    AuthenticationSASL.CODE: _decode_sasl_mechanisms,
    AuthenticationSASLContinue.CODE: lambda body: AuthenticationSASLContinue(body[4:]),
    AuthenticationSASLFinal.CODE: lambda body: AuthenticationSASLFinal(body[4:]),
}


def _decode_authentication(body: bytes) -> BackendMessage:
    (code,) = _I32.unpack_from(body, 0)
    decoder = _AUTHENTICATION_DECODERS.get(code)
    if decoder is None:
        raise _violation(f"unsupported authentication request {code}")
    return decoder(body)


def _decode_parameter_status(body: bytes) -> ParameterStatus:
    name, pos = _cstring(body, 0)
    value, pos = _cstring(body, pos)
    _end(body, pos, "ParameterStatus")
    return ParameterStatus(name, value)


def _decode_backend_key_data(body: bytes) -> BackendKeyData:
    (process_id,) = _I32.unpack_from(body, 0)
    key = body[4:]
    if not MIN_CANCEL_KEY_LENGTH <= len(key) <= MAX_CANCEL_KEY_LENGTH:
        raise _violation(f"BackendKeyData key of {len(key)} bytes")
    return BackendKeyData(process_id, key)


def _decode_negotiate(body: bytes) -> NegotiateProtocolVersion:
    minor, count = struct.unpack_from(">ii", body, 0)
    if count < 0:
        raise _violation("NegotiateProtocolVersion with a negative option count")
    pos = 8
    options = []
    for _ in range(count):
        option, pos = _cstring(body, pos)
        options.append(option)
    _end(body, pos, "NegotiateProtocolVersion")
    return NegotiateProtocolVersion(minor, tuple(options))


def _copy_response(cls: type) -> Callable[[bytes], Any]:
    def decode(body: bytes) -> Any:
        (overall,) = _I8.unpack_from(body, 0)
        formats, pos = _counted(body, 1, "h")
        _end(body, pos, cls.__name__)
        return cls(overall, formats)

    return decode


def _decode_row_description(body: bytes) -> RowDescription:
    (count,) = _U16.unpack_from(body, 0)
    pos = 2
    fields = []
    append = fields.append
    unpack_tail = _FIELD_TAIL.unpack_from
    for _ in range(count):
        end = body.index(0, pos)
        name = body[pos:end].decode()
        append(FieldDescription(name, *unpack_tail(body, end + 1)))
        pos = end + 19
    _end(body, pos, "RowDescription")
    return RowDescription(tuple(fields))


def _decode_data_row(body: bytes) -> DataRow:
    values, pos = _values(body, 0)
    if pos != len(body):
        raise _violation("DataRow has bytes past its last value")
    return DataRow(values)


def _decode_command_complete(body: bytes) -> CommandComplete:
    return CommandComplete(_only_cstring(body, "CommandComplete"))


def _decode_parameter_description(body: bytes) -> ParameterDescription:
    oids, pos = _counted(body, 0, "I")
    _end(body, pos, "ParameterDescription")
    return ParameterDescription(oids)


def _decode_function_call_response(body: bytes) -> FunctionCallResponse:
    (length,) = _I32.unpack_from(body, 0)
    if length == -1:
        _end(body, 4, "FunctionCallResponse")
        return FunctionCallResponse(None)
    if length != len(body) - 4:
        raise _violation("FunctionCallResponse length does not match its value")
    return FunctionCallResponse(body[4:])


def _decode_notification(body: bytes) -> NotificationResponse:
    (process_id,) = _I32.unpack_from(body, 0)
    channel, pos = _cstring(body, 4)
    payload, pos = _cstring(body, pos)
    _end(body, pos, "NotificationResponse")
    return NotificationResponse(process_id, channel, payload)


def _fields(cls: type) -> Callable[[bytes], Any]:
    # not UTF-8 is replaced, not refused: see messages._FieldsMessage
    def decode(body: bytes) -> Any:
        fields = []
        pos = 0
        while (code := body[pos]) != 0:
            end = body.index(0, pos + 1)
            fields.append((chr(code), body[pos + 1 : end].decode("utf-8", "replace")))
            pos = end + 1
        _end(body, pos + 1, cls.__name__)
        return cls(tuple(fields))

    return decode


_READY_FOR_QUERY = {status.encode(): ReadyForQuery(status) for status in ("I", "T", "E")}  # type: ignore[arg-type]


def _decode_ready_for_query(body: bytes) -> ReadyForQuery:
    ready = _READY_FOR_QUERY.get(body)
    if ready is None:
        raise _violation(f"ReadyForQuery status {body[:1]!r}")
    return ready


_ENCRYPTION_RESPONSES = {code.encode(): EncryptionResponse(code) for code in ("S", "G", "N")}  # type: ignore[arg-type]


def _decode_encryption_response(body: bytes) -> EncryptionResponse:
    response = _ENCRYPTION_RESPONSES.get(body)
    if response is None:
        raise _violation(f"answer {body[:1]!r} to an encryption request")
    return response


_BACKEND_DECODERS: dict[bytes, Callable[[bytes], BackendMessage]] = {
    b"": _decode_encryption_response,
    b"R": _decode_authentication,
    b"S": _decode_parameter_status,
    b"K": _decode_backend_key_data,
    b"v": _decode_negotiate,
    b"G": _copy_response(CopyInResponse),
    b"H": _copy_response(CopyOutResponse),
    b"W": _copy_response(CopyBothResponse),
    b"d": CopyData,
    b"c": _empty(CopyDone(), "CopyDone"),
    b"T": _decode_row_description,
    b"D": _decode_data_row,
    b"C": _decode_command_complete,
    b"I": _empty(EmptyQueryResponse(), "EmptyQueryResponse"),
    b"s": _empty(PortalSuspended(), "PortalSuspended"),
    b"n": _empty(NoData(), "NoData"),
    b"1": _empty(ParseComplete(), "ParseComplete"),
    b"2": _empty(BindComplete(), "BindComplete"),
    b"3": _empty(CloseComplete(), "CloseComplete"),
    b"t": _decode_parameter_description,
    b"V": _decode_function_call_response,
    b"A": _decode_notification,
    b"E": _fields(ErrorResponse),
    b"N": _fields(NoticeResponse),
    b"Z": _decode_ready_for_query,
}
BACKEND_TYPES = frozenset(_BACKEND_DECODERS) - {b""}


def decode_backend(frame_type: bytes, body: bytes) -> BackendMessage:
    """Decode a frame a server sent. ``frame_type`` ``b""`` is the one-byte answer to an
    SSLRequest or GSSENCRequest (``body`` is that byte)."""
    decoder = _BACKEND_DECODERS.get(frame_type)
    if decoder is None:
        raise _violation(f"invalid backend message type {frame_type!r}")
    if body.__class__ is not bytes:
        body = _as_bytes(body)
    try:
        return decoder(body)
    except ProtocolError:
        raise
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{frame_type!r} message has a string that is not UTF-8", CHARACTER_NOT_IN_REPERTOIRE) from exc
    except (struct.error, ValueError, IndexError) as exc:
        raise _violation(f"malformed {frame_type!r} message") from exc


def _as_bytes(body: Any) -> bytes:
    # values sliced from a bytearray or memoryview would be mutable, unhashable views
    return body if type(body) is bytes else bytes(body)


# --- encoding -------------------------------------------------------------------------------------------


def _cstr(text: str) -> bytes:
    if "\x00" in text:
        raise ValueError(f"a NUL character cannot be sent in a protocol string: {text[:64]!r}")
    return text.encode() + b"\x00"


def encode_frame(frame_type: bytes, body: bytes) -> bytes:
    """The wire bytes of a typed frame (``frame_type`` is one byte) or, with ``frame_type`` ``b""``,
    of an untyped startup packet (``body`` starts with the version or request code)."""
    if frame_type:
        return _HEADER.pack(frame_type, len(body) + 4) + body
    return _I32.pack(len(body) + 4) + body


def _frame(frame_type: bytes, body: bytes) -> bytes:
    return _HEADER.pack(frame_type, len(body) + 4) + body


def _fixed(frame_type: bytes, body: bytes = b"") -> Callable[[Any], bytes]:
    wire = _frame(frame_type, body)
    return lambda message: wire


def _int_array(fmt: str, values: tuple[int, ...]) -> bytes:
    if len(values) > _U16_MAX:
        raise ValueError(f"{len(values)} entries do not fit a 16-bit count")
    return struct.pack(f">H{len(values)}{fmt}", len(values), *values)


def _encode_values(values: tuple[bytes | None, ...]) -> list[bytes]:
    if len(values) > _U16_MAX:
        raise ValueError(f"{len(values)} values do not fit a 16-bit count")
    parts = [_U16.pack(len(values))]
    append = parts.append
    pack = _I32.pack
    for value in values:
        if value is None:
            append(_NULL_LENGTH)
        else:
            append(pack(len(value)))
            append(value)
    return parts


def _encode_startup_message(message: StartupMessage) -> bytes:
    parts = [_U32.pack(message.protocol_version)]
    for name, value in message.parameters:
        if not name:
            raise ValueError("a startup parameter needs a name")
        parts.append(_cstr(name))
        parts.append(_cstr(value))
    parts.append(b"\x00")
    return encode_frame(b"", b"".join(parts))


def _encode_cancel_request(message: CancelRequest) -> bytes:
    _check_key(message.secret_key)
    return encode_frame(b"", struct.pack(">Ii", CANCEL_REQUEST_CODE, message.process_id) + message.secret_key)


def _check_key(key: bytes) -> None:
    if not MIN_CANCEL_KEY_LENGTH <= len(key) <= MAX_CANCEL_KEY_LENGTH:
        raise ValueError(f"a cancel key has {MIN_CANCEL_KEY_LENGTH} to {MAX_CANCEL_KEY_LENGTH} bytes, not {len(key)}")


def _encode_encryption_response(message: EncryptionResponse) -> bytes:
    if message.code not in ("S", "G", "N"):
        raise ValueError(f"encryption response {message.code!r}")
    return message.code.encode()


def _encode_sasl_initial(message: SASLInitialResponse) -> bytes:
    head = _cstr(message.mechanism)
    if message.data is None:
        return _frame(b"p", head + _NULL_LENGTH)
    return _frame(b"p", head + _I32.pack(len(message.data)) + message.data)


def _encode_parse(message: Parse) -> bytes:
    body = _cstr(message.name) + _cstr(message.query) + _int_array("I", message.param_type_oids)
    return _frame(b"P", body)


def _encode_bind(message: Bind) -> bytes:
    parts = [_cstr(message.portal), _cstr(message.statement), _int_array("h", message.param_formats)]
    parts += _encode_values(message.params)
    parts.append(_int_array("h", message.result_formats))
    return _frame(b"B", b"".join(parts))


def _encode_target(frame_type: bytes, message: Describe | Close) -> bytes:
    if message.kind not in ("S", "P"):
        raise ValueError(f"{type(message).__name__} kind must be S or P, not {message.kind!r}")
    return _frame(frame_type, message.kind.encode() + _cstr(message.name))


def _encode_function_call(message: FunctionCall) -> bytes:
    parts = [_U32.pack(message.function_oid), _int_array("h", message.arg_formats)]
    parts += _encode_values(message.args)
    parts.append(_I16.pack(message.result_format))
    return _frame(b"F", b"".join(parts))


def _encode_sasl(message: AuthenticationSASL) -> bytes:
    names = []
    for name in message.mechanisms:
        if not name:
            raise ValueError("a SASL mechanism needs a name")
        names.append(_cstr(name))
    return _frame(b"R", _I32.pack(AuthenticationSASL.CODE) + b"".join(names) + b"\x00")


def _encode_auth_data(message: AuthenticationGSSContinue | AuthenticationSASLContinue | AuthenticationSASLFinal) -> bytes:
    return _frame(b"R", _I32.pack(message.CODE) + message.data)


def _encode_md5(message: AuthenticationMD5Password) -> bytes:
    if len(message.salt) != 4:
        raise ValueError("an MD5 salt has 4 bytes")
    return _frame(b"R", _I32.pack(AuthenticationMD5Password.CODE) + message.salt)


def _encode_backend_key_data(message: BackendKeyData) -> bytes:
    _check_key(message.secret_key)
    return _frame(b"K", _I32.pack(message.process_id) + message.secret_key)


def _encode_negotiate(message: NegotiateProtocolVersion) -> bytes:
    body = struct.pack(">ii", message.newest_minor_version, len(message.unrecognized_options))
    return _frame(b"v", body + b"".join(_cstr(option) for option in message.unrecognized_options))


def _encode_copy_response(message: CopyInResponse | CopyOutResponse | CopyBothResponse) -> bytes:
    return _frame(message.TYPE, _I8.pack(message.overall_format) + _int_array("h", message.column_formats))


def _encode_row_description(message: RowDescription) -> bytes:
    if len(message.fields) > _U16_MAX:
        raise ValueError(f"{len(message.fields)} fields do not fit a 16-bit count")
    parts = [_U16.pack(len(message.fields))]
    pack_tail = _FIELD_TAIL.pack
    for field in message.fields:
        parts.append(_cstr(field.name))
        parts.append(
            pack_tail(
                field.table_oid,
                field.column_attnum,
                field.type_oid,
                field.type_size,
                field.type_modifier,
                field.format,
            )
        )
    return _frame(b"T", b"".join(parts))


def _encode_data_row(message: DataRow) -> bytes:
    return encode_data_row_values(message.values)


def encode_data_row_values(values: list[bytes | None] | tuple[bytes | None, ...]) -> bytes:
    """The complete wire bytes of a DataRow carrying ``values`` (what ``encode(DataRow(values))``
    gives, without the message object: see :func:`data_row_values`)."""
    if len(values) > _U16_MAX:
        raise ValueError(f"{len(values)} values do not fit a 16-bit count")
    parts = [b""]
    append = parts.append
    pack = _I32.pack
    size = 6  # the length word and the column count
    for value in values:
        if value is None:
            append(_NULL_LENGTH)
            size += 4
        else:
            length = len(value)
            append(pack(length))
            append(value)
            size += 4 + length
    parts[0] = _DATA_ROW_HEAD.pack(b"D", size, len(values))
    return b"".join(parts)


def _encode_function_call_response(message: FunctionCallResponse) -> bytes:
    if message.value is None:
        return _frame(b"V", _NULL_LENGTH)
    return _frame(b"V", _I32.pack(len(message.value)) + message.value)


def _encode_fields(message: ErrorResponse | NoticeResponse) -> bytes:
    parts = []
    for code, value in message.fields:
        if len(code) != 1 or code == "\x00":
            raise ValueError(f"a field code is one non-NUL character, not {code!r}")
        parts.append(code.encode("latin-1"))
        parts.append(_cstr(value))
    parts.append(b"\x00")
    return _frame(message.TYPE, b"".join(parts))


_READY_FOR_QUERY_WIRE = {status: _frame(b"Z", status.encode()) for status in ("I", "T", "E")}


def _encode_ready_for_query(message: ReadyForQuery) -> bytes:
    wire = _READY_FOR_QUERY_WIRE.get(message.status)
    if wire is None:
        raise ValueError(f"ReadyForQuery status {message.status!r}")
    return wire


_SSL_REQUEST_WIRE = encode_frame(b"", _U32.pack(SSL_REQUEST_CODE))
_GSSENC_REQUEST_WIRE = encode_frame(b"", _U32.pack(GSSENC_REQUEST_CODE))

_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    # startup phase
    StartupMessage: _encode_startup_message,
    SSLRequest: lambda message: _SSL_REQUEST_WIRE,
    GSSENCRequest: lambda message: _GSSENC_REQUEST_WIRE,
    CancelRequest: _encode_cancel_request,
    EncryptionResponse: _encode_encryption_response,
    # authentication
    AuthenticationOk: _fixed(b"R", _I32.pack(AuthenticationOk.CODE)),
    AuthenticationKerberosV5: _fixed(b"R", _I32.pack(AuthenticationKerberosV5.CODE)),
    AuthenticationCleartextPassword: _fixed(b"R", _I32.pack(AuthenticationCleartextPassword.CODE)),
    AuthenticationMD5Password: _encode_md5,
    AuthenticationGSS: _fixed(b"R", _I32.pack(AuthenticationGSS.CODE)),
    AuthenticationGSSContinue: _encode_auth_data,
    AuthenticationSSPI: _fixed(b"R", _I32.pack(AuthenticationSSPI.CODE)),
    AuthenticationSASL: _encode_sasl,
    AuthenticationSASLContinue: _encode_auth_data,
    AuthenticationSASLFinal: _encode_auth_data,
    PasswordMessage: lambda message: _frame(b"p", _cstr(message.password)),
    SASLInitialResponse: _encode_sasl_initial,
    SASLResponse: lambda message: _frame(b"p", message.data),
    GSSResponse: lambda message: _frame(b"p", message.data),
    # session
    ParameterStatus: lambda message: _frame(b"S", _cstr(message.name) + _cstr(message.value)),
    BackendKeyData: _encode_backend_key_data,
    NegotiateProtocolVersion: _encode_negotiate,
    # queries
    Query: lambda message: _frame(b"Q", _cstr(message.query)),
    Parse: _encode_parse,
    Bind: _encode_bind,
    Describe: lambda message: _encode_target(b"D", message),
    Execute: lambda message: _frame(b"E", _cstr(message.portal) + _I32.pack(message.max_rows)),
    Close: lambda message: _encode_target(b"C", message),
    Sync: _fixed(b"S"),
    Flush: _fixed(b"H"),
    FunctionCall: _encode_function_call,
    Terminate: _fixed(b"X"),
    # copy
    CopyInResponse: _encode_copy_response,
    CopyOutResponse: _encode_copy_response,
    CopyBothResponse: _encode_copy_response,
    CopyData: lambda message: _frame(b"d", message.data),
    CopyDone: _fixed(b"c"),
    CopyFail: lambda message: _frame(b"f", _cstr(message.message)),
    # results
    RowDescription: _encode_row_description,
    DataRow: _encode_data_row,
    CommandComplete: lambda message: _frame(b"C", _cstr(message.tag)),
    EmptyQueryResponse: _fixed(b"I"),
    PortalSuspended: _fixed(b"s"),
    NoData: _fixed(b"n"),
    ParseComplete: _fixed(b"1"),
    BindComplete: _fixed(b"2"),
    CloseComplete: _fixed(b"3"),
    ParameterDescription: lambda message: _frame(b"t", _int_array("I", message.type_oids)),
    FunctionCallResponse: _encode_function_call_response,
    NotificationResponse: lambda message: _frame(
        b"A", _I32.pack(message.process_id) + _cstr(message.channel) + _cstr(message.payload)
    ),
    ErrorResponse: _encode_fields,
    NoticeResponse: _encode_fields,
    ReadyForQuery: _encode_ready_for_query,
}


def encode(message: FrontendMessage | BackendMessage) -> bytes:
    """The complete wire bytes of ``message`` (header included), whichever side sends it.

    Raises ``ValueError`` for values the protocol cannot carry and ``TypeError`` for objects that
    are not messages of this module.
    """
    encoder = _ENCODERS.get(type(message))
    if encoder is None:
        raise TypeError(f"not a PostgreSQL protocol message: {type(message).__name__}")
    try:
        return encoder(message)
    except struct.error as exc:
        raise ValueError(f"{type(message).__name__} has a number out of range: {exc}") from exc


# --- helpers for the layers above -----------------------------------------------------------------------


def resolve_formats(codes: tuple[int, ...], count: int) -> tuple[int, ...]:
    """One format code per value, from Bind's or FunctionCall's compact list.

    No codes means every value is text, one code applies to all, otherwise there must be one per
    value; codes other than text (0) and binary (1) are refused.
    """
    if not codes:
        return (FORMAT_TEXT,) * count
    if len(codes) == 1:
        resolved = codes * count
    elif len(codes) == count:
        resolved = tuple(codes)
    else:
        raise _violation(f"{len(codes)} format codes for {count} values")
    for code in codes:
        if code != FORMAT_TEXT and code != FORMAT_BINARY:
            raise _violation(f"unsupported format code {code}")
    return resolved


def data_row_values(body: bytes) -> list[bytes | None]:
    """A DataRow body's values as a list the caller may rewrite in place.

    The same checks as ``decode_backend(b"D", body).values``, without building the message: a
    filter that rewrites rows does this once per row, so the object is pure cost there.
    """
    try:
        values, pos = _values(body, 0)
    except struct.error as exc:
        raise _violation("malformed DataRow") from exc
    if pos != len(body):
        raise _violation("DataRow has bytes past its last value")
    return list(values)


def password_kind_for(request: BackendMessage) -> str | None:
    """The password kind of the client's answer to an Authentication request, or None when
    the request expects no answer (AuthenticationOk, SASLFinal) or is not one."""
    return _PASSWORD_KIND_FOR.get(type(request))


_PASSWORD_KIND_FOR: dict[type, str] = {
    AuthenticationCleartextPassword: PASSWORD_KIND_PASSWORD,
    AuthenticationMD5Password: PASSWORD_KIND_PASSWORD,
    AuthenticationSASL: PASSWORD_KIND_SASL_INITIAL,
    AuthenticationSASLContinue: PASSWORD_KIND_SASL,
    AuthenticationGSS: PASSWORD_KIND_GSS,
    AuthenticationGSSContinue: PASSWORD_KIND_GSS,
    AuthenticationSSPI: PASSWORD_KIND_GSS,
}
