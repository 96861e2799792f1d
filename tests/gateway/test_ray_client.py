"""``slotengine serve`` attached to a Ray cluster through Ray Client (``RAY_ADDRESS=ray://``).

The address the Kubernetes gateways use (config/deploy/kubernetes/gateway.yaml):
a gateway pod is not a Ray node, so it reaches the head's Ray Client server.
Real Ray (a head of this test's own, with a Ray Client server), PostgreSQL
and Redis: the server starts its shard actors through Ray Client, answers
``/health`` with the engine up, and stops gracefully on SIGTERM.
"""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from persistence.migrate import deployment_namespace
from tests.conftest import REDIS_URL, forget_namespace

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
# Bounds on waits, not measurements: a first start creates the actors and loads.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def ray_client_address() -> Iterator[str]:
    """A Ray head of this test alone, with a Ray Client server; its actors go with it."""
    from ray.cluster_utils import Cluster

    port = _free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "ray_client_server_port": port, "include_dashboard": False},
    )
    try:
        yield f"ray://127.0.0.1:{port}"
    finally:
        cluster.shutdown()


def _health(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def _namespace(database_url: str) -> str:
    connection = await asyncpg.connect(database_url)
    try:
        return await deployment_namespace(connection)
    finally:
        await connection.close()


def test_serve_attaches_through_ray_client_and_stops_gracefully(
    ray_client_address: str, database_url: str, tmp_path: Path
) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_ADDRESS": ray_client_address,
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "SLOTENGINE_JWT_SECRET": "a-test-secret-of-at-least-32-bytes!",
        "SLOTENGINE_DATA_DIR": str(tmp_path),
        "SLOTENGINE_SHARDS": "2",
    }
    log = tmp_path / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", "--host", "127.0.0.1",
         "--port", str(port), "--engine", "ray"],
        env=env, cwd=tmp_path, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        health: tuple[int, dict[str, object]] | None = None
        while time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(OSError):  # not listening yet: the engine is starting
                health = _health(port)
            if health is not None and health[0] == 200:
                break
            time.sleep(0.5)
        assert health is not None and health[0] == 200, (health, log.read_text())
        assert health[1]["components"] == {
            "database": "up", "redis": "up", "engine": "up", "queue": "up"
        }  # fmt: skip
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=STOP_TIMEOUT_S)
        output = log.read_text()
        assert server.returncode == 0, output
        assert "SIGTERM received" in output
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        asyncio.run(forget_namespace(asyncio.run(_namespace(database_url))))
