"""The authorization engine: one pure function from (policy, identity, target, request) to a decision.

It runs for every statement, so it remembers: which grants, guardrails and reviews are in scope
for an identity on a target (:meth:`bastion.policies.bundle.PolicySet.rules_for`), and the final
decision for each identity, target and request shape (action, message kind, tables, columns,
findings — everything a decision depends on), both in bounded memos on the policy set. A new
statement shape costs a handful of set look-ups and glob matches (plus ``Decision.combine`` when
several rules speak); a repeated one costs building its key.

How a request is decided (every decision carries rule ids, plain-sentence reasons and the policy
version; they are combined with :meth:`Decision.combine`, deny over review over allow):

1. **Grants** (default deny). ``connect`` is allowed when a grant for the identity covers the
   target. Any other request is allowed when one grant covers it: its action is in the grant's
   ``statements`` (``"*"`` is any action but ``unknown``) or is one of its ``capabilities``,
   every table read or written matches its ``tables`` (when given), every column read matches
   its ``columns`` (when given) — and when the analysis says the statement returns columns it
   cannot list (``SELECT *`` without a catalog, reported as ``request.columns_complete = False``),
   ``columns`` must allow every column of each table read
   (``public.visits.*``) — and the grant has every capability the request needs. Otherwise
   an explicit deny (rule ``default-deny``) says why the nearest grant did not cover it, so a
   review elsewhere can never turn an ungranted request into a reviewable one.
2. **Guardrails**: a guardrail whose ``detect`` names one of the request's findings denies or
   holds it; a dry-run guardrail (``enforce = false``) adds a non-enforced decision, recorded only.
3. **Reviews**: a review whose ``when`` holds holds the request, with a ReviewRequirement
   (``rows_over`` in it: the statement runs and its result pauses at that row).
4. **Risk**: each bundle's ``[risk]`` denies above ``deny_over`` and holds above ``review_over``.

A capability is needed when the request's action, its message kind or one of its findings is
called like it (``function-call``, ``replication``, ``startup-options``): protocol handlers ask
for one by naming it so.

Evaluation never raises: any failure inside becomes a deny (rule ``policy-error``) naming the
exception type only, never its message, which might quote data.
"""

from __future__ import annotations

from bastion.policies.bundle import CAPABILITIES, CONNECT, UNKNOWN, ApplicableRules, Grant, PolicySet
from bastion.policies.findings import FINDINGS
from bastion.policies.model import (
    Decision,
    Identity,
    MaskingSettings,
    MaskRule,
    RecognizerRule,
    Request,
    Verdict,
)

DEFAULT_DENY_RULE = "default-deny"
POLICY_ERROR_RULE = "policy-error"
_CAPABILITY_NAMES = frozenset(CAPABILITIES)
_NONE: frozenset[str] = frozenset()


def evaluate(policy: PolicySet, identity: Identity, target: str, request: Request) -> Decision:
    """The combined decision for ``request``. Never raises: a failure denies."""
    try:
        key = _decision_key(identity, target, request)
        found = policy.memoised(key)
        if found is None:
            found = policy.memo(key, lambda: _combined(policy, identity, target, request))
        return found
    except Exception as exc:  # fail closed, whatever went wrong
        return _failure(policy, exc)


def _decision_key(identity: Identity, target: str, request: Request) -> tuple[object, ...]:
    """Everything a decision depends on besides the policy; keep in step with :func:`_decide`.

    Jobs send the same statements again and again, so most requests are decided from the memo.
    """
    return (
        target,
        identity.provider,
        identity.subject,
        identity.groups,
        request.action,
        request.message.kind,
        request.tables_read,
        request.tables_written,
        request.columns_read,
        _columns_listed(request),
        tuple((finding.name, finding.weight) for finding in request.findings),
    )


def _columns_listed(request: Request) -> bool:
    """False when the analysis says the statement returns columns it cannot name (``SELECT *``
    without a catalog): a column allowlist cannot vouch for those."""
    return request.columns_complete


def _combined(policy: PolicySet, identity: Identity, target: str, request: Request) -> Decision:
    decisions = _decide(policy, identity, target, request)
    if len(decisions) == 1 and decisions[0].enforced:
        return decisions[0]  # what combine would return, without its cost
    return Decision.combine(decisions)


def evaluate_all(policy: PolicySet, identity: Identity, target: str, request: Request) -> tuple[Decision, ...]:
    """Every rule's own decision, before combining (for explaining and testing a policy)."""
    try:
        return tuple(_decide(policy, identity, target, request))
    except Exception as exc:
        return (_failure(policy, exc),)


def masking_rules_for(
    policy: PolicySet, identity: Identity, target: str
) -> tuple[tuple[MaskRule, ...], tuple[RecognizerRule, ...], MaskingSettings]:
    """The mask rules in force for ``identity`` on ``target`` (exemptions applied), the custom
    recognizers and the masking settings: the arguments :func:`masking.compile_plan` takes."""
    return policy.rules_for(target, identity).masks, policy.recognizers, policy.masking


def _failure(policy: object, exc: Exception) -> Decision:
    version = getattr(policy, "version", "")
    return Decision.deny(
        POLICY_ERROR_RULE,
        f"policy evaluation failed ({type(exc).__name__}); denied to be safe",
        version if isinstance(version, str) else "",
    )


