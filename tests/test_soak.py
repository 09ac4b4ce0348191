"""A short run of the soak (bench/soak.py): a real SFU process under room, WHIP and WHEP churn
and a UDP junk flood while one E2EE call runs; the call must keep every frame and the server
must come back to idle. The hour-long run and its numbers are in docs/reliability.md."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env

pytest.importorskip("matplotlib", reason="the soak draws its plot with matplotlib (bench extra)")


@pytest.mark.slow
def test_a_short_soak_keeps_every_frame_and_returns_to_idle(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "soak.py"),
            "--minutes",
            "0.3",
            "--sample-every",
            "5",
            "--live-every",
            "6",
            "--flood-rate",
            "1000",
            "--settle",
            "20",
            # Warm-up growth fills all of an 18 s run; RSS trends need the long run.
            "--max-rss-growth-mib",
            "1024",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )
    log = f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
    assert run.returncode == 0, log

    with (out / "soak.csv").open() as f:
        rows = list(csv.DictReader(f))
    phases = [row["phase"] for row in rows]
    assert phases[0] == "baseline", phases
    assert phases[-1] == "end", phases
    assert phases.count("load") >= 2, phases
    assert all(int(row["rss_kib"]) > 0 and int(row["fds"]) > 0 for row in rows)
    assert (out / "soak.png").stat().st_size > 10_000

    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == []
    call = summary["call"]
    for kind in ("audio", "video"):
        assert call["lost"][kind] == 0, call
        # 18 s of load at 50 audio and 30 video frames/s, less the subscriber's start.
        assert call["kept"][kind] >= 200, call
    assert call["rejected"] == 0
    assert summary["flood"]["total"] >= 5000, summary["flood"]
    churn = summary["churn"]
    assert churn["errors"] == 0, churn
    for key in ("room_cycles", "whip_created", "whep_created"):
        assert churn[key] >= 10, churn
    assert churn["live_subscribers"] >= 1, churn
    assert summary["fds"]["end"] <= summary["fds"]["baseline"]
    assert summary["busy_gauges_at_end"] == {}
