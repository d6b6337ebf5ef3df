"""Every message of the PostgreSQL frontend/backend protocol v3 (3.0 and 3.2) as a frozen value.

Each class carries ``TYPE``, its type byte on the wire (``b""`` for the untyped startup-phase
packets and the one-byte answer to an encryption request). Frontend and backend reuse type bytes
for different messages (``b"D"`` is Describe from a client and DataRow from a server), so a byte
alone never names a message: the direction does too, see :mod:`bastion.protocols.postgres.codec`.

Conventions:

* Strings the protocol NUL-terminates are ``str`` (UTF-8 on the wire); they cannot contain
  ``"\\x00"``. Bytes the protocol carries as counted bytes are ``bytes``; ``None`` stands for the
  protocol's NULL (length -1).
* Sequences are tuples, so messages are hashable and compare equal to their decoded copies.
* OIDs are unsigned 32-bit; format codes, attribute numbers and type sizes are signed 16-bit;
  process ids, row limits and type modifiers are signed 32-bit. The encoder refuses values out of
  range (``ValueError``) rather than writing a frame the peer would misread.
* Nothing here validates on construction: the decoder only builds values it has checked, and
  construction sits on the hot path of every result row.
"""

from __future__ import annotations

import enum
import re
from typing import ClassVar, Literal, Self

import attrs

# --- startup phase (frontend, untyped) -------------------------------------------------------

PROTOCOL_VERSION_3_0 = 3 << 16
PROTOCOL_VERSION_3_2 = (3 << 16) | 2


