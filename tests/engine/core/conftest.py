"""Fixtures for the pure core: a shard on a manual clock and a few policies."""

import itertools
from collections.abc import Callable
from typing import Any

import pytest

from engine.core import protocol as p
from engine.core.clock import ManualClock
from engine.core.policy import DomainPolicy
from engine.core.routing import make_slot_id
from engine.core.shard import ShardCore
from tests.support import domain
from tests.support.domain import HOUR_MS, MINUTE_MS

START_MS = 1_800_000_000_000


def policy(name: str = "default", **overrides: Any) -> DomainPolicy:
    """``tests.support.domain.policy`` with the core tests' tighter defaults: offers
    last a minute, three may wait in a queue."""
    return domain.policy(name, **{"claim_ttl_ms": MINUTE_MS, "queue_size_max": 3, **overrides})


class Harness:
    """A one-shard core and shorthand for its commands, on a manual clock."""

    def __init__(self, policies: dict[str, DomainPolicy]) -> None:
        self.clock = ManualClock(START_MS)
        counter = itertools.count(1)
        self.core = ShardCore(
            shard_id=0,
            shard_count=1,
            policies=policies,
            now_ms=START_MS,
            new_unique=lambda: f"{next(counter):08d}",
        )
        self._request_ids = itertools.count(1)

    def run(self, command_type: Callable[..., p.AnyCommand], **fields: Any) -> Any:
        fields.setdefault("request_id", f"req-{next(self._request_ids)}")
        result = self.core.execute(command_type(**fields), self.clock.now_ms())
        self.core.check_invariants(self.clock.now_ms())
        return result

    def advance(self, delta_ms: int) -> None:
        self.core.advance(self.clock.advance_ms(delta_ms))
        self.core.check_invariants(self.clock.now_ms())

    def slot(
        self,
        *,
        resource: str = "dr-smith",
        capacity: int = 1,
        starts_in_ms: int = 2 * HOUR_MS,
        length_ms: int = 30 * MINUTE_MS,
        domain: str = "default",
        **fields: Any,
    ) -> str:
        slot_id = make_slot_id(resource, f"{next(self._request_ids):06d}")
        result = self.run(
            p.CreateSlot,
            slot_id=slot_id,
            resource_id=resource,
            domain=domain,
            start_ms=self.clock.now_ms() + starts_in_ms,
            end_ms=self.clock.now_ms() + starts_in_ms + length_ms,
            capacity=capacity,
            **fields,
        )
        assert result.status == 201, result
        return slot_id

    def view(self, slot_id: str) -> Any:
        return self.run(p.GetSlot, slot_id=slot_id).slot

    def reserve(self, slot_id: str, user: str, **fields: Any) -> Any:
        return self.run(p.Reserve, slot_id=slot_id, user_id=user, **fields)

    def confirm(self, booking_id: str, user: str) -> Any:
        return self.run(p.Confirm, booking_id=booking_id, user_id=user)

    def cancel(self, booking_id: str, user: str, **fields: Any) -> Any:
        return self.run(p.Cancel, booking_id=booking_id, user_id=user, **fields)

    def join(self, slot_id: str, user: str) -> Any:
        return self.run(p.JoinQueue, slot_id=slot_id, user_id=user)

    def leave(self, slot_id: str, user: str) -> Any:
        return self.run(p.LeaveQueue, slot_id=slot_id, user_id=user)

    def position(self, slot_id: str, user: str) -> Any:
        return self.run(p.QueuePosition, slot_id=slot_id, user_id=user)

    def booking(self, booking_id: str, user: str = "", as_admin: bool = True) -> Any:
        return self.run(p.GetBooking, booking_id=booking_id, user_id=user, as_admin=as_admin)


@pytest.fixture
def h() -> Harness:
    return Harness(
        {
            "default": policy(),
            "medical": policy(
                "medical", cancel_allowed_until_ms=24 * HOUR_MS, refund_percentage=50
            ),
            "noqueue": policy("noqueue", queue_enabled=False),
            "nearby": policy("nearby", advance_booking_ms=24 * HOUR_MS),
        }
    )
