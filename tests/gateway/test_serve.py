"""``slotengine serve`` and ``slotengine token`` as an operator runs them."""

import asyncio
import contextlib
import multiprocessing
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.core.routing import PARTITIONS_DEFAULT
from gateway.server import stop_workers
from persistence.sealing import DATA_KEYS_FILE
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
ANN_EMAIL = "ann@example.com"

OUTBOX_KEYS = {"undispatchedEvents", "oldestAgeMs", "dueDeliveries", "deadDeliveries"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _slotengine(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# The series each shard actor reports on /metrics, one per shard (owner_state: per state).
ACTOR_SERIES = (
    "engine_shard_in_flight_commands",
    "engine_shard_owner_state",
    "engine_shard_lease_valid_seconds",
    "engine_shard_fence_token",
    "engine_shard_rebuilds_total",
    "engine_shard_partitions",
    "engine_shard_pending_events",
    "engine_shard_flush_lag_seconds",
)


async def _check_shard_actor_facts(session: aiohttp.ClientSession, base: str) -> None:
    """/health has a line per shard actor and /metrics the same facts, labelled by
    shard only; a quiet engine has nothing in flight and no flush lag."""
    async with session.get(f"{base}/health") as health:
        report = await health.json()
        assert health.status == 200, report
    shards = report["shards"]
    assert [line["shard"] for line in shards] == [0, 1], shards
    for line in shards:
        assert (line["up"], line["state"], line["inFlight"], line["flushLagMs"]) == (
            True, "serving", 0, 0,
        ), line  # fmt: skip
        assert line["token"] > 0 and line["leaseValidMs"] > 0, line
    # Every partition of a new database, served: each shard its half.
    assert [line["partitions"] for line in shards] == [PARTITIONS_DEFAULT // 2] * 2, shards
    async with session.get(f"{base}/metrics") as metrics:
        assert metrics.status == 200
        text = await metrics.text()
    samples = [
        sample for family in text_string_to_metric_families(text) for sample in family.samples
    ]
    for name in ACTOR_SERIES:
        found = [sample for sample in samples if sample.name == name]
        assert {sample.labels["shard"] for sample in found} == {"0", "1"}, name
        extra = {"state"} if name == "engine_shard_owner_state" else set()
        assert all(set(sample.labels) == {"shard", *extra} for sample in found), name
        if name in ("engine_shard_in_flight_commands", "engine_shard_flush_lag_seconds"):
            assert all(sample.value == 0 for sample in found), found
    serving = [
        sample.labels["shard"]
        for sample in samples
        if sample.name == "engine_shard_owner_state"
        and sample.labels["state"] == "serving"
        and sample.value == 1
    ]
    assert sorted(serving) == ["0", "1"]


class Served:
    """``slotengine serve --engine inproc`` in a subprocess, on a fresh database."""

    def __init__(self, database_url: str, data_dir: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": REDIS_URL,
            "SLOTENGINE_DATA_DIR": str(data_dir),
            "SLOTENGINE_SHARDS": "2",
        }
        self.env.pop("SLOTENGINE_JWT_SECRET", None)
        self.process: subprocess.Popen[str] | None = None
        self.output = ""

    def token(self, sub: str, role: str = "user") -> str:
        return _slotengine("token", "--sub", sub, "--role", role, env=self.env).stdout.strip()

    async def __aenter__(self) -> "Served":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--engine", "inproc",
             "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        async with aiohttp.ClientSession() as session, asyncio.timeout(60):
            while True:
                try:
                    async with session.get(f"{self.base}/api/slots") as probe:
                        if probe.status == 401:
                            return self
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.2)

    def start_inproc_workers(self, log_path: Path, workers: int = 2) -> None:
        """``serve --engine inproc --workers N`` in a session of its own, its output in a file."""
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "serve", "--engine", "inproc",
                 "--workers", str(workers), "--port", str(self.port)],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
            )  # fmt: skip

    async def __aexit__(self, *_: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        self.output, _ = self.process.communicate(timeout=30)


async def test_serve_answers_tokens_from_slotengine_token_and_stops_on_sigint(
    database_url: str, redis_namespace: str, tmp_path: Path
) -> None:
    served = Served(database_url, tmp_path)
    async with served:
        admin, user = served.token("root", "admin"), served.token("ann")
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{served.base}/api/admin/slots",
                json={
                    "resourceId": "dr-smith",
                    "startTime": "2031-01-01T09:00:00+01:00",
                    "endTime": "2031-01-01T10:00:00+01:00",
                    "capacity": 2,
                },
                headers={"Authorization": f"Bearer {admin}"},
            ) as created:
                assert created.status == 201
                slot = await created.json()
            assert slot["startTime"] == "2031-01-01T08:00:00Z"
            async with session.get(
                f"{served.base}/api/slots/{slot['id']}",
                headers={"Authorization": f"Bearer {user}"},
            ) as read:
                assert read.status == 200
            async with session.get(f"{served.base}/health") as health:
                report = await health.json()
                assert health.status == 200, report
                assert len(report.pop("shards")) == 2
                # A slot was created: its event waits in the outbox or was dispatched.
                outbox = report.pop("outbox")
                assert set(outbox) == OUTBOX_KEYS and outbox["deadDeliveries"] == 0
                assert report == {
                    "status": "healthy",
                    "components": {"database": "up", "redis": "up", "engine": "up", "queue": "up"},
                }
            await _check_shard_actor_facts(session, served.base)
            async with session.get(f"{served.base}/metrics") as metrics:
                text = await metrics.text()
                assert 'endpoint="/api/admin/slots"' in text
                assert "booking_expirations_total" in text
            # The contact routes: the gateway's own database pool and data keys.
            contact = f"{served.base}/api/me/contact"
            ann = {"Authorization": f"Bearer {user}"}
            async with session.put(contact, json={"email": ANN_EMAIL}, headers=ann) as put:
                assert put.status == 200, await put.text()
            async with session.get(contact, headers=ann) as got:
                assert got.status == 200 and (await got.json())["email"] == ANN_EMAIL
    assert served.process is not None and served.process.returncode == 0, served.output[-2000:]
    assert (tmp_path / "jwt_secret").exists()
    # No SLOTENGINE_DATA_KEY: a key was made in the data dir, for its owner alone.
    assert stat.S_IMODE((tmp_path / DATA_KEYS_FILE).stat().st_mode) == 0o600
    assert "generated a data key" in served.output and ANN_EMAIL not in served.output


