"""The approvals HTTP API on the admin listener of a real gateway, and its OpenAPI description.

Reviewers authenticate with the gateway's own identity provider (static API keys here); the
held statements come from the gateway's approval service, as a session's check would hold them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import trio

from bastion.plugins import identity_static
from bastion.plugins.identity_static import add_key
from bastion.policies.model import Identity, Verdict
from tests.approvals_helpers import FakeSession, requirement, review_decision, statement
from tests.gateway_helpers import running_gateway, write_config

pytestmark = pytest.mark.timeout(60)
DEADLINE = 30
OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "approvals-openapi.json"
REQUESTER = Identity(provider="keys", subject="ci-bot", groups={"etl", "privacy"})


def gateway_config(directory: Path) -> Path:
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
        admin_groups = ["security-admins"]
        """,
    )


@pytest.fixture
def keys(tmp_path) -> dict[str, str]:
    tokens = tmp_path / "tokens.toml"
    return {
        "alice": add_key(tokens, "alice", ["privacy"]).key,
        "bob": add_key(tokens, "bob", ["privacy"]).key,
        "mallory": add_key(tokens, "mallory", ["etl"]).key,
        "ci-bot": add_key(tokens, "ci-bot", ["etl", "privacy"]).key,
    }


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


class Held:
    """Statements held by the gateway's service in background tasks, with their outcomes."""

    def __init__(self, gateway, nursery: trio.Nursery) -> None:
        self.service = gateway.runtime.approvals
        self.nursery = nursery
        self.results: dict[str, list] = {}

    async def hold(self, decision=None) -> str:
        before = {r.id for r in await self.service.store.list(["pending"])}
        results: list = []

        async def run():
            results.append(await self.service.hold(FakeSession(REQUESTER), 1, statement(), decision or review_decision()))

        self.nursery.start_soon(run)
        while True:
            now = {r.id for r in await self.service.store.list(["pending"])} - before
            if now:
                (approval_id,) = now
                self.results[approval_id] = results
                return approval_id
            await trio.sleep(0.01)

    async def outcome(self, approval_id: str):
        while not self.results[approval_id]:
            await trio.sleep(0.01)
        return self.results[approval_id][0]


async def with_api(tmp_path, test):
    with trio.fail_after(DEADLINE):
        async with running_gateway(gateway_config(tmp_path), extra_plugins=[identity_static]) as gateway, trio.open_nursery() as nursery:
            async with httpx.AsyncClient(base_url=f"http://{gateway.admin_address}") as client:
                await test(gateway, client, Held(gateway, nursery))
            nursery.cancel_scope.cancel()


async def test_a_reviewer_lists_shows_and_approves_and_the_statement_runs(tmp_path, keys):
    async def test(gateway, client, held):
        approval_id = await held.hold()
        listing = await client.get("/approvals", headers=bearer(keys["alice"]))
        assert listing.status_code == 200
        assert [a["id"] for a in listing.json()["approvals"]] == [approval_id]
        shown = await client.get(f"/approvals/{approval_id}", headers=bearer(keys["alice"]))
        assert shown.status_code == 200
        assert shown.json()["statement"] == "delete from public.patients" and shown.json()["requester"]["subject"] == "ci-bot"
        approved = await client.post(f"/approvals/{approval_id}/approve", headers=bearer(keys["alice"]), json={"comment": "ticket OPS-42 checked"})
        assert approved.status_code == 200, approved.text
        assert approved.json()["state"] == "approved" and approved.json()["votes"][0]["comment"] == "ticket OPS-42 checked"
        decision = await held.outcome(approval_id)
        assert decision.verdict is Verdict.ALLOW and any("approved by alice" in r for r in decision.reasons)
        # the notice named this very endpoint
        assert f"POST http://{gateway.admin_address}/approvals/{approval_id}/approve" in held.service._notice(await held.service.store.get(approval_id))

    await with_api(tmp_path, test)


