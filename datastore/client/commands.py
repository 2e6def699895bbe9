"""The client half of the command line: ``upload``, ``download``, ``ls``, ``status``, ``cancel``,
``watch``; ``datastore jobs ...`` and ``datastore invites ...``.

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

from .client import ClientError, DataStoreClient, LocalFile, RequestFailed, client_ssl_context


def run_client_command(args: argparse.Namespace) -> int:
    """Run one client command; return the exit status."""
    command: Callable[[DataStoreClient, argparse.Namespace, str], Any] = {
        "upload": _upload,
        "download": _download,
        "ls": _list,
        "status": _status,
        "cancel": _cancel,
        "watch": _watch,
    }[args.command]
    return _run(args, command, print_json=args.command != "watch")


def run_jobs_command(args: argparse.Namespace) -> int:
    """Run one ``datastore jobs SUBCOMMAND``; return the exit status."""
    command: Callable[[DataStoreClient, argparse.Namespace, str], Any] = {
        "submit": _job_submit,
        "commit": _job_step,
        "pause": _job_step,
        "resume": _job_step,
        "stop": _job_step,
        "retry": _job_step,
        "clear": _job_clear,
        "priority": _job_priority,
        "ls": _job_list,
        "status": _job_status,
        "watch": _job_watch,
    }[args.job_command]
    return _run(args, command, print_json=True)


def run_invites_command(args: argparse.Namespace) -> int:
    """Run one ``datastore invites SUBCOMMAND``; return the exit status."""
    command: Callable[[DataStoreClient, argparse.Namespace, str], Any] = {
        "ls": _invite_list,
        "accept": _invite_answer,
        "decline": _invite_answer,
        "extend": _invite_answer,
        "revoke": _invite_answer,
    }[args.invite_command]
    return _run(args, command, print_json=True)


def _run(
    args: argparse.Namespace, command: Callable[[DataStoreClient, argparse.Namespace, str], Any], *, print_json: bool
) -> int:
    """Connect as the client options say, run ``command`` and turn every failure into one line."""
    try:
        base, prefix = split_url(args.url)
        context = _ssl_context(args, base)
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
    except UsageError as exc:
        print(f"datastore: {exc}", file=sys.stderr)
        return 2
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
    if args.json and print_json and result is not None:
        print(json.dumps(result, indent=2))
    return 0


class UsageError(ClientError):
    """The command line asks for something impossible (exit status 2)."""


class JobNotFinished(ClientError):
    """A watched job ended otherwise than FINISHED."""


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


# -- transfer jobs (datastore jobs ...) ---------------------------------------------------------


async def _job_submit(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    """Submit a job (SOURCE DESTINATION pairs, or --from-file); print its id, then follow it if --watch."""
    document = _job_document(args)
    files = document.pop("files")
    job = await client.submit_job(files, **document)
    if args.json and not args.watch:
        return job
    if args.json:
        print(json.dumps(job, separators=(",", ":")), flush=True)
    else:
        print(job["id"], flush=True)
    if args.watch:
        await _follow_job(client, args, job["id"])
    return None


def _job_document(args: argparse.Namespace) -> dict[str, Any]:
    """The submission the command line describes: --from-file's JSON, then the pairs and options."""
    document: dict[str, Any] = {}
    if args.from_file is not None:
        try:
            with open(args.from_file, encoding="utf-8") as handle:
                document = json.load(handle)
        except OSError as exc:
            raise UsageError(f"cannot read {args.from_file}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UsageError(f"{args.from_file} is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise UsageError(f'{args.from_file} must hold a JSON object such as {{"files": [...]}}')
    pairs = list(args.ends)
    if len(pairs) % 2:
        raise UsageError(f"give SOURCE DESTINATION pairs: {pairs[-1]!r} has no destination")
    if pairs:
        added = [{"source": s, "destination": d} for s, d in zip(pairs[::2], pairs[1::2], strict=True)]
        document["files"] = [*document.get("files", []), *added]
    if not document.get("files"):
        raise UsageError("nothing to copy: give SOURCE DESTINATION (or --from-file JOB.json)")
    options = {
        "priority": args.priority,
        "verify_checksum": args.verify,
        "retry": args.retry,
        "retry_delay": args.retry_delay,
        "max_time_in_queue": args.max_time_in_queue,
        "deadline": args.deadline,
        "submission_id": args.submission_id,
        "bandwidth": args.bandwidth,
        "chunk_size": args.chunk_size,
        "source_token": _secret_file(args.source_token_file),
        "destination_token": _secret_file(args.destination_token_file),
    }
    document.update({name: value for name, value in options.items() if value is not None})
    if args.no_commit:
        document["commit"] = False
    return document


def _secret_file(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the token file {path}: {exc}") from None


async def _job_step(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    step = {
        "commit": client.commit_job,
        "pause": client.pause_job,
        "resume": client.resume_job,
        "stop": client.stop_job,
        "retry": client.retry_job,
    }[args.job_command]
    job = await step(args.id)
    if args.json:
        return job
    if not args.quiet:
        print(f"{job['id']}  {job['state']}")
    return None


async def _job_priority(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    job = await client.set_job_priority(args.id, args.priority)
    if args.json:
        return job
    if not args.quiet:
        print(f"{job['id']}  {job['state']}  priority {job['priority']}")
    return None


async def _job_clear(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    await client.clear_job(args.id)
    if args.json:
        return {"id": args.id, "cleared": True}
    if not args.quiet:
        print(f"{args.id}  cleared")
    return None


#: Job documents ``datastore jobs ls`` reads at once for its table's file counts and bytes.
_LIST_READS = 8


async def _job_list(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    """The jobs as a table (each job's document read for its files and bytes), or the list as JSON."""
    jobs = await client.jobs(args.states or (), all=args.all)
    if args.json:
        return jobs
    limit = asyncio.Semaphore(_LIST_READS)

    async def document(summary: dict[str, Any]) -> dict[str, Any] | None:
        async with limit:
            try:
                return await client.job(summary["id"])
            except RequestFailed as exc:
                if exc.status == 404:  # cleared (or purged) since the listing
                    return None
                raise

    documents = await asyncio.gather(*(document(summary) for summary in jobs))
    rows = [_job_row(job) for job in documents if job is not None]
    if rows:
        header = ("ID", "STATE", "PRIORITY", "FILES", "BYTES", "CREATED")
        widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return None


def _job_row(job: dict[str, Any]) -> tuple[str, ...]:
    files = job["files"]
    done = sum(1 for f in files if f["state"] == "FINISHED")
    return (
        job["id"],
        job["state"],
        str(job["priority"]),
        f"{done}/{len(files)}",
        _bytes_of(job["bytes"], job["size"]),
        job["created_at"] or "",
    )


async def _job_status(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    """The job and each of its files, or its document as JSON."""
    job = await client.job(args.id)
    if args.json:
        return job
    files = job["files"]
    done = sum(1 for f in files if f["state"] == "FINISHED")
    head = [
        job["id"],
        job["state"],
        f"priority {job['priority']}",
        f"{done}/{len(files)} files",
        f"{_bytes_of(job['bytes'], job['size'])} bytes",
    ]
    if job["rate"]:
        head.append(_rate(job["rate"]))
    head.append(f"created {job['created_at']}")
    if job.get("reason"):
        head.append(f"({job['reason']})")
    print("  ".join(head))
    for f in files:
        line = [
            f"{f['index']:>4}",
            f"{f['state']:<14}",
            f"{_bytes_of(f['bytes'], f['size']):>23}",
            f"{_rate(f['rate']):>12}",
            f"attempts {f['attempts']}",
            f"{f['source']} -> {f['destination']}",
        ]
        if f.get("error") or f.get("reason"):
            line.append(f"last error: {f.get('reason') or 'error'}: {_one_line(f.get('error') or '')}")
        print("  ".join(line).rstrip())
    return None


async def _job_watch(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    await _follow_job(client, args, args.id)
    return None


async def _follow_job(client: DataStoreClient, args: argparse.Namespace, job_id: str) -> None:
    """Follow a job's event stream until it ends, with a bar per file and a total (or, with --json,
    each event as a JSON line); JobNotFinished unless it ends FINISHED."""
    console = Console(stderr=True)
    bars = _progress(console, args.quiet or args.json)
    tasks: dict[int, TaskID] = {}
    done: dict[int, int] = {}
    total = bars.add_task("total", total=None, visible=False)

    def file_bar(index: int, name: str | None, size: int | None) -> TaskID:
        if index not in tasks:
            label = (name or f"file {index}").rsplit("/", 1)[-1]
            tasks[index] = bars.add_task(label, total=size)
        elif size is not None:
            bars.update(tasks[index], total=size)
        return tasks[index]

    def show_total(files: int | None = None, size: int | None = None) -> None:
        if files is not None:
            bars.update(total, total=size, visible=files > 1)
        bars.update(total, completed=sum(done.values()))

    def on_status(job: dict[str, Any]) -> None:
        for f in job["files"]:
            done[f["index"]] = f["bytes"]
            bars.update(file_bar(f["index"], f["destination"], f["size"]), completed=f["bytes"])
        show_total(len(job["files"]), job["size"])

    def on_event(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event, separators=(",", ":")), flush=True)
        index = event.get("file")
        if index is None or not event["type"].startswith("job.file."):
            return
        task = file_bar(index, event.get("destination"), event.get("size"))
        if event.get("bytes") is not None:
            done[index] = event["bytes"]
            bars.update(task, completed=event["bytes"])
        show_total()

    def reconnecting(last: int | None, error: BaseException) -> None:
        if not args.quiet and not args.json:
            since = f" after event {last}" if last is not None else ""
            console.print(f"datastore: the stream broke ({error or type(error).__name__}); reconnecting{since}")

    with bars:
        job = await client.wait_job(job_id, on_event=on_event, on_status=on_status, on_reconnect=reconnecting)
    if job["state"] != "FINISHED":
        raise JobNotFinished(_job_failure(job))
    if not args.quiet and not args.json:
        files = job["files"]
        print(f"{job['id']}  FINISHED  {len(files)}/{len(files)} files  {job['bytes']} bytes")


def _job_failure(job: dict[str, Any]) -> str:
    """``job ID FAILED: file 0 (local:/files/b.bin): not_found: no such file``."""
    line = f"job {job['id']} {job['state']}"
    error = job.get("last_error")
    if error:
        where = error.get("file")
        files = {f["index"]: f for f in job["files"]}
        if where is not None:
            line += f": file {where}"
            if where in files:
                line += f" ({files[where]['destination']})"
        line += f": {error.get('reason') or 'error'}: {_one_line(error.get('message') or '')}"
    elif job.get("reason"):
        line += f": {_one_line(job['reason'])}"
    return line.rstrip(": ")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _bytes_of(done: int, size: int | None) -> str:
    return f"{done}/{size}" if size is not None else f"{done}/?"


def _rate(rate: float) -> str:
    value = float(rate or 0)
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if value < 1000 or unit == "GB/s":
            return f"{value:.0f} {unit}" if unit == "B/s" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB/s"  # pragma: no cover


# -- invitations (datastore invites ...) -------------------------------------------------------

#: The longest NAMES cell of ``datastore invites ls``.
_NAMES_WIDTH = 40


async def _invite_list(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    """The invitations this client may answer (the pending ones, or with --all every one) as a table,
    or as JSON."""
    shown = [i for i in await client.invitations() if args.all or i["state"] == "PENDING"]
    if args.json:
        return shown
    rows = [_invite_row(invitation) for invitation in shown]
    if rows:
        header = ("ID", "STATE", "PREFIX", "DIRECTION", "NAMES", "BUDGET", "USED", "ANSWER BY", "REQUESTER")
        widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return None


def _invite_row(invitation: dict[str, Any]) -> tuple[str, ...]:
    budget = invitation.get("budget")
    return (
        invitation["id"],
        invitation["state"],
        invitation.get("prefix") or "",
        invitation.get("direction") or "",
        _names(invitation.get("names") or []),
        "unlimited" if budget is None else str(budget),
        str(invitation.get("used") or 0),
        invitation.get("answer_by") or "-",
        _one_line(invitation.get("requester") or ""),
    )


def _names(names: list[str]) -> str:
    """``a.bin`` / ``a.bin,b.bin`` / ``a.bin,b.bin +3 more``, at most _NAMES_WIDTH characters."""
    cell = ""
    for shown, name in enumerate(names):
        rest = len(names) - shown - 1
        more = f" +{rest} more" if rest else ""
        joined = f"{cell},{name}" if cell else name
        if len(joined) + len(more) > _NAMES_WIDTH:
            if not cell:  # one long name: cut it
                keep = max(1, _NAMES_WIDTH - len(more) - 1)
                return f"{name[:keep]}~{more}"
            return f"{cell} +{len(names) - shown} more"
        cell = joined
    return cell


async def _invite_answer(client: DataStoreClient, args: argparse.Namespace, prefix: str) -> Any:
    """Accept, decline, extend or revoke an invitation; print it in one line (or as JSON)."""
    verb = args.invite_command
    if verb == "accept":
        lifetime = args.lifetime
        if lifetime is not None and lifetime <= 0:
            raise UsageError("--lifetime must be positive, e.g. 7d")
        invitation = await client.accept_invitation(args.id, budget=args.budget, lifetime=lifetime)
    elif verb == "decline":
        invitation = await client.decline_invitation(args.id)
    elif verb == "extend":
        if args.size <= 0:
            raise UsageError("extend by a positive size, e.g. 10M")
        invitation = await client.extend_invitation(args.id, args.size)
    else:
        invitation = await client.revoke_invitation(args.id)
    if args.json:
        return invitation
    if not args.quiet:
        line = [invitation["id"], invitation["state"]]
        if invitation["state"] == "ACCEPTED":
            budget = invitation.get("budget")
            line.append("budget unlimited" if budget is None else f"budget {budget} left {invitation.get('left')}")
            line.append(f"until {invitation['expires_at']}")
        print("  ".join(line))
    return None
