"""Approval webhooks: a signed JSON POST for every approval step a webhook subscribes to.

Each ``[[approvals.webhooks]]`` gets its own queue and sender task, so a slow or dead receiver
delays only its own deliveries — never a held session, which only ever puts a delivery on a queue
(and, when the queue is full, the delivery is dropped and logged rather than waited for).

A delivery is one JSON document (see docs/approvals.md)::

    {"event": "requested", "delivery": "<unique id>", "sent_at": 1767225600.0,
     "step": {"actor": "...", "comment": "...", "at": ...}, "approval": {... as the HTTP API ...}}

sent with the headers ``X-Bastion-Event``, ``X-Bastion-Delivery`` and
``X-Bastion-Signature: sha256=<hex>``, the HMAC-SHA256 of the exact body bytes under the
webhook's secret. The body is built once, so every retry carries the same bytes and signature; a
receiver checks the signature, then drops deliveries it has seen (by ``delivery``) or that are
too old (by ``sent_at``).

Retries: a connection failure, a timeout, HTTP 408, 429 or any 5xx is retried after
``retry_initial``, then twice as long each time up to ``retry_max``, for at most ``max_attempts``
attempts in all. Other answers (2xx done; 4xx the receiver refuses) are final.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import trio

from bastion.core.config import ApprovalWebhook

log = logging.getLogger("bastion.approvals.webhook")

# deliveries waiting per webhook; beyond this a receiver is far behind, and holding sessions
# back for it would be worse than losing a notification (the audit trail keeps every step)
QUEUE_SIZE = 1000
SIGNATURE_HEADER = "x-bastion-signature"
RETRYABLE_STATUSES = frozenset({408, 425, 429})
USER_AGENT = "bastion-approvals-webhook/1"


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does (used by the tests, and a reference for receivers in Python)."""
    return hmac.compare_digest(sign(secret, body), header or "")


def backoff(hook: ApprovalWebhook, attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    return min(float(hook.retry_initial) * (2 ** (attempt - 1)), float(hook.retry_max))


class WebhookNotifier:
    """Queues and sends deliveries; run :meth:`run` in a nursery, call :meth:`send` from anywhere."""

    def __init__(self, hooks: tuple[ApprovalWebhook, ...], resolve_secret: Callable[[Any], Any], *, clock: Callable[[], float] = time.time) -> None:
        self.hooks = hooks
        self.resolve_secret = resolve_secret
        self.clock = clock
        self._queues: list[tuple[ApprovalWebhook, trio.MemorySendChannel, trio.MemoryReceiveChannel]] = []
        self.dropped = 0

    def send(self, event: str, approval: dict[str, Any], step: dict[str, Any]) -> None:
        """Queue a delivery for every webhook subscribed to ``event``; never blocks."""
        for hook, sender, _ in self._queues:
            if event not in hook.events:
                continue
            body = json.dumps(
                {"event": event, "delivery": uuid.uuid4().hex, "sent_at": self.clock(), "step": step, "approval": approval},
                sort_keys=True,
            ).encode()
            try:
                sender.send_nowait((event, body))
            except trio.WouldBlock:
                self.dropped += 1
                log.error("approval webhook %s is %d deliveries behind: dropped the %s of %s", hook.url, QUEUE_SIZE, event, approval.get("id"))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for hook in self.hooks:
                sender, receiver = trio.open_memory_channel(QUEUE_SIZE)
                self._queues.append((hook, sender, receiver))
                nursery.start_soon(self._deliver_all, hook, receiver)
            task_status.started()

    async def _deliver_all(self, hook: ApprovalWebhook, receiver: trio.MemoryReceiveChannel) -> None:
        async with httpx.AsyncClient(timeout=float(hook.timeout), follow_redirects=False, headers={"user-agent": USER_AGENT}) as client:
            async for event, body in receiver:
                await self._deliver(client, hook, event, body)

    async def _deliver(self, client: httpx.AsyncClient, hook: ApprovalWebhook, event: str, body: bytes) -> bool:
        delivery = json.loads(body)["delivery"]
        for attempt in range(1, hook.max_attempts + 1):
            problem = await self._attempt(client, hook, event, delivery, body)
            if problem is None:
                return True
            final = problem.startswith("refused") or attempt == hook.max_attempts
            if final:
                log.error("approval webhook %s: gave up on the %s delivery %s after %d attempt(s): %s", hook.url, event, delivery, attempt, problem)
                return False
            delay = backoff(hook, attempt)
            log.warning("approval webhook %s: attempt %d failed (%s); retrying in %.1fs", hook.url, attempt, problem, delay)
            await trio.sleep(delay)
        return False

    async def _attempt(self, client: httpx.AsyncClient, hook: ApprovalWebhook, event: str, delivery: str, body: bytes) -> str | None:
        """None when delivered; otherwise what went wrong (``refused …`` when not worth retrying)."""
        try:
            secret = await trio.to_thread.run_sync(self.resolve_secret, hook.secret)
        except Exception as exc:
            return f"cannot resolve the secret {hook.secret}: {exc}"
        headers = {
            "content-type": "application/json",
            "x-bastion-event": event,
            "x-bastion-delivery": delivery,
            SIGNATURE_HEADER: sign(secret.reveal(), body),
        }
        try:
            response = await client.post(hook.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if 200 <= response.status_code < 300:
            return None
        if response.status_code >= 500 or response.status_code in RETRYABLE_STATUSES:
            return f"HTTP {response.status_code}"
        return f"refused with HTTP {response.status_code}"
