"""docker-compose.yml parses (docker-compose config) and holds the production-like stack;
its Ray nodes and gateways find each other; Prometheus gets its rules and Grafana its
dashboards; ``.env.example`` lists every variable it reads."""

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.shell import limits

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"postgres", "redis", "migrate", "ray-head", "ray-worker-1", "ray-worker-2",
            "gateway-1", "gateway-2", "nginx", "prometheus", "grafana"}  # fmt: skip


# The secrets the compose file requires, each set to a value good for `config` only.
SECRETS_FOR_THE_CHECK = {
    "SLOTENGINE_JWT_SECRET": "a-secret-for-the-check",
    "SLOTENGINE_DATA_KEY": "a-key-for-the-check",
}


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("docker-compose")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing (.ci/run installs Debian's package)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return subprocess.run(
        [executable, "-f", str(ROOT / "docker-compose.yml"), *args],
        env={**os.environ, **SECRETS_FOR_THE_CHECK},
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


@pytest.mark.parametrize("secret", sorted(SECRETS_FOR_THE_CHECK))
def test_the_compose_file_refuses_to_start_without_a_secret(secret: str) -> None:
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.skip("docker-compose is not installed")
    env = {k: v for k, v in os.environ.items() if k not in SECRETS_FOR_THE_CHECK}
    env.update({k: v for k, v in SECRETS_FOR_THE_CHECK.items() if k != secret})
    done = subprocess.run(
        [executable, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and secret in done.stderr


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
    assert listed["SLOTENGINE_JWT_SECRET"] == listed["SLOTENGINE_DATA_KEY"] == ""


def test_the_variable_pattern_finds_every_form() -> None:
    text = "a: ${ONE}\nb: ${TWO:-x}\nc: ${THREE:?set it}\nd: $FOUR\ne: $${NOT_ONE} $$NOT_TWO\n"
    assert compose_variables(text) == {"ONE", "TWO", "THREE", "FOUR"}


def _services() -> dict[str, dict[str, Any]]:
    """The compose file's services, its anchors and merge keys resolved (no docker needed)."""
    services: dict[str, dict[str, Any]] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())[
        "services"
    ]
    return services


def _flag(command: list[str], name: str) -> str | None:
    values = [part.split("=", 1)[1] for part in command if part.startswith(f"{name}=")]
    assert len(values) <= 1, command
    return values[0] if values else None


def test_the_ray_head_has_two_workers_joining_its_gcs() -> None:
    services = _services()
    head = services["ray-head"]["command"]
    assert head[:3] == ["ray", "start", "--head"]
    gcs_port = _flag(head, "--port")
    workers = sorted(
        name
        for name, service in services.items()
        if service.get("command", [])[:2] == ["ray", "start"] and name != "ray-head"
    )
    assert workers == ["ray-worker-1", "ray-worker-2"]
    for name in workers:
        assert _flag(services[name]["command"], "--address") == f"ray-head:{gcs_port}", name
        assert "--block" in services[name]["command"]
        assert "ray-head" in services[name]["depends_on"]


def test_the_gateways_attach_through_the_client_server_the_head_opens() -> None:
    """A gateway container is no Ray node: it reaches the cluster in Ray Client's
    form, at the port the head's client server listens on (not the GCS's)."""
    services = _services()
    client_port = _flag(services["ray-head"]["command"], "--ray-client-server-port")
    assert client_port is not None, "the head opens no Ray Client server"
    gateways = [name for name in services if name.startswith("gateway")]
    assert gateways == ["gateway-1", "gateway-2"]
    for name in gateways:
        gateway = services[name]
        assert gateway["environment"]["RAY_ADDRESS"] == f"ray://ray-head:{client_port}", name
        assert gateway["command"][:2] == ["slotengine", "serve"]
        assert gateway["command"][gateway["command"].index("--engine") + 1] == "ray"
        assert {"ray-head", "ray-worker-1", "ray-worker-2"} <= set(gateway["depends_on"])
        # depends_on waits for the head's container, not its client server.
        assert gateway["restart"] == "on-failure", name
    # The Ray nodes join by --address; a RAY_ADDRESS in their environment would be
    # read by the engine's code running there instead.
    for name in ("ray-head", "ray-worker-1", "ray-worker-2", "migrate"):
        assert "RAY_ADDRESS" not in services[name]["environment"], name


def test_the_head_sets_the_engines_ray_health_checks() -> None:
    """The GCS reads them where the head starts: the engine's values, so that a
    lost worker's shard actors restart within the failover bound."""
    environment = _services()["ray-head"]["environment"]
    assert environment["RAY_health_check_period_ms"] == str(limits.RAY_HEALTH_CHECK_PERIOD_MS)
    assert environment["RAY_health_check_timeout_ms"] == str(limits.RAY_HEALTH_CHECK_TIMEOUT_MS)
    assert environment["RAY_health_check_failure_threshold"] == str(
        limits.RAY_HEALTH_CHECK_FAILURE_THRESHOLD
    )


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts: where in the container -> which path of the repository."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            assert (ROOT / source).exists(), source
            found[target] = source
    return found


def test_prometheus_gets_its_configuration_and_the_rules_it_names() -> None:
    prometheus = _services()["prometheus"]
    mounts = _mounts(prometheus)
    assert mounts["/etc/prometheus/prometheus.yml"] == "./config/deploy/prometheus.yml"
    config = yaml.safe_load((ROOT / "config/deploy/prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        # Relative paths are read beside the configuration.
        assert mounts[f"/etc/prometheus/{rule_file}"] == f"./config/deploy/{rule_file}"


def test_grafana_gets_its_provisioning_and_dashboards_and_reads_prometheus() -> None:
    services = _services()
    grafana = services["grafana"]
    image, _, version = grafana["image"].partition(":")
    assert image == "grafana/grafana" and version and version != "latest"
    assert "prometheus" in grafana["depends_on"]
    assert grafana["ports"] == ["3000:3000"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./config/deploy/grafana/provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == "./config/deploy/grafana/dashboards"
    provider = yaml.safe_load(
        (ROOT / "config/deploy/grafana/provisioning/dashboards/slotengine.yml").read_text()
    )["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith("/var/lib/grafana/dashboards/")
    assert (ROOT / "config/deploy/grafana/dashboards" / Path(home).name).exists()
    # Visitors view; nobody signs up; the admin's password is the operator's.
    environment = grafana["environment"]
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert environment["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert "GRAFANA_ADMIN_PASSWORD" in environment["GF_SECURITY_ADMIN_PASSWORD"]
    source = yaml.safe_load(
        (ROOT / "config/deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert source["url"] == f"http://prometheus:{services['prometheus']['ports'][0].split(':')[1]}"