async def test_a_denial_over_http_refuses_the_statement_with_the_reason(tmp_path, keys):
    async def test(gateway, client, held):
        approval_id = await held.hold()
        denied = await client.post(f"/approvals/{approval_id}/deny", headers=bearer(keys["bob"]), json={"reason": "not during business hours"})
        assert denied.status_code == 200 and denied.json()["state"] == "denied"
        decision = await held.outcome(approval_id)
        assert decision.verdict is Verdict.DENY and decision.reasons[0].endswith("not during business hours")
        # decided: a second decision conflicts
        again = await client.post(f"/approvals/{approval_id}/approve", headers=bearer(keys["alice"]))
        assert again.status_code == 409 and "already denied" in again.json()["error"]
        all_states = await client.get("/approvals", params={"state": "all"}, headers=bearer(keys["alice"]))
        assert [a["state"] for a in all_states.json()["approvals"]] == ["denied"]

    await with_api(tmp_path, test)


async def test_without_a_valid_bearer_token_every_approval_route_answers_401(tmp_path, keys):
    async def test(gateway, client, held):
        approval_id = await held.hold()
        calls = [("GET", "/approvals"), ("GET", f"/approvals/{approval_id}"), ("POST", f"/approvals/{approval_id}/approve"), ("POST", f"/approvals/{approval_id}/deny")]
        for headers in ({}, bearer("bst_000000000000_" + "x" * 43), bearer("not-a-key"), {"authorization": f"Basic {keys['alice']}"}):
            for method, path in calls:
                response = await client.request(method, path, headers=headers, json={"reason": "x"} if path.endswith("deny") else None)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"].startswith("Bearer")
        assert (await held.service.store.get(approval_id)).pending

    await with_api(tmp_path, test)


async def test_403_for_outsiders_and_for_approving_ones_own_request(tmp_path, keys):
    async def test(gateway, client, held):
        approval_id = await held.hold()
        assert (await client.get(f"/approvals/{approval_id}", headers=bearer(keys["mallory"]))).status_code == 403
        assert (await client.post(f"/approvals/{approval_id}/approve", headers=bearer(keys["mallory"]))).status_code == 403
        assert (await client.get("/approvals", headers=bearer(keys["mallory"]))).json() == {"approvals": []}
        own = await client.post(f"/approvals/{approval_id}/approve", headers=bearer(keys["ci-bot"]))
        assert own.status_code == 403 and "cannot approve" in own.json()["error"]
        # the requester may look at its own request
        assert (await client.get(f"/approvals/{approval_id}", headers=bearer(keys["ci-bot"]))).status_code == 200

    await with_api(tmp_path, test)


async def test_404_for_unknown_requests_and_409_for_a_second_vote(tmp_path, keys):
    async def test(gateway, client, held):
        assert (await client.get("/approvals/apr-000000000000", headers=bearer(keys["alice"]))).status_code == 404
        assert (await client.post("/approvals/apr-000000000000/approve", headers=bearer(keys["alice"]))).status_code == 404
        approval_id = await held.hold(review_decision(requirement(min_approvals=2)))
        first = await client.post(f"/approvals/{approval_id}/approve", headers=bearer(keys["alice"]))
        assert first.status_code == 200 and first.json()["missing_approvals"] == {"hipaa:review:bulk-delete": 1}
        assert (await client.post(f"/approvals/{approval_id}/approve", headers=bearer(keys["alice"]))).status_code == 409
        assert (await client.post(f"/approvals/{approval_id}/approve", headers=bearer(keys["bob"]))).json()["state"] == "approved"
        assert (await held.outcome(approval_id)).verdict is Verdict.ALLOW

    await with_api(tmp_path, test)


