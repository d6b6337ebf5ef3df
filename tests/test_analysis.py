"""The analysis API: catalog, requests, prepared statements, the cache, fingerprints, failing closed."""

from __future__ import annotations

import pytest

from bastion.policies import analysis as analysis_module
from bastion.policies.analysis import (
    KINDS,
    Analyzer,
    Catalog,
    StatementAnalysis,
    analyze,
    cursor_key,
    remember_prepared,
    search_path_after,
    to_request,
)
from bastion.policies.findings import FINDINGS
from bastion.policies.fingerprint import (
    canonical_dialect,
    fingerprint,
    lex,
    redact,
    unwrap_executable_comments,
)
from bastion.policies.model import Message

ROWS = [
    ("public", "patients", "ssn", 3),
    ("public", "patients", "id", 1),
    ("public", "patients", "name", 2),
    ("audit", "events", "id", 1),
    ("audit", "patients", "id", 1),
    ("Public", "Visits", "Reason", 2),
    ("Public", "Visits", "ID", 1),
]
CLINIC = Catalog.from_rows(ROWS)


# --- catalog -------------------------------------------------------------------------------------


def test_catalog_from_information_schema_rows_orders_and_lowercases() -> None:
    assert CLINIC.columns("public.patients") == ("id", "name", "ssn")
    assert CLINIC.columns("public.visits") == ("id", "reason")
    assert CLINIC.columns("public.nothing") is None
    assert CLINIC.search_path == ("public",)


def test_catalog_version_follows_content_and_keys_equality() -> None:
    same = Catalog.from_rows(list(reversed(ROWS)))
    other = Catalog.from_rows(ROWS[:-1])
    assert same.version == CLINIC.version and same == CLINIC and hash(same) == hash(CLINIC)
    assert other.version != CLINIC.version and other != CLINIC
    assert Catalog.from_rows(ROWS, version="v7").version == "v7"
    assert Catalog.from_rows(ROWS, search_path=("audit",)).version != CLINIC.version


def test_catalog_is_frozen() -> None:
    with pytest.raises(TypeError):
        CLINIC.tables["public.x"] = ("a",)  # type: ignore[index]
    with pytest.raises(AttributeError):
        CLINIC.version = "x"  # type: ignore[misc]


def test_unqualified_names_follow_the_search_path() -> None:
    assert CLINIC.resolve("patients") == "public.patients"
    audit_first = Catalog.from_rows(ROWS, search_path=("audit", "public"))
    assert audit_first.resolve("patients") == "audit.patients"
    assert audit_first.resolve("visits") == "public.visits"
    assert audit_first.resolve("unknown") == "audit.unknown"
    assert CLINIC.resolve("pg_class") == "pg_catalog.pg_class"
    mysql = Catalog.from_rows([("clinic", "patients", "id", 1)], search_path="clinic")
    assert mysql.resolve("patients", "mysql") == "clinic.patients"
    assert Catalog.empty("mysql").resolve("patients", "mysql") == "patients"
    (analysis,) = analyze("SELECT id FROM patients LIMIT 1", "postgres", audit_first)
    assert analysis.tables_read == {"audit.patients"}


def test_a_search_path_change_applies_to_the_rest_of_the_text_and_is_reported() -> None:
    set_path, select = analyze("SET search_path TO audit, public; SELECT id FROM patients LIMIT 1", "postgres", CLINIC)
    assert search_path_after(set_path) == ("audit", "public")
    assert select.tables_read == {"audit.patients"}
    (alone,) = analyze("SELECT id FROM patients LIMIT 1", "postgres", CLINIC.with_search_path(("audit", "public")))
    assert alone.tables_read == {"audit.patients"}
    assert CLINIC.with_search_path(("audit",)).version != CLINIC.version
    use, select = analyze("USE audit; SELECT * FROM events LIMIT 1", "mysql", Catalog.from_rows(ROWS, "clinic"))
    assert search_path_after(use) == ("audit",)
    assert select.tables_read == {"audit.events"}
    (reset,) = analyze("RESET search_path", "postgres")
    assert reset.session_effect == "search-path" and search_path_after(reset) is None


