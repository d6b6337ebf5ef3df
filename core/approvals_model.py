"""Approval requests and the rules of reviewing them: frozen values and pure functions.

A held statement becomes an :class:`ApprovalRequest` (what is asked, by whom, why it was held, who
may approve and until when). Its :class:`ApprovalRecord` adds what happened since: the state, the
reviewers' votes and, for an approval that covers a time-boxed window, the window's end.

Every change is computed here, without I/O, from the current record: :func:`approve`,
:func:`deny`, :func:`expire` and :func:`cancel` return a :class:`Change` (the new record, the steps
for the audit trail, and a :class:`Window` to remember) or raise :class:`ReviewRefused` saying why
not. The stores (:mod:`bastion.core.approvals_store`) apply a change inside one transaction, so two
reviewers acting at once are serialised and each sees the other's vote.

The rules:

* a reviewer may review a request when one of their groups is an approver group of one of the
  request's requirements, or one of ``approvals.admin_groups``;
* the requester never approves their own request (same identity provider and subject), whatever
  their groups — admins included;
* each requirement (one per rule that asked for review) needs ``min_approvals`` distinct
  reviewers from its groups (admins count towards every requirement); the request is approved
  when every requirement has enough;
* one refusal by anyone who may review denies the request at once;
* an approval covers the statement once, unless every approval that counts asks for a window:
  then this identity may run statements of the same fingerprint on the same target, held by the
  same rules, without asking again, for the shortest window asked — never longer than the
  shortest ``max_window`` of the rules, and only for statements that have a fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import attrs

from bastion.core.codec import converter
from bastion.policies.model import Identity, Request, ReviewRequirement

# what an approval request is for: a statement before it runs, or the rest of a result paused at
# its row threshold
STATEMENT = "statement"
ROWS = "rows"

PENDING = "pending"
APPROVED = "approved"
DENIED = "denied"
EXPIRED = "expired"
CANCELLED = "cancelled"
STATES = (PENDING, APPROVED, DENIED, EXPIRED, CANCELLED)
FINAL_STATES = frozenset({APPROVED, DENIED, EXPIRED, CANCELLED})

APPROVE = "approve"
DENY = "deny"

# a comment or reason is for people to read in a list; an essay belongs in the ticket it links to
MAX_COMMENT_CHARS = 2000


# --- values ----------------------------------------------------------------------------------------


@attrs.frozen
class Person:
    """An identity as approvals see it: who (provider + subject) and their groups at that time."""

    provider: str
    subject: str
    groups: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)

    @classmethod
    def of(cls, identity: Identity) -> Person:
        return cls(identity.provider, identity.subject, identity.groups)

    def same_as(self, other: Person) -> bool:
        return (self.provider, self.subject) == (other.provider, other.subject)

    @property
    def display(self) -> str:
        return f"{self.subject} ({self.provider})"


@attrs.frozen
class Requirement:
    """One rule's terms for approving (from :class:`~bastion.policies.model.ReviewRequirement`)."""

    rule: str
    approver_groups: frozenset[str] = attrs.field(converter=frozenset)
    min_approvals: int = 1
    timeout_seconds: float = 900.0
    max_window_seconds: float = 0.0

    @classmethod
    def of(cls, review: ReviewRequirement) -> Requirement:
        return cls(review.rule, review.approver_groups, review.min_approvals, review.timeout_seconds, review.max_window_seconds)


@attrs.frozen
class Finding:
    name: str
    weight: int
    sentence: str


@attrs.frozen
class ApprovalRequest:
    """What a reviewer is asked to decide. ``statement`` is masked (literals replaced)."""

    id: str
    kind: str  # STATEMENT | ROWS
    requester: Person
    target: str
    session_id: str
    request_no: int
    holder: str  # the gateway instance whose session waits for the answer
    statement: str
    fingerprint: str  # "" when the statement has none: then no window can be approved
    requirements: tuple[Requirement, ...]
    created_at: float
    expires_at: float
    findings: tuple[Finding, ...] = ()
    rules: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    justification: str = ""
    rows_sent: int | None = None
    policy_version: str = ""

    @property
    def approver_groups(self) -> frozenset[str]:
        return frozenset(g for r in self.requirements for g in r.approver_groups)

    @property
    def review_rules(self) -> frozenset[str]:
        return frozenset(r.rule for r in self.requirements)

    @property
    def min_approvals(self) -> int:
        """Distinct approvals needed at least (more when requirements' groups do not overlap)."""
        return max((r.min_approvals for r in self.requirements), default=1)

    @property
    def max_window_seconds(self) -> float:
        return min((r.max_window_seconds for r in self.requirements), default=0.0)