def needed_capabilities(action: str, message_kind: str, finding_names: frozenset[str]) -> frozenset[str]:
    """The capabilities a request asks for by its action, its message kind or a finding's name."""
    return _CAPABILITY_NAMES & ({action, message_kind} | finding_names)


def _decide(policy: PolicySet, identity: Identity, target: str, request: Request) -> list[Decision]:
    version = policy.version
    rules = policy.rules_for(target, identity)
    action = request.action.lower()
    findings = request.findings
    finding_names = frozenset(finding.name for finding in findings) if findings else _NONE
    needed = needed_capabilities(action, request.message.kind, finding_names)

    decisions = [_grant_decision(rules, target, request, action, needed, version)]
    if findings:
        for guardrail in rules.guardrails:
            hits = guardrail.detect & finding_names
            if not hits:
                continue
            reason = f'guardrail "{guardrail.name}": the statement {_describe_findings(hits)}'
            reviews = (guardrail.approval.requirement(guardrail.id),) if guardrail.approval is not None else ()
            decisions.append(Decision(guardrail.verdict, (guardrail.id,), (reason,), version, reviews, guardrail.enforce))
    risk = request.risk if findings else 0
    for review in rules.reviews:
        reason = _review_reason(review.when, request, action, finding_names, risk)
        if reason is not None:
            requirement = review.approval.requirement(review.id, review.when.rows_over)
            decisions.append(Decision(Verdict.REVIEW, (review.id,), (f'review "{review.name}": {reason}',), version, (requirement,)))
    for threshold in policy.risks:
        if threshold.deny_over is not None and risk > threshold.deny_over:
            reason = f"risk score {risk} is above {threshold.deny_over}{_risk_detail(finding_names)}"
            decisions.append(Decision.deny(threshold.deny_id, reason, version))
        elif threshold.review_over is not None and risk > threshold.review_over and threshold.approval is not None:
            reason = f"risk score {risk} is above {threshold.review_over}{_risk_detail(finding_names)}; a reviewer must approve"
            requirement = threshold.approval.requirement(threshold.review_id)
            decisions.append(Decision(Verdict.REVIEW, (threshold.review_id,), (reason,), version, (requirement,)))
    return decisions


def _grant_decision(rules: ApplicableRules, target: str, request: Request, action: str, needed: frozenset[str], version: str) -> Decision:
    nearest_miss = None
    for grant in rules.grants:
        miss = _why_not(grant, request, action, needed)
        if miss is None:
            what = f"access to {target}" if action == CONNECT else f"{action} on {target}"
            return Decision.allow(grant.id, f'grant "{grant.name}" allows {what}', version)
        nearest_miss = nearest_miss or miss
    if not rules.grants:
        reason = f"no grant gives this identity access to {target}"
    elif action == UNKNOWN:
        reason = "the statement could not be classified, and no grant allows unclassified statements"
    elif action == CONNECT:
        reason = f"no grant gives this identity access to {target}: {nearest_miss}"
    else:
        reason = f"no grant allows {action} on {target}: {nearest_miss}"
    return Decision.deny(DEFAULT_DENY_RULE, reason, version)


def _why_not(grant: Grant, request: Request, action: str, needed: frozenset[str]) -> str | None:
    """None when ``grant`` covers the request, else a sentence saying what it lacks."""
    missing = needed - grant.capabilities
    if missing:
        return f'grant "{grant.name}" lacks the {", ".join(sorted(missing))} capability'
    if action == CONNECT:
        return None
    if not grant.allows_action(action):
        return f'grant "{grant.name}" does not allow {action}'
    if grant.tables is not None:
        for table in (*request.tables_read, *request.tables_written):
            if not grant.tables.matches(table):
                return f'grant "{grant.name}" does not cover the table {table}'
    if grant.columns is not None:
        if request.tables_read and not _columns_listed(request):
            for table in request.tables_read:
                if not grant.columns.cover_every_column_of(table):
                    return (
                        f'grant "{grant.name}" allows only some columns of {table}, and the statement '
                        "reads columns Bastion cannot list (SELECT * without a catalog?)"
                    )
        for column in request.columns_read:
            if not grant.columns.matches(column):
                return f'grant "{grant.name}" does not cover the column {column}'
    return None


def _review_reason(when, request: Request, action: str, finding_names: frozenset[str], risk: int) -> str | None:
    """Why the review's conditions hold (each one that is given), or None when one does not."""
    if not when.statement_matches(action):
        return None
    parts = []
    if when.statements is not None:
        parts.append(f"it is a {action} statement")
    if when.tables is not None:
        touched = sorted(when.tables.matching(request.tables))
        if not touched:
            return None
        parts.append(f"it touches {', '.join(touched)}")
    if when.findings is not None:
        found = when.findings & finding_names
        if not found:
            return None
        parts.append(f"it {_describe_findings(found)}")
    if when.risk_over is not None:
        if risk <= when.risk_over:
            return None
        parts.append(f"its risk score {risk} is above {when.risk_over}")
    if when.rows_over is not None:
        parts.append(f"results pause for approval after {when.rows_over} rows")
    return "; ".join(parts) or "it matches"


def _describe_findings(names: frozenset[str]) -> str:
    sentences = [FINDINGS[name].sentence if name in FINDINGS else name for name in sorted(names)]
    return " and ".join(sentences)


def _risk_detail(finding_names: frozenset[str]) -> str:
    return f" ({', '.join(sorted(finding_names))})" if finding_names else ""
