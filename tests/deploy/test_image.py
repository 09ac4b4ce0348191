"""The real image: built from the repository's Dockerfile with podman, run the way
deploy/docker-compose.yml runs it, and used end to end.

No container registry is reachable from the test machines, so the base image is a Debian
root file system made with debootstrap and imported into podman (kept between runs as
localhost/blindfold-base). pip inside the build cannot verify PyPI's certificate there (the
network's TLS-intercepting CA is trusted by the host only), so the build installs from wheels
downloaded on the host into deploy/wheels/ (Dockerfile build arg PIP_OFFLINE=1), also kept.

Then, against one running container: the HEALTHCHECK passes; an E2EE publisher and
subscriber exchange media through the published ports; a real Prometheus scrapes it, loads
the project's alert rules, and sees sfu_media_codecs_loaded == 0; SIGTERM (podman stop) drains
and exits 0 well inside the stop timeout. Last, two containers as the nodes of a cluster (the
host's redis-server): a room spans them, and survives one of them being killed.

Needs root, podman (with runc), debootstrap and prometheus: skipped without them, failed
under CI=true. scripts/test.sh installs them; containers.conf follows
docs/testing.md (runc, because crun fails on this host's hybrid
cgroups; default ulimits root may actually set)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sfu.client.e2ee import E2eeConfig, EncryptedFrame
from sfu.client.sframe import compose_kid
from sfu.client.whip import publish, subscribe
from sfu.config import load_config
from sfu.control.auth import mint_token
from tests.conftest import ROOT, free_port, http_get, tool, unavailable
from tests.deploy.support import DEPLOY

# Importing the media harness also limits aiortc's ICE gathering to 127.0.0.1 (aioice leaves
# loopback out otherwise), so the test peers only ever reach the container's published ports.
from tests.media.harness import ColourTrack, wait_for

pytestmark = pytest.mark.slow

BASE_IMAGE = "localhost/blindfold-base"
IMAGE = "localhost/blindfold-sfu:test"
# The base's Debian release and its Python: the host downloads wheels for that Python.
SUITE = "bookworm"
IMAGE_PYTHON = "3.11"
WHEELS = DEPLOY / "wheels"
IMAGE_ONLY_REQUIREMENTS = ["async-timeout>=4.0.3"]
SECRET = "deploy-test-secret-0123456789abcdef-not-real"
KID = compose_kid(7, 0)
KEY = bytes(range(16, 32))
DRAIN = 3.0  # seconds; short so the SIGTERM test stays quick
STOP_TIMEOUT = 20  # podman stop -t: SIGKILL after this long


def log(message: str) -> None:
    # Visible with -s; build steps take long enough that silence looks like a hang.
    print(f"[deploy image] {message}", file=sys.stderr, flush=True)


@dataclass
class Podman:
    binary: str
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        result = subprocess.run(
            [self.binary, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            tail = (result.stdout + result.stderr)[-4000:]
            raise AssertionError(
                f"podman {' '.join(args[:3])} … exited {result.returncode}:\n{tail}"
            )
        return result.stdout

    def logs(self, name: str) -> str:
        # The server logs to stderr; podman keeps the two streams apart.
        result = subprocess.run(
            [self.binary, "logs", name],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )
        return result.stdout + result.stderr

    def ok(self, *args: str, timeout: float = 60) -> bool:
        return (
            subprocess.run(
                [self.binary, *args],
                capture_output=True,
                env=self.env,
                timeout=timeout,
                check=False,
            ).returncode
            == 0
        )


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    if os.geteuid() != 0:
        unavailable("building and running images with podman needs root here")
    binary = tool("podman", "podman")
    tool("runc", "runc")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
    )
    return Podman(binary, {**os.environ, "CONTAINERS_CONF": str(conf)})


def debian_mirror() -> str:
    """The host's Debian mirror (deb822 or one-line format): debootstrap must use a mirror
    that is reachable from here, which the host's own apt configuration is."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.is_file():
        for stanza in deb822.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if re.match(r"^\w[\w-]*:", line)
            )
            suites = fields.get("Suites", "").split()
            if SUITE in suites and "URIs" in fields:
                return fields["URIs"].split()[0]
    one_line = Path("/etc/apt/sources.list")
    if one_line.is_file():
        for line in one_line.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return parts[1]
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def base_image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A minimal Debian image, made once and kept: debootstrap takes ~40 s."""
    if podman.ok("image", "exists", BASE_IMAGE):
        return BASE_IMAGE
    debootstrap = tool("debootstrap", "debootstrap")
    rootfs = tmp_path_factory.mktemp("rootfs")
    started = time.monotonic()
    try:
        result = subprocess.run(
            [debootstrap, "--variant=minbase", SUITE, str(rootfs), debian_mirror()],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [podman.binary, "import", "-", BASE_IMAGE],
            stdin=tar.stdout,
            capture_output=True,
            env=podman.env,
            timeout=300,
            check=False,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        assert tar.wait(timeout=60) == 0
        assert imported.returncode == 0, imported.stderr.decode()[-3000:]
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    log(f"base image {BASE_IMAGE} made in {time.monotonic() - started:.0f}s")
    return BASE_IMAGE


def ensure_wheels() -> None:
    """Wheels of every runtime and build dependency for the image's Python, downloaded by
    the host's pip (which trusts the host's CA bundle) into deploy/wheels/; re-downloaded only
    when pyproject.toml's requirements change."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [*project["build-system"]["requires"], *project["project"]["dependencies"]]
    # pip download judges `python_full_version` markers by the host's Python, not the target's:
    # redis needs async-timeout below 3.11.3, and bookworm's Python is 3.11.2.
    requirements += IMAGE_ONLY_REQUIREMENTS
    arch = platform.machine()
    platforms = [f"manylinux_2_28_{arch}", f"manylinux2014_{arch}"]
    stamp = WHEELS / ".stamp"
    want = hashlib.sha256(json.dumps([requirements, IMAGE_PYTHON, platforms]).encode()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == want and any(WHEELS.glob("*.whl")):
        return
    for old in WHEELS.glob("*.whl"):
        old.unlink()
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--dest",
            str(WHEELS),
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            IMAGE_PYTHON,
            *(arg for p in platforms for arg in ("--platform", p)),
            *requirements,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        unavailable(f"cannot download wheels for the offline build:\n{result.stderr[-2000:]}")
    stamp.write_text(want + "\n")
    log(f"wheels downloaded in {time.monotonic() - started:.0f}s")


@pytest.fixture(scope="module")
def sfu_image(podman: Podman, base_image: str) -> str:
    ensure_wheels()
    previous = podman.run("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).strip()
    started = time.monotonic()
    podman.run(
        "build",
        # The docker format keeps HEALTHCHECK (OCI images have no such field).
        "--format",
        "docker",
        "--build-arg",
        f"BASE_IMAGE={base_image}",
        "--build-arg",
        "PIP_OFFLINE=1",
        "-t",
        IMAGE,
        str(ROOT),
        timeout=1500,
    )
    log(f"image {IMAGE} built in {time.monotonic() - started:.0f}s")
    drop_stale_builds(podman, previous)
    return IMAGE


def drop_stale_builds(podman: Podman, previous: str) -> None:
    """Each source change leaves the previous image and the previous build stage untagged;
    remove them so repeated runs do not fill the disk. Kept: the base, the apt layer, and
    the newest build stage (the pip layer's cache). Only images of this Dockerfile (whose
    history holds PIP_OFFLINE) are touched, never anyone else's."""
    current = podman.run("image", "inspect", "--format", "{{.Id}}", IMAGE).strip()
    if previous and previous != current:
        podman.run("rmi", previous, check=False)
    dangling = podman.run(
        "images", "--filter", "dangling=true", "--sort", "created", "--format", "{{.ID}}"
    ).split()  # newest first
    ours = [
        image
        for image in dangling
        if "PIP_OFFLINE"
        in podman.run("image", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    ]
    for image in ours[1:]:
        podman.run("rmi", image, check=False)


@dataclass
class Container:
    name: str
    http_port: int
    udp_port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def wait_ready(podman: Podman, container: Container, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if http_get(f"{container.base}/readyz")[0] == 200:
                return
        state = podman.run("inspect", "--format", "{{.State.Status}}", container.name).strip()
        if state != "running":
            break
        time.sleep(0.2)
    logs = podman.logs(container.name)
    raise AssertionError(f"container not ready within {timeout}s:\n{logs[-4000:]}")


@contextlib.contextmanager
def sfu_container(
    podman: Podman, image: str, c: Container, network: list[str], env: dict[str, str]
) -> Iterator[Container]:
    """`image` running as container `c` with the hardening of the Compose files and the
    Kubernetes securityContext (read-only root with only a tmpfs at /tmp: podman's own extra
    tmpfs mounts are turned off, so the root is as read-only as under Docker), deploy/sfu.yaml,
    the test secret and `env`; removed on the way out."""
    podman.run("rm", "--force", "--ignore", c.name)
    try:
        podman.run(
            "run",
            "--detach",
            "--name",
            c.name,
            *network,
            "--read-only",
            "--read-only-tmpfs=false",
            "--tmpfs=/tmp:size=1m,mode=1777",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            "--volume",
            f"{DEPLOY / 'sfu.yaml'}:/etc/sfu/sfu.yaml:ro",
            *(
                arg
                for key, value in {"SFU_AUTH__KEYS__PROD": SECRET, **env}.items()
                for arg in ("--env", f"{key}={value}")
            ),
            image,
        )
        wait_ready(podman, c)
        yield c
    finally:
        podman.run("rm", "--force", "--time", "0", "--ignore", c.name, check=False)


@pytest.fixture(scope="module")
def container(podman: Podman, sfu_image: str) -> Iterator[Container]:
    # Published like docker-compose.yml does, but on loopback and free ports. The UDP port is
    # the same number on both sides because the SFU announces the port it binds, together
    # with the address clients use (the host's, here 127.0.0.1), as compose does.
    c = Container(
        name=f"blindfold-deploy-test-{os.getpid()}",
        http_port=free_port(),
        udp_port=free_port(socket.SOCK_DGRAM),
    )
    published = [
        f"--publish=127.0.0.1:{c.http_port}:7880",
        f"--publish=127.0.0.1:{c.udp_port}:{c.udp_port}/udp",
    ]
    env = {
        "SFU_RTC__ANNOUNCED_IPS": "[127.0.0.1]",
        "SFU_RTC__UDP_PORT": str(c.udp_port),
        "SFU_DRAIN_TIMEOUT": f"{DRAIN}s",
    }
    with sfu_container(podman, sfu_image, c, published, env):
        yield c


def tokens() -> tuple[str, str]:
    # The same config and secret the container runs with, so the tokens verify there.
    config = load_config(DEPLOY / "sfu.yaml", env={"SFU_AUTH__KEYS__PROD": SECRET})
    pub = mint_token(config, room="deploy", identity="cam", publish=True, subscribe=False, ttl=300)
    sub = mint_token(
        config, room="deploy", identity="viewer", publish=False, subscribe=True, ttl=300
    )
    return pub, sub


def test_container_is_healthy_and_announces_the_published_port(
    podman: Podman, container: Container
) -> None:
    # `podman healthcheck run` executes the image's HEALTHCHECK (`sfu healthcheck`) now:
    # no systemd timers here to run it on schedule.
    deadline = time.monotonic() + 30
    while not podman.ok("healthcheck", "run", container.name):
        assert time.monotonic() < deadline, "HEALTHCHECK never passed"
        time.sleep(1)
    status, _, body = http_get(f"{container.base}/healthz")
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    assert http_get(f"{container.base}/readyz")[0] == 200
    assert podman.run("exec", container.name, "id", "-u").strip() == "10001"
    logs = podman.logs(container.name)
    assert f"ICE candidate udp 127.0.0.1:{container.udp_port}" in logs
    # The native fan-out core was compiled in the build stage and is in use; no compiler
    # made it into the runtime image.
    assert "forwarding with the native fast path" in logs
    version = podman.run("exec", container.name, "sfu", "version")
    assert "native fast path: available" in version, version
    for compiler in ("gcc", "cc"):
        assert not podman.ok("exec", container.name, "sh", "-c", f"command -v {compiler}")
    # deploy/sfu.yaml asks for JSON log lines; each one must parse.
    for line in logs.splitlines():
        if line.startswith("{"):
            json.loads(line)


async def test_e2ee_media_through_the_container(container: Container) -> None:
    pub_token, sub_token = tokens()
    sent: list[EncryptedFrame] = []
    received: list[EncryptedFrame] = []
    decoded = {"video": 0}
    consumers: list[asyncio.Task[None]] = []

    def on_track(track: Any) -> None:
        async def consume() -> None:
            with contextlib.suppress(Exception):
                while True:
                    await track.recv()
                    decoded[track.kind] = decoded.get(track.kind, 0) + 1

        consumers.append(asyncio.ensure_future(consume()))

    publication = await publish(
        f"{container.base}/whip/deploy/cam",
        pub_token,
        [ColourTrack((30, 160, 220))],
        E2eeConfig(send_kid=KID, send_key=KEY, on_frame=sent.append),
    )
    subscription = await subscribe(
        f"{container.base}/whep/deploy/cam",
        sub_token,
        E2eeConfig(receive_keys={KID: KEY}, on_frame=received.append),
        on_track=on_track,
    )
    try:
        # 40: the server counts a frame as enveloped only once the track's first 16 have
        # established its KID (docs/e2ee.md §8), so 20 must remain after those.
        await wait_for(
            lambda: decoded["video"] >= 40, timeout=30, what="decoded video through the container"
        )
    finally:
        await subscription.close()
        await publication.close()
    # What arrived is, frame for frame, the ciphertext the publisher made.
    by_ctr = {f.ctr: f.data for f in sent}
    assert len(received) >= 20
    assert all(by_ctr.get(f.ctr) == f.data for f in received)
    # And the server judged the frames enveloped, from the outside, without a key.
    _, _, body = http_get(f"{container.base}/metrics")
    series = re.findall(
        r'^sfu_e2ee_frames_total\{[^}]*envelope="sframe"[^}]*\} (\S+)$', body.decode(), re.M
    )
    assert sum(float(v) for v in series) >= 20
    plaintext = re.findall(
        r'^sfu_e2ee_frames_total\{[^}]*envelope="none"[^}]*\} (\S+)$', body.decode(), re.M
    )
    assert sum(float(v) for v in plaintext) == 0


def prometheus_query(base: str, query: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?query={urllib.parse.quote(query)}"
    status, _, body = http_get(url)
    assert status == 200, body
    result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
    return result


def test_real_prometheus_scrapes_the_container_with_the_project_rules(
    container: Container, tmp_path: Path
) -> None:
    binary = tool("prometheus", "prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
                "scrape_configs": [
                    {
                        "job_name": "blindfold-sfu",
                        "static_configs": [{"targets": [f"127.0.0.1:{container.http_port}"]}],
                    }
                ],
            }
        )
    )
    logfile = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=logfile,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # A target shows up == 1 only about 6 s after Prometheus starts.
        deadline = time.monotonic() + 40
        while True:
            with contextlib.suppress(OSError):
                up = prometheus_query(base, 'up{job="blindfold-sfu"}')
                if up and up[0]["value"][1] == "1":
                    break
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Prometheus never scraped the container"
            time.sleep(0.5)
        codecs = prometheus_query(base, "sfu_media_codecs_loaded")
        assert len(codecs) == 1
        assert codecs[0]["value"][1] == "0"
        # The project's alert rules load and evaluate against the real series without error,
        # and none fires for a healthy SFU. Rules evaluated before the first scrape may still
        # be pending (BlindfoldTargetMissing saw no `up` yet): give them a few evaluations.
        deadline = time.monotonic() + 15
        while True:
            status, _, body = http_get(f"{base}/api/v1/rules")
            assert status == 200
            rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
            active = [r["name"] for r in rules if r["state"] != "inactive"]
            if not active or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
        assert len(rules) == sum(len(g["rules"]) for g in groups)
        assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
        assert active == [], f"a healthy SFU triggers alerts: {active}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        logfile.close()


async def test_sigterm_drains_then_exits_zero(podman: Podman, container: Container) -> None:
    """podman stop sends the image's STOPSIGNAL (SIGTERM): with a call still open the server
    turns not-ready, waits drain_timeout for it, and exits 0 long before the SIGKILL."""
    pub_token, _ = tokens()
    publication = await publish(
        f"{container.base}/whip/deploy/held",
        pub_token,
        [ColourTrack()],
        E2eeConfig(send_kid=KID, send_key=KEY),
    )
    try:
        started = time.monotonic()
        # In a thread: the aiortc peer keeps running on this loop meanwhile.
        await asyncio.to_thread(
            podman.run, "stop", "--time", str(STOP_TIMEOUT), container.name, timeout=60
        )
        elapsed = time.monotonic() - started
        log(f"podman stop returned after {elapsed:.1f}s (drain_timeout {DRAIN}s)")
    finally:
        with contextlib.suppress(Exception):  # the server is gone: DELETE cannot succeed
            await publication.close()
    state = json.loads(podman.run("inspect", "--format", "{{json .State}}", container.name))
    logs = podman.logs(container.name)
    assert state["ExitCode"] == 0, logs[-3000:]
    assert elapsed < STOP_TIMEOUT - 5, f"stop took {elapsed:.1f}s: was the drain honoured?"
    assert "draining" in logs


# ---------------------------------------------------------------------------------------------
# Two nodes of a cluster, run as deploy/docker-compose.cluster.yml runs them (read-only root
# with a tmpfs at /tmp, two media workers each, `span` rooms) but on the host's network, as the
# Kubernetes overlay does, bound to loopback; Redis is the host's redis-server on loopback.


@contextlib.contextmanager
def cluster_node(podman: Podman, image: str, name: str, redis_url: str) -> Iterator[Container]:
    node = Container(
        name=f"blindfold-deploy-{name}-{os.getpid()}",
        http_port=free_port(),
        udp_port=free_port(socket.SOCK_DGRAM),
    )
    env = {
        "SFU_HTTP__HOST": "127.0.0.1",
        "SFU_HTTP__PORT": str(node.http_port),
        "SFU_RTC__BIND_HOST": "127.0.0.1",
        "SFU_RTC__UDP_PORT": str(node.udp_port),
        "SFU_RTC__ANNOUNCED_IPS": "[127.0.0.1]",
        "SFU_RTC__WORKERS": "2",
        "SFU_CLUSTER__ENABLED": "true",
        "SFU_CLUSTER__REDIS_URL": redis_url,
        "SFU_CLUSTER__NODE_ID": name,
        "SFU_CLUSTER__ADVERTISED_URL": node.base,
        "SFU_CLUSTER__HEARTBEAT_INTERVAL": "0.5",
        "SFU_CLUSTER__NODE_TTL": "2",
    }
    with sfu_container(podman, image, node, ["--network=host"], env):
        yield node


async def test_a_room_spans_two_containers_and_survives_one(
    podman: Podman, sfu_image: str, redis_url: str
) -> None:
    """E2EE participants on two containerised nodes decode each other across the node relay;
    the node of one is killed and that participant is back through the other by itself."""
    from tests.cluster.support import join_all, left, participant, until

    config = load_config(DEPLOY / "sfu.yaml", env={"SFU_AUTH__KEYS__PROD": SECRET})
    with (
        cluster_node(podman, sfu_image, "c1", redis_url) as c1,
        cluster_node(podman, sfu_image, "c2", redis_url) as c2,
    ):
        # Each node learns the other at its next heartbeat; alice is given no fallback and
        # finds c2 through her `joined`.
        for node, other in ((c1, "c2"), (c2, "c1")):
            known = f'sfu_cluster_node_load{{node="{other}"}}'.encode()
            await until(
                lambda node=node, known=known: known in http_get(f"{node.base}/metrics")[2],
                f"{node.name} seeing {other}",
                10,
            )
        alice = participant("alice", _Url(c1.base), [], server_config=config)
        bob = participant("bob", _Url(c2.base), [], server_config=config)
        observer = participant("carol", _Url(c2.base), [], keyed=False, server_config=config)
        async with left([alice, bob, observer]):
            await join_all([alice, bob], observer)

            def decoding(since: dict[str, dict[str, int]]) -> bool:
                return (
                    alice.seen.get("bob", 0) >= since["alice"].get("bob", 0) + 10
                    and bob.seen.get("alice", 0) >= since["bob"].get("alice", 0) + 10
                )

            await until(lambda: decoding({"alice": {}, "bob": {}}), "decoding across nodes", 40)
            assert observer.seen == {}, "a keyless observer decoded frames"
            _, _, metrics = http_get(f"{c1.base}/metrics")
            assert re.search(rb"^sfu_cluster_relays 1\.0$", metrics, re.M), metrics[-2000:]
            assert re.search(rb"^sfu_media_workers 2\.0$", metrics, re.M)

            killed_at = time.monotonic()
            podman.run("kill", "--signal", "KILL", c1.name)
            await until(lambda: alice.rejoined_at is not None, "alice rejoining through c2", 15)
            assert alice.client.base_url == c2.base
            before = {"alice": dict(alice.seen), "bob": dict(bob.seen)}
            await until(lambda: decoding(before), "decoding again after the kill", 20)
            log(f"container node killed: alice back in {alice.rejoined_at - killed_at:.2f} s")


@dataclass
class _Url:
    url: str
