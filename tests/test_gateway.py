"""The gateway end to end with the built-in tcp protocol: pipeline, records, health, shutdown."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from bastion.core import auditlog
from bastion.core.errors import GatewayError
from bastion.core.loading import load
from bastion.core.server import Gateway
from tests.gateway_helpers import running_gateway, write_config

GRANT_ANONYMOUS = """
[[grant]]
name = "anyone-may-use-raw"
identities = { subjects = ["anonymous"] }
targets = ["raw"]
statements = ["connect"]
"""


def tcp_config(tmp_path: Path, upstream_port: int, policy: str | None = GRANT_ANONYMOUS, extra: str = "") -> Path:
    return write_config(
        tmp_path,
        f"""
        [gateway]
        state_dir = "state"
        admin_listen = "127.0.0.1:0"
        shutdown_grace = "1s"

        [[targets]]
        name = "raw"
        protocol = "tcp"
        listen = "127.0.0.1:0"
        upstream = "127.0.0.1:{upstream_port}"
        {extra}
        """,
        policy=policy if policy is not None else "",
    )


async def echo_server(task_status=trio.TASK_STATUS_IGNORED):
    async def echo(stream):
        try:
            async for data in stream:
                await stream.send_all(data.upper())
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo, listeners)


def read_events(state_dir: Path) -> list[dict]:
    return [{**record.event, "type": record.type} for record in auditlog.iter_records(state_dir / "audit")]


async def http_get(address, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        async for chunk in stream:
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_pass_through_is_recorded_from_connect_to_disconnect(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            upstream_port = await nursery.start(echo_server)
            async with running_gateway(tcp_config(tmp_path, upstream_port)) as gateway:
                address = gateway.addresses["raw"]
                client = await trio.open_tcp_stream(address.host, address.port)
                await client.send_all(b"hello bastion")
                received = b""
                while len(received) < 13:
                    received += await client.receive_some(100)
                assert received == b"HELLO BASTION"
                await client.aclose()
                await wait_until(lambda: gateway.runtime.active_sessions() == 0)
            nursery.cancel_scope.cancel()
    events = read_events(tmp_path / "state")
    types = [e["type"] for e in events]
    assert types[0] == "gateway-started" and types[-1] == "gateway-stopped"
    session_events = [e for e in events if e.get("session_id")]
    assert [e["type"] for e in session_events] == ["connection-opened", "session-started", "session-ended"]
    started, ended = session_events[1], session_events[2]
    assert started["identity"]["subject"] == "anonymous" and started["decision"] == "allow"
    assert started["rules"] == ["policy:grant:anyone-may-use-raw"]
    assert ended["bytes_from_client"] == 13 and ended["bytes_to_client"] == 13
    assert ended["reason"] == "client disconnected"


async def tls_echo_server(server_context, task_status=trio.TASK_STATUS_IGNORED):
    async def echo(stream):
        tls = trio.SSLStream(stream, server_context, server_side=True)
        try:
            async for data in tls:
                await tls.send_all(b"tls:" + data)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo, listeners)


async def test_a_tcp_target_with_upstream_tls_reaches_its_upstream_over_verified_tls(tmp_path):
    import ssl

    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca.cert_pem.write_to_path(str(tmp_path / "upstream-ca.pem"))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            upstream_port = await nursery.start(tls_echo_server, server_context)
            config = tcp_config(tmp_path, upstream_port, extra='upstream_tls = { ca = "upstream-ca.pem" }')
            async with running_gateway(config) as gateway:
                address = gateway.addresses["raw"]
                client = await trio.open_tcp_stream(address.host, address.port)
                await client.send_all(b"over tls")
                received = b""
                while len(received) < 12:
                    received += await client.receive_some(100)
                assert received == b"tls:over tls"  # only the TLS server answers like this
                await client.aclose()
                await wait_until(lambda: gateway.runtime.active_sessions() == 0)
            nursery.cancel_scope.cancel()
    ended = [e for e in read_events(tmp_path / "state") if e["type"] == "session-ended"]
    assert ended and ended[-1]["reason"] == "client disconnected"


async def test_default_deny_closes_a_connection_no_grant_covers(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            upstream_port = await nursery.start(echo_server)
            async with running_gateway(tcp_config(tmp_path, upstream_port, policy="")) as gateway:
                address = gateway.addresses["raw"]
                client = await trio.open_tcp_stream(address.host, address.port)
                await client.send_all(b"anything")
                try:  # closed at once: cleanly, or reset because our bytes were never read
                    assert await client.receive_some(100) == b""
                except trio.BrokenResourceError:
                    pass
                await client.aclose()
                await wait_until(lambda: gateway.runtime.active_sessions() == 0)
            nursery.cancel_scope.cancel()
    ended = [e for e in read_events(tmp_path / "state") if e["type"] == "session-ended"]
    started = [e for e in read_events(tmp_path / "state") if e["type"] == "session-started"]
    assert started[0]["decision"] == "deny" and started[0]["rules"] == ["default-deny"]
    assert ended[0]["reason"] == "connection denied"


async def test_health_and_metrics_on_the_admin_listener(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            upstream_port = await nursery.start(echo_server)
            async with running_gateway(tcp_config(tmp_path, upstream_port)) as gateway:
                status, body = await http_get(gateway.admin_address, "/healthz")
                assert status == 200 and b'"status": "ok"' in body
                client = await trio.open_tcp_stream(gateway.addresses["raw"].host, gateway.addresses["raw"].port)
                await client.send_all(b"x")
                await client.receive_some(10)
                status, body = await http_get(gateway.admin_address, "/metrics")
                assert status == 200
                assert b'bastion_connections_total{target="raw"} 1.0' in body
                assert b'bastion_sessions_active{target="raw"} 1.0' in body
                status, _ = await http_get(gateway.admin_address, "/nothing-here")
                assert status == 404
                await client.aclose()
            nursery.cancel_scope.cancel()


async def test_clients_that_send_nothing_or_garbage_do_not_disturb_others(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            upstream_port = await nursery.start(echo_server)
            async with running_gateway(tcp_config(tmp_path, upstream_port)) as gateway:
                address = gateway.addresses["raw"]
                silent = await trio.open_tcp_stream(address.host, address.port)
                rude = await trio.open_tcp_stream(address.host, address.port)
                await rude.send_all(bytes(range(256)) * 10)
                rude.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                await rude.aclose()  # reset, mid-stream
                polite = await trio.open_tcp_stream(address.host, address.port)
                await polite.send_all(b"still here?")
                got = b""
                while len(got) < 11:
                    got += await polite.receive_some(100)
                assert got == b"STILL HERE?"
                admin_http_garbage = await trio.open_tcp_stream(gateway.admin_address.host, gateway.admin_address.port)
                await admin_http_garbage.send_all(b"\x16\x03\x01 not http at all\r\n\r\n")
                assert b"400" in await admin_http_garbage.receive_some(200)
                for stream in (silent, polite, admin_http_garbage):
                    await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_shutdown_ends_open_sessions_after_the_grace_and_records_it(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            upstream_port = await nursery.start(echo_server)
            async with running_gateway(tcp_config(tmp_path, upstream_port)) as gateway:
                address = gateway.addresses["raw"]
                lingering = await trio.open_tcp_stream(address.host, address.port)
                await lingering.send_all(b"x")
                await lingering.receive_some(10)
                start = trio.current_time()
            # the context manager asked for shutdown and waited for the gateway to stop
            assert trio.current_time() - start >= 0.9  # shutdown_grace = 1s
            assert await lingering.receive_some(10) == b""
            with pytest.raises(OSError):
                await trio.open_tcp_stream(address.host, address.port)
            nursery.cancel_scope.cancel()
    events = read_events(tmp_path / "state")
    ended = [e for e in events if e["type"] == "session-ended"]
    assert ended[0]["reason"] == "gateway shutdown"
    assert events[-1]["type"] == "gateway-stopped" and events[-1]["reason"] == "test finished"


async def test_a_port_in_use_is_a_clear_startup_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tcp_config(tmp_path, 9).read_text().replace('\nlisten = "127.0.0.1:0"', f'\nlisten = "127.0.0.1:{port}"')
        (tmp_path / "bastion.toml").write_text(config)
        with pytest.raises(GatewayError, match=rf"targets\[0\].listen \(raw\): cannot listen on 127.0.0.1:{port}: address already in use"):
            loaded = load(tmp_path / "bastion.toml")
            await Gateway(loaded.config, loaded.hooks, policy=loaded.policy).run()


async def wait_until(condition, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def test_mtls_listener_makes_the_client_certificate_the_identity(tmp_path):
    import ssl

    import trustme

    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    good_client = ca.issue_cert("ci-bot.example", common_name="ci-bot")
    stranger_ca = trustme.CA()
    stranger = stranger_ca.issue_cert("ci-bot.example", common_name="ci-bot")

    def client_context(cert) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        cert.configure_cert(context)
        return context

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            upstream_port = await nursery.start(echo_server)
            path = tcp_config(
                tmp_path,
                upstream_port,
                policy=GRANT_ANONYMOUS.replace('subjects = ["anonymous"]', 'subjects = ["ci-bot"]'),
                extra='authentication = "mtls"\ntls = { cert = "server.pem", key = "server.pem", client_ca = "ca.pem", require_client_cert = true }',
            )
            path.write_text(path.read_text() + '\n[[identity]]\nkind = "mtls"\nsubject_from = "cn"\n')
            async with running_gateway(path) as gateway:
                address = gateway.addresses["raw"]
                raw = await trio.open_tcp_stream(address.host, address.port)
                client = trio.SSLStream(raw, client_context(good_client), server_hostname="127.0.0.1")
                await client.send_all(b"over tls")
                got = b""
                while len(got) < 8:
                    got += await client.receive_some(100)
                assert got == b"OVER TLS"
                await client.aclose()
                raw = await trio.open_tcp_stream(address.host, address.port)
                refused = trio.SSLStream(raw, client_context(stranger), server_hostname="127.0.0.1")
                with pytest.raises(trio.BrokenResourceError):
                    await refused.send_all(b"x")
                    await refused.receive_some(10)
                await wait_until(lambda: gateway.runtime.active_sessions() == 0)
            nursery.cancel_scope.cancel()
    events = read_events(tmp_path / "state")
    started = [e for e in events if e["type"] == "session-started"]
    assert len(started) == 1
    assert started[0]["identity"]["subject"] == "ci-bot" and started[0]["identity"]["auth_method"] == "mtls"
    assert started[0]["tls"] is True
    ended = [e for e in events if e["type"] == "session-ended"]
    assert sorted(e["reason"] for e in ended) == ["client disconnected", "tls handshake failed"]