def test_serve_refuses_bad_settings_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "SLOTENGINE_SHARDS": "zero", "SLOTENGINE_DATA_DIR": str(tmp_path)}
    done = _slotengine("serve", "--engine", "inproc", env=env)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "SLOTENGINE_SHARDS" in done.stderr
    none = _slotengine("serve", "--engine", "inproc", "--workers", "0", env=os.environ.copy())
    assert none.returncode == 2 and "--workers" in none.stderr


def test_serve_refuses_a_bad_data_key_with_one_line_naming_it(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SLOTENGINE_DATA_KEY": "k1:dG9vLXNob3J0",
        "SLOTENGINE_DATA_DIR": str(tmp_path),
        "SLOTENGINE_JWT_SECRET": "s" * 32,
    }
    done = _slotengine("serve", "--engine", "inproc", "--port", "0", env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "SLOTENGINE_DATA_KEY" in done.stderr
    assert "dG9vLXNob3J0" not in done.stderr
    (tmp_path / DATA_KEYS_FILE).write_text("garbage\n")
    (tmp_path / DATA_KEYS_FILE).chmod(0o600)
    env.pop("SLOTENGINE_DATA_KEY")
    done = _slotengine("serve", "--engine", "inproc", "--port", "0", env=env)
    assert done.returncode == 2 and str(tmp_path / DATA_KEYS_FILE) in done.stderr


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


# What a shell does to a job it starts in the background: SIGINT ignored, which
# the program it runs inherits (exec keeps ignored signals ignored).
AS_A_BACKGROUND_JOB = [
    sys.executable, "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN);"
    " os.execv(sys.argv[1], sys.argv[1:])",
]  # fmt: skip


@pytest.mark.ray
@pytest.mark.parametrize(
    ("stop_signal", "started"),
    [(signal.SIGINT, AS_A_BACKGROUND_JOB), (signal.SIGTERM, [])],
    ids=["SIGINT-in-background", "SIGTERM"],
)
async def test_serve_with_two_workers_shares_the_port_and_the_shard_actors(
    database_url: str, tmp_path: Path, stop_signal: signal.Signals, started: list[str]
) -> None:
    served = Served(database_url, tmp_path)
    served.env.pop("RAY_ADDRESS", None)
    # Output to a file, not a pipe: the local Ray the parent starts inherits its
    # output, and a pipe would stay open for as long as any Ray process lives.
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        served.process = subprocess.Popen(
            [*started, sys.executable, "-m", "engine.cli", "serve", "--workers", "2",
             "--port", str(served.port)],
            cwd=ROOT, env=served.env, stdout=log, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
    try:
        admin, user = served.token("root", "admin"), served.token("ann")
        # A new connection per request: the kernel spreads them over both workers.
        fresh = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=fresh) as session:
            async with asyncio.timeout(180):
                ready = 0
                while ready < 2:  # two answers in a row: serving
                    try:
                        async with session.get(f"{served.base}/api/slots") as probe:
                            ready = ready + 1 if probe.status == 401 else 0
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.5)
            workers = _children(served.process.pid)
            assert len(workers) >= 2, workers
            async with session.post(
                f"{served.base}/api/admin/slots",
                json={"resourceId": "dr-who", "startTime": "2031-01-01T09:00:00Z",
                      "endTime": "2031-01-01T10:00:00Z", "capacity": 1},
                headers={"Authorization": f"Bearer {admin}"},
            ) as created:  # fmt: skip
                assert created.status == 201, await created.text()
                slot = await created.json()
            # Every worker sees the slot: they share the shard actors.
            for _ in range(20):
                async with session.get(
                    f"{served.base}/api/slots/{slot['id']}",
                    headers={"Authorization": f"Bearer {user}"},
                ) as read:
                    assert read.status == 200
            # The shard actors' own facts, asked through a worker.
            await _check_shard_actor_facts(session, served.base)
    finally:
        _stop_cleanly(served, stop_signal, log_path)


