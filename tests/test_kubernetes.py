"""The Kubernetes manifests (config/deploy/kubernetes/) are valid and agree with the code.

Every built-in kind is validated with kubernetes-validate's schemas of one
Kubernetes version in strict mode (no unknown field), the RayCluster against
KubeRay's CRD schema kept beside the manifests, made strict the same way. Then
the cross-references: the ConfigMap's settings are the server's own, the
Service selects the gateway's pods, the probes hit the server's port, the
gateways attach to the RayCluster's head, the head carries the engine's Ray
health checks. ``test_a_broken_copy_fails`` breaks a copy once per check, so
that no check passes whatever it is given.
"""

import copy
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jsonschema_rs
import kubernetes_validate
import pytest
import yaml

from config.settings import ConfigError, load_settings
from engine.shell import limits
from gateway.auth.environment import auth_settings_from_env
from gateway.server import SHUTDOWN_TIMEOUT_S
from persistence.sealing import load_key_ring

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "config" / "deploy" / "kubernetes"
RAYCLUSTER_SCHEMA = MANIFESTS / "schemas" / "raycluster-ray.io-v1.json"
# A version kubernetes-validate ships (pyproject.toml's dev extra asks for one that does).
KUBERNETES_VERSION = "1.33"
# The image docker-compose.yml builds: one image in every role.
IMAGE = "slotengine:latest"
# Settings the ConfigMap sets away from config/settings.py's default, on purpose.
CHANGED_FROM_DEFAULT = {"data_dir"}

Documents = list[dict[str, Any]]


def _load() -> Documents:
    documents: Documents = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        documents.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return documents


