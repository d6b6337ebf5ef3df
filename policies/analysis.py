"""Statement analysis for PostgreSQL and MySQL: what a statement reads, writes, calls and returns.

This is the only module of the project that imports sqlglot (its API moves between releases, so it
is kept in one place). Everything here is pure: no I/O, no trio, no pluggy.

How a text is judged
--------------------
* The text is split into statements by sqlglot's tokenizer, and split again by Bastion's own lexer
  (:mod:`bastion.policies.fingerprint`); if the two disagree on where statements end, or the text
  holds characters the server and the tokenizer may read differently, the whole text is
  ``unknown``. MySQL executable comments (``/*! … */``) are unwrapped first: MySQL runs them.
* Each statement is classified from its leading keywords and, where sqlglot understands it, from its
  full syntax tree, walking every node (CTEs, subqueries, function arguments). A statement that does
  not parse, parses as something that is not a statement, or parses only as sqlglot's opaque
  ``Command`` is ``unknown`` with a finding of weight 80 or more; a statement whose leading
  keywords alone classify it (``CREATE EXTENSION`` is DDL) keeps that kind but still carries the
  ``opaque-command`` finding. Nothing raises out of :func:`analyze`: an internal error is an
  ``unknown`` analysis with the ``unparsable`` finding.

The kind rule
-------------
``kind`` is the strongest effect of the statement, so a grant for a weaker kind never covers it:
``select`` < ``insert`` < ``update`` < ``merge`` < ``delete`` for data changes anywhere in the tree
(a ``DELETE`` inside a ``WITH`` makes a ``SELECT`` a ``delete``; an upsert is an ``update``; MySQL
``REPLACE`` deletes and inserts, so it is a ``delete``); creating a table from a query
(``SELECT … INTO t``, ``CREATE TABLE … AS``) is ``ddl``; ``EXPLAIN ANALYZE`` of a write has the
write's kind (it runs it), a plain ``EXPLAIN`` is ``explain``; ``EXECUTE name`` and ``FETCH`` have
the kind of the prepared statement or cursor they run (so ``execute`` itself is never reported: a
grant of ``select`` covers executing a prepared select and nothing else). ``writes`` lists every
``(effect, table)`` pair (effects: insert, update, delete, merge, create, alter, drop, truncate,
comment, grant, copy, refresh) for policies that want to be finer than one kind.

Lineage
-------
``output_columns`` follows each result column back to catalog columns through expressions,
functions, subqueries, CTEs (recursive ones to a fixed point), set operations, whole-row
references (``row_to_json(p)``, ``p.*``), ``RETURNING`` (with the values a statement writes) and the
SQL text of ``query_to_xml('…')``. sqlglot's qualifier (``sqlglot.optimizer.qualify``) expands stars
against the catalog, with USING/NATURAL merging; resolution is then done here, by PostgreSQL's rules,
because the qualifier does not know data-modifying CTEs. Anything that cannot be followed is
``traced=False``.

Search path
-----------
Unqualified names resolve along ``Catalog.search_path`` (``pg_catalog`` first in PostgreSQL). A
``SET search_path`` or MySQL ``USE`` applies to the rest of the same text and is reported in
``session_effect``; :func:`search_path_after` gives the new path for the caller's session catalog.

Prepared statements and cursors
-------------------------------
``analyze(..., prepared=mapping)`` reads the caller's per-session mapping and never changes it.
Within one text, statements see what earlier statements of the same text prepared. A ``PREPARE``
analysis has ``session_effect == "prepare"``, the name in ``statement_name`` and the analysis of the
prepared body in ``inner``; ``DEALLOCATE`` reports ``deallocate`` (or ``deallocate-all``); a
``DECLARE … CURSOR`` reports ``declare-cursor``, ``CLOSE`` ``close-cursor``/``close-all-cursors``,
``DISCARD ALL`` ``discard-all``. Once the server has confirmed that a statement succeeded, the caller
applies its effect with :func:`remember_prepared` (never before: a ``PREPARE`` that fails on the
server must not replace what the name meant). Cursors share the mapping under
:func:`cursor_key`, which cannot collide with a statement name.

Caching
-------
:class:`Analyzer` keeps a bounded LRU of analyses keyed by (fingerprint, dialect, catalog version),
with an exact-text fast path. An analysis whose verdict depends on a literal's value
(``depends_on_literals``: SQL text inside ``query_to_xml('…')``, a COPY target, ``set_config``'s
setting name…) is only ever reused for the identical text; one that depends on the session's
prepared statements (``depends_on_session``: ``EXECUTE``, ``FETCH``) is never cached.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from itertools import zip_longest
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.simplify import simplify
from sqlglot.schema import MappingSchema
from sqlglot.tokens import Token, TokenType

from bastion.policies.findings import FINDINGS
from bastion.policies.fingerprint import (
    MYSQL,
    POSTGRES,
    Lexed,
    canonical_dialect,
    digest,
    fingerprint,
    lex,
    unwrap_executable_comments,
)
from bastion.policies.model import Finding, Message, Request

__all__ = [
    "KINDS",
    "Analyzer",
    "CacheStatistics",
    "Catalog",
    "OutputColumn",
    "StatementAnalysis",
    "analyze",
    "cursor_key",
    "remember_prepared",
    "search_path_after",
    "to_request",
]

KINDS = (
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "ddl",
    "dcl",
    "tcl",
    "copy",
    "call",
    "do",
    "explain",
    "set",
    "show",
    "prepare",
    "execute",
    "utility",
    "unknown",
)

# A text longer than this is not parsed at all: parsing cost grows with length and the gateway
# judges statements inline (a 70 KiB multi-row INSERT takes about a third of a second). Bulk
# loads belong in COPY FROM STDIN or LOAD DATA LOCAL, whose data is not statement text.
MAX_SQL_LENGTH = 256 * 1024
# More statements than this in one message is not something an automated caller needs, and each
# one costs a parse.
MAX_STATEMENTS = 1000
# SQL text inside SQL text (query_to_xml('… query_to_xml(''…'') …')) is analysed this deep; deeper
# nesting is only ever an evasion attempt and is unknown.
MAX_NESTING = 3
# Recursive CTEs are analysed to a fixed point of their lineage; lineage only grows, so a handful
# of passes suffice for any real query and bound the work for a hostile one.
MAX_RECURSIVE_PASSES = 6
# Analyses an Analyzer keeps: one entry is a few kilobytes, so a few thousand statement shapes fit
# comfortably and cover the repertoire of the CI jobs and services behind one gateway.
DEFAULT_CACHE_ENTRIES = 4096

_WRITE_RANK = {"select": 0, "insert": 1, "update": 2, "merge": 3, "delete": 4}
_DML_KINDS = frozenset(_WRITE_RANK) - {"select"}

_SQLGLOT_DIALECT = {
    # every identifier is lower-cased, quoted or not, to match the lower-case catalog
    POSTGRES: "postgres, normalization_strategy=case_insensitive",
    MYSQL: "mysql, normalization_strategy=case_insensitive",
}

@functools.cache
def _sqlglot_dialect(dialect: str) -> Dialect:
    return Dialect.get_or_raise(_SQLGLOT_DIALECT[dialect])


# --- the catalog -------------------------------------------------------------------------------


def _freeze_tables(tables: Mapping[str, Iterable[str]]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType(
        {name.lower(): tuple(column.lower() for column in columns) for name, columns in tables.items()}
    )


def _lower_tuple(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    return tuple(value.lower() for value in values if value)


def _catalog_version(catalog: Catalog) -> str:
    tables = sorted(catalog.tables.items())
    text = "\n".join(f"{table}:{','.join(columns)}" for table, columns in tables)
    return digest(text + "|" + ",".join(catalog.search_path))


@attrs.frozen
class Catalog:
    """The target's real schema: qualified table (``schema.table``, lower-case) -> ordered columns.

    ``search_path`` is where unqualified names are looked up: PostgreSQL's search path (``public``
    by default; ``pg_catalog`` is searched first unless listed, as the server does), MySQL's current
    database (``(database,)``; empty when there is none). ``version`` keys caches: two catalogs are
    equal when their version and search path are, so a caller that names versions itself must
    change the version whenever the tables change; when not given it is a digest of the content.
    Table and column names are lower-cased: tables whose names differ only in case are merged.
    """

    tables: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=dict, converter=_freeze_tables, eq=False, hash=False, repr=False
    )
    search_path: tuple[str, ...] = attrs.field(default=("public",), converter=_lower_tuple)
    version: str = attrs.field(default=attrs.Factory(_catalog_version, takes_self=True))

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Sequence[Any]],
        search_path: Iterable[str] = ("public",),
        version: str | None = None,
    ) -> Catalog:
        """Build from ``(table_schema, table_name, column_name, ordinal_position)`` rows.

        These are the columns of ``information_schema.columns`` in both PostgreSQL and MySQL; rows
        may come in any order. For MySQL pass ``search_path=(current_database,)``.
        """
        collected: dict[str, list[tuple[int, str]]] = {}
        for table_schema, table_name, column_name, ordinal_position in rows:
            qualified = f"{table_schema}.{table_name}".lower()
            collected.setdefault(qualified, []).append((int(ordinal_position), str(column_name)))
        tables = {name: [column for _, column in sorted(found)] for name, found in collected.items()}
        if version is None:
            return cls(tables, search_path)
        return cls(tables, search_path, version)

    @classmethod
    def empty(cls, dialect: str) -> Catalog:
        """No tables known; PostgreSQL's default search path, no current MySQL database."""
        return cls({}, ("public",) if canonical_dialect(dialect) == POSTGRES else ())

    def columns(self, table: str) -> tuple[str, ...] | None:
        return self.tables.get(table)

    def with_search_path(self, search_path: Iterable[str]) -> Catalog:
        """The same tables seen from another search path (a new version: caches must not mix)."""
        path = _lower_tuple(search_path)
        return Catalog(self.tables, path, digest(f"{self.version}|{','.join(path)}"))

    def resolve(self, name: str, dialect: str = POSTGRES) -> str:
        """The qualified name an unqualified table name refers to, as the server would find it."""
        name = name.lower()
        schemas = self.search_path
        if dialect == POSTGRES and "pg_catalog" not in schemas:
            schemas = ("pg_catalog", *schemas)
        for schema in schemas:
            if f"{schema}.{name}" in self.tables:
                return f"{schema}.{name}"
        if dialect == POSTGRES and name.startswith("pg_"):
            return f"pg_catalog.{name}"  # system catalogs are found before any user schema
        return f"{self.search_path[0]}.{name}" if self.search_path else name


@functools.lru_cache(maxsize=8)
def _mapping_schema(catalog: Catalog, dialect: str) -> MappingSchema | None:
    nested: dict[str, dict[str, dict[str, str]]] = {}
    for qualified, columns in catalog.tables.items():
        schema, _, table = qualified.rpartition(".")
        if schema and columns:
            nested.setdefault(schema, {})[table] = {column: "unknown" for column in columns}
    if not nested:
        return None
    return MappingSchema(nested, dialect=_sqlglot_dialect(dialect), normalize=False)


# --- results -----------------------------------------------------------------------------------


@attrs.frozen
class OutputColumn:
    """One column of the result a statement returns, with the catalog columns it derives from.

    ``traced`` is False when the value passes through something the analysis cannot see into (an
    unknown or user-defined function, a table not in the catalog, a MySQL user variable, a
    whole-row reference it cannot expand): ``sources`` is then a lower bound. ``name`` is advisory
    (PostgreSQL's naming); match result columns by position.
    """

    name: str
    sources: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    traced: bool = True


@attrs.frozen
class CacheStatistics:
    hits: int
    misses: int
    uncacheable: int
    size: int
    exact_hits: int = 0


@attrs.frozen
class StatementAnalysis:
    """What one statement does. Frozen, shareable, cached by :class:`Analyzer`.

    ``tables_*`` are ``schema.table`` and ``columns_read`` ``schema.table.column``, lower-case,
    resolved against the catalog (a table the catalog does not know is qualified with the first
    schema of the search path). ``output_columns`` describes the rows the statement returns, in
    order; ``output_complete`` is False when more columns may follow that the analysis cannot list
    (``SELECT *`` over an unknown table). ``redacted_text`` has every literal replaced by ``?``;
    ``fingerprint`` identifies the statement's shape (equal for statements differing only in
    literal values). See the module documentation for ``kind``, ``writes`` and the prepared
    statement fields.
    """

    kind: str
    dialect: str
    tables_read: frozenset[str] = frozenset()
    tables_written: frozenset[str] = frozenset()
    columns_read: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()
    has_where: bool = False
    has_limit: bool = False
    output_columns: tuple[OutputColumn, ...] = ()
    output_complete: bool = True
    findings: tuple[Finding, ...] = ()
    fingerprint: str = ""
    redacted_text: str = ""
    writes: frozenset[tuple[str, str]] = frozenset()
    position: int = 0
    statement_count: int = 1
    statement_name: str | None = None
    inner: StatementAnalysis | None = None
    session_effect: str = ""
    depends_on_literals: bool = False
    depends_on_session: bool = False

    @property
    def risk(self) -> int:
        return min(100, sum(finding.weight for finding in self.findings))

    @property
    def finding_names(self) -> frozenset[str]:
        return frozenset(finding.name for finding in self.findings)

    @property
    def tables(self) -> frozenset[str]:
        return self.tables_read | self.tables_written


def cursor_key(name: str) -> str:
    """The key under which a cursor's analysis lives in the ``prepared`` mapping.

    A NUL cannot occur in a PostgreSQL or MySQL identifier, so this never equals a statement name.
    """
    return "\x00cursor:" + name


def remember_prepared(
    prepared: MutableMapping[str, StatementAnalysis], analyses: Iterable[StatementAnalysis]
) -> None:
    """Apply the session effects of statements the server confirmed, in order, to ``prepared``."""
    for analysis in analyses:
        effect, name = analysis.session_effect, analysis.statement_name
        if effect == "prepare" and name is not None and analysis.inner is not None:
            prepared[name] = analysis.inner
        elif effect == "deallocate" and name is not None:
            prepared.pop(name, None)
        elif effect == "deallocate-all":
            for key in [key for key in prepared if not key.startswith("\x00")]:
                del prepared[key]
        elif effect == "declare-cursor" and name is not None and analysis.inner is not None:
            prepared[cursor_key(name)] = analysis.inner
        elif effect == "close-cursor" and name is not None:
            prepared.pop(cursor_key(name), None)
        elif effect == "close-all-cursors":
            for key in [key for key in prepared if key.startswith("\x00")]:
                del prepared[key]
        elif effect == "discard-all":
            prepared.clear()


def search_path_after(analysis: StatementAnalysis) -> tuple[str, ...] | None:
    """The search path a statement sets (``SET search_path``, MySQL ``USE``), if Bastion can tell.

    The caller should then analyse the session's later statements with
    ``catalog.with_search_path(path)``. ``RESET search_path`` and ``SET search_path TO DEFAULT``
    report the effect with no path: the caller restores the path it started the session with.
    """
    if analysis.session_effect not in ("search-path", "use") or not analysis.statement_name:
        return None
    path = tuple(part for part in analysis.statement_name.split(",") if part)
    return None if path in ((), ("default",)) else path