async def test_400_for_bodies_the_api_does_not_take(tmp_path, keys):
    async def test(gateway, client, held):
        approval_id = await held.hold(review_decision(requirement(max_window=600)))
        alice = bearer(keys["alice"])
        cases = [
            ("approve", b"not json"),
            ("approve", b"[1, 2]"),
            ("approve", json.dumps({"comment": "x", "colour": "blue"}).encode()),
            ("approve", json.dumps({"window": "2h"}).encode()),
            ("approve", json.dumps({"window": "soon"}).encode()),
            ("approve", json.dumps({"comment": 7}).encode()),
            ("deny", json.dumps({}).encode()),
        ]
        for action, body in cases:
            response = await client.post(f"/approvals/{approval_id}/{action}", headers={**alice, "content-type": "application/json"}, content=body)
            assert response.status_code == 400, (action, body, response.text)
        assert (await client.get("/approvals", params={"state": "maybe"}, headers=alice)).status_code == 400
        assert (await client.get("/approvals", params={"limit": "0"}, headers=alice)).status_code == 400
        ok = await client.post(f"/approvals/{approval_id}/approve", headers=alice, json={"window": "10m"})
        assert ok.status_code == 200 and ok.json()["window_until"] is not None

    await with_api(tmp_path, test)


async def test_responses_match_the_openapi_description(tmp_path, keys):
    description = json.loads(OPENAPI.read_text())

    async def test(gateway, client, held):
        approval_id = await held.hold()
        alice = bearer(keys["alice"])
        checks = [
            ("/approvals", "get", await client.get("/approvals", headers=alice)),
            ("/approvals/{id}", "get", await client.get(f"/approvals/{approval_id}", headers=alice)),
            ("/approvals/{id}", "get", await client.get("/approvals/apr-000000000000", headers=alice)),
            ("/approvals/{id}/approve", "post", await client.post(f"/approvals/{approval_id}/approve", headers=bearer(keys["mallory"]))),
            ("/approvals/{id}/approve", "post", await client.post(f"/approvals/{approval_id}/approve", headers=alice, json={"comment": "ok"})),
            ("/approvals/{id}/deny", "post", await client.post(f"/approvals/{approval_id}/deny", headers=alice, json={"reason": "late"})),
            ("/approvals", "get", await client.get("/approvals")),
            ("/healthz", "get", await client.get("/healthz")),
        ]
        for path, method, response in checks:
            documented = description["paths"][path][method]["responses"]
            assert str(response.status_code) in documented, (path, method, response.status_code)
            schema = documented[str(response.status_code)]["content"]["application/json"]["schema"]
            problems = conforms(response.json(), schema, description)
            assert problems == [], (path, method, response.status_code, problems)

    await with_api(tmp_path, test)


async def test_every_admin_route_is_described_and_every_description_is_a_route(tmp_path, keys):
    description = json.loads(OPENAPI.read_text())
    assert description["openapi"].startswith("3.")

    async def test(gateway, client, held):
        served = set()
        for method, regex, _handler in gateway.admin_app._routes:
            template = re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", regex.pattern.removeprefix("^").removesuffix("$"))
            served.add((method.lower(), template))
        described = {(method, path) for path, operations in description["paths"].items() for method in operations}
        assert served == described
        assert {"/approvals", "/approvals/{id}", "/approvals/{id}/approve", "/approvals/{id}/deny"} <= {p for _, p in served}

    await with_api(tmp_path, test)


# --- a small JSON Schema check: the subset the description uses -------------------------------------


def conforms(value, schema: dict, document: dict, where: str = "$") -> list[str]:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return conforms(value, document["components"]["schemas"][name], document, where)
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        allowed = types if isinstance(types, list) else [types]
        if not any(_is(value, t) for t in allowed):
            return [f"{where}: expected {allowed}, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                problems.append(f"{where}: missing {key}")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                problems += conforms(item, properties[key], document, f"{where}.{key}")
            elif extra is False:
                problems.append(f"{where}: undocumented {key}")
            elif isinstance(extra, dict):
                problems += conforms(item, extra, document, f"{where}.{key}")
        if schema.get("type") == "object" and "properties" in schema and extra is True:
            undocumented = set(value) - set(properties)
            if undocumented:
                problems.append(f"{where}: undocumented {sorted(undocumented)}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problems += conforms(item, schema["items"], document, f"{where}[{index}]")
    return problems


def _is(value, type_name: str) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "null": value is None,
    }[type_name]