@attrs.frozen
class Vote:
    reviewer: Person
    verdict: str  # APPROVE | DENY
    at: float
    comment: str = ""
    window_seconds: float = 0.0


@attrs.frozen
class Window:
    """A time-boxed approval: ``identity`` may run statements of ``fingerprint`` on ``target``
    that the rules ``rules`` hold, until ``until``, without asking again."""

    approval_id: str
    provider: str
    subject: str
    target: str
    fingerprint: str
    kind: str
    rules: frozenset[str] = attrs.field(converter=frozenset)
    until: float = 0.0

    def covers(self, person: Person, target: str, fingerprint: str, kind: str, rules: Iterable[str], now: float) -> bool:
        return (
            bool(fingerprint)
            and (self.provider, self.subject) == (person.provider, person.subject)
            and (self.target, self.fingerprint, self.kind) == (target, fingerprint, kind)
            and frozenset(rules) <= self.rules
            and now < self.until
        )


@attrs.frozen
class Step:
    """One thing that happened to a request, as the audit trail and webhooks will tell it."""

    approval_id: str
    step: str  # requested | approval | approved | denied | expired | cancelled | window
    at: float
    actor: str = ""
    comment: str = ""


@attrs.frozen
class ApprovalRecord:
    request: ApprovalRequest
    state: str = PENDING
    votes: tuple[Vote, ...] = ()
    version: int = 0
    decided_at: float | None = None
    outcome: str = ""  # why it ended, for denied/expired/cancelled; the approvers for approved
    window_until: float | None = None

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def approvals(self) -> tuple[Vote, ...]:
        return tuple(v for v in self.votes if v.verdict == APPROVE)

    @property
    def approvers(self) -> tuple[Person, ...]:
        return tuple(v.reviewer for v in self.approvals)

    @property
    def pending(self) -> bool:
        return self.state == PENDING


@attrs.frozen
class Change:
    """What an operation does to a record, for a store to apply in one transaction."""

    record: ApprovalRecord
    steps: tuple[Step, ...] = ()
    window: Window | None = None


class ReviewRefused(Exception):
    """A reviewer's action is not possible. ``kind``: forbidden | not-found | conflict | invalid."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        self.message = message
        super().__init__(message)


# --- who may do what -------------------------------------------------------------------------------


def may_review(reviewer: Person, request: ApprovalRequest, admin_groups: Iterable[str] = ()) -> bool:
    """Whether ``reviewer``'s groups let them approve or deny (self-approval is checked apart)."""
    return bool(reviewer.groups & (request.approver_groups | frozenset(admin_groups)))


def may_see(reviewer: Person, request: ApprovalRequest, admin_groups: Iterable[str] = ()) -> bool:
    """Reviewers see what they may review; requesters see their own requests."""
    return may_review(reviewer, request, admin_groups) or reviewer.same_as(request.requester)


def counts_towards(vote: Vote, requirement: Requirement, admin_groups: frozenset[str]) -> bool:
    return bool(vote.reviewer.groups & (requirement.approver_groups | admin_groups))


def missing_approvals(record: ApprovalRecord, admin_groups: Iterable[str] = ()) -> dict[str, int]:
    """Per rule, how many more distinct approvals it needs (rules that have enough are left out)."""
    admins = frozenset(admin_groups)
    missing = {}
    for requirement in record.request.requirements:
        have = sum(1 for vote in record.approvals if counts_towards(vote, requirement, admins))
        if have < requirement.min_approvals:
            missing[requirement.rule] = requirement.min_approvals - have
    return missing


