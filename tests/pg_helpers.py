"""PostgreSQL through Bastion, for tests: a gateway in front of the ``postgres_server`` fixture.

The gateway runs in a background thread with its own trio loop, so blocking clients (psycopg,
psql, pgbench, asyncpg in its own event loop) can talk to it from the test's thread::

    from tests.pg_helpers import pg_gateway  # noqa: F401  (the fixture)

    def test_select(pg_gateway):
        with pg_gateway() as gw:                       # starts a gateway, stops it afterwards
            with psycopg.connect(gw.dsn()) as conn:    # the caller's token is the password
                assert conn.execute("select 1").fetchone() == (1,)
            gw.wait_for(lambda: gw.events_of(events.SessionEnded))

``pg_gateway(...)`` (or :func:`run_pg_gateway` without pytest) takes:

``policy``
    a :class:`GrantAll` (the default grants every request; give it ``refuse=`` to deny some), or
    any plugin objects in ``plugins=``. A real policy bundle can be passed as TOML text in
    ``bundle=`` once the policy engine is installed; it is then loaded the way ``bastion serve``
    loads it (``gateway.policies``).
``options``
    extra keys for the ``[[targets]]`` section as TOML text, e.g. ``'databases = ["postgres", "x"]'``.
``record_rows`` / ``fail_closed``
    the ``[audit]`` settings.
``tls``
    a ``trustme`` CA: the listener gets a certificate for 127.0.0.1 and ``allow_plaintext_auth`` is
    switched off; ``gw.dsn(sslmode="verify-full")`` then needs ``sslrootcert=gw.ca_file``.

Every audit event is kept in memory (``gw.events``, ``gw.events_of(cls)``); set
``gw.trail.failing = True`` to make the trail refuse records (audit unavailable).
The upstream password is written to a file the config references; the caller never sees it.

Statements are parsed by the real SQL plugin. Two small test plugins, registered in code, let a
protocol test say who calls and what is allowed without writing a policy: ``kind = "test-tokens"``
maps fixed tokens to subjects (``TOKEN`` is the identity ``ci-bot``), and :class:`GrantAll` allows
everything except what its ``refuse`` function picks. With ``bundle=`` the real policy engine
decides instead; the real identity providers are exercised through ``gateway_extra`` sections and
in tests/test_identity_*.py.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from bastion.core import events
from bastion.core.config import disabled_plugins, load_config, read_toml
from bastion.core.hooks import Hooks
from bastion.core.hookspecs import hookimpl
from bastion.core.plugins import build_plugin_manager
from bastion.core.server import Gateway
from bastion.core.specs import IdentityProviderSpec
from bastion.policies.model import AuthOutcome, Decision, Identity, Request

TOKEN = "pg-test-token-" + uuid.uuid4().hex
OTHER_TOKEN = "pg-other-token-" + uuid.uuid4().hex
SUBJECT = "ci-bot"
TARGET = "pg"
# how long a started gateway may take to listen, and to stop (a hung one fails the test)
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
# the default wait for an audit event that is recorded asynchronously (a session's end)
EVENT_TIMEOUT = 10.0


# --- test plugins --------------------------------------------------------------------------------


@attrs.frozen
class TokenOptions:
    """``tokens``: token -> subject; ``groups``: subject -> groups."""

    tokens: dict[str, str]
    groups: dict[str, list[str]] = attrs.field(factory=dict)


class TokenProvider:
    def __init__(self, options: TokenOptions, context) -> None:
        self.options = options

    async def authenticate(self, credential):
        if not credential.secret:
            return AuthOutcome.unknown()
        for token, subject in self.options.tokens.items():
            if hmac.compare_digest(credential.secret.encode(), token.encode()):
                groups = self.options.groups.get(subject, ())
                return AuthOutcome.ok(Identity(provider="test-tokens", subject=subject, groups=groups, auth_method="api-key"))
        return AuthOutcome.reject("unknown token")

    async def aclose(self) -> None:
        pass


class TokenIdentities:
    """Registers ``[[identity]] kind = "test-tokens"``."""

    @hookimpl
    def bastion_register_identity_providers(self):
        return [IdentityProviderSpec(kind="test-tokens", factory=TokenProvider, options=TokenOptions)]


class GrantAll:
    """Grants every request unless ``refuse(request)`` returns ``(rule, reason)``.

    ``refuse`` sees connect requests too (``request.action == "connect"``).
    """

    def __init__(self, refuse: Callable[[Request], tuple[str, str] | None] | None = None) -> None:
        self.refuse = refuse

    @hookimpl
    def bastion_authorize(self, session, request):
        if self.refuse is not None:
            refused = self.refuse(request)
            if refused is not None:
                return Decision.deny(*refused)
        return Decision.allow("test:grant-all", "the test grants everything")


def refuse_text(*words: str, rule: str = "test:refused") -> GrantAll:
    """A :class:`GrantAll` that refuses any statement whose text contains one of ``words``
    (case-insensitive), and every fast-path function call."""

    lowered = tuple(w.lower() for w in words)

    def refuse(request: Request) -> tuple[str, str] | None:
        if request.message.kind == "function-call":
            return ("test:no-function-call", "fast-path function calls are not granted")
        text = request.message.text.lower()
        for word in lowered:
            if word in text:
                return (rule, f"statements mentioning {word} are not allowed")
        return None

    return GrantAll(refuse)


# --- the audit trail -----------------------------------------------------------------------------


class AuditUnavailable(Exception):
    pass


class MemoryTrail:
    """Keeps every event in a list. ``failing = True``: every record raises (audit unavailable)."""

    def __init__(self) -> None:
        self.events: list[events.AuditEvent] = []
        self.failing = False

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def record(self, event, durable: bool = False) -> None:
        if self.failing and isinstance(event, events.RequestJudged):
            raise AuditUnavailable("the test switched the trail off")
        self.events.append(event)

    async def aclose(self) -> None:
        pass


# --- the running gateway --------------------------------------------------------------------------


@attrs.define
class PgGateway:
    """A gateway serving the ``pg`` target in a background thread."""

    host: str
    port: int
    server: Any  # tests.servers.PostgresServer
    gateway: Gateway
    trail: MemoryTrail
    directory: Path
    trio_token: trio.lowlevel.TrioToken | None
    ca_file: Path | None = None
    child: subprocess.Popen | None = None

    @property
    def events(self) -> list[events.AuditEvent]:
        return self.trail.events

    def events_of(self, cls: type) -> list:
        return [e for e in self.trail.events if isinstance(e, cls)]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = EVENT_TIMEOUT) -> Any:
        """Poll until ``predicate()`` is truthy (events are recorded asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            time.sleep(0.01)

    def dsn(self, token: str | None = None, *, user: str = SUBJECT, dbname: str = "postgres", sslmode: str | None = None, **extra: Any) -> str:
        parts = {
            "host": self.host,
            "port": self.port,
            "user": user,
            "password": TOKEN if token is None else token,
            "dbname": dbname,
            "sslmode": sslmode or ("disable" if self.ca_file is None else "require"),
            "connect_timeout": 10,
        }
        parts.update(extra)
        return " ".join(f"{k}={_quote_conninfo(str(v))}" for k, v in parts.items())

    def url(self, token: str | None = None, *, user: str = SUBJECT, dbname: str = "postgres") -> str:
        sslmode = "disable" if self.ca_file is None else "require"
        return f"postgresql://{user}:{TOKEN if token is None else token}@{self.host}:{self.port}/{dbname}?sslmode={sslmode}"

    def env(self, token: str | None = None, *, user: str = SUBJECT, dbname: str = "postgres") -> dict[str, str]:
        """Environment for libpq programs (psql, pgbench) pointed at the gateway."""
        env = dict(os.environ)
        env.update(
            PGHOST=self.host,
            PGPORT=str(self.port),
            PGUSER=user,
            PGPASSWORD=TOKEN if token is None else token,
            PGDATABASE=dbname,
            PGSSLMODE="disable" if self.ca_file is None else "require",
            PGCONNECT_TIMEOUT="10",
        )
        return env

    def psql(self, *args: str, input: str | None = None, timeout: float = 60, token: str | None = None) -> subprocess.CompletedProcess:
        """Run psql (``-X``, no ~/.psqlrc) against the gateway and return the finished process."""
        return subprocess.run(
            [str(self.server.bin_dir / "psql"), "-X", *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(token),
            timeout=timeout,
            check=False,
        )

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a synchronous function in the gateway's trio thread."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self.trio_token)

    def sessions(self) -> int:
        return self.call(lambda: len(self.gateway.runtime.sessions))


def _quote_conninfo(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def write_pg_config(
    directory: Path,
    server: Any,
    *,
    options: str = "",
    record_rows: str | int = "all",
    fail_closed: bool = True,
    tokens: dict[str, str] | None = None,
    groups: dict[str, list[str]] | None = None,
    tls: Any = None,
    bundle: str | None = None,
    gateway_extra: str = "",
) -> Path:
    """Write ``bastion.toml`` (+ the upstream password file, TLS files, policy bundle)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "upstream.pw").write_text(server.password + "\n")
    tokens = tokens if tokens is not None else {TOKEN: SUBJECT, OTHER_TOKEN: "other-bot"}
    token_lines = ", ".join(f"{json.dumps(t)} = {json.dumps(s)}" for t, s in tokens.items())
    group_lines = ", ".join(f"{json.dumps(s)} = {json.dumps(list(gs))}" for s, gs in (groups or {}).items())
    record = f'"{record_rows}"' if isinstance(record_rows, str) else str(record_rows)
    policies = ""
    if bundle is not None:
        (directory / "policy.toml").write_text(textwrap.dedent(bundle))
        policies = 'policies = ["policy.toml"]\n'
    listener_tls = ""
    plaintext = "allow_plaintext_auth = true"
    if tls is not None:
        cert = tls.issue_cert("127.0.0.1", "localhost")
        cert.private_key_pem.write_to_path(str(directory / "server.key"))
        cert.cert_chain_pems[0].write_to_path(str(directory / "server.crt"))
        tls.cert_pem.write_to_path(str(directory / "ca.crt"))
        listener_tls = 'tls = { cert = "server.crt", key = "server.key" }'
        plaintext = ""
    defaults = {"admin_listen": '"127.0.0.1:0"', "state_dir": '"var"', "shutdown_grace": '"2s"'}
    overridden = {line.split("=", 1)[0].strip() for line in gateway_extra.splitlines() if "=" in line}
    gateway_lines = "".join(f"{key} = {value}\n" for key, value in defaults.items() if key not in overridden)
    text = f"""
[gateway]
{gateway_lines}{policies}{gateway_extra}

[audit]
record_rows = {record}
fail_closed = {str(fail_closed).lower()}

[[identity]]
kind = "test-tokens"
tokens = {{ {token_lines} }}
groups = {{ {group_lines} }}

[[targets]]
name = "{TARGET}"
protocol = "postgres"
listen = "127.0.0.1:0"
upstream = "{server.host}:{server.port}"
credentials = {{ user = "{server.superuser}", password = {{ file = "upstream.pw" }} }}
{plaintext}
{listener_tls}
database = "postgres"
{textwrap.dedent(options)}
"""
    path = directory / "bastion.toml"
    path.write_text(text)
    return path


def _postgres_plugin() -> object:
    from bastion.plugins import postgres

    return postgres


def build_hooks_and_config(config_path: Path, plugins: Iterable[object]) -> tuple[Any, Hooks, Any]:
    """The loading ``bastion serve`` does, with the test's plugin objects registered in code."""
    raw = read_toml(config_path)
    extra = [TokenIdentities(), *plugins]
    from bastion.core.plugins import BUILTIN_PLUGINS

    if "postgres" not in BUILTIN_PLUGINS:
        extra.append(_postgres_plugin())
    import bastion.plugins.sql as sql

    if "sql" not in BUILTIN_PLUGINS:
        extra.append(sql)
    pm = build_plugin_manager(disabled_plugins(raw), entry_points=False, extra=extra)
    hooks = Hooks(pm)
    config = load_config(config_path, hooks.registry(), raw)
    policy = None
    if config.gateway.policies:
        from bastion.core.loading import load_policy

        policy = load_policy(config)
    return config, hooks, policy


@contextlib.contextmanager
def run_pg_gateway(
    server: Any,
    directory: Path,
    *,
    policy: object | None = None,
    plugins: Iterable[object] = (),
    options: str = "",
    record_rows: str | int = "all",
    fail_closed: bool = True,
    tokens: dict[str, str] | None = None,
    groups: dict[str, list[str]] | None = None,
    tls: Any = None,
    bundle: str | None = None,
    gateway_extra: str = "",
    process: str | None = None,
    real_trail: bool | str = False,
) -> Iterator[PgGateway]:
    """Serve a ``postgres`` target in front of ``server`` until the block ends.

    ``process``: run the gateway in a child process instead of a thread, with the plugin objects
    returned by the function ``"module:function"`` names (``""`` for the default GrantAll, ``"-"``
    for none: with ``bundle``, the real policy engine alone decides). Use it
    with clients that block in C while holding the GIL (psycopg's ``conn.cancel()``), and for
    measurements; events are then read back from a file, and ``gw.call``/``gw.trail`` are not
    available. ``real_trail``: record to the real audit trail on disk (``var/audit`` under the
    directory) instead of memory; ``gw.events`` is then empty. With ``process``, ``real_trail =
    "null"`` drops every event (to measure the protocol alone). A child process run with
    ``BASTION_PROFILE=<file>`` in its environment writes a cProfile of the gateway there.
    """
    config_path = write_pg_config(
        directory,
        server,
        options=options,
        record_rows=record_rows,
        fail_closed=fail_closed,
        tokens=tokens,
        groups=groups,
        tls=tls,
        bundle=bundle,
        gateway_extra=gateway_extra,
    )
    ca_file = directory / "ca.crt" if tls is not None else None
    if process is not None:
        with _run_in_process(server, directory, config_path, process, real_trail, ca_file) as running:
            yield running
        return
    extra = list(plugins)
    if bundle is None:
        extra.append(policy if policy is not None else GrantAll())
    config, hooks, loaded_policy = build_hooks_and_config(config_path, extra)
    trail = MemoryTrail()
    gateway = Gateway(config, hooks, policy=loaded_policy, trail=None if real_trail else trail)
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            started.set()

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            box["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=thread_main, name="bastion-gateway", daemon=True)
    thread.start()
    if not started.wait(START_TIMEOUT) or "error" in box:
        raise RuntimeError(f"the gateway did not start: {box.get('error')!r}") from box.get("error")
    address = gateway.addresses[TARGET]
    running = PgGateway(
        host=address.host,
        port=address.port,
        server=server,
        gateway=gateway,
        trail=trail,
        directory=directory,
        trio_token=box["token"],
        ca_file=ca_file,
    )
    try:
        yield running
    finally:
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(gateway.shutdown, "test finished", trio_token=box["token"])
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("the gateway did not stop")
        if "error" in box:
            raise box["error"]


class NullTrail(MemoryTrail):
    """Keeps nothing: for measuring the gateway without the cost of any record."""

    async def record(self, event, durable: bool = False) -> None:
        pass


class FileTrail(MemoryTrail):
    """Appends every event as a JSON line (for a gateway in a child process)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in aclose

    async def record(self, event, durable: bool = False) -> None:
        self.file.write(json.dumps(events.event_to_dict(event), default=str) + "\n")
        self.file.flush()

    async def aclose(self) -> None:
        self.file.close()


class _EventFile:
    """``trail``-like view of the events a child process wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failing = False

    @property
    def events(self) -> list[events.AuditEvent]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        out = []
        for line in lines:
            try:
                out.append(events.event_from_dict(json.loads(line)))
            except Exception:  # a line being written right now
                continue
        return out


@contextlib.contextmanager
def _run_in_process(server, directory: Path, config_path: Path, plugins: str, real_trail: bool, ca_file) -> Iterator[PgGateway]:
    events_path = directory / "events.jsonl"
    trail_kind = real_trail if isinstance(real_trail, str) else ("real" if real_trail else "file")
    command = [sys.executable, "-m", "tests.pg_helpers", str(config_path), str(events_path), plugins, trail_kind]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=str(Path(__file__).resolve().parent.parent), text=True)
    try:
        ready = _read_line(child, START_TIMEOUT)
        if not ready.startswith("READY "):
            raise RuntimeError(f"the gateway process did not start: {ready!r}")
        _, host, port = ready.split()
        yield PgGateway(
            host=host,
            port=int(port),
            server=server,
            gateway=None,
            trail=_EventFile(events_path),
            directory=directory,
            trio_token=None,
            ca_file=ca_file,
            child=child,
        )
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if child.stdout is not None:
            child.stdout.close()


def _read_line(child: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(child.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0].strip() if box else ""


def _serve_in_process(config_path: str, events_path: str, plugins: str, trail_kind: str) -> None:
    """The child process: the same loading, with plugin objects from ``module:function``."""
    import importlib

    extra: list[object] = []
    if plugins == "-":
        extra = []  # a policy bundle decides (run_pg_gateway(bundle=..., process="-"))
    elif plugins:
        module_name, _, function = plugins.partition(":")
        extra = list(getattr(importlib.import_module(module_name), function)())
    else:
        extra = [GrantAll()]
    config, hooks, loaded_policy = build_hooks_and_config(Path(config_path), extra)
    trail = {"real": None, "null": NullTrail()}.get(trail_kind) if trail_kind in ("real", "null") else FileTrail(Path(events_path))
    gateway = Gateway(config, hooks, policy=loaded_policy, trail=trail)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(gateway.run, handle_signals=True))
            address = gateway.addresses[TARGET]
            print(f"READY {address.host} {address.port}", flush=True)

    profile = os.environ.get("BASTION_PROFILE")
    if profile:
        import cProfile

        cProfile.runctx("trio.run(main)", globals(), {"trio": trio, "main": main}, profile)
    else:
        trio.run(main)


@pytest.fixture
def pg_gateway(postgres_server, tmp_path):
    """A factory: ``with pg_gateway(**kwargs) as gw`` (see :func:`run_pg_gateway`)."""
    counter = iter(range(1000))

    def start(**kwargs: Any):
        return run_pg_gateway(postgres_server, tmp_path / f"gw{next(counter)}", **kwargs)

    return start


# --- small conveniences ----------------------------------------------------------------------------


def fresh_table(server: Any, ddl: str, name: str | None = None) -> str:
    """Create a table with a unique name directly on the server; ``{t}`` in ``ddl`` is the name."""
    name = name or f"t_{uuid.uuid4().hex[:10]}"
    server.execute(ddl.format(t=name))
    return name


# --- a raw protocol client -------------------------------------------------------------------------


class RawClient:
    """A blocking PostgreSQL client speaking messages, for tests of exact protocol behaviour.

    ``send(*messages)`` writes messages (codec values or raw bytes) in one write; ``read()``
    returns the next server message; ``until_ready()`` reads up to and including ReadyForQuery.
    Every read has a socket timeout, so a hung gateway fails the test instead of hanging it.
    """

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        import socket

        from bastion.protocols.postgres.framing import BackendDecoder

        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.decoder = BackendDecoder()

    @classmethod
    def connect(cls, gw: PgGateway, token: str | None = None, *, user: str = SUBJECT, dbname: str = "postgres") -> RawClient:
        """Connect and log in; the messages of the login are in ``client.login_messages``."""
        from bastion.protocols.postgres.messages import PasswordMessage, StartupMessage

        client = cls(gw.host, gw.port)
        client.send(StartupMessage(parameters=(("user", user), ("database", dbname))))
        client.read()  # AuthenticationCleartextPassword
        client.send(PasswordMessage(TOKEN if token is None else token))
        client.login_messages = client.until_ready()
        return client

    def send(self, *messages: Any) -> None:
        from bastion.protocols.postgres.codec import encode

        self.sock.sendall(b"".join(m if isinstance(m, (bytes, bytearray)) else encode(m) for m in messages))

    def read(self) -> Any:
        """The next message; None when the server closed the connection."""
        from bastion.protocols.postgres.framing import END_OF_STREAM, NEED_DATA

        while True:
            event = self.decoder.next_event()
            if event is END_OF_STREAM:
                return None
            if event is not NEED_DATA:
                return event
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            self.decoder.receive_data(data)

    def until_ready(self) -> list:
        """Messages up to and including the next ReadyForQuery (or until the connection closes)."""
        from bastion.protocols.postgres.messages import ReadyForQuery

        messages = []
        while True:
            message = self.read()
            if message is None:
                return messages
            messages.append(message)
            if isinstance(message, ReadyForQuery):
                return messages

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def of_type(messages: Iterable[Any], cls: type) -> list:
    return [m for m in messages if isinstance(m, cls)]


if __name__ == "__main__":  # the gateway process of run_pg_gateway(process=...)
    _serve_in_process(*sys.argv[1:5])
