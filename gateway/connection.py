"""One HTTP connection under the application: what happens before a request
reaches a route, and the answers aiohttp would otherwise render itself.

``GatewayProtocol`` is aiohttp's protocol with these changes:

- A request the HTTP parser refuses (a stray byte in a header or the query, a
  line past 8190 bytes, garbage) is answered in docs/api.md's error shape, with the
  security headers and an ``X-Request-Id``. aiohttp puts the offending bytes in
  its message (a bearer token among them), then logs it with a traceback and
  echoes it in a text answer: here neither the answer nor the log carries a
  byte of the request.
- Any other answer aiohttp renders itself (an ``HTTPException`` raised outside
  the middleware, such as an unknown ``Expect``; a failure that escaped it) gets
  the same shape and headers.
- Slow clients: a request's headers must be complete within the header timeout
  of its first byte, else 408 and the connection closes; ``read_body`` bounds
  the read of a body by the body timeout (408 ``RequestTimeout``). Neither
  touches a connection once it is upgraded (WebSocket) or streaming (SSE): an
  idle keep-alive connection is aiohttp's keep-alive timeout's.

``serve_app`` serves an application with this protocol (``web.run_app`` cannot
be given another one). This module never logs request bytes.
"""

import asyncio
import logging
import signal
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, Final

import msgspec
from aiohttp import hdrs, web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from config.settings import BODY_TIMEOUT_DEFAULT_S, HEADER_TIMEOUT_DEFAULT_S
from engine.shell.coalescer import RequestIds

logger = logging.getLogger("slotengine.gateway")
access_logger = logging.getLogger("slotengine.access")

# What stops a server gracefully: the event loop owns both.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
# How long an idle keep-alive connection stays open: web.run_app's default, kept.
KEEPALIVE_TIMEOUT_S: Final = 75.0
# aiohttp's parser's limit on a request line and on each header.
LINE_BYTES_MAX: Final = 8190
# After a refusal the client may still be sending (a trickle, the rest of an
# oversized header). Closing at once would answer its next bytes with a reset,
# which can destroy the answer before the client reads it: the answer is
# followed by a FIN, and what arrives is discarded this long before the close.
LINGER_AFTER_REFUSAL_S: Final = 2.0


class ReadTimeouts(msgspec.Struct, frozen=True, kw_only=True):
    """How long a client may take to send a request's headers, then its body."""

    header_s: float = HEADER_TIMEOUT_DEFAULT_S
    body_s: float = BODY_TIMEOUT_DEFAULT_S


class HeaderTimeout(Exception):
    """A request's headers did not arrive within the header timeout."""