def test_pg_catalog_is_searched_first_as_the_server_does() -> None:
    catalog = Catalog({"pg_catalog.pg_class": ["oid"], "public.pg_class": ["evil"]})
    assert catalog.resolve("pg_class") == "pg_catalog.pg_class"
    listed = Catalog({"pg_catalog.pg_class": ["oid"], "public.pg_class": ["evil"]}, ("public", "pg_catalog"))
    assert listed.resolve("pg_class") == "public.pg_class"


# --- the request ---------------------------------------------------------------------------------


def test_to_request_carries_the_analysis() -> None:
    message = Message(protocol="postgres", kind="statement", text="DELETE FROM patients", dialect="postgres")
    (analysis,) = analyze(message.text, "postgres", CLINIC)
    request = to_request(analysis, message)
    assert request.action == "delete"
    assert request.tables_written == {"public.patients"}
    assert request.findings == analysis.findings
    assert request.risk == analysis.risk == FINDINGS["delete-without-where"].weight
    assert request.fingerprint == analysis.fingerprint and request.redacted_text == "DELETE FROM patients"
    assert request.analysis is analysis


def test_findings_come_from_the_catalogue_with_weight_and_sentence() -> None:
    (analysis,) = analyze("SELECT pg_read_file('/etc/passwd'), lo_export(1, '/x')", "postgres")
    (finding,) = [finding for finding in analysis.findings if finding.name == "file-access"]
    assert finding.weight == FINDINGS["file-access"].weight
    assert finding.sentence.startswith(FINDINGS["file-access"].sentence)
    assert "pg_read_file" in finding.sentence and "lo_export" in finding.sentence
    assert "/etc/passwd" not in finding.sentence


def test_every_kind_the_module_names_is_one_of_the_documented_kinds() -> None:
    assert set(KINDS) == {
        "select", "insert", "update", "delete", "merge", "ddl", "dcl", "tcl", "copy", "call", "do",
        "explain", "set", "show", "prepare", "execute", "utility", "unknown",
    }  # fmt: skip


def test_existing_finding_names_are_kept() -> None:
    for name in ("unparsable", "opaque-command", "drop", "truncate", "delete-without-where",
                 "update-without-where", "ddl", "dcl", "copy-program", "copy-file", "file-access",
                 "dangerous-function", "sleep", "set-role", "set-config", "write-in-cte",
                 "select-into", "explain-analyze-write", "procedural-code", "dynamic-sql",
                 "multi-statement", "no-limit", "function-call"):  # fmt: skip
        assert name in FINDINGS


def test_redacted_text_keeps_the_shape_without_literals() -> None:
    (analysis,) = analyze("SELECT * FROM patients WHERE ssn = '123-45-6789' -- who?\n AND id > 7", "postgres")
    assert analysis.redacted_text == "SELECT * FROM patients WHERE ssn = ? AND id > ?"
    (analysis,) = analyze("SELECT $$secret$$, E'\\'x', \"Col\" FROM t /* note */", "postgres")
    assert analysis.redacted_text == 'SELECT ?, ?, "Col" FROM t'


# --- prepared statements and cursors ---------------------------------------------------------------


def test_prepared_statements_are_reported_back_and_resolved_from_the_session() -> None:
    session: dict[str, StatementAnalysis] = {}
    (prepare,) = analyze("PREPARE wipe AS DELETE FROM patients", "postgres", CLINIC, session)
    assert session == {}, "analyze never changes the caller's mapping"
    assert (prepare.kind, prepare.session_effect, prepare.statement_name) == ("prepare", "prepare", "wipe")
    assert prepare.inner is not None and prepare.inner.kind == "delete"
    remember_prepared(session, [prepare])
    (execute,) = analyze("EXECUTE wipe", "postgres", CLINIC, session)
    assert execute.kind == "delete" and execute.statement_name == "wipe"
    assert "delete-without-where" in execute.finding_names
    assert execute.depends_on_session
    (deallocate,) = analyze("DEALLOCATE PREPARE wipe", "postgres", CLINIC, session)
    remember_prepared(session, [deallocate])
    assert session == {}
    (again,) = analyze("EXECUTE wipe", "postgres", CLINIC, session)
    assert again.kind == "unknown" and again.risk >= 90