def to_request(analysis: StatementAnalysis, message: Message) -> Request:
    """The protocol-neutral request the authorization phase judges."""
    return Request(
        message=message,
        action=analysis.kind,
        tables_read=analysis.tables_read,
        tables_written=analysis.tables_written,
        columns_read=analysis.columns_read,
        functions=analysis.functions,
        findings=analysis.findings,
        fingerprint=analysis.fingerprint,
        redacted_text=analysis.redacted_text,
        columns_complete=analysis.output_complete,
        analysis=analysis,
    )


# --- function knowledge ------------------------------------------------------------------------

# Functions that read, write or list files on the database server.
_FILE_FUNCTIONS = frozenset(
    {
        "pg_read_file",
        "pg_read_binary_file",
        "pg_ls_dir",
        "pg_stat_file",
        "pg_ls_logdir",
        "pg_ls_waldir",
        "pg_ls_tmpdir",
        "pg_ls_archive_statusdir",
        "pg_ls_logicalsnapdir",
        "pg_ls_logicalmapdir",
        "pg_ls_replslotdir",
        "pg_file_write",
        "pg_file_read",
        "pg_file_rename",
        "pg_file_unlink",
        "pg_file_sync",
        "pg_logdir_ls",
        "lo_import",
        "lo_export",
        "load_file",
    }
)
# Functions that delay the server on purpose (or block on a lock or replication position).
_SLEEP_FUNCTIONS = frozenset(
    {
        "pg_sleep",
        "pg_sleep_for",
        "pg_sleep_until",
        "sleep",
        "benchmark",
        "get_lock",
        "master_pos_wait",
        "source_pos_wait",
        "wait_for_executed_gtid_set",
        "wait_until_sql_thread_after_gtids",
    }
)
# Functions with effects outside the query: other sessions, configuration, replication, large
# objects, sequences.
_SIDE_EFFECT_FUNCTIONS = frozenset(
    {
        "set_config",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_promote",
        "pg_switch_wal",
        "pg_switch_xlog",
        "pg_create_restore_point",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_backup_start",
        "pg_backup_stop",
        "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot",
        "pg_copy_physical_replication_slot",
        "pg_copy_logical_replication_slot",
        "pg_drop_replication_slot",
        "pg_replication_slot_advance",
        "pg_logical_slot_get_changes",
        "pg_logical_slot_peek_changes",
        "pg_logical_slot_get_binary_changes",
        "pg_logical_slot_peek_binary_changes",
        "pg_logical_emit_message",
        "pg_replication_origin_create",
        "pg_replication_origin_drop",
        "pg_replication_origin_advance",
        "pg_replication_origin_session_setup",
        "pg_stat_reset",
        "pg_stat_reset_shared",
        "pg_stat_reset_single_table_counters",
        "pg_stat_reset_single_function_counters",
        "pg_stat_reset_slru",
        "pg_stat_reset_replication_slot",
        "pg_wal_replay_pause",
        "pg_wal_replay_resume",
        "pg_log_backend_memory_contexts",
        "pg_import_system_collations",
        "pg_notify",
        "lo_from_bytea",
        "lo_create",
        "lo_creat",
        "lo_unlink",
        "lo_put",
        "lo_truncate",
        "lo_open",
        "lowrite",
        "setval",
    }
)
# UDFs that run operating-system commands (lib_mysqludf_sys and friends).
_OS_COMMAND_FUNCTIONS = frozenset({"sys_exec", "sys_eval", "sys_bineval"})
# Functions that execute SQL text given as an argument: name -> positions of SQL text arguments.
_SQL_TEXT_FUNCTIONS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "query_to_xml": (0,),
        "query_to_xmlschema": (0,),
        "query_to_xml_and_xmlschema": (0,),
        "ts_stat": (0,),
        "ts_rewrite": (1,),
        "crosstab": (0, 1),
        "crosstab2": (0,),
        "crosstab3": (0,),
        "crosstab4": (0,),
        "pg_background_launch": (0,),
    }
)
# Functions that read a whole table named by an argument: name -> position of the table name.
_TABLE_NAME_FUNCTIONS: Mapping[str, int] = MappingProxyType(
    {"table_to_xml": 0, "table_to_xmlschema": 0, "table_to_xml_and_xmlschema": 0, "connectby": 0}
)
# Functions that read data Bastion cannot enumerate (every table of a schema, a cursor).
_OPAQUE_READ_FUNCTIONS = frozenset(
    {
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
    }
)
# Built-in functions sqlglot does not model (it parses them as anonymous calls) whose result is
# computed from their arguments only: lineage passes through them and they are not "unknown".
_KNOWN_FUNCTIONS = frozenset(
    {
        # PostgreSQL: JSON, rows, arrays
        "row_to_json", "to_json", "to_jsonb", "json_build_object", "jsonb_build_object",
        "json_build_array", "jsonb_build_array", "json_object_agg", "jsonb_object_agg", "jsonb_agg",
        "json_agg", "array_to_json", "json_strip_nulls", "jsonb_strip_nulls", "jsonb_set",
        "jsonb_insert", "jsonb_pretty", "jsonb_path_query", "jsonb_path_query_array",
        "jsonb_path_query_first", "jsonb_path_exists", "jsonb_path_match", "json_extract_path",
        "json_extract_path_text", "jsonb_extract_path", "jsonb_extract_path_text",
        "json_array_length", "jsonb_array_length", "json_typeof", "jsonb_typeof", "json_each",
        "jsonb_each", "json_each_text", "jsonb_each_text", "json_object_keys", "jsonb_object_keys",
        "json_array_elements", "jsonb_array_elements", "json_array_elements_text",
        "jsonb_array_elements_text", "json_populate_record", "jsonb_populate_record",
        "json_populate_recordset", "jsonb_populate_recordset", "json_to_record", "jsonb_to_record",
        "json_to_recordset", "jsonb_to_recordset", "row", "array_length", "array_position",
        "array_positions", "array_remove", "array_replace", "array_append", "array_prepend",
        "array_cat", "array_dims", "array_lower", "array_upper", "array_ndims", "cardinality",
        "array_fill", "generate_subscripts", "string_to_table", "regexp_matches", "regexp_match",
        "regexp_split_to_array", "regexp_split_to_table", "regexp_count", "regexp_instr",
        "regexp_substr", "regexp_like",
        # PostgreSQL: strings, numbers, dates
        "quote_ident", "quote_literal", "quote_nullable", "format_type", "pg_typeof", "age",
        "date_part", "make_date", "make_time", "make_timestamp", "make_timestamptz",
        "make_interval", "justify_days", "justify_hours", "justify_interval", "to_timestamp",
        "to_date", "to_number", "clock_timestamp", "statement_timestamp",
        "transaction_timestamp", "timeofday", "isfinite", "date_bin", "abs", "ceil", "ceiling",
        "floor", "mod", "power", "sqrt", "cbrt", "trunc", "sign", "log", "log10", "ln", "exp",
        "div", "gcd", "lcm", "degrees", "radians", "pi", "width_bucket", "bit_length",
        "octet_length", "overlay", "btrim", "ltrim", "rtrim", "rpad", "lpad", "starts_with",
        "translate", "right", "to_hex", "convert_from", "convert_to", "sha224", "sha256",
        "sha384", "sha512", "digest", "hmac", "crypt", "gen_salt", "pgp_sym_encrypt",
        "pgp_sym_decrypt", "gen_random_uuid", "uuid_generate_v4", "setseed", "to_tsvector",
        "to_tsquery", "plainto_tsquery", "phraseto_tsquery", "websearch_to_tsquery", "ts_rank",
        "ts_rank_cd", "ts_headline", "similarity", "unaccent", "num_nonnulls", "num_nulls",
        "string_agg", "array_agg", "bool_and", "bool_or", "every", "bit_and", "bit_or", "mode",
        "percentile_cont", "percentile_disc", "stddev", "stddev_pop", "stddev_samp", "variance",
        "var_pop", "var_samp", "corr", "covar_pop", "covar_samp", "row_number", "rank",
        "dense_rank", "percent_rank", "cume_dist", "ntile", "lag", "lead", "first_value",
        "last_value", "nth_value", "xmlagg", "xmlelement", "xmlforest", "current_database",
        "current_schema", "current_schemas", "version", "pg_backend_pid", "txid_current",
        "inet_client_addr", "inet_server_addr", "current_setting", "has_table_privilege",
        "has_column_privilege", "has_schema_privilege", "has_database_privilege",
        "pg_has_role", "pg_get_userbyid", "obj_description", "col_description",
        "pg_table_size", "pg_relation_size", "pg_total_relation_size", "pg_size_pretty",
        "pg_get_expr", "pg_get_indexdef", "pg_get_viewdef", "pg_get_constraintdef",
        "pg_get_functiondef", "pg_encoding_to_char", "format",
        # MySQL
        "ifnull", "date_format", "str_to_date", "unix_timestamp", "from_unixtime", "curdate",
        "curtime", "sysdate", "utc_timestamp", "utc_date", "datediff", "timestampdiff",
        "timestampadd", "date_add", "date_sub", "adddate", "subdate", "dayofweek", "dayofmonth",
        "dayofyear", "weekday", "yearweek", "last_day", "field", "elt", "find_in_set",
        "make_set", "export_set", "instr", "locate", "lcase", "ucase", "mid", "substring_index",
        "soundex", "space", "strcmp", "conv", "bin", "oct", "crc32", "sha1", "sha2",
        "aes_encrypt", "aes_decrypt", "compress", "uncompress", "json_object", "json_array",
        "json_extract", "json_unquote", "json_contains", "json_keys", "json_length", "json_set",
        "json_insert", "json_replace", "json_remove", "json_merge_patch", "json_arrayagg",
        "json_objectagg", "json_table", "json_valid", "json_quote", "any_value", "found_rows",
        "row_count", "last_insert_id", "uuid", "uuid_short", "database", "schema", "user",
        "current_user", "connection_id", "inet_aton", "inet_ntoa", "is_ipv4", "is_ipv6",
        "bit_count", "values", "char", "insert", "quote", "weight_string",
    }
)
# Table functions whose rows are computed from their arguments only.
_KNOWN_TABLE_FUNCTIONS = frozenset(
    {
        "unnest", "explode", "generate_series", "explodinggenerateseries", "generate_subscripts",
        "json_each", "jsonb_each", "json_each_text", "jsonb_each_text", "json_array_elements",
        "jsonb_array_elements", "json_array_elements_text", "jsonb_array_elements_text",
        "json_to_record", "jsonb_to_record", "json_to_recordset", "jsonb_to_recordset",
        "json_populate_record", "jsonb_populate_record", "json_populate_recordset",
        "jsonb_populate_recordset", "regexp_split_to_table", "string_to_table", "regexp_matches",
        "json_table", "jsonb_object_keys", "json_object_keys",
    }
)
# Schemas whose functions are the server's own: a call qualified with another schema is a
# user-defined function even when it has a built-in's name.
_SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema", "mysql", "sys"})
# PostgreSQL system columns every table has; they carry no row data.
_SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid", "oid"})

# --- settings knowledge --------------------------------------------------------------------------

_ROLE_SETTINGS = frozenset({"role", "session_authorization"})
_SEARCH_PATH_SETTINGS = frozenset({"search_path"})
# Settings that change how the server reads later statements' text: after them Bastion's reading
# and the server's may differ.
_LEXER_SETTINGS = frozenset(
    {"standard_conforming_strings", "backslash_quote", "sql_mode", "character_set_client"}
)
_ENCODING_SETTINGS = frozenset(
    {"client_encoding", "names", "character set", "charset", "character_set_connection"}
)
# Encodings in which a backslash or quote byte can never be the tail of a multi-byte character.
_SAFE_ENCODINGS = frozenset(
    {"utf8", "utf-8", "utf8mb4", "utf8mb3", "unicode", "sql_ascii", "ascii", "latin1", "default"}
)
# Session settings drivers and tools set routinely; changing them has no security meaning.
_BENIGN_SETTINGS = frozenset(
    {
        "application_name", "datestyle", "intervalstyle", "timezone", "time zone", "time_zone",
        "extra_float_digits", "statement_timeout", "lock_timeout", "idle_session_timeout",
        "idle_in_transaction_session_timeout", "client_min_messages", "bytea_output",
        "default_transaction_isolation", "transaction_isolation", "default_transaction_read_only",
        "transaction_read_only", "tx_isolation", "tx_read_only", "lc_messages", "lc_monetary",
        "lc_numeric", "lc_time", "autocommit",
        "character_set_results", "collation_connection", "max_execution_time", "net_read_timeout",
        "net_write_timeout", "wait_timeout", "interactive_timeout", "sql_select_limit",
        "group_concat_max_len", "session_track_schema", "session_track_state_change",
        "session_track_system_variables", "sql_safe_updates", "jit", "work_mem",
    }
)

_STRING_TOKENS = frozenset(
    {
        TokenType.STRING,
        TokenType.NATIONAL_STRING,
        TokenType.HEREDOC_STRING,
        TokenType.BYTE_STRING,
        TokenType.RAW_STRING,
        TokenType.UNICODE_STRING,
        TokenType.BIT_STRING,
        TokenType.HEX_STRING,
    }
)

_QUERY_TYPES = (exp.Query, exp.Values)
_DML_TYPES = (exp.Insert, exp.Update, exp.Delete, exp.Merge)
_STATEMENT_TYPES = (
    exp.Query,
    exp.Values,
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Merge,
    exp.Create,
    exp.Drop,
    exp.Alter,
    exp.TruncateTable,
    exp.Comment,
    exp.Grant,
    exp.Revoke,
    exp.Set,
    exp.Transaction,
    exp.Commit,
    exp.Rollback,
    exp.Kill,
)
_TABLE_LIKE_KINDS = frozenset(
    {"TABLE", "VIEW", "MATERIALIZED VIEW", "SEQUENCE", "FOREIGN TABLE", "TEMPORARY TABLE"}
)
_GENERATED_ALIAS = re.compile(r"_col_\d+")
# sqlglot models some syntax as function nodes (AND, CASE, CAST, EXISTS, ARRAY[…]): not calls
_SYNTAX_FUNCTIONS = tuple(
    getattr(exp, name)
    for name in ("Connector", "Case", "Cast", "TryCast", "Collate", "Exists", "Array")
    if hasattr(exp, name)
)
# sqlglot >= 2x names a whole-row reference TableColumn once qualified; older versions do not
_TABLE_COLUMN = getattr(exp, "TableColumn", None)


# --- statement facts, gathered while walking -----------------------------------------------------

_Lineage = tuple[frozenset[str], bool]
_NO_LINEAGE: _Lineage = (frozenset(), True)
_UNTRACED: _Lineage = (frozenset(), False)


