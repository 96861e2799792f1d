"""Webhook endpoints and their deliveries as the admin API and the delivery workers see them.

It owns the rows of ``webhook_endpoints`` (registered, listed, soft-deleted)
and what an admin may do to ``deliveries``: list an endpoint's, newest first,
and send one again. An endpoint's signing secret is sealed with the data key
ring (``persistence.sealing``, for ``webhook_secret_purpose``) before it is
stored, and opened only for the workers (``endpoint_secrets``).

It never validates a URL or an event type (the gateway does, before calling),
never makes a delivery (the workers do) and must never log or return a secret
but through ``create_endpoint``'s caller and ``endpoint_secrets``.
"""

import secrets
from typing import Final, Literal

import asyncpg
import msgspec

from persistence.sealing import KeyRing, webhook_secret_purpose

ENDPOINT_ID_PREFIX: Final = "we_"
# An endpoint id's random part: 128 bits, in hex.
ENDPOINT_ID_BYTES: Final = 16
DeliveryStatus = Literal["pending", "delivered", "failed", "dead"]
DELIVERY_STATUSES: Final[tuple[DeliveryStatus, ...]] = ("pending", "delivered", "failed", "dead")
# The last_error of the deliveries an endpoint's deletion ends.
ENDPOINT_DELETED: Final = "endpoint deleted"


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    url: str
    # Event types, or ("*",) for all of them.
    events: tuple[str, ...]
    created_at_ms: int


class EndpointTarget(msgspec.Struct, frozen=True, kw_only=True):
    """An endpoint as a delivery worker needs it: with its secret opened."""

    id: str
    url: str
    events: tuple[str, ...]
    secret: str

    def __repr__(self) -> str:  # never the secret
        return f"EndpointTarget({self.id!r}, {self.url!r})"


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    event_id: str
    event_type: str
    channel: str
    status: DeliveryStatus
    attempts: int
    last_error: str | None
    next_attempt_ms: int
    created_at_ms: int
    delivered_at_ms: int | None


def new_endpoint_id() -> str:
    return ENDPOINT_ID_PREFIX + secrets.token_hex(ENDPOINT_ID_BYTES)


async def create_endpoint(
    pool: asyncpg.Pool,
    ring: KeyRing,
    url: str,
    events: list[str],
    secret: str,
    now_ms: int,
) -> Endpoint:
    """Register an endpoint; its secret is stored sealed, never in the clear."""
    endpoint_id = new_endpoint_id()
    sealed = ring.seal(secret.encode(), webhook_secret_purpose(endpoint_id))
    await pool.execute(
        "INSERT INTO webhook_endpoints (id, url, events, secret, created_at_ms)"
        " VALUES ($1, $2, $3, $4, $5)",
        endpoint_id,
        url,
        events,
        sealed,
        now_ms,
    )
    return Endpoint(id=endpoint_id, url=url, events=tuple(events), created_at_ms=now_ms)


async def list_endpoints(pool: asyncpg.Pool) -> list[Endpoint]:
    """Every endpoint not deleted, oldest first."""
    rows = await pool.fetch(
        "SELECT id, url, events, created_at_ms FROM webhook_endpoints"
        " WHERE deleted_at_ms IS NULL ORDER BY created_at_ms, id"
    )
    return [
        Endpoint(
            id=row["id"],
            url=row["url"],
            events=tuple(row["events"]),
            created_at_ms=row["created_at_ms"],
        )
        for row in rows
    ]


async def endpoint_exists(pool: asyncpg.Pool, endpoint_id: str) -> bool:
    """Whether an endpoint is registered and not deleted."""
    found = await pool.fetchval(
        "SELECT 1 FROM webhook_endpoints WHERE id = $1 AND deleted_at_ms IS NULL", endpoint_id
    )
    return found is not None


async def delete_endpoint(pool: asyncpg.Pool, endpoint_id: str, now_ms: int) -> bool:
    """Soft-delete an endpoint (False: unknown or deleted already).

    Its deliveries still due (pending or failed) become dead, with
    ``ENDPOINT_DELETED`` as their last error, in the same transaction: no
    worker sends anything to it afterwards.
    """
    async with pool.acquire() as connection, connection.transaction():
        deleted = await connection.fetchval(
            "UPDATE webhook_endpoints SET deleted_at_ms = $2"
            " WHERE id = $1 AND deleted_at_ms IS NULL RETURNING id",
            endpoint_id,
            now_ms,
        )
        if deleted is None:
            return False
        await connection.execute(
            "UPDATE deliveries SET status = 'dead', last_error = $2"
            " WHERE channel = 'webhook' AND endpoint_id = $1 AND status IN ('pending', 'failed')",
            endpoint_id,
            ENDPOINT_DELETED,
        )
    return True


