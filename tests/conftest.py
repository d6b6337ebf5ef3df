"""Shared fixtures. The throwaway servers themselves live in tests/servers.py."""

from __future__ import annotations

import errno

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


@pytest.fixture
def disk(monkeypatch):
    """A disk that can fill up: while ``disk.full``, audit log writes stop half way with ENOSPC.
    The trail retries a failed log quickly (a module may shorten or lengthen that by overriding)."""
    from bastion.core import audit, auditlog

    real = auditlog._write_all

    class Disk:
        full = False

    def write_all(descriptor, data):
        if Disk.full:
            real(descriptor, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(descriptor, data)

    monkeypatch.setattr(auditlog, "_write_all", write_all)
    monkeypatch.setattr(audit, "REOPEN_RETRY_MAX", 0.05)
    return Disk
