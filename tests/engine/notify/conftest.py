"""The notification tests' webhook receiver, as a fixture."""

from collections.abc import AsyncIterator

import pytest

from tests.support.receivers import Receiver, running_receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async for got in running_receiver():
        yield got
