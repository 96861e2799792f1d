"""The HTTP client of webhook attempts: kept-alive connections, the guard at every one.

A delivery worker usually shares its machine with the engine, so what an
attempt costs is taken from bookings. aiohttp's client spends about 100 µs of
CPU on a POST; this one about a quarter of that: it writes each request as one
buffer on a kept-alive connection and leaves the parsing of answers to
httptools (llhttp, Node.js's parser). It speaks HTTP/1.1 over TCP or TLS, one
request at a time per connection; answers may carry a Content-Length, chunked
or close-delimited body (read and dropped, up to ``ANSWER_BYTES_MAX``), and an
informational 1xx answer before the final one is skipped.

The guard against server-side request forgery (engine/notify/webhooks.py)
applies at every new connection: a literal address is checked, a name is
resolved and refused if any of its addresses is refused (connecting to the
others would let a receiver steer the attempt by the order of its answers),
and the connection goes to a checked address, never to the name again (DNS
rebinding).

It must never follow a redirect (a 3xx is the answer), connect to an address
the guard refuses, nor put a connection back whose answer it has not read to
the end.
"""

import asyncio
import os
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

from engine.notify.webhooks import ERROR_CHARS_MAX, SCHEMES, address_refused, literal_address

# An answer's body beyond this is not read: the connection is closed.
ANSWER_BYTES_MAX: Final = 64 * 1024
# A kept-alive connection unused for this long is closed (receivers close theirs
# after 5 to 75 s; reusing one they are closing costs an attempt a retry).
IDLE_S: Final = 15.0
# Connections open at once, over all receivers.
CONNECTIONS_MAX: Final = 256
# Parsed URLs kept (one per endpoint in use); the cache starts over past this.
TARGETS_MAX: Final = 1024


class AttemptFailed(Exception):
    """Why an attempt got no answer, in a few words (a delivery's ``last_error``)."""


class _LostUnanswered(AttemptFailed):
    """The connection closed before any byte of an answer: on a reused connection,
    the receiver had closed it while idle, and the request is sent again on a new one."""


@dataclass(frozen=True, slots=True)
class _Target:
    key: tuple[bool, str, int]  # (TLS, host, port): which connections may carry it
    host: str
    port: int
    tls: bool
    head: bytes  # the request line and Host header


