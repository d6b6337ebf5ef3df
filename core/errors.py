"""Exceptions that end a session, each with the reason the audit trail records."""

from __future__ import annotations

from bastion.policies.model import Decision


class SessionError(Exception):
    """Base class: ``reason`` is a short plain sentence for the audit trail (never a secret)."""

    reason = "session error"

    def __init__(self, reason: str | None = None) -> None:
        if reason is not None:
            self.reason = reason
        super().__init__(self.reason)


class AuthenticationFailed(SessionError):
    """No provider verified the caller. Callers are told only that authentication failed."""

    reason = "authentication failed"


class ConnectDenied(SessionError):
    """The caller is who they say, but no grant lets them use this target."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        super().__init__(f"connection denied: {decision.summary}")


class UpstreamUnavailable(SessionError):
    reason = "upstream unavailable"


class ClientProtocolError(SessionError):
    reason = "client protocol error"


class GatewayError(Exception):
    """The gateway cannot start or keep running (e.g. a port already in use)."""
