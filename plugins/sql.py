"""The parse hook for SQL: statement analysis (policies.analysis) for every SQL protocol.

Protocol handlers hand over ``Message(kind="statement", text=…, dialect=…)``; this plugin returns
one request per statement. The target's schema (a ``Catalog``, read from the upstream by the
protocol handler) is taken from ``session.target_state["catalog"]`` when present, so ``SELECT *``
resolves to columns. What a session changes — prepared statements, cursors, its search path —
lives in ``session.state``; a protocol applies it with :func:`apply_confirmed` once the server has
confirmed the statements succeeded (never before: a PREPARE that fails must not change what a
name means to Bastion while it means something else to the server).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bastion.core.hookspecs import hookimpl
from bastion.policies.analysis import Analyzer, remember_prepared, search_path_after, to_request
from bastion.policies.model import Request

ANALYZER_KEY = "sql.analyzer"
PREPARED_KEY = "sql.prepared"
SEARCH_PATH_KEY = "sql.search_path"
CATALOG_KEY = "catalog"


def analyzer_for(target_state: dict) -> Analyzer:
    analyzer = target_state.get(ANALYZER_KEY)
    if analyzer is None:
        analyzer = target_state[ANALYZER_KEY] = Analyzer()
    return analyzer


def apply_confirmed(session_state: dict[str, Any], requests: Iterable[Request]) -> None:
    """Apply the session effects of statements the server confirmed, in order."""
    analyses = [r.analysis for r in requests if r.analysis is not None]
    if not analyses:
        return
    remember_prepared(session_state.setdefault(PREPARED_KEY, {}), analyses)
    for analysis in analyses:
        if analysis.session_effect in ("search-path", "use"):
            path = search_path_after(analysis)
            if path is None:
                session_state.pop(SEARCH_PATH_KEY, None)  # RESET: back to the catalog's own path
            else:
                session_state[SEARCH_PATH_KEY] = path


def _catalog(session):
    catalog = session.target_state.get(CATALOG_KEY)
    path = session.state.get(SEARCH_PATH_KEY)
    if catalog is None or path is None:
        return catalog
    cached = session.state.get("sql.catalog")
    if cached is None or cached[0] is not catalog or cached[1] != path:
        cached = session.state["sql.catalog"] = (catalog, path, catalog.with_search_path(path))
    return cached[2]


@hookimpl
def bastion_parse(session, message):
    if message.kind != "statement" or message.dialect is None:
        return None
    prepared = session.state.get(PREPARED_KEY)
    analyses = analyzer_for(session.target_state).analyze(message.text, message.dialect, _catalog(session), prepared)
    if not analyses:
        # an empty or comment-only text runs nothing (the server answers EmptyQueryResponse)
        return [Request(message=message, action="empty", redacted_text="")]
    return [to_request(analysis, message) for analysis in analyses]
