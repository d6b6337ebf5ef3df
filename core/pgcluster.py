"""Throwaway PostgreSQL clusters: ``initdb`` with SCRAM, a free loopback port, ``pg_ctl`` start/stop.

``bastion demo`` puts one behind the gateway, and the test suite starts one per run
(tests/servers.py). A cluster lives in its own temporary directory (data, socket, log, password
file) and nothing of it outlives :func:`stop`::

    with pgcluster.running() as cluster:
        psycopg.connect(cluster.dsn())

PostgreSQL refuses to run as root, so when this process is root the server runs as the
``postgres`` system user (``nobody`` when there is none) and the directory is handed to it.
The server is started in its own session, so a Ctrl-C meant for the program that started it
does not stop the database under its feet; that program stops it, in order, when it cleans up.

The functions block (subprocesses): from trio, call them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import attrs

LOOPBACK = "127.0.0.1"
SUPERUSER = "postgres"
# what a throwaway cluster needs to exist: initdb creates it, pg_ctl drives postgres
REQUIRED_PROGRAMS = ("initdb", "pg_ctl", "postgres")
# Debian and Ubuntu keep the server programs out of PATH, one directory per major version
DEBIAN_ROOT = Path("/usr/lib/postgresql")
INSTALL_HINT = (
    "PostgreSQL's server programs (initdb, pg_ctl, postgres) were not found. Install them — on "
    "Debian or Ubuntu: apt-get install postgresql (on Fedora: dnf install postgresql-server; on "
    "macOS: brew install postgresql) — or name their directory with --pg-bin-dir."
)
# pg_ctl waits this long for the server to accept connections (a cold CI disk can be slow)
START_TIMEOUT_SECONDS = 60
# a fast shutdown ends sessions at once; if even that hangs, an immediate one follows after this
STOP_TIMEOUT_SECONDS = 30
# a subprocess (initdb, pg_ctl) gets this much beyond pg_ctl's own wait before we give up on it
SUBPROCESS_MARGIN_SECONDS = 30
# the free port we pick can be taken by someone else before the server binds it: try a new one
PORT_ATTEMPTS = 3
PASSWORD_BYTES = 18  # 144 bits: a throwaway superuser password nobody types
# Settings of a cluster that holds nothing worth keeping: no fsync (nothing survives it anyway),
# room for a test suite's connections, SCRAM for every password stored.
THROWAWAY_SETTINGS = (
    "fsync = off",
    "synchronous_commit = off",
    "full_page_writes = off",
    "max_connections = 200",
    "password_encryption = 'scram-sha-256'",
)


class ClusterError(Exception):
    """A cluster could not be created, started or stopped; the message says why."""


class ProgramsMissing(ClusterError):
    """PostgreSQL's server programs are not installed (the message says how to install them)."""


# --- finding the programs ------------------------------------------------------------------------


def _version_key(directory: Path) -> tuple[int, ...]:
    """Sort key of /usr/lib/postgresql/<version>/bin: 16 after 9.6 (numbers, not text)."""
    return tuple(int(part) for part in re.findall(r"\d+", directory.parent.name)) or (0,)


def _has_programs(directory: Path) -> bool:
    return all((directory / name).is_file() and os.access(directory / name, os.X_OK) for name in REQUIRED_PROGRAMS)


def candidate_bin_dirs(debian_root: Path | None = None, path: str | None = None) -> list[Path]:
    """Where the server programs may be, best first: the newest Debian version, then PATH."""
    debian_root = DEBIAN_ROOT if debian_root is None else debian_root
    found = sorted((d for d in debian_root.glob("*/bin") if d.is_dir()), key=_version_key, reverse=True)
    initdb = shutil.which("initdb", path=path if path is not None else os.environ.get("PATH"))
    if initdb is not None:
        found.append(Path(initdb).resolve().parent)
    return found


def find_bin_dir(explicit: Path | None = None, *, candidates: Iterable[Path] | None = None) -> Path:
    """The directory holding initdb, pg_ctl and postgres; :class:`ProgramsMissing` otherwise."""
    if explicit is not None:
        if not _has_programs(explicit):
            missing = ", ".join(n for n in REQUIRED_PROGRAMS if not (explicit / n).is_file())
            raise ProgramsMissing(f"{explicit} does not hold PostgreSQL's server programs (missing: {missing}).")
        return explicit
    for directory in candidates if candidates is not None else candidate_bin_dirs():
        if _has_programs(directory):
            return directory
    raise ProgramsMissing(INSTALL_HINT)


def server_version(bin_dir: Path) -> str:
    """``16.4``, from ``postgres --version`` (empty when it cannot be told)."""
    try:
        result = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, timeout=SUBPROCESS_MARGIN_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = re.search(r"(\d+(?:\.\d+)*)", result.stdout)
    return match[1] if match else ""


# --- the cluster ---------------------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def service_user() -> str | None:
    """Who the server runs as: None (this process's user) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError:
        return "nobody"
    return SUPERUSER


def _run_as(user: str | None) -> dict:
    """subprocess keywords that drop root privileges to ``user`` (PostgreSQL refuses root)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@attrs.frozen
