"""Prometheus metrics, one registry per gateway (never the process-global default)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter("bastion_connections", "Client connections accepted", ["target"], registry=r)
        self.sessions_started = Counter("bastion_sessions_started", "Sessions that authenticated and were allowed", ["target"], registry=r)
        self.sessions_active = Gauge("bastion_sessions_active", "Sessions open now", ["target"], registry=r)
        self.auth_failures = Counter("bastion_authentication_failures", "Callers that failed authentication", ["target"], registry=r)
        self.requests = Counter("bastion_requests", "Statement-bearing messages judged", ["target", "verdict"], registry=r)
        self.bytes = Counter("bastion_bytes", "Bytes relayed", ["target", "direction"], registry=r)
        self.audit_records = Counter("bastion_audit_records", "Audit events recorded", ["type"], registry=r)
        self.accept_errors = Counter("bastion_accept_errors", "Errors accepting connections", ["target"], registry=r)

        self._request_children: dict[tuple[str, str], object] = {}
        self._record_children: dict[str, object] = {}

    def count_request(self, target: str, verdict: str) -> None:
        """On every statement: the labelled child is looked up once, not per call."""
        child = self._request_children.get((target, verdict))
        if child is None:
            child = self._request_children[(target, verdict)] = self.requests.labels(target, verdict)
        child.inc()

    def count_record(self, event_type: str) -> None:
        child = self._record_children.get(event_type)
        if child is None:
            child = self._record_children[event_type] = self.audit_records.labels(event_type)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
