"""Debian's Chromium as the tests start it (docs/testing.md explains the flags).

Loopback ICE candidates need --allow-loopback-in-peer-connection, and mDNS obfuscation would
hide them; the background-networking flags keep Chromium off a network it cannot reach.
"""

from __future__ import annotations

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]
