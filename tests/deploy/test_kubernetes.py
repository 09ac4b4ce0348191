"""deploy/kubernetes/: every manifest parses, the pieces refer to each other correctly, and the
ConfigMap's embedded sfu.yaml is a config the server accepts (with a real secret) and refuses
(with the committed placeholder). No cluster here, so nothing is applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sfu.units import parse_duration
from tests.conftest import clean_env, run_cli
from tests.deploy.support import DEPLOY, load_yaml_docs

K8S = DEPLOY / "kubernetes"
GOOD_SECRET = "a-test-secret-of-at-least-32-characters-0123"


def manifests() -> dict[str, dict[str, Any]]:
    """kind/name -> manifest, over every document of every file."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_docs(path):
            key = f"{doc['kind']}/{doc['metadata']['name']}"
            assert key not in found, f"{key} defined twice"
            found[key] = {**doc, "_file": path.name}
    return found


def deployment() -> dict[str, Any]:
    return manifests()["Deployment/blindfold-sfu"]


def container() -> dict[str, Any]:
    (only,) = deployment()["spec"]["template"]["spec"]["containers"]
    return only


def embedded_config() -> str:
    return str(manifests()["ConfigMap/blindfold-sfu-config"]["data"]["sfu.yaml"])


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_every_document_parses_and_is_complete(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs, f"{path.name} has no document"
    for doc in docs:
        assert doc["apiVersion"]
        assert doc["kind"]
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"]
        if doc["kind"] not in ("Namespace", "Kustomization"):
            assert doc["metadata"]["namespace"] == "blindfold", path.name


def test_kinds_present() -> None:
    kinds = {key.split("/")[0] for key in manifests()}
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "ServiceMonitor"} <= kinds
    # The ServiceMonitor needs the operator's CRD, so it lives in a file of its own.
    assert manifests()["ServiceMonitor/blindfold-sfu"]["_file"] == "servicemonitor.yaml"
    assert len(load_yaml_docs(K8S / "servicemonitor.yaml")) == 1


def test_kustomization_lists_what_exists_and_leaves_out_secret_and_crd() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert all((K8S / r).is_file() for r in resources)
    # Applying the placeholder would overwrite a real secret; the CRD may be missing.
    assert "secret.yaml" not in resources
    assert "servicemonitor.yaml" not in resources
    listed = set(resources) | {"secret.yaml", "servicemonitor.yaml", "kustomization.yaml"}
    assert {p.name for p in K8S.glob("*.yaml")} == listed


def test_probes_point_at_healthz_and_readyz() -> None:
    c = container()
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in ports


def test_ports_match_the_config() -> None:
    config = yaml.safe_load(embedded_config())
    ports = {(p["containerPort"], p["protocol"]) for p in container()["ports"]}
    assert (config["http"]["port"], "TCP") in ports
    assert (config["rtc"]["udp_port"], "UDP") in ports
    spec = deployment()["spec"]["template"]["spec"]
    # hostNetwork: the announced candidate is the node's own address and port, no NAT.
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    env = {e["name"]: e for e in container()["env"]}
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["SFU_RTC__ANNOUNCED_IPS"]["value"] == "[$(NODE_IP)]"
    # Kubernetes expands $(VAR) only for variables defined earlier in the list.
    names = [e["name"] for e in container()["env"]]
    assert names.index("NODE_IP") < names.index("SFU_RTC__ANNOUNCED_IPS")


def test_runs_as_non_root_with_a_read_only_root() -> None:
    pod = deployment()["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    # The uid the Dockerfile creates, so file ownership inside the image matches.
    assert f"--uid {pod['runAsUser']}" in (DEPLOY.parent / "Dockerfile").read_text()
    ctx = container()["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"]["drop"] == ["ALL"]
    resources = container()["resources"]
    assert resources["requests"]["cpu"]
    assert resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_grace_period_outlasts_the_drain() -> None:
    config = yaml.safe_load(embedded_config())
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > parse_duration(config["drain_timeout"]) + 5  # room for the exit itself


def test_references_resolve() -> None:
    found = manifests()
    spec = deployment()["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    env = {e["name"]: e for e in container()["env"]}
    ref = env["SFU_AUTH__KEYS__PROD"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in found[f"Secret/{ref['name']}"]["stringData"]
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert f"ConfigMap/{volumes['config']['configMap']['name']}" in found
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    assert f"{mounts['config']}/sfu.yaml" == env["SFU_CONFIG"]["value"]
    service = found["Service/blindfold-sfu"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = found["ServiceMonitor/blindfold-sfu"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["endpoints"]} <= service_ports
    # The Operator names the job after the Service; the alert rules select job="blindfold-sfu".
    assert service["metadata"]["name"] == "blindfold-sfu"


def test_prometheus_annotations() -> None:
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert (
        int(annotations["prometheus.io/port"]) == yaml.safe_load(embedded_config())["http"]["port"]
    )


def test_configmap_is_the_production_config() -> None:
    # One source of truth: the ConfigMap carries deploy/sfu.yaml verbatim.
    assert embedded_config() == (DEPLOY / "sfu.yaml").read_text()


def test_embedded_config_passes_check_config(tmp_path: Path) -> None:
    path = tmp_path / "sfu.yaml"
    path.write_text(embedded_config())
    # As in the pod: the secret and the announced address come from the environment.
    ok = run_cli(
        "check-config",
        str(path),
        env=clean_env(SFU_AUTH__KEYS__PROD=GOOD_SECRET, SFU_RTC__ANNOUNCED_IPS="[10.0.0.12]"),
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    placeholder = manifests()["Secret/blindfold-sfu-auth"]["stringData"]["SFU_AUTH__KEYS__PROD"]
    refused = run_cli(
        "check-config", str(path), env=clean_env(SFU_AUTH__KEYS__PROD=str(placeholder))
    )
    assert refused.returncode == 2, "the committed Secret placeholder must not start a server"
    assert "auth.keys.prod" in refused.stdout + refused.stderr
