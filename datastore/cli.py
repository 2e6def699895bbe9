"""The ``datastore`` command line.

``datastore serve`` runs a store: one DirectoryHandler per ``--prefix`` on
``ROOT/PREFIX``, catalogues and transfer state in the state directory, plain
HTTP or TLS with client certificates. Settings come from flags, then
``DATASTORE_*`` variables, then ``--config`` (TOML); see ``datastore serve
--help``. ``datastore certs`` makes a CA, server and client certificates,
revokes them and writes the CRL. ``datastore tokens`` issues, lists and
revokes bearer tokens in the store's state directory (also while it runs). ``datastore migrate``
brings the state's schema up to date (or, with ``--check``, says what is pending) and exits.
``upload``, ``download``, ``ls``, ``status`` and ``cancel`` are the client, with progress bars (rich) and
``--json`` for scripts; ``datastore jobs`` submits, lists, follows and steers
transfer jobs; ``datastore invites`` lists and answers the invitations other stores ask
for. User errors print one line and exit non-zero (2 for a bad
command line); no tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .client.commands import run_client_command, run_invites_command, run_jobs_command
from .config import METRICS_ACCESS, Settings, SettingsError, load_settings, parse_duration, parse_size, settings_help
from .http.server import make_server
from .http.workers import run_workers
from .protocol.timestamps import iso_time
from .security.certs import DEFAULT_DIR, CertificateDirectory, CertificateError
from .security.logsafe import log_to_stderr
from .security.tokens import TokenError, TokenStore, bootstrap_admin_token, open_token_store, parse_actions, token_json


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
    serve.add_argument(
        "--state",
        dest="state_url",
        metavar="URL",
        help="the state store (default sqlite:///STATE_DIR/transfers.sqlite3)",
    )
    serve.add_argument(
        "--hook-url",
        dest="hook_urls",
        action="append",
        metavar="URL",
        help="POST every event to URL as JSON (repeatable)",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument(
        "--public-url", metavar="URL", help="the store's URL as clients reach it, e.g. behind a load balancer"
    )
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
    serve.add_argument("--workers", type=int, metavar="N", help="processes sharing the port and the state (default 1)")
    serve.add_argument("--node-id", metavar="NAME", help="this node's name in a shared state (default: the host name)")
    serve.add_argument("--config", type=Path, help="TOML file with settings")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    access = serve.add_argument_group("access")
    access.add_argument(
        "--allow",
        dest="policy",
        action="append",
        metavar="ACTION=AUDIENCE",
        help="open an action of every prefix: list, read or upload = anyone|users|admins, delete = owner|admins "
        "(repeatable; default: users may list, read and upload, owners delete)",
    )
    access.add_argument(
        "--trust-client-dn",
        action="store_true",
        default=None,
        help="take X-Client-DN headers as identities (AccessGrid 2.x clients on a trusted network only)",
    )
    access.add_argument(
        "--trusted-proxy",
        dest="trusted_proxies",
        action="append",
        metavar="ADDRESS",
        help="a load balancer (address or CIDR) whose X-Forwarded-For names the client (repeatable)",
    )
    access.add_argument(
        "--admin-subject",
        dest="admin_subjects",
        action="append",
        metavar="DN",
        help="a client-certificate subject (RFC 4514) that is an administrator (repeatable)",
    )
    access.add_argument(
        "--admin-issuer",
        metavar="DN",
        help="the issuer (RFC 4514) of the administrators' certificates (default: the one client CA)",
    )
    access.add_argument(
        "--metrics-access",
        choices=METRICS_ACCESS,
        help="who may read GET /_api/v1/metrics: admins (and tokens issued for metrics; the default), "
        "loopback (also anyone connecting from the loopback address) or anyone",
    )
    tls = serve.add_argument_group("TLS with client certificates")
    tls.add_argument("--tls", action="store_true", default=None, help="speak TLS on --port")
    tls.add_argument("--tls-port", type=int, metavar="N", help="add a TLS listener on N beside plain HTTP on --port")
    tls.add_argument("--cert", dest="tls_cert", type=Path, metavar="FILE", help="server certificate (PEM)")
    tls.add_argument("--key", dest="tls_key", type=Path, metavar="FILE", help="server private key (PEM)")
    tls.add_argument(
        "--client-ca",
        dest="tls_client_ca",
        type=Path,
        action="append",
        metavar="FILE",
        help="CA that signs client certificates (repeatable)",
    )
    tls.add_argument(
        "--crl", dest="tls_crl", type=Path, metavar="FILE", help="revocation list (PEM), reloaded on change"
    )

    migrate = commands.add_parser(
        "migrate",
        help="bring the state's schema up to this version and exit",
        description="Apply the schema migrations of every store of the configured state (the state store and "
        "its jobs, the catalogues, the tokens) and exit, printing what was applied. The state is read as serve "
        "reads it (--state, DATASTORE_STATE_URL, --config). serve migrates at start-up too; run migrate first "
        "for a controlled upgrade. Exit status: 0 done or current, 1 migrations pending (--check), 2 an error "
        "(a schema newer than this datastore, a database out of reach, bad settings).",
    )
    migrate.add_argument("--root", type=Path, help="the store's root (default ./data)")
    migrate.add_argument("--state-dir", type=Path, help="the store's state directory (default ROOT/.datastore)")
    migrate.add_argument("--state", dest="state_url", metavar="URL", help="the state store (as serve's --state)")
    migrate.add_argument(
        "--prefix", dest="prefixes", action="append", metavar="NAME", help="a served prefix (repeatable; as serve)"
    )
    migrate.add_argument("--config", type=Path, help="TOML file with settings")
    migrate.add_argument(
        "--check", action="store_true", help="only report pending migrations (exit status 1 if any), apply none"
    )

    certs = commands.add_parser(
        "certs",
        help="make a CA, server and client certificates, revoke them",
        description=f"Certificates for mutual TLS, written under --dir (default {DEFAULT_DIR}/).",
    )
    certs.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"where the files live (default {DEFAULT_DIR})")
    actions = certs.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    init = actions.add_parser("init", help="create the CA (ca.pem, ca.key); never overwrites one")
    init.add_argument("--org", default="datastore", help="organization name of the CA and its certificates")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    server = actions.add_parser("server", help="server certificate (server.pem, server.key)")
    server.add_argument("hostnames", nargs="+", metavar="HOSTNAME", help="DNS names or IP addresses it serves")
    server.add_argument("--days", type=int, default=397, help="validity in days (default 397)")
    client = actions.add_parser("client", help="client certificate (NAME.pem, NAME.key, NAME.p12)")
    client.add_argument("name", metavar="NAME", help="the certificate's CN and file name")
    client.add_argument("--org", help="organization (default: the CA's)")
    client.add_argument("--ou", help="organizational unit")
    client.add_argument("--country", help="two-letter country code")
    client.add_argument("--password", help="password of NAME.p12 (default: a random one, printed)")
    client.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    revoke = actions.add_parser("revoke", help="revoke NAME's certificate and rewrite crl.pem")
    revoke.add_argument("name", metavar="NAME")
    actions.add_parser("crl", help="rewrite crl.pem (before it expires, or after editing revoked.json)")

    tokens = commands.add_parser(
        "tokens",
        help="issue, list and revoke bearer tokens",
        description="Bearer tokens of the store whose state --root, --state-dir or --config name "
        "(the same settings as serve; the store may be running).",
    )
    tokens.add_argument("--root", type=Path, help="the store's root (default ./data)")
    tokens.add_argument("--state-dir", type=Path, help="the store's state directory (default ROOT/.datastore)")
    tokens.add_argument(
        "--state",
        dest="state_url",
        metavar="URL",
        help="the store's state, as serve --state; postgresql://... holds the tokens every node shares",
    )
    tokens.add_argument("--config", type=Path, help="TOML file with settings")
    token_actions = tokens.add_subparsers(dest="action", metavar="ACTION")
    token_actions.required = True
    create = token_actions.add_parser("create", help="issue a token (printed once, never stored)")
    create.add_argument("subject", metavar="SUBJECT", help="the identity the token is for, e.g. ada or a DN")
    create.add_argument(
        "--actions",
        default="read,upload",
        help="comma-separated: read, upload, delete, metrics, admin (default read,upload)",
    )
    create.add_argument("--prefix", dest="prefixes", action="append", metavar="NAME", help="limit to NAME (repeatable)")
    create.add_argument(
        "--expires", default="30d", metavar="DURATION", help="lifetime: 3600, 12h, 30d, 1y (default 30d)"
    )
    create.add_argument("--description", default="", help="a note for the list")
    create.add_argument("--json", action="store_true", help="print the token and its record as JSON")
    listing_tokens = token_actions.add_parser("ls", help="list tokens (never their secrets)")
    listing_tokens.add_argument("--all", action="store_true", help="also expired and revoked tokens")
    listing_tokens.add_argument("--json", action="store_true", help="print the list as JSON")
    revoke_token = token_actions.add_parser("revoke", help="revoke a token at once")
    revoke_token.add_argument("id", metavar="ID", help="the token's id (the hex after dst_)")

    client_options = argparse.ArgumentParser(add_help=False)
    client_options.add_argument("--cacert", metavar="FILE", help="CA certificate to trust for https (as curl)")
    client_options.add_argument("--cert", metavar="FILE", help="client certificate for the TLS server (as curl)")
    client_options.add_argument("--key", metavar="FILE", help="its private key (as curl)")
    client_options.add_argument(
        "--token", metavar="TOKEN", help="bearer token (default: $DATASTORE_TOKEN, or --token-file)"
    )
    client_options.add_argument("--token-file", metavar="FILE", help="read the bearer token from FILE")
    client_options.add_argument("--identity", metavar="DN", help="X-Client-DN to assert on plain HTTP")
    client_options.add_argument("--quiet", "-q", action="store_true", help="no progress, only errors")
    client_options.add_argument("--json", action="store_true", help="print the result as JSON")
    upload = commands.add_parser(
        "upload", parents=[client_options], help="upload files or folders", description="Upload files or folders."
    )
    upload.add_argument("url", metavar="URL", help="the prefix's URL, e.g. http://127.0.0.1:8006/files/")
    upload.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    upload.add_argument("--resume", metavar="KEY", help="continue the interrupted transfer KEY")
    upload.add_argument("--chunk-size", type=int, default=8 << 20, metavar="BYTES", help="bytes per request")
    download = commands.add_parser(
        "download", parents=[client_options], help="download a file (resumes a partial one)", description="Download."
    )
    download.add_argument("url", metavar="URL", help="the file's URL")
    download.add_argument("-o", "--output", metavar="PATH", help="file or folder to write (default: its name here)")
    download.add_argument("--no-resume", action="store_true", help="start again instead of resuming NAME.part")
    listing = commands.add_parser("ls", parents=[client_options], help="list a prefix", description="List a prefix.")
    listing.add_argument("url", metavar="URL", help="the prefix's URL")
    for action in ("status", "cancel"):
        command = commands.add_parser(
            action, parents=[client_options], help=f"{action} a transfer", description=f"{action.title()} a transfer."
        )
        command.add_argument("url", metavar="URL", help="the server's (or a prefix's) URL")
        command.add_argument("transfer_key", metavar="KEY")
    watch = commands.add_parser(
        "watch",
        parents=[client_options],
        help="print the store's events as they happen",
        description="Follow the store's events live (those of the prefixes you may list), reconnecting "
        "after a dropped connection without missing or repeating one. Stop with Ctrl-C.",
    )
    watch.add_argument("url", metavar="URL", help="the server's URL (or a prefix's: then only its events)")
    watch.add_argument("--prefix", help="only this prefix's events")
    watch.add_argument("--transfer", metavar="KEY", help="only this transfer's events (you must own it)")
    watch.add_argument("--after", type=int, metavar="ID", help="first the events after this id")
    _add_jobs(commands, client_options)
    _add_invites(commands, client_options)
    return parser


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1048576, 512K or 64M") from None


def _add_jobs(commands: Any, client_options: argparse.ArgumentParser) -> None:
    """``datastore jobs SUBCOMMAND URL ...``: the transfer jobs of the store at URL."""
    jobs = commands.add_parser(
        "jobs",
        help="submit, list, follow and steer transfer jobs (copies the store makes)",
        description="The transfer jobs of the store at URL (its base URL, e.g. http://127.0.0.1:8006): copies "
        "between local:/PREFIX/NAME, http(s)://HOST/PREFIX/NAME and rclone:REMOTE:PATH that the store runs.",
    )
    action = _store_actions(jobs, "job_command", client_options)

    submit = action("submit", "submit a job (prints its id)")
    submit.add_argument("ends", nargs="*", metavar="SOURCE DESTINATION", help="what to copy where (pairs)")
    submit.add_argument("--from-file", metavar="JOB.json", help='the job as the API\'s JSON ({"files": [...], ...})')
    submit.add_argument("--priority", type=int, metavar="N", help="1 (lowest) to 5 (default 3)")
    submit.add_argument(
        "--verify",
        choices=("none", "source", "destination", "both"),
        help="checksums to verify the copies against (default both)",
    )
    submit.add_argument("--retry", type=int, metavar="N", help="retries of a file after a transient failure")
    submit.add_argument("--retry-delay", type=_duration, metavar="SECONDS", help="pause before a retry")
    submit.add_argument(
        "--max-time-in-queue", type=_duration, metavar="DURATION", help="expire the job if it waits longer (12h, 2d)"
    )
    submit.add_argument("--deadline", metavar="ISO", help="expire the job at this time (2026-12-31T23:00:00Z)")
    submit.add_argument("--no-commit", action="store_true", help="submit only; start it later with commit")
    submit.add_argument("--submission-id", metavar="ID", help="submitting the same ID again returns the same job")
    submit.add_argument("--bandwidth", type=_size, metavar="SIZE", help="bytes per second per file (512K, 10M)")
    submit.add_argument("--chunk-size", type=_size, metavar="SIZE", help="bytes per request to the destination")
    submit.add_argument("--source-token-file", metavar="FILE", help="credential for the sources, read from FILE")
    submit.add_argument(
        "--destination-token-file", metavar="FILE", help="credential for the destinations, read from FILE"
    )
    submit.add_argument("--watch", action="store_true", help="then follow the job as watch does")
    for name, help in (
        ("commit", "commit a job submitted with --no-commit"),
        ("pause", "pause a queued or active job"),
        ("resume", "resume a paused or stopped job"),
        ("stop", "stop a job (its partial copies are kept for resume)"),
        ("retry", "queue again the files of a failed, dirty or expired job"),
        ("clear", "forget a job that is not committed, stopped or ended"),
    ):
        action(name, help).add_argument("id", metavar="ID", help="the job's id")
    priority = action("priority", "change the priority of a job that has not started")
    priority.add_argument("id", metavar="ID", help="the job's id")
    priority.add_argument("priority", type=int, metavar="N", help="1 (lowest) to 5")
    listing = action("ls", "list your jobs")
    listing.add_argument(
        "--state", dest="states", action="append", metavar="STATE", help="only jobs in STATE (repeatable)"
    )
    listing.add_argument("--all", action="store_true", help="everyone's jobs (administrators)")
    status = action("status", "show a job and each of its files")
    status.add_argument("id", metavar="ID", help="the job's id")
    watch = action("watch", "follow a job until it ends (exit 0 if FINISHED, else 1)")
    watch.add_argument("id", metavar="ID", help="the job's id")


def _add_invites(commands: Any, client_options: argparse.ArgumentParser) -> None:
    """``datastore invites SUBCOMMAND URL ...``: the invitations of the store at URL."""
    invites = commands.add_parser(
        "invites",
        help="list and answer invitations (other stores asking to copy files in or out)",
        description="The invitations of the store at URL (its base URL, e.g. http://127.0.0.1:8006): a store "
        "that asks to push files into one of its prefixes (or pull them out) without a credential waits for "
        "someone who may upload there to accept (with a byte budget), decline, extend or revoke it.",
    )
    action = _store_actions(invites, "invite_command", client_options)

    listing = action("ls", "list the pending invitations you may answer")
    listing.add_argument("--all", action="store_true", help="also those answered, revoked or expired")
    accept = action("accept", "accept a pending invitation: its token becomes a voucher")
    accept.add_argument("id", metavar="ID", help="the invitation's id")
    accept.add_argument(
        "--budget", type=_size, metavar="SIZE", help="bytes the voucher may move (10M, 1G; default the size asked)"
    )
    accept.add_argument(
        "--lifetime", type=_duration, metavar="DURATION", help="how long the voucher works (12h, 7d; default 30d)"
    )
    action("decline", "decline a pending invitation").add_argument("id", metavar="ID", help="the invitation's id")
    extend = action("extend", "add bytes to an accepted voucher's budget (a job paused for it resumes)")
    extend.add_argument("id", metavar="ID", help="the invitation's id")
    extend.add_argument("size", type=_size, metavar="SIZE", help="bytes to add (512K, 10M, 1G)")
    action("revoke", "revoke an invitation or its voucher at once").add_argument(
        "id", metavar="ID", help="the invitation's id"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "certs":
        return certs(args)
    if args.command == "tokens":
        return tokens(args)
    if args.command == "migrate":
        return migrate(args)
    if args.command == "jobs":
        return run_jobs_command(args)
    if args.command == "invites":
        return run_invites_command(args)
    return run_client_command(args)


def serve(args: argparse.Namespace) -> int:
    """``datastore serve``."""
    log_to_stderr(getattr(logging, str(args.log_level).upper(), logging.INFO))
    flags = {
        "root": args.root,
        "state_dir": args.state_dir,
        "state_url": args.state_url,
        "hook_urls": tuple(args.hook_urls) if args.hook_urls else None,
        "host": args.host,
        "port": args.port,
        "public_url": args.public_url,
        "prefixes": tuple(args.prefixes) if args.prefixes else None,
        "overwrite": args.overwrite,
        "workers": args.workers,
        "node_id": args.node_id,
        "tls": args.tls,
        "tls_port": args.tls_port,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": tuple(args.tls_client_ca) if args.tls_client_ca else None,
        "tls_crl": args.tls_crl,
        "policy": args.policy,
        "trust_client_dn": args.trust_client_dn,
        "admin_subjects": tuple(args.admin_subjects) if args.admin_subjects else None,
        "trusted_proxies": tuple(args.trusted_proxies) if args.trusted_proxies else None,
        "admin_issuer": args.admin_issuer,
        "metrics_access": args.metrics_access,
    }
    try:
        settings = load_settings(flags, os.environ, args.config)
        server = make_server(settings)
    except SettingsError as exc:
        print(f"datastore: {exc}", file=sys.stderr)
        return 2
    raise_file_limit()
    token_file = settings.effective_state_dir / ADMIN_TOKEN_FILE
    if asyncio.run(_bootstrap(settings, token_file)):
        print(f"datastore: first start: an administrator token is in {token_file} (see: datastore tokens --help)")

    def ready(urls: list[str]) -> None:
        for url in urls:
            note = " (TLS, client certificate required)" if url.startswith("https:") else ""
            for prefix in settings.prefixes:
                print(f"datastore: serving {settings.root / prefix} at {url}/{prefix}/{note}", flush=True)

    from .state.postgres_database import SchemaTooNew

    try:
        if settings.workers > 1:
            return run_workers(settings, logging.getLogger().level, ready)
        server.run(on_ready=ready)
    except SchemaTooNew as exc:
        print(f"datastore: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"datastore: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


#: The most file descriptors ``serve`` asks for (the hard limit may be far higher).
FILE_LIMIT = 65536


def raise_file_limit() -> None:
    """Raise this process's soft limit of open files toward its hard limit, as nginx does with
    worker_rlimit_nofile: the connection cap (max_connections) follows from it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FILE_LIMIT if hard == resource.RLIM_INFINITY else min(hard, FILE_LIMIT)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


