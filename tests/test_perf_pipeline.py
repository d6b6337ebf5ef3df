"""The per-statement shortcuts of the session pipeline do exactly what the general paths do.

The hook facade calls implementations itself instead of through pluggy's executor, the audit
trail's cell masker is compiled once per session, and ``Decision.combine`` returns a lone decision
that is already combined: each is checked here against the path it replaces.
"""

from __future__ import annotations

import types

import pluggy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.core import events
from bastion.core.config import Address, TargetConfig
from bastion.core.hooks import Hooks
from bastion.core.hookspecs import PROJECT, hookimpl
from bastion.core.plugins import build_plugin_manager
from bastion.core.session import Session
from bastion.policies.masking import TextMasker, mask_text
from bastion.policies.model import Decision, Finding, Identity, Message, RecognizerRule, Request, ReviewRequirement, Verdict

# --- the hook facade ------------------------------------------------------------------------------


def _session_info():
    from bastion.core.session import SessionInfo

    target = TargetConfig(name="db", protocol="postgres", listen=Address("127.0.0.1", 0), upstream=Address("127.0.0.1", 0))
    return SessionInfo(id="s", target=target, client="c", identity=Identity(provider="t", subject="u"))


def _bare_hooks() -> tuple[pluggy.PluginManager, Hooks]:
    pm = build_plugin_manager(disable=("sql", "policy", "masking"), entry_points=False)
    return pm, Hooks(pm)


def _message() -> Message:
    return Message("postgres", "statement", text="select 1", dialect="postgres")


class _Calls:
    def __init__(self) -> None:
        self.order: list[str] = []


def _voter(log: _Calls, name: str, verdict: Verdict | None, **opts):
    class Voter:
        @hookimpl(**opts)
        def bastion_authorize(self, session, request):
            log.order.append(name)
            return None if verdict is None else Decision(verdict, (name,), (f"{name} says {verdict.value}",))

    return Voter()


def test_authorize_calls_every_implementation_in_pluggys_order_and_combines():
    pm, hooks = _bare_hooks()
    log = _Calls()
    pm.register(_voter(log, "first-registered", Verdict.ALLOW))
    pm.register(_voter(log, "abstains", None))
    pm.register(_voter(log, "tryfirst", Verdict.ALLOW, tryfirst=True))
    pm.register(_voter(log, "trylast", Verdict.DENY, trylast=True))
    request = Request(_message(), "select")
    decision = hooks.authorize(_session_info(), request)
    assert decision.verdict is Verdict.DENY  # deny overrides, even from the last one called
    direct_order = list(log.order)
    log.order.clear()
    through_pluggy = pm.hook.bastion_authorize(session=_session_info(), request=request)
    assert log.order == direct_order == ["tryfirst", "abstains", "first-registered", "trylast"]
    assert decision == Decision.combine(through_pluggy)


def test_registering_and_unregistering_take_effect_at_once():
    pm, hooks = _bare_hooks()
    log = _Calls()
    request = Request(_message(), "select")
    assert hooks.authorize(_session_info(), request).verdict is Verdict.DENY  # nobody allows
    allow = _voter(log, "allow", Verdict.ALLOW)
    pm.register(allow)
    assert hooks.authorize(_session_info(), request).verdict is Verdict.ALLOW
    deny = _voter(log, "deny", Verdict.DENY)
    pm.register(deny)
    assert hooks.authorize(_session_info(), request).verdict is Verdict.DENY
    pm.unregister(deny)
    assert hooks.authorize(_session_info(), request).verdict is Verdict.ALLOW
    pm.unregister(allow)
    assert hooks.authorize(_session_info(), request).verdict is Verdict.DENY


def test_a_failing_policy_denies_and_a_failing_parser_is_unknown():
    pm, hooks = _bare_hooks()
    log = _Calls()

    class Broken:
        @hookimpl
        def bastion_authorize(self, session, request):
            raise RuntimeError("boom")

        @hookimpl
        def bastion_parse(self, session, message):
            raise RuntimeError("boom")

    pm.register(_voter(log, "allow", Verdict.ALLOW))
    pm.register(Broken())
    decision = hooks.authorize(_session_info(), Request(_message(), "select"))
    assert decision.verdict is Verdict.DENY and decision.rules == ("policy-error",)
    (request,) = hooks.parse(_session_info(), _message())
    assert request.action == "unknown"


