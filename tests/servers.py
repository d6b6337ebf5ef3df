"""Throwaway servers for tests: PostgreSQL (SCRAM), MariaDB (mysql_native_password), Redis, NATS.

Each starts on a free loopback port in a temporary directory and is torn down afterwards; no test
depends on a server the machine happens to run. When a server's binaries are missing the tests
that need it are skipped — except under CI=true, where a missing server is a failure.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def missing(what: str) -> None:
    """Skip (or, under CI, fail) a test whose server is not installed."""
    message = f"{what} is not installed (run .ci/run to install it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def find_binary(name: str, extra_dirs: list[Path] = ()) -> str | None:
    for directory in extra_dirs:
        candidate = directory / name
        if candidate.exists():
            return str(candidate)
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited early with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def _as_user(user: str | None) -> dict:
    """PostgreSQL and MariaDB refuse to run as root: run them as their system user."""
    if user is None or os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _service_user(name: str) -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        return "nobody"
    return name


# --- PostgreSQL --------------------------------------------------------------------------------------


@attrs.frozen
class PostgresServer:
    host: str
    port: int
    superuser: str
    password: str
    data_dir: Path
    socket_dir: Path
    bin_dir: Path
    log_file: Path

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={user or self.superuser} password={password or self.password} dbname={dbname} sslmode=disable"

    def url(self, user: str | None = None, password: str | None = None, dbname: str = "postgres") -> str:
        return f"postgresql://{user or self.superuser}:{password or self.password}@{self.host}:{self.port}/{dbname}?sslmode=disable"

    def psql(self, sql: str, dbname: str = "postgres", check: bool = True) -> str:
        env = dict(os.environ, PGPASSWORD=self.password)
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At", "-h", self.host, "-p", str(self.port), "-U", self.superuser, "-d", dbname, "-c", sql],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr}")
        return result.stdout

    def execute(self, sql: str, dbname: str = "postgres") -> list[tuple]:
        import psycopg

        with psycopg.connect(self.dsn(dbname=dbname), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []


@contextlib.contextmanager
def run_postgres(extra_conf: str = "") -> Iterator[PostgresServer]:
    """A cluster from :mod:`bastion.core.pgcluster` (the one ``bastion demo`` starts), as a fixture value."""
    from bastion.core import pgcluster

    try:
        bin_dir = pgcluster.find_bin_dir()
    except pgcluster.ProgramsMissing:
        missing("PostgreSQL (initdb, pg_ctl)")
    with pgcluster.running(bin_dir=bin_dir, extra_conf=extra_conf) as cluster:
        yield PostgresServer(cluster.host, cluster.port, cluster.superuser, cluster.password, cluster.data_dir, cluster.socket_dir, cluster.bin_dir, cluster.log_file)


# --- MariaDB -----------------------------------------------------------------------------------------


@attrs.frozen
class MariaDBServer:
    host: str
    port: int
    root_password: str
    socket_path: Path
    data_dir: Path


@contextlib.contextmanager
def run_mariadb() -> Iterator[MariaDBServer]:
    install = find_binary("mariadb-install-db") or find_binary("mysql_install_db")
    daemon = find_binary("mariadbd") or find_binary("mysqld")
    if install is None or daemon is None:
        missing("MariaDB server (mariadb-install-db, mariadbd)")
    user = _service_user("mysql")
    base = Path(tempfile.mkdtemp(prefix="bastion-mariadb-"))
    data_dir, sock = base / "data", base / "mysqld.sock"
    if user is not None:
        shutil.chown(base, user)
    port = free_port()
    user_args = [f"--user={user}"] if user else []
    subprocess.run([install, f"--datadir={data_dir}", "--auth-root-authentication-method=normal", "--skip-test-db", *user_args], check=True, capture_output=True)
    process = subprocess.Popen(
        [daemon, "--no-defaults", f"--datadir={data_dir}", f"--socket={sock}", f"--port={port}", f"--bind-address={LOOPBACK}", "--skip-name-resolve", "--innodb-flush-log-at-trx-commit=0", f"--pid-file={base / 'pid'}", *user_args],
        stdout=subprocess.DEVNULL,
        stderr=open(base / "server.log", "wb"),
    )
    try:
        wait_for_port(port, process)
        password = secrets.token_urlsafe(18)
        subprocess.run(
            ["mariadb", f"--socket={sock}", "-uroot", "-e", f"ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('{password}'); CREATE OR REPLACE USER 'root'@'127.0.0.1' IDENTIFIED VIA mysql_native_password USING PASSWORD('{password}'); GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;"],
            check=True,
            capture_output=True,
        )
        yield MariaDBServer(LOOPBACK, port, password, sock, data_dir)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(base, ignore_errors=True)


# --- Redis and NATS ----------------------------------------------------------------------------------


@attrs.frozen
class SimpleServer:
    host: str
    port: int
    directory: Path


@contextlib.contextmanager
def run_redis() -> Iterator[SimpleServer]:
    binary = find_binary("redis-server")
    if binary is None:
        missing("redis-server")
    base = Path(tempfile.mkdtemp(prefix="bastion-redis-"))
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no", "--dir", str(base), "--logfile", str(base / "redis.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        yield SimpleServer(LOOPBACK, port, base)
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def run_nats() -> Iterator[SimpleServer]:
    binary = find_binary("nats-server")
    if binary is None:
        missing("nats-server")
    base = Path(tempfile.mkdtemp(prefix="bastion-nats-"))
    port = free_port()
    process = subprocess.Popen(
        [binary, "-a", LOOPBACK, "-p", str(port), "-js", "-sd", str(base), "--http_port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        yield SimpleServer(LOOPBACK, port, base)
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(base, ignore_errors=True)