def test_deallocate_all_and_discard_all_forget_everything() -> None:
    session: dict[str, StatementAnalysis] = {}
    remember_prepared(
        session,
        analyze("PREPARE a AS SELECT 1; PREPARE b AS SELECT 2; DECLARE c CURSOR FOR SELECT 3", "postgres"),
    )
    assert set(session) == {"a", "b", cursor_key("c")}
    remember_prepared(session, analyze("DEALLOCATE ALL", "postgres"))
    assert set(session) == {cursor_key("c")}
    remember_prepared(session, analyze("DISCARD ALL", "postgres"))
    assert session == {}


def test_a_cursor_cannot_be_shadowed_by_a_statement_name() -> None:
    session: dict[str, StatementAnalysis] = {}
    remember_prepared(session, analyze("DECLARE c CURSOR FOR SELECT ssn FROM patients", "postgres", CLINIC))
    remember_prepared(session, analyze('PREPARE "c" AS SELECT 1', "postgres", CLINIC))
    (fetch,) = analyze("FETCH ALL FROM c", "postgres", CLINIC, session)
    assert fetch.output_columns[0].sources == {"public.patients.ssn"}


def test_mysql_statement_names_are_case_insensitive() -> None:
    session: dict[str, StatementAnalysis] = {}
    remember_prepared(session, analyze("PREPARE Stmt FROM 'DELETE FROM t'", "mysql"))
    (execute,) = analyze("EXECUTE STMT", "mysql", None, session)
    assert execute.kind == "delete"


# --- failing closed ------------------------------------------------------------------------------


def test_an_internal_error_is_an_unknown_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(statement, facts):  # noqa: ANN001
        raise RuntimeError("boom")

    monkeypatch.setattr(analysis_module, "_route", broken)
    (analysis,) = analyze("SELECT 1", "postgres")
    assert analysis.kind == "unknown" and analysis.risk == 100
    assert "unparsable" in analysis.finding_names


def test_an_error_outside_statements_is_an_unknown_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):  # noqa: ANN002, ANN003
        raise MemoryError

    monkeypatch.setattr(analysis_module, "_analyze_text", broken)
    (analysis,) = analyze("SELECT 1", "postgres")
    assert analysis.kind == "unknown" and analysis.redacted_text == "SELECT ?"


def test_when_the_two_lexers_disagree_the_text_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    real_lex = analysis_module.lex

    def shifted(text: str, dialect: str):  # noqa: ANN202
        lexed = real_lex(text, dialect)
        return type(lexed)(lexed.redacted, lexed.normalized, lexed.unterminated, lexed.odd_characters, (1,))

    monkeypatch.setattr(analysis_module, "lex", shifted)
    (analysis,) = analyze("SELECT 1; SELECT 2", "postgres")
    assert analysis.kind == "unknown" and "lexer-mismatch" in analysis.finding_names


@pytest.mark.parametrize("text", ["SELECT\u00a0name FROM patients", "SELECT\u2028name", "SELECT 1;\x1cDROP TABLE t"])
def test_characters_read_differently_by_server_and_parser_are_unknown(text: str) -> None:
    (analysis,) = analyze(text, "postgres")
    assert analysis.kind == "unknown" and "odd-characters" in analysis.finding_names


def test_non_ascii_inside_literals_and_identifiers_is_fine() -> None:
    (analysis,) = analyze("SELECT name FROM patients WHERE name = 'José\u00a0Ñ' LIMIT 1", "postgres", CLINIC)
    assert analysis.kind == "select"


def test_limits_make_a_text_unknown() -> None:
    (analysis,) = analyze("SELECT 1;" * (analysis_module.MAX_STATEMENTS + 1), "postgres")
    assert analysis.kind == "unknown"
    (analysis,) = analyze("SELECT '" + "x" * analysis_module.MAX_SQL_LENGTH + "'", "postgres")
    assert analysis.kind == "unknown" and "x" * 10 not in analysis.redacted_text
    nested = "SELECT 1"
    for _ in range(analysis_module.MAX_NESTING + 2):
        nested = "SELECT query_to_xml('" + nested.replace("'", "''") + "', true, true, '')"
    (analysis,) = analyze(nested, "postgres")
    assert "dynamic-sql-unseen" in analysis.finding_names


