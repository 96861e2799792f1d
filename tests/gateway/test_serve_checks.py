"""What ``slotengine serve`` refuses before it starts anything: each in one line, at once."""

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.cli import main

# Refused before any service, engine or secret is touched: well within this, where
# starting them would take seconds (a generous bound, not a timing measure).
REFUSED_WITHIN_S = 5.0
# Nothing listens on port 1: had the server started anything, it would fail otherwise.
UNREACHABLE_DATABASE = "postgresql://postgres@127.0.0.1:1/nowhere"
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("SLOTENGINE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", UNREACHABLE_DATABASE)
    monkeypatch.setenv("REDIS_URL", UNREACHABLE_REDIS)
    monkeypatch.setenv("SLOTENGINE_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port: int = taken.getsockname()[1]
        yield port


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_busy_port_is_refused_in_one_line_before_anything_starts(
    env: pytest.MonkeyPatch,
    tmp_path: Path,
    busy_port: int,
    capsys: pytest.CaptureFixture[str],
    workers: str,
) -> None:
    started = time.monotonic()
    status = main(["serve", "--engine", "inproc", "--port", str(busy_port), "--workers", workers])
    assert time.monotonic() - started < REFUSED_WITHIN_S
    captured = capsys.readouterr()
    assert (status, captured.out) == (2, "")
    assert captured.err.splitlines() == [
        f"slotengine serve: --port: 127.0.0.1:{busy_port} is already in use (another server?);"
        " choose another with --port"
    ]
    assert not (tmp_path / "data").exists()  # not even the token secret


def test_an_address_that_is_not_this_machines_is_refused_in_one_line(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # TEST-NET-1 (RFC 5737): never assigned to a local interface.
    status = main(["serve", "--engine", "inproc", "--host", "192.0.2.1", "--port", "8080"])
    captured = capsys.readouterr()
    assert status == 2
    (line,) = captured.err.splitlines()
    assert line.startswith("slotengine serve: --host: cannot listen on 192.0.2.1:8080 (")


def test_a_broken_email_template_is_refused_in_one_line_naming_the_file(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    domains = tmp_path / "domains"
    (domains / "templates" / "clinic").mkdir(parents=True)
    (domains / "clinic.toml").write_text("entityName = 'Doctor'\n", encoding="utf-8")
    broken = domains / "templates" / "clinic" / "booking.confirmed.txt"
    broken.write_text("See you at $start, $patient_name\n", encoding="utf-8")
    env.setenv("SLOTENGINE_DOMAINS_DIR", str(domains))
    status = main(["serve", "--engine", "inproc", "--port", "0"])
    captured = capsys.readouterr()
    assert status == 2
    (line,) = captured.err.splitlines()
    assert line.startswith(
        f"slotengine serve: template {broken}: unknown placeholder $patient_name"
    )
    assert not (tmp_path / "data").exists()


def test_an_unknown_notification_channel_is_refused_in_one_line_naming_the_file(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    domains = tmp_path / "domains"
    domains.mkdir()
    path = domains / "clinic.toml"
    path.write_text("[queueSettings]\nnotificationChannels = ['email', 'fax']\n", encoding="utf-8")
    env.setenv("SLOTENGINE_DOMAINS_DIR", str(domains))
    status = main(["serve", "--engine", "inproc", "--port", "0"])
    captured = capsys.readouterr()
    assert status == 2
    (line,) = captured.err.splitlines()
    assert line.startswith(f"slotengine serve: domain file {path}: ")
    assert "`$.queueSettings.notificationChannels[1]`" in line
    assert not (tmp_path / "data").exists()


def test_tracing_variables_it_cannot_follow_are_refused_in_one_line(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    status = main(["serve", "--engine", "inproc", "--port", "0"])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.splitlines() == [
        "slotengine serve: OTEL_EXPORTER_OTLP_PROTOCOL=grpc: this engine exports traces"
        " over http/protobuf only"
    ]
    assert not (tmp_path / "data").exists()
