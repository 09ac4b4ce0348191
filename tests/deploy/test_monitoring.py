"""Prometheus configuration and alert rules, and the Grafana dashboard: valid for their tools,
and built only from metrics that docs/metrics.md (kept true to the code) documents."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import tool
from tests.deploy.support import (
    DEPLOY,
    SYNTHETIC_SERIES,
    compose_volume,
    metric_catalogue,
    promql_metric_names,
)

PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "blindfold.json"
RULE_TESTS = Path(__file__).with_name("alerts.test.yml")


def promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    result = subprocess.run(
        [tool("promtool", "prometheus"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    flat = []
    for panel in board["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return flat


def dashboard_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every query the dashboard runs, template variables included."""
    exprs = [
        (f"panel {p['title']!r} {t['refId']}", t["expr"])
        for p in panels(board)
        for t in p.get("targets", [])
    ]
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        # label_values(METRIC, LABEL) is Grafana's, not PromQL: the metric is the first argument.
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        exprs.append((f"variable ${var['name']}", match.group(1) if match else query))
    return exprs


# ---------------------------------------------------------------------------------------------
# Prometheus


def test_prometheus_config_passes_promtool() -> None:
    # Also loads the rule file the config names, so a broken path fails here.
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")


def test_alert_rules_pass_promtool() -> None:
    expected = f"SUCCESS: {len(alert_rules())} rules found"
    assert expected in promtool("check", "rules", "alerts.yml")


def test_alert_rule_unit_tests_pass() -> None:
    """promtool test rules: the E2EE alerts fire on exactly the series they should (a
    plaintext track under policy=required, any integrity mismatch) and not on the others."""
    output = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in output


def test_every_required_alert_exists_with_operator_guidance() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    expected = {
        "BlindfoldPlaintextSuspectedInRequiredRoom": 'state="plaintext_suspected"',
        "BlindfoldPayloadIntegrityMismatch": 'result="mismatch"',
        "BlindfoldSrtpFailureSpike": "sfu_srtp_failures_total",
        "BlindfoldEventLoopLag": "sfu_event_loop_lag_seconds_bucket",
        "BlindfoldMediaCodecLoaded": "sfu_media_codecs_loaded > 0",
        "BlindfoldTargetDown": "up{",
    }
    for name, fragment in expected.items():
        assert name in rules, f"alert {name} is missing"
        rule = rules[name]
        assert fragment in rule["expr"], (name, rule["expr"])
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        # A description that tells the operator what to do, not just what happened.
        assert len(annotations["description"]) > 150, name
        assert annotations["runbook"].startswith("docs/deployment.md#"), name
    assert 'policy="required"' in rules["BlindfoldPlaintextSuspectedInRequiredRoom"]["expr"]
    assert 'direction="in"' in rules["BlindfoldSrtpFailureSpike"]["expr"]
    assert "0.99" in rules["BlindfoldEventLoopLag"]["expr"]
    assert rules["BlindfoldEventLoopLag"]["for"] == "5m"


def test_runbook_anchors_exist_in_the_deployment_guide() -> None:
    guide = (DEPLOY.parent / "docs" / "deployment.md").read_text()
    # GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
    anchors = {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in guide.splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in anchors, f"{rule['alert']}: docs/deployment.md has no #{anchor}"


def test_alert_rules_use_only_documented_metrics() -> None:
    catalogue = metric_catalogue()
    for rule in alert_rules():
        unknown = {
            name
            for name in promql_metric_names(rule["expr"])
            if not catalogue.knows(name) and name not in SYNTHETIC_SERIES
        }
        assert not unknown, f"{rule['alert']} uses metrics docs/metrics.md does not list: {unknown}"


def test_scrape_job_is_the_one_the_rules_select() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "blindfold-sfu" in jobs
    assert jobs["blindfold-sfu"]["static_configs"][0]["targets"] == ["sfu:7880"]
    assert all('job="blindfold-sfu"' in r["expr"] for r in alert_rules() if "up{" in r["expr"])


# ---------------------------------------------------------------------------------------------
# Grafana


def test_metric_scan_catches_unknown_names() -> None:
    """The dashboard check below is only as good as this scan: pin what it finds."""
    expr = (
        'histogram_quantile(0.99, sum by (le, instance) (rate(sfu_bogus_bucket{job="x", '
        'le=~"0.1"}[$__rate_interval]))) / on(instance) group_left(version) sfu_build_info '
        "or vector(0) > 1e3 offset 5m"
    )
    assert promql_metric_names(expr) == {"sfu_bogus_bucket", "sfu_build_info"}
    catalogue = metric_catalogue()
    assert not catalogue.knows("sfu_bogus_bucket")
    assert catalogue.knows("sfu_event_loop_lag_seconds_bucket")
    assert not catalogue.knows("sfu_rooms_bucket")  # a gauge has no buckets
    assert catalogue.knows("process_resident_memory_bytes")


def test_dashboard_uses_only_documented_metrics() -> None:
    catalogue = metric_catalogue()
    exprs = dashboard_exprs(dashboard())
    assert len(exprs) >= 20
    for where, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = {n for n in names if not catalogue.knows(n)}
        assert not unknown, f"{where} uses metrics docs/metrics.md does not list: {unknown}"


def test_dashboard_covers_each_topic() -> None:
    used = set().union(*(promql_metric_names(e) for _, e in dashboard_exprs(dashboard())))
    topics = {
        "E2EE assurance": {
            "sfu_media_codecs_loaded",
            "sfu_e2ee_tracks",
            "sfu_e2ee_frames_total",
            "sfu_payload_integrity_checks_total",
        },
        "traffic": {
            "sfu_rtp_packets_total",
            "sfu_rtp_bytes_total",
            "sfu_nacks_total",
            "sfu_keyframe_requests_received_total",
        },
        "sessions and rooms": {"sfu_media_sessions", "sfu_rooms"},
        "ICE and DTLS": {"sfu_ice_checks_total", "sfu_dtls_handshakes_total"},
        "process": {
            "sfu_event_loop_lag_seconds_bucket",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
        },
    }
    for topic, metrics in topics.items():
        assert metrics <= used, f"{topic}: no panel for {metrics - used}"
    lag = [e for _, e in dashboard_exprs(dashboard()) if "sfu_event_loop_lag_seconds" in e]
    assert any("0.5," in e for e in lag), "no p50 of the event-loop lag"
    assert any("0.99," in e for e in lag), "no p99 of the event-loop lag"


def test_dashboard_is_grafana_provisioning_json() -> None:
    board = dashboard()
    # Grafana 10 writes schemaVersion 37-39 and migrates older ones; provisioning needs a
    # stable uid (links survive) and id null (Grafana assigns it).
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] == "blindfold-sfu"
    assert board["id"] is None
    assert board["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat", "gauge", "table", "bargauge")
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what the panel means"
        for target in panel["targets"]:
            # Every query follows the instance picker, so one SFU can be looked at alone.
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var in variables or var.startswith("__"), (panel["title"], var)
    # No two panels overlap (Grafana would shove them around).
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_grafana_provisioning_matches_compose() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = {
        source: target
        for source, target, _ in map(compose_volume, compose["services"]["grafana"]["volumes"])
    }
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/blindfold.yaml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == path
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    source = sources["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


@pytest.mark.parametrize("path", sorted(GRAFANA.rglob("*.y*ml")), ids=lambda p: p.name)
def test_grafana_provisioning_files_parse(path: Path) -> None:
    assert yaml.safe_load(path.read_text())["apiVersion"] == 1
