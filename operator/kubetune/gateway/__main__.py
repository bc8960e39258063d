"""Run the gateway: ``python -m kubetune.gateway --config gateway.json --host 127.0.0.1 --port 8080``.

``kubetune gateway`` takes the same arguments: both build them with ``add_arguments`` and run them
with ``run``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

DEFAULT_PORT = 8080


def _if_installed(implementation: str) -> str:
    """uvicorn's ``loop`` / ``http`` setting: this implementation when it is installed (uvloop and
    httptools take about 1 ms off each gateway request), else uvicorn's own pick."""
    return implementation if importlib.util.find_spec(implementation) is not None else "auto"


def serve(
    config_path: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    reload_interval_seconds: float = 1.0,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve the gateway for ``config_path`` until interrupted (blocks).

    The config is validated first, so a bad file fails here with GatewayConfigError naming the
    field, before any port is bound. Later changes to the file are picked up while serving.
    """
    import uvicorn

    from kubetune.gateway.app import create_app
    from kubetune.gateway.config import load_gateway_config

    load_gateway_config(config_path)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config_path, reload_interval_seconds=reload_interval_seconds)
    # Everything loaded so far (the web stack, pydantic, scipy) lives as long as the process: keep it
    # out of the collector's full passes, which the request path's garbage triggers and which would
    # otherwise walk all those objects each time.
    gc.freeze()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        loop=_if_installed("uvloop"),
        http=_if_installed("httptools"),
        ws="none",
        server_header=False,  # no "server: uvicorn" on every answer: the gateway names no internals
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's command-line arguments (``python -m kubetune.gateway`` and ``kubetune gateway``)."""
    parser.add_argument("--config", required=True, help="gateway config file (JSON); reloaded on change")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})"
    )
    parser.add_argument("--reload-interval", type=float, default=1.0, help="seconds between config checks")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="uvicorn's log level",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request (costs latency)")


def run(args: argparse.Namespace) -> int:
    """Serve with parsed ``add_arguments`` arguments; 2 (with the field named on stderr) for a bad
    config."""
    from kubetune.gateway.config import GatewayConfigError

    try:
        serve(
            args.config,
            args.host,
            args.port,
            reload_interval_seconds=args.reload_interval,
            log_level=args.log_level,
            access_log=args.access_log,
        )
    except GatewayConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.gateway", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