class GatewayProtocol(RequestHandler):
    """aiohttp's HTTP protocol, answering every refusal in docs/api.md's shape, with read timeouts.

    It reads aiohttp's own protocol state (``_upgraded``, ``_payload_parser``,
    ``_messages``, ``_waiter``, ``_force_close``): the header timeout must tell
    a request's header bytes from its body's and from a WebSocket's frames, and
    answer through the same path as a parser error; a refusal's close lingers.
    """

    __slots__ = (
        "_body",
        "_close_after_answer",
        "_header_timer",
        "_ids",
        "_timed_out",
        "read_timeouts",
    )

    def __init__(self, manager: "GatewayServer", **options: Any) -> None:
        super().__init__(manager, **options)
        self.read_timeouts = manager.read_timeouts
        self._ids = manager.ids
        # Armed while a request's headers are incomplete (never for a request
        # arriving whole, the usual case: no timer a request).
        self._header_timer: asyncio.TimerHandle | None = None
        # The body of the last request parsed: bytes arriving while it is not
        # complete are the body's, not a next request's headers.
        self._body: StreamReader | None = None
        # The 408 of a header timeout is on its way: nothing more is read.
        self._timed_out = False
        self._close_after_answer = False

    # -- the header timeout ----------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._timed_out or self._force_close or self._close:
            return  # a refusal is on its way, or the connection is closing
        if not data or self._upgraded or self._payload_parser is not None:
            # A WebSocket's frames (or bytes held until an upgrade is decided).
            super().data_received(data)
            return
        in_body = self._body is not None and not self._body.is_eof()
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            # Headers complete. Bytes after them may begin a next request: its
            # clock starts with its next chunk, at most one chunk late.
            self._body = self._messages[-1][1] if self._messages else None
            self._cancel_header_timer()
        elif not in_body and self._header_timer is None:
            self._header_timer = self._loop.call_later(
                self.read_timeouts.header_s, self._headers_timed_out
            )

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport is None or self._close or self._force_close:
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done() and not self._messages:
            # Between requests: answered like a parser error (handle_error), then closed.
            self._timed_out = True
            self._messages.append(
                (_ErrInfo(status=408, exc=HeaderTimeout(), message=""), EMPTY_PAYLOAD)
            )
            waiter.set_result(None)
        else:
            # A request is being answered (an event stream, perhaps): it is not
            # cut, but nothing more is read and the connection closes after it.
            self.close()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    # -- answers aiohttp renders itself -------------------------------------------

    def close_after_answer(self) -> None:
        """Close the connection once the current answer is sent, reading no further request.

        The close lingers (``LINGER_AFTER_REFUSAL_S``) so that the client
        still sending gets the answer rather than a reset.
        """
        self._close_after_answer = True

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request the parser refused (or to a failure that escaped the
        middleware): docs/api.md's shape, then the connection closes.

        ``message`` and ``exc`` are never shown or logged as they are: aiohttp's
        parser quotes the request's bytes in them.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was partly sent: the connection is closed instead")
        request_id = self._request_id(request)
        if status >= 500:
            # Not the request's bytes but a bug of ours: its traceback is needed
            # (and the log filter masks anything shaped like a token).
            logger.error(
                "unexpected failure outside the middleware",
                exc_info=exc,
                extra={"request_id": request_id},
            )
        else:
            access_logger.info(
                "refused: %s",
                type(exc).__name__ if exc is not None else HTTPStatus(status).phrase,
                extra={
                    "event": "http.refused",
                    "request_id": request_id,
                    "status": status,
                    "error": _code(status),
                },
            )
        response = self._error_answer(
            request_id, status, _refusal_message(status, exc, self.read_timeouts)
        )
        response.force_close()
        self.close_after_answer()
        return response

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if isinstance(resp, web.HTTPException) and resp.status >= 400 and not resp.prepared:
            # Raised outside the middleware (an unknown Expect header, say): aiohttp
            # would answer in text, some with the request's bytes in it.
            resp = self._error_answer(
                self._request_id(request),
                resp.status,
                HTTPStatus(resp.status).phrase,
                headers=resp.headers,
            )
        answered = await super().finish_response(request, resp, start_time)
        if self._close_after_answer:
            self._linger_close()
        return answered

    def _linger_close(self) -> None:
        transport = self.transport
        if transport is None or self._force_close:
            return
        # Set without closing: the request loop then ends without closing the
        # transport, and incoming bytes are dropped.
        self._force_close = True
        if transport.can_write_eof():
            transport.write_eof()  # after the answer, once it is written
        self._loop.call_later(LINGER_AFTER_REFUSAL_S, self.force_close)

    def _request_id(self, request: web.BaseRequest) -> str:
        """The id the middleware gave the request, or a new one (it never reached it)."""
        from gateway.http import REQUEST_ID_KEY

        request_id: str | None = request.get(REQUEST_ID_KEY)
        return request_id if request_id is not None else self._ids.next()

    def _error_answer(
        self,
        request_id: str,
        status: int,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        from gateway.http import SECURITY_HEADERS, ApiError, error_response

        response = error_response(ApiError(status, _code(status), message))
        for name, value in (headers or {}).items():
            if name not in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH):
                response.headers[name] = value
        response.headers["X-Request-Id"] = request_id
        response.headers.update(SECURITY_HEADERS)
        return response


# Codes of the statuses whose name is not its phrase run together.
_CODES: Final = {500: "InternalError"}


def _code(status: int) -> str:
    """docs/api.md's error code of a status: "Request Timeout" is RequestTimeout."""
    code = _CODES.get(status)
    if code is not None:
        return code
    words = HTTPStatus(status).phrase.replace("-", " ").split()
    return "".join(word[:1].upper() + word[1:] for word in words)


def _refusal_message(status: int, exc: BaseException | None, timeouts: ReadTimeouts) -> str:
    if isinstance(exc, HeaderTimeout):
        return f"the request's headers did not arrive within {timeouts.header_s:g} s"
    if isinstance(exc, LineTooLong):
        return f"the request line or a header is longer than {LINE_BYTES_MAX} bytes"
    if status == 400:
        return "malformed HTTP request"
    if status >= 500:
        return "unexpected server error"
    return HTTPStatus(status).phrase


