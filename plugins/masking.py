"""The transform hooks: PHI masking (policies.masking) with the rules the policy gives an identity.

A plan is compiled once per result set (per RowDescription) and applied by the protocol to each
row. The rules in force for an identity on a target are worked out once per session.
"""

from __future__ import annotations

from bastion.core.hookspecs import hookimpl
from bastion.policies import engine, masking

RULES_KEY = "masking.rules"
HASH_KEY = "gateway.hash_key"


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
    return masking.compile_plan(
        shape,
        rules,
        recognizers,
        settings,
        hash_key=session.target_state.get(HASH_KEY, b""),
        encoding=session.state.get("client_encoding", "utf-8"),
    )


@hookimpl
def bastion_text_transform(session, text):
    if not masking_active(session):
        return None
    _, recognizers, _ = rules_for(session)
    masked, _counts = masking.mask_text(text, custom=recognizers)
    return masked
