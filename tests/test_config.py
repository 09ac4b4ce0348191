"""Config loading: every class of mistake names its key path, value and source."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sfu.config import (
    DEV_API_SECRET,
    Config,
    ConfigError,
    json_schema,
    load_config,
)
from tests.conftest import ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sfu.yaml"
    path.write_text(text)
    return path


def issues(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env=env or {})
    return [str(issue) for issue in caught.value.issues]


def test_no_file_gives_dev_defaults() -> None:
    config = load_config(None, env={})
    assert config.dev_mode is True
    assert config.http.host == "127.0.0.1"
    assert (config.http.port, config.rtc.udp_port) == (7880, 7882)
    assert config.secret_for("devkey") == DEV_API_SECRET


def test_shipped_file_is_exactly_the_embedded_defaults() -> None:
    # config/sfu.yaml documents every key with its default; if either drifts, this fails.
    assert load_config(ROOT / "config" / "sfu.yaml", env={}) == Config()


def test_shipped_file_mentions_every_key() -> None:
    import yaml

    data = yaml.safe_load((ROOT / "config" / "sfu.yaml").read_text())

    def leaves(node: object, prefix: str = "") -> set[str]:
        # Map-valued keys (key name -> secret, room -> policy) are leaves themselves.
        if isinstance(node, dict) and prefix not in ("auth.keys", "e2ee.rooms"):
            out: set[str] = set()
            for key, value in node.items():
                out |= leaves(value, f"{prefix}.{key}" if prefix else str(key))
            return out
        return {prefix}

    from sfu.config import reference_rows

    assert leaves(data) == {row[0] for row in reference_rows()}


def test_range_error_names_path_value_and_line(tmp_path: Path) -> None:
    found = issues(tmp_path, "rtc:\n  udp_port: 70000\n")
    assert found == [
        f"rtc.udp_port: 70000 is not a valid port (1-65535)  ({tmp_path}/sfu.yaml line 2)"
    ]


def test_type_errors(tmp_path: Path) -> None:
    found = issues(
        tmp_path,
        "http:\n  port: eighty\nmetrics:\n  enabled: maybe\nrtc:\n  announced_ips: 1.2.3.4\n",
    )
    assert any(i.startswith("http.port: 'eighty' is not a whole number") for i in found)
    assert any(i.startswith("metrics.enabled: 'maybe' is not a boolean") for i in found)
    assert any(i.startswith("rtc.announced_ips: expected a list") for i in found)
    assert len(found) == 3


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    found = issues(tmp_path, "rtc:\n  udp_prot: 7882\n")
    assert found[0].startswith("rtc.udp_prot: unknown key (did you mean 'udp_port'?)")


def test_unknown_key_without_a_close_match_lists_valid_ones(tmp_path: Path) -> None:
    found = issues(tmp_path, "zzz: 1\n")
    assert "zzz: unknown key (expected one of: dev_mode, drain_timeout, http," in found[0]


def test_unknown_key_inside_a_list_item(tmp_path: Path) -> None:
    found = issues(
        tmp_path, "rtc:\n  ice_servers:\n    - urls: [stun:a.example]\n      usrname: x\n"
    )
    assert found[0].startswith("rtc.ice_servers[0].usrname: unknown key (did you mean 'username'?)")


def test_bad_yaml_gives_line_and_column(tmp_path: Path) -> None:
    found = issues(tmp_path, "http:\n  port: [7880\n")
    assert found[0].startswith("(yaml): not valid YAML:")
    assert "line 3, column 1" in found[0]


def test_duplicate_keys_are_errors_not_silently_last_wins(tmp_path: Path) -> None:
    found = issues(tmp_path, "http:\n  port: 1000\n  port: 2000\n")
    assert found == [
        f"http.port: duplicate key (first set on line 2)  ({tmp_path}/sfu.yaml line 3)"
    ]


def test_root_must_be_a_mapping(tmp_path: Path) -> None:
    found = issues(tmp_path, "- http\n- rtc\n")
    assert found[0].startswith("(root): expected a mapping of sections")


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    found = issues(
        tmp_path,
        "http:\n  port: 0\n  cors_origins: [example.com]\nlogging:\n  level: loud\n"
        "drain_timeout: soon\nlimits:\n  max_rooms: 0\n",
    )
    paths = [i.split(":")[0] for i in found]
    assert sorted(paths) == sorted(
        ["http.port", "http.cors_origins[0]", "logging.level", "drain_timeout", "limits.max_rooms"]
    )


def test_env_override_sets_nested_values() -> None:
    config = load_config(
        None,
        env={
            "SFU_RTC__UDP_PORT": "9000",
            "SFU_RTC__ANNOUNCED_IPS": "[203.0.113.7, 2001:db8::1]",
            "SFU_LOGGING__JSON": "true",
            "SFU_DRAIN_TIMEOUT": "1m",
            "SFU_CONFIG": "/ignored/because/it/names/the/file",
            "UNRELATED": "x",
        },
    )
    assert config.rtc.udp_port == 9000
    assert config.rtc.announced_ips == ["203.0.113.7", "2001:db8::1"]
    assert config.logging.json_lines is True
    assert config.drain_timeout == 60.0


def test_env_override_beats_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "http:\n  port: 8000\n")
    assert load_config(path, env={"SFU_HTTP__PORT": "8001"}).http.port == 8001


def test_env_errors_name_the_variable(tmp_path: Path) -> None:
    found = issues(tmp_path, "{}\n", env={"SFU_RTC__UDP_PORT": "70000", "SFU_HTTP__PROT": "1"})
    assert "rtc.udp_port: 70000 is not a valid port (1-65535)  (set by SFU_RTC__UDP_PORT)" in found
    assert any(
        i.startswith("http.prot: unknown key (did you mean 'port'?)") and "SFU_HTTP__PROT" in i
        for i in found
    )


def test_env_override_below_a_scalar_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"SFU_DEV_MODE__X": "1"})
    assert "dev_mode" in str(caught.value)


def test_env_override_with_empty_segment_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"SFU_RTC____UDP_PORT": "1"})
    assert "SFU_RTC____UDP_PORT is not a valid override name" in str(caught.value)


def test_production_refuses_the_dev_secret_and_short_secrets(tmp_path: Path) -> None:
    found = issues(
        tmp_path,
        f"dev_mode: false\nauth:\n  keys:\n    old: {DEV_API_SECRET}\n    short: abc\n",
    )
    assert any(i.startswith("auth.keys.old: uses the public development secret") for i in found)
    assert any(i.startswith("auth.keys.short: secret is 3 characters") for i in found)


def test_dev_mode_listens_on_loopback_only(tmp_path: Path) -> None:
    found = issues(tmp_path, "http:\n  host: 0.0.0.0\n")
    assert found[0].startswith("http.host: '0.0.0.0' is not a loopback address, but dev_mode")


def test_production_config_is_accepted(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "dev_mode: false\nhttp:\n  host: 0.0.0.0\nrtc:\n  bind_host: 0.0.0.0\n"
            f"auth:\n  keys:\n    prod: {'s' * 40}\n",
        ),
        env={},
    )
    assert config.secret_for("prod") == "s" * 40
    assert config.secret_for("devkey") is None


def test_tls_needs_both_files_and_they_must_exist(tmp_path: Path) -> None:
    found = issues(tmp_path, "http:\n  tls:\n    cert_file: /nonexistent/cert.pem\n")
    assert any(
        i.startswith("http.tls.key_file: cert_file and key_file must be set together")
        for i in found
    )
    assert any(
        i.startswith("http.tls.cert_file: '/nonexistent/cert.pem' does not exist") for i in found
    )


def test_turn_server_needs_credentials(tmp_path: Path) -> None:
    found = issues(tmp_path, "rtc:\n  ice_servers:\n    - urls: [turn:turn.example.com]\n")
    assert found[0].startswith("rtc.ice_servers[0]: turn: and turns: URLs need both")


def test_ice_tcp_is_refused_until_implemented(tmp_path: Path) -> None:
    found = issues(tmp_path, "rtc:\n  ice_tcp:\n    enabled: true\n")
    assert found[0].startswith("rtc.ice_tcp: ICE-TCP is not available in this version")


def test_secrets_never_show_in_repr() -> None:
    assert DEV_API_SECRET not in repr(Config())


def test_schema_file_is_current() -> None:
    committed = json.loads((ROOT / "config" / "sfu.schema.json").read_text())
    assert committed == json_schema(), "regenerate: sfu schema > config/sfu.schema.json"


def test_shipped_config_validates_against_the_schema() -> None:
    import jsonschema
    import yaml

    data = yaml.safe_load((ROOT / "config" / "sfu.yaml").read_text())
    jsonschema.validate(data, json_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"rtc": {"udp_port": 70000}}, json_schema())


@pytest.mark.parametrize("value", ["0", "65", "many", "-1"])
def test_workers_must_be_auto_or_a_count(tmp_path: Path, value: str) -> None:
    found = issues(tmp_path, f"rtc:\n  workers: {value}\n")
    assert len(found) == 1
    assert found[0].startswith("rtc.workers: "), found


def test_workers_auto_is_the_usable_cores(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "rtc:\n  workers: auto\n"), env={})
    assert config.rtc.worker_count() == len(os.sched_getaffinity(0))
    assert load_config(None, env={}).rtc.worker_count() == 1
