"""examples/custom_gateway.py: Bastion used as a library, with plugins registered in code.

The program runs as a subprocess, as a user would run it: it must serve its configuration, its
in-code office-hours rule must act on a real connection, and SIGTERM must stop it cleanly (exit
status 0, with the summary its in-code record hook kept)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "examples" / "custom_gateway.py"
# absolute bound on the whole test: start-up, a connection, shutdown
TEST_DEADLINE = 60


def closed_hours_now() -> str:
    """An office-hours window that the next two hours cannot fall into."""
    hour = datetime.now(timezone.utc).hour
    return f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"


def write_config(directory: Path, upstream_port: int) -> Path:
    path = directory / "bastion.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            admin_listen = "127.0.0.1:0"
            state_dir = "var"
            shutdown_grace = "2s"

            [[targets]]
            name = "echo"
            protocol = "tcp"
            listen = "127.0.0.1:0"
            upstream = "127.0.0.1:{upstream_port}"
            """
        )
    )
    return path


async def read_line_with(stream: trio.abc.ReceiveStream, buffer: bytearray, marker: bytes) -> bytes:
    while True:
        for line in bytes(buffer).splitlines(keepends=True):
            if marker in line and line.endswith(b"\n"):
                return line
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise AssertionError(f"the program ended before printing {marker!r}; output: {bytes(buffer)!r}")
        buffer += chunk


def test_custom_gateway_serves_applies_its_in_code_rule_and_stops_on_sigterm(tmp_path):
    for module in ("bastion.core.audit", "bastion.policies.bundle"):
        # TODO(integration): remove once the audit trail and the policy bundles are in core
        pytest.importorskip(module, reason=f"{module} is not written yet")

    async def main():
        with trio.fail_after(TEST_DEADLINE):
            upstream = trio.socket.socket()
            await upstream.bind(("127.0.0.1", 0))
            upstream.listen()
            config = write_config(tmp_path, upstream.getsockname()[1])
            stderr = open(tmp_path / "stderr.log", "wb")
            command = [sys.executable, str(PROGRAM), str(config), "--hours", closed_hours_now(), "--weekends"]
            async with trio.open_nursery() as nursery:
                process = await nursery.start(
                    lambda task_status: trio.run_process(
                        command, stdout=subprocess.PIPE, stderr=stderr, check=False, task_status=task_status
                    )
                )
                output = bytearray()
                line = await read_line_with(process.stdout, output, b"serving echo on ")
                host, _, port = line.split(b" on ")[1].strip().decode().rpartition(":")

                # outside office hours the connection is refused before anything is relayed
                stream = await trio.open_tcp_stream(host, int(port))
                assert await stream.receive_some(100) == b""
                await stream.aclose()

                process.send_signal(signal.SIGTERM)
                while chunk := await process.stdout.receive_some(4096):
                    output += chunk
                status = await process.wait()
            upstream.close()
            stderr.close()
            return status, output.decode()

    status, output = trio.run(main)
    assert status == 0, (tmp_path / "stderr.log").read_text()
    assert "denied by office-hours: 1" in output
    assert "session-started: 1" in output
    assert "gateway-stopped: 1" in output
