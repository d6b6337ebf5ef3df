"""The catalogue of named findings the statement analysis can report.

Guardrails name these in ``detect = [...]``; a bundle naming a finding that is not here is refused
when it is loaded. Each finding has a default weight (its share of the 0-100 risk score) and a
sentence that explains it to a reviewer.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class FindingKind:
    name: str
    weight: int
    sentence: str


_CATALOGUE = [
    FindingKind("unparsable", 100, "the statement could not be parsed, so nothing about it is known"),
    FindingKind("opaque-command", 80, "the statement parses only as an opaque command"),
    FindingKind("drop", 90, "drops a database object"),
    FindingKind("truncate", 90, "truncates a table"),
    FindingKind("delete-without-where", 80, "deletes every row of a table (no WHERE clause)"),
    FindingKind("update-without-where", 70, "updates every row of a table (no WHERE clause)"),
    FindingKind("ddl", 50, "changes the schema"),
    FindingKind("dcl", 70, "changes privileges or roles"),
    FindingKind("copy-program", 100, "runs a program on the database server through COPY"),
    FindingKind("copy-file", 80, "reads or writes a file on the database server through COPY"),
    FindingKind("file-access", 90, "reads or writes files on the database server"),
    FindingKind("dangerous-function", 70, "calls a function with side effects outside the query"),
    FindingKind("sleep", 30, "deliberately delays the server"),
    FindingKind("set-role", 70, "changes the effective role of the connection"),
    FindingKind("set-config", 40, "changes server configuration for the session"),
    FindingKind("write-in-cte", 50, "writes data inside a WITH clause"),
    FindingKind("select-into", 40, "creates a table from a query"),
    FindingKind("explain-analyze-write", 60, "EXPLAIN ANALYZE actually runs the write it explains"),
    FindingKind("procedural-code", 60, "runs procedural code (DO block or CALL) Bastion cannot see into"),
    FindingKind("dynamic-sql", 60, "runs SQL prepared earlier or built at run time"),
    FindingKind("multi-statement", 10, "one message carries several statements"),
    FindingKind("no-limit", 5, "reads without a LIMIT"),
    FindingKind("function-call", 60, "uses the protocol's fast-path function call"),
    # added with the PostgreSQL/MySQL statement analysis (bastion.policies.analysis)
    FindingKind("dynamic-sql-unseen", 90, "runs SQL text Bastion cannot read (it is not a literal)"),
    FindingKind(
        "unknown-prepared", 90, "runs a prepared statement or cursor Bastion did not see being prepared"
    ),
    FindingKind(
        "lexer-mismatch", 100, "Bastion's two readings of the text disagree on where statements end"
    ),
    FindingKind(
        "odd-characters",
        90,
        "contains characters the server and Bastion may read differently (unusual whitespace or "
        "control characters)",
    ),
    FindingKind(
        "lexer-setting",
        90,
        "changes how the server reads quotes, escapes or bytes, which could blind the analysis",
    ),
    FindingKind("set-global", 80, "changes server-wide configuration"),
    FindingKind("load-library", 100, "loads a shared library or plugin into the database server"),
    FindingKind(
        "untrusted-language", 90, "defines code in an untrusted language that runs on the server"
    ),
    FindingKind("os-command", 100, "runs an operating-system command on the database server"),
    FindingKind("admin-command", 80, "runs a server administration command"),
    FindingKind("load-local-file", 60, "loads a file from the client machine into a table"),
    FindingKind(
        "search-path",
        30,
        "changes the schema search path or current database, so unqualified names resolve elsewhere",
    ),
    FindingKind(
        "unknown-function", 10, "calls a function Bastion does not know, which may have side effects"
    ),
]

FINDINGS: dict[str, FindingKind] = {kind.name: kind for kind in _CATALOGUE}