#: Where the first start of a store leaves its administrator token, in the state directory.
ADMIN_TOKEN_FILE = "admin.token"  # noqa: S105 - a file name, not a secret


async def _bootstrap(settings: Settings, path: Path) -> bool:
    store = open_token_store(settings)
    try:
        return await bootstrap_admin_token(store, path)
    finally:
        await store.close()


def migrate(args: argparse.Namespace) -> int:
    """``datastore migrate [--check]``: bring the configured state's schema up to date (or report what is
    pending) and exit; 0 done or current, 1 pending (``--check``), 2 an error."""
    import psycopg

    from .state.schema import SchemaTooNew
    from .state.schema import migrate as migrate_state

    flags = {
        "root": args.root,
        "state_dir": args.state_dir,
        "state_url": args.state_url,
        "prefixes": tuple(args.prefixes) if args.prefixes else None,
    }
    try:
        settings = load_settings(flags, os.environ, args.config)
        steps = asyncio.run(migrate_state(settings, apply=not args.check))
    except SettingsError as exc:
        print(f"datastore migrate: {exc}", file=sys.stderr)
        return 2
    except SchemaTooNew as exc:
        print(f"datastore migrate: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"datastore migrate: the state database cannot be used: {reason}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"datastore migrate: {exc.filename or settings.effective_state_dir}: {exc.strerror}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        print(f"datastore migrate: a SQLite file of the state cannot be used: {exc}", file=sys.stderr)
        return 2
    pending = [step for step in steps if step.pending]
    for step in pending:
        print(f"{'pending' if args.check else 'applied'}: {step}")
    if not pending:
        current = ", ".join(f"{step.component} {step.target}" for step in steps)
        print(f"the schema is current: {current}")
    return 1 if args.check and pending else 0


def tokens(args: argparse.Namespace) -> int:
    """``datastore tokens ACTION``: works on the token store of the state (directory or database) directly."""
    try:
        flags = {"root": args.root, "state_dir": args.state_dir, "state_url": args.state_url}
        settings = load_settings(flags, os.environ, args.config)
    except SettingsError as exc:
        print(f"datastore tokens: {exc}", file=sys.stderr)
        return 2
    store = open_token_store(settings)

    async def run() -> int:
        try:
            return await _token_command(store, args)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except TokenError as exc:
        print(f"datastore tokens: {exc}", file=sys.stderr)
        return 2


async def _token_command(store: TokenStore, args: argparse.Namespace) -> int:
    now = time.time()
    if args.action == "create":
        try:
            lifetime = parse_duration(args.expires)
        except ValueError as exc:
            raise TokenError(str(exc)) from None
        issued = await store.create(
            args.subject,
            parse_actions(args.actions),
            prefixes=args.prefixes,
            lifetime=lifetime,
            description=args.description,
        )
        if args.json:
            print(json.dumps({**token_json(issued.record, now), "token": issued.token}, indent=2))
        else:
            print(issued.token)
            print(f"datastore tokens: issued {issued.record.id} for {issued.record.subject!r}", file=sys.stderr)
        return 0
    if args.action == "ls":
        records = [r for r in await store.list() if args.all or r.state(now) == "active"]
        if args.json:
            print(json.dumps([token_json(r, now) for r in records], indent=2))
        for record in [] if args.json else records:
            where = ",".join(sorted(record.prefixes)) if record.prefixes is not None else "*"
            print(
                f"{record.id}  {record.state(now):<7}  {','.join(sorted(record.actions)):<22} {where:<16}"
                f" expires {iso_time(record.expires_at)}  {record.subject}"
            )
        return 0
    revoked = await store.revoke(args.id)
    if revoked is None:
        print(f"datastore tokens: no token {args.id!r}", file=sys.stderr)
        return 1
    print(f"revoked {revoked.id} ({revoked.subject})")
    return 0


def certs(args: argparse.Namespace) -> int:
    """``datastore certs ACTION``."""
    directory = CertificateDirectory(args.dir)
    try:
        if args.action == "init":
            path = directory.init(organization=args.org, days=args.days)
            print(f"wrote {path} and {directory.path('ca', 'key')} (keep the key private)")
            print(f"wrote {directory.path('crl', 'pem')} (no certificate revoked yet)")
        elif args.action == "server":
            path = directory.issue_server(args.hostnames, days=args.days)
            print(f"wrote {path} and {directory.path('server', 'key')} for {', '.join(args.hostnames)}")
        elif args.action == "client":
            path, password = directory.issue_client(
                args.name,
                organization=args.org,
                unit=args.ou,
                country=args.country,
                password=args.password,
                days=args.days,
            )
            print(f"wrote {path}, {directory.path(args.name, 'key')} and {directory.path(args.name, 'p12')}")
            if args.password is None:
                print(f"password of {args.name}.p12: {password}")
        elif args.action == "revoke":
            serial = directory.revoke(args.name)
            print(f"revoked {args.name} (serial {serial:x}); wrote {directory.path('crl', 'pem')}")
        elif args.action == "crl":
            print(f"wrote {directory.write_crl()}")
    except CertificateError as exc:
        print(f"datastore certs: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"datastore certs: {exc.filename or args.dir}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


def _store_actions(
    command: argparse.ArgumentParser, dest: str, client_options: argparse.ArgumentParser
) -> Callable[[str, str], argparse.ArgumentParser]:
    """The subcommands of ``command`` (``jobs``, ``invites``): each takes the store's URL and the client
    options; returns what adds one."""
    actions = command.add_subparsers(dest=dest, metavar="SUBCOMMAND")
    actions.required = True

    def action(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, parents=[client_options], help=help, description=help[0].upper() + help[1:] + "."
        )
        parser.add_argument("url", metavar="URL", help="the store's URL, e.g. http://127.0.0.1:8006")
        return parser

    return action
