"""Shared helpers of the storage tests: owners, batches, and reading rows back."""

import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from engine.core.clock import Clock
from engine.core.policy import DomainPolicy
from engine.core.protocol import AnyCommand, AnyResult, BatchCodec, CreateSlot
from engine.core.routing import make_slot_id, shard_of
from engine.shell.clock import SystemClock
from engine.shell.owner import ShardOwner, StorageSettings
from tests.persistence.conftest import REDIS_URL
from tests.support.domain import HOUR_MS, SHORT_HOLD_MS, policy

_ids = itertools.count(1)


def policies(**overrides: Any) -> dict[str, DomainPolicy]:
    return {"default": policy(**overrides), "short": policy("short", hold_ttl_ms=SHORT_HOLD_MS)}


def storage(database_url: str, namespace: str, **overrides: Any) -> StorageSettings:
    return StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=namespace, **overrides
    )


def request_id() -> str:
    return f"rq-{next(_ids)}"


def slot_on(shard: int, shard_count: int, resource: str = "room") -> str:
    for n in itertools.count():
        slot_id = make_slot_id(f"{resource}-{n}", f"{next(_ids):x}")
        if shard_of(slot_id, shard_count) == shard:
            return slot_id
    raise AssertionError("unreachable")


def create_slot(slot_id: str, now_ms: int, capacity: int = 2, **fields: Any) -> CreateSlot:
    return CreateSlot(
        request_id=request_id(),
        slot_id=slot_id,
        resource_id=fields.pop("resource_id", f"res-{slot_id}"),
        domain=fields.pop("domain", "default"),
        start_ms=fields.pop("start_ms", now_ms + 2 * HOUR_MS),
        end_ms=fields.pop("end_ms", now_ms + 3 * HOUR_MS),
        capacity=capacity,
        **fields,
    )


class Driver:
    """Sends batches to an owner the way the coalescer does: encoded bytes."""

    def __init__(self, owner: ShardOwner) -> None:
        self.owner = owner
        self.codec = BatchCodec()

    async def run(self, *commands: AnyCommand) -> list[AnyResult]:
        reply = await self.owner.execute_batch(self.codec.encode_batch(list(commands)))
        return self.codec.decode_reply(reply)

    async def one(self, command: AnyCommand) -> AnyResult:
        return (await self.run(command))[0]


def make_owner(
    database_url: str,
    namespace: str,
    *,
    shard: int = 0,
    shard_count: int = 1,
    owner: str | None = None,
    succeeds: str = "",
    before_flush: Callable[[], Awaitable[None]] | None = None,
    fence_check: bool = True,
    hold_ttl_ms: int | None = None,
    domains: dict[str, DomainPolicy] | None = None,
    clock: Clock | None = None,
    **settings: Any,
) -> ShardOwner:
    """An owner of ``shard`` with the ``default`` and ``short`` domains, and ``domains``
    added or replacing them; on the system clock unless ``clock`` is given."""
    overrides = {} if hold_ttl_ms is None else {"hold_ttl_ms": hold_ttl_ms}
    return ShardOwner(
        shard_id=shard,
        shard_count=shard_count,
        policies={**policies(**overrides), **(domains or {})},
        clock=SystemClock() if clock is None else clock,
        storage=storage(database_url, namespace, **settings),
        owner=owner,
        succeeds=succeeds,
        before_flush=before_flush,
        fence_check=fence_check,
    )


async def booking_row(db: asyncpg.Connection, booking_id: str) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM bookings WHERE id = $1", booking_id)
