"""The call surface every shard host offers: bytes in, bytes out, one shard at a time.

The in-process host and the Ray actors both implement ``ShardTransport``, so the
coalescer and every test run unchanged over either. A transport raises only
``engine.shell.errors`` exceptions; it never retries (the coalescer decides).
"""

from collections.abc import Callable
from typing import Protocol

from engine.shell.runtime import RuntimeStatistics


class ShardTransport(Protocol):
    @property
    def shard_count(self) -> int: ...

    async def call_batch(
        self,
        shard: int,
        data: bytes,
        timeout_ms: int,
        on_early: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """Send one encoded batch to ``shard`` and return its encoded reply.

        ``on_early``, if the transport can, is called before the reply with
        answers that may leave ahead of it (``BatchCodec.decode_early``): the
        durable reads of a batch whose changes are still being committed. The
        reply carries every answer all the same; a transport may never call it.
        """
        ...

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics: ...

    async def check_invariants(self, shard: int, timeout_ms: int) -> None:
        """Raise ``ShardFailed`` if the shard's state breaks an invariant."""
        ...
