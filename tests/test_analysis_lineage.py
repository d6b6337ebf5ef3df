"""Lineage of output columns: which catalog columns each result column is derived from."""

from __future__ import annotations

import pytest

from bastion.policies import analysis as analysis_module
from bastion.policies.analysis import Catalog, OutputColumn, StatementAnalysis, analyze

PATIENTS = ["id", "name", "ssn", "email", "phone", "dob", "mrn"]
CLINIC = Catalog(
    {
        "public.patients": PATIENTS,
        "public.visits": ["id", "patient_id", "visited_at", "reason"],
        "public.notes": ["id", "patient_id", "body"],
    }
)
MYSQL_CLINIC = Catalog({"clinic.patients": PATIENTS}, search_path=("clinic",))


def p(*columns: str) -> frozenset[str]:
    return frozenset(f"public.patients.{column}" for column in columns)


def v(*columns: str) -> frozenset[str]:
    return frozenset(f"public.visits.{column}" for column in columns)


def n(*columns: str) -> frozenset[str]:
    return frozenset(f"public.notes.{column}" for column in columns)


ALL_PATIENTS = p(*PATIENTS)

# (sql, expected output columns as (sources, traced) in order, output_complete)
CASES: list[tuple[str, list[tuple[frozenset[str], bool]], bool]] = [
    ("SELECT * FROM patients", [(p(column), True) for column in PATIENTS], True),
    ("SELECT ssn FROM patients", [(p("ssn"), True)], True),
    ("SELECT upper(ssn) AS s FROM patients", [(p("ssn"), True)], True),
    ("SELECT ssn || '' FROM patients", [(p("ssn"), True)], True),
    ("SELECT substr(ssn, 1, 3) FROM patients", [(p("ssn"), True)], True),
    ("SELECT lower(email), coalesce(phone, 'none') FROM patients", [(p("email"), True), (p("phone"), True)], True),
    ("SELECT row_to_json(pt) FROM patients pt", [(ALL_PATIENTS, True)], True),
    ("SELECT to_json(pt) FROM patients AS pt", [(ALL_PATIENTS, True)], True),
    ("SELECT pt FROM patients pt", [(ALL_PATIENTS, True)], True),
    ("SELECT (pt).ssn FROM patients pt", [(ALL_PATIENTS, True)], True),
    ("SELECT row_to_json(pt.*) FROM patients pt", [(ALL_PATIENTS, True)], True),
    ("SELECT pt.* FROM patients pt", [(p(column), True) for column in PATIENTS], True),
    (
        "SELECT pt.name, vi.reason FROM patients pt JOIN visits vi ON vi.patient_id = pt.id",
        [(p("name"), True), (v("reason"), True)],
        True,
    ),
    ("SELECT count(*) FROM patients", [(frozenset(), True)], True),
    ("SELECT count(ssn) FROM patients", [(p("ssn"), True)], True),
    ("SELECT (SELECT ssn FROM patients LIMIT 1) AS first_ssn", [(p("ssn"), True)], True),
    ("SELECT d.x FROM (SELECT ssn || name AS x FROM patients) AS d", [(p("ssn", "name"), True)], True),
    ("WITH s AS (SELECT ssn AS secret FROM patients) SELECT upper(secret) FROM s", [(p("ssn"), True)], True),
    (
        "WITH a AS (SELECT ssn FROM patients), b AS (SELECT ssn AS t FROM a) SELECT t FROM b",
        [(p("ssn"), True)],
        True,
    ),
    ("SELECT ssn FROM patients UNION SELECT reason FROM visits", [(p("ssn") | v("reason"), True)], True),
    ("SELECT my_udf(ssn) FROM patients", [(p("ssn"), False)], True),
    ("SELECT public.upper(ssn) FROM patients", [(p("ssn"), False)], True),
    ("SELECT pg_catalog.upper(ssn) FROM patients", [(p("ssn"), True)], True),
    ("SELECT * FROM mystery", [(frozenset(), False)], False),
    ("SELECT secret FROM mystery", [(frozenset({"public.mystery.secret"}), False)], True),
    (
        "SELECT name, secret FROM patients, mystery",
        [(p("name"), True), (frozenset({"public.mystery.secret"}), False)],
        True,
    ),
    (
        "SELECT * FROM patients JOIN notes USING (id)",
        [(p("id") | n("id"), True)]
        + [(p(column), True) for column in PATIENTS[1:]]
        + [(n("patient_id"), True), (n("body"), True)],
        True,
    ),
    (
        "SELECT name, (SELECT max(visited_at) FROM visits WHERE visits.patient_id = patients.id) FROM patients",
        [(p("name"), True), (v("visited_at"), True)],
        True,
    ),
    ("SELECT a FROM patients AS pt(a, b)", [(p("id"), True)], True),
    ("SELECT x FROM (VALUES (1), (2)) AS t(x)", [(frozenset(), True)], True),
    (
        "SELECT l.body FROM patients pt CROSS JOIN LATERAL (SELECT body FROM notes WHERE notes.patient_id = pt.id) l",
        [(n("body"), True)],
        True,
    ),
    (
        "WITH RECURSIVE chain(i, s) AS (SELECT id, ssn FROM patients UNION ALL SELECT i + 1, s FROM chain) SELECT s FROM chain",
        [(p("ssn"), True)],
        True,
    ),
    ("SELECT query_to_xml('SELECT ssn FROM patients', true, true, '')", [(p("ssn"), True)], True),
    ("SELECT table_to_xml('patients', true, true, '')", [(ALL_PATIENTS, True)], True),
    ("SELECT query_to_xml(body, true, true, '') FROM notes", [(n("body"), False)], True),
    ("SELECT ctid, name FROM patients", [(frozenset(), True), (p("name"), True)], True),
    ("SELECT 'literal', 42, $1", [(frozenset(), True)] * 3, True),
    ("DELETE FROM patients WHERE id = 1 RETURNING ssn", [(p("ssn"), True)], True),
    (
        "UPDATE patients SET name = (SELECT body FROM notes LIMIT 1) WHERE id = 1 RETURNING name",
        [(p("name") | n("body"), True)],
        True,
    ),
    (
        "INSERT INTO notes (patient_id, body) SELECT id, ssn FROM patients RETURNING body",
        [(n("body") | p("ssn"), True)],
        True,
    ),
    ("INSERT INTO notes (patient_id, body) VALUES (1, 'x') RETURNING id", [(n("id"), True)], True),
    (
        "WITH gone AS (DELETE FROM patients WHERE id = 1 RETURNING *) SELECT ssn FROM gone",
        [(p("ssn"), True)],
        True,
    ),
    ("EXPLAIN SELECT ssn FROM patients", [(frozenset(), True)], True),
    ("COPY (SELECT upper(ssn) FROM patients) TO STDOUT", [(p("ssn"), True)], True),
    ("COPY patients (ssn, name) TO STDOUT", [(p("ssn"), True), (p("name"), True)], True),
]


