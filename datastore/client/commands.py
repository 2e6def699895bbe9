"""The client half of the command line: ``upload``, ``download``, ``ls``, ``status``, ``cancel``,
``watch``.

Progress goes to standard error as rich progress bars (one per file and a
total); results go to standard output, as text or, with ``--json``, as JSON.
An upload prints its transfer key first, so an interrupted run can be
continued with ``--resume KEY``. Every failure is one line on standard error
and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .client import ClientError, DataStoreClient, LocalFile, client_ssl_context


def run_client_command(args: argparse.Namespace) -> int:
    """Run one client command; return the exit status."""
    try:
        base, prefix = split_url(args.url)
        context = _ssl_context(args, base)
    except ClientError as exc:
        print(f"datastore: {exc}", file=sys.stderr)
        return 2
    command: Callable[[DataStoreClient, argparse.Namespace, str], Any] = {
        "upload": _upload,
        "download": _download,
        "ls": _list,
        "status": _status,
        "cancel": _cancel,
        "watch": _watch,
    }[args.command]
    try:
        token = _token(args)
    except ClientError as exc:
        print(f"datastore: {exc}", file=sys.stderr)
        return 2
    options: dict[str, Any] = {"ssl": context, "identity": args.identity, "token": token}
    if args.command == "upload":
        options["chunk_size"] = args.chunk_size

    async def run() -> Any:
        async with DataStoreClient(base, **options) as client:
            return await command(client, args, prefix)

    try:
        result = asyncio.run(run())
    except KeyboardInterrupt:
        print("datastore: interrupted", file=sys.stderr)
        return 130
    except ClientError as exc:
        print(f"datastore: {exc}", file=sys.stderr)
        return 1
    except aiohttp.ClientConnectorCertificateError as exc:
        print(f"datastore: TLS certificate problem with {base}: {exc.certificate_error}", file=sys.stderr)
        return 1
    except aiohttp.ClientConnectorError as exc:
        print(f"datastore: cannot connect to {base}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, ssl.SSLError, TimeoutError) as exc:
        print(f"datastore: {base}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"datastore: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.json and args.command != "watch":
        print(json.dumps(result, indent=2))
    return 0


def split_url(url: str) -> tuple[str, str]:
    """``http://host:8006/files/x`` -> (``http://host:8006``, ``files``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ClientError(f"not an http(s) URL: {url!r}")
    segments = [segment for segment in parts.path.split("/") if segment]
    return f"{parts.scheme}://{parts.netloc}", segments[0] if segments else ""


