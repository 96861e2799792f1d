"""``slotengine serve`` traced by the OTEL_* variables alone, as a deployment runs it.

``serve --engine inproc --workers 2``: two gateway processes and the engine
process each configure their tracing from the environment and export over
OTLP/HTTP to a receiver run here. A reservation whose request carries a W3C
``traceparent`` is followed: the worker's HTTP span continues the caller's
trace, the command's span is its child, and the engine process's batch and
flush spans, linked to them, arrive too.
"""

import asyncio
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from engine.shell.tracing import REQUEST_ID_ATTRIBUTE
from tests.gateway.test_serve import Served, _stop_cleanly
from tests.support.otlp import ReceivedSpan, serving_receiver

ARRIVAL_LIMIT_S = 60.0
SERVICE = "slotengine-serve-tracing-test"
CALLER_TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN_ID = 0x00F067AA0BA902B7


async def test_serve_exports_the_spans_of_a_reservation_from_every_process(
    database_url: str, tmp_path: Path
) -> None:
    async with serving_receiver() as (collector, endpoint):
        served = Served(database_url, tmp_path)
        served.env.update(
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
                "OTEL_SERVICE_NAME": SERVICE,
                "OTEL_BSP_SCHEDULE_DELAY": "50",
            }
        )
        log_path = tmp_path / "serve.log"
        served.start_inproc_workers(log_path, workers=2)
        try:
            admin, user = served.token("root", "admin"), served.token("ann")
            async with aiohttp.ClientSession() as session:
                async with asyncio.timeout(180):
                    while True:
                        try:
                            async with session.get(f"{served.base}/api/slots") as probe:
                                if probe.status == 401:
                                    break
                        except aiohttp.ClientConnectionError:
                            await asyncio.sleep(0.5)
                start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
                async with session.post(
                    f"{served.base}/api/admin/slots",
                    json={
                        "resourceId": "room-served",
                        "startTime": start.isoformat(),
                        "endTime": (start + timedelta(hours=1)).isoformat(),
                        "capacity": 1,
                    },
                    headers={"Authorization": f"Bearer {admin}"},
                ) as created:
                    assert created.status == 201, await created.text()
                    slot = await created.json()
                async with session.post(
                    f"{served.base}/api/bookings/reserve",
                    json={"slotId": slot["id"]},
                    headers={
                        "Authorization": f"Bearer {user}",
                        "X-Request-Id": "served-1",
                        "traceparent": f"00-{CALLER_TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01",
                    },
                ) as reserved:
                    assert reserved.status == 201, await reserved.text()

            def chain() -> tuple[ReceivedSpan, ...] | None:
                spans = collector.spans
                request = next(
                    (s for s in spans if s.attributes.get(REQUEST_ID_ATTRIBUTE) == "served-1"),
                    None,
                )
                if request is None:
                    return None
                command = next(
                    (
                        s
                        for s in spans
                        if s.name == "engine Reserve" and s.parent_span_id == request.span_id
                    ),
                    None,
                )
                if command is None:
                    return None
                batch = next(
                    (
                        s
                        for s in spans
                        if s.name == "shard batch"
                        and (command.trace_id, command.span_id) in s.links
                    ),
                    None,
                )
                if batch is None:
                    return None
                flush = next(
                    (
                        s
                        for s in spans
                        if s.name == "shard flush" and (batch.trace_id, batch.span_id) in s.links
                    ),
                    None,
                )
                return None if flush is None else (request, command, batch, flush)

            async with asyncio.timeout(ARRIVAL_LIMIT_S):
                while (found := chain()) is None:
                    await asyncio.sleep(0.1)
        finally:
            _stop_cleanly(served, signal.SIGINT, log_path)
    request, command, batch, flush = found
    # The caller's trace goes on in the gateway: its span is the HTTP span's parent.
    assert (request.trace_id, request.parent_span_id) == (CALLER_TRACE_ID, CALLER_SPAN_ID)
    assert command.trace_id == CALLER_TRACE_ID
    assert {s.service for s in found} == {SERVICE}
    # The batch and the flush are the engine process's: traces of their own, linked.
    assert batch.trace_id != CALLER_TRACE_ID
    assert flush.attributes["slotengine.shard"] == batch.attributes["slotengine.shard"]
