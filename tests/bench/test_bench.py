"""The bench dispatcher, and short end-to-end runs of the core, Ray and flush scenarios."""

import argparse
import json
import platform
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

import bench.__main__ as dispatcher

ROOT = Path(__file__).resolve().parents[2]


def test_the_ray_scenario_is_found() -> None:
    scenarios = dispatcher.discover_scenarios()

    assert "ray" in scenarios


def test_the_failover_scenario_is_found_with_its_options() -> None:
    # Its short run, on a cluster of several nodes, is tests/engine/shell/test_failover.py.
    scenarios = dispatcher.discover_scenarios()
    args = dispatcher.build_parser(scenarios).parse_args(["failover", "--loss=freeze"])

    assert args.scenario_module is scenarios["failover"]
    assert (args.loss, args.nodes, args.shards) == ("freeze", 2, 4)


def test_the_result_is_the_last_line_as_one_json_object(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = types.ModuleType("bench.echo", "Echo the arguments back.")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ops", type=int, default=1)

    def run(args: argparse.Namespace) -> dict[str, Any]:
        print("progress noise")
        return {"scenario": "echo", "ops": args.ops}

    scenario.add_arguments = add_arguments  # type: ignore[attr-defined]
    scenario.run = run  # type: ignore[attr-defined]
    monkeypatch.setattr(dispatcher, "discover_scenarios", lambda: {"echo": scenario})

    status = dispatcher.main(["echo", "--ops", "7"])

    assert status == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    machine = last.pop("machine")
    assert last == {"ops": 7, "scenario": "echo"}
    assert machine["calibration_ms"] > 0 and machine["cpus"] >= 1
    assert machine["calibration_before_ms"] > 0 and machine["calibration_after_ms"] > 0
    if Path("/proc/stat").exists():
        assert 0.0 <= machine["steal_share"] <= 1.0
    assert machine["python"] == platform.python_version()
    assert machine["compiled_core"] in (True, False)
    assert machine["libpython"] in ("shared", "static", None)


def test_the_interpreter_is_told_apart_by_where_libpython_lives(tmp_path: Path) -> None:
    from bench import _machine

    maps = tmp_path / "maps"
    maps.write_text(
        "7f0a-7f0b r-xp 00000000 fe:01 123 /opt/python/lib/libpython3.11.so.1.0\n"
        "7f0c-7f0d r-xp 00000000 fe:01 124 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    )
    assert _machine.libpython_linkage(maps) == "shared"
    maps.write_text("5600-5601 r-xp 00000000 fe:01 125 /usr/bin/python3.11\n")
    assert _machine.libpython_linkage(maps) == "static"
    assert _machine.libpython_linkage(tmp_path / "missing") is None


def test_the_calibration_is_the_best_of_its_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import _machine

    clock = iter([0.0, 0.030, 1.0, 1.010, 2.0, 2.020, 3.0, 3.050, 4.0, 4.040])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    assert _machine.calibration_ms() == 10.0


def test_a_short_core_run_replays_its_mix_and_answers_alike() -> None:
    """The measured runs must answer every command as the scout run did (the
    scenario raises otherwise), and the mix reaches every kind of outcome."""
    from bench import core

    parser = argparse.ArgumentParser()
    core.add_arguments(parser)
    args = parser.parse_args(["--ops=6000", "--slots=200", "--users=1500", "--repeat=2"])

    result = core.run(args)

    assert result["scenario"] == "core"
    assert result["ops"] == 6000 and len(result["runs_s"]) == 2
    assert result["ops_per_s"] > 0 and result["ops_per_s_median"] > 0
    assert sum(result["mix"].values()) == 6000
    assert sum(result["outcomes"].values()) == 6000
    for outcome in ("Reserve 201", "Reserve 202", "Confirm 200", "Cancel 200", "QueuePosition 200"):
        assert result["outcomes"].get(outcome, 0) > 0, outcome
    assert result["expirations"] > 0 and result["offers"] > 0
    assert result["events"] > result["ops"] // 2
    assert result["meets_target"] == (result["ops_per_s"] >= core.TARGET_OPS_PER_S)


@pytest.mark.ray
def test_a_short_ray_run_reports_its_figures() -> None:
    command = [
        sys.executable,
        "-m",
        "bench",
        "ray",
        "--shards=2",
        "--concurrency=50",
        "--slots=20",
        "--seconds=1",
        "--warmup-seconds=0.2",
        "--unbatched-seconds=0.5",
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )

    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["scenario"] == "ray"
    assert result["ops"] > 0
    assert result["errors"] == 0
    assert result["unbatched_ops"] > 0
    for key in ("ops_per_s", "p50_ms", "p99_ms", "unbatched_ops_per_s"):
        assert result[key] > 0
    assert sum(result["outcomes"].values()) == result["ops"]


def test_a_short_durable_ray_run_commits_and_reports_its_baseline() -> None:
    command = [
        sys.executable,
        "-m",
        "bench",
        "ray",
        "--durable",
        "--shards=2",
        "--concurrency=50",
        "--slots=20",
        "--seconds=1",
        "--warmup-seconds=0.2",
        "--unbatched-seconds=0",
        "--per-command-seconds=0.5",
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )

    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["durable"] is True
    assert result["durability"] == "commit"
    assert result["errors"] == 0
    assert result["flushes"] > 0
    assert result["events_per_flush"] > 1  # group commit: many events a transaction
    for key in ("ops_per_s", "p50_ms", "p99_ms", "per_command_ops_per_s"):
        assert result[key] > 0


def test_the_flush_replay_measures_two_schemas_side_by_side(tmp_path: Path) -> None:
    from persistence.migrate import MIGRATIONS_DIR

    compared = tmp_path / "migrations"
    compared.mkdir()
    for path in MIGRATIONS_DIR.glob("*.sql"):
        (compared / path.name).write_text(path.read_text())
    command = [
        sys.executable,
        "-m",
        "bench",
        "flush",
        "--ops=3000",
        "--slots=100",
        "--users=150",
        "--batch=60",
        f"--compare={compared}",
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )

    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["scenario"] == "flush"
    assert result["commands"] >= 3000 and result["flushes"] == 50
    assert result["events"] > result["commands"]  # a transition and its slot's counts, at least
    for key in ("schema", "compared"):
        assert result[f"{key}_postgres_us_per_command"] > 0
        assert result[f"{key}_writer_us_per_command"] > 0
    assert result["postgres_ratio"] > 0


def test_the_flush_mix_is_the_same_for_a_seed() -> None:
    from bench.flush import make_flushes

    options = argparse.Namespace(ops=2000, slots=50, users=80, batch=40, seed=3)
    first, commands = make_flushes(options)
    again, commands_again = make_flushes(options)
    assert commands == commands_again
    assert [rows.events for rows in first] == [rows.events for rows in again]
    kinds = {type(event).__name__ for rows in first for event in rows.raw}
    assert {"BookingChanged", "QueueChanged", "SlotChanged"} <= kinds


@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_load_generator_does_not_collect_while_it_measures(enabled_before: bool) -> None:
    import gc

    from bench._http import load_generator_collector

    gc.enable() if enabled_before else gc.disable()
    try:
        existing = [object()]
        with load_generator_collector():
            assert not gc.isenabled()
            # What existed when the load started is never scanned again meanwhile.
            assert gc.get_freeze_count() > 0
            assert not any(existing is tracked for tracked in gc.get_objects())
        assert gc.isenabled() is enabled_before
        assert gc.get_freeze_count() == 0
    finally:
        gc.enable()