def _ssl_context(args: argparse.Namespace, base: str) -> ssl.SSLContext | None:
    if not base.startswith("https:"):
        if args.cert or args.cacert:
            raise ClientError("--cacert/--cert/--key need an https URL")
        return None
    try:
        return client_ssl_context(args.cacert, args.cert, args.key)
    except FileNotFoundError as exc:
        raise ClientError(f"{exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise ClientError(f"cannot load the TLS files: {exc}") from None


async def _upload(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    if not prefix:
        raise ClientError("name the prefix in the URL, e.g. http://127.0.0.1:8006/files/")
    console = Console(stderr=True)
    quiet = args.quiet or args.json
    bars = _progress(console, quiet)
    tasks: dict[str, TaskID] = {}
    sent: dict[str, int] = {}
    total = bars.add_task("total", total=None, visible=False)

    def announce(key: str, files: list[LocalFile]) -> None:
        bars.update(total, total=sum(f.size for f in files), visible=len(files) > 1)
        if not quiet:
            console.print(f"transfer key {key} (continue an interrupted run with --resume {key})")

    def progress(name: str, done_bytes: int, size: int, file_done: bool, transfer_done: bool) -> bool:
        if name not in tasks:
            tasks[name] = bars.add_task(name, total=size)
        sent[name] = done_bytes
        bars.update(tasks[name], completed=done_bytes)
        bars.update(total, completed=sum(sent.values()))
        return False

    with bars:
        results = await client.upload(prefix, args.paths, progress=progress, resume=args.resume, on_registered=announce)
    if args.json:
        return [
            {
                "name": r.name,
                "size": r.size,
                "md5": r.md5,
                "sha256": r.sha256,
                "url": r.url,
                "transfer_key": r.transfer_key,
            }
            for r in results
        ]
    if not args.quiet:
        for r in results:
            print(f"{r.url}  {r.size} bytes  sha256 {r.sha256}")
    return None


async def _download(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    console = Console(stderr=True)
    bars = _progress(console, args.quiet or args.json)
    task = bars.add_task("download", total=None)

    def progress(done_bytes: int, size: int, done: bool) -> bool:
        bars.update(task, completed=done_bytes, total=size if size >= 0 else None)
        return False

    with bars:
        result = await client.download(args.url, args.output, resume=not args.no_resume, progress=progress)
    if args.json:
        return {
            "path": str(result.path),
            "size": result.size,
            "sha256": result.sha256,
            "verified": result.verified,
            "resumed_from": result.resumed_from,
        }
    if not args.quiet:
        check = "verified" if result.verified else "not verified (the server sent no digest)"
        resumed = f", resumed at byte {result.resumed_from}" if result.resumed_from else ""
        print(f"{result.path}  {result.size} bytes  sha256 {result.sha256} {check}{resumed}")
    return None


async def _list(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    if not prefix:
        raise ClientError("name the prefix in the URL, e.g. http://127.0.0.1:8006/files/")
    files = await client.list(prefix)
    if args.json:
        return files
    for entry in files:
        owner = entry.get("owner") or "anonymous"
        print(f"{entry['size']:>14}  {entry['name']}  {owner}  sha256 {entry['sha256']}")
    return None


async def _status(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    status = await client.status(args.transfer_key)
    return status if args.json else _print_status(status)


async def _cancel(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    status = await client.cancel(args.transfer_key)
    return status if args.json else _print_status(status)


async def _watch(client: DataStoreClient, args: argparse.Namespace, url_prefix: str) -> Any:
    """Print events as they happen (one line each, or JSON lines); reconnects after a dropped connection."""
    prefix = args.prefix or url_prefix or None
    after = args.after

    def reconnecting(last: int | None, error: BaseException) -> None:
        if not args.quiet:
            since = f" after event {last}" if last is not None else ""
            print(
                f"datastore: the stream broke ({error or type(error).__name__}); reconnecting{since}", file=sys.stderr
            )

    async for event in client.events(prefix, key=args.transfer, after=after, on_reconnect=reconnecting):
        if args.json:
            print(json.dumps(event, separators=(",", ":")), flush=True)
        else:
            print(_event_line(event), flush=True)


def _event_line(event: dict[str, Any]) -> str:
    """``2026-12-04T18:00:00Z  #12  file.completed  files/a.bin  1048576 bytes  (reason)``."""
    where = event["prefix"] + (f"/{event['name']}" if event.get("name") else "")
    parts = [event["time"], f"#{event['id']}", event["type"], where]
    if event.get("bytes") is not None:
        total = f"/{event['size']}" if event.get("size") is not None and event["size"] != event["bytes"] else ""
        parts.append(f"{event['bytes']}{total} bytes")
    if event.get("owner"):
        parts.append(f"by {event['owner']}")
    if event.get("reason"):
        parts.append(f"({event['reason']})")
    return "  ".join(parts)


def _print_status(status: dict[str, Any]) -> None:
    print(f"{status['transfer_key']}  {status['state']}  expires {status['expires_at']}")
    for entry in status["files"]:
        print(f"  {entry['num']:>4}  {entry['state']:<11} {entry['received']:>14}/{entry['size']:<14} {entry['name']}")


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: ``--token``, else ``--token-file``, else ``$DATASTORE_TOKEN``, else none."""
    if args.token:
        return str(args.token).strip()
    if args.token_file:
        try:
            with open(args.token_file, encoding="ascii") as handle:
                return handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ClientError(f"cannot read the token file {args.token_file}: {exc}") from None
    return os.environ.get("DATASTORE_TOKEN", "").strip() or None


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        # Bars only for a person at a terminal; logs and pipes get the results alone.
        disable=quiet or not console.is_terminal,
        # The bars go when the command ends, so a failure is one line and a
        # success ends with the results alone.
        transient=True,
    )