def test_deeply_nested_expressions_do_not_escape() -> None:
    (analysis,) = analyze("SELECT " + "(" * 3000 + "1" + ")" * 3000, "postgres")
    assert analysis.kind in ("select", "unknown")
    if analysis.kind == "unknown":
        assert analysis.risk >= 80


def test_empty_and_comment_only_texts_have_no_statements() -> None:
    assert analyze("", "postgres") == ()
    assert analyze("  ;; -- nothing\n /* at all */", "postgres") == ()


def test_an_unsupported_dialect_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        analyze("SELECT 1", "oracle")
    assert canonical_dialect("PostgreSQL") == "postgres" and canonical_dialect("mariadb") == "mysql"
    assert fingerprint("SELECT 1", "PostgreSQL") == fingerprint("SELECT 2", "postgres")
    assert Analyzer().analyze("SELECT 1", "MariaDB")[0].kind == "select"
    with pytest.raises(ValueError):
        Analyzer().analyze("SELECT 1", "oracle")


# --- the cache -----------------------------------------------------------------------------------


def test_the_cache_serves_statements_that_differ_only_in_literals() -> None:
    analyzer = Analyzer()
    first = analyzer.analyze("SELECT name FROM patients WHERE id = 1", "postgres", CLINIC)
    second = analyzer.analyze("select name  from patients where id = 2", "postgres", CLINIC)
    assert second is first
    stats = analyzer.statistics()
    assert (stats.hits, stats.misses, stats.uncacheable, stats.size) == (1, 1, 0, 1)


def test_the_cache_is_keyed_by_catalog_version_and_dialect() -> None:
    analyzer = Analyzer()
    analyzer.analyze("SELECT name FROM patients", "postgres", CLINIC)
    changed = Catalog.from_rows([*ROWS, ("public", "patients", "email", 4)])
    (analysis,) = analyzer.analyze("SELECT * FROM patients", "postgres", changed)
    assert len(analysis.output_columns) == 4
    analyzer.analyze("SELECT name FROM patients", "mysql", CLINIC)
    assert analyzer.statistics().hits == 0 and analyzer.statistics().size == 3


def test_verdicts_that_depend_on_literals_are_not_shared() -> None:
    analyzer = Analyzer()
    (benign,) = analyzer.analyze("SELECT query_to_xml('SELECT 1', true, true, '')", "postgres", CLINIC)
    (evil,) = analyzer.analyze("SELECT query_to_xml('DELETE FROM patients', true, true, '')", "postgres", CLINIC)
    assert benign.kind == "select" and evil.kind == "delete"
    (role,) = analyzer.analyze("SELECT set_config('role', 'postgres', false)", "postgres")
    (other,) = analyzer.analyze("SELECT set_config('application_name', 'x', false)", "postgres")
    assert "set-role" in role.finding_names and "set-role" not in other.finding_names
    (again,) = analyzer.analyze("SELECT query_to_xml('DELETE FROM patients', true, true, '')", "postgres", CLINIC)
    assert again is evil, "the identical text is served from the exact-text cache"
    assert analyzer.statistics().exact_hits == 1


def test_analyses_that_depend_on_the_session_are_never_cached() -> None:
    analyzer = Analyzer()
    session: dict[str, StatementAnalysis] = {}
    assert analyzer.analyze("EXECUTE p", "postgres", None, session)[0].kind == "unknown"
    remember_prepared(session, analyze("PREPARE p AS DROP TABLE patients", "postgres"))
    assert analyzer.analyze("EXECUTE p", "postgres", None, session)[0].kind == "ddl"
    stats = analyzer.statistics()
    assert (stats.hits, stats.uncacheable, stats.size) == (0, 2, 0)


