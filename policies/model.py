"""The values every phase of a session passes along: who is calling, what they ask, what was decided.

Everything here is a frozen attrs value with no I/O, so protocols, policies, plugins and the audit
trail can share them without sharing state.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import attrs


def _frozen_groups(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


def _frozen_mapping(value: Mapping[str, str] | None) -> dict[str, str]:
    return dict(value or {})


# --- who -------------------------------------------------------------------------------------


@attrs.frozen
class Identity:
    """A verified caller. Only identity providers build these; nothing grants on a client's word.

    ``provider`` names the configured provider that verified the caller (``static-token``,
    ``oidc:github``…), ``subject`` is unique within ``issuer``, ``auth_method`` says how the proof
    was presented (``api-key``, ``jwt``, ``mtls``), ``token_id`` is the token's ``jti`` where it has
    one, ``ci`` keeps CI context (repository, workflow, run id) for the audit trail.
    """

    provider: str
    subject: str
    issuer: str | None = None
    groups: frozenset[str] = attrs.field(default=frozenset(), converter=_frozen_groups)
    auth_method: str = ""
    token_id: str | None = None
    expires_at: datetime | None = None
    ci: dict[str, str] = attrs.field(factory=dict, converter=_frozen_mapping, hash=False)

    @property
    def display(self) -> str:
        return self.subject if not self.issuer else f"{self.subject} ({self.issuer})"


@attrs.frozen
class Credential:
    """What a caller presented as proof, before any provider looked at it.

    ``secret`` is the token or API key (never logged: its repr is hidden); ``peer_certificate`` is
    the DER of a TLS client certificate the listener already verified, if any.
    """

    secret: str | None = attrs.field(default=None, repr=False)
    username: str | None = None
    peer_certificate: bytes | None = attrs.field(default=None, repr=False)
    peer_certificate_chain: tuple[bytes, ...] = attrs.field(default=(), repr=False)


class AuthStatus(enum.Enum):
    OK = "ok"
    UNKNOWN = "unknown"  # not mine: ask the next provider
    REJECT = "reject"  # mine, and wrong: stop here


@attrs.frozen
class AuthOutcome:
    """One identity provider's answer. ``reason`` is for the audit trail, never for the caller."""

    status: AuthStatus
    identity: Identity | None = None
    reason: str = ""

    @classmethod
    def ok(cls, identity: Identity) -> AuthOutcome:
        return cls(AuthStatus.OK, identity)

    @classmethod
    def unknown(cls, reason: str = "") -> AuthOutcome:
        return cls(AuthStatus.UNKNOWN, None, reason)

    @classmethod
    def reject(cls, reason: str) -> AuthOutcome:
        return cls(AuthStatus.REJECT, None, reason)


# --- what ------------------------------------------------------------------------------------


@attrs.frozen
class Message:
    """What a protocol handler saw on the wire, reduced to the part a parse hook needs.

    ``kind`` is protocol-shaped: ``connect`` for a new session, ``statement`` for SQL text,
    ``command`` for a command line (Redis, shell), ``function-call`` for PostgreSQL's fast-path.
    """

    protocol: str
    kind: str
    text: str = ""
    args: tuple[Any, ...] = ()
    dialect: str | None = None


@attrs.frozen
class Finding:
    """One named reason a request is risky: ``weight`` adds to the risk score (capped at 100)."""

    name: str
    weight: int
    sentence: str


@attrs.frozen
class Request:
    """A protocol-neutral description of what is being asked, built by a parse hook.

    ``action`` is the kind of operation (``select``, ``delete``, ``connect``, ``flushall``…);
    ``tables_read``/``tables_written`` are schema-qualified names (or other resource names a
    protocol has); ``analysis`` holds the protocol-specific detail (e.g. a SQL statement analysis).
    An ``action`` of ``unknown`` means the parser could not classify it: never treat it as safe.
    """

    message: Message
    action: str
    tables_read: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    tables_written: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    columns_read: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    functions: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    findings: tuple[Finding, ...] = ()
    fingerprint: str = ""
    redacted_text: str = ""  # the statement with literals masked: what the audit trail keeps
    # False when the request may read columns the parser cannot list (``SELECT *`` over a table
    # the catalog does not know): a column allowlist cannot be checked, so it must not pass
    columns_complete: bool = True
    analysis: Any = attrs.field(default=None, eq=False)

    @property
    def risk(self) -> int:
        return min(100, sum(f.weight for f in self.findings))

    @property
    def tables(self) -> frozenset[str]:
        return self.tables_read | self.tables_written

    @classmethod
    def unknown(cls, message: Message, why: str) -> Request:
        return cls(
            message=message,
            action="unknown",
            findings=(Finding("unparsable", 100, why),),
            redacted_text="<unparsable statement>",
        )


# --- decided ---------------------------------------------------------------------------------


class Verdict(enum.Enum):
    """Ordered by strength: when several rules speak, the strongest wins."""

    ALLOW = "allow"
    REVIEW = "review"
    DENY = "deny"

    @property
    def rank(self) -> int:
        return _VERDICT_RANK[self]


_VERDICT_RANK = {Verdict.ALLOW: 0, Verdict.REVIEW: 1, Verdict.DENY: 2}