async def endpoint_secrets(connection: asyncpg.Connection, ring: KeyRing) -> list[EndpointTarget]:
    """Every endpoint not deleted, with its secret opened (``SealingError`` when a
    secret does not open with the ring: a key dropped too early)."""
    rows = await connection.fetch(
        "SELECT id, url, events, secret FROM webhook_endpoints"
        " WHERE deleted_at_ms IS NULL ORDER BY created_at_ms, id"
    )
    return [
        EndpointTarget(
            id=row["id"],
            url=row["url"],
            events=tuple(row["events"]),
            secret=ring.open(row["secret"], webhook_secret_purpose(row["id"])).decode(),
        )
        for row in rows
    ]


def encode_cursor(delivery: Delivery) -> str:
    """The position after ``delivery``: ``<createdAtMs>.<id>``, as docs/api.md's cursors are."""
    return f"{delivery.created_at_ms}.{delivery.id}"


def decode_cursor(cursor: str) -> tuple[int, str, bool]:
    """A cursor's position: its sort key, its id and whether a delivery of that
    very id is after it; ``ValueError`` when it is not ``<integer>.<id>``.

    Any id is a position, even one no row can have: text PostgreSQL refuses
    (U+0000, a lone surrogate) is cut before its first such character, and a
    row of the id that is left comes after the position (``abc`` sorts before
    ``abc`` followed by anything).
    """
    order, dot, delivery_id = cursor.partition(".")
    if not dot:
        raise ValueError("a cursor is <integer>.<id>")
    cut = next((i for i, c in enumerate(delivery_id) if c == "\x00" or _surrogate(c)), None)
    if cut is None:
        return int(order), delivery_id, False
    return int(order), delivery_id[:cut], True


def _surrogate(char: str) -> bool:
    return "\ud800" <= char <= "\udfff"


_DELIVERY_COLUMNS: Final = (
    "id, event_id, event_type, channel, status, attempts, last_error, next_attempt_ms,"
    " created_at_ms, delivered_at_ms"
)


async def list_deliveries(
    pool: asyncpg.Pool,
    endpoint_id: str,
    status: DeliveryStatus | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[Delivery], str | None]:
    """An endpoint's deliveries, newest first (by creation, then id), ``limit`` at
    most, after ``cursor`` (none or empty: the first page), and the next page's
    cursor (None: this is the last page)."""
    position = decode_cursor(cursor) if cursor else None
    after = "<=" if position is not None and position[2] else "<"
    rows = await pool.fetch(
        f"SELECT {_DELIVERY_COLUMNS} FROM deliveries"
        " WHERE channel = 'webhook' AND endpoint_id = $1"
        " AND ($2::text IS NULL OR status = $2)"
        f" AND ($3::bigint IS NULL OR (created_at_ms, id) {after} ($3, $4::text))"
        " ORDER BY created_at_ms DESC, id DESC LIMIT $5",
        endpoint_id,
        status,
        None if position is None else position[0],
        None if position is None else position[1],
        limit + 1,
    )
    items = [Delivery(**dict(row)) for row in rows[:limit]]
    return items, encode_cursor(items[-1]) if len(rows) > limit else None


async def redeliver(pool: asyncpg.Pool, delivery_id: str, now_ms: int) -> bool:
    """Send a delivery again from its first attempt (False: unknown, or its
    webhook endpoint is deleted).

    Whatever its status, it becomes pending and due now, with no attempt made
    and no lease: a worker holding it under a lapsed lease finds its attempt
    number changed, and its late answer changes nothing.
    """
    updated = await pool.fetchval(
        "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_ms = $2,"
        " lease_until_ms = NULL, delivered_at_ms = NULL"
        " WHERE id = $1 AND (channel <> 'webhook' OR endpoint_id IN"
        " (SELECT id FROM webhook_endpoints WHERE deleted_at_ms IS NULL))"
        " RETURNING id",
        delivery_id,
        now_ms,
    )
    return updated is not None