class Cluster:
    """A running throwaway cluster. ``base_dir`` holds everything of it."""

    host: str
    port: int
    superuser: str
    password: str = attrs.field(repr=False)
    base_dir: Path
    data_dir: Path
    socket_dir: Path
    bin_dir: Path
    log_file: Path
    run_as: str | None = None

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={user or self.superuser} password={password or self.password} dbname={dbname} sslmode=disable"

    def url(self, user: str | None = None, password: str | None = None, dbname: str = "postgres") -> str:
        return f"postgresql://{user or self.superuser}:{password or self.password}@{self.host}:{self.port}/{dbname}?sslmode=disable"

    def postmaster_pid(self) -> int | None:
        """The server's process id while it runs (from postmaster.pid), else None."""
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first_line)
        except (OSError, IndexError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, and someone else's (we dropped privileges for it)
            return pid
        return pid


def _run(command: Sequence[str], run_as: dict, what: str, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False, **run_as, **kwargs)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{what} did not finish within {timeout:.0f}s") from None
    except OSError as exc:
        raise ClusterError(f"{what} could not run: {exc.strerror or exc}") from None
    if result.returncode != 0:
        raise ClusterError(f"{what} failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()}")
    return result


def start(*, bin_dir: Path | None = None, extra_conf: str = "", prefix: str = "bastion-pg-", parent: Path | None = None) -> Cluster:
    """Create and start a cluster on a free loopback port; :func:`stop` removes it again.

    :param bin_dir: where initdb and pg_ctl are (default: :func:`find_bin_dir`).
    :param extra_conf: lines appended to postgresql.conf.
    :param prefix: the temporary directory's name prefix (``ps`` and ``ls /tmp`` show it).
    :param parent: where the temporary directory goes (default: the system's temp dir).
    """
    bin_dir = bin_dir or find_bin_dir()
    user = service_user()
    run_as = _run_as(user)
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        data_dir, socket_dir, log_file = base / "data", base / "sock", base / "server.log"
        socket_dir.mkdir()
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        password_file = base / "pw"
        password_file.write_text(password)
        if user is not None:
            for path in (base, socket_dir, password_file):
                shutil.chown(path, user)
        _run(
            [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER, "--auth=scram-sha-256", f"--pwfile={password_file}", "-E", "UTF8", "--locale=C", "--no-sync"],
            run_as,
            "initdb",
            START_TIMEOUT_SECONDS + SUBPROCESS_MARGIN_SECONDS,
            cwd=base,
        )
        password_file.unlink()  # initdb has stored its SCRAM verifier; the text is ours alone now
        settings = "\n".join((*THROWAWAY_SETTINGS, f"listen_addresses = '{LOOPBACK}'", f"unix_socket_directories = '{socket_dir}'"))
        base_conf = (data_dir / "postgresql.conf").read_text()
        for attempt in range(PORT_ATTEMPTS):
            port = free_port()
            (data_dir / "postgresql.conf").write_text(f"{base_conf}\n{settings}\nport = {port}\n{extra_conf}\n")
            try:
                _run(
                    [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log_file), "-w", "-t", str(START_TIMEOUT_SECONDS), "start"],
                    run_as,
                    "pg_ctl start",
                    START_TIMEOUT_SECONDS + SUBPROCESS_MARGIN_SECONDS,
                    cwd=base,
                    start_new_session=True,  # see the module docstring: our Ctrl-C is not its Ctrl-C
                )
            except ClusterError as exc:
                if attempt + 1 < PORT_ATTEMPTS and _port_was_taken(log_file):
                    continue
                raise ClusterError(f"{exc}\n{_log_tail(log_file)}") from None
            return Cluster(LOOPBACK, port, SUPERUSER, password, base, data_dir, socket_dir, bin_dir, log_file, user)
        raise AssertionError("unreachable: the last attempt returns or raises")
    except BaseException:
        _stop_server(bin_dir, base / "data", run_as)
        shutil.rmtree(base, ignore_errors=True)
        raise


def _port_was_taken(log_file: Path) -> bool:
    try:
        return "could not bind" in log_file.read_text(errors="replace")
    except OSError:
        return False


# the lines of the server log worth showing with a failed start
LOG_TAIL_LINES = 10


def _log_tail(log_file: Path) -> str:
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return "(no server log)"
    return "server log:\n" + "\n".join(f"  {line}" for line in lines[-LOG_TAIL_LINES:])


def _stop_server(bin_dir: Path, data_dir: Path, run_as: dict) -> None:
    """Stop a server if one runs on ``data_dir``: fast shutdown, then immediate, then SIGKILL."""
    if not (data_dir / "postmaster.pid").exists():
        return
    for mode in ("fast", "immediate"):
        try:
            result = subprocess.run(
                [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", mode, "-w", "-t", str(STOP_TIMEOUT_SECONDS), "stop"],
                capture_output=True,
                timeout=STOP_TIMEOUT_SECONDS + SUBPROCESS_MARGIN_SECONDS,
                check=False,
                **run_as,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode == 0 or not (data_dir / "postmaster.pid").exists():
            return
    with contextlib.suppress(OSError, IndexError, ValueError):  # last resort: it must not outlive us
        os.kill(int((data_dir / "postmaster.pid").read_text().splitlines()[0]), signal.SIGKILL)


def stop(cluster: Cluster, *, remove: bool = True) -> None:
    """Stop the server (if it runs) and, with ``remove``, delete the cluster's directory."""
    _stop_server(cluster.bin_dir, cluster.data_dir, _run_as(cluster.run_as))
    if remove:
        shutil.rmtree(cluster.base_dir, ignore_errors=True)


@contextlib.contextmanager
def running(**kwargs) -> Iterator[Cluster]:
    """:func:`start` … :func:`stop` around a block (keywords as for :func:`start`)."""
    cluster = start(**kwargs)
    try:
        yield cluster
    finally:
        stop(cluster)
