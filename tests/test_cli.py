"""The `bastion` command as a user runs it: check, plugins, serve and a clean SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.gateway_helpers import write_config
from tests.servers import free_port

BASTION = [sys.executable, "-m", "bastion.core.cli"]
GRANT = """
[[grant]]
name = "anyone"
identities = { subjects = ["anonymous"] }
targets = ["raw"]
statements = ["connect"]
"""


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*BASTION, *args], capture_output=True, text=True, timeout=timeout)


def config(tmp_path: Path, listen_port: int = 0, admin_port: int = 0, policy: str = GRANT) -> Path:
    return write_config(
        tmp_path,
        f"""
        [gateway]
        state_dir = "state"
        admin_listen = "127.0.0.1:{admin_port}"
        shutdown_grace = "2s"

        [[targets]]
        name = "raw"
        protocol = "tcp"
        listen = "127.0.0.1:{listen_port}"
        upstream = "127.0.0.1:9"
        """,
        policy=policy,
    )


def test_check_prints_a_summary(tmp_path):
    result = run("check", "-c", str(config(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "raw: tcp on 127.0.0.1:0 -> 127.0.0.1:9" in result.stdout
    assert "policy " in result.stdout and "audit: file (default); fail_closed = true" in result.stdout


def test_check_reports_every_error_with_its_place_and_exits_1(tmp_path):
    path = config(tmp_path)
    path.write_text(path.read_text().replace('listen = "127.0.0.1:0"\nupstream', 'listen = "6432"\nupstream') + "\n[audit]\nfail_open = 1\n")
    (tmp_path / "policy.toml").write_text(GRANT.replace('"raw"', '"rwa"').replace('"connect"', '"connect"]\ncolour = ["red"'))
    result = run("check", "-c", str(path))
    assert result.returncode == 1
    assert 'targets[0].listen: expected "host:port", got "6432"' in result.stderr
    assert 'audit: unknown key "fail_open"' in result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_bundle_errors_and_unknown_targets(tmp_path):
    result = run("check", "-c", str(config(tmp_path, policy=GRANT.replace('"raw"', '"nowhere"'))))
    assert result.returncode == 1
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr
    result = run("check", "-c", str(config(tmp_path, policy='[[guardrail]]\nname = "x"\ndetect = ["dorp"]\n')))
    assert result.returncode == 1 and 'unknown detector "dorp"' in result.stderr


def test_unknown_plugin_in_disable_plugins_is_an_error(tmp_path):
    path = config(tmp_path)
    path.write_text(path.read_text().replace("[gateway]", '[gateway]\ndisable_plugins = ["no-such-plugin"]'))
    result = run("check", "-c", str(path))
    assert result.returncode == 1 and "no-such-plugin" in result.stderr


def test_plugins_lists_builtins_and_the_hooks_they_implement(tmp_path):
    result = run("plugins")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert "tcp  (built-in)" in lines
    assert "    bastion_register_protocols" in lines[lines.index("tcp  (built-in)") + 1 :][:3]
    assert "policy  (built-in)" in lines and "    bastion_authorize" in lines


def test_a_disabled_plugin_is_gone(tmp_path):
    path = config(tmp_path)
    path.write_text(path.read_text().replace("[gateway]", '[gateway]\ndisable_plugins = ["masking"]'))
    result = run("plugins", "-c", str(path))
    assert result.returncode == 0 and "masking" not in result.stdout and "policy  (built-in)" in result.stdout


def wait_until_serving(process: subprocess.Popen, admin_port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", admin_port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_cleanly_on_a_signal_and_flushes_the_trail(tmp_path, signum):
    listen_port, admin_port = free_port(), free_port()
    path = config(tmp_path, listen_port, admin_port)
    process = subprocess.Popen([*BASTION, "serve", "-c", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(process, admin_port)
        lingering = socket.create_connection(("127.0.0.1", listen_port))
        process.send_signal(signum)
        assert process.wait(timeout=30) == 0
        assert lingering.recv(10) == b""
    finally:
        if process.poll() is None:
            process.kill()
    result = run("audit", "verify", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    listing = run("sessions", "list", "-c", str(path), "--json")
    assert listing.returncode == 0, listing.stderr
    sessions = json.loads(listing.stdout)
    assert len(sessions) == 1
    export = run("audit", "export", "-c", str(path), "--format", "jsonl")
    stopped = [json.loads(line) for line in export.stdout.splitlines() if '"gateway-stopped"' in line]
    assert [record["event"]["reason"] for record in stopped] == [f"signal {signum.name}"]


class EchoServer:
    """A loopback upstream that echoes, holding every connection open until the peer closes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(connection,), daemon=True).start()

    @staticmethod
    def _echo(connection: socket.socket) -> None:
        with connection:
            while data := connection.recv(4096):
                connection.sendall(data)

    def close(self) -> None:
        self.listener.close()


