"""The limits of each layer: each defined once, their relations checked at import.

Every layer's limits module (``engine/core/limits.py``, ``engine/shell/limits.py``,
``persistence/limits.py``) runs ``check`` on its own names when imported; here
each relation is shown to hold for the values shipped and to be refused once
one of its values is moved past it.
"""

import re
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

from config import settings
from engine.core import limits as core_limits
from engine.core.limits import LimitRelationBroken, require_relation
from engine.shell import limits as shell_limits
from gateway import handling
from persistence import checks
from persistence import limits as storage_limits

LAYERS = (core_limits, shell_limits, storage_limits)


def _own_limits(module: ModuleType) -> set[str]:
    """The limits a module defines itself (not those it imports to relate to)."""
    annotations: dict[str, Any] = vars(module).get("__annotations__", {})
    return {name for name in annotations if name.isupper() and not name.startswith("_")}


@pytest.mark.parametrize("module", LAYERS, ids=lambda m: m.__name__)
def test_the_shipped_limits_keep_every_relation(module: ModuleType) -> None:
    module.check(vars(module))


def test_each_limit_has_one_home() -> None:
    homes = [_own_limits(module) for module in (*LAYERS, handling, settings)]
    names = [name for home in homes for name in home]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert "LEASE_TTL_MS" in _own_limits(storage_limits)
    assert {"REDIS_CALL_TIMEOUT_MS", "RETRY_AFTER_S"} <= _own_limits(shell_limits)
    assert {"SHARDS_DEFAULT", "SHARDS_MAX"} <= _own_limits(settings)
    assert "LIST_LIMIT_DEFAULT" in _own_limits(handling)


@pytest.mark.parametrize(
    ("module", "name", "value", "named"),
    [
        (core_limits, "HOLD_TTL_DEFAULT_S", 0, "HOLD_TTL_DEFAULT_S within"),
        (core_limits, "HOLD_TTL_MAX_S", 60, "HOLD_TTL_DEFAULT_S within"),
        (core_limits, "CLAIM_TTL_DEFAULT_S", 86_401, "CLAIM_TTL_DEFAULT_S within"),
        (core_limits, "QUEUE_SIZE_DEFAULT", 100_001, "QUEUE_SIZE_DEFAULT within"),
        (core_limits, "QUEUE_INACTIVITY_DEFAULT_S", 0, "QUEUE_INACTIVITY_DEFAULT_S within"),
        (core_limits, "ADVANCE_BOOKING_DAYS_MAX", 30, "ADVANCE_BOOKING_DAYS_DEFAULT within"),
        (core_limits, "IDEMPOTENCY_KEY_CHARS_MAX", 300, "COMMAND_TEXT_CHARS_MAX >="),
        (core_limits, "ID_CHARS_MAX", 251, "COMMAND_TEXT_CHARS_MAX >="),
        (core_limits, "COMMAND_TEXT_CHARS_MAX", 400, "btree index row"),
        (core_limits, "TIMER_WHEEL_BUCKETS", 48, "power of two"),
        (shell_limits, "LEASE_DRIFT_MARGIN_MS", 0, "0 < LEASE_DRIFT_MARGIN_MS"),
        (shell_limits, "REDIS_CALL_TIMEOUT_MS", 2_000, "REDIS_CALL_TIMEOUT_MS < LEASE_RENEW"),
        (shell_limits, "LEASE_RENEW_EVERY_MS", 7_000, "+ 2 * REDIS_CALL_TIMEOUT_MS <"),
        (shell_limits, "LEASE_DRIFT_MARGIN_MS", 7_000, "+ 2 * REDIS_CALL_TIMEOUT_MS <"),
        (shell_limits, "LEASE_TTL_MS", 4_000, "+ 2 * REDIS_CALL_TIMEOUT_MS <"),
        (shell_limits, "LEASE_ACQUIRE_TIMEOUT_MS", 5_000, "LEASE_ACQUIRE_TIMEOUT_MS >"),
        (shell_limits, "REBUILD_RETRY_MS", 0, "0 < REBUILD_RETRY_MS <= REBUILD_RETRY_MAX_MS"),
        (shell_limits, "REBUILD_RETRY_MAX_MS", 100, "0 < REBUILD_RETRY_MS <= REBUILD_RETRY_MAX"),
        (shell_limits, "SHARD_UNAVAILABLE_PATIENCE_MS", 30_000, "< ACTOR_CALL_TIMEOUT_MS"),
        (shell_limits, "BATCH_RETRY_BACKOFF_MS", 1_000, "is resent at least once"),
        (shell_limits, "BATCH_RETRIES_MAX", 0, "is resent at least once"),
        (shell_limits, "BATCH_RETRIES_MAX", 4, "the count of resends"),
        (shell_limits, "ACTOR_CALL_TIMEOUT_MS", 600_000, "REQUEST_OUTCOMES_RETENTION_MS >"),
        (shell_limits, "ACTOR_START_TIMEOUT_MS", 60_000, "a start outlasts a shard's load"),
        (shell_limits, "REQUEST_OUTCOMES_RETENTION_MS", 30_000, "REQUEST_OUTCOMES_RETENTION_MS"),
        (shell_limits, "PARTIAL_BATCHES_IN_FLIGHT_MAX", 0, "would never leave"),
        (shell_limits, "PARTIAL_BATCHES_IN_FLIGHT_MAX", 5, "would never leave"),
        (shell_limits, "SHARD_PENDING_CALLS_MAX", 3, "<= SHARD_PENDING_CALLS_MAX"),
        (shell_limits, "PENDING_COMMANDS_PER_SHARD_MAX", 1_000, "fill every batch"),
        (shell_limits, "BUSY_BACKOFF_FIRST_MS", 0, "BUSY_BACKOFF_FIRST_MS"),
        (shell_limits, "BUSY_BACKOFF_MAX_MS", 1, "BUSY_BACKOFF_FIRST_MS"),
        (storage_limits, "WRITER_FLUSH_EVENTS_MAX", 60_000, "WRITER_FLUSH_EVENTS_MAX <="),
        (storage_limits, "WRITER_FLUSH_TIMEOUT_MS", 3_000, "WRITER_FLUSH_TIMEOUT_MS <="),
    ],
)
def test_a_value_past_a_relation_is_refused(
    module: ModuleType, name: str, value: int, named: str
) -> None:
    assert name in vars(module)
    with pytest.raises(LimitRelationBroken, match=f"^limits: .*{re.escape(named)}"):
        module.check({**vars(module), name: value})


def test_the_relations_checked_beside_their_code_hold() -> None:
    assert 1 <= handling.LIST_LIMIT_DEFAULT <= core_limits.LIST_LIMIT_MAX
    assert checks.HOLD_GRACE_DEFAULT_MS > (
        storage_limits.LEASE_TTL_MS + storage_limits.WRITER_FLUSH_TIMEOUT_MS + 1_000
    )


def test_a_broken_relation_is_refused_even_under_python_o() -> None:
    require_relation(True, "holds")
    with pytest.raises(LimitRelationBroken, match=r"^limits: why$"):
        require_relation(False, "why")
    # -O strips ``assert`` statements; the check must not depend on them.
    result = subprocess.run(
        [
            sys.executable,
            "-O",
            "-c",
            "from engine.core.limits import require_relation; require_relation(False, 'why')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "LimitRelationBroken: limits: why" in result.stderr
