"""The one exception the PostgreSQL codec raises for bad input, and the SQLSTATEs it answers with."""

from __future__ import annotations

from bastion.protocols.postgres.messages import ErrorResponse

# SQLSTATEs a gateway answers a broken client with (PostgreSQL's errcodes.txt names in comments).
PROTOCOL_VIOLATION = "08P01"  # protocol_violation
PROGRAM_LIMIT_EXCEEDED = "54000"  # program_limit_exceeded: a message longer than a limit
CHARACTER_NOT_IN_REPERTOIRE = "22021"  # character_not_in_repertoire: a string that is not UTF-8
FEATURE_NOT_SUPPORTED = "0A000"  # feature_not_supported: e.g. protocol version 2, direct TLS


class ProtocolError(Exception):
    """The byte stream is not the PostgreSQL protocol the codec speaks, or exceeds a limit.

    Every decoding failure surfaces as this one type, whatever went wrong inside. ``sqlstate`` is
    what a gateway should answer the peer with (an ErrorResponse of severity FATAL, see
    :meth:`error_response`), ``message`` says what was wrong without echoing the peer's bytes at
    length. After a decoder has raised it the connection cannot continue: the decoder keeps
    raising the same error.
    """

    def __init__(self, message: str, sqlstate: str = PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate

    def __repr__(self) -> str:
        return f"ProtocolError({self.message!r}, sqlstate={self.sqlstate!r})"

    def error_response(self) -> ErrorResponse:
        """The FATAL ErrorResponse to send the peer before closing the connection."""
        return ErrorResponse.build(self.sqlstate, self.message, severity="FATAL")