def test_texts_the_fingerprint_refuses_are_cached_by_exact_text_only() -> None:
    analyzer = Analyzer()
    analyzer.analyze("SELECT 1 -- note", "postgres")
    analyzer.analyze("SELECT 2 -- note", "postgres")
    analyzer.analyze("SELECT 1 -- note", "postgres")
    stats = analyzer.statistics()
    assert (stats.hits, stats.exact_hits, stats.uncacheable, stats.size) == (1, 1, 2, 2)


def test_the_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    analyzer = Analyzer(max_entries=2)
    analyzer.analyze("SELECT a FROM t", "postgres")
    analyzer.analyze("SELECT b FROM t", "postgres")
    analyzer.analyze("SELECT a FROM t", "postgres")  # a is now the most recent
    analyzer.analyze("SELECT c FROM t", "postgres")  # evicts b
    assert analyzer.statistics().size == 2
    analyzer.analyze("SELECT a FROM t", "postgres")
    analyzer.analyze("SELECT b FROM t", "postgres")
    stats = analyzer.statistics()
    assert (stats.hits, stats.misses) == (2, 4)
    with pytest.raises(ValueError):
        Analyzer(max_entries=0)


# --- fingerprints and text routines --------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 42;", "select abalance from pgbench_accounts where aid = ?;"),
        ("SELECT t1.c2 FROM t1 WHERE x IN (1, 2.5) AND y = 'it''s'", "select t1.c2 from t1 where x in (?, ?) and y = ?"),
        ("SELECT * FROM t WHERE a = $1 AND b = '/* -- ? #'", "select * from t where a = $1 and b = ?"),
        ('SELECT "Mixed  Case", 7 FROM t', 'SELECT "Mixed  Case", ? FROM t'),
        ("SELECT 1 -- comment", None),
        ("SELECT /* c */ 1", None),
        ("SELECT $$x$$", None),
        ("SELECT E'\\n'", None),
        ("SELECT 'unterminated", None),
        ("SELECT data ? 'key' FROM t", None),
        ("SELECT 'caf\u00e9'", None),
        ('SELECT "unterminated FROM t', None),
    ],
)
def test_postgres_fingerprints(sql: str, expected: str | None) -> None:
    assert fingerprint(sql, "postgres") == expected


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT `a'b`, 'c' FROM t WHERE id = 3", "SELECT `a'b`, ? FROM t WHERE id = ?"),
        ("SELECT 1abc, 2 FROM t", "select 1abc, ? from t"),
        ('SELECT "x" FROM t', None),
        ("SELECT 'say \"hi\"' FROM t", "select ? from t"),
        ("SELECT 1 # comment", None),
        ("SELECT 'a\\'b'", None),
        ("SELECT 1 /*!50000 , 2 */", None),
    ],
)
def test_mysql_fingerprints(sql: str, expected: str | None) -> None:
    assert fingerprint(sql, "mysql") == expected


def test_the_full_lexer_knows_each_dialects_quoting() -> None:
    assert redact("SELECT 'a\\'b', \"c\", `d` FROM t # x", "mysql") == "SELECT ?, ?, `d` FROM t"
    assert redact("SELECT 'a\\', \"c\" FROM t", "postgres") == 'SELECT ?, "c" FROM t'
    dashes = "SELECT 1 --x; SELECT 2"  # a comment in PostgreSQL, a double minus in MySQL
    assert lex(dashes, "postgres").separators == ()
    assert lex(dashes, "mysql").separators == (dashes.index(";"),)
    assert lex("SELECT 1 /* /* */ ; */", "postgres").separators == ()
    assert lex("SELECT 1 /* /* */ ; */", "mysql").separators == (18,)
    assert lex("SELECT 'open", "postgres").unterminated


def test_executable_comments_are_unwrapped_in_place() -> None:
    text = "SELECT 1 /*!50000 , 2 */, '/*!x' /*M!100100 , 3*/ /* plain */"
    unwrapped = unwrap_executable_comments(text)
    assert len(unwrapped) == len(text)
    assert unwrapped.split() == ["SELECT", "1", ",", "2", ",", "'/*!x'", ",", "3", "/*", "plain", "*/"]