def _shape(analysis: StatementAnalysis) -> tuple[list[tuple[frozenset[str], bool]], bool]:
    return [(column.sources, column.traced) for column in analysis.output_columns], analysis.output_complete


@pytest.mark.parametrize(("sql", "expected", "complete"), CASES, ids=[case[0][:60] for case in CASES])
def test_lineage(sql: str, expected: list, complete: bool) -> None:
    (analysis,) = analyze(sql, "postgres", CLINIC)
    assert analysis.kind != "unknown", analysis.findings
    assert _shape(analysis) == (expected, complete)


@pytest.mark.parametrize(("sql", "expected", "complete"), CASES, ids=[case[0][:60] for case in CASES])
def test_lineage_without_the_sqlglot_qualifier_agrees(
    sql: str, expected: list, complete: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The qualifier only helps: the analysis' own resolution gives the same answer without it."""
    monkeypatch.setattr(analysis_module._Lineage, "_qualified", lambda self, tree: tree)
    (analysis,) = analyze(sql, "postgres", CLINIC)
    assert _shape(analysis) == (expected, complete)


def test_output_names_follow_postgresql_and_never_carry_literal_values() -> None:
    (analysis,) = analyze(
        "SELECT ssn, upper(name) AS shout, count(*), 'TOP-SECRET', ssn::text FROM patients GROUP BY 1, 2",
        "postgres",
        CLINIC,
    )
    assert [column.name for column in analysis.output_columns] == ["ssn", "shout", "count", "?column?", "ssn"]
    (analysis,) = analyze("SELECT 'TOP-SECRET', 12345", "mysql", MYSQL_CLINIC)
    assert all("secret" not in column.name.lower() and "12345" not in column.name for column in analysis.output_columns)


def test_columns_read_cover_every_clause() -> None:
    (analysis,) = analyze(
        "SELECT name FROM patients WHERE ssn = '1' AND dob IN (SELECT visited_at FROM visits) ORDER BY email LIMIT 1",
        "postgres",
        CLINIC,
    )
    assert analysis.columns_read == p("name", "ssn", "dob", "email") | v("visited_at")


def test_star_expands_to_columns_read() -> None:
    (analysis,) = analyze("SELECT * FROM notes LIMIT 1", "postgres", CLINIC)
    assert analysis.columns_read == n("id", "patient_id", "body")


def test_mysql_user_variables_are_untraced() -> None:
    set_analysis, select_analysis = analyze(
        "SET @x = (SELECT ssn FROM patients LIMIT 1); SELECT @x", "mysql", MYSQL_CLINIC
    )
    assert set_analysis.tables_read == {"clinic.patients"}
    assert set_analysis.columns_read == {"clinic.patients.ssn"}
    assert select_analysis.output_columns == (OutputColumn("?column?", frozenset(), False),)


def test_execute_returns_the_prepared_statements_columns() -> None:
    prepare, execute = analyze(
        "PREPARE q AS SELECT upper(ssn) FROM patients; EXECUTE q", "postgres", CLINIC
    )
    assert prepare.output_columns == ()
    assert execute.output_columns == (OutputColumn("upper", p("ssn"), True),)
    assert execute.inner is prepare.inner


def test_without_a_catalog_nothing_is_traced_to_a_known_column() -> None:
    (analysis,) = analyze("SELECT ssn FROM patients", "postgres")
    assert analysis.output_columns == (OutputColumn("ssn", frozenset({"public.patients.ssn"}), False),)
    (analysis,) = analyze("SELECT * FROM patients", "postgres")
    assert analysis.output_complete is False
    assert all(not column.traced for column in analysis.output_columns)
