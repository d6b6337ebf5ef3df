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
