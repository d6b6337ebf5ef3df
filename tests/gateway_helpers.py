"""Helpers for running a real Gateway inside a test's trio run."""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import trio

from bastion.core.loading import load
from bastion.core.server import Gateway


def write_config(directory: Path, body: str, *, policy: str | None = None, name: str = "bastion.toml") -> Path:
    """Write a config (and a policy bundle next to it, named in gateway.policies)."""
    directory.mkdir(parents=True, exist_ok=True)
    body = textwrap.dedent(body)
    if policy is not None:
        (directory / "policy.toml").write_text(textwrap.dedent(policy))
        if "[gateway]" in body:
            body = body.replace("[gateway]", '[gateway]\npolicies = ["policy.toml"]', 1)
        else:
            body = '[gateway]\npolicies = ["policy.toml"]\nadmin_listen = "127.0.0.1:0"\n' + body
    path = directory / name
    path.write_text(body)
    return path


def write_oidc_postgres_config(
    directory: Path,
    server,
    issuer_url: str,
    audience: str,
    *,
    listen: str = "127.0.0.1:0",
    admin_listen: str = "127.0.0.1:0",
    user: str = "postgres",
    password: str = '{ file = "db-password" }',
    gateway_extra: str = "",
    identity_extra: str = "",
) -> Path:
    """A ``postgres`` target named ``db`` behind a GitHub-shaped ``oidc`` identity section, with a
    grant letting ``repo:acme/etl:*`` run selects; Bastion logs in upstream as ``user`` with the
    ``password`` reference (TOML). Returns the configuration's path."""
    policy = """
        [[grant]]
        name = "ci"
        identities = { subjects = ["repo:acme/etl:*"] }
        targets = ["db"]
        statements = ["select"]
        """
    return write_config(
        directory,
        f"""
        [gateway]
        state_dir = "state"
        admin_listen = "{admin_listen}"
        {gateway_extra}

        [[identity]]
        kind = "oidc"
        name = "github"
        issuer = "{issuer_url}"
        audience = "{audience}"
        subject_template = "repo:{{repository}}:ref:{{ref}}"
        groups_claim = "teams"
        ci_claims = ["repository", "run_id"]
        {identity_extra}

        [[targets]]
        name = "db"
        protocol = "postgres"
        listen = "{listen}"
        upstream = "{server.host}:{server.port}"
        database = "postgres"
        allow_plaintext_auth = true
        [targets.credentials]
        user = "{user}"
        password = {password}
        """,
        policy=policy,
    )


@contextlib.asynccontextmanager
async def running_gateway(config_path: Path, *, extra_plugins: Iterable[object] = ()) -> AsyncIterator[Gateway]:
    """A gateway serving in the background for the duration of the block, then shut down."""
    loaded = load(config_path, extra_plugins=extra_plugins)
    gateway = Gateway(loaded.config, loaded.hooks, policy=loaded.policy)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        try:
            yield gateway
        finally:
            gateway.shutdown("test finished")


@contextlib.contextmanager
def bastion_serve(config_path: Path, admin_port: int, *extra_args: str, timeout: float = 30, serve_args: tuple[str, ...] = ()):
    """``bastion serve`` as a child process, ready once its admin port answers; SIGTERM at the end.

    Yields the process; its captured output is in ``process.output`` (stdout, stderr) afterwards.
    """
    import signal
    import socket
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "bastion.core.cli", *extra_args, "serve", "-c", str(config_path), *serve_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", admin_port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bastion serve did not start: {process.communicate()[1]}") from None
                time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.output = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.output = process.communicate()
