"""A real `sfu serve` process: probes, metrics, errors, CORS, logs, TLS and signals."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from sfu.config import DEV_API_SECRET
from tests.conftest import clean_env, http_get, run_cli, tool


def test_probes_answer(server_factory) -> None:
    server = server_factory()
    status, _, body = http_get(f"{server.base}/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = http_get(f"{server.base}/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready"})


def test_metrics_exposition(server_factory) -> None:
    server = server_factory({"metrics": {"loop_lag_interval": "50ms"}})
    time.sleep(0.3)  # let the lag probe fire a few times
    http_get(f"{server.base}/healthz")
    status, headers, body = http_get(f"{server.base}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    text = body.decode()
    assert 'sfu_build_info{event_loop="uvloop"' in text
    assert "process_resident_memory_bytes " in text
    assert "sfu_ready 1.0" in text
    count = next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("sfu_event_loop_lag_seconds_count")
    )
    assert count >= 2
    assert 'sfu_http_requests_total{code="200",method="GET",route="/healthz"}' in text


def test_metrics_pass_promtool(server_factory) -> None:
    promtool = tool("promtool", "prometheus")
    server = server_factory()
    http_get(f"{server.base}/nope")  # so a labelled counter with a 404 series exists too
    _, _, body = http_get(f"{server.base}/metrics")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_metrics_can_be_turned_off(server_factory) -> None:
    server = server_factory({"metrics": {"enabled": False}})
    assert http_get(f"{server.base}/metrics")[0] == 404


def test_errors_are_problem_json(server_factory) -> None:
    server = server_factory()
    status, headers, body = http_get(f"{server.base}/no/such/thing")
    assert status == 404
    assert headers["Content-Type"] == "application/problem+json"
    problem = json.loads(body)
    assert problem["status"] == 404
    assert problem["code"] == "not_found"
    assert problem["type"] == "urn:blindfold:problem:not_found"
    request = urllib.request.Request(f"{server.base}/healthz", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    err = caught.value
    assert err.code == 405
    assert err.headers["Content-Type"] == "application/problem+json"
    assert "GET" in err.headers["Allow"]
    assert json.loads(err.read())["code"] == "method_not_allowed"


def test_cors_allows_configured_origins_only(server_factory) -> None:
    server = server_factory({"http": {"cors_origins": ["https://app.example.com"]}})
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    request = urllib.request.Request(f"{server.base}/healthz", method="OPTIONS", headers=preflight)
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    status, headers, _ = http_get(
        f"{server.base}/healthz", headers={"Origin": "https://app.example.com"}
    )
    assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Location" in headers["Access-Control-Expose-Headers"]
    # Errors carry CORS headers too, or a browser app could not read them.
    status, headers, _ = http_get(
        f"{server.base}/nope", headers={"Origin": "https://app.example.com"}
    )
    assert status == 404
    assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    status, headers, _ = http_get(
        f"{server.base}/healthz", headers={"Origin": "https://evil.example"}
    )
    assert status == 200
    assert "Access-Control-Allow-Origin" not in headers
    evil = {**preflight, "Origin": "https://evil.example"}
    request = urllib.request.Request(f"{server.base}/healthz", method="OPTIONS", headers=evil)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 403


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_and_exits_0(server_factory, sig: signal.Signals) -> None:
    server = server_factory({"drain_timeout": "5s"})
    assert http_get(f"{server.base}/readyz")[0] == 200
    server.signal(sig)
    assert server.wait(timeout=15) == 0
    log = server.log()
    assert f"shutdown {sig.name}: draining for up to 5.0s" in log
    assert "stopped" in log
    assert "Traceback" not in log


def test_dev_mode_is_logged_clearly_without_the_secret(server_factory) -> None:
    server = server_factory()
    log = server.log()
    assert "DEV MODE" in log
    assert "'devkey'" in log
    assert DEV_API_SECRET not in log
    assert "listening on http://127.0.0.1:" in log


def test_json_logs_never_contain_tokens_or_secrets(server_factory) -> None:
    token = run_cli("token", "--room", "r", "--identity", "i", "--publish").stdout.strip()
    server = server_factory({"logging": {"json": True, "level": "debug"}})
    # A token in a query string and a header would be logged by the access log at debug.
    http_get(
        f"{server.base}/nope?access_token={token}", headers={"Authorization": f"Bearer {token}"}
    )
    server.signal(signal.SIGTERM)
    server.wait(timeout=15)
    lines = [line for line in server.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= entry.keys() for entry in entries)
    assert any("/nope" in entry["msg"] for entry in entries), "access log line expected at debug"
    text = "\n".join(lines)
    assert token not in text
    assert token.split(".")[2] not in text  # not even the signature
    assert DEV_API_SECRET not in text


def test_busy_port_is_a_clear_startup_error(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        config = tmp_path / "sfu.yaml"
        config.write_text(f"http:\n  port: {port}\n")
        result = run_cli("serve", "--config", str(config))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (http.host, http.port): address already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_https_when_tls_is_configured(server_factory, tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path)
    server = server_factory({"http": {"tls": {"cert_file": str(cert), "key_file": str(key)}}})
    context = ssl.create_default_context(cafile=str(cert))
    with urllib.request.urlopen(f"{server.base}/healthz", timeout=5, context=context) as response:
        assert response.status == 200
    # The container HEALTHCHECK command finds the server by its config, TLS included.
    result = run_cli("healthcheck", "--config", str(server.config_path))
    assert result.returncode == 0, result.stderr


def test_healthcheck_command_fails_when_nothing_listens(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli("healthcheck", "--timeout", "2", env=clean_env(SFU_HTTP__PORT=str(port)))
    assert result.returncode == 1
    assert "unhealthy" in result.stderr


def make_self_signed(folder: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_dev_token_endpoint_exists_only_in_dev_mode(server_factory) -> None:
    import jwt

    server = server_factory()
    request = urllib.request.Request(
        f"{server.base}/dev/token",
        data=json.dumps({"room": "demo", "identity": "alice", "name": "Alice"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        token = json.loads(response.read())["token"]
    claims = jwt.decode(token, DEV_API_SECRET, algorithms=["HS256"])
    assert (claims["room"], claims["sub"], claims["grants"]) == (
        "demo",
        "alice",
        {"publish": True, "subscribe": True},
    )
    bad = urllib.request.Request(
        f"{server.base}/dev/token",
        data=json.dumps({"room": "no spaces allowed", "identity": "a"}).encode(),
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(bad, timeout=5)
    assert caught.value.code == 400
    secret = "p" * 40
    prod = server_factory({"dev_mode": False, "auth": {"keys": {"prod": secret}}})
    closed = urllib.request.Request(f"{prod.base}/dev/token", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(closed, timeout=5)
    assert caught.value.code == 404
