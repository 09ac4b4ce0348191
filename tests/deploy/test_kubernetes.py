"""deploy/kubernetes/ and the cluster overlay deploy/kubernetes-cluster/: every manifest parses,
the pieces refer to each other correctly, and the ConfigMap's embedded sfu.yaml, with each
pod's environment, is a config the server accepts (with a real secret) and refuses (with the
committed placeholder). No cluster here, so nothing is applied."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sfu.config import Config, load_config
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


# ---------------------------------------------------------------------------------------------
# deploy/kubernetes-cluster/: an overlay of the manifests above (Redis, a StatefulSet of
# nodes, one Service and Ingress host per pod). Built here the way kustomize builds it, for
# the few constructs the overlay uses; where kubectl is installed, `kubectl kustomize` too.

CLUSTER = DEPLOY / "kubernetes-cluster"
# Placeholder Secrets: never applied by the kustomization (a real one would be overwritten).
CLUSTER_UNLISTED = {"kustomization.yaml", "redis-secret.yaml"}
REDIS_PASSWORD = "0123456789abcdef" * 4
SECRETS = {
    ("blindfold-sfu-auth", "SFU_AUTH__KEYS__PROD"): GOOD_SECRET,
    ("blindfold-redis", "password"): REDIS_PASSWORD,
}


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize directory` yields, for what our kustomizations use:
    resources (files and directories), a namespace, and `$patch: delete` patches."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "patches"}
    assert set(kustomization) <= known, f"extend kustomize() for {set(kustomization) - known}"
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        docs += kustomize(path) if path.is_dir() else load_yaml_docs(path)
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"patch"}, "extend kustomize() for targeted or file patches"
        patch = yaml.safe_load(entry["patch"])
        assert patch.pop("$patch") == "delete", "only `$patch: delete` patches are emulated"
        doomed = (patch["kind"], patch["metadata"]["name"])
        before = len(docs)
        docs = [d for d in docs if (d["kind"], d["metadata"]["name"]) != doomed]
        assert len(docs) == before - 1, f"the patch deletes {doomed}, which is not there"
    namespace = kustomization.get("namespace")
    if namespace:
        for doc in docs:
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = namespace
    return docs


def cluster_manifests() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for doc in kustomize(CLUSTER):
        key = f"{doc['kind']}/{doc['metadata']['name']}"
        assert key not in found, f"{key} defined twice"
        found[key] = doc
    return found


def statefulset() -> dict[str, Any]:
    return cluster_manifests()["StatefulSet/blindfold-sfu"]


def node_container() -> dict[str, Any]:
    (only,) = statefulset()["spec"]["template"]["spec"]["containers"]
    return only


def expand(value: str, defined: dict[str, str]) -> str:
    """Kubernetes' $(VAR) in env values and args: only variables defined earlier expand,
    $$ escapes, anything else stays as written."""
    return re.sub(
        r"\$(\$|\((\w+)\))",
        lambda m: "$" if m.group(1) == "$" else defined.get(m.group(2), m.group(0)),
        value,
    )


def pod_env(ordinal: int) -> dict[str, str]:
    """The environment the kubelet gives pod `blindfold-sfu-<ordinal>` of the StatefulSet."""
    pod = f"{statefulset()['metadata']['name']}-{ordinal}"
    fields = {"metadata.name": pod, "status.hostIP": f"10.0.0.{11 + ordinal}"}
    env: dict[str, str] = {}
    for entry in node_container()["env"]:
        if "value" in entry:
            env[entry["name"]] = expand(str(entry["value"]), env)
        elif "fieldRef" in entry["valueFrom"]:
            env[entry["name"]] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = SECRETS[(ref["name"], ref["key"])]
    leftover = [v for v in env.values() if re.search(r"\$\(\w+\)", v)]
    assert not leftover, f"$(VAR) defined later or never, left unexpanded: {leftover}"
    return env


def pod_config(ordinal: int, tmp_path: Path) -> Config:
    configmap = cluster_manifests()["ConfigMap/blindfold-sfu-config"]["data"]["sfu.yaml"]
    path = tmp_path / "sfu.yaml"
    path.write_text(configmap)
    return load_config(path, pod_env(ordinal))


def replicas() -> int:
    return int(statefulset()["spec"]["replicas"])


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_every_cluster_document_parses_and_is_complete(path: Path) -> None:
    for doc in load_yaml_docs(path):
        assert doc["apiVersion"]
        assert doc["kind"]
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"]
            assert doc["metadata"]["namespace"] == "blindfold", path.name


def test_cluster_kustomization_overlays_the_single_node_manifests() -> None:
    kustomization = yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "blindfold"
    listed = set(kustomization["resources"])
    # The single-node directory is the base, used as it is.
    assert (CLUSTER / "../kubernetes").resolve() == K8S.resolve()
    assert "../kubernetes" in listed
    files = {p.name for p in CLUSTER.glob("*.yaml")}
    assert files == (listed - {"../kubernetes"}) | CLUSTER_UNLISTED
    found = cluster_manifests()
    # The Deployment is replaced, everything else of the base is kept.
    # (The base's Secret and ServiceMonitor files are not in its kustomization either.)
    replaced = {"Deployment/blindfold-sfu", "Secret/blindfold-sfu-auth"}
    kept = set(manifests()) - replaced - {"ServiceMonitor/blindfold-sfu"}
    assert kept <= set(found), kept - set(found)
    assert not replaced & set(found)
    assert "Secret/blindfold-redis" not in found
    assert {"StatefulSet", "Deployment", "Service", "Ingress"} <= {
        key.split("/")[0] for key in found
    }


def test_kubectl_kustomize_when_available() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; kustomize() above emulates the build")
    result = subprocess.run(
        [kubectl, "kustomize", str(CLUSTER)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = {
        (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
        for d in yaml.safe_load_all(result.stdout)
        if d
    }
    emulated = {
        (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
        for d in cluster_manifests().values()
    }
    assert built == emulated
    # The single-node kustomization still builds to its own manifests.
    single = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert single.returncode == 0, single.stderr
    assert "kind: Deployment" in single.stdout
    assert "StatefulSet" not in single.stdout


def test_cluster_nodes_run_like_the_single_node_pod() -> None:
    spec = statefulset()["spec"]
    pod = spec["template"]["spec"]
    single = deployment()["spec"]["template"]["spec"]
    for key in ("hostNetwork", "dnsPolicy", "securityContext", "affinity", "volumes"):
        assert pod[key] == single[key], key
    assert pod["terminationGracePeriodSeconds"] == single["terminationGracePeriodSeconds"]
    c = node_container()
    assert c["image"] == container()["image"]
    assert c["securityContext"] == container()["securityContext"]
    assert c["volumeMounts"] == container()["volumeMounts"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The same pod labels as the single-node Deployment: the base's Service selects nodes.
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert cluster_manifests()["Service/blindfold-sfu"]["spec"]["selector"].items() <= (
        labels.items()
    )
    governing = cluster_manifests()[f"Service/{spec['serviceName']}"]["spec"]
    assert governing["clusterIP"] == "None"
    assert governing["selector"].items() <= labels.items()
    assert replicas() >= 2


def test_cluster_node_id_and_url_come_from_the_pod() -> None:
    env = {e["name"]: e for e in node_container()["env"]}
    node_id = env["SFU_CLUSTER__NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert node_id == "metadata.name"
    assert env["SFU_CLUSTER__ENABLED"]["value"] == "true"
    # Per pod: the URL names the pod (through its node id), so no two pods share one.
    assert "$(SFU_CLUSTER__NODE_ID)" in env["SFU_CLUSTER__ADVERTISED_URL"]["value"]
    assert env["SFU_CLUSTER__REDIS_URL"]["value"].count("$(REDIS_PASSWORD)") == 1


def test_cluster_pod_env_is_a_valid_config_for_every_pod(tmp_path: Path) -> None:
    configs = [pod_config(i, tmp_path) for i in range(replicas())]
    name = statefulset()["metadata"]["name"]
    for i, config in enumerate(configs):
        assert config.cluster.enabled
        assert config.cluster.node_id == f"{name}-{i}"
        assert config.cluster.advertised_url.startswith("https://")
        assert [str(ip) for ip in config.rtc.announced_ips] == [f"10.0.0.{11 + i}"]
    assert len({c.cluster.node_id for c in configs}) == len(configs)
    assert len({c.cluster.advertised_url for c in configs}) == len(configs)
    for key in ("key_prefix", "rooms", "node_ttl", "heartbeat_interval"):
        assert len({getattr(c.cluster, key) for c in configs}) == 1, key
    urls = {c.cluster.redis_url.get_secret_value() for c in configs}
    assert len(urls) == 1
    # The URL reaches the Redis Service, with the password the Redis pod requires.
    match = re.fullmatch(r"redis://:([^@]+)@([\w.-]+):(\d+)/\d+", urls.pop())
    assert match
    password, host, port = match.groups()
    assert password == REDIS_PASSWORD
    service = cluster_manifests()[f"Service/{host}"]
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    redis_pod = cluster_manifests()["Deployment/blindfold-redis"]["spec"]["template"]
    assert service["spec"]["selector"].items() <= redis_pod["metadata"]["labels"].items()


def test_cluster_pod_env_passes_check_config(tmp_path: Path) -> None:
    configmap = cluster_manifests()["ConfigMap/blindfold-sfu-config"]["data"]["sfu.yaml"]
    path = tmp_path / "sfu.yaml"
    path.write_text(configmap)
    env = pod_env(0)
    del env["SFU_CONFIG"]
    ok = run_cli("check-config", str(path), env=clean_env(**env))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_cluster_media_ports_are_every_worker_s(tmp_path: Path) -> None:
    config = pod_config(0, tmp_path)
    ports = node_container()["ports"]
    udp = {p["containerPort"] for p in ports if p["protocol"] == "UDP"}
    workers = config.rtc.worker_count()
    assert udp == set(range(config.rtc.udp_port, config.rtc.udp_port + workers))
    assert (config.http.port, "TCP") in {(p["containerPort"], p["protocol"]) for p in ports}
    # About a core per worker: no fewer CPUs requested than workers run.
    assert float(node_container()["resources"]["requests"]["cpu"]) >= workers
    annotations = statefulset()["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.http.port


def test_cluster_advertised_urls_route_to_their_own_pod(tmp_path: Path) -> None:
    found = cluster_manifests()
    rules: dict[str, dict[str, Any]] = {}
    tls_hosts: set[str] = set()
    for key, doc in found.items():
        if key.startswith("Ingress/"):
            for rule in doc["spec"]["rules"]:
                assert rule["host"] not in rules, f"{rule['host']} routed twice"
                (path,) = rule["http"]["paths"]
                assert (path["path"], path["pathType"]) == ("/", "Prefix")
                rules[rule["host"]] = path["backend"]["service"]
            for entry in doc["spec"].get("tls", []):
                tls_hosts |= set(entry["hosts"])
    http_port = next(p for p in node_container()["ports"] if p["name"] == "http")
    name = statefulset()["metadata"]["name"]
    routed_to_pods = set()
    for i in range(replicas()):
        url = pod_config(i, tmp_path).cluster.advertised_url
        host = re.fullmatch(r"https://([^/:]+)", url)
        assert host, f"{url}: an https URL of the Ingress (no port, no path)"
        assert host.group(1) in tls_hosts, f"{host.group(1)} has no TLS"
        backend = rules[host.group(1)]
        service = found[f"Service/{backend['name']}"]
        # The Service selects this pod and nothing else.
        assert service["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": f"{name}-{i}"}
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"]]
        assert port["targetPort"] in (http_port["name"], http_port["containerPort"])
        routed_to_pods.add(backend["name"])
    assert len(routed_to_pods) == replicas()
    # The shared entry reaches every ready node.
    assert "blindfold-sfu" in {b["name"] for b in rules.values()}
    # Redis is never routed to clients.
    assert not any(b["name"].startswith("blindfold-redis") for b in rules.values())


def test_servicemonitor_scrapes_each_node_once() -> None:
    selector = manifests()["ServiceMonitor/blindfold-sfu"]["spec"]["selector"]["matchLabels"]
    services = [
        key
        for key, doc in cluster_manifests().items()
        if key.startswith("Service/")
        and selector.items() <= doc["metadata"].get("labels", {}).items()
    ]
    assert services == ["Service/blindfold-sfu"]


def test_cluster_redis_is_single_internal_and_keeps_nothing() -> None:
    found = cluster_manifests()
    redis = found["Deployment/blindfold-redis"]
    assert redis["spec"]["replicas"] == 1
    assert redis["spec"]["strategy"]["type"] == "Recreate"
    pod = redis["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].endswith("/redis:7-alpine")
    env = {e["name"]: e for e in c.get("env", [])}
    args = [expand(a, {"REDIS_PASSWORD": REDIS_PASSWORD}) for a in c["args"]]
    assert args[0] == "redis-server"
    assert args[args.index("--save") + 1] == ""
    assert args[args.index("--appendonly") + 1] == "no"
    assert args[args.index("--requirepass") + 1] == REDIS_PASSWORD
    ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    placeholder = load_yaml_docs(CLUSTER / "redis-secret.yaml")[0]
    assert (placeholder["kind"], placeholder["metadata"]["name"]) == ("Secret", ref["name"])
    assert ref["key"] in placeholder["stringData"]
    # No volume outlives the pod.
    assert all(set(v) == {"name", "emptyDir"} for v in pod["volumes"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["readinessProbe"]
    service = found["Service/blindfold-redis"]
    assert service["spec"]["type"] == "ClusterIP"
    assert not pod.get("hostNetwork")


@pytest.mark.parametrize("which", ["single", "cluster"])
def test_a_read_only_root_still_has_a_writable_tmp(which: str) -> None:
    """Media workers keep their channel sockets under /tmp: a read-only root needs a volume
    there (the server refuses to start with rtc.workers > 1 otherwise)."""
    if which == "single":
        pod, box = deployment()["spec"]["template"]["spec"], container()
    else:
        pod, box = statefulset()["spec"]["template"]["spec"], node_container()
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    mount = next(m for m in box["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume
    assert not mount.get("readOnly", False)
