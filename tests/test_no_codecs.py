"""The server must never load a media codec: importing aiortc drags in PyAV and FFmpeg."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_server_modules_import_no_aiortc_or_av() -> None:
    # Every server module, in a fresh interpreter (this test process has aiortc installed
    # and other tests may import it).
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "sfu").rglob("*.py")
        if "client" not in path.relative_to(ROOT).parts and path.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('aiortc', 'av'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert len(modules) > 5
    assert result.stdout.strip() == ""


def test_codec_gauge_measures_what_is_really_loaded() -> None:
    # Fresh interpreters: the server's modules alone, then the same after importing aiortc.
    code = (
        "import sys, sfu.app\n"
        "from sfu.assurance import codecs_loaded\n"
        "print(len(codecs_loaded()))\n"
        "import aiortc\n"
        "print(' '.join(codecs_loaded()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    before, after = result.stdout.splitlines()
    assert before == "0"
    assert "av" in after.split()
    assert "aiortc" in after.split()
    assert any(name.startswith("libavcodec") for name in after.split())