def test_parse_stops_at_the_first_answer_and_passes_only_the_arguments_named():
    pm, hooks = _bare_hooks()
    seen: list[str] = []

    class NamesOnlyMessage:
        @hookimpl
        def bastion_parse(self, message):
            seen.append("message-only")
            return [Request(message, "select")]

    class Earlier:
        @hookimpl(tryfirst=True)
        def bastion_parse(self, message, session):  # another order than the spec's
            seen.append("tryfirst")
            assert session.id == "s" and message.text == "select 1"
            return None

    class Never:
        @hookimpl(trylast=True)
        def bastion_parse(self, session, message):
            seen.append("never")
            return [Request(message, "delete")]

    pm.register(Never())
    pm.register(NamesOnlyMessage())
    pm.register(Earlier())
    (request,) = hooks.parse(_session_info(), _message())
    assert request.action == "select"
    assert seen == ["tryfirst", "message-only"]


@pytest.mark.parametrize("style", ["wrapper", "hookwrapper"])
def test_a_wrapper_is_run_by_pluggy(style):
    pm, hooks = _bare_hooks()
    log = _Calls()
    pm.register(_voter(log, "allow", Verdict.ALLOW))

    class Wrapper:
        if style == "wrapper":

            @hookimpl(wrapper=True)
            def bastion_authorize(self, session, request):
                log.order.append("before")
                decisions = yield
                log.order.append("after")
                return [*decisions, Decision.deny("wrapper", "the wrapper says no")]

        else:

            @hookimpl(hookwrapper=True)
            def bastion_authorize(self, session, request):
                log.order.append("before")
                outcome = yield
                log.order.append("after")
                outcome.force_result([*outcome.get_result(), Decision.deny("wrapper", "the wrapper says no")])

    pm.register(Wrapper())
    decision = hooks.authorize(_session_info(), Request(_message(), "select"))
    assert log.order == ["before", "allow", "after"]
    assert decision.verdict is Verdict.DENY and "wrapper" in decision.rules


def test_tracing_sees_every_call():
    pm, hooks = _bare_hooks()
    log = _Calls()
    pm.register(_voter(log, "allow", Verdict.ALLOW))
    traced: list[str] = []
    undo = pm.add_hookcall_monitoring(lambda name, impls, kwargs: traced.append(name), lambda *args: None)
    hooks.authorize(_session_info(), Request(_message(), "select"))
    hooks.record(events.SessionEnded(reason="x"))
    assert traced == ["bastion_authorize", "bastion_record"]
    undo()
    hooks.authorize(_session_info(), Request(_message(), "select"))
    assert traced == ["bastion_authorize", "bastion_record"]


def test_record_and_text_transform_hooks():
    pm, hooks = _bare_hooks()
    recorded = []

    class Observer:
        @hookimpl
        def bastion_record(self, event):
            recorded.append(event)

        @hookimpl
        def bastion_text_transform(self, session, text):
            return text.replace("secret", "******")

    assert not hooks.has_text_transforms()
    hooks.record(events.SessionEnded(reason="before"))  # no implementation: nothing happens
    pm.register(Observer())
    assert hooks.has_text_transforms()
    event = events.SessionEnded(reason="x")
    hooks.record(event)
    assert recorded == [event]
    assert hooks.text_transform(_session_info(), "a secret") == "a ******"


# --- Decision.combine of one decision ---------------------------------------------------------------

_names = st.sampled_from(["a", "b", "c"])
_decisions = st.builds(
    Decision,
    verdict=st.sampled_from(list(Verdict)),
    rules=st.lists(_names, max_size=3).map(tuple),
    reasons=st.lists(_names, max_size=3).map(tuple),
    policy_version=st.sampled_from(["", "v1", "v1,v2"]),
    reviews=st.lists(st.builds(ReviewRequirement, rule=_names), max_size=2).map(tuple),
    enforced=st.booleans(),
)


