"""The upstream's schema, as the PostgreSQL protocol plugin keeps it for every session of a target.

Two views of one query over ``pg_attribute``/``pg_class``/``pg_namespace`` (system schemas left
out), both kept in ``session.target_state``:

* ``target_state["catalog"]``: the analysis :class:`~bastion.policies.analysis.Catalog`
  (qualified table -> ordered columns) the SQL parse hook resolves names with;
* ``target_state["postgres.columns"]``: ``(table OID, attnum) -> (schema.table, column, relkind)``,
  which turns a RowDescription's table OID and attribute number into the qualified column a
  result value comes straight from (``relkind`` ``v`` marks a view, whose columns come from
  elsewhere).

The catalog is read on a connection of its own, logged in with the target's credentials, so it
never runs inside a caller's session or transaction. The first session of a target waits for it;
later sessions use what is there and start a refresh in the background when it is older than the
target's ``catalog_refresh`` or when a session saw DDL succeed (``mark_stale``). Only one refresh
runs at a time per target; a failed refresh keeps the previous catalog.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("bastion.postgres")

# Keys in session.target_state (shared by every session of the target).
CATALOG_KEY = "catalog"
COLUMNS_KEY = "postgres.columns"
STATE_KEY = "postgres.catalog-state"

# A schema this large is not read at all: a catalog is held per target in memory, and a
# database with more columns than this is a warehouse, not something a gateway parses against.
MAX_CATALOG_COLUMNS = 500_000
# How long the first session of a target waits for the catalog before giving up on the
# session (the upstream is then too slow to serve anyone anyway).
FIRST_LOAD_TIMEOUT = 30.0
# How long a session that ran DDL waits for the refreshed catalog before it goes on with the old
# one (its next statement is then judged against the schema before the DDL).
REFRESH_WAIT_TIMEOUT = 10.0

CATALOG_QUERY = """\
SELECT n.nspname, c.relname, a.attname, a.attnum, c.oid, c.relkind
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE a.attnum > 0 AND NOT a.attisdropped
  AND c.relkind IN ('r', 'v', 'm', 'f', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_)'
ORDER BY 1, 2, 4
LIMIT {limit}"""


class CatalogTooLarge(Exception):
    pass


class CatalogState:
    """Per target: when the catalog was read, whether it is stale, the refresh under way."""

    def __init__(self) -> None:
        self.loaded_at: float | None = None  # time.monotonic() of the last successful read
        self.stale = False
        self.refreshing: trio.Event | None = None  # set when the refresh under way ends
        self.generation = 0  # bumped at every successful read

    def needs_refresh(self, interval: float) -> bool:
        if self.loaded_at is None or self.stale:
            return True
        return interval > 0 and time.monotonic() - self.loaded_at >= interval


def state_of(target_state: dict[str, Any]) -> CatalogState:
    state = target_state.get(STATE_KEY)
    if state is None:
        state = target_state[STATE_KEY] = CatalogState()
    return state


def mark_stale(target_state: dict[str, Any]) -> None:
    state_of(target_state).stale = True


Row = tuple[str, str, str, int, int, str]  # schema, table, column, attnum, table OID, relkind


def install(target_state: dict[str, Any], rows: list[Row]) -> None:
    """Build both views from the catalog query's rows and publish them."""
    columns: dict[tuple[int, int], tuple[str, str, str]] = {}
    for schema, table, column, attnum, table_oid, relkind in rows:
        columns[(table_oid, attnum)] = (f"{schema}.{table}".lower(), column.lower(), relkind)
    target_state[COLUMNS_KEY] = columns
    try:
        from bastion.policies.analysis import Catalog
    except ImportError:  # the analysis is not installed: only the OID map is of use
        target_state[CATALOG_KEY] = None
    else:
        target_state[CATALOG_KEY] = Catalog.from_rows((schema, table, column, attnum) for schema, table, column, attnum, _, _ in rows)


async def ensure_loaded(target_state: dict[str, Any], read: Callable[[], Awaitable[list[Row]]]) -> None:
    """Wait until the target has a catalog (the first session reads it; others wait for it)."""
    state = state_of(target_state)
    with trio.fail_after(FIRST_LOAD_TIMEOUT):
        while state.loaded_at is None:
            if state.refreshing is None:
                await _refresh(target_state, state, read)
            else:
                await state.refreshing.wait()


def refresh_if_old(target_state: dict[str, Any], interval: float, read, nursery: trio.Nursery) -> None:
    """Start a background refresh when the catalog is older than ``interval`` or stale."""
    state = state_of(target_state)
    if state.loaded_at is not None and state.needs_refresh(interval) and state.refreshing is None:
        state.refreshing = trio.Event()  # claimed now, so no other session starts one too
        nursery.start_soon(_refresh, target_state, state, read, True)


async def wait_fresh(target_state: dict[str, Any], read, nursery: trio.Nursery) -> None:
    """After DDL: refresh now (or join the refresh under way) and wait for it, within reason."""
    state = state_of(target_state)
    with trio.move_on_after(REFRESH_WAIT_TIMEOUT):
        if state.refreshing is None:
            state.refreshing = trio.Event()
            nursery.start_soon(_refresh, target_state, state, read, True)
        event = state.refreshing
        if event is not None:
            await event.wait()


async def _refresh(target_state: dict[str, Any], state: CatalogState, read, claimed: bool = False) -> None:
    event = state.refreshing if claimed else None
    if event is None:
        event = state.refreshing = trio.Event()
    generation = state.generation
    stale_before = state.stale
    state.stale = False  # DDL seen from now on marks the catalog stale again
    try:
        rows = await read()
        install(target_state, rows)
        state.loaded_at = time.monotonic()
        state.generation = generation + 1
    except Exception as exc:  # keep the old catalog; the next session tries again
        state.stale = state.stale or stale_before
        log.warning("could not read the catalog of the upstream: %s", exc)
        if state.loaded_at is None:
            raise
    finally:
        state.refreshing = None
        event.set()