def _union(lineages: Iterable[_Lineage]) -> _Lineage:
    sources: set[str] = set()
    traced = True
    for lineage_sources, lineage_traced in lineages:
        sources |= lineage_sources
        traced = traced and lineage_traced
    return frozenset(sources), traced


class _Session:
    """What one call of :func:`analyze` knows: dialect, catalog, and the prepared statements so far."""

    def __init__(
        self, dialect: str, catalog: Catalog, prepared: Mapping[str, StatementAnalysis] | None
    ) -> None:
        self.dialect = dialect
        self.catalog = catalog
        self.prepared: dict[str, StatementAnalysis] = dict(prepared or {})
        self.sqlglot = _sqlglot_dialect(dialect)
        self._lexed: dict[str, Lexed] = {}

    def lex(self, text: str) -> Lexed:
        lexed = self._lexed.get(text)
        if lexed is None:
            lexed = self._lexed[text] = lex(text, self.dialect)
        return lexed


class _Facts:
    """A mutable accumulator for one statement; :meth:`build` freezes it."""

    def __init__(self, session: _Session, text: str, depth: int) -> None:
        self.session = session
        self.dialect = session.dialect
        self.catalog = session.catalog
        self.text = text
        self.depth = depth
        self.kind = "unknown"
        self.tables_referenced: set[str] = set()
        self.tables_written: set[str] = set()
        self.columns_read: set[str] = set()
        self.functions: set[str] = set()
        self.findings: dict[str, set[str]] = {}
        self.writes: set[tuple[str, str]] = set()
        self.has_where = False
        self.has_limit = False
        self.outputs: list[OutputColumn] = []
        self.output_complete = True
        self.statement_name: str | None = None
        self.inner: StatementAnalysis | None = None
        self.session_effect = ""
        self.depends_on_literals = False
        self.depends_on_session = False
        # what the output of a call that runs SQL text or reads a named table derives from,
        # by the mark the call's node carries (the mark survives the qualifier's copy of the tree)
        self.call_sources: dict[int, list[_Lineage]] = {}

    def find(self, name: str, detail: str = "") -> None:
        if name not in FINDINGS:  # a programming error; fail closed rather than drop it
            name, detail = "unparsable", f"unknown finding {name}"
        details = self.findings.setdefault(name, set())
        if detail:
            details.add(detail)

    def write(self, effect: str, table: str) -> None:
        self.tables_written.add(table)
        self.writes.add((effect, table))

    def merge(
        self,
        other: StatementAnalysis,
        findings: bool = True,
        as_read: bool = False,
        functions: bool = True,
    ) -> None:
        """Take over what another analysis (an inner or dynamic statement) found."""
        self.tables_referenced |= other.tables_read
        if as_read:
            self.tables_referenced |= other.tables_written
        else:
            self.tables_written |= other.tables_written
            self.writes |= other.writes
        self.columns_read |= other.columns_read
        if functions:
            self.functions |= other.functions
        if findings:
            for finding in other.findings:
                details = self.findings.setdefault(finding.name, set())
                details |= _finding_details(finding)
        self.depends_on_literals |= other.depends_on_literals
        self.depends_on_session |= other.depends_on_session

    def fail(self, name: str, detail: str = "") -> None:
        self.kind = "unknown"
        self.find(name, detail)

    def build(self) -> StatementAnalysis:
        if self.kind not in KINDS:
            self.fail("unparsable", f"unexpected kind {self.kind}")
        if self.kind == "unknown" and not any(FINDINGS[name].weight >= 80 for name in self.findings):
            self.find("unparsable")
        lexed = self.session.lex(self.text)
        read_tables = set(self.tables_referenced)
        for column in self.columns_read:
            table = column.rpartition(".")[0]
            if table in self.tables_written:
                read_tables.add(table)
        if self.kind == "select" and read_tables and not self.has_limit:
            self.find("no-limit")
        return StatementAnalysis(
            kind=self.kind,
            dialect=self.dialect,
            tables_read=frozenset(read_tables),
            tables_written=frozenset(self.tables_written),
            columns_read=frozenset(self.columns_read),
            functions=frozenset(self.functions),
            has_where=self.has_where,
            has_limit=self.has_limit,
            output_columns=tuple(self.outputs),
            output_complete=self.output_complete,
            findings=_findings(self.findings),
            fingerprint=digest(lexed.normalized),
            redacted_text=lexed.redacted,
            writes=frozenset(self.writes),
            statement_name=self.statement_name,
            inner=self.inner,
            session_effect=self.session_effect,
            depends_on_literals=self.depends_on_literals,
            depends_on_session=self.depends_on_session,
        )


def _finding_details(finding: Finding) -> set[str]:
    base = FINDINGS[finding.name].sentence if finding.name in FINDINGS else ""
    if finding.sentence == base or not finding.sentence.startswith(base + ": "):
        return set()
    return set(finding.sentence[len(base) + 2 :].split(", "))


def _findings(found: Mapping[str, set[str]]) -> tuple[Finding, ...]:
    result = []
    for name, details in found.items():
        kind = FINDINGS[name]
        sentence = kind.sentence + (": " + ", ".join(sorted(details)) if details else "")
        result.append(Finding(name, kind.weight, sentence))
    return tuple(sorted(result, key=lambda finding: (-finding.weight, finding.name)))


def _unknown(text: str, dialect: str, name: str, detail: str = "") -> StatementAnalysis:
    facts = _Facts(_Session(dialect, Catalog.empty(dialect), None), text, 0)
    facts.fail(name, detail)
    return facts.build()


# --- tokens --------------------------------------------------------------------------------------


class _Statement:
    """The tokens of one statement and the text their offsets index into."""

    __slots__ = ("tokens", "source")

    def __init__(self, tokens: list[Token], source: str) -> None:
        self.tokens = tokens
        self.source = source

    @property
    def text(self) -> str:
        if not self.tokens:
            return ""
        return self.source[self.tokens[0].start : self.tokens[-1].end + 1]

    def word(self, index: int) -> str:
        """The upper-cased keyword or bare word at ``index`` ('' for literals, quoted names, end)."""
        if index >= len(self.tokens):
            return ""
        token = self.tokens[index]
        if token.token_type in _STRING_TOKENS or token.token_type == TokenType.IDENTIFIER:
            return ""
        # sqlglot folds some keyword pairs into one token (MySQL's "LOCK TABLES"): the first counts
        return token.text.split(None, 1)[0].upper() if token.text.strip() else ""

    def sub(self, start: int, end: int | None = None) -> _Statement:
        return _Statement(self.tokens[start:end], self.source)


def _name(token: Token) -> str:
    """An object name as the server folds it: quoted names keep their case."""
    if token.token_type == TokenType.IDENTIFIER:
        return token.text
    return token.text.lower()


def _is_string(token: Token) -> bool:
    return token.token_type in _STRING_TOKENS


def _matching_paren(tokens: Sequence[Token], start: int) -> int:
    """Index of the parenthesis closing the one at ``start``; -1 if it never closes."""
    depth = 0
    for index in range(start, len(tokens)):
        kind = tokens[index].token_type
        if kind == TokenType.L_PAREN:
            depth += 1
        elif kind == TokenType.R_PAREN:
            depth -= 1
            if depth == 0:
                return index
    return -1


# --- the entry points ----------------------------------------------------------------------------


def analyze(
    sql: str,
    dialect: str,
    catalog: Catalog | None = None,
    prepared: Mapping[str, StatementAnalysis] | None = None,
) -> tuple[StatementAnalysis, ...]:
    """One analysis per statement of ``sql`` (none for an empty or comment-only text).

    ``dialect`` is ``postgres`` or ``mysql`` (a ValueError otherwise: that is configuration, not
    input). ``catalog`` is the target's schema (an empty one when None). ``prepared`` is the
    session's mapping of prepared statement names (and :func:`cursor_key` cursors) to analyses;
    it is read, never changed (see :func:`remember_prepared`). Never raises for any text.
    """
    dialect = canonical_dialect(dialect)
    session = _Session(dialect, catalog or Catalog.empty(dialect), prepared)
    try:
        return _analyze_text(sql, session, 0)
    except Exception as error:  # noqa: BLE001 - fail closed on anything, never raise to the gateway
        detail = f"internal error {type(error).__name__}"
        return (_unknown(_shortened(sql), dialect, "unparsable", detail),)


def _shortened(sql: str) -> str:
    # redaction only needs a prefix of an oversized text; the lexer replaces a cut literal entirely
    return sql if len(sql) <= 4096 else sql[:4096]


def _analyze_text(sql: str, session: _Session, depth: int) -> tuple[StatementAnalysis, ...]:
    dialect = session.dialect
    if depth > MAX_NESTING:
        return (_unknown(_shortened(sql), dialect, "dynamic-sql-unseen", "nested too deeply"),)
    if len(sql) > MAX_SQL_LENGTH:
        return (_unknown(_shortened(sql), dialect, "unparsable", "statement too long"),)
    text = unwrap_executable_comments(sql) if dialect == MYSQL else sql
    lexed = session.lex(text)
    if lexed.odd_characters:
        return (_unknown(text, dialect, "odd-characters"),)
    if lexed.unterminated:
        return (_unknown(text, dialect, "unparsable", "unterminated string, identifier or comment"),)
    try:
        statements = _split(text, session, lexed.separators)
    except SqlglotError:
        return (_unknown(text, dialect, "unparsable", "the text does not tokenize"),)
    if statements is None:
        return (_unknown(text, dialect, "lexer-mismatch"),)
    if len(statements) > MAX_STATEMENTS:
        return (_unknown(_shortened(text), dialect, "unparsable", "too many statements"),)
    results = []
    for statement in statements:
        analysis = _analyze_statement(statement, session, depth)
        remember_prepared(session.prepared, (analysis,))
        new_path = search_path_after(analysis)
        if new_path is not None:
            # later statements of the same text resolve names the way the server then will
            session.catalog = session.catalog.with_search_path(new_path)
        results.append(analysis)
    if len(results) > 1:
        count = len(results)
        results = [
            attrs.evolve(
                analysis,
                position=position,
                statement_count=count,
                findings=_with_finding(analysis.findings, "multi-statement"),
            )
            for position, analysis in enumerate(results)
        ]
    return tuple(results)


def _with_finding(findings: tuple[Finding, ...], name: str) -> tuple[Finding, ...]:
    found: dict[str, set[str]] = {finding.name: _finding_details(finding) for finding in findings}
    found.setdefault(name, set())
    return _findings(found)


def _analyze_statement(statement: _Statement, session: _Session, depth: int) -> StatementAnalysis:
    facts = _Facts(session, statement.text, depth)
    try:
        _route(statement, facts)
    except RecursionError:
        facts.fail("unparsable", "nested too deeply")
    except SqlglotError:
        facts.fail("unparsable")
    except _Unparsable as error:
        facts.fail("unparsable", str(error))
    except Exception as error:  # noqa: BLE001 - fail closed
        facts.fail("unparsable", f"internal error {type(error).__name__}")
    return facts.build()


class _Unparsable(Exception):
    """The statement is not what its leading keywords promise."""


def _split(text: str, session: _Session, separators: tuple[int, ...]) -> list[_Statement] | None:
    """Statements of ``text`` as sqlglot tokenizes them; None when Bastion's lexer disagrees."""
    tokenizer = session.sqlglot.tokenizer()
    tokens = tokenizer.tokenize(text)
    found = tuple(token.start for token in tokens if token.token_type == TokenType.SEMICOLON)
    if found != separators:
        return None
    statements: list[_Statement] = []
    current: list[Token] = []
    commands = session.sqlglot.tokenizer_class.COMMANDS
    for token in [*tokens, None]:
        if token is not None and token.token_type != TokenType.SEMICOLON:
            current.append(token)
            continue
        if current:
            if current[0].token_type in commands:
                # sqlglot folds the rest of a "command" statement into one string token; tokenize
                # it plainly again, behind a placeholder word so that it is not a command any more
                end = token.start if token is not None else len(text)
                source = "x " + text[current[0].start : end]
                statements.append(_Statement(tokenizer.tokenize(source)[1:], source))
            else:
                statements.append(_Statement(current, text))
        current = []
    return statements


# --- routing by leading keywords ------------------------------------------------------------------


def _route(statement: _Statement, facts: _Facts) -> None:
    head = statement.word(0)
    routes = _POSTGRES_ROUTES if facts.dialect == POSTGRES else _MYSQL_ROUTES
    handler = routes.get(head) or _COMMON_ROUTES.get(head) or _parsed
    handler(statement, facts)


def _parse_tree(statement: _Statement, facts: _Facts) -> exp.Expr:
    try:
        trees = facts.session.sqlglot.parser().parse(statement.tokens, statement.source)
    except SqlglotError:
        tokens = _without_negative_scales(statement.tokens)
        if tokens is None:
            raise
        trees = facts.session.sqlglot.parser().parse(tokens, statement.source)
    found = [tree for tree in trees if tree is not None and not isinstance(tree, exp.Semicolon)]
    if len(found) != 1:
        raise _Unparsable("not exactly one statement")
    return found[0]


_NEGATIVE_SCALE = (TokenType.L_PAREN, TokenType.NUMBER, TokenType.COMMA, TokenType.DASH, TokenType.NUMBER, TokenType.R_PAREN)


def _without_negative_scales(tokens: Sequence[Token]) -> list[Token] | None:
    """The tokens with ``numeric(p, -s)`` read as ``numeric(p, s)`` (PostgreSQL 15 allows a negative
    scale; sqlglot does not parse it). Only the type modifier changes, so tables, columns and
    findings are those of the statement; None when there is no such modifier."""
    drop = [
        index + 4
        for index in range(len(tokens) - len(_NEGATIVE_SCALE))
        if tokens[index].token_type == TokenType.DECIMAL
        and all(tokens[index + 1 + k].token_type == kind for k, kind in enumerate(_NEGATIVE_SCALE))
    ]
    if not drop:
        return None
    return [token for index, token in enumerate(tokens) if index not in drop]


def _parsed(statement: _Statement, facts: _Facts) -> None:
    """Statements sqlglot understands: queries, DML, most DDL, GRANT/REVOKE."""
    if facts.dialect == MYSQL:
        for index in range(len(statement.tokens) - 1):
            if statement.word(index) == "INTO" and statement.word(index + 1) in ("OUTFILE", "DUMPFILE"):
                _select_into_file(statement, index, facts)
                return
    tree = _parse_tree(statement, facts)
    if isinstance(tree, exp.Command):
        _opaque(statement, facts)
        return
    if not isinstance(tree, _STATEMENT_TYPES):
        raise _Unparsable("parses as an expression, not a statement")
    _analyze_tree(tree, facts)


_INTO_FILE_CLAUSE_END = frozenset(
    {"FROM", "WHERE", "GROUP", "HAVING", "ORDER", "LIMIT", "FOR", "LOCK", "UNION", "WINDOW"}
)


