"""Transfer jobs between real ``datastore serve`` processes: pull and push over plain HTTP and over
TLS with client certificates, through a proxy that cuts, stalls and answers 503s, and through
``kill -9`` of the store running the job and of the destination store; a copy from a plain HTTP
server nobody here wrote (``rclone serve http``) and to an rclone remote (``rclone serve webdav``).

Each store runs in its own temporary directory and is stopped by its PID. Waits are bounded and
read the job's state; nothing sleeps for timing. "Nothing re-sent from zero" is read from the
request heads the proxy forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .faultproxy import FaultProxy
from .harness import eventually, md5_hex, sha256_hex, spawn_serve, staged_bytes, until
from .rclone_servers import start_webdav
from .test_job_drivers_http import rclone_http
from .test_tls import Pki

DN = "/O=Lab/CN=Ada"
ADA = {"X-Client-DN": DN}
MIB = 1 << 20
WAIT = 60.0
#: What every store here runs with: jobs may reach loopback, retry soon, and notice stalls and dead
#: runners within seconds.
JOB_ENV = {
    "DATASTORE_JOB_HOSTS": "127.0.0.1",
    "DATASTORE_LEASE_TIME": "3",
    "DATASTORE_JOB_STALL_TIMEOUT": "2",
    "DATASTORE_JOB_MAX_IDLE_ATTEMPTS": "40",
}


@dataclass
class Served:
    """One running store: its base URL, its folders, and how it was started (to restart it)."""

    folder: Path
    args: tuple[str, ...]
    env: dict[str, str]
    base: str = ""
    port: int = 0
    process: asyncio.subprocess.Process | None = None
    ssl: ssl.SSLContext | None = None
    history: list[int] = field(default_factory=list)

    async def start(self) -> None:
        self.process, (match,) = await spawn_serve(
            "--root", str(self.folder / "root"), "--state-dir", str(self.folder / "state"), *self.args, env=self.env
        )
        self.base, self.port = match["base"], int(match["port"])
        self.history.append(self.process.pid)

    async def kill(self) -> None:
        """``kill -9``: no cleanup of any kind."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), WAIT)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            os.kill(self.process.pid, signal.SIGTERM)
            await asyncio.wait_for(self.process.wait(), WAIT)

    def staged(self) -> int:
        """Bytes this store holds staged (received, not yet published)."""
        return staged_bytes(self.folder / "state" / "staging")

    async def holds_staged(self, size: int, what: str) -> None:
        """Wait until at least ``size`` bytes of an upload reached this store's disk (what a cut, a
        stall or a crash then keeps)."""
        await until(lambda: self.staged() >= size, what, WAIT)


@contextlib.asynccontextmanager
async def store(folder: Path, *args: str, env: Mapping[str, str] | None = None) -> AsyncIterator[Served]:
    served = Served(folder, args, {**JOB_ENV, **(env or {})})
    await served.start()
    try:
        yield served
    finally:
        await served.stop()


@contextlib.asynccontextmanager
async def session(context: ssl.SSLContext | None = None) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=context) if context is not None else None
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
        yield s


async def upload(s: aiohttp.ClientSession, base: str, name: str, data: bytes) -> None:
    reply = await s.post(f"{base}/files/manifest", json={"files": [{"name": name, "size": len(data)}]}, headers=ADA)
    assert reply.status == 201, await reply.text()
    key = (await reply.json())["transfer_key"]
    put = await s.put(f"{base}/files/{key}/0", data=io.BytesIO(data), headers={**ADA, "Content-Length": str(len(data))})
    assert put.status == 200, await put.text()


async def submit(s: aiohttp.ClientSession, base: str, **job: Any) -> str:
    reply = await s.post(f"{base}/_api/v1/jobs", json=job, headers=ADA)
    assert reply.status == 201, await reply.text()
    job_id: str = (await reply.json())["id"]
    return job_id


async def status(s: aiohttp.ClientSession, base: str, job_id: str) -> dict[str, Any]:
    reply = await s.get(f"{base}/_api/v1/jobs/{job_id}", headers=ADA)
    assert reply.status == 200, await reply.text()
    document: dict[str, Any] = await reply.json()
    return document