def test_a_session_that_ends_within_the_grace_lets_the_gateway_exit_at_once(tmp_path):
    """After SIGTERM an open session may run on for shutdown_grace (here ten minutes); when it
    ends by itself, the gateway exits then, with 0, and the session's end is the client's own."""
    listen_port, admin_port = free_port(), free_port()
    upstream = EchoServer()
    path = config(tmp_path, listen_port, admin_port)
    path.write_text(
        path.read_text()
        .replace('shutdown_grace = "2s"', 'shutdown_grace = "10m"')
        .replace('upstream = "127.0.0.1:9"', f'upstream = "127.0.0.1:{upstream.port}"')
    )
    process = subprocess.Popen([*BASTION, "serve", "-c", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log: queue.Queue[str] = queue.Queue()
    try:
        wait_until_serving(process, admin_port)
        threading.Thread(target=lambda: [log.put(line) for line in process.stderr], daemon=True).start()
        client = socket.create_connection(("127.0.0.1", listen_port), timeout=30)
        client.sendall(b"still here")
        assert client.recv(100) == b"still here"  # relayed to the upstream and back: a live session
        process.send_signal(signal.SIGTERM)
        while "waiting up to 600.0s for 1 open sessions" not in log.get(timeout=30):
            pass  # the gateway has stopped accepting and is giving the session its grace
        assert process.poll() is None
        client.close()
        # ten minutes of grace were left: exiting in this wait means the gateway did not sit them out
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        upstream.close()
    listing = run("sessions", "list", "-c", str(path), "--json")
    assert listing.returncode == 0, listing.stderr
    assert [s["end_reason"] for s in json.loads(listing.stdout)] == ["client disconnected"]
    assert run("audit", "verify", "-c", str(path)).returncode == 0


def test_serve_with_a_port_in_use_says_so(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run("serve", "-c", str(config(tmp_path, taken.getsockname()[1])))
    assert result.returncode == 1
    assert "cannot listen on" in result.stderr and "address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [["serve"], ["check", "-c", "/nonexistent/bastion.toml"]])
def test_usage_errors_are_short(argv):
    result = run(*argv)
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr


def test_two_workers_share_the_port_and_keep_one_chain_each(tmp_path):
    import trio

    listen_port, admin_port = free_port(), free_port()
    path = config(tmp_path, listen_port, admin_port)
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(64)
    path.write_text(path.read_text().replace('upstream = "127.0.0.1:9"', f'upstream = "127.0.0.1:{upstream.getsockname()[1]}"'))
    from tests.gateway_helpers import bastion_serve

    with bastion_serve(path, admin_port, timeout=60, serve_args=("--workers", "2")) as process:
        import subprocess as sp

        workers = sp.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        time.sleep(1)  # both workers bound
        clients = []
        for _ in range(40):
            clients.append(socket.create_connection(("127.0.0.1", listen_port)))
        for client in clients:
            client.close()
        time.sleep(1)
    upstream.close()
    assert process.returncode == 0
    result = run("audit", "verify", "-c", str(path), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    heads = {name for name in os.listdir(tmp_path / "state" / "audit") if name.endswith(".head")}
    assert heads == {"worker-0.head", "worker-1.head"}
    listing = json.loads(run("sessions", "list", "-c", str(path), "--json").stdout)
    assert len(listing) == 40
    export = run("audit", "export", "-c", str(path), "--format", "jsonl")
    serving_chains = {json.loads(line)["chain"] for line in export.stdout.splitlines() if '"session-started"' in line}
    assert len(serving_chains) == 2  # the kernel spread the connections over both workers


# --- a broken third-party plugin -----------------------------------------------------------------

BROKEN_PLUGINS = {
    # entry-point value, module source
    "import-error": ("acme_gateway_impl", 'raise RuntimeError("acme: the module cannot start")\n'),
    "missing-object": ("acme_gateway_impl:not_there", ""),
    "unknown-hook": (
        "acme_gateway_impl",
        "from bastion.core.hookspecs import hookimpl\n\n\n@hookimpl\ndef bastion_no_such_hook():\n    pass\n",
    ),
}


def installed_broken_plugin(tmp_path: Path, case: str) -> dict[str, str]:
    """A distribution on PYTHONPATH (module + dist-info) whose ``bastion`` entry point ``acme-audit``
    is broken as ``case`` says; returns the environment that makes it visible."""
    site = tmp_path / "site"
    dist_info = site / "acme_gateway-1.0.dist-info"
    dist_info.mkdir(parents=True)
    value, source = BROKEN_PLUGINS[case]
    (site / "acme_gateway_impl.py").write_text(source)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-gateway\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[bastion]\nacme-audit = {value}\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("case", sorted(BROKEN_PLUGINS))
@pytest.mark.parametrize("command", ["check", "plugins"])
def test_a_broken_entry_point_plugin_is_a_short_error_naming_it(tmp_path, case, command):
    env = installed_broken_plugin(tmp_path, case)
    argv = ["check", "-c", str(config(tmp_path))] if command == "check" else ["plugins"]
    result = subprocess.run([*BASTION, *argv], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "acme-audit" in result.stderr, result.stderr  # the name disable_plugins takes


@pytest.mark.parametrize(("case", "cause"), [("import-error", "acme: the module cannot start"), ("missing-object", "not_there")])
def test_check_with_a_broken_entry_point_plugin_fails_without_a_traceback(tmp_path, case, cause):
    """What holds today: `bastion check` exits 1 with the cause as a configuration error."""
    env = installed_broken_plugin(tmp_path, case)
    result = subprocess.run([*BASTION, "check", "-c", str(config(tmp_path))], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot load the plugin 'acme-audit' (from acme-gateway 1.0)" in result.stderr and cause in result.stderr


def test_a_broken_entry_point_plugin_can_be_switched_off(tmp_path):
    env = installed_broken_plugin(tmp_path, "import-error")
    path = config(tmp_path)
    path.write_text(path.read_text().replace("[gateway]", '[gateway]\ndisable_plugins = ["acme-audit"]'))
    result = subprocess.run([*BASTION, "check", "-c", str(path)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
