"""The `sfu` command: serve, check-config, token, schema, version.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence

from sfu import __version__
from sfu.config import ENV_CONFIG_FILE, Config, ConfigError, load_config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfu",
        description="Blindfold: a WebRTC SFU that forwards end-to-end-encrypted media "
        "without ever seeing it.",
        epilog="Configuration: one YAML file (see config/sfu.yaml) plus SFU_SECTION__KEY "
        "environment overrides, e.g. SFU_RTC__UDP_PORT=7882.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the SFU",
        description="Run the SFU. With no config file, the embedded defaults run it in dev "
        "mode on 127.0.0.1 (HTTP 7880, media UDP 7882).",
    )
    _add_config_option(serve)

    check = sub.add_parser(
        "check-config",
        help="validate a config file and print every error",
        description="Validate FILE (with SFU_* environment overrides applied, as serve "
        "would). Prints every error with its key path; exits 0 if valid, 2 if not.",
    )
    check.add_argument("file", metavar="FILE", help="YAML config file")

    token = sub.add_parser(
        "token",
        help="mint an access token (JWT) for a room",
        description="Print an HS256 JWT for ROOM and IDENTITY, signed with a configured API "
        "key. Use it as 'Authorization: Bearer TOKEN' for WHIP/WHEP or to join a room.",
    )
    token.add_argument("--room", required=True, help="room name")
    token.add_argument("--identity", required=True, help="participant identity")
    token.add_argument("--name", help="display name shown to other participants")
    token.add_argument("--publish", action="store_true", help="may publish media")
    token.add_argument("--subscribe", action="store_true", help="may subscribe to media")
    token.add_argument(
        "--ttl", default="1h", help="lifetime, e.g. 30m, 1h, 7d (default: %(default)s)"
    )
    token.add_argument(
        "--api-key", help="which key in auth.keys signs the token (default: the first one)"
    )
    _add_config_option(token)

    schema = sub.add_parser(
        "schema",
        help="print the config's JSON Schema or its key reference",
        description="Print the JSON Schema of the config file (for editors and CI), or the "
        "reference table of every key as Markdown.",
    )
    schema.add_argument("--format", choices=("json", "markdown"), default="json")

    health = sub.add_parser(
        "healthcheck",
        help="probe the local server's /healthz (for container HEALTHCHECK)",
        description="GET /healthz on this machine at the configured HTTP port; exit 0 if it "
        "answers 200, 1 otherwise.",
    )
    _add_config_option(health)
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")

    sub.add_parser("version", help="print the version", description="Print the version.")
    return parser


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get(ENV_CONFIG_FILE),
        help=f"YAML config file (default: ${ENV_CONFIG_FILE}, else the embedded dev config)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: str = args.command
    if command == "version":
        from sfu.media.fastpath import probe

        print(f"blindfold-sfu {__version__} (Python {platform.python_version()})")
        print(f"native fast path: {probe()[1]}; used unless rtc.fastpath is off")
        return EXIT_OK
    if command == "schema":
        return _schema(args.format)
    if command == "check-config":
        return _check_config(args.file)
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_USAGE
    if command == "token":
        return _token(config, args)
    if command == "healthcheck":
        return _healthcheck(config, args.timeout)
    return _serve(config)


def _load_or_report(path: str | None) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _check_config(path: str) -> int:
    try:
        load_config(path)
    except ConfigError as exc:
        print(exc)
        return EXIT_USAGE
    print(f"{path}: valid")
    return EXIT_OK


def _token(config: Config, args: argparse.Namespace) -> int:
    from sfu.control.auth import mint_token
    from sfu.units import parse_duration

    try:
        ttl = parse_duration(args.ttl)
        token = mint_token(
            config,
            room=args.room,
            identity=args.identity,
            publish=args.publish,
            subscribe=args.subscribe,
            ttl=ttl,
            api_key=args.api_key,
            name=args.name,
        )
    except ValueError as exc:
        print(f"sfu token: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(token)
    return EXIT_OK


def _schema(fmt: str) -> int:
    from sfu.config import json_schema
    from sfu.docs import config_reference_markdown

    if fmt == "json":
        print(json.dumps(json_schema(), indent=2))
    else:
        print(config_reference_markdown(), end="")
    return EXIT_OK


def _healthcheck(config: Config, timeout: float) -> int:
    import ssl
    import urllib.error
    import urllib.request

    http = config.http
    # A wildcard listen address is reachable on loopback; a specific one only on itself.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(http.host, http.host)  # noqa: S104
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if http.tls.cert_file else "http"
    context = None
    if scheme == "https":
        # The probe runs beside the server and only asks "are you alive": the certificate
        # names a public host, not loopback, so it cannot be verified here.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    url = f"{scheme}://{host}:{http.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310
            status = int(response.status)
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{url}: {status}")
    return EXIT_OK if status == 200 else EXIT_FAILURE


def _serve(config: Config) -> int:
    from sfu.app import log_secrets, run
    from sfu.logs import setup_logging

    setup_logging(config.logging.level, config.logging.json_lines, log_secrets(config))
    return run(config)
