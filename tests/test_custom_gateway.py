"""examples/custom_gateway.py: Bastion used as a library, with plugins registered in code.

The program runs as a subprocess, as a user would run it. It must serve its configuration (a
``tcp`` target relaying to an echo server, granted to ``anonymous`` by a policy bundle), its in-code
office-hours rule must decide a real connection — relayed inside the hours, refused outside — and
SIGTERM must stop it cleanly: exit status 0, with the summary its in-code record hook kept.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "examples" / "custom_gateway.py"
# absolute bound on one run of the program: start-up, a connection, shutdown
TEST_DEADLINE = 60

POLICY = """
[[grant]]
name = "anyone-echo"
identities = { subjects = ["anonymous"] }
targets = ["echo"]
statements = ["*"]
"""


def office_hours(open_now: bool) -> str:
    """A window that holds the next hour (open) or that the next two hours cannot reach (closed)."""
    now = datetime.now(timezone.utc)
    start = now - timedelta(hours=1) if open_now else now + timedelta(hours=2)
    return f"{start:%H:%M}-{start + timedelta(hours=3 if open_now else 1):%H:%M}"


def write_config(directory: Path, upstream_port: int) -> Path:
    (directory / "policy.toml").write_text(POLICY)
    path = directory / "bastion.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            admin_listen = "127.0.0.1:0"
            state_dir = "var"
            shutdown_grace = "2s"
            policies = ["policy.toml"]

            [[targets]]
            name = "echo"
            protocol = "tcp"
            listen = "127.0.0.1:0"
            upstream = "127.0.0.1:{upstream_port}"
            """
        )
    )
    return path


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def read_line_with(stream: trio.abc.ReceiveStream, buffer: bytearray, marker: bytes) -> bytes:
    while True:
        for line in bytes(buffer).splitlines(keepends=True):
            if marker in line and line.endswith(b"\n"):
                return line
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise AssertionError(f"the program ended before printing {marker!r}; output: {bytes(buffer)!r}")
        buffer += chunk


def run_program(directory: Path, hours: str) -> tuple[int, bytes, str]:
    """Start the program, connect through it once, SIGTERM it: (status, what the connection got
    back, standard output)."""

    async def main():
        with trio.fail_after(TEST_DEADLINE):
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
                config = write_config(directory, listeners[0].socket.getsockname()[1])
                command = [sys.executable, str(PROGRAM), str(config), "--hours", hours, "--weekends"]
                with open(directory / "stderr.log", "wb") as stderr:
                    process = await nursery.start(
                        lambda task_status: trio.run_process(
                            command, stdout=subprocess.PIPE, stderr=stderr, check=False, task_status=task_status
                        )
                    )
                    output = bytearray()
                    line = await read_line_with(process.stdout, output, b"serving echo on ")
                    host, _, port = line.split(b" on ")[1].strip().decode().rpartition(":")

                    stream = await trio.open_tcp_stream(host, int(port))
                    received = b""
                    try:
                        await stream.send_all(b"hello")
                        while len(received) < 5 and (chunk := await stream.receive_some(100)):
                            received += chunk
                    except trio.BrokenResourceError:
                        pass  # refused: the gateway closed the connection (a reset, with "hello" unread)
                    await stream.aclose()

                    process.send_signal(signal.SIGTERM)
                    while chunk := await process.stdout.receive_some(4096):
                        output += chunk
                    status = await process.wait()
                nursery.cancel_scope.cancel()
        return status, received, output.decode()

    return trio.run(main)


@pytest.mark.parametrize("open_now", [True, False], ids=["inside-office-hours", "outside-office-hours"])
def test_custom_gateway_serves_applies_its_in_code_rule_and_stops_on_sigterm(tmp_path, open_now):
    status, received, output = run_program(tmp_path, office_hours(open_now))
    assert status == 0, (tmp_path / "stderr.log").read_text()
    assert "session-started: 1" in output  # the record hook saw the session
    assert "gateway-stopped: 1" in output  # and the clean stop
    if open_now:
        assert received == b"hello", "granted and inside office hours: relayed to the echo server"
        assert "denied by" not in output
    else:
        assert received == b"", "outside office hours the connection is refused before any relay"
        assert "denied by office-hours: 1" in output
