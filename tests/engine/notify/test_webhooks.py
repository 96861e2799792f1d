"""engine/notify/webhooks.py: signatures a Standard Webhooks receiver verifies,
the SSRF guard at registration and at connection, and one attempt against a
real HTTP server."""

import asyncio
import base64
import ipaddress
import json
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from engine.notify import webhooks as w
from engine.notify.http_client import WebhookClient

BODY = json.dumps({"type": "booking.confirmed", "data": {"id": "b1"}}).encode()


def test_a_new_secret_is_whsec_and_24_bytes_and_acceptable() -> None:
    secret = w.new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
    assert w.secret_problem(secret) is None
    assert w.new_secret() != secret


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "secret",
        base64.b64encode(bytes(32)).decode(),  # no prefix
        "whsec_",
        "whsec_not base64!",
        "whsec_" + base64.b64encode(bytes(23)).decode(),
        "whsec_" + base64.b64encode(bytes(65)).decode(),
    ],
)
def test_a_bad_client_secret_is_named(secret: str) -> None:
    assert w.secret_problem(secret) is not None


@pytest.mark.parametrize("size", [24, 32, 64])
def test_a_client_secret_of_24_to_64_bytes_is_taken(size: int) -> None:
    assert w.secret_problem("whsec_" + base64.b64encode(bytes(range(size))).decode()) is None


def test_the_signature_verifies_with_the_standard_webhooks_library() -> None:
    secret = w.new_secret()
    now = int(time.time())
    headers = w.webhook_headers(secret, "evt_1", now, BODY)
    assert headers["webhook-id"] == "evt_1"
    assert headers["webhook-timestamp"] == str(now)
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "slotengine"
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)


def test_a_tampered_body_another_id_or_another_secret_is_refused() -> None:
    secret = w.new_secret()
    headers = w.webhook_headers(secret, "evt_1", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"b1", b"b2"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, {**headers, "webhook-id": "evt_2"})
    with pytest.raises(WebhookVerificationError):
        Webhook(w.new_secret()).verify(BODY, headers)


def test_the_signature_is_the_specifications_example() -> None:
    """The example of the Standard Webhooks specification, byte for byte."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert (
        w.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/x",
        "gopher://example.com/",
        "example.com/hook",
        "http://",
        "https://user:pass@example.com/hook",
        "http://127.0.0.1/hook",
        "http://127.0.0.1:8080/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.1/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://[::1]/hook",
        "http://[::]/hook",
        "http://[fd00::1]/hook",
        "http://[fe80::1]/hook",
        "http://[fec0::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[::ffff:169.254.169.254]/hook",
        "http://localhost/hook",
        "http://localhost:1/hook",
    ],
)
async def test_a_url_the_guard_refuses(url: str) -> None:
    assert await w.url_problem(url, allow_private=False) is not None


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/hook", "https://[::1]/", "http://10.0.0.5/", "http://localhost/"]
)
async def test_private_addresses_are_allowed_when_the_operator_says_so(url: str) -> None:
    assert await w.url_problem(url, allow_private=False) is not None
    assert await w.url_problem(url, allow_private=True) is None


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://10.0.0.1/", "http://a:b@127.0.0.1/"])
async def test_schemes_and_credentials_are_refused_even_when_private_is_allowed(url: str) -> None:
    assert await w.url_problem(url, allow_private=True) is not None


@pytest.mark.parametrize("url", ["https://93.184.215.14/hook", "http://[2606:4700::1111]/"])
async def test_a_public_literal_address_is_taken(url: str) -> None:
    assert await w.url_problem(url, allow_private=False) is None


def test_refused_addresses() -> None:
    refused = [
        "127.0.0.1", "10.0.0.1", "169.254.169.254", "100.127.255.255", "::1", "fd12::1",
        "::ffff:10.0.0.1", "2002:7f00:1::", "64:ff9b::7f00:1", "255.255.255.255",
    ]  # fmt: skip
    for text in refused:
        assert w.address_refused(ipaddress.ip_address(text)), text
    for text in ["8.8.8.8", "93.184.215.14", "2606:4700::1111", "100.128.0.1"]:
        assert not w.address_refused(ipaddress.ip_address(text)), text


class Receiver:
    """A real HTTP server on 127.0.0.1: 200, 500, a slow answer, a redirect."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/ok", self.ok)
        app.router.add_post("/fail", self.fail)
        app.router.add_post("/slow", self.slow)
        app.router.add_post("/moved", self.moved)
        self.server = TestServer(app, host="127.0.0.1")

    async def ok(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    async def fail(self, request: web.Request) -> web.Response:
        return web.Response(status=500)

    async def slow(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return web.Response(status=200)

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    served = Receiver()
    await served.server.start_server()
    yield served
    served.release.set()
    await served.server.close()


@pytest.fixture
async def client() -> AsyncIterator[WebhookClient]:
    opened = WebhookClient(allow_private=True)
    yield opened
    await opened.close()


async def test_a_2xx_is_success_and_arrives_signed(
    receiver: Receiver, client: WebhookClient
) -> None:
    secret = w.new_secret()
    headers = w.webhook_headers(secret, "evt_9", int(time.time()), BODY)
    assert await client.post(receiver.url("/ok"), headers, BODY, 10) is None
    ((got_headers, got_body),) = receiver.received
    assert got_body == BODY
    assert Webhook(secret).verify(got_body, got_headers) == json.loads(BODY)


async def test_a_500_is_a_failed_attempt(receiver: Receiver, client: WebhookClient) -> None:
    assert await client.post(receiver.url("/fail"), {}, BODY, 10) == "HTTP 500"


async def test_a_redirect_is_not_followed(receiver: Receiver, client: WebhookClient) -> None:
    assert await client.post(receiver.url("/moved"), {}, BODY, 10) == "HTTP 302"
    assert receiver.received == []


async def test_no_answer_in_time_is_a_failed_attempt(
    receiver: Receiver, client: WebhookClient
) -> None:
    error = await client.post(receiver.url("/slow"), {}, BODY, 0.2)
    assert error == "timeout after 0.2 s"


async def test_a_closed_port_is_a_failed_attempt(receiver: Receiver, client: WebhookClient) -> None:
    url = receiver.url("/ok")
    await receiver.server.close()
    error = await client.post(url, {}, BODY, 10)
    assert error is not None
    assert error == "connection refused"


async def test_the_client_refuses_a_private_address_at_connect_time(
    receiver: Receiver,
) -> None:
    """A name that resolves to loopback (as a rebound one would) is refused when
    connecting, though the server is there; a literal loopback address too."""
    port = receiver.server.port
    guarded = WebhookClient(allow_private=False)
    for url in (f"http://localhost:{port}/ok", f"http://127.0.0.1:{port}/ok",
                f"http://[::ffff:127.0.0.1]:{port}/ok"):  # fmt: skip
        error = await guarded.post(url, {}, BODY, 10)
        assert error is not None, url
        assert error.startswith("refused:"), error
    assert guarded.open_connections == 0
    await guarded.close()
    assert receiver.received == []


async def test_a_host_that_does_not_resolve_is_a_failed_attempt(
    client: WebhookClient,
) -> None:
    error = await client.post("http://no-such-host.invalid/hook", {}, BODY, 10)
    assert error == "no-such-host.invalid does not resolve"
    assert await w.url_problem("http://no-such-host.invalid/", allow_private=False) is not None