def _check_open(record: ApprovalRecord, now: float) -> None:
    if record.state != PENDING:
        raise ReviewRefused("conflict", f"approval request {record.id} is already {record.state}")
    if now >= record.request.expires_at:
        raise ReviewRefused("conflict", f"approval request {record.id} has expired")


def _check_reviewer(record: ApprovalRecord, reviewer: Person, admin_groups: Iterable[str], action: str) -> None:
    if not may_review(reviewer, record.request, admin_groups):
        groups = ", ".join(sorted(record.request.approver_groups)) or "none"
        raise ReviewRefused("forbidden", f"{reviewer.subject} may not {action} approval request {record.id}: approvers are the groups {groups}")
    if any(vote.reviewer.same_as(reviewer) for vote in record.votes):
        raise ReviewRefused("conflict", f"{reviewer.subject} has already reviewed approval request {record.id}")


def _clean_text(text: str, what: str) -> str:
    text = (text or "").strip()
    if len(text) > MAX_COMMENT_CHARS:
        raise ReviewRefused("invalid", f"the {what} is longer than {MAX_COMMENT_CHARS} characters")
    return text


# --- changes ------------------------------------------------------------------------------------


def approve(
    record: ApprovalRecord,
    reviewer: Person,
    now: float,
    *,
    comment: str = "",
    window_seconds: float = 0.0,
    admin_groups: Iterable[str] = (),
) -> Change:
    """One reviewer's approval; the request is approved once every rule has enough of them."""
    request = record.request
    _check_open(record, now)
    if reviewer.same_as(request.requester):
        raise ReviewRefused("forbidden", f"{reviewer.subject} asked for approval request {record.id} and cannot approve it")
    _check_reviewer(record, reviewer, admin_groups, "approve")
    comment = _clean_text(comment, "comment")
    if window_seconds < 0:
        raise ReviewRefused("invalid", "a window cannot be negative")
    if window_seconds > 0:
        if not request.fingerprint:
            raise ReviewRefused("invalid", "this statement has no fingerprint, so a window cannot be tied to it; approve it once")
        if request.max_window_seconds <= 0:
            raise ReviewRefused("invalid", "the rules that held this statement allow approving it once only, not a window")
        if window_seconds > request.max_window_seconds:
            raise ReviewRefused("invalid", f"a window may last at most {describe_seconds(request.max_window_seconds)} under these rules")
    vote = Vote(reviewer, APPROVE, now, comment, float(window_seconds))
    updated = attrs.evolve(record, votes=(*record.votes, vote), version=record.version + 1)
    steps = [Step(record.id, "approval", now, reviewer.display, comment)]
    window = None
    if not missing_approvals(updated, admin_groups):
        approvers = ", ".join(p.subject for p in updated.approvers)
        windows = [v.window_seconds for v in updated.approvals]
        granted = min(windows) if windows and all(w > 0 for w in windows) else 0.0
        until = now + granted if granted > 0 else None
        updated = attrs.evolve(updated, state=APPROVED, decided_at=now, outcome=approvers, window_until=until)
        summary = f"window of {describe_seconds(granted)} for this statement" if granted else "this statement once"
        steps.append(Step(record.id, "approved", now, approvers, summary))
        if until is not None:
            window = Window(record.id, request.requester.provider, request.requester.subject, request.target, request.fingerprint, request.kind, request.review_rules, until)
    return Change(updated, tuple(steps), window)


def deny(record: ApprovalRecord, reviewer: Person, now: float, *, reason: str, admin_groups: Iterable[str] = ()) -> Change:
    """A refusal by anyone who may review ends the request at once."""
    _check_open(record, now)
    _check_reviewer(record, reviewer, admin_groups, "deny")
    reason = _clean_text(reason, "reason")
    if not reason:
        raise ReviewRefused("invalid", "say why the request is denied (--reason): the caller is told")
    vote = Vote(reviewer, DENY, now, reason)
    updated = attrs.evolve(record, votes=(*record.votes, vote), version=record.version + 1, state=DENIED, decided_at=now, outcome=reason)
    return Change(updated, (Step(record.id, "denied", now, reviewer.display, reason),))


