"""Blindfold: a WebRTC SFU that forwards end-to-end-encrypted media without seeing it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("blindfold-sfu")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