def _select_into_file(statement: _Statement, start: int, facts: _Facts) -> None:
    """MySQL ``SELECT … INTO OUTFILE|DUMPFILE``: the query, plus a file written on the server."""
    facts.find("file-access", "SELECT INTO " + statement.word(start + 1))
    end = start + 2
    while end < len(statement.tokens) and statement.word(end) not in _INTO_FILE_CLAUSE_END:
        end += 1
    query = _Statement(statement.tokens[:start] + statement.tokens[end:], statement.source)
    tree = _parse_tree(query, facts)
    if not isinstance(tree, exp.Query):
        raise _Unparsable("INTO OUTFILE outside a query")
    _analyze_tree(tree, facts)
    facts.kind = "copy"
    facts.outputs, facts.output_complete = [], True


def _opaque(statement: _Statement, facts: _Facts) -> None:
    head = statement.word(0)
    detail = " ".join(word for word in (head, statement.word(1)) if word)
    if head in ("CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT", "RENAME", "IMPORT"):
        # the leading keywords say what it is, even if the rest is opaque
        facts.kind = "ddl"
        facts.find("ddl")
        facts.find("opaque-command", detail)
        if head == "DROP":
            facts.find("drop")
        if head == "TRUNCATE":
            facts.find("truncate")
        return
    facts.fail("opaque-command", detail)


def _simple(kind: str) -> Any:
    """A handler for statements whose leading keyword says all Bastion needs to know."""

    def handler(statement: _Statement, facts: _Facts) -> None:
        facts.kind = kind
        facts.output_complete = kind != "show"

    return handler


def _transaction(statement: _Statement, facts: _Facts) -> None:
    head = statement.word(0)
    if head == "START" and statement.word(1) != "TRANSACTION":
        # MySQL START REPLICA / SLAVE / GROUP_REPLICATION
        facts.kind = "utility"
        facts.find("admin-command", f"START {statement.word(1)}")
        return
    facts.kind = "tcl"


# --- EXPLAIN, PREPARE, EXECUTE, cursors ----------------------------------------------------------

_FALSE_WORDS = frozenset({"FALSE", "OFF", "0", "NO"})
_MYSQL_EXPLAINABLE = frozenset(
    {"SELECT", "WITH", "INSERT", "UPDATE", "DELETE", "REPLACE", "TABLE", "VALUES"}
)


def _explain(statement: _Statement, facts: _Facts) -> None:
    tokens = statement.tokens
    index, runs = 1, False
    if facts.dialect == POSTGRES:
        if index < len(tokens) and tokens[index].token_type == TokenType.L_PAREN:
            close = _matching_paren(tokens, index)
            if close < 0:
                raise _Unparsable("unclosed EXPLAIN options")
            option: list[Token] = []
            for token in [*tokens[index + 1 : close], None]:
                if token is not None and token.token_type != TokenType.COMMA:
                    option.append(token)
                    continue
                if option and option[0].text.upper() in ("ANALYZE", "ANALYSE"):
                    # the value may be a number (0/1): the verdict depends on a literal
                    facts.depends_on_literals = True
                    values = [token.text.upper() for token in option[1:]]
                    runs = runs or not (len(values) == 1 and values[0] in _FALSE_WORDS)
                option = []
            index = close + 1
        else:
            while statement.word(index) in ("ANALYZE", "ANALYSE", "VERBOSE"):
                runs = runs or statement.word(index) != "VERBOSE"
                index += 1
    else:
        while True:
            word = statement.word(index)
            if word in ("EXTENDED", "PARTITIONS"):
                index += 1
            elif word == "ANALYZE":
                runs, index = True, index + 1
            elif word == "FORMAT":
                index += 3  # FORMAT = TRADITIONAL|JSON|TREE
            else:
                break
        first = tokens[index] if index < len(tokens) else None
        if first is None or (
            statement.word(index) not in _MYSQL_EXPLAINABLE and first.token_type != TokenType.L_PAREN
        ):
            # DESCRIBE t / EXPLAIN t [column] / EXPLAIN FOR CONNECTION n: metadata only
            facts.kind = "show"
            facts.output_complete = False
            if first is not None and statement.word(index) != "FOR":
                facts.tables_referenced.add(_table_name(statement, index, facts)[0])
            return
    inner_statement = statement.sub(index)
    if not inner_statement.tokens:
        raise _Unparsable("EXPLAIN without a statement")
    inner = _analyze_statement(inner_statement, facts.session, facts.depth)
    facts.inner = inner
    if facts.dialect == POSTGRES:
        facts.outputs, facts.output_complete = [OutputColumn("QUERY PLAN")], True
    else:
        facts.outputs, facts.output_complete = [], False
    if inner.kind == "unknown":
        facts.merge(inner)
        facts.kind = "unknown"
        return
    if runs:
        facts.merge(inner)
        facts.has_where, facts.has_limit = inner.has_where, inner.has_limit
        if inner.kind in _DML_KINDS or inner.kind == "ddl" or inner.tables_written:
            facts.kind = inner.kind
            facts.find("explain-analyze-write", inner.kind)
        else:
            facts.kind = "explain"
    else:
        facts.kind = "explain"
        facts.merge(inner, findings=False, as_read=True, functions=False)


def _prepare(statement: _Statement, facts: _Facts) -> None:
    if statement.word(1) == "TRANSACTION":  # PostgreSQL two-phase commit
        facts.kind = "tcl"
        return
    if len(statement.tokens) < 2:
        raise _Unparsable("PREPARE without a name")
    name = _statement_name(statement.tokens[1], facts)
    if facts.dialect == POSTGRES:
        index = 2
        if index < len(statement.tokens) and statement.tokens[index].token_type == TokenType.L_PAREN:
            index = _matching_paren(statement.tokens, index) + 1
            if index == 0:
                raise _Unparsable("unclosed parameter types")
        if statement.word(index) != "AS":
            raise _Unparsable("PREPARE without AS")
        inner = _analyze_statement(statement.sub(index + 1), facts.session, facts.depth)
    else:
        if statement.word(2) != "FROM" or len(statement.tokens) < 4:
            raise _Unparsable("PREPARE without FROM")
        source = statement.tokens[3]
        if _is_string(source) and len(statement.tokens) == 4:
            facts.depends_on_literals = True
            analyses = _analyze_text(source.text, facts.session, facts.depth + 1)
            if len(analyses) == 1:
                inner = analyses[0]
            else:
                inner = _unknown(source.text, facts.dialect, "unparsable", "not exactly one statement")
        else:
            detail = "prepared from a variable"
            inner = _unknown(statement.text, facts.dialect, "dynamic-sql-unseen", detail)
    facts.kind = "prepare"
    facts.statement_name = name
    facts.inner = inner
    facts.session_effect = "prepare"
    facts.depends_on_literals |= inner.depends_on_literals
    facts.depends_on_session |= inner.depends_on_session


def _statement_name(token: Token, facts: _Facts) -> str:
    if token.token_type in _STRING_TOKENS:
        raise _Unparsable("a literal where a name belongs")
    # MySQL prepared statement names are not case-sensitive, quoted or not
    return token.text.lower() if facts.dialect == MYSQL else _name(token)


def _execute(statement: _Statement, facts: _Facts) -> None:
    if len(statement.tokens) < 2:
        raise _Unparsable("EXECUTE without a name")
    name = _statement_name(statement.tokens[1], facts)
    facts.depends_on_session = True
    tokens = statement.tokens
    if facts.dialect == POSTGRES and len(tokens) > 2:
        if tokens[2].token_type != TokenType.L_PAREN or _matching_paren(tokens, 2) != len(tokens) - 1:
            raise _Unparsable("EXECUTE parameters")
        _expressions(tokens[3:-1], statement, facts)
    elif facts.dialect == MYSQL and len(tokens) > 2:
        if statement.word(2) != "USING":
            raise _Unparsable("EXECUTE parameters")
        _expressions(tokens[3:], statement, facts)
    _run_remembered(facts.session.prepared.get(name), name, facts)


def _run_remembered(remembered: StatementAnalysis | None, name: str, facts: _Facts) -> None:
    facts.statement_name = name
    if remembered is None:
        facts.fail("unknown-prepared", name)
        return
    facts.inner = remembered
    facts.kind = remembered.kind
    facts.merge(remembered)
    facts.has_where, facts.has_limit = remembered.has_where, remembered.has_limit
    facts.outputs = list(remembered.output_columns)
    facts.output_complete = remembered.output_complete


def _deallocate(statement: _Statement, facts: _Facts) -> None:
    index = 2 if statement.word(1) == "PREPARE" else 1
    if index >= len(statement.tokens):
        raise _Unparsable("DEALLOCATE without a name")
    facts.kind = "prepare"
    if statement.word(index) == "ALL" and facts.dialect == POSTGRES:
        facts.session_effect = "deallocate-all"
        return
    facts.session_effect = "deallocate"
    facts.statement_name = _statement_name(statement.tokens[index], facts)


def _declare(statement: _Statement, facts: _Facts) -> None:
    """``DECLARE name … CURSOR … FOR query`` (PostgreSQL)."""
    tokens = statement.tokens
    if len(tokens) < 2:
        raise _Unparsable("DECLARE without a name")
    name = _name(tokens[1])
    index = 2
    while index < len(tokens) and statement.word(index) != "CURSOR":
        index += 1
    while index < len(tokens) and statement.word(index) != "FOR":
        index += 1
    if index >= len(tokens) - 1:
        raise _Unparsable("DECLARE without FOR")
    inner = _analyze_statement(statement.sub(index + 1), facts.session, facts.depth)
    facts.inner = inner
    facts.statement_name = name
    facts.session_effect = "declare-cursor"
    facts.merge(inner)
    facts.kind = inner.kind
    facts.has_where, facts.has_limit = inner.has_where, inner.has_limit


def _fetch(statement: _Statement, facts: _Facts) -> None:
    """``FETCH|MOVE [direction] [FROM|IN] name``: the cursor's query runs further."""
    if len(statement.tokens) < 2:
        raise _Unparsable("FETCH without a cursor")
    name = _name(statement.tokens[-1])
    facts.depends_on_session = True
    _run_remembered(facts.session.prepared.get(cursor_key(name)), name, facts)
    if statement.word(0) == "MOVE":
        facts.outputs, facts.output_complete = [], True


def _close(statement: _Statement, facts: _Facts) -> None:
    facts.kind = "utility"
    if statement.word(1) == "ALL":
        facts.session_effect = "close-all-cursors"
    elif len(statement.tokens) == 2:
        facts.session_effect = "close-cursor"
        facts.statement_name = _name(statement.tokens[1])
    else:
        raise _Unparsable("CLOSE")


def _discard(statement: _Statement, facts: _Facts) -> None:
    facts.kind = "utility"
    if statement.word(1) == "ALL":
        # DISCARD ALL also resets the role to the session user
        facts.find("set-role", "DISCARD ALL")
        facts.session_effect = "discard-all"


# --- procedural code -----------------------------------------------------------------------------

_UNTRUSTED_LANGUAGES = frozenset(
    {
        "c", "internal", "plpythonu", "plpython2u", "plpython3u", "plperlu", "pltclu", "plsh",
        "pljavau", "plr",
    }
)
_DANGEROUS_NAMES = _FILE_FUNCTIONS | _SLEEP_FUNCTIONS | _SIDE_EFFECT_FUNCTIONS | _OS_COMMAND_FUNCTIONS
_HANDLED_NAMES = (
    _DANGEROUS_NAMES
    | frozenset(_SQL_TEXT_FUNCTIONS)
    | frozenset(_TABLE_NAME_FUNCTIONS)
    | _OPAQUE_READ_FUNCTIONS
)
_CALLED_NAME = re.compile(r"([a-z_][a-z0-9_$]*)\s*\(")


def _do(statement: _Statement, facts: _Facts) -> None:
    if facts.dialect == MYSQL:
        # MySQL DO evaluates expressions and discards the results
        facts.kind = "do"
        _expressions(statement.tokens[1:], statement, facts)
        return
    facts.kind = "do"
    facts.find("procedural-code", "DO block")
    bodies = [token.text for token in statement.tokens[1:] if _is_string(token)]
    language = ""
    for index in range(1, len(statement.tokens) - 1):
        if statement.word(index) == "LANGUAGE":
            language = statement.tokens[index + 1].text.lower()
    if language in _UNTRUSTED_LANGUAGES:
        facts.find("untrusted-language", language)
    # Bastion cannot analyse PL/pgSQL, but a dangerous call spelled out in the body is worth naming
    for body in bodies:
        facts.depends_on_literals = True
        for called in _CALLED_NAME.findall(body.lower()):
            if called in _DANGEROUS_NAMES or called.startswith("dblink"):
                _function_findings(called, None, facts)
        if re.search(r"\bexecute\b", body, re.IGNORECASE):
            facts.find("dynamic-sql", "EXECUTE in a DO block")


def _call(statement: _Statement, facts: _Facts) -> None:
    facts.kind = "call"
    if len(statement.tokens) < 2:
        raise _Unparsable("CALL without a procedure")
    facts.find("procedural-code", "CALL " + ".".join(_dotted_name(statement, 1, facts)[0]))
    _expressions(statement.tokens[1:], statement, facts)


def _expressions(tokens: Sequence[Token], statement: _Statement, facts: _Facts) -> None:
    """Analyse a list of expressions (CALL arguments, EXECUTE parameters) as a SELECT list."""
    if not tokens:
        return
    select = Token(TokenType.SELECT, "SELECT", start=tokens[0].start, end=tokens[0].start)
    tree = _parse_tree(_Statement([select, *tokens], statement.source), facts)
    if not isinstance(tree, exp.Select) or tree.args.get("from_") is not None:
        raise _Unparsable("not a list of expressions")
    _prepare_tables(tree, facts)
    _Walker(facts).collect(tree)
    _Lineage(facts).query(tree, None)


# --- SET, RESET, USE ------------------------------------------------------------------------------


def _setting(name: str, values: Sequence[str], facts: _Facts, from_literal: bool = False) -> None:
    """Findings for changing setting ``name`` to ``values``.

    ``from_literal``: the name came from a string literal (``set_config('…', …)``), so it is not
    repeated in a finding sentence (the audit trail never keeps a literal).
    """
    name = name.lower()
    if name in _ROLE_SETTINGS:
        facts.find("set-role", name)
    elif name in _SEARCH_PATH_SETTINGS:
        facts.find("search-path")
        facts.session_effect = "search-path"
        facts.statement_name = ",".join(values) if values else None
    elif name in _LEXER_SETTINGS:
        facts.find("lexer-setting", name)
    elif name in _ENCODING_SETTINGS:
        if not values or values[0].lower() not in _SAFE_ENCODINGS:
            facts.find("lexer-setting", name)
    elif name not in _BENIGN_SETTINGS:
        facts.find("set-config", "" if from_literal else name)


def _value_words(tokens: Sequence[Token]) -> list[str]:
    """The values of a SET as the server reads them: names folded, strings as written."""
    return [
        token.text if token.token_type in _STRING_TOKENS else _name(token)
        for token in tokens
        if token.token_type not in (TokenType.COMMA, TokenType.L_PAREN, TokenType.R_PAREN)
    ]


