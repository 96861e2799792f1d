"""An OTLP/HTTP trace receiver for the tests: an aiohttp app that decodes the
protobuf ``ExportTraceServiceRequest`` of the collector's API (the
opentelemetry-proto package) and keeps every span it was sent."""

import gzip
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


class ReceivedSpan(msgspec.Struct, frozen=True):
    service: str
    name: str
    trace_id: int
    span_id: int
    parent_span_id: int | None
    links: frozenset[tuple[int, int]]
    attributes: dict[str, Any]


class Receiver:
    """An OTLP/HTTP trace receiver: every span of every export, decoded."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/traces", self._export)

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=int.from_bytes(span.trace_id, "big"),
                            span_id=int.from_bytes(span.span_id, "big"),
                            parent_span_id=int.from_bytes(span.parent_span_id, "big")
                            if span.parent_span_id
                            else None,
                            links=frozenset(_link(link) for link in span.links),
                            attributes={
                                a.key: a.value.string_value or a.value.int_value
                                for a in span.attributes
                            },
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )


def _link(link: Any) -> tuple[int, int]:
    return int.from_bytes(link.trace_id, "big"), int.from_bytes(link.span_id, "big")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def serving_receiver() -> AsyncIterator[tuple[Receiver, str]]:
    """A receiver on a free loopback port, and its traces endpoint; stopped after.

    Enter it before aiohttp's instrumentation is on: its own requests then make
    no spans."""
    collector = Receiver()
    runner = web.AppRunner(collector.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", _free_port())
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield collector, f"http://127.0.0.1:{port}/v1/traces"
    finally:
        await runner.cleanup()
