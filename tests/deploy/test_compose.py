"""deploy/docker-compose.yml and deploy/docker-compose.cluster.yml, checked structurally.

`podman-compose config` would be the natural validator, but Debian's podman-compose 1.0.3
has no `config` command and its `--dry-run` still creates networks and volumes, and no Docker
engine runs here. So the file is parsed and checked for what matters (services, the two
published ports, mounts that exist, secrets that must be supplied); where a podman-compose
with `config` is installed, that runs too."""

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
from tests.conftest import ROOT, clean_env, run_cli
from tests.deploy.support import DEPLOY, compose_volume

COMPOSE = DEPLOY / "docker-compose.yml"
CLUSTER = DEPLOY / "docker-compose.cluster.yml"
GOOD_SECRET = "a-test-secret-of-at-least-32-characters-0123"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_services_and_published_ports() -> None:
    services = compose()["services"]
    assert set(services) == {"sfu", "prometheus", "grafana"}
    sfu = services["sfu"]
    # The HTTP port and the ONE media port; UDP must say so or Docker publishes TCP.
    assert "7880:7880" in sfu["ports"]
    assert "7882:7882/udp" in sfu["ports"]
    # Monitoring stays on the host's loopback: it has no TLS and Grafana a password only.
    for name in ("prometheus", "grafana"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name


def test_sfu_is_built_from_the_repository_dockerfile() -> None:
    build = compose()["services"]["sfu"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()


def test_every_bind_mount_exists_in_the_repository() -> None:
    named = set(compose().get("volumes", {}))
    for name, service in compose()["services"].items():
        for spec in service.get("volumes", []):
            source, _, mode = compose_volume(spec)
            if source in named:
                continue
            assert source.startswith("."), f"{name}: {source} is neither relative nor a volume"
            assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            assert mode == "ro", f"{name}: configuration mounts are read-only ({spec})"


def test_sfu_mounts_the_production_config() -> None:
    sfu = compose()["services"]["sfu"]
    mounts = {target: source for source, target, _ in map(compose_volume, sfu["volumes"])}
    assert mounts["/etc/sfu/sfu.yaml"] == "./sfu.yaml"
    assert sfu["environment"]["SFU_CONFIG"] == "/etc/sfu/sfu.yaml"
    config = yaml.safe_load((DEPLOY / "sfu.yaml").read_text())
    assert config["dev_mode"] is False
    assert config["http"]["host"] == "0.0.0.0"
    assert config["rtc"]["bind_host"] == "0.0.0.0"
    assert config["rtc"]["udp_port"] == 7882
    assert config["http"]["port"] == 7880
    assert config["e2ee"]["policy"] == "required"
    # Compose must not kill the server mid-drain.
    grace = parse_duration(sfu["stop_grace_period"])
    assert grace > parse_duration(config["drain_timeout"])


def test_secrets_must_be_supplied_and_none_is_committed() -> None:
    text = COMPOSE.read_text()
    # ${VAR:?message}: compose refuses to start while the variable is unset.
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {"BLINDFOLD_API_SECRET", "BLINDFOLD_ANNOUNCED_IP", "GRAFANA_ADMIN_PASSWORD"} <= required
    referenced = set(re.findall(r"\$\{(\w+)", text))
    assert referenced <= set(env_example()), "document every variable in deploy/.env.example"
    env = compose()["services"]["sfu"]["environment"]
    assert env["SFU_AUTH__KEYS__PROD"].startswith("${BLINDFOLD_API_SECRET:?")
    assert ".env" in (DEPLOY / ".gitignore").read_text().split(), "deploy/.env must be ignored"


def test_placeholders_are_refused_and_real_values_accepted() -> None:
    """The committed placeholders cannot start a server; a real secret can."""
    example = env_example()
    placeholder = run_cli(
        "check-config",
        str(DEPLOY / "sfu.yaml"),
        env=clean_env(
            SFU_AUTH__KEYS__PROD=example["BLINDFOLD_API_SECRET"],
            SFU_RTC__ANNOUNCED_IPS=f"[{example['BLINDFOLD_ANNOUNCED_IP']}]",
        ),
    )
    assert placeholder.returncode == 2, placeholder.stdout + placeholder.stderr
    assert "auth.keys.prod" in placeholder.stdout + placeholder.stderr
    # The file's own placeholder, when the variable is not set at all, is refused too.
    unset = run_cli("check-config", str(DEPLOY / "sfu.yaml"))
    assert unset.returncode == 2
    assert "auth.keys.prod" in unset.stdout + unset.stderr
    good = run_cli(
        "check-config",
        str(DEPLOY / "sfu.yaml"),
        env=clean_env(SFU_AUTH__KEYS__PROD=GOOD_SECRET, SFU_RTC__ANNOUNCED_IPS="[203.0.113.7]"),
    )
    assert good.returncode == 0, good.stdout + good.stderr


def test_prometheus_scrapes_the_sfu_service() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "blindfold-sfu")
    host, port = job["static_configs"][0]["targets"][0].split(":")
    assert host in compose()["services"]
    assert int(port) == yaml.safe_load((DEPLOY / "sfu.yaml").read_text())["http"]["port"]


@pytest.mark.parametrize("path", [COMPOSE, CLUSTER], ids=lambda p: p.name)
def test_podman_compose_config_when_available(path: Path, tmp_path: Path) -> None:
    podman_compose = shutil.which("podman-compose")
    if podman_compose is None:
        pytest.skip("podman-compose not installed; the structural checks above apply")
    commands = subprocess.run(
        [podman_compose, "--help"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    if not re.search(r"\bconfig\b", commands):
        pytest.skip("this podman-compose (Debian's 1.0.3) has no `config` command")
    result = subprocess.run(
        [podman_compose, "-f", str(path), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=clean_env(
            BLINDFOLD_API_SECRET=GOOD_SECRET,
            BLINDFOLD_ANNOUNCED_IP="203.0.113.7",
            GRAFANA_ADMIN_PASSWORD="test-password",
            BLINDFOLD_NODE1_URL="http://203.0.113.7:7880",
            BLINDFOLD_NODE2_URL="http://203.0.113.7:7881",
        ),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("7882:7882/udp" if path == COMPOSE else "sfu-2") in result.stdout


# ---------------------------------------------------------------------------------------------
# deploy/docker-compose.cluster.yml: Redis and two SFU nodes. Each node's environment is put
# through the server's own config loader, with the variables compose would substitute.

NODES = ("sfu-1", "sfu-2")


def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (with and without the colon)."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        present = variables.get(name)
        if operator and operator.startswith(":") and present == "":
            present = None
        if present is not None:
            return present
        if operator and operator.endswith("?"):
            raise LookupError(f"compose refuses to start: {name}: {argument}")
        return argument if operator else ""

    return _VARIABLE.sub(one, value)


def example_variables(**changes: str) -> dict[str, str]:
    """deploy/.env.example as an operator fills it in (a real secret, the same addresses)."""
    return {**env_example(), "BLINDFOLD_API_SECRET": GOOD_SECRET, **changes}


def node_env(name: str, variables: dict[str, str] | None = None) -> dict[str, str]:
    environment = cluster()["services"][name]["environment"]
    for key, value in environment.items():
        # Compose passes strings; a YAML true or 2 would arrive as "True" / "2" depending on
        # the engine, so the file quotes them.
        assert isinstance(value, str), f"{name}: {key} must be a quoted string"
    chosen = example_variables() if variables is None else variables
    return {key: interpolate(value, chosen) for key, value in environment.items()}


def node_config(name: str, variables: dict[str, str] | None = None) -> Config:
    env = node_env(name, variables)
    # The config file the container reads is the one mounted at SFU_CONFIG.
    mounts = {
        target: source
        for source, target, _ in map(compose_volume, cluster()["services"][name]["volumes"])
    }
    return load_config(DEPLOY / mounts[env["SFU_CONFIG"]], env)


def published(name: str, protocol: str) -> list[tuple[range, range]]:
    """(host ports, container ports) of a service's published ports of one protocol."""
    found = []
    for spec in cluster()["services"][name].get("ports", []):
        spec, _, proto = str(spec).partition("/")
        if (proto or "tcp") != protocol:
            continue
        host, _, container = spec.rpartition(":")
        assert "." not in host, f"{name}: bind {spec} to all addresses, clients reach it"
        ranges = []
        for part in (host, container):
            low, _, high = part.partition("-")
            ranges.append(range(int(low), int(high or low) + 1))
        found.append((ranges[0], ranges[1]))
    return found


def test_cluster_services_and_redis() -> None:
    services = cluster()["services"]
    assert set(services) == {"redis", *NODES}
    redis = services["redis"]
    assert redis["image"].endswith("/redis:7-alpine")
    # Nothing to persist (every key the nodes keep is rewritten each heartbeat).
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    assert not redis.get("volumes")
    # Redis is for the nodes only: no published port, not even on loopback.
    assert not redis.get("ports")
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    # The single-node project is another one: the two never share containers or volumes.
    assert cluster()["name"] != compose()["name"]


def test_cluster_nodes_run_the_single_node_image_and_settings() -> None:
    single = compose()["services"]["sfu"]
    for name in NODES:
        node = cluster()["services"][name]
        assert node["image"] == single["image"], name
        assert (CLUSTER.parent / node["build"]["context"]).resolve() == ROOT
        assert node["build"]["dockerfile"] == single["build"]["dockerfile"]
        assert node["volumes"] == single["volumes"], name
        for key in ("read_only", "security_opt", "cap_drop", "ulimits", "stop_signal"):
            assert node[key] == single[key], f"{name}: {key}"
        config = node_config(name)
        assert parse_duration(node["stop_grace_period"]) > config.drain_timeout
        # Start once Redis answers (a node that cannot reach it at start exits 1).
        assert node["depends_on"]["redis"]["condition"] == "service_healthy"
        assert node["restart"] == "unless-stopped"
        assert node["healthcheck"]["test"] == ["CMD-SHELL", "sfu healthcheck"]


def test_cluster_nodes_are_valid_and_distinct_members_of_one_cluster() -> None:
    configs = {name: node_config(name) for name in NODES}
    example = env_example()
    for name, config in configs.items():
        assert config.cluster.enabled, name
        assert config.cluster.node_id == name
        assert config.dev_mode is False
        assert [str(ip) for ip in config.rtc.announced_ips] == [example["BLINDFOLD_ANNOUNCED_IP"]]
    assert configs["sfu-1"].cluster.advertised_url == example["BLINDFOLD_NODE1_URL"]
    assert configs["sfu-2"].cluster.advertised_url == example["BLINDFOLD_NODE2_URL"]
    assert len({c.cluster.node_id for c in configs.values()}) == len(NODES)
    assert len({c.cluster.advertised_url for c in configs.values()}) == len(NODES)
    # One Redis, one key prefix, one room mode: otherwise they are two clusters.
    for key in ("key_prefix", "rooms", "node_ttl", "heartbeat_interval"):
        assert len({getattr(c.cluster, key) for c in configs.values()}) == 1, key
    urls = {c.cluster.redis_url.get_secret_value() for c in configs.values()}
    assert len(urls) == 1
    (url,) = urls
    match = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", url)
    assert match, url
    assert match.group(1) == "redis", "the nodes must use the compose service `redis`"
    assert int(match.group(2)) == 6379


def test_cluster_published_ports_match_each_node() -> None:
    example = env_example()
    urls = {"sfu-1": example["BLINDFOLD_NODE1_URL"], "sfu-2": example["BLINDFOLD_NODE2_URL"]}
    taken: dict[str, set[int]] = {"tcp": set(), "udp": set()}
    for name in NODES:
        config = node_config(name)
        # Media: every worker's port, host and container numbers equal (the candidate
        # carries the port the worker binds), and nothing else.
        workers = config.rtc.worker_count()
        expected = set(range(config.rtc.udp_port, config.rtc.udp_port + workers))
        udp = published(name, "udp")
        for host, container in udp:
            assert host == container, f"{name}: UDP {host} published as {container}"
        assert {p for _, container in udp for p in container} == expected, name
        # HTTP: the container's http.port, on the host port the example URL names.
        ((host, container),) = published(name, "tcp")
        assert list(container) == [config.http.port], name
        assert urls[name].endswith(f":{host[0]}"), f"{name}: {urls[name]} is not port {host[0]}"
        for protocol, ports in (("tcp", set(host)), ("udp", expected)):
            assert not taken[protocol] & ports, f"{name}: {protocol} ports used twice"
            taken[protocol] |= ports


def test_cluster_variables_are_required_and_documented() -> None:
    text = CLUSTER.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {
        "BLINDFOLD_API_SECRET",
        "BLINDFOLD_ANNOUNCED_IP",
        "BLINDFOLD_NODE1_URL",
        "BLINDFOLD_NODE2_URL",
    } <= required
    assert set(re.findall(r"\$\{(\w+)", text)) <= set(env_example())
    # A node URL left unset stops compose instead of starting a node no one can be sent to.
    unset = example_variables()
    del unset["BLINDFOLD_NODE2_URL"]
    with pytest.raises(LookupError, match="BLINDFOLD_NODE2_URL"):
        node_env("sfu-2", unset)


@pytest.mark.parametrize("name", NODES)
def test_cluster_node_env_passes_check_config(name: str) -> None:
    config_file = str(DEPLOY / "sfu.yaml")
    env = node_env(name)
    del env["SFU_CONFIG"]
    ok = run_cli("check-config", config_file, env=clean_env(**env))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Without an advertised URL the node is refused, so the file's value is what counts.
    env["SFU_CLUSTER__ADVERTISED_URL"] = ""
    refused = run_cli("check-config", config_file, env=clean_env(**env))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "advertised_url" in refused.stdout + refused.stderr


@pytest.mark.parametrize("path", [COMPOSE, CLUSTER], ids=lambda p: p.name)
def test_read_only_sfu_services_mount_a_tmpfs_at_tmp(path: Path) -> None:
    """Media workers keep their channel sockets under /tmp: with read_only: true the SFU
    needs a tmpfs there (the cluster file runs two workers per node)."""
    services = yaml.safe_load(path.read_text())["services"]
    sfus = {name: s for name, s in services.items() if name.startswith("sfu")}
    assert sfus
    for name, service in sfus.items():
        assert service["read_only"] is True, name
        assert any(str(t).split(":")[0] == "/tmp" for t in service.get("tmpfs", [])), name
