"""The HTTP scenarios, run small from the command line as a load-tester runs them:
each starts its own server, checks the database afterwards and ends with one JSON
object. Figures are reported, never asserted (the machine is shared); counts and
the database check are."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATABASE_URL, REDIS_URL

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str, tmp_path: Path) -> dict[str, Any]:
    env = {**os.environ, "DATABASE_URL": DATABASE_URL, "REDIS_URL": REDIS_URL,
           "SLOTENGINE_DATA_DIR": str(tmp_path), "TMPDIR": str(tmp_path)}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--engine", "inproc", "--shards", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_a_small_storm_gets_exactly_its_places_and_the_database_agrees(tmp_path: Path) -> None:
    result = _bench("storm", "--users", "150", "--capacity", "10", "--rounds", "2",
                    tmp_path=tmp_path)  # fmt: skip
    assert (result["holds"], result["queued"], result["queue_full"]) == (10, 100, 40)
    assert all(r["as_expected"] and r["queue_places_exact"] for r in result["rounds"])
    assert result["errors"] == 0 and result["checked"]
    assert result["invariant_violations"] == 0 and result["lost_acks"] == 0
    assert result["acknowledged_bookings"] == 20


@pytest.mark.slow
def test_a_small_fan_out_reaches_every_subscriber(tmp_path: Path) -> None:
    result = _bench("ws", "--subscribers", "300", "--queued", "20", "--changes", "2",
                    tmp_path=tmp_path)  # fmt: skip
    assert result["subscribers"] == 300 and result["failed_connects"] == 0
    assert [c["reached"] for c in result["changes"]] == [299, 298]
    assert result["missed"] == 0 and result["gateway_rss_mb"] > 0


@pytest.mark.slow
def test_a_short_mixed_run_answers_every_operation_and_loses_nothing(tmp_path: Path) -> None:
    report = tmp_path / "report"
    result = _bench("mixed", "--rate", "300", "--seconds", "3", "--warmup-seconds", "0.5",
                    "--slots", "50", "--users", "500", "--report", str(report),
                    tmp_path=tmp_path)  # fmt: skip
    assert result["errors"] == 0 and result["checked"]
    assert result["invariant_violations"] == 0 and result["lost_acks"] == 0
    assert result["acknowledged_bookings"] > 0
    assert {"reserve", "confirm", "cancel"} <= set(result["operations"])
    assert result["throughput_rps"] > 0
    lag = result["loadgen_send_lag_ms"]
    assert 0 <= lag["p50"] <= lag["p99"] <= lag["max"]
    # The report: a Markdown summary naming every operation, and its two plots.
    summary = (report / "mixed.md").read_text()
    assert all(f"| {op} |" in summary for op in result["operations"])
    for plot in ("mixed-latency.png", "mixed-throughput.png"):
        assert (report / plot).read_bytes().startswith(b"\x89PNG") and f"]({plot})" in summary


def test_the_open_loop_climbs_to_its_rate_over_the_warmup_then_holds_it() -> None:
    from bench.mixed import scheduled_at, sent_by

    rate, warmup_s = 5_000.0, 4.0
    # The ramp sends half of what the full rate would, and nothing at first.
    assert sent_by(0.0, rate, warmup_s) == 0
    assert sent_by(warmup_s, rate, warmup_s) == int(rate * warmup_s / 2)
    assert sent_by(warmup_s / 2, rate, warmup_s) == int(rate * warmup_s / 8)
    # After it, exactly ``rate`` a second.
    assert sent_by(warmup_s + 10, rate, warmup_s) - sent_by(warmup_s, rate, warmup_s) == 50_000
    # Each request is due when the count reaches it: the schedule is the count's inverse.
    times = [scheduled_at(k, rate, warmup_s) for k in range(0, 60_000, 7)]
    assert times == sorted(times) and times[0] == 0.0
    for k, at in zip(range(0, 60_000, 7), times, strict=True):
        assert sent_by(at + 1e-6, rate, warmup_s) >= k >= sent_by(at - 1e-6, rate, warmup_s) - 1
    # No warm-up: the full rate from the first request.
    assert scheduled_at(10, rate, 0.0) == pytest.approx(10 / rate)
    assert sent_by(1.0, rate, 0.0) == 5_000


def test_mixed_starts_by_default_the_configuration_that_serves_its_target_rate() -> None:
    from argparse import ArgumentParser

    from bench import mixed, storm

    defaults = ArgumentParser()
    mixed.add_arguments(defaults)
    args = defaults.parse_args([])
    assert (args.engine, args.workers, args.rate) == ("inproc", 2, 5_000)
    assert defaults.parse_args(["--engine", "ray", "--workers", "1"]).workers == 1

    others = ArgumentParser()
    storm.add_arguments(others)
    assert (others.parse_args([]).engine, others.parse_args([]).workers) == ("ray", 1)


def test_a_started_server_has_the_shards_its_engine_does_best_with_unless_told() -> None:
    from argparse import Namespace

    from bench._http import shard_count

    assert shard_count(Namespace(shards=None, engine="inproc")) == 1
    assert shard_count(Namespace(shards=None, engine="ray")) == 4
    assert shard_count(Namespace(shards=3, engine="inproc")) == 3
    # mixed's own: on two cores one shard actor does best (more split its batches).
    from argparse import ArgumentParser

    from bench import mixed

    parser = ArgumentParser()
    mixed.add_arguments(parser)
    assert shard_count(parser.parse_args(["--engine", "ray"])) == 1
    assert shard_count(parser.parse_args(["--engine", "ray", "--shards", "4"])) == 4


async def test_the_load_generator_keeps_a_bounded_pool_and_serves_waiters_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from bench import mixed
    from bench._http import Target

    monkeypatch.setattr(mixed, "CONNECTIONS_MAX", 2)
    load = mixed.Mixed(Target("http://127.0.0.1:9", "s" * 32, None), ["slot"], [], seed=1)
    first, second = await load._connection(), await load._connection()
    assert first is not second and load.open_connections == 2
    # The pool is full: later requests wait, first come first served.
    third = asyncio.ensure_future(load._connection())
    fourth = asyncio.ensure_future(load._connection())
    await asyncio.sleep(0)
    assert not third.done() and not fourth.done()
    load._give_back(second)
    assert await third is second and not fourth.done()
    load._give_back(first)
    assert await fourth is first
    # Given back with nobody waiting, a connection is kept for the next request.
    load._give_back(first)
    assert await load._connection() is first and load.open_connections == 2
