"""A database of a bench run's own: created on the configured (or embedded) server,
named after the run, and dropped at its end unless it is to be kept.

It must never be handed a database it did not create for the run:
``drop_database`` drops what it is given (``WITH (FORCE)``).
"""

from typing import Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg

BENCH_DATABASE_PREFIX: Final = "slotengine_bench_"


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def create_run_database(server_url: str, run_name: str) -> str:
    """A fresh, empty database for the run on ``server_url``'s server; its URL."""
    database = BENCH_DATABASE_PREFIX + run_name.replace("-", "_")
    admin = await asyncpg.connect(with_database(server_url, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    return with_database(server_url, database)


async def drop_database(url: str) -> None:
    database = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(with_database(url, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()
