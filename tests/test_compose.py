"""docker-compose.yml parses (docker-compose config) and holds the production-like stack;
``.env.example`` lists every variable it reads."""

import os
import re
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


ENV_EXAMPLE = ROOT / ".env.example"
# ${NAME}, ${NAME:-default}, ${NAME:?message}, ${NAME-default}, $NAME ($$ escapes a dollar).
COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")


def compose_variables(text: str) -> set[str]:
    """The environment variables a compose file reads (interpolates)."""
    return {braced or bare for braced, bare in COMPOSE_VARIABLE.findall(text)}


def example_variables(text: str) -> dict[str, str]:
    """NAME=value lines of an env file; comments and blank lines skipped."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, separator, value = line.partition("=")
            assert separator, f"not NAME=value: {line!r}"
            assert name not in found, f"{name} twice"
            found[name.strip()] = value
    return found


def test_the_env_example_lists_every_variable_the_compose_file_reads() -> None:
    read = compose_variables((ROOT / "docker-compose.yml").read_text())
    listed = example_variables(ENV_EXAMPLE.read_text())
    assert read, "the compose file reads no variable: the pattern is broken"
    assert set(listed) == read
    # Safe defaults: no published secret (empty: the stack refuses to start).
    assert listed["SLOTENGINE_JWT_SECRET"] == ""


def test_the_variable_pattern_finds_every_form() -> None:
    text = "a: ${ONE}\nb: ${TWO:-x}\nc: ${THREE:?set it}\nd: $FOUR\ne: $${NOT_ONE} $$NOT_TWO\n"
    assert compose_variables(text) == {"ONE", "TWO", "THREE", "FOUR"}