def _stop_cleanly(served: Served, stop_signal: signal.Signals, log_path: Path) -> None:
    """Send ``stop_signal``; serve must say so and exit 0 within a minute."""
    assert served.process is not None
    served.process.send_signal(stop_signal)
    try:
        stopped = True
        served.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stopped = False
    finally:
        # Whatever is left of the run (its workers, its engine, its local Ray) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(served.process.pid, signal.SIGKILL)
        served.process.wait()
    served.output = log_path.read_text(errors="replace")
    assert stopped, f"serve did not stop on {stop_signal.name}:\n{served.output[-6000:]}"
    assert served.process.returncode == 0, served.output[-3000:]
    assert f"{stop_signal.name} received: stopping" in served.output, served.output[-3000:]
    assert "SIGTERM received at" not in served.output  # Ray's handler: a stack dump, then abort


@pytest.mark.parametrize(
    ("engine", "workers", "stop_signal", "started"),
    [
        pytest.param("ray", 1, signal.SIGTERM, [], marks=pytest.mark.ray, id="ray-SIGTERM"),
        pytest.param(
            "ray", 1, signal.SIGINT, AS_A_BACKGROUND_JOB, marks=pytest.mark.ray,
            id="ray-SIGINT-in-background",
        ),
        pytest.param("inproc", 1, signal.SIGTERM, [], id="inproc-SIGTERM"),
        pytest.param("inproc", 2, signal.SIGINT, [], id="inproc-engine-process-SIGINT"),
    ],
)  # fmt: skip
async def test_serve_stops_gracefully_on_sigterm_and_sigint_with_every_engine(
    database_url: str,
    tmp_path: Path,
    engine: str,
    workers: int,
    stop_signal: signal.Signals,
    started: list[str],
) -> None:
    """Each engine drains and stops as its normal shutdown does: one line naming the
    signal, exit status 0 (the Ray engine's own handler used to abort it: exit 15)."""
    served = Served(database_url, tmp_path)
    served.env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        served.process = subprocess.Popen(
            [*started, sys.executable, "-m", "engine.cli", "serve", "--engine", engine,
             "--workers", str(workers), "--port", str(served.port)],
            cwd=ROOT, env=served.env, stdout=log, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(180):
            while True:
                try:
                    async with session.get(f"{served.base}/api/slots") as probe:
                        if probe.status == 401:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.5)
    finally:
        _stop_cleanly(served, stop_signal, log_path)


