"""The admin HTTP listener: health, Prometheus metrics, and routes other parts add (approvals)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from bastion.core.http import HTTPRequest, HTTPResponse

if TYPE_CHECKING:  # pragma: no cover
    from bastion.core.server import Runtime

RouteHandler = Callable[[HTTPRequest, dict[str, str]], Awaitable[HTTPResponse]]


class AdminApp:
    """A table of routes: (method, path pattern with ``{name}`` parts) -> handler."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._routes: list[tuple[str, re.Pattern[str], RouteHandler]] = []
        self.add_route("GET", "/healthz", self._health)
        self.add_route("GET", "/metrics", self._metrics)

    def add_route(self, method: str, pattern: str, handler: RouteHandler) -> None:
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
        self._routes.append((method, regex, handler))

    async def __call__(self, request: HTTPRequest) -> HTTPResponse:
        allowed = []
        for method, regex, handler in self._routes:
            match = regex.match(request.path)
            if match is None:
                continue
            if method != request.method:
                allowed.append(method)
                continue
            return await handler(request, match.groupdict())
        if allowed:
            return HTTPResponse(405, b"", headers=(("allow", ", ".join(allowed)),))
        return HTTPResponse.error(404, "no such endpoint")

    async def _health(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        healthy = self.runtime.trail.healthy
        body = {
            "status": "ok" if healthy else "degraded",
            "audit": "ok" if healthy else "unavailable",
            "sessions": self.runtime.active_sessions(),
            "accepting": self.runtime.accepting,
        }
        return HTTPResponse.json(200 if healthy else 503, body)

    async def _metrics(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        return HTTPResponse(200, self.runtime.metrics.render(), content_type="text/plain; version=0.0.4")
