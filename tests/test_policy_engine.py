"""The authorization engine (every rule kind, fail closed), masking rule selection, golden cases.

Requests are built by hand (no SQL analysis): action, tables, columns and findings are what the
engine looks at. The policy is tests/fixtures/policies/clinic.toml unless a test says otherwise.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.policies.bundle import load_policy_files, merge, parse_bundle, shipped_bundle
from bastion.policies.engine import evaluate, evaluate_all, masking_rules_for
from bastion.policies.findings import FINDINGS
from bastion.policies.golden import (
    GoldenError,
    Outcome,
    check_case,
    load_golden_file,
    parse_golden,
    run_cases,
    summary,
)
from bastion.policies.model import Decision, Finding, Identity, Message, Request, Verdict

FIXTURES = Path(__file__).parent / "fixtures" / "policies"
POLICY = load_policy_files([FIXTURES / "clinic.toml"])
VERSION = POLICY.version

NIGHTLY = Identity("static-token", "ci-nightly", groups={"analytics-jobs"})
ETL_MAIN = Identity("oidc:github", "repo:acme/etl:ref:refs/heads/main")
ETL_BRANCH = Identity("oidc:github", "repo:acme/etl:ref:refs/heads/feature")
LEGACY = Identity("static-token", "svc-legacy")
STRANGER = Identity("static-token", "someone", groups={"visitors"})


def request(action: str, read=(), written=(), columns=(), findings=(), kind: str = "statement") -> Request:
    return Request(
        message=Message("postgres", kind, "<statement>"),
        action=action,
        tables_read=read,
        tables_written=written,
        columns_read=columns,
        findings=tuple(Finding(name, FINDINGS[name].weight, FINDINGS[name].sentence) for name in findings),
    )


def decide(identity: Identity, req: Request, target: str = "clinic-db", policy=POLICY) -> Decision:
    return evaluate(policy, identity, target, req)


def policy_of(text: str, source: str = "t.toml"):
    return merge([parse_bundle(textwrap.dedent(text), source)])


# --- grants ------------------------------------------------------------------------------------------


def test_a_grant_allows_what_it_lists_for_its_group() -> None:
    decision = decide(NIGHTLY, request("select", read={"public.visits"}, columns={"public.visits.id"}))
    assert decision == Decision(Verdict.ALLOW, ("clinic:grant:nightly-extract",), ('grant "nightly-extract" allows select on clinic-db',), VERSION)


def test_default_deny_for_an_identity_no_grant_names() -> None:
    decision = decide(STRANGER, request("select", read={"public.visits"}))
    assert decision.verdict is Verdict.DENY
    assert decision.rules == ("default-deny",)
    assert decision.reasons == ("no grant gives this identity access to clinic-db",)
    assert decision.policy_version == VERSION


def test_a_grant_covers_only_its_targets() -> None:
    assert decide(NIGHTLY, request("select", read={"public.visits"}), target="other-db").verdict is Verdict.DENY
    assert decide(NIGHTLY, request("select", read={"reporting.daily"}), target="reporting-eu").rules == ("clinic:grant:reporting-read",)


def test_statements_outside_the_grant_are_denied_with_the_reason() -> None:
    decision = decide(NIGHTLY, request("delete", written={"public.visits"}))
    assert decision.verdict is Verdict.DENY
    assert 'grant "nightly-extract" does not allow delete' in decision.summary


def test_table_globs_and_case() -> None:
    assert decide(NIGHTLY, request("select", read={"reporting.daily", "REPORTING.Weekly"}), target="reporting-eu").verdict is Verdict.ALLOW
    decision = decide(NIGHTLY, request("select", read={"reporting.daily", "billing.invoices"}), target="reporting-eu")
    assert decision.verdict is Verdict.DENY
    assert 'grant "reporting-read" does not cover the table billing.invoices' in decision.summary


def test_tables_written_must_be_covered_too() -> None:
    etl = request("insert", read={"staging.raw"}, written={"public.patients"})
    decision = decide(ETL_MAIN, etl)
    assert decision.verdict is Verdict.DENY and "does not cover the table public.patients" in decision.summary
    assert decide(ETL_MAIN, request("insert", read={"staging.raw"}, written={"staging.clean"})).verdict is Verdict.ALLOW


def test_column_allowlist() -> None:
    allowed = request("select", read={"public.patients"}, columns={"public.patients.id", "public.patients.name"})
    assert decide(NIGHTLY, allowed).verdict is Verdict.REVIEW  # allowed, and bulk-patients holds patients reads
    ssn = request("select", read={"public.patients"}, columns={"public.patients.id", "public.patients.ssn"})
    decision = decide(NIGHTLY, ssn)
    assert decision.verdict is Verdict.DENY
    assert 'grant "nightly-extract" does not cover the column public.patients.ssn' in decision.summary
    assert decide(NIGHTLY, request("select", read={"public.visits"}, columns={"public.visits.anything"})).verdict is Verdict.ALLOW


def unlisted_columns(req: Request) -> Request:
    """What the analysis reports for SELECT * without a catalog: columns it cannot name."""
    return attrs.evolve(req, columns_complete=False)


def test_a_column_allowlist_covers_unlisted_columns_only_of_tables_it_allows_whole() -> None:
    patients = request("select", read={"public.patients"}, columns={"public.patients.id"})
    decision = decide(NIGHTLY, unlisted_columns(patients))
    assert decision.verdict is Verdict.DENY
    assert 'grant "nightly-extract" allows only some columns of public.patients, and the statement reads columns Bastion cannot list' in decision.summary
    assert decide(NIGHTLY, attrs.evolve(patients, columns_complete=True)).verdict is Verdict.REVIEW
    visits = request("select", read={"public.visits"})
    assert decide(NIGHTLY, unlisted_columns(visits)).verdict is Verdict.ALLOW  # columns = ["public.visits.*"]
    both = request("select", read={"public.visits", "public.patients"})
    assert decide(NIGHTLY, unlisted_columns(both)).verdict is Verdict.DENY
    reporting = request("select", read={"reporting.daily"})
    assert decide(NIGHTLY, unlisted_columns(reporting), target="reporting-eu").verdict is Verdict.ALLOW  # no allowlist


@pytest.mark.parametrize(
    ("patterns", "covered"),
    [
        (["public.visits.*"], True),
        (["public.*"], True),
        (["*"], True),
        (["*.visits.*"], True),
        (["PUBLIC.Visits.*"], True),
        (["public.visits.a*"], False),
        (["public.visits.?"], False),
        (["public.visits.id"], False),
        (["*.email"], False),
        (["public.*.id"], False),
    ],
)
def test_which_column_globs_cover_every_column_of_a_table(patterns: list[str], covered: bool) -> None:
    from bastion.policies.bundle import Patterns

    assert Patterns(tuple(patterns)).cover_every_column_of("public.visits") is covered


def test_grant_by_subject_glob_and_provider_all_lists_must_match() -> None:
    staging = request("select", read={"staging.raw"})
    assert decide(ETL_BRANCH, staging).rules == ("clinic:grant:etl-writer",)
    wrong_provider = attrs.evolve(ETL_BRANCH, provider="static-token")
    assert decide(wrong_provider, staging).verdict is Verdict.DENY
    wrong_repo = attrs.evolve(ETL_BRANCH, subject="repo:evil/etl:ref:refs/heads/main")
    assert decide(wrong_repo, staging).verdict is Verdict.DENY


def test_connect_is_allowed_by_any_grant_covering_the_target() -> None:
    assert decide(NIGHTLY, request("connect", kind="connect")).reasons == ('grant "nightly-extract" allows access to clinic-db',)
    assert decide(NIGHTLY, request("connect", kind="connect"), target="reporting-us").rules == ("clinic:grant:reporting-read",)
    assert decide(NIGHTLY, request("connect", kind="connect"), target="billing-db").verdict is Verdict.DENY
    assert decide(STRANGER, request("connect", kind="connect")).verdict is Verdict.DENY


def test_capabilities_are_needed_by_action_kind_or_finding() -> None:
    fast_path = request("function-call", kind="function-call", findings={"function-call"})
    assert decide(LEGACY, fast_path).rules[0] == "clinic:grant:fast-path"
    assert decide(LEGACY, fast_path).verdict is Verdict.ALLOW
    decision = decide(NIGHTLY, fast_path)
    assert decision.verdict is Verdict.DENY and "lacks the function-call capability" in decision.summary
    # not a catalogue finding: a protocol handler names the capability it needs
    options = attrs.evolve(request("connect", kind="connect"), findings=(Finding("startup-options", 0, "the client sent startup options"),))
    assert decide(LEGACY, options).verdict is Verdict.ALLOW
    assert decide(NIGHTLY, options).verdict is Verdict.DENY


def test_a_star_grant_does_not_imply_capabilities() -> None:
    call = request("function-call", kind="function-call")
    assert decide(NIGHTLY, call, target="reporting-eu").verdict is Verdict.DENY


def test_unknown_statements_are_denied_even_by_star_grants() -> None:
    unknown = Request.unknown(Message("postgres", "statement", "???"), "cannot parse")
    decision = decide(NIGHTLY, unknown, target="reporting-eu")
    assert decision.verdict is Verdict.DENY
    assert decision.reasons[0] == "the statement could not be classified, and no grant allows unclassified statements"


def test_a_grant_that_explicitly_lists_unknown_allows_it_with_a_load_warning() -> None:
    policy = policy_of('[[grant]]\nname = "g"\nidentities = { groups = ["x"] }\ntargets = ["db"]\nstatements = ["unknown"]\n')
    assert policy.warnings
    unknown = request("unknown")
    assert evaluate(policy, Identity("p", "s", groups={"x"}), "db", unknown).verdict is Verdict.ALLOW


# --- guardrails ---------------------------------------------------------------------------------------


def test_a_guardrail_denies_what_a_grant_allows() -> None:
    decision = decide(NIGHTLY, request("select", read={"public.visits"}, findings={"truncate"}))
    assert decision.verdict is Verdict.DENY
    assert decision.rules[0] == "clinic:guardrail:no-drop"
    assert 'guardrail "no-drop": the statement truncates a table' in decision.reasons
    assert "clinic:grant:nightly-extract" in decision.rules  # context: the grant that would have allowed it


def test_a_review_guardrail_holds_with_its_requirement() -> None:
    decision = decide(NIGHTLY, request("select", read={"public.visits"}, findings={"procedural-code"}))
    assert decision.verdict is Verdict.REVIEW
    (requirement,) = decision.reviews
    assert requirement.rule == "clinic:guardrail:hold-procedural"
    assert (requirement.approver_groups, requirement.timeout_seconds, requirement.min_approvals, requirement.rows_over) == (frozenset({"dba"}), 600.0, 2, None)


def test_a_dry_run_guardrail_is_recorded_but_changes_nothing() -> None:
    decision = decide(NIGHTLY, request("select", read={"public.visits"}, findings={"sleep"}))
    assert decision.verdict is Verdict.ALLOW
    assert decision.rules == ("clinic:grant:nightly-extract", "clinic:guardrail:sleep-dry-run (not enforced)")
    dry = [d for d in evaluate_all(POLICY, NIGHTLY, "clinic-db", request("select", findings={"sleep"})) if not d.enforced]
    assert [(d.verdict, d.rules) for d in dry] == [(Verdict.DENY, ("clinic:guardrail:sleep-dry-run",))]


def test_guardrail_scoping_by_target_identity_and_exemption() -> None:
    wipe = request("delete", written={"staging.raw"}, findings={"delete-without-where"})
    assert "clinic:guardrail:no-deletes-on-clinic" in decide(ETL_BRANCH, wipe).rules
    assert decide(ETL_BRANCH, wipe).verdict is Verdict.DENY
    main = decide(ETL_MAIN, wipe)  # exempt: only the review of staging writes and the risk score remain
    assert "clinic:guardrail:no-deletes-on-clinic" not in main.rules
    assert main.verdict is Verdict.REVIEW
    reporting = evaluate_all(POLICY, NIGHTLY, "reporting-eu", request("delete", written={"reporting.x"}, findings={"delete-without-where"}))
    assert "clinic:guardrail:no-deletes-on-clinic" not in {r for d in reporting for r in d.rules}


# --- reviews -------------------------------------------------------------------------------------------


def test_rows_over_review_reports_the_row_limit_and_window() -> None:
    decision = decide(NIGHTLY, request("select", read={"public.patients"}, columns={"public.patients.id"}))
    assert decision.verdict is Verdict.REVIEW
    (requirement,) = decision.reviews
    assert requirement.rule == "clinic:review:bulk-patients"
    assert (requirement.rows_over, requirement.max_window_seconds, requirement.timeout_seconds) == (1000, 3600.0, 900.0)
    assert requirement.approver_groups == frozenset({"privacy-officers"})
    assert 'review "bulk-patients": it touches public.patients; results pause for approval after 1000 rows' in decision.reasons


def test_review_conditions_must_all_hold() -> None:
    update = request("update", written={"staging.raw"})
    assert decide(ETL_MAIN, update).reviews[0].rule == "clinic:review:staging-writes"
    assert decide(ETL_MAIN, request("insert", written={"staging.raw"})).verdict is Verdict.ALLOW  # statement does not match
    risky = request("select", read={"staging.raw"}, findings={"no-limit", "multi-statement"})
    assert [r.rule for r in decide(ETL_MAIN, risky).reviews] == ["clinic:review:risky-selects"]
    assert decide(ETL_MAIN, request("select", read={"staging.raw"}, findings={"no-limit"})).verdict is Verdict.ALLOW  # risk 5 <= 10
    assert decide(ETL_MAIN, request("select", read={"staging.raw"}, findings={"multi-statement"})).verdict is Verdict.ALLOW  # 10: not above
    assert decide(ETL_MAIN, request("select", read={"staging.raw"}, findings={"sleep"})).verdict is Verdict.ALLOW  # risk 30, no such finding


def test_reviews_scoped_to_a_target_do_not_apply_elsewhere() -> None:
    decision = decide(NIGHTLY, request("update", written={"reporting.x"}), target="reporting-eu")
    assert decision.verdict is Verdict.ALLOW


def test_connect_is_never_held_by_reviews_without_an_explicit_statement() -> None:
    assert decide(NIGHTLY, request("connect", kind="connect")).verdict is Verdict.ALLOW
    policy = policy_of(
        """
        [[grant]]
        name = "g"
        identities = { groups = ["x"] }
        targets = ["db"]
        statements = ["select"]
        [[review]]
        name = "every-result"
        when = { rows_over = 5 }
        approvers = { groups = ["p"] }
        [[review]]
        name = "connecting"
        when = { statements = ["connect"] }
        approvers = { groups = ["p"] }
        """
    )
    member = Identity("p", "s", groups={"x"})
    assert [r.rule for r in evaluate(policy, member, "db", request("connect", kind="connect")).reviews] == ["t:review:connecting"]
    assert [r.rule for r in evaluate(policy, member, "db", request("select")).reviews] == ["t:review:every-result"]


def test_a_review_never_turns_an_ungranted_request_into_a_reviewable_one() -> None:
    decision = decide(STRANGER, request("select", read={"public.patients"}))
    assert decision.verdict is Verdict.DENY and decision.reviews == ()


# --- risk ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("findings", "verdict", "rule"),
    [
        ({"set-config"}, Verdict.ALLOW, None),  # 40
        ({"explain-analyze-write"}, Verdict.ALLOW, None),  # 60: not above 60
        ({"select-into", "sleep"}, Verdict.REVIEW, "clinic:risk:review"),  # 70
        ({"file-access"}, Verdict.REVIEW, "clinic:risk:review"),  # 90: not above 90
        ({"file-access", "sleep"}, Verdict.DENY, "clinic:risk:deny"),  # 120, capped at 100
    ],
)
def test_risk_thresholds(findings: set[str], verdict: Verdict, rule: str | None) -> None:
    decision = decide(NIGHTLY, request("select", read={"public.visits"}, findings=findings))
    assert decision.verdict is verdict
    if rule is None:
        assert not [r for r in decision.rules if ":risk:" in r]
    else:
        assert rule in decision.rules
    if verdict is Verdict.REVIEW:
        assert [(r.rule, r.timeout_seconds) for r in decision.reviews] == [(rule, 30.0)]


def test_risk_thresholds_of_every_bundle_apply() -> None:
    both = load_policy_files([FIXTURES / "clinic.toml", FIXTURES / "extra.toml"])
    decision = evaluate(both, NIGHTLY, "clinic-db", request("select", read={"public.visits"}, findings={"copy-file", "no-limit"}))  # 85
    assert decision.verdict is Verdict.DENY and "extra:risk:deny" in decision.rules
    assert decision.reasons[0] == "risk score 85 is above 80 (copy-file, no-limit)"


# --- combining, versions, failures ------------------------------------------------------------------------


def test_deny_beats_review_beats_allow_and_every_decision_names_the_version() -> None:
    both = request("select", read={"public.patients"}, columns={"public.patients.id"}, findings={"procedural-code", "drop"})
    parts = evaluate_all(POLICY, NIGHTLY, "clinic-db", both)
    assert {d.verdict for d in parts} == {Verdict.ALLOW, Verdict.REVIEW, Verdict.DENY}
    assert all(d.policy_version == VERSION for d in parts)
    decision = decide(NIGHTLY, both)
    assert decision.verdict is Verdict.DENY and decision.reviews == ()
    assert decision.policy_version == VERSION


@pytest.mark.parametrize(
    ("policy", "identity", "req"),
    [
        (None, NIGHTLY, request("select")),
        (POLICY, None, request("select")),
        (POLICY, NIGHTLY, attrs.evolve(request("select"), action=None)),
        (POLICY, NIGHTLY, attrs.evolve(request("select"), findings=(object(),))),
    ],
    ids=["no-policy", "no-identity", "no-action", "broken-finding"],
)
def test_any_failure_inside_evaluation_denies(policy, identity, req) -> None:
    decision = evaluate(policy, identity, "clinic-db", req)
    assert decision.verdict is Verdict.DENY
    assert decision.rules == ("policy-error",)
    assert decision.reasons[0].startswith("policy evaluation failed (") and decision.reasons[0].endswith("); denied to be safe")
    assert evaluate_all(policy, identity, "clinic-db", req) == (decision,)


def test_a_failure_in_a_rule_denies_with_the_policy_version(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_):
        raise RuntimeError("secret value 123-45-6789")

    fresh = load_policy_files([FIXTURES / "clinic.toml"])  # nothing remembered yet
    monkeypatch.setattr(type(fresh.grants[0].tables), "matches", explode)
    decision = decide(NIGHTLY, request("select", read={"public.visits"}), policy=fresh)
    assert decision.rules == ("policy-error",) and decision.policy_version == VERSION
    assert "6789" not in decision.summary  # the exception's message may quote data: never repeated


ACTIONS = st.sampled_from(["select", "insert", "update", "delete", "connect", "unknown", "function-call", "tcl"])
TABLES = st.frozensets(st.sampled_from(["public.patients", "public.visits", "staging.raw", "reporting.daily", "billing.invoices"]), max_size=3)
FINDING_SETS = st.frozensets(st.sampled_from(sorted(FINDINGS)), max_size=4)
IDENTITIES = st.sampled_from([NIGHTLY, ETL_MAIN, ETL_BRANCH, LEGACY, STRANGER])
TARGETS = st.sampled_from(["clinic-db", "reporting-eu", "elsewhere"])


@settings(max_examples=200, deadline=None)
@given(IDENTITIES, TARGETS, ACTIONS, TABLES, TABLES, FINDING_SETS)
def test_evaluate_is_the_combination_of_the_individual_decisions(identity, target, action, read, written, findings) -> None:
    req = request(action, read=read, written=written, findings=findings)
    assert evaluate(POLICY, identity, target, req) == Decision.combine(evaluate_all(POLICY, identity, target, req))


@settings(max_examples=200, deadline=None)
@given(IDENTITIES, TARGETS, ACTIONS, TABLES, FINDING_SETS, FINDING_SETS)
def test_more_findings_never_weaken_a_decision(identity, target, action, read, findings, more) -> None:
    fewer = decide(identity, request(action, read=read, findings=findings), target)
    stronger = decide(identity, request(action, read=read, findings=findings | more), target)
    assert stronger.verdict.rank >= fewer.verdict.rank


@settings(max_examples=100, deadline=None)
@given(TARGETS, ACTIONS, TABLES, FINDING_SETS)
def test_an_identity_no_grant_names_is_never_allowed(target, action, read, findings) -> None:
    assert decide(STRANGER, request(action, read=read, findings=findings), target).verdict is Verdict.DENY


def test_repeated_evaluation_gives_equal_decisions() -> None:
    req = request("select", read={"public.visits"})
    assert decide(NIGHTLY, req) == decide(NIGHTLY, req) == decide(attrs.evolve(NIGHTLY, token_id="another-token"), req)


def test_remembered_decisions_are_told_apart_by_everything_a_decision_depends_on() -> None:
    policy = load_policy_files([FIXTURES / "clinic.toml"])
    visits = request("select", read={"public.visits"})
    assert decide(NIGHTLY, visits, policy=policy).verdict is Verdict.ALLOW
    assert decide(attrs.evolve(NIGHTLY, groups={"visitors"}), visits, policy=policy).verdict is Verdict.DENY
    assert decide(attrs.evolve(NIGHTLY, provider="other"), request("select", read={"staging.raw"}), policy=policy).verdict is Verdict.DENY
    assert decide(NIGHTLY, visits, target="reporting-eu", policy=policy).verdict is Verdict.DENY
    assert decide(NIGHTLY, attrs.evolve(visits, action="update"), policy=policy).verdict is Verdict.DENY
    assert decide(NIGHTLY, attrs.evolve(visits, tables_written={"public.x"}), policy=policy).verdict is Verdict.DENY
    assert decide(NIGHTLY, attrs.evolve(visits, columns_read={"public.patients.ssn"}), policy=policy).verdict is Verdict.DENY
    assert decide(NIGHTLY, attrs.evolve(visits, message=Message("postgres", "function-call")), policy=policy).verdict is Verdict.DENY
    light = attrs.evolve(visits, findings=(Finding("select-into", 10, ""),))
    heavy = attrs.evolve(visits, findings=(Finding("select-into", 95, ""),))
    assert [decide(NIGHTLY, r, policy=policy).verdict for r in (light, heavy, light)] == [Verdict.ALLOW, Verdict.DENY, Verdict.ALLOW]


# --- masking rules ---------------------------------------------------------------------------------------


def test_masking_rules_for_applies_exemptions_and_targets() -> None:
    rules, recognizers, masking = masking_rules_for(POLICY, NIGHTLY, "clinic-db")
    assert [r.name for r in rules] == ["clinic:mask:ssn", "clinic:mask:email", "clinic:mask:notes"]
    assert rules[0].strategy == "partial" and rules[0].columns == ("public.patients.ssn", "*.social_security_number")
    assert [r.name for r in recognizers] == ["mrn"]
    assert (masking.untraced, masking.default_recognizers) == ("mask-all", ("email",))
    officer = Identity("static-token", "alice", groups={"privacy-officers"})
    assert [r.name for r in masking_rules_for(POLICY, officer, "clinic-db")[0]] == ["clinic:mask:email", "clinic:mask:notes"]
    assert [r.name for r in masking_rules_for(POLICY, NIGHTLY, "reporting-eu")[0]] == ["clinic:mask:ssn", "clinic:mask:email"]


# --- the shipped bundles behave as their comments say -------------------------------------------------------


SHIPPED = load_policy_files([shipped_bundle("hipaa-baseline"), shipped_bundle("read-only-analytics")])
ANALYST = Identity("static-token", "ci-report", groups={"analytics-jobs"})


@pytest.mark.parametrize(
    ("req", "verdict", "rule"),
    [
        (request("connect", kind="connect"), Verdict.ALLOW, "read-only-analytics:grant:analytics-read"),
        (request("select", read={"public.visits"}), Verdict.ALLOW, "read-only-analytics:grant:analytics-read"),
        (request("tcl"), Verdict.ALLOW, "read-only-analytics:grant:analytics-read"),
        (request("select", read={"public.patients"}), Verdict.REVIEW, "read-only-analytics:review:bulk-phi-export"),
        (request("select", read={"clinic.patient_notes"}), Verdict.REVIEW, "read-only-analytics:review:bulk-phi-export"),
        (request("insert", written={"public.visits"}), Verdict.DENY, "default-deny"),
        (request("set", findings={"set-role"}), Verdict.DENY, "hipaa-baseline:guardrail:no-role-changes"),
        (request("ddl", findings={"drop", "ddl"}), Verdict.DENY, "hipaa-baseline:guardrail:no-destructive-writes"),
        (request("select", read={"public.visits"}, findings={"file-access"}), Verdict.DENY, "hipaa-baseline:guardrail:no-server-side-files"),
        (request("select", read={"public.visits"}, findings={"dangerous-function"}), Verdict.DENY, "hipaa-baseline:guardrail:no-dangerous-functions"),
        (request("copy", findings={"copy-program"}), Verdict.DENY, "hipaa-baseline:guardrail:no-server-side-files"),
        (Request.unknown(Message("postgres", "statement", "??"), "cannot parse"), Verdict.DENY, "hipaa-baseline:guardrail:no-unknown-statements"),
        (request("select", read={"public.visits"}, findings={"sleep"}), Verdict.ALLOW, "hipaa-baseline:guardrail:no-deliberate-delays (not enforced)"),
        (request("explain", findings={"explain-analyze-write"}), Verdict.REVIEW, "hipaa-baseline:guardrail:review-hidden-code"),
        (request("select", read={"public.visits"}, findings={"set-config", "sleep"}), Verdict.REVIEW, "hipaa-baseline:risk:review"),  # 70
    ],
)
def test_shipped_bundles_decide_as_documented(req: Request, verdict: Verdict, rule: str) -> None:
    decision = evaluate(SHIPPED, ANALYST, "warehouse", req)
    assert decision.verdict is verdict, decision
    assert rule in decision.rules


def test_shipped_bulk_review_pauses_results_after_1000_rows_for_privacy_officers() -> None:
    (requirement,) = evaluate(SHIPPED, ANALYST, "warehouse", request("select", read={"public.patients"})).reviews
    assert (requirement.rows_over, requirement.approver_groups, requirement.timeout_seconds, requirement.max_window_seconds) == (
        1000, frozenset({"privacy-officers"}), 900.0, 3600.0,
    )  # fmt: skip


def test_hipaa_baseline_alone_grants_nothing() -> None:
    baseline = load_policy_files([shipped_bundle("hipaa-baseline")])
    assert evaluate(baseline, ANALYST, "warehouse", request("connect", kind="connect")).verdict is Verdict.DENY
    assert evaluate(baseline, ANALYST, "warehouse", request("select", read={"public.visits"})).verdict is Verdict.DENY


def test_shipped_masks_cover_common_phi_columns_for_everyone() -> None:
    rules, _, masking = masking_rules_for(SHIPPED, ANALYST, "warehouse")
    by_column = {column: rule.strategy for rule in rules for column in rule.columns}
    assert (by_column["*.ssn"], by_column["*.email"], by_column["*.phone"], by_column["*.mrn"]) == ("partial", "partial", "partial", "hash")
    assert by_column["*.date_of_birth"] == by_column["*.dob"] == "partial"
    assert masking.untraced == "mask-all"


def test_the_shipped_masks_leave_only_what_safe_harbor_allows() -> None:
    from bastion.policies.masking import compile_plan
    from bastion.policies.model import Column, ResultShape

    rules, recognizers, masking = masking_rules_for(SHIPPED, ANALYST, "warehouse")
    shape = ResultShape((Column("dob", type_oid=25, table="public.patients", sources=frozenset({"public.patients.dob"})),
                         Column("ssn", type_oid=25, table="public.patients", sources=frozenset({"public.patients.ssn"}))))
    plan = compile_plan(shape, rules, recognizers, masking, hash_key=b"k" * 32)
    row = [b"1980-02-03", b"123-45-6789"]
    plan.apply(row)
    assert row == [b"1980-**-**", b"***-**-6789"]


# --- golden cases -------------------------------------------------------------------------------------------


# what an analysis of each golden statement would say, so these tests need no SQL parser
GOLDEN_REQUESTS = {
    "SELECT id FROM public.visits LIMIT 10": request("select", read={"public.visits"}, columns={"public.visits.id"}),
    "SELECT * FROM billing.invoices": request("select", read={"billing.invoices"}, findings={"no-limit"}),
    "DROP TABLE staging.load": request("ddl", written={"staging.load"}, findings={"drop", "ddl"}),
    "SELECT pg_sleep(1) FROM public.visits LIMIT 1": request("select", read={"public.visits"}, findings={"sleep"}),
}


def golden_outcome(case) -> Outcome:
    req = GOLDEN_REQUESTS[case.statement]
    return Outcome(evaluate(POLICY, case.identity, case.target, req), tuple(f.name for f in req.findings))


def test_golden_fixture_parses_and_passes() -> None:
    cases = load_golden_file(FIXTURES / "golden.toml")
    assert [c.name for c in cases] == ["nightly job reads visits", "nightly job cannot read billing", "drop is refused even for the etl", "sleeping is only recorded"]
    assert cases[2].identity == Identity("oidc:github", "repo:acme/etl:ref:refs/heads/main")
    assert cases[0].identity == Identity("golden", "ci-nightly", groups={"analytics-jobs"})
    assert (cases[1].dialect, cases[1].protocol, cases[1].expect, cases[1].where) == ("postgres", "postgres", Verdict.DENY, "golden.toml: case[1]")
    results = run_cases(cases, golden_outcome)
    assert [r.passed for r in results] == [True] * 4, [r.line() for r in results]
    assert summary(results) == "4 of 4 cases passed"
    assert results[0].line() == "PASS nightly job reads visits: allow as expected (clinic:grant:nightly-extract)"


def test_golden_failures_say_what_differed() -> None:
    (case,) = parse_golden(
        textwrap.dedent(
            """
            [[case]]
            name = "expects too much"
            identity = { subject = "ci-nightly", groups = ["analytics-jobs"] }
            target = "clinic-db"
            statement = "SELECT * FROM billing.invoices"
            expect = "allow"
            rules = ["clinic:grant:nightly-extract"]
            findings = ["no-limit", "sleep"]
            """
        ),
        "mine.toml",
    )
    (result,) = run_cases([case], golden_outcome)
    assert not result.passed
    assert result.sentence.startswith("expected allow, got deny (no grant allows select on clinic-db: ")
    assert "expected rule clinic:grant:nightly-extract among default-deny" in result.sentence
    assert result.sentence.endswith("expected finding sleep among no-limit")
    bare = check_case(case, golden_outcome(case).decision)
    assert "the case expects findings, but the runner reported none to compare" in bare.sentence
    assert summary([result, bare]) == "0 of 2 cases passed, 2 failed"


def test_a_case_that_raises_fails_and_the_others_still_run() -> None:
    cases = load_golden_file(FIXTURES / "golden.toml")

    def flaky(case):
        if case.name.startswith("drop"):
            raise ValueError("the analysis broke")
        return golden_outcome(case)

    results = run_cases(cases, flaky)
    assert [r.passed for r in results] == [True, True, False, True]
    assert results[2].sentence == "deciding the case failed (ValueError: the analysis broke)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[case]\n", "g.toml: not valid TOML:"),
        ("", "g.toml: no [[case]] sections: nothing to test"),
        ("[cases]\n", 'g.toml: cases: unknown section "cases"'),
        ('[[case]]\nname = "a"\n', "g.toml: case[0].identity: required key is missing"),
        ('[[case]]\nname = "a"\nidentity = { subject = "s", group = ["x"] }\ntarget = "t"\nstatement = "s"\nexpect = "allow"\n', "g.toml: case[0].identity: unknown key group"),
        ('[[case]]\nname = "a"\nidentity = { subject = "s" }\ntarget = "t"\nstatement = "s"\nexpect = "permit"\n', 'g.toml: case[0].expect: expected "allow", "review" or "deny", got "permit"'),
        ('[[case]]\nname = "a"\nidentity = { subject = "s" }\ntarget = "t"\nstatement = "s"\nexpect = "allow"\nrules = "x"\n', "g.toml: case[0].rules: expected a list of strings"),
        ('[[case]]\nname = "a"\nidentity = { subject = "" }\ntarget = "t"\nstatement = "s"\nexpect = "allow"\n', "g.toml: case[0].identity.subject: the subject cannot be empty"),
        ('[[case]]\nname = "a"\nidentity = { subject = "s" }\ntarget = "t"\nstatement = "s"\nexpect = "allow"\n' * 2, 'g.toml: case[1].name: another case is already called "a" (case[0])'),
    ],
)
def test_golden_file_errors_are_located(text: str, expected: str) -> None:
    with pytest.raises(GoldenError) as caught:
        parse_golden(text, "g.toml")
    assert any(error.startswith(expected) for error in caught.value.errors), caught.value.errors


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["case", "x"]), st.lists(st.dictionaries(st.sampled_from(["name", "identity", "target", "statement", "expect", "rules"]), st.one_of(st.text(max_size=5), st.integers(), st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.sampled_from(["subject", "groups"]), st.text(max_size=3))), max_size=6), max_size=2), max_size=2))
def test_any_golden_data_either_parses_or_fails_with_located_sentences(data: dict) -> None:
    from bastion.policies.golden import golden_from_data

    try:
        golden_from_data(data, "g.toml")
    except GoldenError as exc:
        assert exc.errors and all(e.startswith("g.toml: ") for e in exc.errors)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.from_regex(r"(\*|[a-z]{1,3}|\?|\[ab\])(\.(\*|[a-z]{1,3}|\?|\[ab\])){0,3}", fullmatch=True), min_size=1, max_size=3),
    st.text(alphabet="abxyz_.*?", min_size=0, max_size=6),
)
def test_a_table_covered_whole_means_every_column_name_of_it_matches(patterns: list[str], column: str) -> None:
    from bastion.policies.bundle import Patterns

    globs = Patterns(tuple(patterns))
    if globs.cover_every_column_of("ab.x"):
        assert globs.matches(f"ab.x.{column}")
