"""The `sfu` command as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sfu import __version__
from sfu.docs import config_reference_markdown
from tests.conftest import ROOT, clean_env, run_cli


def test_check_config_valid_file_exits_0() -> None:
    result = run_cli("check-config", str(ROOT / "config" / "sfu.yaml"))
    assert result.returncode == 0
    assert result.stdout.strip().endswith("valid")


def test_check_config_prints_every_error_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("http:\n  port: 70000\n  hots: x\nlogging:\n  level: loud\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    out = result.stdout
    assert "3 configuration errors" in out
    assert "http.port: 70000 is not a valid port (1-65535)" in out
    assert "http.hots: unknown key (did you mean 'host'?)" in out
    assert "logging.level: 'loud' is not one of" in out


def test_check_config_bad_yaml_and_missing_file_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("http: [\n")
    assert run_cli("check-config", str(path)).returncode == 2
    result = run_cli("check-config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "does not exist" in result.stdout


def test_check_config_applies_env_overrides(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("{}\n")
    result = run_cli("check-config", str(path), env=clean_env(SFU_RTC__UDP_PORT="0"))
    assert result.returncode == 2
    assert (
        "rtc.udp_port: 0 is not a valid port (1-65535)  (set by SFU_RTC__UDP_PORT)" in result.stdout
    )


def test_serve_with_invalid_config_exits_2_before_binding(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rtc:\n  udp_port: -1\n")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert "rtc.udp_port: -1 is not a valid port" in result.stderr


def test_version() -> None:
    result = run_cli("version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"blindfold-sfu {__version__} ")


@pytest.mark.parametrize("command", ["serve", "check-config", "token", "schema", "healthcheck"])
def test_every_command_has_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "usage: sfu " + command in result.stdout


def test_no_command_is_a_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "COMMAND" in result.stderr


def test_schema_command_prints_the_committed_schema() -> None:
    result = run_cli("schema")
    committed = json.loads((ROOT / "config" / "sfu.schema.json").read_text())
    assert json.loads(result.stdout) == committed


def test_configuration_doc_has_the_current_key_table() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert config_reference_markdown() in doc, (
        "regenerate the table in docs/configuration.md: sfu schema --format markdown"
    )


def test_python_dash_m_and_console_script_agree() -> None:
    import subprocess
    import sys

    script = Path(sys.executable).parent / "sfu"
    assert script.exists(), "the package must be installed so its console script exists"
    result = subprocess.run([script, "version"], capture_output=True, text=True, check=False)
    assert result.stdout == run_cli("version").stdout
