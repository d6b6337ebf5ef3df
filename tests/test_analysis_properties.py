"""Properties of the analysis over generated statements and random text."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bastion.policies.analysis import KINDS, Analyzer, Catalog, StatementAnalysis, analyze
from bastion.policies.fingerprint import fingerprint

CATALOG = Catalog(
    {
        "public.patients": ["id", "name", "ssn", "email"],
        "public.visits": ["id", "patient_id", "reason"],
    }
)
DIALECTS = st.sampled_from(["postgres", "mysql"])
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# identifiers are letters only, so a literal value (digits, a marker word) never occurs in a name
IDENTIFIER = st.one_of(
    st.sampled_from(["patients", "visits", "id", "name", "ssn", "email", "reason", "patient_id"]),
    # never a keyword: no SQL keyword has a q
    st.tuples(st.text("abcdefg", min_size=1, max_size=3), st.text("abcdefg", max_size=3)).map("q".join),
)
SPACE = st.sampled_from([" ", "  ", "\n", "\t", " \n  "])
COMMENT_TEXT = st.text(alphabet="abz ;'*", max_size=10).map(lambda text: text.replace("*", "* "))
COMMENT = st.one_of(
    COMMENT_TEXT.map(lambda text: f"/* {text} */"),
    COMMENT_TEXT.map(lambda text: f"-- {text}\n"),
)
GAP = st.one_of(SPACE, st.tuples(SPACE, COMMENT, SPACE).map("".join))


def literal() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(min_value=0, max_value=10**9).map(str),
        st.tuples(st.integers(0, 999), st.integers(0, 999)).map(lambda pair: f"{pair[0]}.{pair[1]}"),
        st.text(alphabet="abcxyz ;-*/'", max_size=12).map(lambda text: "'" + text.replace("'", "''") + "'"),
    )


@st.composite
def template(draw: st.DrawFn) -> tuple[str, int]:
    """A statement with ``{n}`` holes for literals, and the number of holes."""
    table = draw(IDENTIFIER)
    columns = draw(st.lists(IDENTIFIER, min_size=1, max_size=3))
    where_column = draw(IDENTIFIER)
    operator = draw(st.sampled_from(["=", "<", ">=", "<>"]))
    shape = draw(st.sampled_from(["select", "insert", "update", "delete"]))
    with_where = draw(st.booleans())
    holes = 0

    def hole() -> str:
        nonlocal holes
        holes += 1
        return "{" + str(holes - 1) + "}"

    where = f" WHERE {where_column} {operator} {hole()}" if with_where else ""
    if shape == "select":
        limit = f" LIMIT {hole()}" if draw(st.booleans()) else ""
        text = f"SELECT {', '.join(columns)} FROM {table}{where}{limit}"
    elif shape == "insert":
        values = ", ".join(hole() for _ in columns)
        text = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values})"
    elif shape == "update":
        text = f"UPDATE {table} SET {columns[0]} = {hole()}{where}"
    else:
        text = f"DELETE FROM {table}{where}"
    return text, holes


def render(text: str, values: list[str], gaps: list[str] | None = None) -> str:
    rendered = text.format(*values)
    if gaps:
        words = rendered.split(" ")
        rendered = words[0] + "".join(gaps[index % len(gaps)] + word for index, word in enumerate(words[1:]))
    return rendered


def check_invariants(results: tuple[StatementAnalysis, ...]) -> None:
    assert isinstance(results, tuple)
    for position, analysis in enumerate(results):
        assert isinstance(analysis, StatementAnalysis)
        assert analysis.kind in KINDS
        assert 0 <= analysis.risk <= 100
        assert analysis.position == position
        assert analysis.statement_count == len(results)
        if analysis.kind == "unknown":
            assert any(finding.weight >= 80 for finding in analysis.findings), analysis.findings


@FAST
@given(template(), st.data(), DIALECTS)
def test_generated_statements_never_raise(shape: tuple[str, int], data: st.DataObject, dialect: str) -> None:
    text, holes = shape
    values = [data.draw(literal()) for _ in range(holes)]
    gaps = data.draw(st.lists(GAP, min_size=1, max_size=6))
    sql = render(text, values, gaps)
    check_invariants(analyze(sql, dialect, CATALOG))
    check_invariants(analyze(sql + "; " + sql, dialect, CATALOG))


@FAST
@given(st.text(max_size=80), DIALECTS)
def test_random_text_never_raises(text: str, dialect: str) -> None:
    check_invariants(analyze(text, dialect, CATALOG))


@FAST
@given(st.text(alphabet="'\"`$;-/*#\\!()=,. \n\tEeSELCTFROMDPAXUIN0123456789@?", max_size=60), DIALECTS)
def test_random_sql_punctuation_never_raises(text: str, dialect: str) -> None:
    check_invariants(analyze(text, dialect, CATALOG))


@FAST
@given(template(), st.data(), DIALECTS)
def test_literal_values_do_not_change_the_fingerprint(
    shape: tuple[str, int], data: st.DataObject, dialect: str
) -> None:
    text, holes = shape
    first = render(text, [data.draw(literal()) for _ in range(holes)])
    second = render(text, [data.draw(literal()) for _ in range(holes)])
    assert fingerprint(first, dialect) == fingerprint(second, dialect)
    assert fingerprint(first, dialect) is not None
    (one,) = analyze(first, dialect, CATALOG)
    (two,) = analyze(second, dialect, CATALOG)
    assert one.fingerprint == two.fingerprint
    assert one.redacted_text == two.redacted_text


@FAST
@given(template(), template(), st.data(), DIALECTS)
def test_structure_changes_the_fingerprint(
    first_shape: tuple[str, int], second_shape: tuple[str, int], data: st.DataObject, dialect: str
) -> None:
    first = render(first_shape[0], [data.draw(literal()) for _ in range(first_shape[1])])
    second = render(second_shape[0], [data.draw(literal()) for _ in range(second_shape[1])])
    assume(first_shape[0].split() != second_shape[0].split())
    assert fingerprint(first, dialect) != fingerprint(second, dialect)
    (one,) = analyze(first, dialect, CATALOG)
    (two,) = analyze(second, dialect, CATALOG)
    assert one.fingerprint != two.fingerprint


@FAST
@given(template(), st.data(), DIALECTS)
def test_case_and_whitespace_do_not_change_the_fingerprint(
    shape: tuple[str, int], data: st.DataObject, dialect: str
) -> None:
    text, holes = shape
    values = [data.draw(literal()) for _ in range(holes)]
    plain = render(text, values)
    spaced = render(text, values, data.draw(st.lists(SPACE, min_size=1, max_size=6)))
    shouted = plain.upper() if "'" not in plain else plain
    assert fingerprint(plain, dialect) == fingerprint(spaced, dialect) == fingerprint(shouted, dialect)


@FAST
@given(template(), st.data(), DIALECTS)
def test_a_cache_hit_gives_what_a_full_analysis_gives(
    shape: tuple[str, int], data: st.DataObject, dialect: str
) -> None:
    text, holes = shape
    first = render(text, [data.draw(literal()) for _ in range(holes)])
    second = render(text, [data.draw(literal()) for _ in range(holes)])
    analyzer = Analyzer(max_entries=8)
    analyzer.analyze(first, dialect, CATALOG)
    cached = analyzer.analyze(second, dialect, CATALOG)
    fresh = analyze(second, dialect, CATALOG)
    assert [_verdict(analysis) for analysis in cached] == [_verdict(analysis) for analysis in fresh]


def _verdict(analysis: StatementAnalysis) -> tuple:
    return (
        analysis.kind,
        analysis.tables_read,
        analysis.tables_written,
        analysis.columns_read,
        analysis.functions,
        analysis.findings,
        analysis.output_columns,
        analysis.fingerprint,
    )


MARKED = st.one_of(
    st.integers(min_value=10**6, max_value=10**7 - 1).map(lambda number: (str(number), str(number))),
    st.text("abcdefgh", min_size=4, max_size=4).map(lambda word: (f"'zz{word}'", f"zz{word}")),
)


@FAST
@given(template(), st.data(), DIALECTS)
def test_literal_values_never_reach_the_audit_trail(
    shape: tuple[str, int], data: st.DataObject, dialect: str
) -> None:
    text, holes = shape
    assume(holes > 0)
    marked = [data.draw(MARKED) for _ in range(holes)]
    gaps = data.draw(st.lists(GAP, min_size=1, max_size=6))
    sql = render(text, [source for source, _ in marked], gaps)
    (analysis,) = analyze(sql, dialect, CATALOG)
    visible = [analysis.redacted_text, analysis.fingerprint, fingerprint(sql, dialect) or ""]
    visible += [finding.sentence for finding in analysis.findings]
    visible += [column.name for column in analysis.output_columns]
    for _, value in marked:
        assert all(value not in shown for shown in visible), (value, visible)