def _combine_in_general(decision: Decision) -> Decision:
    """Decision.combine's general path, reached with a second decision that changes nothing."""
    return Decision.combine([decision, Decision(decision.verdict, enforced=False)])


@given(_decisions)
@settings(max_examples=300)
def test_combining_one_decision_is_the_general_path(decision):
    combined = Decision.combine([decision])
    if decision.enforced:
        assert combined == _combine_in_general(decision)
    else:
        assert combined.verdict is Verdict.DENY and combined.rules == ("default-deny",)


# --- the audit trail's masker ---------------------------------------------------------------------

CUSTOM = (
    RecognizerRule("mrn", r"MRN-[0-9]{6}"),
    RecognizerRule("surname", r"\b[A-Z]{2}[a-z]+son\b"),  # letters only: no digit needed
)

_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789-./ ()+@:\"", max_size=24),
    st.sampled_from(
        [
            "0",
            "-1234",
            "123-45-6789",
            "ssn 123456789",
            "jane@example.org",
            "MRN-123456",
            "ABjohnson",
            'Key (ssn)=(123-45-6789) already exists',
            'invalid input syntax for type integer: "abc"',
            "Failing row contains (1, Jane, 1980-02-03).",
            "192.168.1.20",
            "4111 1111 1111 1111",
        ]
    ),
    st.tuples(st.text(max_size=10), st.sampled_from(["123-45-6789", "MRN-000001", "(x)", '"q"']), st.text(max_size=10)).map("".join),
)


@given(_text, st.sampled_from([(), CUSTOM]))
@settings(max_examples=500)
def test_the_compiled_masker_is_mask_text(text, custom):
    assert TextMasker(custom)(text) == mask_text(text, custom=custom)[0]


def _session(policy) -> Session:
    target = types.SimpleNamespace(
        config=TargetConfig(name="db", protocol="postgres", listen=Address("127.0.0.1", 0), upstream=Address("127.0.0.1", 0)),
        state={},
    )
    runtime = types.SimpleNamespace(policy=policy, hooks=None)
    return Session(runtime, target, "127.0.0.1:1")


def test_recorded_rows_are_masked_by_every_recognizer_even_letters_only():
    session = _session(types.SimpleNamespace(recognizers=CUSTOM))
    rows = events.ResultRows(session_id="s", request_no=1, first_row=0, rows=(("0", None, "ABjohnson", "123-45-6789", "plain"),))
    recorded = session._for_the_record(rows)
    assert recorded.rows == (("0", None, "[REDACTED]", "[REDACTED]", "plain"),)


def test_a_record_with_nothing_to_mask_is_kept_as_it_is():
    session = _session(types.SimpleNamespace(recognizers=()))
    rows = events.ResultRows(session_id="s", request_no=1, first_row=0, rows=(("0", None, "plain"),))
    assert session._for_the_record(rows) is rows
    response = events.ResponseCompleted(session_id="s", request_no=1, status="error", error_message="ssn 123-45-6789 is bad")
    assert session._for_the_record(response).error_message == "ssn [REDACTED] is bad"


def test_the_record_masker_follows_the_sessions_policy():
    session = _session(types.SimpleNamespace(recognizers=()))
    rows = events.ResultRows(session_id="s", request_no=1, first_row=0, rows=(("MRN-123456",),))
    assert session._for_the_record(rows).rows == (("MRN-123456",),)
    session._info = session._info.__class__(
        id=session.id, target=session._info.target, client="c", policy=types.SimpleNamespace(recognizers=CUSTOM)
    )
    assert session._for_the_record(rows).rows == (("[REDACTED]",),)


# --- metrics ------------------------------------------------------------------------------------


def _samples(text: bytes) -> set[str]:
    """The exposition's lines, without HELP/TYPE comments and created timestamps' values."""
    lines = set()
    for line in text.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        name_and_labels, _, value = line.rpartition(" ")
        lines.add(name_and_labels if "_created" in name_and_labels else line)
    return lines


