"""Webhooks: Standard Webhooks signatures and the guard against server-side request forgery.

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
again at every connection (engine/notify/http_client.py), since a name may
resolve elsewhere by then (DNS rebinding).

It must never touch the database nor log a secret.
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


def literal_address(host: str) -> IPAddress | None:
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
    literal = literal_address(host)
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
    addresses = {literal_address(str(info[4][0])) for info in infos}
    if not addresses or any(a is None or address_refused(a) for a in addresses):
        return "its host resolves to a private, loopback or reserved address"
    return None
