"""Delivery rows written as a delivery worker writes them (migration 0005's
``deliveries``), for tests of what reads and changes them."""

import secrets
from typing import Any

import asyncpg


async def insert_delivery(
    db: asyncpg.Pool | asyncpg.Connection,
    endpoint_id: str | None,
    *,
    created_at_ms: int,
    status: str = "pending",
    attempts: int = 0,
    channel: str = "webhook",
    event_type: str = "booking.confirmed",
    **columns: Any,
) -> str:
    """Insert one delivery; ``columns`` override the other columns. Returns its id."""
    row: dict[str, Any] = {
        "id": f"dlv_{secrets.token_hex(8)}",
        "event_id": f"evt_{secrets.token_hex(8)}",
        "event_type": event_type,
        "channel": channel,
        "endpoint_id": endpoint_id,
        "user_id": "ann" if channel == "email" else None,
        "subject": "booking:b1",
        "seq": 1,
        "body": b'{"type": "booking.confirmed"}',
        "status": status,
        "attempts": attempts,
        "next_attempt_ms": created_at_ms,
        "lease_until_ms": None,
        "last_error": None,
        "committed_ms": created_at_ms,
        "created_at_ms": created_at_ms,
        "delivered_at_ms": None,
        **columns,
    }
    names = ", ".join(row)
    places = ", ".join(f"${n}" for n in range(1, len(row) + 1))
    await db.execute(f"INSERT INTO deliveries ({names}) VALUES ({places})", *row.values())
    return str(row["id"])


async def delivery_row(db: asyncpg.Pool | asyncpg.Connection, delivery_id: str) -> dict[str, Any]:
    row = await db.fetchrow("SELECT * FROM deliveries WHERE id = $1", delivery_id)
    assert row is not None
    return dict(row)