async def wait_for(
    served: Served, job_id: str, condition: Any, what: str, context: ssl.SSLContext | None = None
) -> dict[str, Any]:
    """The job's status once ``condition(status)`` holds (read from whichever process serves now)."""
    last: dict[str, Any] = {}

    async def holds() -> bool:
        nonlocal last
        async with session(context) as s:
            last = await status(s, served.base, job_id)
        return bool(condition(last))

    try:
        await eventually(holds, what, WAIT)
    except AssertionError:
        raise AssertionError(f"{what}; the job is {last}") from None
    return last


def finished(document: dict[str, Any]) -> bool:
    assert document["state"] not in ("FAILED", "FINISHED_DIRTY"), document
    return bool(document["state"] == "FINISHED")


async def admin(served: Served) -> dict[str, str]:
    """The headers of the administrator token the store wrote at its first start."""
    token = await asyncio.to_thread((served.folder / "state" / "admin.token").read_text)
    return {"Authorization": f"Bearer {token.strip()}"}


async def upload_token(s: aiohttp.ClientSession, served: Served) -> str:
    """A token of ``served`` allowed to upload to ``files`` (what a job pushing there presents)."""
    reply = await s.post(
        f"{served.base}/_api/v1/tokens",
        json={"subject": "a pushing store", "actions": ["upload"], "prefixes": ["files"]},
        headers=await admin(served),
    )
    assert reply.status == 201, await reply.text()
    token: str = (await reply.json())["token"]
    return token


