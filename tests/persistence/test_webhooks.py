"""persistence/webhooks.py on a real PostgreSQL: endpoints with sealed secrets,
soft deletion ending their deliveries, deliveries listed by pages, sent again."""

from collections.abc import AsyncIterator

import asyncpg
import pytest

from engine.notify.webhooks import new_secret
from persistence import webhooks as stored
from persistence.sealing import KeyRing, SealingError, new_key, webhook_secret_purpose
from tests.support.deliveries import delivery_row, insert_delivery

NOW = 1_800_000_000_000


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as created:
        yield created


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing([new_key("k1")])


async def test_an_endpoint_is_stored_with_its_secret_sealed(
    pool: asyncpg.Pool, ring: KeyRing
) -> None:
    secret = new_secret()
    endpoint = await stored.create_endpoint(
        pool, ring, "https://hooks.example.com/a", ["booking.confirmed"], secret, NOW
    )
    assert endpoint.id.startswith("we_")
    assert endpoint.events == ("booking.confirmed",)
    sealed = await pool.fetchval("SELECT secret FROM webhook_endpoints WHERE id = $1", endpoint.id)
    assert secret.encode() not in sealed
    assert secret.removeprefix("whsec_").encode() not in sealed
    assert ring.open(sealed, webhook_secret_purpose(endpoint.id)) == secret.encode()
    with pytest.raises(SealingError):  # sealed for this endpoint only
        ring.open(sealed, webhook_secret_purpose("we_other"))
    async with pool.acquire() as connection:
        (target,) = await stored.endpoint_secrets(connection, ring)
    assert (target.id, target.url, target.events, target.secret) == (
        endpoint.id, "https://hooks.example.com/a", ("booking.confirmed",), secret,
    )  # fmt: skip
    assert secret not in repr(target)
    assert await stored.list_endpoints(pool) == [endpoint]


async def test_a_deleted_endpoint_is_gone_and_its_due_deliveries_are_dead(
    pool: asyncpg.Pool, ring: KeyRing
) -> None:
    kept = await stored.create_endpoint(pool, ring, "https://a.example/", ["*"], new_secret(), NOW)
    gone = await stored.create_endpoint(
        pool, ring, "https://b.example/", ["*"], new_secret(), NOW + 1
    )
    due = {
        status: await insert_delivery(pool, gone.id, created_at_ms=NOW, status=status)
        for status in ("pending", "failed", "delivered", "dead")
    }
    other = await insert_delivery(pool, kept.id, created_at_ms=NOW)
    assert await stored.delete_endpoint(pool, gone.id, NOW + 5)
    assert not await stored.delete_endpoint(pool, gone.id, NOW + 6)
    assert not await stored.delete_endpoint(pool, "we_unknown", NOW + 6)
    assert await stored.list_endpoints(pool) == [kept]
    assert not await stored.endpoint_exists(pool, gone.id)
    assert await stored.endpoint_exists(pool, kept.id)
    async with pool.acquire() as connection:
        assert [t.id for t in await stored.endpoint_secrets(connection, ring)] == [kept.id]
    assert (
        await pool.fetchval("SELECT deleted_at_ms FROM webhook_endpoints WHERE id = $1", gone.id)
        == NOW + 5
    )
    for status in ("pending", "failed"):
        row = await delivery_row(pool, due[status])
        assert (row["status"], row["last_error"]) == ("dead", "endpoint deleted")
    assert (await delivery_row(pool, due["delivered"]))["status"] == "delivered"
    assert (await delivery_row(pool, due["dead"]))["last_error"] is None
    assert (await delivery_row(pool, other))["status"] == "pending"


