"""The parse hook for SQL: statement analysis (policies.analysis) for every SQL protocol.

Protocol handlers hand over ``Message(kind="statement", text=…, dialect=…)``; this plugin returns
one request per statement. The target's schema (a ``Catalog``, read from the upstream by the
protocol handler) is taken from ``session.target_state["catalog"]`` when present, so ``SELECT *``
resolves to columns; the session's prepared statements and cursors live in
``session.state["sql.prepared"]`` (the protocol applies confirmed effects with
``remember_prepared``).
"""

from __future__ import annotations

from bastion.core.hookspecs import hookimpl
from bastion.policies.analysis import Analyzer, to_request
from bastion.policies.model import Request

ANALYZER_KEY = "sql.analyzer"
PREPARED_KEY = "sql.prepared"
CATALOG_KEY = "catalog"


def analyzer_for(target_state: dict) -> Analyzer:
    analyzer = target_state.get(ANALYZER_KEY)
    if analyzer is None:
        analyzer = target_state[ANALYZER_KEY] = Analyzer()
    return analyzer


@hookimpl
def bastion_parse(session, message):
    if message.kind != "statement" or message.dialect is None:
        return None
    prepared = session.state.get(PREPARED_KEY)
    catalog = session.target_state.get(CATALOG_KEY)
    analyses = analyzer_for(session.target_state).analyze(message.text, message.dialect, catalog, prepared)
    if not analyses:
        # an empty or comment-only text runs nothing (the server answers EmptyQueryResponse)
        return [Request(message=message, action="empty", redacted_text="")]
    return [to_request(analysis, message) for analysis in analyses]
