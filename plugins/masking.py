"""The transform hooks: PHI masking (policies.masking) with the rules the policy gives an identity.

A plan is compiled for a result shape (a RowDescription) and applied by the protocol to each row.
Compiling costs far more than a query (hundreds of µs), and a session repeats the same shapes, so
compiled plans are kept per session (the rules in force are the session's identity's) and each
result gets a light view of one that counts only its own masked cells.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from bastion.core.hookspecs import hookimpl
from bastion.policies import engine, masking

RULES_KEY = "masking.rules"
PLANS_KEY = "masking.plans"
HASH_KEY = "gateway.hash_key"
# result shapes a session keeps compiled plans for; a session that cycles through more just
# recompiles, memory stays bounded
PLANS_PER_SESSION = 64
_MISSING = object()


class ResultPlan:
    """One result's use of a compiled plan: ``counts`` are this result's masked cells only.

    A session's results come one after another, so counts are read when a result ends, before
    the next result that uses the same plan starts.
    """

    __slots__ = ("_plan", "_before", "apply", "mask_copy_line", "deny_reason")

    def __init__(self, plan: masking.RowMasker) -> None:
        self._plan = plan
        self._before = Counter(plan.counts())
        self.apply = plan.apply
        self.mask_copy_line = plan.mask_copy_line
        self.deny_reason = plan.deny_reason

    def counts(self) -> dict[str, int]:
        after = Counter(self._plan.counts())
        after.subtract(self._before)
        return {key: count for key, count in after.items() if count}

    def __getattr__(self, name: str):
        return getattr(self._plan, name)


def rules_for(session):
    """(rules, recognizers, settings) for this session's identity, memoised in the session."""
    cached = session.state.get(RULES_KEY)
    if cached is None:
        if session.policy is None or session.identity is None:
            cached = ((), (), None)
        else:
            cached = engine.masking_rules_for(session.policy, session.identity, session.target.name)
        session.state[RULES_KEY] = cached
    return cached


def masking_active(session) -> bool:
    rules, _, settings = rules_for(session)
    return bool(rules) or bool(settings is not None and settings.default_recognizers)


@hookimpl
def bastion_transform(session, request, shape):
    rules, recognizers, settings = rules_for(session)
    if settings is None or (not rules and not settings.default_recognizers):
        return None
    encoding = session.state.get("client_encoding", "utf-8")
    plans = session.state.get(PLANS_KEY)
    if plans is None:
        plans = session.state[PLANS_KEY] = OrderedDict()
    key = (shape, encoding)
    plan = plans.get(key, _MISSING)
    if plan is not _MISSING:
        plans.move_to_end(key)
    else:
        plan = masking.compile_plan(
            shape,
            rules,
            recognizers,
            settings,
            hash_key=session.target_state.get(HASH_KEY, b""),
            encoding=encoding,
        )
        plans[key] = plan
        if len(plans) > PLANS_PER_SESSION:
            plans.popitem(last=False)
    return None if plan is None else ResultPlan(plan)


@hookimpl
def bastion_text_transform(session, text):
    if not masking_active(session):
        return None
    _, recognizers, _ = rules_for(session)
    masked, _counts = masking.mask_text(text, custom=recognizers)
    return masked
