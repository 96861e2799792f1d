"""Fixtures for private, disposable PostgreSQL and Redis servers.

The servers are ``persistence.services``' ``PrivatePostgres`` and
``PrivateRedis``: starting, stopping, killing, freezing and restarting them is
that package's code; these fixtures only open and close them.

Import the ones a test module needs, or list them in a conftest::

    from tests.support.fixtures import private_postgres, private_redis

Each yields a started server and closes it (stopped at once, files deleted)
afterwards, whatever the test did to it. ``private_postgres`` and
``private_redis`` give every test a server of its own; the ``_module``
variants share one across a module (about a second saved per PostgreSQL):
a test that stops or pauses a shared server must leave it running.
"""

from collections.abc import Iterator

import pytest

from persistence.services import PrivatePostgres, PrivateRedis

__all__ = [
    "private_postgres",
    "private_postgres_module",
    "private_redis",
    "private_redis_module",
]


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL of this test's own; ``.url`` points at its ``postgres`` database."""
    with PrivatePostgres() as server:
        yield server


@pytest.fixture(scope="module")
def private_postgres_module() -> Iterator[PrivatePostgres]:
    """A PostgreSQL shared by the tests of one module."""
    with PrivatePostgres() as server:
        yield server


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A Redis of this test's own, with no persistence."""
    with PrivateRedis() as server:
        yield server


@pytest.fixture(scope="module")
def private_redis_module() -> Iterator[PrivateRedis]:
    """A Redis shared by the tests of one module."""
    with PrivateRedis() as server:
        yield server
