"""A live connection's ``Outbox``: its bounded queue of encoded messages.

It owns the order of a connection's messages and its overflow (a consumer
``OUTBOX_MESSAGES_MAX`` messages behind is cut off, never waited for). It
must never wait in ``put`` (the bus calls it for thousands of connections in
a row), never encode a message, and never import the bus, the watches or the
endpoints.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final

# Messages a connection may have waiting to be sent before it counts as too slow.
OUTBOX_MESSAGES_MAX: Final = 256


class Outbox:
    """A connection's bounded queue of encoded messages, sent in order by one task.

    ``put`` never waits: the bus calls it for thousands of connections in a row.
    """

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        messages_max: int = OUTBOX_MESSAGES_MAX,
    ) -> None:
        self._send = send
        self._messages_max = messages_max
        self._queue: list[bytes] = []
        self._wake = asyncio.Event()
        self.overflowed = False
        self.closed = False
        self.sent = 0

    def put(self, data: bytes) -> None:
        if self.closed:
            return
        if len(self._queue) >= self._messages_max:
            self.overflowed = True
            self.closed = True
        else:
            self._queue.append(data)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def run(self) -> None:
        """Send until closed or the peer is gone; returns after an overflow at once."""
        while True:
            if not self._queue:
                if self.closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.overflowed:
                return
            batch, self._queue = self._queue, []
            for data in batch:
                await self._send(data)
                self.sent += 1
