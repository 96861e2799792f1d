"""A delivery worker of the bench's own: a ``slotengine notify`` process beside the server.

The notification scenarios run one so that it can be stopped while a backlog
builds (``notify``), or so that its CPU is counted apart from the server's
(``mixed --notify-process``: as if it ran on another machine).

It must never outlive the scenario: it is stopped (SIGTERM, then SIGKILL) on leaving.
"""

import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from bench._http import wait_answering
from bench._receivers import free_port

WORKER_START_TIMEOUT_S = 60.0
WORKER_STOP_TIMEOUT_S = 20.0


@contextlib.asynccontextmanager
async def delivery_worker(
    env: dict[str, str], log_path: Path
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A ``slotengine notify`` process of its own, once it serves its metrics (it is
    running), stopped (SIGTERM) on leaving."""
    port = free_port()
    with log_path.open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "notify", "--metrics-port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await wait_answering(
            f"http://127.0.0.1:{port}/metrics", worker, WORKER_START_TIMEOUT_S,
            "the delivery worker", log_path,
        )  # fmt: skip
        yield worker
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
