"""Builds the optional native fan-out core (sfu/media/_fastpath.c); everything else about
the package is in pyproject.toml. Without a C compiler the build goes on without it and the
SFU runs its pure-Python path (rtc.fastpath: auto logs one warning line)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sfu.media._fastpath",
            ["sfu/media/_fastpath.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
