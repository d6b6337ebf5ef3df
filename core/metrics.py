"""Prometheus metrics, one registry per gateway (never the process-global default).

Most counters are prometheus_client's own. The two that move on every statement (requests judged
and audit records) are plain per-label tallies instead, read only when ``/metrics`` is scraped
(:class:`_Tallies`): a prometheus ``Counter.inc`` takes a lock and several calls, which is more
than the rest of a record's bookkeeping. They are exposed exactly as Counters would be
(``bastion_requests_total`` and ``bastion_requests_created`` per label set).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily


class _Tallies:
    """A labelled counter kept as a dict (label values -> count), exported when collected.

    The gateway runs on one thread (trio), so increments need no lock; collecting copies the
    dict first, so a scrape from another thread sees a consistent snapshot of each entry.
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.counts: dict[tuple[str, ...], float] = {}
        self.created: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        counts = self.counts
        if key in counts:
            counts[key] += amount
        else:
            self.created[key] = time.time()
            counts[key] = amount

    def value(self, *key: str) -> float:
        return self.counts.get(key, 0.0)

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        created = self.created
        for key, count in list(self.counts.items()):
            family.add_metric(list(key), float(count), created=created.get(key))
        return family


class _TalliesCollector:
    def __init__(self, tallies: tuple[_Tallies, ...]) -> None:
        self._tallies = tallies

    def collect(self) -> Iterator[CounterMetricFamily]:
        for tallies in self._tallies:
            yield tallies.family()

    def describe(self) -> Iterator[CounterMetricFamily]:
        for tallies in self._tallies:
            yield CounterMetricFamily(tallies.name, tallies.documentation, labels=tallies.labels)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter("bastion_connections", "Client connections accepted", ["target"], registry=r)
        self.sessions_started = Counter("bastion_sessions_started", "Sessions that authenticated and were allowed", ["target"], registry=r)
        self.sessions_active = Gauge("bastion_sessions_active", "Sessions open now", ["target"], registry=r)
        self.auth_failures = Counter("bastion_authentication_failures", "Callers that failed authentication", ["target"], registry=r)
        self.bytes = Counter("bastion_bytes", "Bytes relayed", ["target", "direction"], registry=r)
        self.accept_errors = Counter("bastion_accept_errors", "Errors accepting connections", ["target"], registry=r)
        # per statement and per record: tallied here, exported when scraped
        self.requests = _Tallies("bastion_requests", "Statement-bearing messages judged", ("target", "verdict"))
        self.audit_records = _Tallies("bastion_audit_records", "Audit events recorded", ("type",))
        r.register(_TalliesCollector((self.requests, self.audit_records)))

    def count_request(self, target: str, verdict: str) -> None:
        """On every statement."""
        key = (target, verdict)
        counts = self.requests.counts
        if key in counts:
            counts[key] += 1.0
        else:
            self.requests.inc(key)

    def count_record(self, event_type: str) -> None:
        """On every audit record."""
        key = (event_type,)
        counts = self.audit_records.counts
        if key in counts:
            counts[key] += 1.0
        else:
            self.audit_records.inc(key)

    def render(self) -> bytes:
        return generate_latest(self.registry)