@attrs.frozen
class ReviewRequirement:
    """What a ``review`` verdict asks of the approval machinery."""

    rule: str
    approver_groups: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    timeout_seconds: float = 900.0
    min_approvals: int = 1
    rows_over: int | None = None  # None: review before running; N: pause the result at row N
    max_window_seconds: float = 0.0  # 0: approvals cover one statement only


@attrs.frozen
class Decision:
    """One rule's (or the combined) verdict, with the rule ids and plain-sentence reasons."""

    verdict: Verdict
    rules: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    policy_version: str = ""
    reviews: tuple[ReviewRequirement, ...] = ()
    enforced: bool = True  # False: a dry-run rule; recorded, not acted on

    @classmethod
    def allow(cls, rule: str, reason: str, policy_version: str = "") -> Decision:
        return cls(Verdict.ALLOW, (rule,), (reason,), policy_version)

    @classmethod
    def deny(cls, rule: str, reason: str, policy_version: str = "") -> Decision:
        return cls(Verdict.DENY, (rule,), (reason,), policy_version)

    @classmethod
    def combine(cls, decisions: Iterable[Decision]) -> Decision:
        """Deny overrides review overrides allow; no enforced opinion at all is a deny.

        Non-enforced (dry-run) decisions are kept in the rules and reasons so the audit trail
        says what they would have done, but they never change the verdict.
        """
        decisions = list(decisions)
        if len(decisions) == 1 and type(decisions[0]) is cls and decisions[0]._combined_alone():
            return decisions[0]  # exactly what the general case below would build, without its cost
        enforced = [d for d in decisions if d.enforced]
        if not enforced:
            verdict = Verdict.DENY
            rules: list[str] = ["default-deny"]
            reasons: list[str] = ["no grant gives this identity this request"]
        else:
            verdict = max((d.verdict for d in enforced), key=lambda v: v.rank)
            rules, reasons = [], []
            # the reasons that decided come first, then the others for context
            for decision in sorted(decisions, key=lambda d: (d.verdict != verdict, not d.enforced)):
                for rule in decision.rules:
                    tag = rule if decision.enforced else f"{rule} (not enforced)"
                    if tag not in rules:
                        rules.append(tag)
                reasons.extend(r for r in decision.reasons if r not in reasons)
        versions = sorted({d.policy_version for d in decisions if d.policy_version})
        reviews = tuple(r for d in enforced if d.verdict is Verdict.REVIEW for r in d.reviews)
        return cls(
            verdict,
            tuple(rules),
            tuple(reasons),
            ",".join(versions),
            reviews if verdict is Verdict.REVIEW else (),
        )

    def _combined_alone(self) -> bool:
        """Whether ``combine([self])`` equals ``self``: enforced, no rule or reason twice, no
        review requirements unless the verdict is review."""
        rules, reasons = self.rules, self.reasons
        return (
            self.enforced
            and (self.verdict is Verdict.REVIEW or not self.reviews)
            and (len(rules) < 2 or len(set(rules)) == len(rules))
            and (len(reasons) < 2 or len(set(reasons)) == len(reasons))
        )

    @property
    def summary(self) -> str:
        return "; ".join(self.reasons) or self.verdict.value


# --- what flows back ---------------------------------------------------------------------------


@attrs.frozen
class Column:
    """One output column of a result, as far as the protocol and the analysis can tell.

    ``sources`` are the qualified columns (``public.patients.ssn``) the value is derived from;
    ``traced`` is False when the analysis could not follow the value to its sources (an opaque
    function over a row, for instance): masking policies decide what that means.
    """

    name: str
    type_name: str = ""
    type_oid: int = 0
    binary: bool = False
    table: str | None = None  # qualified table the column comes straight from, when known
    sources: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    traced: bool = True


@attrs.frozen(cache_hash=True)
class ResultShape:
    """The columns of one result set (a RowDescription, a COPY header, a MySQL column list).

    Hashed once (plans are cached by shape, and a shape is looked up several times).
    """

    columns: tuple[Column, ...]
    origin: str = "rows"  # rows | copy | error | notice


# --- masking rules (loaded from policy bundles, compiled by policies.masking) ------------------


@attrs.frozen
class MaskRule:
    """Which values to mask and how.

    ``columns`` are qualified column names or globs (``public.patients.ssn``, ``*.email``,
    ``*.*.ssn``); a result column matches when the column itself or any source it was derived
    from matches. ``recognizers`` names recognizers (``ssn``, ``email``… or custom ones) to scan
    the text of matching columns with, masking only what they find; with no recognizers the whole
    value is masked. ``exempt_groups``: identities in any of these groups see the raw value.
    """

    name: str
    columns: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    strategy: str = "redact"  # redact | partial | hash | null
    recognizers: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    exempt_groups: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)


@attrs.frozen
class RecognizerRule:
    """A custom recognizer from a policy bundle (MRN, member id…), in RE2 syntax (linear time)."""

    name: str
    pattern: str
    validator: str | None = None  # None | "luhn" | "mod97"


@attrs.frozen
class MaskingSettings:
    """Bundle-wide masking choices.

    ``untraced``: what to do with a result column the analysis could not trace to its sources
    while masking rules are in force: ``mask-all`` scans it with every recognizer, ``deny`` refuses
    the statement.
    """

    untraced: str = "mask-all"
    default_recognizers: tuple[str, ...] = attrs.field(default=(), converter=tuple)