def _one(documents: Documents, kind: str) -> dict[str, Any]:
    found = [doc for doc in documents if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _gateway_container(documents: Documents) -> dict[str, Any]:
    containers = _one(documents, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def _env(container: Mapping[str, Any]) -> dict[str, Any]:
    return {item["name"]: item for item in container.get("env", [])}


def _strict(schema: Any) -> Any:
    """The CRD's schema refusing unknown fields, as the API server's strict field
    validation does (an object with ``properties`` and no
    ``x-kubernetes-preserve-unknown-fields`` takes nothing else)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


_RAYCLUSTER_VALIDATOR = jsonschema_rs.Draft4Validator(
    _strict(json.loads(RAYCLUSTER_SCHEMA.read_text()))
)


# -- the checks: each raises AssertionError (or a validation error) ------------------


def check_builtin_kinds(documents: Documents) -> None:
    kinds = set()
    for doc in documents:
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        kinds.add(doc["kind"])
    assert kinds == {"ConfigMap", "Secret", "Deployment", "Service"}


def check_raycluster_schema(documents: Documents) -> None:
    cluster = _one(documents, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    errors = [f"{error.instance_path}: {error.message}" for error in
              _RAYCLUSTER_VALIDATOR.iter_errors(cluster)]  # fmt: skip
    assert not errors, errors


def check_configmap_settings(documents: Documents) -> None:
    """Every key is a variable the server reads, parses, and is at its default
    unless it is one of CHANGED_FROM_DEFAULT."""
    data = _one(documents, "ConfigMap")["data"]
    read: set[str] = set()

    class Recording(dict[str, str]):
        def get(self, key: str, default: Any = None) -> Any:
            read.add(key)
            return super().get(key, default)

    settings = load_settings(Recording(data))
    unknown = sorted(
        name for name in data if name not in read or not name.startswith("SLOTENGINE_")
    )
    assert not unknown, f"not settings of config/settings.py: {unknown}"
    defaults = load_settings({})
    changed = {
        name
        for name in settings.__struct_fields__
        if getattr(settings, name) != getattr(defaults, name)
    }
    assert changed == CHANGED_FROM_DEFAULT, changed


def check_secret_references(documents: Documents) -> None:
    secret = _one(documents, "Secret")
    keys = set(secret["stringData"])
    container = _gateway_container(documents)
    referenced = {
        item["valueFrom"]["secretKeyRef"]["key"]
        for item in container["env"]
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    for item in container["env"]:
        if "secretKeyRef" in item.get("valueFrom", {}):
            assert item["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert (
        referenced
        == keys
        == {
            "SLOTENGINE_JWT_SECRET",
            "SLOTENGINE_DATA_KEY",
            "DATABASE_URL",
            "REDIS_URL",
        }
    )
    [config] = container["envFrom"]
    assert config["configMapRef"]["name"] == _one(documents, "ConfigMap")["metadata"]["name"]
    # Placeholders are marked, and the JWT secret's cannot run a gateway.
    assert all("REPLACE-ME" in value for value in secret["stringData"].values())
    try:
        auth_settings_from_env(secret["stringData"], Path("/nonexistent"))
    except ConfigError as error:
        assert "SLOTENGINE_JWT_SECRET" in str(error)
    else:
        raise AssertionError("the placeholder JWT secret is long enough to start a gateway")
    try:
        load_key_ring(secret["stringData"]["SLOTENGINE_DATA_KEY"], Path("/nonexistent"))
    except ConfigError as error:
        assert "SLOTENGINE_DATA_KEY" in str(error)
    else:
        raise AssertionError("the placeholder data key is a key a gateway would start with")


def check_service_selects_gateway(documents: Documents) -> None:
    deployment = _one(documents, "Deployment")
    service = _one(documents, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector and selector.items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in _gateway_container(documents)["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports or port["targetPort"] in ports.values()


def check_probes(documents: Documents) -> None:
    container = _gateway_container(documents)
    [port] = container["ports"]
    command = container["command"]
    assert command[:2] == ["slotengine", "serve"]
    assert command[command.index("--port") + 1] == str(port["containerPort"])
    assert command[command.index("--engine") + 1] == "ray"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        target = container[probe]["httpGet"]["port"]
        assert target in (port["name"], port["containerPort"]), probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    # /health is 503 while PostgreSQL is down: liveness must not restart for that.
    assert container["livenessProbe"]["httpGet"]["path"] != "/health"


def check_graceful_stop(documents: Documents) -> None:
    pod = _one(documents, "Deployment")["spec"]["template"]["spec"]
    pre_stop = _gateway_container(documents)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # aiohttp's shutdown, then the engine's wait for what it acknowledged.
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + 2 * SHUTDOWN_TIMEOUT_S


def check_gateway_attaches_to_head(documents: Documents) -> None:
    cluster = _one(documents, "RayCluster")
    [head] = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    client_port = {p["name"]: p["containerPort"] for p in head["ports"]}["client"]
    address = _env(_gateway_container(documents))["RAY_ADDRESS"]["value"]
    assert address == f"ray://{cluster['metadata']['name']}-head-svc:{client_port}"


def check_head_health_checks(documents: Documents) -> None:
    head_group = _one(documents, "RayCluster")["spec"]["headGroupSpec"]
    [head] = head_group["template"]["spec"]["containers"]
    env = {name: item["value"] for name, item in _env(head).items()}
    assert env["RAY_health_check_period_ms"] == str(limits.RAY_HEALTH_CHECK_PERIOD_MS)
    assert env["RAY_health_check_timeout_ms"] == str(limits.RAY_HEALTH_CHECK_TIMEOUT_MS)
    assert env["RAY_health_check_failure_threshold"] == str(
        limits.RAY_HEALTH_CHECK_FAILURE_THRESHOLD
    )
    # The bound the settings exist for: a silent node found with time left to restart.
    detection_ms = limits.RAY_HEALTH_CHECK_FAILURE_THRESHOLD * (
        limits.RAY_HEALTH_CHECK_PERIOD_MS + limits.RAY_HEALTH_CHECK_TIMEOUT_MS
    )
    assert detection_ms < limits.NODE_FAILOVER_MS
    assert head_group["rayStartParams"]["num-cpus"] == "0"


def check_one_image(documents: Documents) -> None:
    cluster = _one(documents, "RayCluster")["spec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    pods.append(_one(documents, "Deployment")["spec"]["template"]["spec"])
    images = {container["image"] for pod in pods for container in pod["containers"]}
    assert images == {IMAGE}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["migrate"]["image"] == IMAGE
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0


CHECKS: dict[str, Callable[[Documents], None]] = {
    check.__name__: check
    for check in (
        check_builtin_kinds,
        check_raycluster_schema,
        check_configmap_settings,
        check_secret_references,
        check_service_selects_gateway,
        check_probes,
        check_graceful_stop,
        check_gateway_attaches_to_head,
        check_head_health_checks,
        check_one_image,
    )
}


@pytest.fixture(scope="module")
def documents() -> Documents:
    return _load()


@pytest.mark.parametrize("name", CHECKS)
def test_the_manifests_pass(documents: Documents, name: str) -> None:
    CHECKS[name](documents)


# -- each check fails on a copy broken for it ---------------------------------------


def _deployment_pod(docs: Documents) -> dict[str, Any]:
    return _one(docs, "Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _head(docs: Documents) -> dict[str, Any]:
    spec = _one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    return spec["containers"][0]  # type: ignore[no-any-return]


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    for item in container["env"]:
        if item["name"] == name:
            item["value"] = value


BREAKS: dict[str, tuple[str, Callable[[Documents], None]]] = {
    "unknown field in a Deployment": (
        "check_builtin_kinds",
        lambda docs: _deployment_pod(docs).update(terminationGracePeriod=35),
    ),
    "port as a string": (
        "check_builtin_kinds",
        lambda docs: _one(docs, "Service")["spec"]["ports"][0].update(port="80"),
    ),
    "unknown field in the RayCluster": (
        "check_raycluster_schema",
        lambda docs: _one(docs, "RayCluster")["spec"].update(headGroup={}),
    ),
    "worker group without a name": (
        "check_raycluster_schema",
        lambda docs: _one(docs, "RayCluster")["spec"]["workerGroupSpecs"][0].pop("groupName"),
    ),
    "a setting that does not exist": (
        "check_configmap_settings",
        lambda docs: _one(docs, "ConfigMap")["data"].update(SLOTENGINE_SHARD_COUNT="4"),
    ),
    "a setting off its default": (
        "check_configmap_settings",
        lambda docs: _one(docs, "ConfigMap")["data"].update(SLOTENGINE_QUEUE_MAX="50"),
    ),
    "a secret key the Secret lacks": (
        "check_secret_references",
        lambda docs: _one(docs, "Secret")["stringData"].pop("REDIS_URL"),
    ),
    "a usable data key as the placeholder": (
        "check_secret_references",
        lambda docs: _one(docs, "Secret")["stringData"].update(
            SLOTENGINE_DATA_KEY="REPLACE-ME:" + "A" * 43 + "="
        ),
    ),
    "a usable JWT secret as the placeholder": (
        "check_secret_references",
        lambda docs: _one(docs, "Secret")["stringData"].update(
            SLOTENGINE_JWT_SECRET="REPLACE-ME-" + "x" * 32
        ),
    ),
    "a Service selecting other pods": (
        "check_service_selects_gateway",
        lambda docs: _one(docs, "Service")["spec"]["selector"].update(
            {"app.kubernetes.io/component": "web"}
        ),
    ),
    "readiness not on /health": (
        "check_probes",
        lambda docs: _deployment_pod(docs)["containers"][0]["readinessProbe"]["httpGet"].update(
            path="/metrics"
        ),
    ),
    "liveness on /health": (
        "check_probes",
        lambda docs: _deployment_pod(docs)["containers"][0]["livenessProbe"]["httpGet"].update(
            path="/health"
        ),
    ),
    "a probe on another port": (
        "check_probes",
        lambda docs: _deployment_pod(docs)["containers"][0]["startupProbe"]["httpGet"].update(
            port=9090
        ),
    ),
    "a grace period shorter than the graceful stop": (
        "check_graceful_stop",
        lambda docs: _deployment_pod(docs).update(terminationGracePeriodSeconds=20),
    ),
    "RAY_ADDRESS as the GCS address": (
        "check_gateway_attaches_to_head",
        lambda docs: _set_env(
            _deployment_pod(docs)["containers"][0], "RAY_ADDRESS", "slotengine-ray-head-svc:6379"
        ),
    ),
    "a renamed RayCluster": (
        "check_gateway_attaches_to_head",
        lambda docs: _one(docs, "RayCluster")["metadata"].update(name="ray"),
    ),
    "Ray's default health-check period": (
        "check_head_health_checks",
        lambda docs: _set_env(_head(docs), "RAY_health_check_period_ms", "3000"),
    ),
    "another image": (
        "check_one_image",
        lambda docs: _head(docs).update(image="rayproject/ray:2.60.0"),
    ),
}


@pytest.mark.parametrize("what", BREAKS)
def test_a_broken_copy_fails(documents: Documents, what: str) -> None:
    check, breaks = BREAKS[what]
    broken = copy.deepcopy(documents)
    breaks(broken)
    with pytest.raises((AssertionError, kubernetes_validate.ValidationError)):
        CHECKS[check](broken)


def test_every_check_has_a_broken_copy() -> None:
    assert {check for check, _ in BREAKS.values()} == set(CHECKS)
