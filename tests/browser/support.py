"""Helpers for the real-browser tests: the skip/fail rule, fake-device media files, Chromium
launch flags, a driver for the demo page, and a scanner for a process's memory."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import struct
import wave
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.chromium import CHROMIUM_FLAGS
from tests.conftest import unavailable

CHROMIUM = os.environ.get("BLINDFOLD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


# The fake camera's four quadrants (top-left, top-right, bottom-left, bottom-right), RGB.
QUADRANTS: list[tuple[int, int, int]] = [
    (220, 40, 40),
    (40, 200, 60),
    (40, 60, 220),
    (230, 210, 40),
]


def require_browser() -> None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        unavailable("playwright is not installed (pip install playwright; no browser download)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        unavailable(f"chromium not found at {CHROMIUM} (Debian package chromium)")


# --- fake devices ---------------------------------------------------------------------------


def _yuv(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """BT.601 limited range, as Chromium reads I420."""
    r, g, b = rgb
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    return round(y), round(u), round(v)


def write_y4m(
    path: Path,
    quadrants: list[tuple[int, int, int]] = QUADRANTS,
    size: tuple[int, int] = (320, 240),
    frames: int = 15,
) -> Path:
    """A Y4M clip (I420) of four solid coloured quadrants, for --use-file-for-fake-video-capture."""
    width, height = size
    planes = {"y": bytearray(), "u": bytearray(), "v": bytearray()}
    for plane, scale in (("y", 1), ("u", 2), ("v", 2)):
        w, h = width // scale, height // scale
        index = "yuv".index(plane)
        for row in range(h):
            top = row < h // 2
            left = _yuv(quadrants[0 if top else 2])[index]
            right = _yuv(quadrants[1 if top else 3])[index]
            planes[plane] += bytes([left]) * (w // 2) + bytes([right]) * (w - w // 2)
    frame = b"FRAME\n" + bytes(planes["y"]) + bytes(planes["u"]) + bytes(planes["v"])
    header = f"YUV4MPEG2 W{width} H{height} F15:1 Ip A1:1 C420jpeg\n".encode()
    path.write_bytes(header + frame * frames)
    return path


def write_wav(path: Path, frequency: float | None, seconds: float = 1.0, rate: int = 48000) -> Path:
    """Mono 16-bit WAV: a sine tone (whole cycles, so it loops cleanly), or digital silence."""
    count = int(rate * seconds)
    if frequency is None:
        samples = bytes(2 * count)
    else:
        amplitude = 0.4 * 32767
        samples = struct.pack(
            f"<{count}h",
            *(
                round(amplitude * math.sin(2 * math.pi * frequency * i / rate))
                for i in range(count)
            ),
        )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples)
    return path


def colour_close(a: Iterable[int], b: Iterable[int], tolerance: int) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


# --- the demo page ------------------------------------------------------------------------


class PageDriver:
    """One Chromium context and its page, keeping the console and page errors (printed when
    a test fails)."""

    def __init__(self, context: Any, page: Any, name: str) -> None:
        self.context = context
        self.page = page
        self.name = name
        self.console: list[str] = []
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        page.on("pageerror", lambda err: self.console.append(f"pageerror: {err}"))


class BrowserPeer(PageDriver):
    """One Chromium (its own profile and fake devices) with the demo page open."""

    @classmethod
    async def launch(
        cls,
        playwright: Any,
        profile: Path,
        name: str,
        *,
        video: Path | None = None,
        audio: Path | None = None,
    ) -> BrowserPeer:
        args = list(CHROMIUM_FLAGS)
        if video is not None:
            args.append(f"--use-file-for-fake-video-capture={video}")
        if audio is not None:
            args.append(f"--use-file-for-fake-audio-capture={audio}")
        context = await playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=args,
            viewport={"width": 1000, "height": 800},
        )
        page = context.pages[0] if context.pages else await context.new_page()
        return cls(context, page, name)

    async def join(
        self, base: str, room: str, passphrase: str, *, extra: str = "", timeout: float = 20
    ) -> dict[str, Any]:
        """Open the page for `room` with `passphrase` in the fragment, fill the name, click
        Join, and wait until the room is connected. Returns our participant."""
        await self.page.goto(f"{base}/#room={room}&passphrase={passphrase}&test=1{extra}")
        await self.page.fill("#name-input", self.name)
        await self.page.click("#join-button")
        try:
            await self.page.wait_for_function(
                "() => window.blindfoldTest.joined", timeout=timeout * 1000
            )
        except Exception as exc:
            error = await self.page.text_content("#join-error")
            raise AssertionError(f"{self.name} did not join: {error!r}\n{self.log()}") from exc
        return await self.eval("() => window.blindfoldTest.self")

    async def eval(self, script: str, arg: Any = None) -> Any:
        return await self.page.evaluate(script, arg)

    async def stats(self) -> dict[str, Any]:
        return await self.eval("() => window.blindfoldTest.stats()")

    async def inbound(self, participant: str, kind: str) -> dict[str, Any] | None:
        stats = await self.stats()
        for entry in stats["inbound"]:
            if entry["participant"] == participant and entry["kind"] == kind:
                return entry
        return None

    async def peers(self) -> dict[str, Any]:
        return await self.eval("() => window.blindfoldTest.peers()")

    async def send_keys(self) -> list[dict[str, Any]]:
        return await self.eval("() => window.blindfoldTest.sendKeys()")

    async def keys(self) -> list[dict[str, Any]]:
        return await self.eval("() => window.blindfoldTest.keys()")

    async def sample(self, who: str) -> dict[str, Any] | None:
        return await self.eval("(who) => window.blindfoldTest.sampleVideo(who)", who)

    async def leave(self) -> None:
        await self.eval("() => window.blindfoldTest.leave()")

    async def close(self) -> None:
        await self.context.close()

    def problems(self) -> list[str]:
        """Uncaught page errors and CSP refusals seen in the console."""
        return [
            line
            for line in self.console
            if line.startswith("pageerror")
            or "Content Security Policy" in line
            or "Refused to" in line
        ]

    def log(self) -> str:
        return "\n".join(self.console[-40:])


async def eventually(check: Any, timeout: float, what: str, interval: float = 0.25) -> Any:
    """Await `check()` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


# --- memory ---------------------------------------------------------------------------------

_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


def scan_memory(pid: int, needles: dict[str, bytes]) -> tuple[dict[str, int], int]:
    """Count occurrences of each needle in every readable mapping of process `pid`.

    Returns (hits per needle name, bytes scanned). Regions are read in chunks that overlap by
    the longest needle, so a match across a chunk boundary is found once.
    """
    hits = dict.fromkeys(needles, 0)
    longest = max(len(n) for n in needles.values())
    chunk = 16 << 20
    scanned = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            match = _MAPS_LINE.match(line)
            if match is None:
                continue
            start, end, perms, name = (
                int(match[1], 16),
                int(match[2], 16),
                match[3],
                match[4],
            )
            if perms[0] != "r" or name in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                continue
            offset = start
            while offset < end:
                size = min(chunk + longest, end - offset)
                try:
                    mem.seek(offset)
                    data = mem.read(size)
                except OSError:
                    break  # e.g. a guard page or a mapping that vanished
                scanned += len(data)
                for key, needle in needles.items():
                    # Count only matches that start in this chunk's own part.
                    limit = min(chunk, len(data))
                    position = data.find(needle)
                    while 0 <= position < limit:
                        hits[key] += 1
                        position = data.find(needle, position + 1)
                offset += chunk
    return hits, scanned
