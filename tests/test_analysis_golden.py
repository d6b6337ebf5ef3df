"""Golden cases for the statement analysis: tests/fixtures/analysis/*.sql (format in its README)."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from bastion.policies.analysis import Catalog, StatementAnalysis, analyze

FIXTURES = Path(__file__).parent / "fixtures" / "analysis"

CLINIC = {
    "patients": ["id", "name", "ssn", "email", "phone", "dob", "mrn"],
    "visits": ["id", "patient_id", "visited_at", "reason"],
    "notes": ["id", "patient_id", "body"],
}
CATALOGS = {
    "postgres": Catalog({f"public.{table}": columns for table, columns in CLINIC.items()}),
    "mysql": Catalog(
        {f"clinic.{table}": columns for table, columns in CLINIC.items()}, search_path=("clinic",)
    ),
}
SET_KEYS = ("read", "written", "findings", "columns", "functions")
KNOWN_KEYS = {"dialect", "kind", "absent", "risk-at-least", "risk-below", *SET_KEYS}


@attrs.frozen
class Case:
    name: str
    source: str
    line: int
    dialect: str
    sql: str
    expect: dict[str, str]


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def load_cases(path: Path) -> list[Case]:
    cases: list[Case] = []
    default_dialect = ""
    current: dict | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("-- default-dialect:"):
            default_dialect = line.split(":", 1)[1].strip()
            continue
        if line.startswith("-- case:"):
            if current is not None:
                cases.append(_finish(current, path, default_dialect))
            current = {"name": line.split(":", 1)[1].strip(), "line": number, "expect": {}, "sql": [], "header": True}
            continue
        if current is None:
            continue
        if current["header"] and line.startswith("-- ") and ":" in line:
            key, value = line[3:].split(":", 1)
            if key.strip() in KNOWN_KEYS:
                current["expect"][key.strip()] = value.strip()
                continue
        current["header"] = False
        current["sql"].append(line)
    if current is not None:
        cases.append(_finish(current, path, default_dialect))
    return cases


def _finish(current: dict, path: Path, default_dialect: str) -> Case:
    expect = current["expect"]
    return Case(
        name=current["name"],
        source=path.name,
        line=current["line"],
        dialect=expect.pop("dialect", default_dialect),
        sql="\n".join(current["sql"]).strip(),
        expect=expect,
    )


CASES = [case for path in sorted(FIXTURES.glob("*.sql")) for case in load_cases(path)]


def _union(analyses: tuple[StatementAnalysis, ...], attribute: str) -> set[str]:
    result: set[str] = set()
    for analysis in analyses:
        if attribute == "findings":
            result |= analysis.finding_names
        else:
            result |= getattr(analysis, attribute)
    return result


ATTRIBUTES = {
    "read": "tables_read",
    "written": "tables_written",
    "findings": "findings",
    "columns": "columns_read",
    "functions": "functions",
}


def test_the_fixtures_hold_enough_cases() -> None:
    dialects = {case.dialect for case in CASES}
    assert dialects == {"postgres", "mysql"}
    assert len(CASES) >= 100
    assert all(case.sql and "kind" in case.expect for case in CASES), "every case states its kind"
    names = [(case.source, case.name) for case in CASES]
    assert len(names) == len(set(names)), "case names are unique within a file"


@pytest.mark.parametrize("case", CASES, ids=[f"{case.source}:{case.line}:{case.name}" for case in CASES])
def test_golden_case(case: Case) -> None:
    analyses = analyze(case.sql, case.dialect, CATALOGS[case.dialect])
    got_kinds = [analysis.kind for analysis in analyses]
    assert got_kinds == _items(case.expect["kind"]), analyses
    for key, attribute in ATTRIBUTES.items():
        if key in case.expect:
            assert _union(analyses, attribute) == set(_items(case.expect[key])), (key, analyses)
    for absent in _items(case.expect.get("absent", "")):
        assert absent not in _union(analyses, "findings")
    risks = [analysis.risk for analysis in analyses]
    if "risk-at-least" in case.expect:
        assert max(risks) >= int(case.expect["risk-at-least"])
    if "risk-below" in case.expect:
        assert max(risks) < int(case.expect["risk-below"])
    for analysis in analyses:
        if analysis.kind == "unknown":
            assert any(finding.weight >= 80 for finding in analysis.findings)
        assert analysis.statement_count == len(analyses)
