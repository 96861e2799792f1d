"""The monitoring the deployment ships (config/deploy/): Prometheus's alerting
rules and their unit tests (promtool), Grafana's provisioning and dashboards.

Every metric an alert or a dashboard reads is one the project exports (the
gateway's registry with the engine's, the database pool's and the delivery
workers' series); every dashboard parses, with unique panel ids, on the
provisioned data source.
"""

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from engine.notify.metrics import NotifyMetrics
from gateway.observability.metrics import Metrics
from gateway.observability.pool import PoolCollector
from gateway.observability.sampler import EngineSampler

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "config" / "deploy"
ALERTS = DEPLOY / "alerts.yml"
ALERT_TESTS = DEPLOY / "alerts.test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE_UID = "prometheus"
PROMTOOL_TIMEOUT_S = 60
# The specification's alerts, a shard without an owner, and the outbox.
ALERT_NAMES = {
    "SlotengineHighErrorRate",
    "SlotengineHoldsPastTheirTTL",
    "SlotengineQueueNearCapacity",
    "SlotengineDatabasePoolExhausted",
    "SlotengineShardWithoutOwner",
    "SlotengineOutboxBehind",
}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


@cache
def exported_metrics() -> frozenset[str]:
    """The names of every sample the project's registries render."""
    metrics = Metrics()
    metrics.registry.register(EngineSampler(lambda: None, lambda: None))
    metrics.registry.register(PoolCollector(lambda: None))
    NotifyMetrics(metrics.registry)
    registry: CollectorRegistry = metrics.registry
    names = set()
    for family in registry.collect():
        for suffix in SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return frozenset(names)


# PromQL, reduced to its metric names: strings, label matchers, ranges, the
# label lists of by/without/on/ignoring/group_*, and Grafana's variables go;
# what is left that is no function call, keyword or number is a metric name.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENTIFIER = re.compile(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}  # fmt: skip


def metric_names(expression: str) -> set[str]:
    reduced = _STRING.sub('""', expression)
    reduced = _MATCHERS.sub("", reduced)
    reduced = _RANGE.sub("", reduced)
    reduced = _LABEL_LIST.sub("", reduced)
    reduced = _VARIABLE.sub("", reduced)
    return {
        name
        for name, call in _IDENTIFIER.findall(reduced)
        if not call and name.lower() not in _KEYWORDS
    }


def test_the_reduction_finds_metric_names_only() -> None:
    expression = (
        'histogram_quantile(0.99, sum by (le, operation) (rate(redis_seconds_bucket{a="}{x"}[5m])))'
        ' / on (shard) group_left max without (state) (up{state="x"}) > bool 0.5'
        " or vector(1) unless absent(other_metric) offset 5m + $__rate_interval"
    )
    assert metric_names(expression) == {"redis_seconds_bucket", "up", "other_metric"}


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expression) of every query of every dashboard."""
    found = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], target["expr"]))
    return found


def test_every_alert_is_there_with_its_severity_and_runbook() -> None:
    rules = _alert_rules()
    assert {rule["alert"] for rule in rules} == ALERT_NAMES
    operations = (ROOT / "docs" / "operations.md").read_text()
    for rule in rules:
        name = rule["alert"]
        assert rule["for"], name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert name in rule["annotations"]["runbook"], name
        # The section the runbook annotation names exists.
        assert re.search(rf"^#+ {name}$", operations, re.MULTILINE), name


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == ALERT_NAMES
    assert quiet == ALERT_NAMES


def test_every_metric_an_alert_or_a_dashboard_reads_is_exported() -> None:
    exported = exported_metrics()
    unknown = {
        (f"alert {rule['alert']}", name)
        for rule in _alert_rules()
        for name in metric_names(rule["expr"])
        if name not in exported
    }
    targets = _dashboard_targets()
    assert len(targets) > 40
    # Every query names a metric (a reduction that lost them would pass anything).
    assert all(metric_names(expression) for _, _, expression in targets)
    assert all(metric_names(rule["expr"]) for rule in _alert_rules())
    unknown |= {
        (f"{file}: {title}", name)
        for file, title, expression in targets
        for name in metric_names(expression)
        if name not in exported
    }
    assert not unknown, sorted(unknown)


def test_an_unknown_metric_is_caught() -> None:
    exported = exported_metrics()
    assert "http_request_duration_seconds_count" in exported
    assert "slotengine_db_pool_connections" in exported
    assert "engine_shard_timers_overdue_seconds" in exported
    assert "booking_reservation_total" not in exported
    assert metric_names("sum(rate(booking_reservation_total[1m]))") - exported


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_a_dashboard_parses_with_unique_panel_ids_on_the_provisioned_source(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] == path.stem and dashboard["title"]
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), path.name
    for panel in panels:
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]


def test_the_four_dashboards_and_their_provisioning() -> None:
    assert [path.stem for path in DASHBOARDS] == [
        "slotengine-bookings",
        "slotengine-errors",
        "slotengine-health",
        "slotengine-queues",
    ]
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/slotengine.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_reads_the_rule_file() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert config["rule_files"] == [ALERTS.name]


def _promtool() -> str:
    executable = shutil.which("promtool")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (.ci/run installs Debian's prometheus package)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return executable


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )


def test_promtool_checks_the_rules_and_passes_their_unit_tests() -> None:
    checked = _run("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each query, as a recording rule: ``check rules`` parses its PromQL."""
    rules = [
        {"record": f"dashboard:query_{index}", "expr": expression}
        for index, (_, _, expression) in enumerate(_dashboard_targets())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    checked = _run("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