class _Connection(asyncio.Protocol):
    """One connection: hands the status of each final answer to the waiting request."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0
        self._status = 0  # of the answer whose headers are in, 0 before
        self._answered = False  # a byte of an answer arrived since the request
        self._body_bytes = 0

    # -- the request side ---------------------------------------------------------

    def send(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        self._status = 0
        self._answered = False
        self._body_bytes = 0
        self.reusable = False
        self.transport.write(request)
        return waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("the receiver switched protocols")
        except httptools.HttpParserError:
            if self._body_bytes > ANSWER_BYTES_MAX and self._status:
                self._answer(self._status, reusable=False)  # the status is all it needs
            else:
                self._fail("not an HTTP/1.1 answer")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        if self._status:  # a body delimited by the end of the connection
            self._answer(self._status, reusable=False)
        elif self._answered:
            self.waiter.set_exception(AttemptFailed("the connection closed during the answer"))
        else:
            self.waiter.set_exception(_LostUnanswered("the connection closed without an answer"))

    # -- httptools' callbacks -----------------------------------------------------

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status >= 200:
            self._status = status
            self.reusable = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > ANSWER_BYTES_MAX:
            raise OverflowError  # ends feed_data; data_received closes the connection

    def on_message_complete(self) -> None:
        if self._status:  # not an informational (1xx) answer: the final one
            self._answer(self._status, reusable=self.reusable)

    # -- outcomes -----------------------------------------------------------------

    def _answer(self, status: int, *, reusable: bool) -> None:
        self.reusable = reusable
        if not reusable:
            self.close()
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.close()  # an answer nobody asked for: the connection is not to be trusted
        else:
            waiter.set_result(status)

    def _fail(self, reason: str) -> None:
        self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(AttemptFailed(reason))


class WebhookClient:
    """POSTs to webhook receivers; ``post`` answers None on a 2xx, else why not."""

    def __init__(
        self,
        *,
        allow_private: bool,
        connections_max: int = CONNECTIONS_MAX,
        idle_s: float = IDLE_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._allow_private = allow_private
        self._idle_s = idle_s
        self._ssl_context = ssl_context
        self._slots = asyncio.Semaphore(connections_max)
        self._idle: dict[tuple[bool, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._targets: dict[str, _Target] = {}
        self._sweep: asyncio.TimerHandle | None = None

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> str | None:
        """One attempt: None on a 2xx answer, else a short reason (never raises for
        what the network or the receiver did)."""
        try:
            target = self._target(url)
            request = target.head + _headers(headers, len(body)) + body
        except ValueError as error:
            return _short(str(error))
        async with self._slots:
            try:
                async with asyncio.timeout(timeout_s):
                    status = await self._exchange(target, request)
            except TimeoutError:
                return f"timeout after {timeout_s:g} s"
            except AttemptFailed as error:
                return _short(str(error))
            except OSError as error:
                return _short(_os_failure(error))
        return None if 200 <= status < 300 else f"HTTP {status}"

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()

    @property
    def open_connections(self) -> int:
        return sum(1 for connection in self._open if not connection.closed)

    # -- one exchange -------------------------------------------------------------

    async def _exchange(self, target: _Target, request: bytes) -> int:
        reused = self._take_idle(target.key)
        if reused is not None:
            try:
                return await self._send(reused, target, request)
            except _LostUnanswered:
                pass  # closed by the receiver while idle: sent again on a new connection
        return await self._send(await self._connect(target), target, request)

    async def _send(self, connection: _Connection, target: _Target, request: bytes) -> int:
        done = False
        try:
            status = await connection.send(request)
            done = True
        finally:
            connection.waiter = None
            if done and connection.reusable and not connection.closed:
                connection.idle_since = time.monotonic()
                self._idle.setdefault(target.key, []).append(connection)
                self._arm_sweep()
            else:  # failed, timed out or not to be kept: its answer may still be coming
                connection.close()
                self._open.discard(connection)
        return status

    def _take_idle(self, key: tuple[bool, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()  # the most recently used: the least likely closed
            if not connection.closed and time.monotonic() - connection.idle_since < self._idle_s:
                return connection
            connection.close()
            self._open.discard(connection)
        return None

    async def _connect(self, target: _Target) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls() if target.tls else None
        error: OSError | None = None
        for family, address in await self._addresses(target):
            try:
                _, connection = await loop.create_connection(
                    _Connection,
                    address,
                    target.port,
                    family=family,
                    ssl=tls,
                    server_hostname=target.host if tls is not None else None,
                )
            except ssl.SSLError:
                raise  # the receiver's certificate: another address would not help
            except OSError as failure:
                error = failure
                continue
            self._open.add(connection)
            return connection
        assert error is not None
        raise error

    async def _addresses(self, target: _Target) -> list[tuple[int, str]]:
        """The addresses to try, each checked by the guard (unless private ones are allowed)."""
        literal = literal_address(target.host)
        if literal is not None:
            if not self._allow_private and address_refused(literal):
                raise AttemptFailed(f"refused: {target.host} is a private or reserved address")
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            return [(family, str(literal))]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                target.host, target.port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError) as error:
            raise AttemptFailed(f"{target.host} does not resolve") from error
        found: list[tuple[int, str]] = []
        for family, _, _, _, sockaddr in infos:
            host = str(sockaddr[0])
            address = literal_address(host)
            if not self._allow_private and (address is None or address_refused(address)):
                raise AttemptFailed(
                    f"refused: {target.host} resolves to a private or reserved address"
                )
            if (family, host) not in found:
                found.append((family, host))
        if not found:
            raise AttemptFailed(f"{target.host} does not resolve")
        return found

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= TARGETS_MAX:
                self._targets.clear()
            target = self._targets[url] = _parse(url)
        return target

    def _arm_sweep(self) -> None:
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._idle_s, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close connections idle too long, so that a quiet worker holds no sockets."""
        self._sweep = None
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            kept = [c for c in idle if not c.closed and now - c.idle_since < self._idle_s]
            for connection in idle:
                if connection not in kept:
                    connection.close()
                    self._open.discard(connection)
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if self._idle:
            self._arm_sweep()


def _parse(url: str) -> _Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError("not an http or https URL")
    host = parts.hostname
    if not host or "@" in parts.netloc:
        raise ValueError("not a URL of a host")
    tls = scheme == "https"
    port = parts.port or (443 if tls else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if any(c in path or c in parts.netloc for c in "\r\n "):
        raise ValueError("not a valid URL")
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("not an ASCII URL (a name in punycode, a path %-encoded)") from None
    return _Target((tls, host, port), host, port, tls, head)


def _headers(headers: Mapping[str, str], length: int) -> bytes:
    lines = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError("a header carries a line break")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"content-length: {length}\r\n\r\n")
    return "".join(lines).encode("latin-1")


def _os_failure(error: OSError) -> str:
    if isinstance(error, ssl.SSLError):
        return f"TLS failed: {error.reason or error}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if error.errno is not None:
        return f"connection failed: {os.strerror(error.errno).lower()}"
    return f"connection failed: {error}"


def _short(text: str) -> str:
    return text if len(text) <= ERROR_CHARS_MAX else text[: ERROR_CHARS_MAX - 1] + "…"
