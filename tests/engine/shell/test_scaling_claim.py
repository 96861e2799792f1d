"""One scale or rebalance of a deployment at a time: the claim in Redis (real Redis).

``slotengine cluster scale``, ``cluster rebalance`` and the automatic rebalance
all move partitions and actors; two at once would interleave their steps. Each
holds ``RedisKeys.rebalance_claim`` while it runs, and one that finds it held
refuses in one line before it touches the cluster or the database.
"""

import pytest
import redis.asyncio as aioredis

from config.redis_keys import RedisKeys
from engine.shell.owner import StorageSettings
from engine.shell.scaling import RebalanceBusy, rebalance_claim, rebalance_cluster, scale
from tests.conftest import REDIS_URL
from tests.support.domain import POLICIES

# Nothing listens here: a run that got past the claim would fail on it instead.
NO_DATABASE_URL = "postgresql://postgres@127.0.0.1:1/none"


async def test_a_second_scale_or_rebalance_is_refused_while_one_runs(
    redis_namespace: str,
) -> None:
    storage = StorageSettings(
        database_url=NO_DATABASE_URL, redis_url=REDIS_URL, namespace=redis_namespace
    )
    claim = RedisKeys(redis_namespace).rebalance_claim
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        async with rebalance_claim(storage):
            assert await client.pttl(claim) > 0  # lapses by itself if its holder dies
            with pytest.raises(RebalanceBusy, match="another scale or rebalance") as busy:
                await scale(shard_count=2, policies=POLICIES, storage=storage, name_prefix="none")
            assert "\n" not in str(busy.value)
            with pytest.raises(RebalanceBusy):
                await rebalance_cluster(policies=POLICIES, storage=storage, name_prefix="none")
        # Released at the end: the next one gets past the claim (and fails on the
        # database that is not there, not on the claim).
        assert await client.exists(claim) == 0
        with pytest.raises(OSError):
            await scale(shard_count=2, policies=POLICIES, storage=storage, name_prefix="none")
        assert await client.exists(claim) == 0
    finally:
        await client.aclose()