def test_tallied_counters_are_exposed_as_prometheus_counters():
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from bastion.core.metrics import Metrics

    metrics = Metrics()
    reference = CollectorRegistry()
    requests = Counter("bastion_requests", "Statement-bearing messages judged", ["target", "verdict"], registry=reference)
    records = Counter("bastion_audit_records", "Audit events recorded", ["type"], registry=reference)
    for target, verdict in [("db", "allow"), ("db", "allow"), ("db", "deny"), ("other", "allow")]:
        metrics.count_request(target, verdict)
        requests.labels(target, verdict).inc()
    for event_type in ["request", "response", "request"]:
        metrics.count_record(event_type)
        records.labels(event_type).inc()
    rendered = metrics.render().decode()
    assert _samples(generate_latest(reference)) <= _samples(rendered.encode())
    assert 'bastion_requests_total{target="db",verdict="allow"} 2.0' in rendered
    assert "# TYPE bastion_audit_records_total counter" in rendered
    assert metrics.requests.value("db", "deny") == 1


# --- what the request record keeps ----------------------------------------------------------------

_findings = st.lists(
    st.builds(Finding, name=st.sampled_from(["no-limit", "no-where", "x"]), weight=st.integers(0, 60), sentence=st.sampled_from(["s", "t"])),
    max_size=4,
).map(tuple)
_tables = st.frozensets(st.sampled_from(["public.a", "public.b", "s.c"]), max_size=3)


@given(
    st.builds(
        Request,
        message=st.just(Message("postgres", "statement", text="x", dialect="postgres")),
        action=st.sampled_from(["select", "delete"]),
        tables_read=_tables,
        tables_written=_tables,
        findings=_findings,
        fingerprint=st.sampled_from(["", "select ?"]),
        redacted_text=st.sampled_from(["", "select ?"]),
    )
)
@settings(max_examples=300)
def test_one_request_is_described_as_the_general_path_describes_it(request):
    from bastion.core.session import _described

    general = _described([request, request])  # the same request twice: the general path, same fields
    alone = _described([request])
    assert alone == {
        **general,
        "statements": general["statements"][:1],
        "actions": general["actions"][:1],
        "fingerprints": general["fingerprints"][:1],
    }


@given(st.text(max_size=80).filter(lambda t: "(" not in t and '"' not in t))
@settings(max_examples=300)
def test_text_without_parentheses_or_quotes_echoes_no_value(text):
    """The masker skips the echoed-value patterns for such text: each needs one of the two."""
    from bastion.policies.masking import _redact_echoed_values

    assert _redact_echoed_values(text) == (text, 0)


@given(st.sampled_from(['Key (ssn)=(', "Failing row contains (", 'for type integer: "', 'value "', 'out of range: "']), st.text(max_size=30))
@settings(max_examples=200)
def test_echoed_values_are_found_after_the_skip_test(prefix, rest):
    text = f"{prefix}{rest}"
    assert TextMasker()(text) == mask_text(text)[0]


def test_a_session_describes_a_repeated_shape_as_it_describes_a_new_one():
    from bastion.core.session import _described

    session = _session(types.SimpleNamespace(recognizers=()))
    message = Message("postgres", "statement", text="x", dialect="postgres")
    no_limit = (Finding("no-limit", 5, "reads without a LIMIT"),)
    first = Request(message, "select", tables_read={"public.a"}, findings=no_limit, fingerprint="f", redacted_text="select ?")
    same_shape = Request(message, "select", tables_read=first.tables_read, findings=first.findings, fingerprint=first.fingerprint, redacted_text=first.redacted_text)
    other = Request(message, "select", tables_read={"public.a"}, findings=(), fingerprint="f", redacted_text="select ?")
    for request in (first, same_shape, other, first, other):
        assert session._described([request]) == _described([request])
    assert session._described([first, other]) == _described([first, other])


def test_the_facade_passes_arguments_in_the_specs_order():
    pm, hooks = _bare_hooks()
    for direct in (hooks._parse, hooks._authorize, hooks._transform, hooks._text_transform, hooks._record):
        assert direct._names == tuple(direct._caller.spec.argnames)
