"""The gateway's database pool as a collector: its connections by state, read at scrape time.

It owns ``PoolCollector``, which renders
``slotengine_db_pool_connections{state}`` (``in_use``, ``idle``, ``max``) from
the asyncpg pool it is given when it is asked. It never opens, takes or
closes a connection, and renders nothing while there is no pool (before
startup, after cleanup).
"""

from collections.abc import Callable, Iterable
from typing import Final, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric

POOL_STATES: Final = ("in_use", "idle", "max")


class _Pool(Protocol):
    """What the collector reads of an ``asyncpg.Pool``."""

    def get_size(self) -> int: ...

    def get_idle_size(self) -> int: ...

    def get_max_size(self) -> int: ...

    def is_closing(self) -> bool: ...


class PoolCollector:
    """``slotengine_db_pool_connections``, from ``pool()`` at every collection."""

    def __init__(self, pool: Callable[[], _Pool | None]) -> None:
        self._pool = pool

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        pool = self._pool()
        if pool is not None and not pool.is_closing():
            size, idle = pool.get_size(), pool.get_idle_size()
            values = {"in_use": max(0, size - idle), "idle": idle, "max": pool.get_max_size()}
            for state in POOL_STATES:
                family.add_metric([state], values[state])
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "slotengine_db_pool_connections",
            "The gateway's PostgreSQL connections by state: in_use (taken by a request), "
            "idle (open, free) and max (the pool's size limit).",
            labels=["state"],
        )