async def test_deliveries_are_listed_newest_first_in_pages_without_loss(
    pool: asyncpg.Pool, ring: KeyRing
) -> None:
    endpoint = await stored.create_endpoint(
        pool, ring, "https://a.example/", ["*"], new_secret(), NOW
    )
    other = await stored.create_endpoint(pool, ring, "https://b.example/", ["*"], new_secret(), NOW)
    # Seven deliveries, three of them created in the same millisecond.
    times = [NOW, NOW + 1, NOW + 1, NOW + 1, NOW + 2, NOW + 3, NOW + 4]
    statuses = ["failed", "pending", "failed", "delivered", "failed", "dead", "pending"]
    ids = [
        await insert_delivery(pool, endpoint.id, created_at_ms=at, status=status)
        for at, status in zip(times, statuses, strict=True)
    ]
    await insert_delivery(pool, other.id, created_at_ms=NOW + 9)
    await insert_delivery(pool, None, created_at_ms=NOW + 9, channel="email")
    expected = [i for _, i in sorted(zip(times, ids, strict=True), reverse=True)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        items, cursor = await stored.list_deliveries(pool, endpoint.id, None, cursor, 2)
        pages += 1
        assert len(items) <= 2
        seen += [d.id for d in items]
        if cursor is None:
            break
    assert seen == expected
    assert pages == 4

    failed, cursor = await stored.list_deliveries(pool, endpoint.id, "failed", None, 50)
    assert cursor is None
    assert [d.id for d in failed] == [i for i in expected if i in {ids[0], ids[2], ids[4]}]
    assert {d.status for d in failed} == {"failed"}
    first, cursor = await stored.list_deliveries(pool, endpoint.id, "failed", None, 1)
    assert cursor is not None
    rest, last = await stored.list_deliveries(pool, endpoint.id, "failed", cursor, 5)
    assert [d.id for d in first + rest] == [d.id for d in failed]
    assert last is None
    # A page exactly as long as what is left says so: no empty page after it.
    all_seven, cursor = await stored.list_deliveries(pool, endpoint.id, None, None, 7)
    assert len(all_seven) == 7
    assert cursor is None


async def test_any_cursor_is_a_position_even_one_no_id_can_have(
    pool: asyncpg.Pool, ring: KeyRing
) -> None:
    endpoint = await stored.create_endpoint(
        pool, ring, "https://a.example/", ["*"], new_secret(), NOW
    )
    for delivery_id in ("dlv_a", "dlv_b", "dlv_c"):
        await insert_delivery(pool, endpoint.id, created_at_ms=NOW, id=delivery_id)
    for cursor, expected in (
        (f"{NOW}.dlv_b", ["dlv_a"]),
        (f"{NOW}.dlv_b\x00x", ["dlv_b", "dlv_a"]),
        (f"{NOW}.dlv_b\ud800", ["dlv_b", "dlv_a"]),
        (f"{NOW}.\x00", []),
        (f"{NOW + 1}.\x00", ["dlv_c", "dlv_b", "dlv_a"]),
        ("-5.", []),
        (f"{NOW}.zzz", ["dlv_c", "dlv_b", "dlv_a"]),
    ):
        items, _ = await stored.list_deliveries(pool, endpoint.id, None, cursor, 10)
        assert [d.id for d in items] == expected, cursor
    with pytest.raises(ValueError):
        await stored.list_deliveries(pool, endpoint.id, None, "12", 10)


async def test_redelivery_makes_a_delivery_pending_and_due_from_its_first_attempt(
    pool: asyncpg.Pool, ring: KeyRing
) -> None:
    endpoint = await stored.create_endpoint(
        pool, ring, "https://a.example/", ["*"], new_secret(), NOW
    )
    delivery_id = await insert_delivery(
        pool, endpoint.id, created_at_ms=NOW, status="dead", attempts=8,
        last_error="HTTP 500", lease_until_ms=NOW + 30_000, delivered_at_ms=None,
    )  # fmt: skip
    assert await stored.redeliver(pool, delivery_id, NOW + 100)
    row = await delivery_row(pool, delivery_id)
    assert (row["status"], row["attempts"], row["next_attempt_ms"], row["lease_until_ms"]) == (
        "pending", 0, NOW + 100, None,
    )  # fmt: skip
    assert not await stored.redeliver(pool, "dlv_unknown", NOW)
    assert await stored.delete_endpoint(pool, endpoint.id, NOW + 200)
    assert not await stored.redeliver(pool, delivery_id, NOW + 300)
    assert (await delivery_row(pool, delivery_id))["status"] == "dead"