class GatewayServer(web.Server):
    """aiohttp's server, making a GatewayProtocol for each connection."""

    def __init__(
        self, handler: Any, *, read_timeouts: ReadTimeouts, ids: RequestIds, **options: Any
    ) -> None:
        super().__init__(handler, **options)
        self.read_timeouts = read_timeouts
        self.ids = ids

    def __call__(self) -> GatewayProtocol:
        return GatewayProtocol(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An AppRunner serving its application with GatewayProtocol."""

    def __init__(self, app: web.Application, read_timeouts: ReadTimeouts, **options: Any) -> None:
        super().__init__(app, **options)
        self._read_timeouts = read_timeouts

    async def _make_server(self) -> web.Server:
        from gateway.http import IDS_KEY

        made = await super()._make_server()  # starts the application up and freezes it
        return GatewayServer(
            made.request_handler,
            request_factory=made.request_factory,
            read_timeouts=self._read_timeouts,
            ids=self.app[IDS_KEY],
            **self._kwargs,
        )


async def read_body(request: web.BaseRequest) -> bytes:
    """The request's body, read within the body timeout: 408 ``RequestTimeout`` past it.

    A body that could not be decoded (bad chunked encoding or compression) is
    400, never a failure of ours.
    """
    from gateway.http import ApiError

    protocol = request.protocol
    timeout_s = (
        protocol.read_timeouts.body_s
        if isinstance(protocol, GatewayProtocol)
        else BODY_TIMEOUT_DEFAULT_S
    )
    try:
        if request.content.is_eof():  # it came with the headers: no timer to arm
            return await request.read()
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        # The rest of the body may still trickle in: not worth waiting for.
        _close_after_answer(protocol)
        raise ApiError(
            408, "RequestTimeout", f"the body did not arrive within {timeout_s:g} s"
        ) from None
    except RequestPayloadError:
        # What follows cannot be read either (aiohttp would try, and log the failure).
        _close_after_answer(protocol)
        raise ApiError(400, "BadRequest", "the body could not be decoded") from None


def _close_after_answer(protocol: RequestHandler) -> None:
    if isinstance(protocol, GatewayProtocol):
        protocol.close_after_answer()


def serve_app(
    app: web.Application,
    *,
    host: str,
    port: int,
    read_timeouts: ReadTimeouts,
    reuse_port: bool,
    backlog: int,
    shutdown_timeout_s: float,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> None:
    """Serve ``app`` with GatewayProtocol until SIGINT or SIGTERM, then stop gracefully.

    The event loop handles both signals, from before the application's startup
    to the end of its cleanup, and logs which one stopped it; the handlers a
    startup installs (Ray's) are replaced when it is done.

    What ``web.run_app`` does (it has no way to take another protocol): the
    application's startup, the listening socket, and on a stop signal its
    shutdown and cleanup within ``shutdown_timeout_s``.
    """
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(app, host, port, read_timeouts, reuse_port, backlog, shutdown_timeout_s))


async def _serve(
    app: web.Application,
    host: str,
    port: int,
    read_timeouts: ReadTimeouts,
    reuse_port: bool,
    backlog: int,
    shutdown_timeout_s: float,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop_signal(stop_signal: signal.Signals) -> None:
        if not stop.is_set():
            logger.info(
                "%s received: stopping gracefully (requests in flight finish, the engine "
                "flushes what it acknowledged)",
                stop_signal.name,
            )
        stop.set()

    def own_stop_signals() -> None:
        for stop_signal in STOP_SIGNALS:
            loop.add_signal_handler(stop_signal, on_stop_signal, stop_signal)

    own_stop_signals()
    runner = GatewayRunner(
        app,
        read_timeouts,
        shutdown_timeout=shutdown_timeout_s,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        access_log=None,
    )
    await runner.setup()
    # Again after the application's startup: starting Ray installs handlers of its
    # own for both (SIGTERM's dumps a stack trace and aborts the process).
    own_stop_signals()
    try:
        site = web.TCPSite(runner, host, port, backlog=backlog, reuse_port=reuse_port)
        await site.start()
        logger.info("serving on %s", site.name)
        await stop.wait()
    finally:
        await runner.cleanup()
