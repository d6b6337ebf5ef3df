"""Shared fixtures. The throwaway servers themselves live in tests/servers.py."""

from __future__ import annotations

import pytest

from tests import servers
from tests.issuer import issuer  # noqa: F401  (a Keycloak-compatible OIDC issuer)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL cluster with SCRAM authentication, shared by the whole test run."""
    with servers.run_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def mariadb_server():
    with servers.run_mariadb() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server():
    with servers.run_redis() as server:
        yield server


@pytest.fixture(scope="session")
def nats_server():
    with servers.run_nats() as server:
        yield server
