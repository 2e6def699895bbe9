"""The ``datastore`` command line.

``datastore serve`` runs a store: one DirectoryHandler per ``--prefix`` on
``ROOT/PREFIX``, catalogues and transfer state in the state directory.
Settings come from flags, then ``DATASTORE_*`` variables, then ``--config``
(TOML); see ``datastore serve --help``. User errors print one line and exit
with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import Settings, SettingsError, load_settings, settings_help
from .handlers.directory import DirectoryHandler
from .server import HTTPTransferServer


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="datastore", description="An HTTP file store.")
    parser.add_argument("--version", action="version", version=f"datastore {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    serve = commands.add_parser(
        "serve",
        help="run the file store",
        description="Run the file store.",
        epilog="Every setting (flags, DATASTORE_* variables, TOML keys):\n" + settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--root", type=Path, help="directory holding one folder per prefix (default ./data)")
    serve.add_argument("--state-dir", type=Path, help="transfer state and catalogues (default ROOT/.datastore)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8006)")
    serve.add_argument(
        "--prefix",
        dest="prefixes",
        action="append",
        metavar="NAME",
        help="serve ROOT/NAME under /NAME/ (repeatable; default: files)",
    )
    serve.add_argument(
        "--overwrite", action="store_true", default=None, help="let uploads replace files of the same name"
    )
    serve.add_argument("--config", type=Path, help="TOML file with settings")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2  # pragma: no cover - argparse refuses unknown commands


def serve(args: argparse.Namespace) -> int:
    """``datastore serve``."""
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    flags = {
        "root": args.root,
        "state_dir": args.state_dir,
        "host": args.host,
        "port": args.port,
        "prefixes": tuple(args.prefixes) if args.prefixes else None,
        "overwrite": args.overwrite,
    }
    try:
        settings = load_settings(flags, os.environ, args.config)
    except SettingsError as exc:
        print(f"datastore: {exc}", file=sys.stderr)
        return 2
    server = make_server(settings)

    def ready(url: str) -> None:
        for prefix in settings.prefixes:
            print(f"datastore: serving {settings.root / prefix} at {url}/{prefix}/", flush=True)

    try:
        server.run(on_ready=ready)
    except OSError as exc:
        print(f"datastore: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def make_server(settings: Settings) -> HTTPTransferServer:
    """A plain-HTTP server with a DirectoryHandler for every configured prefix."""
    server = HTTPTransferServer(settings)
    catalogues = settings.effective_state_dir / "catalogue"
    for prefix in settings.prefixes:
        handler = DirectoryHandler(
            settings.root / prefix, catalogue=catalogues / f"{prefix}.sqlite3", overwrite=settings.overwrite
        )
        server.register_prefix(prefix, handler)
    return server
