"""Delivery workers as a deployment runs them: built from the settings, run until stopped.

``slotengine notify`` runs ``run_workers`` in a process of its own (any number
of them, on any machine); ``slotengine serve`` starts one ``Notifier`` beside
its gateway unless ``--no-notify``.

It must never start a worker when notifications are off
(``SLOTENGINE_NOTIFICATIONS=false``): there is no outbox to read.
"""

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from prometheus_client import CollectorRegistry, start_http_server

from config.domains import notification_channels
from config.settings import Settings
from engine.notify.channels import EmailChannel, WebhookChannel
from engine.notify.mail import templates_for
from engine.notify.metrics import NotifyMetrics
from engine.notify.worker import DeliveryWorker, WorkerOptions
from persistence.sealing import KeyRing
from persistence.timings import Timings, TimingsCollector

logger = logging.getLogger(__name__)

# Connections of one worker: the dispatch, the deliveries, the channels' reads.
POOL_SIZE_MAX: Final = 6
# A receiver answers a webhook, an SMTP server a message, within this (or half
# the delivery lease, if shorter), or the attempt fails.
CHANNEL_TIMEOUT_S: Final = 10.0


@dataclass
class Notifier:
    """One running delivery worker and what it holds."""

    worker: DeliveryWorker
    pool: asyncpg.Pool
    channels: dict[str, Any]
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        for channel in self.channels.values():
            await channel.close()
        await self.pool.close()


def worker_options(settings: Settings) -> WorkerOptions:
    return WorkerOptions(
        retry_seconds=settings.delivery_retry_seconds,
        lease_s=float(settings.delivery_lease_seconds),
        retention_s=settings.outbox_retention_hours * 3600.0,
    )


async def start_notifier(
    settings: Settings,
    database_url: str,
    ring: KeyRing,
    registry: CollectorRegistry | None,
    timings: Timings | None = None,
) -> Notifier:
    """A delivery worker on ``database_url``, running until ``Notifier.close``.

    ``registry``: where its metrics go; ``timings``: where its statements are timed
    (the gateway's, which renders them), else its metrics' own."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=POOL_SIZE_MAX)
    try:
        # Every attempt ends well within the lease (see DELIVERY_LEASE_SECONDS_DEFAULT).
        timeout_s = min(CHANNEL_TIMEOUT_S, settings.delivery_lease_seconds / 2)
        channels: dict[str, Any] = {
            "webhook": WebhookChannel(
                pool, ring, allow_private=settings.webhook_allow_private, timeout_s=timeout_s
            )
        }
        if settings.smtp_url:
            channels["email"] = EmailChannel(
                pool, ring, settings.smtp_url, settings.mail_from, templates_for(settings),
                timeout_s=timeout_s,
            )  # fmt: skip
        worker = DeliveryWorker(
            pool,
            channels,
            notification_channels(settings),
            options=worker_options(settings),
            metrics=NotifyMetrics(registry, timings) if registry is not None else None,
        )
    except BaseException:
        await pool.close()
        raise
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(worker.run(stop), name="delivery-worker")
    logger.info(
        "delivery worker started: %s (retries after %s s)",
        ", ".join(sorted(channels)),
        ",".join(map(str, settings.delivery_retry_seconds)) or "none",
    )
    return Notifier(worker, pool, channels, stop, task)


def run_until_stopped(
    settings: Settings, database_url: str, ring: KeyRing, metrics_port: int | None
) -> None:
    """``slotengine notify``: one delivery worker until SIGINT or SIGTERM, its metrics
    on ``metrics_port`` if given. Brings the schema up to date first (a worker may
    start before any gateway)."""
    import uvloop

    uvloop.run(_run_until_stopped(settings, database_url, ring, metrics_port))


async def _run_until_stopped(
    settings: Settings, database_url: str, ring: KeyRing, metrics_port: int | None
) -> None:
    from persistence.migrate import migrate

    connection = await asyncpg.connect(database_url)
    try:
        await migrate(connection)
    finally:
        await connection.close()
    registry = CollectorRegistry(auto_describe=True)
    if metrics_port is not None:
        start_http_server(metrics_port, registry=registry)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(stop_signal, stopped.set)
    # Its statements' durations: the only timings of this process's registry.
    timings = Timings()
    registry.register(TimingsCollector(timings))
    notifier = await start_notifier(settings, database_url, ring, registry, timings)
    try:
        await stopped.wait()
        logger.info("stopping the delivery worker")
    finally:
        await notifier.close()
