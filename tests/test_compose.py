"""docker-compose.yml parses (docker-compose config) and holds the production-like stack."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"postgres", "redis", "migrate", "ray-head", "ray-worker", "gateway-1", "gateway-2",
            "nginx", "prometheus"}  # fmt: skip


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("docker-compose")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing (.ci/run installs Debian's package)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return subprocess.run(
        [executable, "-f", str(ROOT / "docker-compose.yml"), *args],
        env={**os.environ, "SLOTENGINE_JWT_SECRET": "a-secret-for-the-check"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_compose_file_parses_and_has_the_whole_stack() -> None:
    checked = _compose("config", "-q")
    assert checked.returncode == 0, checked.stderr
    services = _compose("config", "--services")
    assert set(services.stdout.split()) == SERVICES
    rendered = _compose("config").stdout
    assert "--appendonly" in rendered and "--save" in rendered  # Redis keeps AOF and RDB
    assert "pgdata" in rendered


def test_the_compose_file_refuses_to_start_without_a_jwt_secret() -> None:
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.skip("docker-compose is not installed")
    env = {k: v for k, v in os.environ.items() if k != "SLOTENGINE_JWT_SECRET"}
    done = subprocess.run(
        [executable, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and "SLOTENGINE_JWT_SECRET" in done.stderr
