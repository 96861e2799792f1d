"""A Ray head started as an operator starts one (``ray start --head``), for tests
that attach to a running cluster the way a gateway or the demo does.

It owns one head: its own temporary directory (so its ``ray_current_cluster``
file is its own, never the machine's ``/tmp/ray``), its own ports, and its own
process group, which ``stop`` kills. It must never run ``ray stop`` or touch a
Ray it did not start: other clusters run on the same machine.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
STOP_WAIT_S = 10.0
# Ray's client proxy now and then fails to start the server it runs on the head
# for a new client (its log empty; seen with Ray 2.60 on a loaded machine), or
# trips over that server's exited process (psutil's ZombieProcess): the client is
# refused with one of these, and a second connect is served. The engine's code
# plays no part in it; the compose stack's gateways restart on such a failure.
CLIENT_SERVER_FAILED = "Starting Ray client server failed"
CLIENT_PROXY_FAILURES = (CLIENT_SERVER_FAILED, "psutil.ZombieProcess")


def client_proxy_failed(output: str) -> bool:
    """Whether a Ray client was refused by the head's client proxy, not by the engine."""
    return any(failure in output for failure in CLIENT_PROXY_FAILURES)


READY_WAIT_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RayHead:
    """``ray start --head`` with the Ray Client server on, in a session of its own.

    ``RAY_TMPDIR`` points into its own directory: a process given ``env`` and no
    address finds this head (``ray.init()``'s lookup of the latest cluster), as
    a process on a machine running one cluster would.
    """

    def __init__(self) -> None:
        # Short: Ray's Unix socket paths must fit in 107 bytes.
        self.tmpdir = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))
        self.gcs_port = free_port()
        self.client_port = free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.client_address = f"ray://127.0.0.1:{self.client_port}"
        # What a process needs to see this head as the machine's cluster (its own
        # settings, DATABASE_URL and the like, are the caller's).
        self.ray_env = {
            "RAY_TMPDIR": str(self.tmpdir),
            # Ray enables token auth when ~/.ray/auth_token exists; a client then needs
            # the token. The compose stack's containers have none: neither here.
            "RAY_AUTH_MODE": "disabled",
        }
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            **self.ray_env,
        }
        self.leader: subprocess.Popen[bytes] | None = None

    def start(self) -> "RayHead":
        self.leader = subprocess.Popen(
            [RAY, "start", "--head", "--node-ip-address=127.0.0.1",
             f"--port={self.gcs_port}", f"--ray-client-server-port={self.client_port}",
             "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={self.tmpdir / 'ray'}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        returncode = self.leader.wait(timeout=120)
        if returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start --head failed ({returncode})")
        # `ray start` may return before the client server listens.
        deadline = time.monotonic() + READY_WAIT_S
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.client_port), timeout=1),
            ):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the head's Ray Client server does not listen")
            time.sleep(0.2)

    def actor_names(self) -> list[str]:
        """The names of every actor (alive or dead) the head's GCS has seen."""
        script = (
            "import sys, ray, ray._private.state as s;"
            f" ray.init(address={self.gcs_address!r}, log_to_driver=False);"
            " print('\\n'.join(a.get('Name') or '' for a in s.actors().values()))"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
            timeout=120, check=True,
        )  # fmt: skip
        return [name for name in done.stdout.split() if name]

    def stop(self) -> None:
        """Kill the head's processes (its session, which ``ray start`` led), then its files."""
        if self.leader is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.leader.pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_WAIT_S
            while time.monotonic() < deadline and _group_alive(self.leader.pid):
                time.sleep(0.1)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def running_head() -> Iterator[RayHead]:
    """A fixture's body: a Ray cluster already running on the machine, stopped after."""
    head = RayHead().start()
    try:
        yield head
    finally:
        head.stop()
