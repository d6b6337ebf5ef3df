"""A bare TCP hop on Bastion's own runtime: the floor under any trio relay in this process model.

    .venv/bin/python benchmarks/bare_hop.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT

Accepts connections and copies bytes both ways to the upstream server with the same socket layer
the PostgreSQL relay uses (:class:`bastion.plugins.postgres_io.Channel` on trio), and nothing
else: no framing, no identity, no policy, no masking, no audit. ``benchmarks/run.py`` measures
pgbench through it beside direct, PgBouncer and Bastion, so the table shows how much of Bastion's
cost is the pipeline and how much is a Python event loop relaying bytes at all.

A benchmark tool, not a product: it authenticates nobody and must never listen beyond loopback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bastion.plugins.postgres_io import Channel  # noqa: E402

# What one read asks for: the relay's own read size.
RECEIVE_BYTES = 65536


async def _copy(source: Channel, destination: Channel, done: trio.CancelScope) -> None:
    try:
        while data := await source.receive(RECEIVE_BYTES):
            await destination.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.cancel()  # either side closing ends the connection


async def _relay(client: trio.SocketStream, upstream_host: str, upstream_port: int) -> None:
    async with client:
        upstream = await trio.open_tcp_stream(upstream_host, upstream_port)
        async with upstream, trio.open_nursery() as nursery:
            from_client, to_upstream = Channel(client), Channel(upstream)
            nursery.start_soon(_copy, from_client, to_upstream, nursery.cancel_scope)
            nursery.start_soon(_copy, to_upstream, from_client, nursery.cancel_scope)


async def serve(listen_port: int, upstream_host: str, upstream_port: int) -> None:
    await trio.serve_tcp(lambda stream: _relay(stream, upstream_host, upstream_port), listen_port, host="127.0.0.1")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        trio.run(serve, int(args[0]), args[1], int(args[2]))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
