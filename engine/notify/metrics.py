"""The delivery workers' metrics, in the registry they are given.

A worker inside ``slotengine serve`` registers them in the gateway's registry
(served on ``/metrics``); ``slotengine notify`` serves its own registry on
``--metrics-port``.

- ``slotengine_deliveries_total{channel, outcome}``: attempts by outcome
  (``delivered``, ``failed``: to be retried, ``dead``: out of retries).
- ``slotengine_delivery_lag_seconds{channel}``: from the change's commit to the
  receiver's answer, for what was delivered.
- ``slotengine_outbox_undispatched_events``, ``slotengine_outbox_oldest_age_seconds``:
  committed events not yet fanned out, and how long the oldest has waited.
- ``slotengine_deliveries_due`` and ``slotengine_deliveries_dead``: deliveries
  waiting for an attempt now, and those out of retries (kept, redeliverable).
- ``timings``: the durations of its database statements (``outbox_take``,
  ``delivery_insert``, ``delivery_claim``, ``delivery_record``,
  ``outbox_state``, ``delivery_purge``), in the ``Timings`` it is given (the
  gateway's, rendered as ``database_query_duration_seconds``) or its own
  (``slotengine notify`` renders them with ``TimingsCollector``).
"""

from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from persistence.deliveries import OutboxState
from persistence.timings import Timings

# Lag buckets: a healthy outbox delivers within a second; a receiver that was
# down shows up in the minutes and hours of the retry schedule.
LAG_BUCKETS_S: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)


class NotifyMetrics:
    def __init__(self, registry: CollectorRegistry, timings: Timings | None = None) -> None:
        self.timings = timings if timings is not None else Timings()
        self.attempts = Counter(
            "slotengine_deliveries_total",
            "Delivery attempts by channel and outcome (delivered, failed, dead).",
            ["channel", "outcome"],
            registry=registry,
        )
        self.lag = Histogram(
            "slotengine_delivery_lag_seconds",
            "From the change's commit to the receiver's answer, for deliveries that succeeded.",
            ["channel"],
            buckets=LAG_BUCKETS_S,
            registry=registry,
        )
        self.undispatched = Gauge(
            "slotengine_outbox_undispatched_events",
            "Committed events not yet fanned out into deliveries.",
            registry=registry,
        )
        self.oldest_age = Gauge(
            "slotengine_outbox_oldest_age_seconds",
            "How long the oldest undispatched outbox batch has waited (0: none).",
            registry=registry,
        )
        self.due = Gauge(
            "slotengine_deliveries_due",
            "Deliveries waiting for an attempt now.",
            registry=registry,
        )
        self.dead = Gauge(
            "slotengine_deliveries_dead",
            "Deliveries out of retries (kept, redeliverable).",
            registry=registry,
        )

        # A channel's children, looked up once (labels() costs a lock and a tuple).
        self._delivered: dict[str, tuple[Any, Any]] = {}

    def delivered(self, channel: str, lag_s: float) -> None:
        children = self._delivered.get(channel)
        if children is None:
            children = (self.attempts.labels(channel, "delivered"), self.lag.labels(channel))
            self._delivered[channel] = children
        children[0].inc()
        children[1].observe(lag_s)

    def outcome(self, channel: str, outcome: str) -> None:
        self.attempts.labels(channel, outcome).inc()

    def observe_state(self, state: OutboxState, now_ms: int) -> None:
        self.undispatched.set(state.undispatched_events)
        oldest = state.oldest_undispatched_ms
        self.oldest_age.set(0 if oldest is None else max(0, now_ms - oldest) / 1000)
        self.due.set(state.due_deliveries)
        self.dead.set(state.dead_deliveries)
