"""deploy/docker-compose.yml, checked structurally.

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

from sfu.units import parse_duration
from tests.conftest import ROOT, clean_env, run_cli
from tests.deploy.support import DEPLOY, compose_volume

COMPOSE = DEPLOY / "docker-compose.yml"
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


def test_podman_compose_config_when_available(tmp_path: Path) -> None:
    podman_compose = shutil.which("podman-compose")
    if podman_compose is None:
        pytest.skip("podman-compose not installed; the structural checks above apply")
    commands = subprocess.run(
        [podman_compose, "--help"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    if not re.search(r"\bconfig\b", commands):
        pytest.skip("this podman-compose (Debian's 1.0.3) has no `config` command")
    result = subprocess.run(
        [podman_compose, "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=clean_env(
            BLINDFOLD_API_SECRET=GOOD_SECRET,
            BLINDFOLD_ANNOUNCED_IP="203.0.113.7",
            GRAFANA_ADMIN_PASSWORD="test-password",
        ),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7882:7882/udp" in result.stdout
