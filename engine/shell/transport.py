"""The call surface every shard host offers: bytes in, bytes out, one shard at a time.

The in-process host and the Ray actors both implement ``ShardTransport``, so the
coalescer and every test run unchanged over either. A transport raises only
``engine.shell.errors`` exceptions; it never retries (the coalescer decides).
"""

from typing import Protocol

from engine.shell.runtime import RuntimeStatistics


class ShardTransport(Protocol):
    @property
    def shard_count(self) -> int: ...

    async def call_batch(self, shard: int, data: bytes, timeout_ms: int) -> bytes:
        """Send one encoded batch to ``shard`` and return its encoded reply."""
        ...

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics: ...

    async def check_invariants(self, shard: int, timeout_ms: int) -> None:
        """Raise ``ShardFailed`` if the shard's state breaks an invariant."""
        ...
