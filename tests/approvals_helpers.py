"""Shared pieces of the approval tests: a fake session, token providers, a service factory."""

from __future__ import annotations

import contextlib
import hmac
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from types import SimpleNamespace
from typing import Any

import attrs
import trio

from bastion.core import events
from bastion.core.approvals import ApprovalService, new_approval_id
from bastion.core.approvals_model import ApprovalRequest, Person, requirements_for
from bastion.core.approvals_store import ApprovalStore, MemoryBackend, MemoryStore
from bastion.core.config import ApprovalsSection
from bastion.policies.model import AuthOutcome, Decision, Finding, Identity, Request, Message, ReviewRequirement, Verdict

# the wall clock of MockClock tests: a fixed epoch plus trio's (virtual) time
EPOCH = 1_800_000_000.0


def wall() -> float:
    return EPOCH + trio.current_time()


CI_BOT = Identity(provider="keys", subject="ci-bot", groups={"etl"})
ALICE = Identity(provider="keys", subject="alice", groups={"privacy"})
BOB = Identity(provider="keys", subject="bob", groups={"privacy"})
CAROL = Identity(provider="keys", subject="carol", groups={"dba"})
MALLORY = Identity(provider="keys", subject="mallory", groups={"etl"})
ROOT = Identity(provider="keys", subject="root", groups={"security-admins"})

TOKENS = {f"token-{i.subject}": i for i in (CI_BOT, ALICE, BOB, CAROL, MALLORY, ROOT)}


def token_of(identity: Identity) -> str:
    return f"token-{identity.subject}"


class TokenProvider:
    """Identities by token, like a static-token provider without its file."""

    def __init__(self, tokens: dict[str, Identity] | None = None) -> None:
        self.tokens = tokens or TOKENS

    async def authenticate(self, credential):
        await trio.lowlevel.checkpoint()
        for token, identity in self.tokens.items():
            if credential.secret and hmac.compare_digest(credential.secret.encode(), token.encode()):
                return AuthOutcome.ok(identity)
        return AuthOutcome.unknown("not a test token")

    async def aclose(self) -> None:
        pass