def payload(size: int, seed: int = 7) -> bytes:
    block = bytes((seed * 31 + i * 7) % 251 for i in range(65536))
    return (block * (size // len(block) + 1))[:size]


async def download(s: aiohttp.ClientSession, url: str) -> bytes:
    reply = await s.get(url, headers=ADA)
    assert reply.status == 200, await reply.text()
    return await reply.read()


def starts(proxy: FaultProxy, method: str) -> list[int]:
    """The first byte of each forwarded GET (its Range) or PATCH (its Upload-Offset) that the server
    took (a PATCH refused at once, say for an offset its upload had moved past, sends nothing)."""
    found = []
    for head in proxy.heads(method):
        if head.status is not None and head.status >= 400:
            continue
        if method == "GET":
            text = head.headers.get("range", "bytes=0-")
            found.append(int(text.removeprefix("bytes=").split("-")[0]))
        else:
            found.append(int(head.headers["upload-offset"]))
    return found


def no_partial_files(served: Served) -> bool:
    return not any(p.name.endswith(".part") for p in (served.folder / "root" / "files").iterdir())


async def test_pull_and_push_between_two_stores_over_plain_http(tmp_path: Path) -> None:
    data = payload(3 * MIB + 11)
    async with store(tmp_path / "a") as a, store(tmp_path / "b") as b, session() as s:
        await upload(s, a.base, "a.bin", data)
        pull = await submit(
            s, b.base, files=[{"source": f"{a.base}/files/a.bin", "destination": "local:/files/pulled.bin"}]
        )
        # Pushing to B, which A holds no credential for: A asks B for an invitation, B's administrator
        # accepts it, and the voucher it becomes carries the push.
        push = await submit(
            s, a.base, files=[{"source": "local:/files/a.bin", "destination": f"{b.base}/files/pushed.bin"}]
        )
        waiting = await wait_for(a, push, lambda d: d["invitation"] and "id" in d["invitation"], "A asked B")
        assert waiting["state"] == "AWAITING_ACCEPTANCE"
        invitations = (await (await s.get(f"{b.base}/_api/v1/invitations", headers=await admin(b))).json())[
            "invitations"
        ]
        assert [(i["names"], i["budget"], i["state"]) for i in invitations] == [(["pushed.bin"], len(data), "PENDING")]
        accepted = await s.post(f"{b.base}/_api/v1/invitations/{invitations[0]['id']}/accept", headers=await admin(b))
        assert accepted.status == 200, await accepted.text()
        pulled = await wait_for(b, pull, finished, "the pull finished")
        pushed = await wait_for(a, push, finished, "the push finished")
        assert await download(s, f"{b.base}/files/pulled.bin") == data
        assert await download(s, f"{b.base}/files/pushed.bin") == data
        for done in (pulled, pushed):
            assert (done["files"][0]["md5"], done["files"][0]["sha256"]) == (md5_hex(data), sha256_hex(data))
            assert done["bytes"] == len(data) and done["last_error"] is None


async def test_pull_and_push_over_tls_with_the_stores_client_certificate(tmp_path: Path) -> None:
    pki = await asyncio.to_thread(Pki, tmp_path / "pki")
    runner = await asyncio.to_thread(pki.client, "runner")
    tls = (
        "--tls",
        "--cert",
        str(pki.certs.path("server", "pem")),
        "--key",
        str(pki.certs.path("server", "key")),
        "--client-ca",
        str(pki.ca_pem),
    )
    client = pki.context(runner)
    credentials = {
        "DATASTORE_JOB_TLS_CERT": str(runner.cert),
        "DATASTORE_JOB_TLS_KEY": str(runner.key),
        "DATASTORE_JOB_TLS_CA": str(pki.ca_pem),
    }
    data = payload(2 * MIB + 3, seed=3)
    async with store(tmp_path / "tls", *tls) as secure, store(tmp_path / "plain", env=credentials) as plain:
        async with session(client) as s:
            await upload(s, secure.base, "a.bin", data)
        async with session() as s:
            pull = await submit(
                s, plain.base, files=[{"source": f"{secure.base}/files/a.bin", "destination": "local:/files/a.bin"}]
            )
            await wait_for(plain, pull, finished, "the pull over TLS finished")
            push = await submit(
                s, plain.base, files=[{"source": "local:/files/a.bin", "destination": f"{secure.base}/files/back.bin"}]
            )
            await wait_for(plain, push, finished, "the push over TLS finished")
            assert await download(s, f"{plain.base}/files/a.bin") == data
        async with session(client) as s:
            assert await download(s, f"{secure.base}/files/back.bin") == data
            listing = await (await s.get(f"{secure.base}/files/", headers={"Accept": "application/json"})).json()
        # The secure store knows who pushed: the runner's certificate.
        owners = {entry["name"]: entry.get("owner") for entry in listing["files"]}
        assert "runner" in str(owners["back.bin"]), owners


async def test_cuts_stalls_and_503s_on_the_way_all_end_verified_without_resending_from_zero(tmp_path: Path) -> None:
    data = payload(6 * MIB + 5, seed=5)
    async with store(tmp_path / "a") as a, store(tmp_path / "b") as b, session() as s:
        await upload(s, a.base, "a.bin", data)
        async with FaultProxy("127.0.0.1", a.port) as source, FaultProxy("127.0.0.1", b.port) as destination:
            # Pull from A through a proxy that answers 503 three times, then cuts the body once.
            source.fail_next(3)
            source.cut_after(2 * MIB, "down")
            pull = await submit(
                s,
                b.base,
                files=[{"source": f"{source.url}/files/a.bin", "destination": "local:/files/pulled.bin"}],
                retry=20,
                retry_delay=0.05,
                bandwidth=4 * MIB,
            )
            done = await wait_for(b, pull, finished, "the pull finished")
            assert source.cuts == 1 and len(source.refused) == 3
            # The cut drops what the sockets held too: the pull resumes from what the destination staged.
            assert starts(source, "GET").count(0) == 1 and len(starts(source, "GET")) >= 2, starts(source, "GET")
            reasons = {h["reason"] for h in done["files"][0]["history"]}
            assert {"connection", "server_error"} <= reasons, done["files"][0]["history"]

            # Push to B through a proxy that stalls mid-body: reported stalled, then resumed.
            push = await submit(
                s,
                a.base,
                files=[{"source": "local:/files/a.bin", "destination": f"{destination.url}/files/pushed.bin"}],
                destination_token=await upload_token(s, b),
                retry=20,
                retry_delay=0.05,
                bandwidth=2 * MIB,
            )
            await b.holds_staged(MIB, "a mebibyte of the push reached the destination's disk")
            destination.stall()
            stalled = await wait_for(a, push, lambda d: d["files"][0]["stalled"], "the stall was reported")
            assert stalled["files"][0]["reason"] == "stalled"
            destination.release()
            await wait_for(a, push, finished, "the push finished")
            offsets = starts(destination, "PATCH")
            assert offsets[0] == 0 and offsets.count(0) == 1 and offsets == sorted(offsets), offsets
        assert await download(s, f"{b.base}/files/pulled.bin") == data
        assert await download(s, f"{b.base}/files/pushed.bin") == data
        assert no_partial_files(b)


async def test_kill_9_of_the_store_running_the_job_then_it_resumes_from_its_offset(tmp_path: Path) -> None:
    data = payload(8 * MIB, seed=9)
    async with store(tmp_path / "source") as source, store(tmp_path / "runner") as runner, session() as s:
        await upload(s, source.base, "big.bin", data)
        async with FaultProxy("127.0.0.1", source.port) as proxy:
            job = await submit(
                s,
                runner.base,
                files=[{"source": f"{proxy.url}/files/big.bin", "destination": "local:/files/big.bin"}],
                bandwidth=2 * MIB,
            )
            await runner.holds_staged(2 * MIB, "two mebibytes reached the runner's disk")
            await runner.kill()
            await runner.start()
            done = await wait_for(runner, job, finished, "the job finished after the restart")
            history = done["files"][0]["history"]
            assert history[0]["reason"] == "restarted" and history[-1]["from"] >= 2 * MIB - MIB, history
            assert starts(proxy, "GET").count(0) == 1, starts(proxy, "GET")
        assert await download(s, f"{runner.base}/files/big.bin") == data
        assert no_partial_files(runner)


async def test_kill_9_of_the_destination_store_mid_file_then_the_push_resumes(tmp_path: Path) -> None:
    data = payload(8 * MIB, seed=11)
    async with store(tmp_path / "runner") as runner, store(tmp_path / "destination") as destination, session() as s:
        await upload(s, runner.base, "big.bin", data)
        async with FaultProxy("127.0.0.1", destination.port) as proxy:
            job = await submit(
                s,
                runner.base,
                files=[{"source": "local:/files/big.bin", "destination": f"{proxy.url}/files/big.bin"}],
                destination_token=await upload_token(s, destination),
                bandwidth=2 * MIB,
                retry=50,
                retry_delay=0.1,
            )
            await destination.holds_staged(2 * MIB, "two mebibytes reached the destination's disk")
            await destination.kill()
            await wait_for(runner, job, lambda d: d["files"][0]["attempts"] >= 2, "the runner noticed")
            await destination.start()
            proxy.upstream = ("127.0.0.1", destination.port)
            await wait_for(runner, job, finished, "the push finished after the destination's restart")
            offsets = starts(proxy, "PATCH")
            assert offsets.count(0) == 1 and max(offsets) > 0 and offsets == sorted(offsets), offsets
        assert await download(s, f"{destination.base}/files/big.bin") == data
        listing = await (await s.get(f"{destination.base}/files/", headers={"Accept": "application/json"})).json()
        assert [entry["name"] for entry in listing["files"]] == ["big.bin"]
        assert no_partial_files(destination)


async def test_a_copy_from_rclone_serve_http_and_to_an_rclone_webdav_remote(tmp_path: Path) -> None:
    data = payload(MIB + 17, seed=13)
    folder = tmp_path / "plain"
    await asyncio.to_thread(folder.mkdir)
    await asyncio.to_thread((folder / "plain.bin").write_bytes, data)
    webdav = await start_webdav(tmp_path / "dav")
    try:
        config = webdav.config
        async with (
            rclone_http(folder) as plain,
            store(tmp_path / "store", env={"DATASTORE_JOB_RCLONE_CONFIG": str(config)}) as served,
            session() as s,
        ):
            job = await submit(
                s,
                served.base,
                files=[
                    {"source": f"{plain}/plain.bin", "destination": "local:/files/plain.bin"},
                    {"source": f"{plain}/plain.bin", "destination": "rclone:dav:copies/plain.bin"},
                ],
            )
            done = await wait_for(served, job, finished, "both copies finished")
            assert await download(s, f"{served.base}/files/plain.bin") == data
        assert await asyncio.to_thread((webdav.root / "copies" / "plain.bin").read_bytes) == data
        assert [f["md5"] for f in done["files"]] == [md5_hex(data)] * 2
    finally:
        await webdav.stop()