def _set(statement: _Statement, facts: _Facts) -> None:
    facts.kind = "set"
    facts.depends_on_literals = True  # values decide encoding and search path findings
    if facts.dialect == POSTGRES:
        _set_postgres(statement, facts)
    else:
        _set_mysql(statement, facts)


def _set_postgres(statement: _Statement, facts: _Facts) -> None:
    index = 1
    if statement.word(index) == "LOCAL" or (
        statement.word(index) == "SESSION"
        and statement.word(index + 1) not in ("AUTHORIZATION", "CHARACTERISTICS")
    ):
        index += 1
    word, following = statement.word(index), statement.word(index + 1)
    if word == "ROLE" or (word == "SESSION" and following == "AUTHORIZATION"):
        facts.find("set-role", "SET " + word + (" AUTHORIZATION" if word == "SESSION" else ""))
        return
    if word in ("TRANSACTION", "CONSTRAINTS") or (word == "SESSION" and following == "CHARACTERISTICS"):
        facts.kind = "tcl"
        return
    if word == "TIME" and following == "ZONE":
        return
    tokens = statement.tokens
    end = index
    while end < len(tokens) and tokens[end].token_type != TokenType.EQ and statement.word(end) != "TO":
        end += 1
    if end >= len(tokens) or end == index:
        raise _Unparsable("SET without a value")
    name = "".join(token.text for token in tokens[index:end]).lower()
    _setting(name, _value_words(tokens[end + 1 :]), facts)


def _split_commas(tokens: Sequence[Token]) -> list[list[Token]]:
    parts: list[list[Token]] = [[]]
    depth = 0
    for token in tokens:
        if token.token_type == TokenType.L_PAREN:
            depth += 1
        elif token.token_type == TokenType.R_PAREN:
            depth -= 1
        if token.token_type == TokenType.COMMA and depth == 0:
            parts.append([])
        else:
            parts[-1].append(token)
    return parts


def _set_mysql(statement: _Statement, facts: _Facts) -> None:
    first, second = statement.word(1), statement.word(2)
    if first == "PASSWORD" or (first == "DEFAULT" and second == "ROLE"):
        facts.kind = "dcl"
        facts.find("dcl", f"SET {first}")
        return
    if first == "ROLE":
        facts.find("set-role", "SET ROLE")
        return
    if first == "TRANSACTION" or (first in ("SESSION", "GLOBAL") and second == "TRANSACTION"):
        facts.kind = "tcl"
        return
    if first == "RESOURCE":
        facts.kind = "utility"
        return
    has_expressions = False
    for assignment in _split_commas(statement.tokens[1:]):
        part = _Statement(assignment, statement.source)
        if not assignment:
            raise _Unparsable("empty SET assignment")
        word = part.word(0)
        scope_global = False
        if word in ("GLOBAL", "PERSIST", "PERSIST_ONLY"):
            scope_global, assignment = True, assignment[1:]
        elif word in ("SESSION", "LOCAL"):
            assignment = assignment[1:]
        part = _Statement(assignment, statement.source)
        if not assignment:
            raise _Unparsable("empty SET assignment")
        if assignment[0].token_type == TokenType.SESSION_PARAMETER:
            # @@name, @@global.name, @@session.name, @@persist.name
            rest = [token.text.lower() for token in assignment[1:] if token.token_type != TokenType.EQ]
            if len(rest) >= 3 and assignment[2].token_type == TokenType.DOT:
                scope_global = scope_global or rest[0] in ("global", "persist", "persist_only")
                assignment = assignment[3:]
            else:
                assignment = assignment[1:]
            part = _Statement(assignment, statement.source)
        if scope_global:
            facts.find("set-global")
        word = part.word(0)
        if word in ("NAMES", "CHARSET") or (word == "CHARACTER" and part.word(1) == "SET"):
            values = _value_words(assignment[2 if word == "CHARACTER" else 1 :])
            _setting("names", values[:1], facts)
            continue
        assigns = (TokenType.EQ, TokenType.COLON_EQ)
        equals = next(
            (index for index, token in enumerate(assignment) if token.token_type in assigns), -1
        )
        if equals <= 0:
            raise _Unparsable("SET without a value")
        value = assignment[equals + 1 :]
        if any(token.token_type in (TokenType.L_PAREN, TokenType.SELECT) for token in value):
            has_expressions = True
        if assignment[0].token_type == TokenType.PARAMETER:
            continue  # a user variable: harmless itself, its value is walked below
        _setting("".join(token.text for token in assignment[:equals]), _value_words(value), facts)
    if has_expressions:
        tree = _parse_tree(statement, facts)
        if not isinstance(tree, exp.Set):
            raise _Unparsable("SET with expressions")
        _prepare_tables(tree, facts)
        _Walker(facts).collect(tree)
        lineage = _Lineage(facts)
        for node in tree.find_all(exp.Subquery):
            lineage.query(node, None)


def _reset(statement: _Statement, facts: _Facts) -> None:
    if facts.dialect == MYSQL:  # RESET MASTER / REPLICA / PERSIST / QUERY CACHE
        facts.kind = "utility"
        facts.find("admin-command", "RESET " + statement.word(1))
        return
    facts.kind = "set"
    word = statement.word(1)
    if word in ("ROLE", "ALL") or (word == "SESSION" and statement.word(2) == "AUTHORIZATION"):
        facts.find("set-role", "RESET " + word)
    elif word == "SEARCH_PATH":
        facts.find("search-path")
        facts.session_effect = "search-path"
    elif len(statement.tokens) >= 2:
        _setting("".join(token.text for token in statement.tokens[1:]), ["default"], facts)
    else:
        raise _Unparsable("RESET without a name")


def _use(statement: _Statement, facts: _Facts) -> None:
    if len(statement.tokens) != 2:
        raise _Unparsable("USE")
    facts.kind = "set"
    facts.find("search-path")
    facts.session_effect = "use"
    facts.statement_name = statement.tokens[1].text.lower()


def _alter_system(statement: _Statement, facts: _Facts) -> None:
    facts.kind = "set"
    facts.find("set-global", "ALTER SYSTEM")


# --- COPY and LOAD DATA ----------------------------------------------------------------------------


def _dotted_name(statement: _Statement, index: int, facts: _Facts) -> tuple[list[str], int]:
    """A possibly qualified name starting at ``index``: its parts and the index after it."""
    tokens = statement.tokens
    parts: list[str] = []
    while index < len(tokens):
        token = tokens[index]
        if token.token_type in _STRING_TOKENS or token.token_type in (
            TokenType.L_PAREN,
            TokenType.R_PAREN,
            TokenType.COMMA,
            TokenType.DOT,
        ):
            break
        parts.append(token.text.lower())
        index += 1
        if index < len(tokens) and tokens[index].token_type == TokenType.DOT:
            index += 1
            continue
        break
    if not parts:
        raise _Unparsable("a name is missing")
    return parts, index


def _table_name(statement: _Statement, index: int, facts: _Facts) -> tuple[str, int]:
    parts, index = _dotted_name(statement, index, facts)
    if len(parts) == 1:
        return facts.catalog.resolve(parts[0], facts.dialect), index
    return ".".join(parts[-2:]), index


def _copy(statement: _Statement, facts: _Facts) -> None:
    """PostgreSQL ``COPY table|(query) FROM|TO STDIN|STDOUT|'file'|PROGRAM 'command'``."""
    tokens = statement.tokens
    facts.kind = "copy"
    facts.depends_on_literals = True
    index = 1
    table: str | None = None
    columns: list[str] | None = None
    inner: StatementAnalysis | None = None
    if index < len(tokens) and tokens[index].token_type == TokenType.L_PAREN:
        close = _matching_paren(tokens, index)
        if close < 0:
            raise _Unparsable("unclosed COPY query")
        inner = _analyze_statement(statement.sub(index + 1, close), facts.session, facts.depth)
        index = close + 1
    else:
        table, index = _table_name(statement, index, facts)
        if index < len(tokens) and tokens[index].token_type == TokenType.L_PAREN:
            close = _matching_paren(tokens, index)
            if close < 0:
                raise _Unparsable("unclosed COPY column list")
            listed = tokens[index + 1 : close]
            columns = [_name(token) for token in listed if token.token_type != TokenType.COMMA]
            index = close + 1
    direction = statement.word(index)
    if direction not in ("FROM", "TO"):
        raise _Unparsable("COPY without FROM or TO")
    index += 1
    target = tokens[index] if index < len(tokens) else None
    if target is None:
        raise _Unparsable("COPY without a source or destination")
    word = statement.word(index)
    if word == "PROGRAM":
        facts.find("copy-program")
    elif _is_string(target):
        facts.find("copy-file", f"COPY {direction} a server file")
    elif word not in ("STDIN", "STDOUT"):
        raise _Unparsable("COPY to or from an unknown destination")
    if inner is not None:
        if direction != "TO" or inner.kind == "unknown":
            facts.merge(inner)
            facts.kind = "unknown"
            return
        facts.merge(inner)
        facts.inner = inner
        facts.outputs = list(inner.output_columns)
        facts.output_complete = inner.output_complete
        if inner.tables_written:
            facts.kind = inner.kind
        return
    assert table is not None
    known = facts.catalog.columns(table)
    chosen = columns if columns is not None else list(known or ())
    if direction == "FROM":
        facts.write("copy", table)
        return
    facts.tables_referenced.add(table)
    facts.output_complete = columns is not None or known is not None
    for column in chosen:
        traced = known is not None and column in known
        facts.columns_read.add(f"{table}.{column}")
        facts.outputs.append(OutputColumn(column, frozenset({f"{table}.{column}"}), traced))


def _load(statement: _Statement, facts: _Facts) -> None:
    if facts.dialect == POSTGRES:  # LOAD 'library'
        facts.kind = "utility"
        facts.find("load-library", "LOAD")
        return
    kind = statement.word(1)
    if kind == "INDEX":
        facts.kind = "utility"
        return
    if kind not in ("DATA", "XML"):
        raise _Unparsable("LOAD")
    facts.kind = "copy"
    facts.depends_on_literals = True
    index = 2
    local = False
    while statement.word(index) in ("LOW_PRIORITY", "CONCURRENT", "LOCAL"):
        local = local or statement.word(index) == "LOCAL"
        index += 1
    if statement.word(index) != "INFILE":
        raise _Unparsable("LOAD DATA without INFILE")
    if local:
        facts.find("load-local-file")
    else:
        facts.find("file-access", "LOAD DATA INFILE")
    while index < len(statement.tokens) - 1 and not (
        statement.word(index) == "INTO" and statement.word(index + 1) == "TABLE"
    ):
        index += 1
    if index >= len(statement.tokens) - 2:
        raise _Unparsable("LOAD DATA without INTO TABLE")
    table, _ = _table_name(statement, index + 2, facts)
    facts.write("copy", table)
    if statement.word(index - 1) == "REPLACE" or any(
        statement.word(position) == "REPLACE" for position in range(2, index)
    ):
        facts.write("delete", table)


def _replace(statement: _Statement, facts: _Facts) -> None:
    """MySQL ``REPLACE``: an INSERT that first deletes the rows it collides with."""
    first = statement.tokens[0]
    insert = Token(TokenType.INSERT, "INSERT", start=first.start, end=first.end)
    tree = _parse_tree(_Statement([insert, *statement.tokens[1:]], statement.source), facts)
    if not isinstance(tree, exp.Insert):
        raise _Unparsable("REPLACE")
    _analyze_tree(tree, facts, replace=True)


# --- DDL and DCL by keywords -------------------------------------------------------------------------

_CREATE_MODIFIERS = frozenset(
    {
        "OR", "REPLACE", "TEMP", "TEMPORARY", "UNLOGGED", "GLOBAL", "LOCAL", "UNIQUE", "RECURSIVE",
        "TRUSTED", "PROCEDURAL", "CONSTRAINT", "AGGREGATE", "ONLINE", "OFFLINE", "IF", "NOT", "EXISTS",
        "SQL", "SECURITY", "DEFINER", "INVOKER", "ALGORITHM", "UNDEFINED", "MERGE", "TEMPTABLE",
    }
)
_DCL_OBJECTS = frozenset({"ROLE", "USER", "GROUP", "POLICY"})


def _object_word(statement: _Statement) -> tuple[str, int]:
    index = 1
    while statement.word(index) in _CREATE_MODIFIERS or (
        index < len(statement.tokens) and statement.tokens[index].token_type == TokenType.EQ
    ):
        if statement.word(index) in ("DEFINER", "ALGORITHM") and statement.word(index + 1) == "=":
            index += 3
            continue
        index += 1
    return statement.word(index), index


def _ddl(statement: _Statement, facts: _Facts) -> None:
    head = statement.word(0)
    obj, index = _object_word(statement)
    if head == "DROP" and obj == "PREPARE":
        _deallocate(statement, facts)
        return
    if head == "ALTER" and obj == "SYSTEM":
        _alter_system(statement, facts)
        return
    if (
        obj in _DCL_OBJECTS
        or (head == "ALTER" and obj == "DEFAULT" and statement.word(index + 1) == "PRIVILEGES")
        or (head in ("DROP", "REASSIGN") and obj == "OWNED")
        or (head == "RENAME" and obj == "USER")
        or (head == "SECURITY" and obj == "LABEL")
    ):
        facts.kind = "dcl"
        facts.find("dcl", f"{head} {obj}")
        if head == "DROP":
            facts.find("drop", obj)
        return
    words = [statement.word(position) for position in range(len(statement.tokens))]
    for position, word in enumerate(words[:-1]):
        following = statement.tokens[position + 1].text.lower()
        if word == "LANGUAGE" and following in _UNTRUSTED_LANGUAGES:
            facts.find("untrusted-language", following)
        if word == "OWNER" and words[position + 1] == "TO":
            facts.find("dcl", "OWNER TO")
        if word == "LEVEL" and words[position + 1] == "SECURITY":
            facts.find("dcl", "ROW LEVEL SECURITY")
    if "SONAME" in words:
        facts.find("load-library", "SONAME")
    if head == "REFRESH":
        facts.kind = "utility"
        table, _ = _table_name(statement, index + 1 if obj == "VIEW" else index, facts)
        facts.write("refresh", table)
        return
    try:
        _parsed(statement, facts)
    except (SqlglotError, _Unparsable):
        _opaque(statement, facts)
    if "dcl" in facts.findings and facts.kind == "ddl":
        facts.kind = "dcl"


def _grant(statement: _Statement, facts: _Facts) -> None:
    facts.kind = "dcl"
    facts.find("dcl", statement.word(0))
    try:
        tree = _parse_tree(statement, facts)
    except (SqlglotError, _Unparsable):
        return
    if isinstance(tree, (exp.Grant, exp.Revoke)):
        securable = tree.args.get("securable")
        kind = str(tree.args.get("kind") or "TABLE").upper()
        if isinstance(securable, exp.Table) and kind == "TABLE":
            facts.write("grant", _qualified_table(securable, facts))


