"""The storage tests' shared names (the fixtures live in ``tests/conftest.py``)."""

from tests.conftest import DATABASE_URL, REDIS_URL, with_database

__all__ = ["DATABASE_URL", "REDIS_URL", "with_database"]