async def test_inproc_workers_share_one_engine_process_which_is_restarted_when_it_dies(
    database_url: str, tmp_path: Path
) -> None:
    served = Served(database_url, tmp_path)
    served.env["SLOTENGINE_LOG_LEVEL"] = "info"
    log_path = tmp_path / "serve.log"
    served.start_inproc_workers(log_path)

    def engine_pids() -> list[int]:
        return [
            int(pid) for pid in re.findall(r"engine process (\d+) serves", log_path.read_text())
        ]

    try:
        admin, user = served.token("root", "admin"), served.token("ann")
        bearer = {"Authorization": f"Bearer {user}"}
        # A new connection per request: the kernel spreads them over both workers.
        fresh = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=fresh) as session:
            async with asyncio.timeout(120):
                ready = 0
                while ready < 4:  # four answers in a row: both workers serving
                    try:
                        async with session.get(f"{served.base}/api/slots", headers=bearer) as probe:
                            ready = ready + 1 if probe.status == 200 else 0
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.3)
            # Two workers and the engine process (beside multiprocessing's resource tracker).
            spawned = [
                pid
                for pid in _children(served.process.pid)
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
            assert len(spawned) == 3, spawned
            # Within the default domain's booking window (365 days).
            start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
            async with session.post(
                f"{served.base}/api/admin/slots",
                json={"resourceId": "dr-no", "startTime": start.isoformat(),
                      "endTime": (start + timedelta(hours=1)).isoformat(), "capacity": 1},
                headers={"Authorization": f"Bearer {admin}"},
            ) as created:  # fmt: skip
                assert created.status == 201, await created.text()
                slot = await created.json()
            async with session.post(
                f"{served.base}/api/bookings/reserve", json={"slotId": slot["id"]}, headers=bearer
            ) as reserved:
                assert reserved.status == 201
                held = (await reserved.json())["booking"]
            # Every worker reads the same hold: one engine owns the shards.
            for _ in range(10):
                async with session.get(
                    f"{served.base}/api/bookings/{held['id']}", headers=bearer
                ) as read:
                    assert read.status == 200 and (await read.json())["status"] == "RESERVED"

            # The engine process dies: the workers answer 503 at once (within about
            # a second, with a retry hint) until its replacement has reloaded the
            # shards, then the hold is back.
            (first,) = engine_pids()
            os.kill(first, signal.SIGKILL)
            statuses: set[int] = set()
            async with asyncio.timeout(120):
                while True:
                    asked = time.monotonic()
                    async with session.get(
                        f"{served.base}/api/bookings/{held['id']}", headers=bearer
                    ) as read:
                        assert time.monotonic() - asked < 3.0, "an answer waited out the outage"
                        statuses.add(read.status)
                        if read.status == 200:
                            assert (await read.json())["status"] == "RESERVED"
                            break
                        assert read.status == 503, await read.text()
                        assert read.headers["Retry-After"] == "1"
                    await asyncio.sleep(0.2)
            assert 503 in statuses
            assert len(engine_pids()) == 2 and engine_pids()[1] != first
            async with session.get(f"{served.base}/health") as health:
                assert health.status == 200, await health.text()
            # The engine process's shards, through the socket.
            await _check_shard_actor_facts(session, served.base)
    finally:
        _stop_cleanly(served, signal.SIGTERM, log_path)
    # The engine socket's directory goes with the engine.
    (socket_path,) = set(re.findall(r"serves the shards on (\S+?engine\.sock)", served.output))
    assert not Path(socket_path).parent.exists()


# How long a spawned worker may take to start on a slow, loaded machine: it is
# waited for by its own word, and this only bounds a worker that never starts.
WORKER_START_DEADLINE_S = 120.0


def _stubborn(ready: Any) -> None:
    """A worker whose shutdown hangs: it ignores SIGTERM, then says it is ready."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(600)


def _obliging(ready: Any) -> None:
    ready.set()
    time.sleep(600)


def test_stopping_workers_kills_one_that_hangs_and_waits_for_no_one_longer() -> None:
    context = multiprocessing.get_context("spawn")
    ready = [context.Event(), context.Event()]
    workers = [
        context.Process(target=_stubborn, args=(ready[0],)),
        context.Process(target=_obliging, args=(ready[1],)),
    ]
    for worker in workers:
        worker.start()
    try:
        # Stopped only once both run their targets (the stubborn one ignoring SIGTERM):
        # a fixed pause was too short on a loaded machine, and SIGTERM then found it
        # still starting.
        for started in ready:
            assert started.wait(WORKER_START_DEADLINE_S), "a worker did not start"
        stop_workers(workers, timeout_s=1.0)
        assert [worker.is_alive() for worker in workers] == [False, False]
        assert workers[0].exitcode == -signal.SIGKILL
        assert workers[1].exitcode == -signal.SIGTERM
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