def _admin(statement: _Statement, facts: _Facts) -> None:
    facts.kind = "utility"
    facts.find("admin-command", statement.word(0))
    if statement.word(0) in ("INSTALL", "UNINSTALL"):
        facts.find("load-library", f"{statement.word(0)} {statement.word(1)}")


_COMMON_ROUTES = {
    "EXPLAIN": _explain,
    "PREPARE": _prepare,
    "EXECUTE": _execute,
    "DEALLOCATE": _deallocate,
    "DO": _do,
    "CALL": _call,
    "SET": _set,
    "RESET": _reset,
    "SHOW": _simple("show"),
    "BEGIN": _transaction,
    "START": _transaction,
    "COMMIT": _transaction,
    "ROLLBACK": _transaction,
    "SAVEPOINT": _transaction,
    "RELEASE": _transaction,
    "LOCK": _transaction,
    "GRANT": _grant,
    "REVOKE": _grant,
    "CREATE": _ddl,
    "ALTER": _ddl,
    "DROP": _ddl,
    "TRUNCATE": _ddl,
    "COMMENT": _ddl,
    "RENAME": _ddl,
    "ANALYZE": _simple("utility"),
    "LOAD": _load,
}
_POSTGRES_ROUTES = {
    "COPY": _copy,
    "DECLARE": _declare,
    "FETCH": _fetch,
    "MOVE": _fetch,
    "CLOSE": _close,
    "DISCARD": _discard,
    "END": _transaction,
    "ABORT": _transaction,
    "LISTEN": _simple("utility"),
    "UNLISTEN": _simple("utility"),
    "NOTIFY": _simple("utility"),
    "CHECKPOINT": _simple("utility"),
    "VACUUM": _simple("utility"),
    "CLUSTER": _simple("utility"),
    "REINDEX": _simple("utility"),
    "REFRESH": _ddl,
    "SECURITY": _ddl,
    "REASSIGN": _ddl,
    "IMPORT": _ddl,
}
_MYSQL_ROUTES = {
    "REPLACE": _replace,
    "USE": _use,
    "DESCRIBE": _explain,
    "DESC": _explain,
    "XA": _transaction,
    "UNLOCK": _transaction,
    "HANDLER": _opaque,  # reads rows through a cursor Bastion cannot follow
    "OPTIMIZE": _simple("utility"),
    "REPAIR": _simple("utility"),
    "CHECK": _simple("utility"),
    "CHECKSUM": _simple("utility"),
    "CACHE": _simple("utility"),
    "HELP": _simple("utility"),
    "FLUSH": _admin,
    "KILL": _admin,
    "SHUTDOWN": _admin,
    "RESTART": _admin,
    "PURGE": _admin,
    "CHANGE": _admin,
    "STOP": _admin,
    "BINLOG": _admin,
    "CLONE": _admin,
    "INSTALL": _admin,
    "UNINSTALL": _admin,
}


# --- syntax trees: tables, functions, writes ----------------------------------------------------------

_CTE_MARK = "bastion_cte"
_CALL_MARK = "bastion_call"
_TABLE_MARK = "bastion_table"


def _is_cte_reference(table: exp.Table) -> bool:
    if table.args.get("db") is not None:
        return False
    name = table.name.lower()
    node = table.parent
    while node is not None:
        with_ = node.args.get("with_")
        if with_ is not None and any(cte.alias_or_name.lower() == name for cte in with_.expressions):
            return True
        node = node.parent
    return False


def _prepare_tables(tree: exp.Expr, facts: _Facts) -> None:
    """Mark CTE references and resolve every other table name against the catalog's search path."""
    for table in tree.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            continue  # a table function, or a MySQL variable in SELECT … INTO @v
        if _is_cte_reference(table):
            table.meta[_CTE_MARK] = True
            continue
        table.meta[_TABLE_MARK] = _qualified_table(table, facts)


def _qualified_table(table: exp.Table, facts: _Facts) -> str:
    marked = table.meta.get(_TABLE_MARK)
    if marked:
        return marked
    name = table.name.lower()
    schema = table.db.lower() if table.args.get("db") is not None else ""
    return f"{schema}.{name}" if schema else facts.catalog.resolve(name, facts.dialect)


def _literal_text(node: exp.Expr | None) -> str | None:
    """The value of a string literal (through casts), or None if the argument is not one."""
    while isinstance(node, (exp.Cast, exp.Paren)):
        node = node.this
    if isinstance(node, exp.Literal) and node.is_string:
        return node.this
    if isinstance(node, (exp.RawString, exp.ByteString, exp.National, exp.UnicodeString)):
        return node.this if isinstance(node.this, str) else None
    return None


def _function_names(node: exp.Func) -> tuple[str, frozenset[str]]:
    """The function's name as called (lower-case) and every other name it is known by."""
    if isinstance(node, exp.Anonymous):
        this = node.this
        name = (this.name if isinstance(this, exp.Identifier) else str(this)).lower()
        return name, frozenset({name})
    name = node.sql_name().lower()
    aliases = {alias.lower() for alias in getattr(type(node), "_sql_names", ()) or ()}
    return name, frozenset(aliases | {name, node.key.lower()})


def _is_builtin(name: str, facts: _Facts) -> bool:
    """A server built-in: known here, or one sqlglot models (seen anonymous when schema-qualified)."""
    return name in _KNOWN_FUNCTIONS or name.upper() in facts.session.sqlglot.parser_class.FUNCTIONS


def _function_schema(node: exp.Func) -> str:
    parent = node.parent
    if isinstance(parent, exp.Dot) and parent.expression is node:
        qualifier = parent.this
        if isinstance(qualifier, (exp.Identifier, exp.Column, exp.Var)):
            return qualifier.name.lower()
    return ""


def _function_findings(name: str, node: exp.Func | None, facts: _Facts) -> None:
    """Findings for a call of ``name`` (``node`` gives its arguments when there is a tree)."""
    arguments = list(node.expressions) if isinstance(node, exp.Anonymous) else []
    if name in _FILE_FUNCTIONS:
        facts.find("file-access", name)
    if name in _SLEEP_FUNCTIONS:
        facts.find("sleep", name)
    if name in _OS_COMMAND_FUNCTIONS:
        facts.find("os-command", name)
    if name in _SIDE_EFFECT_FUNCTIONS:
        facts.find("dangerous-function", name)
    if name.startswith("dblink"):
        facts.find("dangerous-function", name)
        facts.find("dynamic-sql", name)
    if name == "set_config":
        facts.find("set-config", name)
        facts.depends_on_literals = True
        setting = _literal_text(arguments[0]) if arguments else None
        if setting is None:
            facts.find("set-role", "set_config with a computed setting name")
        else:
            value = [_literal_text(arguments[1]) or ""] if len(arguments) > 1 else []
            _setting(setting.strip(), value, facts, from_literal=True)
    if name in _OPAQUE_READ_FUNCTIONS:
        facts.find("dynamic-sql-unseen", name)
    if name in _SQL_TEXT_FUNCTIONS and node is not None:
        for position in _SQL_TEXT_FUNCTIONS[name]:
            if position >= len(arguments):
                continue
            text = _literal_text(arguments[position])
            if text is None:
                facts.find("dynamic-sql-unseen", name)
                continue
            facts.depends_on_literals = True
            facts.find("dynamic-sql", name)
            nested_analyses = _analyze_text(text, facts.session, facts.depth + 1)
            for nested in nested_analyses:
                facts.merge(nested)
                facts.call_sources.setdefault(_call_mark(node), []).extend(
                    (column.sources, column.traced and nested.output_complete)
                    for column in nested.output_columns
                )
    if name in _TABLE_NAME_FUNCTIONS and node is not None:
        position = _TABLE_NAME_FUNCTIONS[name]
        text = _literal_text(arguments[position]) if position < len(arguments) else None
        if text is None:
            facts.find("dynamic-sql-unseen", name)
        else:
            facts.depends_on_literals = True
            facts.find("dynamic-sql", name)
            table = _table_from_text(text, facts)
            facts.tables_referenced.add(table)
            known = facts.catalog.columns(table)
            for column in known or ():
                facts.columns_read.add(f"{table}.{column}")
            facts.call_sources[_call_mark(node)] = [
                (frozenset(f"{table}.{column}" for column in known or ()), known is not None)
            ]


def _call_mark(node: exp.Expr) -> int:
    mark = node.meta.get(_CALL_MARK)
    if mark is None:
        mark = node.meta[_CALL_MARK] = id(node)
    return mark


def _table_from_text(text: str, facts: _Facts) -> str:
    """A table named in a string (``'public.patients'``, ``'"Patients"'``), qualified."""
    parts = [part.strip().strip('"').lower() for part in text.split(".")]
    if len(parts) == 1:
        return facts.catalog.resolve(parts[0], facts.dialect)
    return ".".join(parts[-2:])


class _Walker:
    """Walks every node of a tree: functions, tables read, tables written and how."""

    def __init__(self, facts: _Facts) -> None:
        self.facts = facts
        self.targets: set[int] = set()  # Table nodes that are written, not read
        self.objects: set[int] = set()  # subtrees naming non-table objects (functions, indexes…)

    def collect(self, root: exp.Expr) -> None:
        for node in root.walk():
            if isinstance(node, exp.Hint):
                self.objects.add(id(node))  # optimizer hints name no functions that run
            self._writes(node, root)
        for node in root.walk(prune=lambda candidate: id(candidate) in self.objects):
            if id(node) in self.objects:
                continue
            if isinstance(node, exp.Func) and not isinstance(node, _SYNTAX_FUNCTIONS):
                self._function(node)
            elif isinstance(node, exp.Table):
                self._table(node)
            elif isinstance(node, exp.Command):
                self.facts.fail("opaque-command", "nested command")

    def _function(self, node: exp.Func) -> None:
        facts = self.facts
        name, aliases = _function_names(node)
        facts.functions.add(name)
        for alias in aliases:
            _function_findings(alias, node, facts)
        schema = _function_schema(node)
        dangerous = any(alias in _HANDLED_NAMES or alias.startswith("dblink") for alias in aliases)
        if isinstance(node, exp.Anonymous) and not dangerous:
            if not _is_builtin(name, facts) and name not in _KNOWN_TABLE_FUNCTIONS:
                facts.find("unknown-function", name)
            elif schema and schema not in _SYSTEM_SCHEMAS:
                facts.find("unknown-function", f"{schema}.{name}")

    def _table(self, node: exp.Table) -> None:
        if id(node) in self.targets or node.meta.get(_CTE_MARK):
            return
        if not isinstance(node.this, exp.Identifier):
            return
        self.facts.tables_referenced.add(_qualified_table(node, self.facts))

    def _target(self, node: exp.Expr | None, effect: str) -> str | None:
        if isinstance(node, exp.Schema):
            node = node.this
        if not isinstance(node, exp.Table) or not isinstance(node.this, exp.Identifier):
            return None
        self.targets.add(id(node))
        table = _qualified_table(node, self.facts)
        self.facts.write(effect, table)
        return table

    def _writes(self, node: exp.Expr, root: exp.Expr) -> None:
        facts = self.facts
        if isinstance(node, _DML_TYPES) and node is not root:
            if node.find_ancestor(exp.CTE) is not None:
                facts.find("write-in-cte", node.key.upper())
        if isinstance(node, exp.Insert):
            table = self._target(node.this, "insert")
            conflict = node.args.get("conflict")
            if table and conflict is not None:
                action = str(conflict.args.get("action") or "").upper()
                if conflict.args.get("duplicate") or "UPDATE" in action:
                    facts.write("update", table)
        elif isinstance(node, exp.Update):
            target = node.this
            self._target(target, "update")
            self._where(node, "update-without-where")
            joined = {
                joined_table.alias_or_name.lower(): joined_table
                for join in (target.args.get("joins") or [] if isinstance(target, exp.Table) else [])
                if isinstance(joined_table := join.this, exp.Table)
            }
            for assignment in node.expressions:
                column = assignment.this if isinstance(assignment, exp.EQ) else None
                if isinstance(column, exp.Column) and column.table.lower() in joined:
                    joined_table = joined[column.table.lower()]
                    facts.write("update", _qualified_table(joined_table, facts))
        elif isinstance(node, exp.Delete):
            self._where(node, "delete-without-where")
            named = node.args.get("tables") or []
            if not named:
                self._target(node.this, "delete")
                return
            candidates: dict[str, exp.Table] = {}
            this = node.this
            if isinstance(this, exp.Table):
                candidates[this.alias_or_name.lower()] = this
                for join in this.args.get("joins") or []:
                    if isinstance(join.this, exp.Table):
                        candidates[join.this.alias_or_name.lower()] = join.this
            for join in node.args.get("joins") or []:
                if isinstance(join.this, exp.Table):
                    candidates[join.this.alias_or_name.lower()] = join.this
            for reference in named:
                self.targets.add(id(reference))
                actual = candidates.get(reference.alias_or_name.lower(), reference)
                facts.write("delete", _qualified_table(actual, facts))
        elif isinstance(node, exp.Merge):
            table = self._target(node.this, "merge")
            whens = node.args.get("whens")
            for when in whens.expressions if whens is not None else []:
                then = when.args.get("then")
                if isinstance(then, exp.Update):
                    effect = "update"
                elif isinstance(then, exp.Insert):
                    effect = "insert"
                elif "DELETE" in str(then).upper():
                    effect = "delete"
                else:
                    continue
                if table:
                    facts.write(effect, table)
        elif isinstance(node, exp.Into):
            if self._target(node.this, "create"):
                facts.find("select-into")
                facts.find("ddl", "SELECT INTO")
            else:
                self.objects.add(id(node))
        elif isinstance(node, exp.Create):
            self._create(node)
        elif isinstance(node, exp.Drop):
            facts.find("drop", str(node.args.get("kind") or ""))
            kind = str(node.args.get("kind") or "").upper()
            for table in node.args.get("tables") or ([node.this] if node.this is not None else []):
                if kind in _TABLE_LIKE_KINDS:
                    self._target(table, "drop")
                else:
                    self.objects.add(id(table))
        elif isinstance(node, exp.Alter):
            kind = str(node.args.get("kind") or "").upper()
            if kind in _TABLE_LIKE_KINDS:
                self._target(node.this, "alter")
            elif node.this is not None:
                self.objects.add(id(node.this))
        elif isinstance(node, exp.TruncateTable):
            facts.find("truncate")
            for table in node.expressions:
                self._target(table, "truncate")
        elif isinstance(node, exp.Comment):
            if not self._target(node.this, "comment") and node.this is not None:
                self.objects.add(id(node.this))

    def _create(self, node: exp.Create) -> None:
        kind = str(node.args.get("kind") or "").upper()
        this = node.this
        if kind in _TABLE_LIKE_KINDS:
            self._target(this, "create")
            stores_rows = kind in ("TABLE", "MATERIALIZED VIEW", "TEMPORARY TABLE")
            if node.expression is not None and stores_rows:
                self.facts.find("select-into")
        elif kind == "INDEX" and isinstance(this, exp.Index):
            self._target(this.args.get("table"), "alter")
            if this.this is not None:
                self.objects.add(id(this.this))
        elif this is not None:
            self.objects.add(id(this))
        if kind in ("FUNCTION", "PROCEDURE", "TRIGGER", "RULE"):
            # the body runs later, when called; what it does is not visible now
            expression = node.expression
            if expression is not None and not isinstance(expression, _QUERY_TYPES):
                self.objects.add(id(expression))

    def _where(self, node: exp.Expr, finding: str) -> None:
        where = node.args.get("where")
        restricted = where is not None and not _constant(where.this)
        this = node.this
        joins = list(node.args.get("joins") or [])
        if isinstance(this, exp.Table):
            joins += this.args.get("joins") or []
        if any(join.args.get("on") is not None and not _constant(join.args["on"]) for join in joins):
            restricted = True  # MySQL multi-table form: the join condition selects the rows
        if not restricted:
            target = this.this if isinstance(this, exp.Schema) else this
            detail = _qualified_table(target, self.facts) if isinstance(target, exp.Table) else ""
            self.facts.find(finding, detail)