def expire(record: ApprovalRecord, now: float) -> Change | None:
    """None when the request is no longer pending (decided just in time) or not yet due."""
    if record.state != PENDING or now < record.request.expires_at:
        return None
    reason = f"no decision within {describe_seconds(record.request.expires_at - record.request.created_at)}"
    updated = attrs.evolve(record, state=EXPIRED, decided_at=now, outcome=reason, version=record.version + 1)
    return Change(updated, (Step(record.id, "expired", now, "", reason),))


def cancel(record: ApprovalRecord, now: float, reason: str) -> Change | None:
    """None when the request is no longer pending."""
    if record.state != PENDING:
        return None
    updated = attrs.evolve(record, state=CANCELLED, decided_at=now, outcome=reason, version=record.version + 1)
    return Change(updated, (Step(record.id, "cancelled", now, "", reason),))


# --- building a request ----------------------------------------------------------------------------


def combined_fingerprint(requests: Iterable[Request]) -> str:
    """One fingerprint for a message's statements; "" when any statement has none (no window)."""
    prints = [r.fingerprint for r in requests]
    if not prints or not all(prints):
        return ""
    if len(prints) == 1:
        return prints[0]
    return hashlib.sha256("\n".join(prints).encode()).hexdigest()[:32]


def findings_of(requests: Iterable[Request]) -> tuple[Finding, ...]:
    seen: dict[str, Finding] = {}
    for request in requests:
        for finding in request.findings:
            seen.setdefault(finding.name, Finding(finding.name, finding.weight, finding.sentence))
    return tuple(seen.values())


def describe_seconds(seconds: float) -> str:
    """``15m``, ``1h30m``, ``45s``: durations as people write them in the configuration."""
    seconds = max(0, round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    if seconds or not parts:
        parts.append(f"{seconds}s")
    return "".join(parts)


# --- plain data ---------------------------------------------------------------------------------


def request_to_json(request: ApprovalRequest) -> str:
    return json.dumps(converter.unstructure(request), sort_keys=True)


def request_from_json(text: str) -> ApprovalRequest:
    return converter.structure(json.loads(text), ApprovalRequest)


def votes_to_json(votes: tuple[Vote, ...]) -> str:
    return json.dumps(converter.unstructure(list(votes)), sort_keys=True)


def votes_from_json(text: str) -> tuple[Vote, ...]:
    return tuple(converter.structure(json.loads(text or "[]"), list[Vote]))


def record_view(record: ApprovalRecord, admin_groups: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON a reviewer sees (HTTP API, ``approvals list --json``, webhooks)."""
    request = record.request
    return {
        "id": request.id,
        "state": record.state,
        "kind": request.kind,
        "target": request.target,
        "session_id": request.session_id,
        "request_no": request.request_no,
        "requester": {"provider": request.requester.provider, "subject": request.requester.subject, "groups": sorted(request.requester.groups)},
        "statement": request.statement,
        "rows_sent": request.rows_sent,
        "findings": [{"name": f.name, "weight": f.weight, "sentence": f.sentence} for f in request.findings],
        "rules": list(request.rules),
        "reasons": list(request.reasons),
        "requirements": [
            {"rule": r.rule, "approver_groups": sorted(r.approver_groups), "min_approvals": r.min_approvals, "max_window_seconds": r.max_window_seconds}
            for r in request.requirements
        ],
        "approver_groups": sorted(request.approver_groups),
        "min_approvals": request.min_approvals,
        "max_window_seconds": request.max_window_seconds,
        "justification": request.justification,
        "created_at": request.created_at,
        "expires_at": request.expires_at,
        "decided_at": record.decided_at,
        "outcome": record.outcome,
        "window_until": record.window_until,
        "missing_approvals": missing_approvals(record, admin_groups) if record.pending else {},
        "votes": [
            {"reviewer": {"provider": v.reviewer.provider, "subject": v.reviewer.subject}, "verdict": v.verdict, "at": v.at, "comment": v.comment, "window_seconds": v.window_seconds}
            for v in record.votes
        ],
        "version": record.version,
    }


def requirements_for(reviews: Iterable[ReviewRequirement]) -> tuple[Requirement, ...]:
    return tuple(Requirement.of(review) for review in reviews)
