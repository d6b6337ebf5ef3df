"""Policy bundles: loading, located errors, merging, versions, target checks, shipped bundles."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.policies import bundle
from bastion.policies.bundle import (
    BundleError,
    Patterns,
    glob_problem,
    load_bundle_file,
    load_policy_files,
    merge,
    parse_bundle,
    parse_duration,
    shipped_bundle,
)
from bastion.policies.findings import FINDINGS
from bastion.policies.model import Identity, Verdict

FIXTURES = Path(__file__).parent / "fixtures" / "policies"

GRANT = """
[[grant]]
name = "g"
identities = { groups = ["analysts"] }
targets = ["db"]
statements = ["select"]
"""


def parse(text: str, source: str = "hipaa.toml") -> bundle.Bundle:
    return parse_bundle(textwrap.dedent(text), source)


def errors_of(text: str, source: str = "hipaa.toml") -> list[str]:
    with pytest.raises(BundleError) as caught:
        merge([parse(text, source)])
    return list(caught.value.errors)


# --- every error kind, with its location ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("[[grant]\nname = 1", "hipaa.toml: not valid TOML:", id="invalid-toml"),
        pytest.param("[[grants]]\nname = 'g'", 'hipaa.toml: grants: unknown section "grants" (did you mean "grant"?', id="unknown-section"),
        pytest.param("[grant]\nname = 'g'", "hipaa.toml: grant: expected [[grant]] sections (an array of tables)", id="table-not-array"),
        pytest.param(GRANT.replace('name = "g"', "name = 3"), "hipaa.toml: grant[0].name: expected a string, got 3", id="wrong-type-name"),
        pytest.param(GRANT.replace('["select"]', '"select"'), "hipaa.toml: grant[0].statements: expected a list", id="string-not-list"),
        pytest.param(GRANT.replace('["select"]', '["select", 7]'), "hipaa.toml: grant[0].statements[1]: expected a string, got 7", id="wrong-type-item"),
        pytest.param(GRANT + 'tabels = ["x"]', 'hipaa.toml: grant[0]: unknown key "tabels" (did you mean "tables"?', id="unknown-key"),
        pytest.param(GRANT.replace('identities = { groups = ["analysts"] }', 'identities = { groups = ["a"], teams = ["b"] }'), 'hipaa.toml: grant[0].identities: unknown key "teams"', id="unknown-nested-key"),
        pytest.param(GRANT.replace('targets = ["db"]', ""), "hipaa.toml: grant[0].targets: required key is missing", id="missing-key"),
        pytest.param(GRANT.replace('identities = { groups = ["analysts"] }', "identities = {}"), "hipaa.toml: grant[0].identities: give at least one of groups, subjects or providers", id="identities-empty"),
        pytest.param(GRANT.replace('groups = ["analysts"]', "groups = []"), "hipaa.toml: grant[0].identities.groups: an empty list matches nobody", id="identities-empty-list"),
        pytest.param(GRANT.replace('identities = { groups = ["analysts"] }', 'identities = "analysts"'), "hipaa.toml: grant[0].identities: expected a table", id="identities-not-table"),
        pytest.param(GRANT.replace('["select"]', '["sel ect!"]'), 'hipaa.toml: grant[0].statements[0]: "sel ect!" is not a statement kind', id="bad-statement"),
        pytest.param(GRANT.replace('["select"]', "[]"), "hipaa.toml: grant[0].statements: list at least one statement kind", id="no-statements"),
        pytest.param(GRANT + 'tables = ["public..patients"]', 'hipaa.toml: grant[0].tables[0]: "public..patients" has an empty part between dots', id="glob-empty-part"),
        pytest.param(GRANT + 'tables = ["public.[ab"]', 'hipaa.toml: grant[0].tables[0]: "public.[ab" has a "[" set that is not closed', id="glob-unclosed-set"),
        pytest.param(GRANT + 'tables = ["public.a]"]', 'hipaa.toml: grant[0].tables[0]: "public.a]" has a "]" without its "["', id="glob-stray-bracket"),
        pytest.param(GRANT + 'columns = ["public.patients. ssn"]', "hipaa.toml: grant[0].columns[0]: \"public.patients. ssn\" contains spaces", id="glob-space"),
        pytest.param(GRANT.replace('["db"]', '[""]'), "hipaa.toml: grant[0].targets[0]: a pattern cannot be empty", id="glob-empty"),
        pytest.param(GRANT + "tables = []", "hipaa.toml: grant[0].tables: an empty list would allow no table", id="tables-empty"),
        pytest.param(GRANT + 'capabilities = ["superuser"]', 'hipaa.toml: grant[0].capabilities[0]: unknown capability "superuser" (known: function-call, replication, startup-options)', id="unknown-capability"),
        pytest.param(GRANT + GRANT, 'hipaa.toml: grant[1].name: another grant is already called "g" (grant[0])', id="duplicate-name"),
        pytest.param(GRANT.replace('name = "g"', 'name = "a b"'), 'hipaa.toml: grant[0].name: "a b" is not a usable rule name', id="bad-rule-name"),
        pytest.param('[[guardrail]]\nname = "x"\ndetect = ["drop", "dorp"]', 'hipaa.toml: guardrail[0].detect[1]: unknown detector "dorp" (did you mean "drop"? known: unparsable, opaque-command, drop, truncate,', id="unknown-detector"),
        pytest.param('[[guardrail]]\nname = "x"\ndetect = []', "hipaa.toml: guardrail[0].detect: list at least one finding", id="no-detectors"),
        pytest.param('[[guardrail]]\nname = "x"\ndetect = ["drop"]\naction = "block"', 'hipaa.toml: guardrail[0].action: unknown guardrail action "block" (known: deny, review)', id="unknown-action"),
        pytest.param('[[guardrail]]\nname = "x"\ndetect = ["drop"]\nenforce = "no"', "hipaa.toml: guardrail[0].enforce: expected true or false, got 'no'", id="wrong-type-bool"),
        pytest.param('[[guardrail]]\nname = "x"\ndetect = ["drop"]\naction = "review"', 'hipaa.toml: guardrail[0].approvers: required with action = "review"', id="review-guardrail-without-approvers"),
        pytest.param('[[guardrail]]\nname = "x"\ndetect = ["drop"]\ntimeout = "5m"', 'hipaa.toml: guardrail[0].timeout: only applies to action = "review"', id="deny-guardrail-with-timeout"),
        pytest.param('[[review]]\nname = "r"\nwhen = { rows_over = 10 }\napprovers = { groups = ["p"] }\ntimeout = "5 minutes"', 'hipaa.toml: review[0].timeout: expected a duration such as "30s", "15m" or "2h", got "5 minutes"', id="bad-duration-text"),
        pytest.param('[[review]]\nname = "r"\nwhen = { rows_over = 10 }\napprovers = { groups = ["p"] }\nmax_window = "0s"', "hipaa.toml: review[0].max_window: a duration must be more than zero", id="bad-duration-zero"),
        pytest.param('[[review]]\nname = "r"\nwhen = { rows_over = 10 }\napprovers = { groups = ["p"] }\ntimeout = true', "hipaa.toml: review[0].timeout: expected a duration", id="bad-duration-bool"),
        pytest.param('[[review]]\nname = "r"\nwhen = {}\napprovers = { groups = ["p"] }', "hipaa.toml: review[0].when: give at least one condition", id="review-no-condition"),
        pytest.param('[[review]]\nname = "r"\nwhen = { rows_over = 0 }\napprovers = { groups = ["p"] }', "hipaa.toml: review[0].when.rows_over: expected a whole number of at least 1, got 0", id="rows-over-zero"),
        pytest.param('[[review]]\nname = "r"\nwhen = { risk_over = 101 }\napprovers = { groups = ["p"] }', "hipaa.toml: review[0].when.risk_over: expected a risk score from 0 to 100, got 101", id="risk-over-range"),
        pytest.param('[[review]]\nname = "r"\nwhen = { findings = ["no_limit"] }\napprovers = { groups = ["p"] }', 'hipaa.toml: review[0].when.findings[0]: unknown detector "no_limit" (did you mean "no-limit"?', id="review-unknown-finding"),
        pytest.param('[[review]]\nname = "r"\nwhen = { rows_over = 5 }', "hipaa.toml: review[0].approvers: required key is missing", id="review-without-approvers"),
        pytest.param('[[review]]\nname = "r"\nwhen = { rows_over = 5 }\napprovers = { groups = [] }', "hipaa.toml: review[0].approvers.groups: list at least one group", id="review-empty-approvers"),
        pytest.param('[[review]]\nname = "r"\nwhen = { rows_over = 5 }\napprovers = { groups = ["p"] }\nmin_approvals = 0', "hipaa.toml: review[0].min_approvals: expected a whole number of at least 1", id="min-approvals-zero"),
        pytest.param("[risk]\nreview_over = 90\ndeny_over = 60\napprovers = { groups = ['p'] }", "hipaa.toml: risk.review_over: must be below deny_over (60)", id="risk-order"),
        pytest.param("[risk]\nreview_over = 50", "hipaa.toml: risk.approvers: required with review_over", id="risk-review-without-approvers"),
        pytest.param("[risk]\ndeny_over = 50\ntimeout = '1m'", "hipaa.toml: risk.timeout: only applies with review_over", id="risk-timeout-without-review"),
        pytest.param("[risk]\n", "hipaa.toml: risk: give review_over, deny_over or both", id="risk-empty"),
        pytest.param("[risk]\ndeny_over = '90'", "hipaa.toml: risk.deny_over: expected a risk score from 0 to 100, got '90'", id="risk-wrong-type"),
        pytest.param('[[mask]]\nname = "m"\ncolumns = ["*.ssn"]\nstrategy = "blur"', 'hipaa.toml: mask[0].strategy: unknown masking strategy "blur" (known: redact, partial, hash, null)', id="mask-strategy"),
        pytest.param('[[mask]]\nname = "m"\ncolumns = []', "hipaa.toml: mask[0].columns: list at least one column", id="mask-no-columns"),
        pytest.param('[[mask]]\nname = "m"\ncolumns = ["*.ssn"]\nexempt = { subjects = ["x"] }', 'hipaa.toml: mask[0].exempt: unknown key "subjects"', id="mask-exempt-groups-only"),
        pytest.param('[[mask]]\nname = "m"\ncolumns = ["*.x"]\nrecognizers = ["snn"]', 'hipaa.toml: mask[0].recognizers[0]: unknown recognizer "snn" (did you mean "ssn"?', id="mask-unknown-recognizer"),
        pytest.param('[[recognizer]]\nname = "mrn"\npattern = "(a)\\\\1"', "hipaa.toml: recognizer[0]: custom recognizer 'mrn': invalid RE2 pattern", id="recognizer-bad-pattern"),
        pytest.param('[[recognizer]]\nname = "ssn"\npattern = "x[0-9]"', "hipaa.toml: recognizer[0]: custom recognizer 'ssn': the name belongs to a built-in recognizer", id="recognizer-builtin-name"),
        pytest.param('[[recognizer]]\nname = "m"\npattern = "x[0-9]"\nvalidator = "crc"', "hipaa.toml: recognizer[0]: custom recognizer 'm': unknown validator 'crc'", id="recognizer-validator"),
        pytest.param('[masking]\nuntraced = "allow"', 'hipaa.toml: masking.untraced: unknown untraced mode "allow" (known: mask-all, deny)', id="masking-untraced"),
        pytest.param('[masking]\ndefault_recognizers = ["zip"]', 'hipaa.toml: masking.default_recognizers[0]: "zip" only works on columns a mask rule names', id="masking-column-only-default"),
    ],
)
def test_each_error_kind_is_reported_with_its_location(text: str, expected: str) -> None:
    errors = errors_of(text)
    assert any(error.startswith(expected) for error in errors), errors


def test_all_errors_of_all_files_are_reported_at_once(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[[guardrail]]\nname = "x"\ndetect = ["dorp"]\n[[grants]]\n')
    (tmp_path / "b.toml").write_text(GRANT + 'tables = ["a..b"]\n')
    with pytest.raises(BundleError) as caught:
        load_policy_files([tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "missing.toml"])
    errors = caught.value.errors
    assert [e.split(":")[0] for e in errors] == ["a.toml", "a.toml", "b.toml", str(tmp_path / "missing.toml")]
    assert "cannot read the bundle" in errors[-1]
    assert str(caught.value).count("\n") == 3


def test_a_bundle_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(BundleError, match="not UTF-8"):
        load_bundle_file(path)


def test_two_bundles_with_the_same_stem_are_refused(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    for folder in ("one", "two"):
        (tmp_path / folder / "grants.toml").write_text(GRANT)
    with pytest.raises(BundleError, match='another bundle is also called "grants"'):
        load_policy_files([tmp_path / "one" / "grants.toml", tmp_path / "two" / "grants.toml"])


def test_a_recognizer_defined_twice_across_bundles_is_refused() -> None:
    recognizer = '[[recognizer]]\nname = "mrn"\npattern = "MRN-[0-9]{8}"\n'
    with pytest.raises(BundleError) as caught:
        merge([parse(recognizer, "a.toml"), parse(recognizer, "b.toml")])
    assert caught.value.errors == ('b.toml: recognizer[0].name: the recognizer "mrn" is already defined in a.toml: recognizer[0]',)


def test_a_file_stem_unusable_in_rule_ids_is_refused() -> None:
    with pytest.raises(BundleError, match='the file name "bad:name" cannot name rules'):
        parse(GRANT, "bad:name.toml")


def test_mask_rules_may_use_recognizers_of_other_bundles() -> None:
    policy = merge([parse('[[recognizer]]\nname = "mrn"\npattern = "MRN-[0-9]{8}"\n', "a.toml"), parse('[[mask]]\nname = "m"\ncolumns = ["*.notes"]\nrecognizers = ["mrn"]\n', "b.toml")])
    assert policy.masks[0].rule.recognizers == ("mrn",)


# --- what a loaded bundle holds -------------------------------------------------------------------------


def test_the_fixture_bundle_loads_with_stable_readable_rule_ids() -> None:
    policy = load_policy_files([FIXTURES / "clinic.toml"])
    assert policy.rule_ids() == (
        "clinic:grant:nightly-extract",
        "clinic:grant:reporting-read",
        "clinic:grant:etl-writer",
        "clinic:grant:fast-path",
        "clinic:guardrail:no-drop",
        "clinic:guardrail:hold-procedural",
        "clinic:guardrail:sleep-dry-run",
        "clinic:guardrail:no-deletes-on-clinic",
        "clinic:review:bulk-patients",
        "clinic:review:staging-writes",
        "clinic:review:risky-selects",
        "clinic:mask:ssn",
        "clinic:mask:email",
        "clinic:mask:notes",
        "clinic:risk:review",
        "clinic:risk:deny",
    )
    assert policy.summary() == "1 bundle (clinic); 4 grants, 4 guardrails, 3 reviews, 2 risk thresholds, 3 masks, 1 custom recognizer"
    review = policy.reviews[0]
    assert (review.approval.timeout_seconds, review.approval.max_window_seconds, review.when.rows_over) == (900.0, 3600.0, 1000)
    assert policy.guardrails[1].verdict is Verdict.REVIEW and policy.guardrails[1].approval.min_approvals == 2
    assert policy.grants[0].where == "clinic.toml: grant[0]"


def test_statement_names_are_normalised_to_lower_case_single_spaced() -> None:
    policy = merge([parse(GRANT.replace('["select"]', '["SELECT", "Config  GET", "*"]'))])
    assert policy.grants[0].statements == frozenset({"select", "config get", "*"})


def test_protocol_actions_and_sql_kinds_load_without_warnings() -> None:
    policy = merge([parse(GRANT.replace('["select"]', '["select", "tcl", "get", "hgetall", "config get", "function-call"]'))])
    assert policy.warnings == ()


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        (GRANT.replace('["select"]', '["select", "unknown"]'), 'hipaa.toml: grant[0].statements: "unknown" lets through statements Bastion could not classify'),
        ('[[guardrail]]\nname = "x"\ndetect = ["sleep"]\nenforce = false', 'hipaa.toml: guardrail[0]: guardrail "x" is a dry run'),
        (GRANT.replace('["select"]', '["selct"]'), 'hipaa.toml: grant[0].statements[0]: "selct" is not a SQL statement kind; did you mean "select"?'),
        ('[[review]]\nname = "r"\nwhen = { statements = ["delte"] }\napprovers = { groups = ["p"] }', 'hipaa.toml: review[0].when.statements[0]: "delte" is not a SQL statement kind; did you mean "delete"?'),
    ],
)
def test_risky_but_valid_choices_load_with_a_warning(text: str, warning: str) -> None:
    policy = merge([parse(text)])
    assert [w for w in policy.warnings if w.startswith(warning)], policy.warnings


def test_an_empty_policy_set_denies_everything_and_says_so() -> None:
    policy = load_policy_files([])
    assert policy.grants == () and policy.version
    assert policy.summary().startswith("0 bundles (no bundles: every request is denied)")


# --- merging and versions ---------------------------------------------------------------------------------


def test_version_is_short_stable_and_independent_of_bundle_order() -> None:
    clinic, extra = FIXTURES / "clinic.toml", FIXTURES / "extra.toml"
    first = load_policy_files([clinic, extra])
    again = load_policy_files([extra, clinic])
    assert first.version == again.version
    assert len(first.version) == 12 and int(first.version, 16) >= 0
    assert first.rule_ids() == again.rule_ids()
    assert load_policy_files([clinic]).version != first.version


def test_version_changes_with_the_text_and_with_the_bundle_name() -> None:
    base = merge([parse(GRANT, "a.toml")]).version
    assert merge([parse(GRANT, "a.toml")]).version == base
    assert merge([parse(GRANT + "\n# a comment\n", "a.toml")]).version != base
    assert merge([parse(GRANT, "b.toml")]).version != base


def test_merging_keeps_every_rule_and_takes_the_strictest_masking_settings() -> None:
    policy = load_policy_files([FIXTURES / "clinic.toml", FIXTURES / "extra.toml"])
    assert "extra:grant:auditors" in policy.rule_ids() and "clinic:grant:nightly-extract" in policy.rule_ids()
    assert [(r.bundle, r.review_over, r.deny_over) for r in policy.risks] == [("clinic", 60, 90), ("extra", None, 80)]
    assert policy.masking.untraced == "deny"
    assert policy.masking.default_recognizers == ("email", "phone")
    assert [r.name for r in policy.recognizers] == ["mrn", "member"]
    assert policy.summary().startswith("2 bundles (clinic, extra); 5 grants")


# --- targets ---------------------------------------------------------------------------------------------


def test_check_targets_reports_rules_naming_unconfigured_targets() -> None:
    policy = load_policy_files([FIXTURES / "clinic.toml"])
    assert policy.check_targets(["clinic-db", "reporting-eu"]) == []
    errors = policy.check_targets(["reporting-eu"])
    assert 'clinic.toml: grant[0].targets[0]: there is no configured target called "clinic-db" (known: reporting-eu)' in errors
    assert 'clinic.toml: guardrail[3].targets[0]: there is no configured target called "clinic-db" (known: reporting-eu)' in errors
    assert any(e.startswith("clinic.toml: review[1].targets[0]") for e in errors)
    assert any(e.startswith("clinic.toml: mask[2].targets[0]") for e in errors)
    assert 'clinic.toml: grant[1].targets[0]: no configured target matches "reporting-*" (known: clinic-db)' in policy.check_targets(["clinic-db"])


def test_a_star_target_needs_no_configured_name() -> None:
    policy = merge([parse(GRANT.replace('["db"]', '["*"]'))])
    assert policy.check_targets([]) == []


# --- shipped bundles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hipaa-baseline", "read-only-analytics"])
def test_shipped_bundles_load_on_their_own(name: str) -> None:
    policy = load_policy_files([shipped_bundle(name)])
    assert policy.check_targets(["clinic-db"]) == []
    assert all(rule.startswith(f"{name}:") for rule in policy.rule_ids())


def test_shipped_bundles_load_together_and_cover_what_their_comments_promise() -> None:
    policy = load_policy_files([shipped_bundle("hipaa-baseline"), shipped_bundle("read-only-analytics")])
    detected = set().union(*(g.detect for g in policy.guardrails if g.enforce and g.verdict is Verdict.DENY))
    assert {"drop", "truncate", "delete-without-where", "update-without-where", "copy-program", "copy-file", "file-access",
            "dangerous-function", "dcl", "set-role", "unparsable", "opaque-command"} <= detected  # fmt: skip
    masked = {pattern for mask in policy.masks for pattern in mask.rule.columns}
    assert {"*.ssn", "*.email", "*.phone", "*.dob", "*.date_of_birth", "*.mrn"} <= masked
    assert [(r.review_over, r.deny_over) for r in policy.risks] == [(60, 90)]
    assert policy.warnings == ('hipaa-baseline.toml: guardrail[6]: guardrail "no-deliberate-delays" is a dry run (enforce = false): it records, it does not act',)


def test_an_unknown_shipped_bundle_name_is_an_error_with_suggestions() -> None:
    with pytest.raises(BundleError, match='no shipped bundle is called "hipaa" .*known: hipaa-baseline, read-only-analytics'):
        shipped_bundle("hipaa")


# --- parsers of small values (property tests) -----------------------------------------------------------------


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["ms", "s", "m", "h", "d", "w"]))
def test_durations_are_a_number_and_a_unit(number: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    assert parse_duration(f"{number}{unit}") == pytest.approx(number * factor)
    assert parse_duration(number) == number


@given(st.one_of(st.text(max_size=12), st.floats(allow_nan=True), st.booleans(), st.none(), st.lists(st.integers(), max_size=2)))
def test_duration_parsing_either_gives_positive_seconds_or_a_sentence(value: object) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        assert str(exc)
    else:
        assert 0 < seconds < float("inf")


@given(st.text(max_size=20))
def test_glob_checking_never_crashes_and_usable_globs_compile(text: str) -> None:
    problem = glob_problem(text, dotted=True)
    if problem is None:
        Patterns((text,)).matches("public.patients")  # compiles and runs
    else:
        assert isinstance(problem, str) and problem


@given(st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True), min_size=1, max_size=3))
def test_a_plain_qualified_name_is_a_glob_that_matches_itself_in_any_case(parts: list[str]) -> None:
    name = ".".join(parts)
    assert glob_problem(name, dotted=True) is None
    patterns = Patterns((name,))
    assert patterns.matches(name) and patterns.matches(name.upper())
    assert not patterns.matches(name + "x")


TOML_VALUES = st.recursive(
    st.one_of(st.booleans(), st.integers(-5, 200), st.text(max_size=8), st.sampled_from(["select", "drop", "*", "15m", "*.ssn", "deny", "review"])),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.sampled_from(["name", "groups", "detect", "when", "rows_over", "approvers", "x"]), children, max_size=3)),
    max_leaves=12,
)
SECTION_KEYS = {
    "grant": ["name", "identities", "targets", "statements", "tables", "columns", "capabilities", "bogus"],
    "guardrail": ["name", "detect", "action", "enforce", "approvers", "timeout", "targets", "exempt"],
    "review": ["name", "when", "approvers", "timeout", "min_approvals", "max_window", "identities"],
    "mask": ["name", "columns", "strategy", "recognizers", "exempt"],
    "recognizer": ["name", "pattern", "validator"],
}


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*SECTION_KEYS, "risk", "masking", "other"]),
        st.one_of(
            st.lists(st.dictionaries(st.sampled_from(sorted({k for keys in SECTION_KEYS.values() for k in keys})), TOML_VALUES, max_size=6), max_size=2),
            st.dictionaries(st.sampled_from(["review_over", "deny_over", "approvers", "untraced", "default_recognizers", "x"]), TOML_VALUES, max_size=3),
            TOML_VALUES,
        ),
        max_size=4,
    )
)
def test_any_bundle_data_either_loads_or_fails_with_located_sentences(data: dict) -> None:
    try:
        merge([bundle.bundle_from_data(data, "fuzz.toml")])
    except BundleError as exc:
        assert exc.errors and all(error.startswith("fuzz.toml: ") or error.startswith("masking: ") for error in exc.errors)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet='[]{}="\n ,.abgrantdetc0123', max_size=60))
def test_any_text_either_parses_or_fails_with_a_bundle_error(text: str) -> None:
    try:
        parse_bundle(text, "fuzz.toml")
    except BundleError as exc:
        assert all(error.startswith("fuzz.toml: ") for error in exc.errors)


def test_identity_matching_requires_every_given_list() -> None:
    policy = merge([parse(GRANT.replace('identities = { groups = ["analysts"] }', 'identities = { groups = ["analysts"], providers = ["oidc:github"], subjects = ["repo:acme/*"] }'))])
    match = policy.grants[0].identities
    assert match.matches(Identity("oidc:github", "repo:acme/etl", groups={"analysts", "x"}))
    assert not match.matches(Identity("oidc:gitlab", "repo:acme/etl", groups={"analysts"}))
    assert not match.matches(Identity("oidc:github", "repo:other/etl", groups={"analysts"}))
    assert not match.matches(Identity("oidc:github", "repo:acme/etl", groups={"others"}))
    assert not match.matches(Identity("oidc:github", "REPO:ACME/etl", groups={"analysts"}))  # subjects are case-sensitive


def test_findings_catalogue_names_are_all_usable_as_detectors() -> None:
    text = f'[[guardrail]]\nname = "all"\ndetect = {list(FINDINGS)!r}\n'.replace("'", '"')
    assert merge([parse(text)]).guardrails[0].detect == frozenset(FINDINGS)
