# Blindfold SFU image.
#   docker build -t blindfold-sfu .
#   docker run --rm -p 7880:7880 -p 7882:7882/udp \
#     -e SFU_AUTH__KEYS='{prod: "<32+ character secret>"}' \
#     -e SFU_RTC__ANNOUNCED_IPS='[<public IP of the host>]' blindfold-sfu
# BASE_IMAGE may be any Debian-based image: an official python:*-slim one, or a local
# Debian root file system where no registry is reachable (Python is installed if missing).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian's own python3 only where the base has none (official python images bring theirs).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM base AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The native fan-out core is compiled here; the compiler and headers stay in this stage.
# hadolint ignore=DL3008
RUN if python3 -c 'import os, sysconfig, sys; \
sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'; \
    then headers=; else headers=python3-dev; fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev ${headers:+"$headers"} \
    && rm -rf /var/lib/apt/lists/*
# Builds that cannot reach PyPI: put wheels of every dependency (plus setuptools and wheel)
# into deploy/wheels/ and pass --build-arg PIP_OFFLINE=1; pip then reads that folder only
# (docs/deployment.md). The folder exists in every checkout, so this COPY never fails; it
# stays in this stage and never reaches the final image.
ARG PIP_OFFLINE=0
COPY deploy/wheels /wheels
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY sfu ./sfu
# A self-contained venv, copied whole into the final stage: no compiler or pip cache ships.
RUN if [ "$PIP_OFFLINE" = 1 ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; fi \
    && python3 -m venv /opt/sfu && /opt/sfu/bin/pip install --no-compile . \
    && /opt/sfu/bin/python -c "import sfu.cli, sfu.app, sfu.media._fastpath"

FROM base
LABEL org.opencontainers.image.title="Blindfold SFU" \
      org.opencontainers.image.description="WebRTC SFU for end-to-end-encrypted calls" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sfu
COPY --from=build /opt/sfu /opt/sfu
COPY config/sfu.yaml /etc/sfu/sfu.yaml
# A container is reached from outside its loopback, so it listens on all interfaces and
# runs in production mode: it refuses to start until SFU_AUTH__KEYS (or a mounted config)
# gives it secrets of its own. docs/deployment.md has the details.
ENV PATH="/opt/sfu/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    SFU_CONFIG=/etc/sfu/sfu.yaml \
    SFU_DEV_MODE=false \
    SFU_HTTP__HOST=0.0.0.0 \
    SFU_RTC__BIND_HOST=0.0.0.0
USER 10001
EXPOSE 7880/tcp 7882/udp
# The server handles SIGTERM itself (drain, then exit 0), so it can run as PID 1.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["sfu", "healthcheck"]
ENTRYPOINT ["sfu"]
CMD ["serve"]