def _constant(condition: exp.Expr | None) -> bool:
    """A condition that keeps every row: none, one that does not look at the row (``WHERE true``,
    ``WHERE 1 = 1``), or one an always-true term makes so (``WHERE id > 0 OR 1 = 1``,
    ``WHERE name = name OR true``, ``WHERE id = id``)."""
    if condition is None or _row_independent(condition):
        return True
    return _always_true(condition)


def _row_independent(condition: exp.Expr) -> bool:
    return not any(isinstance(node, (exp.Column, exp.Query)) for node in condition.walk())


def _always_true(node: exp.Expr) -> bool:
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Or):
        return _always_true(node.left) or _always_true(node.right)
    if isinstance(node, exp.And):
        return _always_true(node.left) and _always_true(node.right)
    if _row_independent(node):
        return not _known_false(node)  # unknown constants count as true: a guardrail errs to flag
    if isinstance(node, (exp.EQ, exp.GTE, exp.LTE, exp.NullSafeEQ)) and isinstance(node.left, exp.Column):
        return node.left == node.right  # a column compared with itself (NULLs aside: every row)
    return False


def _known_false(node: exp.Expr) -> bool:
    """A row-independent term that is certainly false or NULL (``false``, ``1 = 2``)."""
    try:
        value = simplify(node.copy())
    except Exception:  # a term simplify cannot handle: not known to be false
        return False
    return isinstance(value, exp.Null) or (isinstance(value, exp.Boolean) and not value.this)


def _analyze_tree(tree: exp.Expr, facts: _Facts, replace: bool = False) -> None:
    _prepare_tables(tree, facts)
    walker = _Walker(facts)
    walker.collect(tree)
    if facts.kind == "unknown" and facts.findings.get("opaque-command") is not None:
        return
    if isinstance(tree, (exp.Create, exp.Drop, exp.Alter, exp.TruncateTable, exp.Comment)):
        facts.kind = "ddl"
        facts.find("ddl", tree.key.upper())
        if isinstance(tree, exp.Create) and isinstance(tree.expression, _QUERY_TYPES):
            _Lineage(facts).query(tree.expression, None)
        return
    if isinstance(tree, (exp.Grant, exp.Revoke)):
        facts.kind = "dcl"
        facts.find("dcl", tree.key.upper())
        return
    if isinstance(tree, (exp.Transaction, exp.Commit, exp.Rollback)):
        facts.kind = "tcl"
        return
    if isinstance(tree, exp.Kill):
        facts.kind = "utility"
        facts.find("admin-command", "KILL")
        return
    if isinstance(tree, exp.Set):
        facts.kind = "set"
        return
    if replace and isinstance(tree, exp.Insert):
        table = walker._target(tree.this, "insert")
        if table:
            facts.write("delete", table)
    base = {exp.Insert: "insert", exp.Update: "update", exp.Delete: "delete", exp.Merge: "merge"}
    kind = next((value for key, value in base.items() if isinstance(tree, key)), "select")
    for effect, _ in facts.writes:
        if effect in _WRITE_RANK and _WRITE_RANK[effect] > _WRITE_RANK[kind]:
            kind = effect
    if any(effect == "create" for effect, _ in facts.writes):
        kind = "ddl"
    facts.kind = kind
    facts.has_where, facts.has_limit = _where_and_limit(tree)
    outputs, complete = _Lineage(facts).statement(tree)
    facts.outputs = [OutputColumn(name, sources, traced) for name, (sources, traced) in outputs]
    facts.output_complete = complete


def _where_and_limit(tree: exp.Expr) -> tuple[bool, bool]:
    """Whether the statement filters its rows (every branch of a set operation) and limits them."""
    node = tree
    while isinstance(node, exp.Subquery):
        node = node.this
    has_limit = node.args.get("limit") is not None
    pending, leaves = [node], []
    while pending:
        branch = pending.pop()
        while isinstance(branch, exp.Subquery):
            branch = branch.this
        if isinstance(branch, exp.SetOperation):
            pending += [branch.left, branch.right]
        else:
            leaves.append(branch)
    return all(_restricted(leaf) for leaf in leaves), has_limit


def _restricted(node: exp.Expr) -> bool:
    where = node.args.get("where")
    return where is not None and not _constant(where.this)


# --- lineage -------------------------------------------------------------------------------------

_Columns = list[tuple[str, _Lineage]]
_Relation = tuple[_Columns, bool]  # columns in order, and whether that is all of them


class _Source:
    """Something a FROM clause names: a catalog table, a derived table or CTE, a table function."""

    __slots__ = ("alias", "table", "columns", "complete", "fallback")

    def __init__(
        self,
        alias: str,
        table: str | None,
        columns: _Columns | None,
        complete: bool = True,
        fallback: _Lineage = _UNTRACED,
    ) -> None:
        self.alias = alias
        self.table = table
        self.columns = columns
        self.complete = complete and columns is not None
        self.fallback = fallback

    def known(self, name: str) -> _Lineage | None:
        for column, lineage in self.columns or ():
            if column == name:
                return lineage
        return None

    def unknown(self, name: str) -> _Lineage:
        """A column this source may have although the analysis cannot list it."""
        if self.table is not None and self.columns is None:
            return frozenset({f"{self.table}.{name}"}), False
        return self.fallback[0], False

    def lookup(self, name: str) -> _Lineage | None:
        found = self.known(name)
        if found is not None:
            return found
        return None if self.complete else self.unknown(name)

    def star(self) -> _Relation:
        columns = list(self.columns or ())
        if not self.complete:
            columns.append(("*", (self.fallback[0], False)))
        return columns, self.complete

    def whole_row(self) -> _Lineage:
        columns, complete = self.star()
        sources, traced = _union(lineage for _, lineage in columns)
        return sources, traced and complete


class _Scope:
    __slots__ = ("sources", "order", "parent", "ctes")

    def __init__(self, parent: _Scope | None) -> None:
        self.sources: dict[str, _Source] = {}
        self.order: list[tuple[_Source, exp.Join | None]] = []
        self.parent = parent
        self.ctes: dict[str, _Relation | None] = {}

    def add(self, source: _Source, join: exp.Join | None) -> None:
        self.sources[source.alias] = source
        self.order.append((source, join))

    def cte(self, name: str) -> tuple[bool, _Relation | None]:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.ctes:
                return True, scope.ctes[name]
            scope = scope.parent
        return False, None

    def find(self, alias: str) -> _Source | None:
        scope: _Scope | None = self
        while scope is not None:
            if alias in scope.sources:
                return scope.sources[alias]
            scope = scope.parent
        return None


def _renamed(relation: _Relation, names: Sequence[str]) -> _Relation:
    columns, complete = relation
    if not names:
        return relation
    renamed = [
        (names[index] if index < len(names) else name, lineage)
        for index, (name, lineage) in enumerate(columns)
    ]
    return renamed, complete


def _alias_names(node: exp.Expr) -> tuple[str, list[str]]:
    alias = node.args.get("alias")
    if isinstance(alias, exp.TableAlias):
        return alias.name.lower(), [column.name.lower() for column in alias.columns]
    if isinstance(alias, (exp.Identifier, str)):
        return (alias.name if isinstance(alias, exp.Identifier) else alias).lower(), []
    return "", []


def _output_name(node: exp.Expr) -> str:
    if isinstance(node, exp.Alias):
        alias = node.alias
        generated = _GENERATED_ALIAS.fullmatch(alias) or (
            # the qualifier names a bare literal after its value: never let a value become a name
            isinstance(node.this, (exp.Literal, exp.Boolean, exp.Null))
            and alias.lower() == node.this.output_name.lower()
        )
        if alias and not generated:
            return alias.lower()
        node = node.this
    wrappers = (exp.Cast, exp.Paren)
    while isinstance(node, wrappers) and isinstance(node.this, (exp.Column, *wrappers)):
        node = node.this
    if isinstance(node, exp.Column):
        return node.name.lower()
    if isinstance(node, exp.Dot):
        return node.name.lower()
    if isinstance(node, exp.Func):
        return _function_names(node)[0]
    return "?column?"


