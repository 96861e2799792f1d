"""An engine process of the chaos soak's own (``bench chaos --engine process``).

``python -m bench._engine_process SOCKET SHARDS STORAGE_JSON``: the shards as
``serve --engine inproc --workers N`` runs them, an ``OwnedInProcessHost`` in a
process of its own served on a Unix socket (``engine.shell.local_engine``), with
the storage settings the soak gives (its own PostgreSQL and Redis, short
leases). It serves until SIGTERM or SIGINT; the soak SIGKILLs it as a fault and
starts another on the same socket.

It must never be started on storage the soak does not own.
"""

import asyncio
import signal
import sys

import msgspec


async def serve(path: str, shards: int, storage_json: bytes) -> None:
    from config.domains import load_policies
    from config.settings import load_settings
    from engine.shell.inproc import OwnedInProcessHost
    from engine.shell.local_engine import serve_engine
    from engine.shell.owner import StorageSettings

    storage = msgspec.json.decode(storage_json, type=StorageSettings)
    policies = dict(load_policies(load_settings({})))
    host = OwnedInProcessHost(shard_count=shards, policies=policies, storage=storage)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stopping.set)
    await serve_engine(host, path, stopping.wait)


def main(argv: list[str]) -> int:
    path, shards, storage_json = argv
    asyncio.run(serve(path, int(shards), storage_json.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
