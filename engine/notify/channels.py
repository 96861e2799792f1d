"""The delivery channels: a signed webhook POST, an email over SMTP.

Each sends one claimed delivery and answers None when it was received, else
why not in a few words (a delivery's ``last_error``): never an exception for
what a receiver did, never a secret or an address in the answer.

It must never decide whether to retry (the worker does) nor cache a secret or
an address longer than a second: an endpoint deleted or a contact erased
stops being used within that.
"""

import asyncio
import itertools
import time
from typing import Any, Final

import asyncpg
import msgspec

from engine.notify.http_client import WebhookClient
from engine.notify.mail import Mailer, MailError, Templates, compose
from engine.notify.webhooks import webhook_headers
from persistence.contacts import contact_emails
from persistence.deliveries import ClaimedDelivery
from persistence.sealing import KeyRing
from persistence.webhooks import EndpointTarget, endpoint_secrets

# A receiver answers a webhook within this, or the attempt fails.
WEBHOOK_TIMEOUT_S: Final = 10.0
# Endpoints (their URLs and secrets) are read again at most this often.
ENDPOINTS_FRESH_S: Final = 1.0
# Webhook connections kept open at once, over all endpoints.
WEBHOOK_CONNECTIONS_MAX: Final = 256
# SMTP connections of one worker, each sending one message at a time.
SMTP_CONNECTIONS: Final = 8

_decode = msgspec.json.Decoder().decode


class WebhookChannel:
    """POSTs a delivery's body to its endpoint, signed per Standard Webhooks."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        ring: KeyRing,
        *,
        allow_private: bool,
        timeout_s: float = WEBHOOK_TIMEOUT_S,
    ) -> None:
        self._pool = pool
        self._ring = ring
        self._timeout_s = timeout_s
        self._client = WebhookClient(
            allow_private=allow_private, connections_max=WEBHOOK_CONNECTIONS_MAX
        )
        self._endpoints: dict[str, EndpointTarget] = {}
        self._read_at = -ENDPOINTS_FRESH_S
        self._reading: asyncio.Lock = asyncio.Lock()

    async def _endpoint(self, endpoint_id: str) -> EndpointTarget | None:
        if time.monotonic() - self._read_at >= ENDPOINTS_FRESH_S:
            async with self._reading:
                if time.monotonic() - self._read_at >= ENDPOINTS_FRESH_S:
                    async with self._pool.acquire() as connection:
                        targets = await endpoint_secrets(connection, self._ring)
                    self._endpoints = {target.id: target for target in targets}
                    self._read_at = time.monotonic()
        return self._endpoints.get(endpoint_id)

    async def prepare(self, deliveries: list[ClaimedDelivery]) -> None:
        await self._endpoint("")  # read the endpoints once for the round, if stale

    async def send(self, delivery: ClaimedDelivery) -> str | None:
        assert delivery.endpoint_id is not None
        endpoint = await self._endpoint(delivery.endpoint_id)
        if endpoint is None:
            return "the endpoint was deleted"
        headers = webhook_headers(
            endpoint.secret, delivery.event_id, int(time.time()), delivery.body
        )
        return await self._client.post(endpoint.url, headers, delivery.body, self._timeout_s)

    async def close(self) -> None:
        await self._client.close()


class EmailChannel:
    """Renders a delivery's facts with the domain's templates and sends it over SMTP,
    on a few connections at once (each SMTP connection is one conversation)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        ring: KeyRing,
        smtp_url: str,
        mail_from: str,
        templates: Templates,
        *,
        connections: int = SMTP_CONNECTIONS,
        timeout_s: float = WEBHOOK_TIMEOUT_S,
    ) -> None:
        self._pool = pool
        self._ring = ring
        self._mail_from = mail_from
        self._mailers = [
            Mailer(smtp_url, mail_from, timeout_s=timeout_s) for _ in range(connections)
        ]
        self._next = itertools.cycle(self._mailers)
        self._templates = templates
        # Delivery id -> the address ``prepare`` read for it (None: none), until sent.
        self._addresses: dict[str, str | None] = {}

    async def prepare(self, deliveries: list[ClaimedDelivery]) -> None:
        """Read the round's addresses in one query (kept for this round only)."""
        users = sorted({d.user_id for d in deliveries if d.user_id is not None})
        async with self._pool.acquire() as connection:
            found = await contact_emails(connection, self._ring, users)
        for delivery in deliveries:
            if delivery.user_id is not None:
                self._addresses[delivery.id] = found.get(delivery.user_id)

    async def send(self, delivery: ClaimedDelivery) -> str | None:
        assert delivery.user_id is not None
        if delivery.id in self._addresses:
            address = self._addresses.pop(delivery.id)
        else:
            async with self._pool.acquire() as connection:
                found = await contact_emails(connection, self._ring, [delivery.user_id])
            address = found.get(delivery.user_id)
        if address is None:
            return "the user has no contact address (erased)"
        facts: dict[str, Any] = _decode(delivery.body)
        message = compose(
            self._templates,
            domain=facts["domain"],
            event_type=facts["type"],
            data=facts["data"],
            slot=facts.get("slot"),
            to=address,
            mail_from=self._mail_from,
            # Receivers and support staff find the event (the webhook-id) by it.
            headers={"X-Slotengine-Event-Id": delivery.event_id},
        )
        if message is None:
            return None  # nothing to say for this event: done
        try:
            await next(self._next).send_raw(address, message)
        except MailError as error:
            return str(error)
        return None

    async def close(self) -> None:
        for mailer in self._mailers:
            await mailer.close()
