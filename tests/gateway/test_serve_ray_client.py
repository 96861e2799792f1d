"""``slotengine serve --engine ray`` from a host that is no Ray node: RAY_ADDRESS in
Ray Client's form (``ray://head:10001``), as the compose stack's gateways use it."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from tests.gateway.test_serve import ROOT, Served
from tests.support.ray_head import RayHead, client_proxy_failed, running_head

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A Ray cluster already running on the machine (``ray start --head``)."""
    yield from running_head()


async def test_serve_reserves_through_ray_client(
    database_url: str, tmp_path: Path, ray_head: RayHead
) -> None:
    served = Served(database_url, tmp_path)
    served.env.update(ray_head.ray_env)
    served.env["RAY_ADDRESS"] = ray_head.client_address
    log_path = tmp_path / "serve.log"

    def start_serve() -> subprocess.Popen[str]:
        with log_path.open("w") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "serve", "--engine", "ray",
                 "--port", str(served.port)],
                cwd=ROOT, env=served.env, stdout=log, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
            )  # fmt: skip

    served.process = start_serve()
    restarts = 1  # only after Ray's client proxy failed (client_proxy_failed), as compose does
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    try:
        admin, user = served.token("root", "admin"), served.token("ann")
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(180):
                while True:
                    if (
                        served.process.poll() is not None
                        and restarts > 0
                        and client_proxy_failed(log_path.read_text(errors="replace"))
                    ):
                        restarts -= 1
                        served.process = start_serve()
                    assert served.process.poll() is None, log_path.read_text()[-3000:]
                    try:
                        async with session.get(f"{served.base}/api/slots") as probe:
                            if probe.status == 401:
                                break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.5)
            async with session.post(
                f"{served.base}/api/admin/slots",
                json={"resourceId": "dr-who", "startTime": start.isoformat(),
                      "endTime": (start + timedelta(hours=1)).isoformat(), "capacity": 1},
                headers={"Authorization": f"Bearer {admin}"},
            ) as created:  # fmt: skip
                assert created.status == 201, await created.text()
                slot = await created.json()
            async with session.post(
                f"{served.base}/api/bookings/reserve",
                json={"slotId": slot["id"]},
                headers={"Authorization": f"Bearer {user}"},
            ) as reserved:
                assert reserved.status == 201, await reserved.text()
                assert (await reserved.json())["booking"]["status"] == "RESERVED"
            async with session.get(f"{served.base}/health") as health:
                report = await health.json()
                assert health.status == 200, report
                assert report["components"]["engine"] == "up"
        # The shard actors live in the head's cluster, not in a Ray of the gateway's.
        names = ray_head.actor_names()
        assert len([name for name in names if "-shard-" in name]) == 2, names
    finally:
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(served.process.pid, signal.SIGKILL)
            served.process.wait()
    output = log_path.read_text(errors="replace")
    assert served.process.returncode == 0, output[-3000:]
    assert "SIGTERM received" in output, output[-3000:]
