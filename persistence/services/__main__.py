"""The service commands CI runs (``.ci/run``), from the installed package.

Each command prints what it did on stderr and, where the caller needs one, a
URL on stdout; the exit status says whether it worked.

    python -m persistence.services port-open HOST PORT
    python -m persistence.services pg-ready URL       # creates the URL's database if missing
    python -m persistence.services redis-ready URL
    python -m persistence.services pg-embedded DIR    # prints a DATABASE_URL
    python -m persistence.services redis-embedded DIR # prints a REDIS_URL
    python -m persistence.services stop-embedded DATA_DIR  # DATA_DIR/postgres, DATA_DIR/redis

``pg-embedded DATA_DIR/postgres`` and ``redis-embedded DATA_DIR/redis``
start (or reuse) the embedded servers the engine starts without URLs, with
CI's settings (database ``test``; Redis on 6379 if free, without
persistence). Owns nothing but this command line:
it must never start or stop a server other than through the package.
"""

import asyncio
import sys
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urlsplit

from persistence.services import stop_services
from persistence.services.postgres import postgres_ready, start_postgres, with_database
from persistence.services.process import EmbeddedServiceError, port_open
from persistence.services.redis import redis_ready, start_redis

CI_DATABASE: Final = "test"
CI_REDIS_PORT: Final = 6379


def _say(message: str) -> None:
    print(f"    {message}", file=sys.stderr, flush=True)


def _pg_ready(url: str) -> bool:
    if not urlsplit(url).path.lstrip("/"):
        url = with_database(url, CI_DATABASE)
    try:
        version, created = asyncio.run(postgres_ready(url))
    except Exception as error:
        _say(f"PostgreSQL does not answer: {type(error).__name__}: {error}")
        return False
    database = unquote(urlsplit(url).path.lstrip("/"))
    if created:
        _say(f"created database {database!r}")
    _say(f"PostgreSQL {version} answers, database {database!r}")
    return True


def _redis_ready(url: str) -> bool:
    try:
        version = redis_ready(url)
    except Exception as error:
        _say(f"Redis does not answer: {type(error).__name__}: {error}")
        return False
    _say(f"Redis {version} answers")
    return True


def _pg_embedded(directory: Path) -> str:
    try:
        url = start_postgres(directory, CI_DATABASE)
    except EmbeddedServiceError as error:
        raise SystemExit(str(error)) from None
    if not _pg_ready(url):
        raise SystemExit("the embedded PostgreSQL started but does not answer")
    return url


def _redis_embedded(directory: Path) -> str:
    try:
        # No persistence: CI's Redis holds nothing worth keeping across runs.
        url = start_redis(directory, preferred_port=CI_REDIS_PORT, appendonly=False)
    except EmbeddedServiceError as error:
        raise SystemExit(str(error)) from None
    _say(f"embedded Redis at {url}, data in {directory}")
    if not _redis_ready(url):
        raise SystemExit(f"the embedded Redis does not answer; see {directory / 'redis.log'}")
    return url


def _stop_embedded(data_dir: Path) -> bool:
    try:
        stopped = stop_services(data_dir)
    except EmbeddedServiceError as error:
        _say(str(error))
        return False
    for name in stopped:
        _say(f"stopped the embedded {name} in {data_dir}")
    if not stopped:
        _say(f"nothing to stop: no embedded service runs in {data_dir}")
    return True


def main(argv: list[str]) -> int:
    match argv:
        case ["port-open", host, port]:
            return 0 if port_open(host, int(port)) else 1
        case ["pg-ready", url]:
            return 0 if _pg_ready(url) else 1
        case ["redis-ready", url]:
            return 0 if _redis_ready(url) else 1
        case ["pg-embedded", directory]:
            print(_pg_embedded(Path(directory).resolve()))
            return 0
        case ["redis-embedded", directory]:
            print(_redis_embedded(Path(directory).resolve()))
            return 0
        case ["stop-embedded", data_dir]:
            return 0 if _stop_embedded(Path(data_dir).resolve()) else 1
        case _:
            print(__doc__, file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
