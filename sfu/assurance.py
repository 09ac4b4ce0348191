"""Evidence for operators that the server cannot read media: measured, never asserted.

`codecs_loaded()` looks at what this process actually has in memory at the moment it is asked
(Python modules imported, shared objects mapped), so a dependency that starts importing a
codec library shows up on the next scrape instead of hiding behind a constant.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Python packages that wrap media codecs (PyAV carries FFmpeg; aiortc imports PyAV).
CODEC_MODULES = ("av", "aiortc", "cv2", "pyogg", "opuslib")
# Codec shared objects, matched on the file name of each mapping.
CODEC_LIBRARIES = re.compile(
    r"lib(avcodec|avformat|avfilter|swscale|swresample|vpx|opus|x264|x265|dav1d|aom|"
    r"SvtAv1Enc|SvtAv1Dec|openh264|theora|vorbis)[-.]"
)
_MAPS = Path("/proc/self/maps")


def codecs_loaded() -> list[str]:
    """Names of codec modules imported and codec libraries mapped into this process."""
    found = sorted(name for name in CODEC_MODULES if name in sys.modules)
    try:
        maps = _MAPS.read_text()
    except OSError:  # not Linux: the module check is all there is
        return found
    libraries = set()
    for line in maps.splitlines():
        path = line.rsplit(" ", 1)[-1]
        name = path.rsplit("/", 1)[-1]
        if CODEC_LIBRARIES.match(name):
            libraries.add(name)
    return found + sorted(libraries)