class FakeSession:
    """What the service uses of a :class:`~bastion.core.session.Session`."""

    def __init__(self, identity: Identity = CI_BOT, *, target: str = "clinic", justification: str | None = "ticket OPS-42") -> None:
        self.id = uuid.uuid4().hex[:20]
        self.identity = identity
        self.config = SimpleNamespace(name=target)
        self.justification = justification
        self.notices: list[str] = []
        self.noticed = trio.Event()
        self.broken = False

    async def notify(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.broken:
            raise trio.BrokenResourceError("the caller hung up")
        self.notices.append(text)
        self.noticed.set()
        self.noticed = trio.Event()


def requirement(rule: str = "hipaa:review:bulk-delete", groups: Iterable[str] = ("privacy",), *, timeout: float = 900.0, min_approvals: int = 1, max_window: float = 0.0, rows_over: int | None = None) -> ReviewRequirement:
    return ReviewRequirement(rule=rule, approver_groups=frozenset(groups), timeout_seconds=timeout, min_approvals=min_approvals, rows_over=rows_over, max_window_seconds=max_window)


def review_decision(*requirements: ReviewRequirement) -> Decision:
    requirements = requirements or (requirement(),)
    return Decision(
        Verdict.REVIEW,
        tuple(r.rule for r in requirements),
        ("it deletes from public.patients without a WHERE clause",),
        "v1",
        tuple(requirements),
    )


def statement(text: str = "delete from public.patients", fingerprint: str = "fp-delete-patients") -> list[Request]:
    return [
        Request(
            message=Message("postgres", "statement", text=text, dialect="postgres"),
            action="delete",
            tables_written=frozenset({"public.patients"}),
            findings=(Finding("no-where", 40, "it deletes every row: there is no WHERE clause"),),
            fingerprint=fingerprint,
            redacted_text=text,
        )
    ]


@attrs.define
class Harness:
    service: ApprovalService
    events: list[events.AuditEvent]
    store: ApprovalStore

    def steps(self, approval_id: str | None = None) -> list[str]:
        return [e.step for e in self.events if isinstance(e, events.ApprovalEvent) and (approval_id is None or e.approval_id == approval_id)]

    async def pending_id(self) -> str:
        """The id of the one pending request, once it exists."""
        while True:
            records = await self.store.list(["pending"])
            if records:
                assert len(records) == 1, records
                return records[0].id
            await trio.sleep(0.001)


def section(**overrides: Any) -> ApprovalsSection:
    values = {"admin_groups": ("security-admins",), "reminder_interval": 0}
    values.update(overrides)
    return ApprovalsSection(**values)


@contextlib.asynccontextmanager
async def running_service(
    store: ApprovalStore | None = None,
    *,
    clock: Callable[[], float] = wall,
    settings: ApprovalsSection | None = None,
    resolve_secret: Callable[[Any], Any] | None = None,
    instance_id: str | None = None,
) -> AsyncIterator[Harness]:
    """A started service (store opened, watching) for the duration of the block."""
    recorded: list[events.AuditEvent] = []

    async def record(event: events.AuditEvent) -> None:
        recorded.append(event)

    store = store if store is not None else MemoryStore(MemoryBackend())
    provider = TokenProvider()
    service = ApprovalService(
        settings or section(),
        store,
        record=record,
        providers=lambda: [("keys", provider)],
        resolve_secret=resolve_secret,
        clock=clock,
        instance_id=instance_id,
        config_path="/etc/bastion/bastion.toml",
        admin_url="http://127.0.0.1:8700",
    )
    async with trio.open_nursery() as nursery:
        await service.open()
        await nursery.start(service.run)
        while not service.available:
            await trio.sleep(0.01)
        try:
            yield Harness(service, recorded, store)
        finally:
            nursery.cancel_scope.cancel()


def person(identity: Identity) -> Person:
    return Person.of(identity)


def pending_request(*, holder: str, created_at: float, timeout: float = 900.0, approval_id: str | None = None, requester: Identity = CI_BOT) -> ApprovalRequest:
    """A request as a gateway stores it when it holds a statement."""
    return ApprovalRequest(
        id=approval_id or new_approval_id(),
        kind="statement",
        requester=Person.of(requester),
        target="clinic",
        session_id=uuid.uuid4().hex[:20],
        request_no=1,
        holder=holder,
        statement="delete from public.patients",
        fingerprint="fp-delete-patients",
        requirements=requirements_for([requirement()]),
        created_at=created_at,
        expires_at=created_at + timeout,
        rules=("hipaa:review:bulk-delete",),
    )


# The `bastion` command with plugins a test needs registered like built-ins, when they are not
# built in yet (the integrator adds approvals-commands and postgres to core/plugins.py).
LAUNCHER = """
import sys
from bastion.core import plugins
wanted = dict(arg.split("=", 1) for arg in sys.argv[1].split(",") if arg)
for name, module in wanted.items():
    if module not in plugins.BUILTIN_PLUGINS.values():
        plugins.BUILTIN_PLUGINS[name] = module
from bastion.core.cli import main
sys.exit(main(sys.argv[2:]))
"""
COMMAND_PLUGINS = {"approvals-commands": "bastion.plugins.approvals_commands", "static-token": "bastion.plugins.identity_static"}


def bastion_command(*args: str, plugins: dict[str, str] | None = None) -> list[str]:
    """argv for ``bastion *args`` in a subprocess, with ``plugins`` (name -> module) registered."""
    import sys

    wanted = {**COMMAND_PLUGINS, **(plugins or {})}
    return [sys.executable, "-c", LAUNCHER, ",".join(f"{name}={module}" for name, module in wanted.items()), *args]
