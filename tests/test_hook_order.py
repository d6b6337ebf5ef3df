"""The order of hook calls in one PostgreSQL session is the one the docstring of
``bastion.core.session.Session`` documents, and no hook runs per row.

A spy plugin sits beside a real policy bundle (the real parser, policy engine and masking plugin
decide; the spy answers None everywhere) and logs every decision hook and every recorded event, in
the order core calls them. The identity provider is spied on too, for the *authenticate* step.
"""

from __future__ import annotations

import threading
from collections import Counter

import psycopg
import pytest
from psycopg import errors as pg_errors

from bastion.core.hookspecs import hookimpl
from bastion.protocols.postgres.messages import DataRow, ErrorResponse, Query
from tests.pg_helpers import RawClient, TokenProvider, of_type, pg_gateway  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

BUNDLE = """
[[grant]]
name = "reads"
identities = { subjects = ["ci-bot"] }
targets = ["pg"]
statements = ["select"]
"""

ROWS = 50
SELECT = f"select g from generate_series(1, {ROWS}) g"
REFUSED = "create table hook_order_never_made (x int)"  # no grant gives create: denied, never run

# Session's docstring, step by step, for this session: connection accepted, authenticate (the
# identity provider, then the connect check), then per statement parse -> authorize -> record of
# the judgement -> transform once per result set -> record of the rows and the response; a refused
# statement stops after its judgement is recorded; then the end of the session.
EXPECTED = [
    ("record", "ConnectionOpened"),
    ("authenticate", None),
    ("authorize", "connect"),
    ("record", "SessionStarted"),
    ("parse", SELECT),
    ("authorize", SELECT),
    ("record", "RequestJudged:allow"),
    ("transform", SELECT),
    ("record", "ResultRows"),
    ("record", "ResponseCompleted"),
    ("parse", REFUSED),
    ("authorize", REFUSED),
    ("record", "RequestJudged:deny"),
    ("record", "SessionEnded"),
]


class Spy:
    """Logs hook calls as ``(hook, detail)``; answers nothing, so it changes no decision."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self._lock = threading.Lock()

    def log(self, hook: str, detail: object) -> None:
        with self._lock:
            self.calls.append((hook, detail))

    @hookimpl
    def bastion_parse(self, session, message):
        self.log("parse", message.text)

    @hookimpl
    def bastion_authorize(self, session, request):
        self.log("authorize", "connect" if request.action == "connect" else request.message.text)

    @hookimpl
    def bastion_transform(self, session, request, shape):
        self.log("transform", None if request is None else request.message.text)

    @hookimpl
    def bastion_text_transform(self, session, text):
        self.log("text_transform", text)

    @hookimpl
    def bastion_record(self, event):
        name = type(event).__name__
        if name == "RequestJudged":
            name += f":{event.verdict}"
        self.log("record", name)


@pytest.fixture
def spy(monkeypatch) -> Spy:
    spy = Spy()
    authenticate = TokenProvider.authenticate

    async def spied(self, credential):
        spy.log("authenticate", None)
        return await authenticate(self, credential)

    monkeypatch.setattr(TokenProvider, "authenticate", spied)
    return spy


def session_calls(spy: Spy) -> list[tuple[str, object]]:
    """The calls of the one session: without the gateway's own start and stop records."""
    return [call for call in spy.calls if call not in (("record", "GatewayStarted"), ("record", "GatewayStopped"))]


def assert_no_hook_runs_per_row(calls: list[tuple[str, object]]) -> None:
    counts = Counter(hook for hook, _ in calls)
    assert counts["transform"] == 1, "bastion_transform is called once per result set"
    assert max(counts.values()) < ROWS, f"a hook was called about once per row: {counts}"


def test_psycopg_session_calls_hooks_in_the_documented_order(pg_gateway, spy):
    """psycopg speaks the extended protocol (Parse/Bind/Execute): still one parse per statement."""
    with pg_gateway(plugins=[spy], bundle=BUNDLE) as gw:
        with psycopg.connect(gw.dsn(), autocommit=True) as conn:
            assert [row[0] for row in conn.execute(SELECT)] == list(range(1, ROWS + 1))
            with pytest.raises(pg_errors.InsufficientPrivilege):
                conn.execute(REFUSED)
    calls = session_calls(spy)
    assert calls == EXPECTED
    assert_no_hook_runs_per_row(calls)


def test_simple_query_session_calls_hooks_in_the_documented_order(pg_gateway, spy):
    """The simple query protocol (one Query message per statement), as psql sends it."""
    with pg_gateway(plugins=[spy], bundle=BUNDLE) as gw:
        client = RawClient.connect(gw)
        try:
            client.send(Query(SELECT))
            rows = of_type(client.until_ready(), DataRow)
            assert [row.values[0] for row in rows] == [str(n).encode() for n in range(1, ROWS + 1)]
            client.send(Query(REFUSED))
            assert [e.sqlstate for e in of_type(client.until_ready(), ErrorResponse)] == ["42501"]
        finally:
            client.close()
    calls = session_calls(spy)
    assert calls == EXPECTED
    assert_no_hook_runs_per_row(calls)
