"""``bastion approvals …`` as a reviewer runs it: another process than the gateway, same store.

The gateway runs in the test (its approval service holds statements as sessions would); the
command runs through ``subprocess`` and its decision wakes the held statement through the SQLite
store (the gateway polls ``PRAGMA data_version``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from bastion.plugins import identity_static
from bastion.plugins.identity_static import add_key
from bastion.policies.model import Identity, Verdict
from tests.approvals_helpers import FakeSession, bastion_command, requirement, review_decision, statement
from tests.gateway_helpers import running_gateway, write_config

pytestmark = pytest.mark.timeout(120)
DEADLINE = 60
ROOT = Path(__file__).resolve().parent.parent
REQUESTER = Identity(provider="keys", subject="ci-bot", groups={"etl", "privacy"})



def config(directory: Path) -> Path:
    return write_config(
        directory,
        """
        [gateway]
        state_dir = "state"
        admin_listen = "127.0.0.1:0"
        shutdown_grace = "1s"

        [[identity]]
        kind = "static-token"
        name = "keys"
        tokens_file = "tokens.toml"

        [[targets]]
        name = "raw"
        protocol = "tcp"
        listen = "127.0.0.1:0"
        upstream = "127.0.0.1:9"

        [approvals]
        poll_interval = "50ms"
        """,
    )


@pytest.fixture
def keys(tmp_path) -> dict[str, str]:
    tokens = tmp_path / "tokens.toml"
    return {name: add_key(tokens, name, groups).key for name, groups in (("alice", ["privacy"]), ("bob", ["privacy"]), ("mallory", ["etl"]), ("ci-bot", ["etl", "privacy"]))}


async def bastion(config_path: Path, *args: str, token: str | None = None, env_token: str | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("BASTION_TOKEN", "BASTION_CONFIG")}
    if env_token is not None:
        env["BASTION_TOKEN"] = env_token
    command = bastion_command("approvals", *args, "-c", str(config_path))
    if token is not None:
        command += ["--token", token]
    return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False, env=env, cwd=str(ROOT))


class Held:
    def __init__(self, gateway, nursery) -> None:
        self.service = gateway.runtime.approvals
        self.nursery = nursery
        self.results: dict[str, list] = {}

    async def hold(self, decision=None, requests=None) -> str:
        before = {r.id for r in await self.service.store.list(None)}
        results: list = []

        async def run():
            results.append(await self.service.hold(FakeSession(REQUESTER), 1, requests or statement(), decision or review_decision()))

        self.nursery.start_soon(run)
        while True:
            new = {r.id for r in await self.service.store.list(None)} - before
            if new or results:
                if not new:  # allowed at once (a window)
                    return ""
                (approval_id,) = new
                self.results[approval_id] = results
                return approval_id
            await trio.sleep(0.01)

    async def outcome(self, approval_id: str):
        while not self.results[approval_id]:
            await trio.sleep(0.01)
        return self.results[approval_id][0]


async def with_gateway(tmp_path, test):
    path = config(tmp_path)
    with trio.fail_after(DEADLINE):
        async with running_gateway(path, extra_plugins=[identity_static]) as gateway, trio.open_nursery() as nursery:
            await test(path, Held(gateway, nursery))
            nursery.cancel_scope.cancel()


async def test_list_show_and_approve_from_the_command_line_release_the_held_statement(tmp_path, keys):
    async def test(path, held):
        approval_id = await held.hold()
        listing = await bastion(path, "list", env_token=keys["alice"])
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.decode().splitlines()
        assert lines[0].split() == ["ID", "STATE", "TARGET", "REQUESTER", "EXPIRES", "RULES", "STATEMENT"]
        assert lines[1].startswith(approval_id) and "ci-bot" in lines[1] and "delete from public.patients" in lines[1]

        as_json = await bastion(path, "list", "--json", env_token=keys["alice"])
        (entry,) = json.loads(as_json.stdout)["approvals"]
        assert entry["id"] == approval_id and entry["justification"] == "ticket OPS-42"

        shown = await bastion(path, "show", approval_id, env_token=keys["alice"])
        text = shown.stdout.decode()
        assert shown.returncode == 0 and f"approval request {approval_id} (pending)" in text
        assert "finding:        no-where (40)" in text and "justification:  ticket OPS-42" in text

        approved = await bastion(path, "approve", approval_id, "--comment", "checked with the ward", token=keys["alice"])
        assert approved.returncode == 0, approved.stderr
        assert approved.stdout.decode().strip() == f"approved {approval_id} (this statement once)"
        decision = await held.outcome(approval_id)
        assert decision.verdict is Verdict.ALLOW and any("approved by alice" in r for r in decision.reasons)
        steps = [(e.step, e.actor, e.comment) for e in approval_events(held, approval_id)]
        assert ("approval", "alice (keys)", "checked with the ward") in steps and steps[-1][0] == "approved"

    await with_gateway(tmp_path, test)


def approval_events(held, approval_id):
    from bastion.core import auditlog, events

    trail = held.service  # the gateway's audit trail is on disk: read it back
    directory = Path(trail.config_path).parent / "state" / "audit"
    found = []
    for record in auditlog.iter_records(directory):
        if record.type == "approval" and record.event.get("approval_id") == approval_id:
            found.append(events.event_from_dict({**record.event, "type": record.type}))
    return found


async def test_deny_from_the_command_line_refuses_the_statement_with_the_reason(tmp_path, keys):
    async def test(path, held):
        approval_id = await held.hold()
        denied = await bastion(path, "deny", approval_id, "--reason", "use the reporting replica", env_token=keys["bob"])
        assert denied.returncode == 0, denied.stderr
        decision = await held.outcome(approval_id)
        assert decision.verdict is Verdict.DENY and decision.reasons[0].endswith("use the reporting replica")
        missing_reason = await bastion(path, "deny", approval_id, env_token=keys["bob"])
        assert missing_reason.returncode == 2  # argparse: --reason is required

    await with_gateway(tmp_path, test)


async def test_the_command_refuses_bad_tokens_outsiders_self_approval_and_unknown_ids(tmp_path, keys):
    async def test(path, held):
        approval_id = await held.hold()
        for token in (None, "bst_000000000000_" + "x" * 43):
            result = await bastion(path, "list", token=token)
            assert result.returncode == 1 and b"token is missing or not valid" in result.stderr
        outsider = await bastion(path, "approve", approval_id, env_token=keys["mallory"])
        assert outsider.returncode == 1 and b"may not approve" in outsider.stderr
        own = await bastion(path, "approve", approval_id, env_token=keys["ci-bot"])
        assert own.returncode == 1 and b"cannot approve it" in own.stderr
        unknown = await bastion(path, "show", "apr-000000000000", env_token=keys["alice"])
        assert unknown.returncode == 1 and b"there is no approval request" in unknown.stderr
        assert (await held.service.store.get(approval_id)).pending

    await with_gateway(tmp_path, test)


async def test_a_window_approved_from_the_command_line_covers_the_next_run(tmp_path, keys):
    async def test(path, held):
        decision = review_decision(requirement(max_window=3600))
        approval_id = await held.hold(decision)
        too_long = await bastion(path, "approve", approval_id, "--window", "2h", env_token=keys["alice"])
        assert too_long.returncode == 1 and b"at most 1h" in too_long.stderr
        approved = await bastion(path, "approve", approval_id, "--window", "30m", env_token=keys["alice"])
        assert approved.returncode == 0 and b"the same statement is approved until" in approved.stdout
        assert (await held.outcome(approval_id)).verdict is Verdict.ALLOW
        again = await held.service.hold(FakeSession(REQUESTER), 2, statement(), decision)
        assert again.verdict is Verdict.ALLOW and any(approval_id in r for r in again.reasons)

    await with_gateway(tmp_path, test)