@attrs.frozen
class StartupMessage:
    """The first message of a session: protocol version and ordered ``(name, value)`` parameters.

    ``protocol_version`` is major << 16 | minor (196608 for 3.0, 196610 for 3.2). The decoder
    refuses a parameter named twice: PostgreSQL keeps the last value, so a gateway reading the
    first one could be told one database and connect to another.
    """

    TYPE: ClassVar[bytes] = b""

    protocol_version: int = PROTOCOL_VERSION_3_0
    parameters: tuple[tuple[str, str], ...] = ()

    @property
    def major(self) -> int:
        return self.protocol_version >> 16

    @property
    def minor(self) -> int:
        return self.protocol_version & 0xFFFF

    def get(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.parameters:
            if key == name:
                return value
        return default

    @property
    def user(self) -> str | None:
        return self.get("user")

    @property
    def database(self) -> str | None:
        """The database asked for; PostgreSQL defaults it to the user name when absent."""
        return self.get("database")


@attrs.frozen
class SSLRequest:
    """Ask the server to switch to TLS; it answers with one byte (see :class:`EncryptionResponse`)."""

    TYPE: ClassVar[bytes] = b""


@attrs.frozen
class GSSENCRequest:
    """Ask the server to switch to GSSAPI encryption; answered like :class:`SSLRequest`."""

    TYPE: ClassVar[bytes] = b""


@attrs.frozen
class CancelRequest:
    """Sent on a new connection to cancel the query running in another session.

    ``secret_key`` is 4 bytes in protocol 3.0 and 4 to 256 bytes in 3.2 (whatever the server
    sent in :class:`BackendKeyData`).
    """

    TYPE: ClassVar[bytes] = b""

    process_id: int
    secret_key: bytes


@attrs.frozen
class EncryptionResponse:
    """The server's one-byte, untyped answer to SSLRequest / GSSENCRequest.

    ``code`` is ``"S"`` (TLS accepted), ``"G"`` (GSSAPI encryption accepted) or ``"N"`` (refused:
    continue in plain text or give up).
    """

    TYPE: ClassVar[bytes] = b""

    code: Literal["S", "G", "N"]

    @property
    def accepted(self) -> bool:
        return self.code != "N"


# --- authentication (backend 'R') --------------------------------------------------------------


@attrs.frozen
class AuthenticationOk:
    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 0


@attrs.frozen
class AuthenticationKerberosV5:
    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 2


@attrs.frozen
class AuthenticationCleartextPassword:
    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 3


@attrs.frozen
class AuthenticationMD5Password:
    """``salt`` is the 4 random bytes the client hashes its MD5 password with."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 5

    salt: bytes


@attrs.frozen
class AuthenticationGSS:
    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 7


@attrs.frozen
class AuthenticationGSSContinue:
    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 8

    data: bytes


@attrs.frozen
class AuthenticationSSPI:
    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 9


@attrs.frozen
class AuthenticationSASL:
    """The SASL mechanisms the server offers, in its order of preference
    (``SCRAM-SHA-256``, and ``SCRAM-SHA-256-PLUS`` over TLS with channel binding)."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 10

    mechanisms: tuple[str, ...]


@attrs.frozen
class AuthenticationSASLContinue:
    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 11

    data: bytes


@attrs.frozen
class AuthenticationSASLFinal:
    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 12

    data: bytes


# --- authentication answers (frontend 'p') -----------------------------------------------------
# All four share the type byte 'p' and nothing in the body says which one it is: the decoder
# must be told what the server asked for (FrontendDecoder.expect_password_kind).


@attrs.frozen
class PasswordMessage:
    """A cleartext password, or ``"md5" + hex digest`` when the server asked for MD5."""

    TYPE: ClassVar[bytes] = b"p"

    password: str = attrs.field(repr=False)


@attrs.frozen
class SASLInitialResponse:
    """The chosen mechanism and the client-first-message (``None``: the mechanism has none)."""

    TYPE: ClassVar[bytes] = b"p"

    mechanism: str
    data: bytes | None = attrs.field(default=None, repr=False)


@attrs.frozen
class SASLResponse:
    TYPE: ClassVar[bytes] = b"p"

    data: bytes = attrs.field(repr=False)


@attrs.frozen
class GSSResponse:
    TYPE: ClassVar[bytes] = b"p"

    data: bytes = attrs.field(repr=False)


# --- session parameters and keys (backend) ------------------------------------------------------


@attrs.frozen
class ParameterStatus:
    TYPE: ClassVar[bytes] = b"S"

    name: str
    value: str


@attrs.frozen
class BackendKeyData:
    """What a client needs to cancel this session's queries: 4 bytes of key in protocol 3.0,
    4 to 256 in 3.2."""

    TYPE: ClassVar[bytes] = b"K"

    process_id: int
    secret_key: bytes = attrs.field(repr=False)


@attrs.frozen
class NegotiateProtocolVersion:
    """The server speaks an older minor version than asked, or ignores some ``_pq_.`` options."""

    TYPE: ClassVar[bytes] = b"v"

    newest_minor_version: int
    unrecognized_options: tuple[str, ...] = ()


# --- simple and extended query (frontend) -------------------------------------------------------


@attrs.frozen
class Query:
    """Simple query: one string that may hold several statements separated by semicolons."""

    TYPE: ClassVar[bytes] = b"Q"

    query: str


@attrs.frozen
class Parse:
    """Prepare ``query`` as statement ``name`` (``""``: the unnamed statement).

    ``param_type_oids`` may be shorter than the number of parameters, and 0 leaves a type to
    the server.
    """

    TYPE: ClassVar[bytes] = b"P"

    name: str
    query: str
    param_type_oids: tuple[int, ...] = ()


@attrs.frozen
class Bind:
    """Bind parameter values to a prepared statement, making portal ``portal``.

    ``param_formats`` and ``result_formats`` hold 0 (text) / 1 (binary) codes: none means all
    text, one applies to every value, otherwise one per value (see ``codec.resolve_formats``).
    """

    TYPE: ClassVar[bytes] = b"B"

    portal: str = ""
    statement: str = ""
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = attrs.field(default=(), repr=False)
    result_formats: tuple[int, ...] = ()


@attrs.frozen
class Describe:
    """Describe a prepared statement (``kind="S"``) or a portal (``kind="P"``)."""

    TYPE: ClassVar[bytes] = b"D"

    kind: Literal["S", "P"]
    name: str = ""


@attrs.frozen
class Execute:
    """Run a portal; ``max_rows`` 0 means no limit, otherwise PortalSuspended after that many."""

    TYPE: ClassVar[bytes] = b"E"

    portal: str = ""
    max_rows: int = 0


@attrs.frozen
class Close:
    """Close a prepared statement (``kind="S"``) or a portal (``kind="P"``)."""

    TYPE: ClassVar[bytes] = b"C"

    kind: Literal["S", "P"]
    name: str = ""


@attrs.frozen
class Sync:
    TYPE: ClassVar[bytes] = b"S"


@attrs.frozen
class Flush:
    TYPE: ClassVar[bytes] = b"H"


@attrs.frozen
class FunctionCall:
    """The fast-path interface: call a function by OID with arguments like Bind's parameters."""

    TYPE: ClassVar[bytes] = b"F"

    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = attrs.field(default=(), repr=False)
    result_format: int = 0


@attrs.frozen
class Terminate:
    TYPE: ClassVar[bytes] = b"X"


# --- COPY -----------------------------------------------------------------------------------------


@attrs.frozen
class CopyInResponse:
    """``overall_format`` 0 (text) or 1 (binary); one format code per column."""

    TYPE: ClassVar[bytes] = b"G"

    overall_format: int = 0
    column_formats: tuple[int, ...] = ()


@attrs.frozen
class CopyOutResponse:
    TYPE: ClassVar[bytes] = b"H"

    overall_format: int = 0
    column_formats: tuple[int, ...] = ()


@attrs.frozen
class CopyBothResponse:
    """Starts streaming replication's bidirectional COPY."""

    TYPE: ClassVar[bytes] = b"W"

    overall_format: int = 0
    column_formats: tuple[int, ...] = ()


@attrs.frozen
class CopyData:
    """A chunk of a COPY stream (both directions); chunks need not align with rows."""

    TYPE: ClassVar[bytes] = b"d"

    data: bytes = attrs.field(repr=False)


@attrs.frozen
class CopyDone:
    TYPE: ClassVar[bytes] = b"c"


@attrs.frozen
class CopyFail:
    TYPE: ClassVar[bytes] = b"f"

    message: str


# --- results (backend) ----------------------------------------------------------------------------


@attrs.frozen
class FieldDescription:
    """One column of a RowDescription.

    ``table_oid``/``column_attnum`` are 0 when the column is not a plain table column;
    ``type_size`` is negative for variable-width types; ``format`` is 0 text / 1 binary.
    """

    name: str
    table_oid: int = 0
    column_attnum: int = 0
    type_oid: int = 0
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0


@attrs.frozen
class RowDescription:
    TYPE: ClassVar[bytes] = b"T"

    fields: tuple[FieldDescription, ...]


@attrs.frozen
class DataRow:
    """One result row: each value's bytes in its column's format, ``None`` for NULL."""

    TYPE: ClassVar[bytes] = b"D"

    values: tuple[bytes | None, ...] = attrs.field(repr=False)


_ROW_COUNT_TAG = re.compile(r"(?:[A-Z]+ )+(?:\d+ )?(\d+)")


@attrs.frozen
class CommandComplete:
    """``tag`` as PostgreSQL writes it: ``SELECT 5``, ``INSERT 0 1``, ``CREATE TABLE``…"""

    TYPE: ClassVar[bytes] = b"C"

    tag: str

    @property
    def command(self) -> str:
        """The tag's command words without the counts (``INSERT``, ``CREATE TABLE``)."""
        return " ".join(word for word in self.tag.split(" ") if not word.isdigit())

    @property
    def row_count(self) -> int | None:
        """Rows affected or returned, for the tags that carry a count; else None."""
        match = _ROW_COUNT_TAG.fullmatch(self.tag)
        return int(match.group(1)) if match else None


@attrs.frozen
class EmptyQueryResponse:
    TYPE: ClassVar[bytes] = b"I"


@attrs.frozen
class PortalSuspended:
    TYPE: ClassVar[bytes] = b"s"


@attrs.frozen
class NoData:
    TYPE: ClassVar[bytes] = b"n"


@attrs.frozen
class ParseComplete:
    TYPE: ClassVar[bytes] = b"1"


@attrs.frozen
class BindComplete:
    TYPE: ClassVar[bytes] = b"2"


@attrs.frozen
class CloseComplete:
    TYPE: ClassVar[bytes] = b"3"


@attrs.frozen
class ParameterDescription:
    TYPE: ClassVar[bytes] = b"t"

    type_oids: tuple[int, ...]


@attrs.frozen
class FunctionCallResponse:
    """The fast-path function's result (``None``: NULL)."""

    TYPE: ClassVar[bytes] = b"V"

    value: bytes | None = attrs.field(repr=False)


@attrs.frozen
class NotificationResponse:
    """A NOTIFY delivered to this session's LISTEN."""

    TYPE: ClassVar[bytes] = b"A"

    process_id: int
    channel: str
    payload: str = ""


@attrs.frozen
class ReadyForQuery:
    """``status`` is ``"I"`` (idle), ``"T"`` (in a transaction) or ``"E"`` (in a failed one)."""

    TYPE: ClassVar[bytes] = b"Z"

    status: Literal["I", "T", "E"] = "I"

    @property
    def in_transaction(self) -> bool:
        return self.status != "I"


# --- errors and notices ---------------------------------------------------------------------------

class ErrorField(enum.StrEnum):
    """Field codes of ErrorResponse/NoticeResponse; members compare equal to the plain codes.

    Servers may add codes not listed here; decoders keep every field whatever its code.
    """

    SEVERITY = "S"  # localized
    SEVERITY_NONLOCALIZED = "V"  # always English (servers since 9.6)
    SQLSTATE = "C"
    MESSAGE = "M"
    DETAIL = "D"
    HINT = "H"
    POSITION = "P"
    INTERNAL_POSITION = "p"
    INTERNAL_QUERY = "q"
    WHERE = "W"
    SCHEMA_NAME = "s"
    TABLE_NAME = "t"
    COLUMN_NAME = "c"
    DATA_TYPE_NAME = "d"
    CONSTRAINT_NAME = "n"
    FILE = "F"
    LINE = "L"
    ROUTINE = "R"


@attrs.frozen
class _FieldsMessage:
    """Ordered ``(code, value)`` pairs; ``code`` is one character (one byte on the wire).

    Servers localize these texts and may send them before ``client_encoding`` applies, so the
    decoder replaces bytes that are not UTF-8 (U+FFFD) instead of refusing the message: losing
    the server's error over its encoding would help nobody. Forward the raw frame when the exact
    bytes matter.
    """

    fields: tuple[tuple[str, str], ...]

    def get(self, code: str, default: str | None = None) -> str | None:
        for key, value in self.fields:
            if key == code:
                return value
        return default

    @property
    def severity(self) -> str | None:
        """``ERROR``, ``FATAL``, ``NOTICE``…: the non-localized field when the server sent it."""
        return self.get(ErrorField.SEVERITY_NONLOCALIZED) or self.get(ErrorField.SEVERITY)

    @property
    def sqlstate(self) -> str | None:
        return self.get(ErrorField.SQLSTATE)

    @property
    def message(self) -> str | None:
        return self.get(ErrorField.MESSAGE)

    @property
    def detail(self) -> str | None:
        return self.get(ErrorField.DETAIL)

    @property
    def hint(self) -> str | None:
        return self.get(ErrorField.HINT)

    @classmethod
    def build(
        cls,
        sqlstate: str,
        message: str,
        *,
        severity: str = "ERROR",
        detail: str | None = None,
        hint: str | None = None,
    ) -> Self:
        """A message with the fields a client needs, in the order PostgreSQL sends them.

        NUL characters (which would end a field early) become U+FFFD, so text from anywhere,
        including the peer, can be passed in.
        """
        fields = [(ErrorField.SEVERITY, severity), (ErrorField.SEVERITY_NONLOCALIZED, severity)]
        fields.append((ErrorField.SQLSTATE, sqlstate))
        fields.append((ErrorField.MESSAGE, message))
        if detail is not None:
            fields.append((ErrorField.DETAIL, detail))
        if hint is not None:
            fields.append((ErrorField.HINT, hint))
        return cls(tuple((code.value, value.replace("\x00", "\ufffd")) for code, value in fields))


@attrs.frozen
class ErrorResponse(_FieldsMessage):
    TYPE: ClassVar[bytes] = b"E"


@attrs.frozen
class NoticeResponse(_FieldsMessage):
    TYPE: ClassVar[bytes] = b"N"


# --- groupings ------------------------------------------------------------------------------------

StartupRequest = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest

Authentication = (
    AuthenticationOk
    | AuthenticationKerberosV5
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationGSS
    | AuthenticationGSSContinue
    | AuthenticationSSPI
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
)

FrontendMessage = (
    StartupRequest
    | PasswordMessage
    | SASLInitialResponse
    | SASLResponse
    | GSSResponse
    | Query
    | Parse
    | Bind
    | Describe
    | Execute
    | Close
    | Sync
    | Flush
    | FunctionCall
    | CopyData
    | CopyDone
    | CopyFail
    | Terminate
)

BackendMessage = (
    EncryptionResponse
    | Authentication
    | ParameterStatus
    | BackendKeyData
    | NegotiateProtocolVersion
    | CopyInResponse
    | CopyOutResponse
    | CopyBothResponse
    | CopyData
    | CopyDone
    | RowDescription
    | DataRow
    | CommandComplete
    | EmptyQueryResponse
    | PortalSuspended
    | NoData
    | ParseComplete
    | BindComplete
    | CloseComplete
    | ParameterDescription
    | FunctionCallResponse
    | NotificationResponse
    | ErrorResponse
    | NoticeResponse
    | ReadyForQuery
)