class _Lineage:
    """Follows every output column back to catalog columns, and records every column read."""

    def __init__(self, facts: _Facts) -> None:
        self.facts = facts
        self.catalog = facts.catalog

    # statements

    def statement(self, tree: exp.Expr) -> _Relation:
        if isinstance(tree, _QUERY_TYPES):
            tree = self._qualified(tree)
        if isinstance(tree, (*_QUERY_TYPES, *_DML_TYPES)):
            return self.query(tree, None)
        return [], True

    def _qualified(self, tree: exp.Expr) -> exp.Expr:
        """The tree with stars expanded and columns qualified by sqlglot, where that is safe.

        sqlglot's qualifier does not know data-modifying CTEs (it takes their names for tables),
        so such trees are resolved by this class alone, as is any tree the qualifier rejects.
        """
        schema = _mapping_schema(self.catalog, self.facts.dialect)
        if schema is None or tree.find(exp.Star) is None:
            # without a star the qualifier adds nothing this class does not do itself (the lineage
            # tests check that both ways agree), and it is the costliest step of an analysis
            return tree
        if tree.find(*_DML_TYPES) is not None:
            return tree
        try:
            return qualify(
                tree.copy(),
                dialect=self.facts.session.sqlglot,
                schema=schema,
                db=self.catalog.search_path[0] if self.catalog.search_path else None,
                expand_alias_refs=False,
                validate_qualify_columns=False,
                quote_identifiers=False,
                identify=False,
            )
        except Exception:  # noqa: BLE001 - the qualifier is an aid; this class resolves on its own
            return tree

    def query(self, node: exp.Expr, outer: _Scope | None) -> _Relation:
        if isinstance(node, exp.Subquery):
            relation = self.query(node.this, outer)
            self._walk_rest(node, outer, skip=("this", "alias"))
            return relation
        if isinstance(node, exp.SetOperation):
            scope = _Scope(outer)
            self._ctes(node, scope)
            left_columns, left_complete = self.query(node.left, scope)
            right_columns, right_complete = self.query(node.right, scope)
            # the left branch names the columns; a branch of another width is an error on the
            # server, and leaves the result incomplete here
            pairs = zip_longest(left_columns, right_columns[: len(left_columns)])
            columns = [
                (name, _union([lineage, right[1]]) if right is not None else lineage)
                for (name, lineage), right in pairs
            ]
            complete = left_complete and right_complete and len(left_columns) == len(right_columns)
            self._walk_rest(node, scope, skip=("this", "expression", "with_"))
            return columns, complete
        if isinstance(node, exp.Values):
            rows = [
                row.expressions if isinstance(row, exp.Tuple) else [row] for row in node.expressions
            ]
            width = max((len(row) for row in rows), default=0)
            columns = [
                (
                    f"column{index + 1}",
                    _union(self.expression(row[index], outer) for row in rows if index < len(row)),
                )
                for index in range(width)
            ]
            return columns, True
        if isinstance(node, exp.Select):
            return self._select(node, outer)
        if isinstance(node, exp.Insert):
            return self._insert(node, outer)
        if isinstance(node, (exp.Update, exp.Delete, exp.Merge)):
            return self._modify(node, outer)
        lineage = self.expression(node, outer)
        return [("?column?", (lineage[0], False))], False

    def _ctes(self, node: exp.Expr, scope: _Scope) -> None:
        with_ = node.args.get("with_")
        if with_ is None:
            return
        recursive = bool(with_.args.get("recursive"))
        for cte in with_.expressions:
            name, names = _alias_names(cte)
            name = name or cte.alias_or_name.lower()
            body = cte.this
            if recursive:
                # start from the non-recursive branch, then follow the self-reference to a fixed point
                scope.ctes[name] = None  # a self-reference in the start is unknown
                start = body.left if isinstance(body, exp.Union) else body
                relation = _renamed(self.query(start, scope), names)
                for _ in range(MAX_RECURSIVE_PASSES):
                    scope.ctes[name] = relation
                    again = _renamed(self.query(body, scope), names)
                    if again == relation:
                        break
                    relation = again
                else:
                    columns, _ = relation
                    relation = [(column, (lineage[0], False)) for column, lineage in columns], False
            else:
                relation = _renamed(self.query(body, scope), names)
            scope.ctes[name] = relation

    def _select(self, node: exp.Select, outer: _Scope | None) -> _Relation:
        scope = _Scope(outer)
        self._ctes(node, scope)
        from_ = node.args.get("from_")
        if from_ is not None:
            self._from_item(from_.this, scope, None)
        joins = node.args.get("joins") or []
        for join in joins:
            self._from_item(join.this, scope, join)
        for join in joins:
            self._join_condition(join, scope)
        self._walk_rest(node, scope, skip=("expressions", "from_", "joins", "with_", "into"))
        columns: _Columns = []
        complete = True
        for projection in node.expressions:
            if isinstance(projection, exp.Star):
                expanded, expanded_complete = self._star(scope)
                columns += expanded
                complete = complete and expanded_complete
            elif isinstance(projection, exp.Column) and isinstance(projection.this, exp.Star):
                source = scope.find(projection.table.lower())
                expanded, expanded_complete = source.star() if source else ([("*", _UNTRACED)], False)
                self._record_all(expanded)
                columns += expanded
                complete = complete and expanded_complete
            else:
                columns.append((_output_name(projection), self.expression(projection, scope)))
        if node.args.get("into") is not None:
            return [], True  # SELECT … INTO returns no rows
        return columns, complete

    def _join_condition(self, join: exp.Join, scope: _Scope) -> None:
        self.expression(join.args.get("on"), scope)
        for identifier in join.args.get("using") or []:
            name = identifier.name.lower()
            for source in scope.sources.values():
                found = source.known(name)
                if found is not None:
                    self._record(found)

    def _walk_rest(self, node: exp.Expr, scope: _Scope | None, skip: Sequence[str]) -> None:
        for key, value in node.args.items():
            if key in skip:
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, exp.Expr):
                    self.expression(child, scope)

    def _from_item(self, item: exp.Expr, scope: _Scope, join: exp.Join | None) -> None:
        alias, names = _alias_names(item)
        if isinstance(item, exp.Lateral):
            inner = item.this
            if not alias:
                alias, names = _alias_names(inner)
            item = inner
        if isinstance(item, exp.Subquery) and isinstance(item.this, exp.Table):
            # a parenthesised join: its tables are in scope as they are
            self._from_item(item.this, scope, join)
            return
        if isinstance(item, exp.Table) and isinstance(item.this, exp.Identifier):
            name = item.name.lower()
            alias = alias or name
            is_cte, relation = (False, None)
            if item.args.get("db") is None:
                is_cte, relation = scope.cte(name)
            if is_cte:
                if relation is None:
                    source = _Source(alias, None, None)
                else:
                    columns, complete = _renamed(relation, names)
                    source = _Source(alias, None, columns, complete)
            else:
                table = _qualified_table(item, self.facts)
                known = self.catalog.columns(table)
                if known is None:
                    source = _Source(alias, table, None)
                else:
                    columns = [(column, (frozenset({f"{table}.{column}"}), True)) for column in known]
                    columns, _ = _renamed((columns, True), names)
                    source = _Source(alias, table, columns)
            scope.add(source, join)
            for nested in item.args.get("joins") or []:
                self._from_item(nested.this, scope, nested)
            for nested in item.args.get("joins") or []:
                self._join_condition(nested, scope)
            return
        if isinstance(item, exp.Table):  # a table function: FROM generate_series(…) AS g(n)
            function = item.this
            lineage = self.expression(function, scope)
            known = isinstance(function, exp.Func) and not (
                _function_names(function)[0] not in _KNOWN_TABLE_FUNCTIONS
                and isinstance(function, exp.Anonymous)
            )
            if not isinstance(function, exp.Func):
                known = False
            traced = lineage[1] and known
            if names:
                columns = [(column, (lineage[0], traced)) for column in names]
                scope.add(_Source(alias or "?", None, columns, known, (lineage[0], traced)), join)
            else:
                scope.add(_Source(alias or "?", None, None, False, (lineage[0], False)), join)
            return
        if isinstance(item, (exp.Subquery, exp.Values, *_QUERY_TYPES)):
            inner_query = item.this if isinstance(item, exp.Subquery) else item
            columns, complete = _renamed(self.query(inner_query, scope), names)
            fallback = _union(lineage for _, lineage in columns)
            scope.add(_Source(alias or "?", None, columns, complete, fallback), join)
            return
        if isinstance(item, exp.Unnest) or isinstance(item, exp.Func):
            lineage = self.expression(item, scope)
            if names:
                columns = [(column, lineage) for column in names]
                scope.add(_Source(alias, None, columns, True, lineage), join)
            else:
                scope.add(_Source(alias or "?", None, None, False, (lineage[0], False)), join)
            return
        lineage = self.expression(item, scope)
        scope.add(_Source(alias or "?", None, None, False, (lineage[0], False)), join)

    def _star(self, scope: _Scope) -> _Relation:
        """``*`` over the FROM clause, with PostgreSQL's USING and NATURAL column merging."""
        composite: _Columns = []
        complete = True
        for source, join in scope.order:
            part, part_complete = source.star()
            complete = complete and part_complete
            using: list[str] = []
            if join is not None:
                using = [identifier.name.lower() for identifier in join.args.get("using") or []]
                if str(join.args.get("method") or "").upper() == "NATURAL":
                    right_names = {name for name, _ in part}
                    using = [name for name, _ in composite if name in right_names and name != "*"]
            if using:
                merged = [
                    (name, _union([lineage for column, lineage in composite + part if column == name]))
                    for name in using
                ]
                composite = (
                    merged
                    + [(name, lineage) for name, lineage in composite if name not in using]
                    + [(name, lineage) for name, lineage in part if name not in using]
                )
            else:
                composite = composite + part
        self._record_all(composite)
        return composite, complete

    def _record(self, lineage: _Lineage) -> None:
        self.facts.columns_read |= lineage[0]

    def _record_all(self, columns: _Columns) -> None:
        for _, lineage in columns:
            self._record(lineage)

    # expressions

    def expression(self, node: exp.Expr | None, scope: _Scope | None) -> _Lineage:
        if node is None:
            return _NO_LINEAGE
        if isinstance(node, exp.Column):
            if isinstance(node.this, exp.Star):
                source = scope.find(node.table.lower()) if scope else None
                lineage = source.whole_row() if source else _UNTRACED
                self._record(lineage)
                return lineage
            return self._column(node, scope)
        if isinstance(node, (*_QUERY_TYPES, *_DML_TYPES)):
            columns, complete = self.query(node, scope)
            sources, traced = _union(lineage for _, lineage in columns)
            return sources, traced and complete
        if _TABLE_COLUMN is not None and isinstance(node, _TABLE_COLUMN):
            # the qualifier's name for a whole-row reference (row_to_json(p), SELECT p FROM t p)
            source = scope.find(node.name.lower()) if scope else None
            lineage = source.whole_row() if source else _UNTRACED
            self._record(lineage)
            return lineage
        if isinstance(node, exp.Star):
            return _NO_LINEAGE  # count(*) carries no column's value
        if isinstance(node, exp.Parameter):
            # MySQL @variable: whatever was stored in it earlier; PostgreSQL $n: a client value
            return _UNTRACED if isinstance(node.this, exp.Var) else _NO_LINEAGE
        if isinstance(node, exp.Dot) and isinstance(node.expression, exp.Func):
            return self.expression(node.expression, scope)  # schema.function(…): the call
        traced = True
        if isinstance(node, exp.Func):
            name = _function_names(node)[0]
            if isinstance(node, exp.Anonymous) and not _is_builtin(name, self.facts):
                traced = False
            mark = node.meta.get(_CALL_MARK)
            if mark is not None and mark in self.facts.call_sources:
                # query_to_xml('…'), table_to_xml('t', …): the result holds what the SQL read
                return _union(self.facts.call_sources[mark])
            schema = _function_schema(node)
            if schema and schema not in _SYSTEM_SCHEMAS:
                traced = False
        sources: set[str] = set()
        for child in node.iter_expressions():
            child_sources, child_traced = self.expression(child, scope)
            sources |= child_sources
            traced = traced and child_traced
        return frozenset(sources), traced

    def _column(self, node: exp.Column, scope: _Scope | None) -> _Lineage:
        name = node.name.lower()
        qualifier = node.table.lower()
        if qualifier:
            source = scope.find(qualifier) if scope else None
            if source is None:
                return _UNTRACED
            lineage = source.lookup(name)
            if lineage is None:
                return frozenset(), name in _SYSTEM_COLUMNS and source.table is not None
            self._record(lineage)
            return lineage
        # PostgreSQL's rule: a column of any source, innermost level first; only then a source's
        # name as a whole-row reference. A source whose columns are unknown may hold the name too.
        maybe: list[_Lineage] = []
        level = scope
        while level is not None:
            found = [
                lineage
                for source in level.sources.values()
                if (lineage := source.known(name)) is not None
            ]
            if found:
                lineage = _union(found + maybe)
                lineage = (lineage[0], lineage[1] and not maybe)
                self._record(lineage)
                return lineage
            if name in _SYSTEM_COLUMNS and any(source.table for source in level.sources.values()):
                return _NO_LINEAGE if not maybe else (_union(maybe)[0], False)
            maybe += [source.unknown(name) for source in level.sources.values() if not source.complete]
            level = level.parent
        level = scope
        while level is not None:
            source = level.sources.get(name)
            if source is not None:
                lineage = _union([source.whole_row(), *maybe])
                lineage = (lineage[0], lineage[1] and not maybe)
                self._record(lineage)
                return lineage
            level = level.parent
        if maybe:
            lineage = _union(maybe)
            self._record(lineage)
            return lineage[0], False
        return _UNTRACED

    # data-modifying statements

    def _target_source(self, node: exp.Expr | None) -> tuple[_Source | None, str]:
        if isinstance(node, exp.Schema):
            node = node.this
        if not isinstance(node, exp.Table) or not isinstance(node.this, exp.Identifier):
            return None, ""
        table = _qualified_table(node, self.facts)
        alias = _alias_names(node)[0] or node.name.lower()
        known = self.catalog.columns(table)
        if known is None:
            return _Source(alias, table, None), table
        columns = [(column, (frozenset({f"{table}.{column}"}), True)) for column in known]
        return _Source(alias, table, columns), table

    def _with_assigned(self, source: _Source, assigned: Mapping[str, _Lineage]) -> _Source:
        """The target as RETURNING sees it: assigned columns also carry their new values' sources."""
        if source.columns is None:
            extra = _union(assigned.values()) if assigned else _NO_LINEAGE
            return _Source(source.alias, source.table, None, False, (extra[0], False))
        columns = [
            (name, _union([lineage, assigned[name]]) if name in assigned else lineage)
            for name, lineage in source.columns
        ]
        return _Source(source.alias, source.table, columns, source.complete, source.fallback)

    def _returning(self, node: exp.Expr, scope: _Scope) -> _Relation:
        returning = node.args.get("returning")
        if returning is None:
            return [], True
        columns: _Columns = []
        complete = True
        for projection in returning.expressions:
            if isinstance(projection, exp.Star):
                expanded, expanded_complete = self._star(scope)
                columns += expanded
                complete = complete and expanded_complete
            elif isinstance(projection, exp.Column) and isinstance(projection.this, exp.Star):
                source = scope.find(projection.table.lower())
                expanded, expanded_complete = source.star() if source else ([("*", _UNTRACED)], False)
                columns += expanded
                complete = complete and expanded_complete
            else:
                columns.append((_output_name(projection), self.expression(projection, scope)))
        return columns, complete

    def _insert(self, node: exp.Insert, outer: _Scope | None) -> _Relation:
        scope = _Scope(outer)
        self._ctes(node, scope)
        target, _ = self._target_source(node.this)
        listed = []
        if isinstance(node.this, exp.Schema):
            listed = [identifier.name.lower() for identifier in node.this.expressions]
        inserted: dict[str, _Lineage] = {}
        source_query = node.expression
        if isinstance(source_query, (*_QUERY_TYPES, exp.Subquery)):
            values, complete = self.query(source_query, scope)
            names = listed or [name for name, _ in (target.columns or [])] if target else listed
            if names and complete:
                inserted = {name: lineage for name, (_, lineage) in zip(names, values)}
            else:
                everything = _union(lineage for _, lineage in values)
                inserted = {name: (everything[0], False) for name in names}
                if target is not None and target.columns is None:
                    inserted["*"] = (everything[0], False)
        if target is None:
            return [], True
        written = self._with_assigned(target, inserted)
        inner = _Scope(scope)
        inner.add(written, None)
        conflict = node.args.get("conflict")
        if conflict is not None:
            excluded = _Source(
                "excluded", written.table, written.columns, written.complete, written.fallback
            )
            inner.sources["excluded"] = excluded
            for child in conflict.iter_expressions():
                self.expression(child, inner)
        return self._returning(node, inner)

    def _modify(self, node: exp.Expr, outer: _Scope | None) -> _Relation:
        scope = _Scope(outer)
        self._ctes(node, scope)
        target, _ = self._target_source(node.this)
        if isinstance(node.this, exp.Table):
            self._from_item(node.this, scope, None)
        elif node.this is not None:
            self.expression(node.this, scope)
        for key in ("using", "from_"):
            extra = node.args.get(key)
            for item in extra if isinstance(extra, list) else [extra]:
                if isinstance(item, exp.Expr):
                    self._from_item(item.this if isinstance(item, exp.From) else item, scope, None)
        for join in node.args.get("joins") or []:
            self._from_item(join.this, scope, join)
            self._join_condition(join, scope)
        assigned: dict[str, _Lineage] = {}
        if isinstance(node, exp.Update):
            for assignment in node.expressions:
                if isinstance(assignment, exp.EQ):
                    value = self.expression(assignment.expression, scope)
                    for column in assignment.this.find_all(exp.Column):
                        assigned[column.name.lower()] = value
                else:
                    self.expression(assignment, scope)
        skip = ("this", "using", "from_", "joins", "with_", "returning", "expressions", "tables")
        if isinstance(node, exp.Merge):
            skip = ("this", "using", "with_", "returning")
        self._walk_rest(node, scope, skip=skip)
        if target is not None and target.alias in scope.sources:
            updated = self._with_assigned(scope.sources[target.alias], assigned)
            scope.sources[target.alias] = updated
            scope.order = [
                (updated if source.alias == target.alias else source, join)
                for source, join in scope.order
            ]
        return self._returning(node, scope)


# --- the cache -----------------------------------------------------------------------------------

_EXACT = "exact"
_SHAPE = "shape"
_CacheKey = tuple[str, str, str, str]  # (exact|shape, text or fingerprint, dialect, catalog version)


class Analyzer:
    """:func:`analyze` behind a bounded LRU cache; one per gateway (not thread-safe, like trio).

    The cache is keyed by (fingerprint, dialect, catalog version); a text the cheap fingerprint
    cannot handle, or whose analysis depends on literal values, is cached under its exact text
    only; an analysis that depends on the session's prepared statements is never cached.
    """

    def __init__(self, max_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._cache: OrderedDict[_CacheKey, tuple[StatementAnalysis, ...]] = OrderedDict()
        self._hits = self._exact_hits = self._misses = self._uncacheable = 0

    def analyze(
        self,
        sql: str,
        dialect: str,
        catalog: Catalog | None = None,
        prepared: Mapping[str, StatementAnalysis] | None = None,
    ) -> tuple[StatementAnalysis, ...]:
        version = catalog.version if catalog is not None else ""
        cache = self._cache
        shape = fingerprint(sql, dialect)
        if shape is not None:
            shape_key = (_SHAPE, shape, dialect, version)
            found = cache.get(shape_key)
            if found is not None:
                cache.move_to_end(shape_key)
                self._hits += 1
                return found
        exact_key = (_EXACT, sql, dialect, version)
        found = cache.get(exact_key)
        if found is not None:
            cache.move_to_end(exact_key)
            self._hits += 1
            self._exact_hits += 1
            return found
        result = analyze(sql, dialect, catalog, prepared)
        if any(analysis.depends_on_session for analysis in result):
            self._uncacheable += 1
        elif shape is not None and not any(analysis.depends_on_literals for analysis in result):
            self._store(shape_key, result)
            self._misses += 1
        else:
            self._store(exact_key, result)
            self._uncacheable += 1
        return result

    def _store(self, key: _CacheKey, result: tuple[StatementAnalysis, ...]) -> None:
        self._cache[key] = result
        if len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    def statistics(self) -> CacheStatistics:
        """``hits`` (``exact_hits`` of them by exact text), ``misses`` (analysed, then cached by
        fingerprint), ``uncacheable`` (analysed, not cacheable by fingerprint), ``size``."""
        return CacheStatistics(
            hits=self._hits,
            misses=self._misses,
            uncacheable=self._uncacheable,
            size=len(self._cache),
            exact_hits=self._exact_hits,
        )

    def clear(self) -> None:
        self._cache.clear()
