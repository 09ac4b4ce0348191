#!/usr/bin/env bash
# Set everything up and run the SFU. No arguments: the embedded dev config (loopback,
# dev API key, HTTP on 127.0.0.1:7880, media on UDP 7882). Extra arguments go to
# `sfu serve`, e.g. scripts/run.sh --config config/sfu.yaml
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_venv ""
exec "$VENV/bin/sfu" serve "$@"
