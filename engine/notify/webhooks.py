"""Webhooks: Standard Webhooks signatures, the guard against server-side request
forgery, and one signed POST.

A webhook is signed as the Standard Webhooks specification says: headers
``webhook-id`` (the event's id, the same on every retry), ``webhook-timestamp``
(seconds) and ``webhook-signature`` (``v1,`` then the base64 HMAC-SHA256 of
``id.timestamp.body``, keyed with the base64-decoded part of a ``whsec_``
secret), so that a receiver verifies it with any Standard Webhooks library.

The guard (SSRF): an endpoint's URL is http or https, without credentials, and
its host names no address inside the deployment (loopback, private, link-local
with the cloud metadata address, CGNAT, unique-local, multicast, reserved,
unspecified, nor an IPv4-mapped form of one) unless the operator allows private
addresses. It is checked when an endpoint is registered (``url_problem``) and
again at every connection (``guarded_connector``), since a name may resolve
elsewhere by then (DNS rebinding).

It must never touch the database, log a secret, or follow a redirect (a 3xx
could lead anywhere, past the guard).
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import socket
from typing import Final
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.resolver import DefaultResolver
from aiohttp.tracing import Trace

SECRET_PREFIX: Final = "whsec_"
# A new secret's random bytes; a client-given one may carry 24 to 64.
SECRET_BYTES: Final = 24
SECRET_BYTES_MIN: Final = 24
SECRET_BYTES_MAX: Final = 64
SIGNATURE_VERSION: Final = "v1"
USER_AGENT: Final = "slotengine"
SCHEMES: Final = ("http", "https")
# How long resolving an endpoint's host may take when it is registered.
RESOLVE_TIMEOUT_S: Final = 5.0
# Error texts are kept short: they are stored with the delivery.
ERROR_CHARS_MAX: Final = 200

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges refused besides what ``ipaddress`` does not call global: named so
# that an address in them is refused whatever the Python version says.
_REFUSED_NETWORKS: Final = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",  # "this network", unspecified
        "10.0.0.0/8",
        "100.64.0.0/10",  # CGNAT, shared address space
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, with the cloud metadata address 169.254.169.254
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
        "::/128",
        "::1/128",
        "64:ff9b::/96",  # NAT64: an IPv4 address behind it
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)


class RefusedAddress(OSError):
    """A webhook host that resolves to an address the guard refuses."""


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` and the base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode()


def secret_problem(secret: str) -> str | None:
    """What is wrong with a client-given secret, or None: ``whsec_`` and base64 of 24-64 bytes."""
    if not secret.startswith(SECRET_PREFIX):
        return f"must start with {SECRET_PREFIX}"
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        return f"must be {SECRET_PREFIX} followed by base64"
    if not SECRET_BYTES_MIN <= len(key) <= SECRET_BYTES_MAX:
        return f"must encode {SECRET_BYTES_MIN} to {SECRET_BYTES_MAX} bytes"
    return None


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256>`` of ``msg_id.timestamp_s.body``, as Standard Webhooks signs."""
    signed = f"{msg_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def webhook_headers(secret: str, msg_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    """The headers of one signed attempt (``msg_id``: the event's id, the same on every retry)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": sign(secret, msg_id, timestamp_s, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def address_refused(address: IPAddress) -> bool:
    """Whether an address is inside a deployment rather than on the internet."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None and address_refused(embedded):
            return True
    if any(address in network for network in _REFUSED_NETWORKS):
        return True
    return (
        not address.is_global
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address.is_loopback
        or address.is_link_local
        or address.is_private
    )


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return None


async def url_problem(url: str, *, allow_private: bool) -> str | None:
    """What makes ``url`` unfit for a webhook endpoint, or None.

    http or https only, a host, no credentials; the host (a name is resolved,
    within ``RESOLVE_TIMEOUT_S``) must not be or resolve to a refused address
    unless ``allow_private``.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "not a valid URL"
    if parts.scheme.lower() not in SCHEMES:
        return "must be an http or https URL"
    host = parts.hostname
    if not host:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    if allow_private:
        return None
    literal = _literal_address(host)
    if literal is not None:
        return "names a private, loopback or reserved address" if address_refused(literal) else None
    loop = asyncio.get_running_loop()
    default_port = 443 if parts.scheme.lower() == "https" else 80
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port or default_port, type=socket.SOCK_STREAM),
            RESOLVE_TIMEOUT_S,
        )
    except TimeoutError:
        return f"its host did not resolve within {RESOLVE_TIMEOUT_S:g} s"
    except (OSError, UnicodeError):
        return "its host does not resolve"
    addresses = {_literal_address(str(info[4][0])) for info in infos}
    if not addresses or any(a is None or address_refused(a) for a in addresses):
        return "its host resolves to a private, loopback or reserved address"
    return None


class GuardedResolver(AbstractResolver):
    """The default resolver, refusing every name that resolves to a refused address.

    One refused address refuses the name: connecting to its other addresses
    would let a receiver steer the attempt by the order of its answers.
    """

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = _literal_address(result["host"])
            if address is None or address_refused(address):
                raise RefusedAddress(f"refused: {host} resolves to a private or reserved address")
        return results

    async def close(self) -> None:
        await self._inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """A connector that refuses literal addresses the guard refuses (names go
    through ``GuardedResolver``; aiohttp connects to a literal without resolving it)."""

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        host = req.url.raw_host or ""
        address = _literal_address(host)
        if address is not None and address_refused(address):
            raise aiohttp.ClientConnectorError(
                req.connection_key,
                RefusedAddress(f"refused: {host} is a private or reserved address"),
            )
        return await super().connect(req, traces, timeout)


def guarded_connector(*, allow_private: bool, limit: int = 100) -> aiohttp.TCPConnector:
    """A connector for webhook attempts: the guard applied at every connection
    (DNS rebinding), or a plain one when private addresses are allowed."""
    if allow_private:
        return aiohttp.TCPConnector(limit=limit)
    return GuardedConnector(limit=limit, resolver=GuardedResolver())


async def post_webhook(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    body: bytes,
    timeout_s: float,
) -> str | None:
    """One attempt: None on a 2xx answer, else a short reason (never raises for
    the network's failures). Redirects are not followed: a 3xx is a failure."""
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            if 200 <= response.status < 300:
                return None
            return f"HTTP {response.status}"
    except TimeoutError:
        return f"timeout after {timeout_s:g} s"
    except aiohttp.ClientConnectorError as error:
        return _short(_connect_failure(error))
    except aiohttp.ClientError as error:
        return _short(f"{type(error).__name__}: {error}")
    except (OSError, ValueError) as error:
        return _short(f"{type(error).__name__}: {error}")


def _connect_failure(error: aiohttp.ClientConnectorError) -> str:
    """Why no connection was made, in a few words."""
    cause = error.os_error
    if isinstance(cause, RefusedAddress):
        return str(cause)
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return f"{error.host} does not resolve"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if cause.errno is not None:
        return f"connection failed: {os.strerror(cause.errno).lower()}"
    return f"connection failed: {cause}"


def _short(text: str) -> str:
    return text if len(text) <= ERROR_CHARS_MAX else text[: ERROR_CHARS_MAX - 1] + "…"
