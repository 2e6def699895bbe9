"""The jobs API against a real store in this process: submissions and their refusals, copies within
the store (local: ends), the user's steps, the queue's order, statuses and event streams."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from datastore.http.context import CONTEXT

from .conftest import MakeStore
from .harness import Store, eventually, json_manifest, md5_hex, sha256_hex, staged_bytes, until
from .waiting import WallClock

ADA = {"X-Client-DN": "/O=Lab/CN=Ada"}
BOB = {"X-Client-DN": "/O=Lab/CN=Bob"}


async def upload(store: Store, name: str, data: bytes, headers: dict[str, str] = ADA) -> None:
    reply = await store.client.post("/files/manifest", json=json_manifest([(name, data)]), headers=headers)
    assert reply.status == 201, await reply.text()
    key = (await reply.json())["transfer_key"]
    put = await store.client.put(f"/files/{key}/0", data=data, headers=headers)
    assert put.status == 200, await put.text()


async def job_state(store: Store, job_id: str, headers: dict[str, str] = ADA) -> dict[str, Any]:
    reply = await store.client.get(f"/_api/v1/jobs/{job_id}", headers=headers)
    assert reply.status == 200, await reply.text()
    document: dict[str, Any] = await reply.json()
    return document


async def finished(store: Store, job_id: str, state: str = "FINISHED") -> dict[str, Any]:
    last: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal last
        last = await job_state(store, job_id)
        return bool(last["state"] == state)

    try:
        await eventually(done, f"job {job_id} is {state}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {last}") from None
    return last


async def test_a_copy_within_the_store_is_verified_and_published(make_store: MakeStore) -> None:
    store = await make_store()
    data = b"0123456789" * 100_000
    await upload(store, "a.bin", data)
    reply = await store.client.post(
        "/_api/v1/jobs",
        json={"files": [{"source": "local:/files/a.bin", "destination": "local:/files/copy.bin"}]},
        headers=ADA,
    )
    assert reply.status == 201, await reply.text()
    job = await reply.json()
    assert reply.headers["Location"] == job["url"] == f"/_api/v1/jobs/{job['id']}"
    done = await finished(store, job["id"])
    file = done["files"][0]
    assert (file["state"], file["bytes"]) == ("FINISHED", len(data))
    assert (file["md5"], file["sha256"]) == (md5_hex(data), sha256_hex(data))
    assert [h["outcome"] for h in file["history"]] == ["finished"]
    copied = await store.client.get("/files/copy.bin", headers=ADA)
    assert await copied.read() == data


# -- a source the test holds back -------------------------------------------------------------


class Gated:
    """An HTTP source in this process whose bodies stop after ``hold_after`` bytes until released,
    with strong ETags, Range and If-Range, recording the first byte of every GET."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.versions: dict[str, int] = {}
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.hold_after = 64 << 10
        self.starts: list[tuple[str, int]] = []
        self.asked: list[tuple[str, str]] = []

    def put(self, name: str, data: bytes) -> None:
        self.files[name] = data
        self.versions[name] = self.versions.get(name, 0) + 1

    def etag(self, name: str) -> str:
        return f'"v{self.versions[name]}"'

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "elsewhere":  # a redirect to the same server by another name: a host jobs may not reach
            raise web.HTTPFound(f"http://localhost:{request.url.port}/a.bin")
        self.asked.append((request.method, name))
        if name not in self.files:
            raise web.HTTPNotFound()
        data, etag = self.files[name], self.etag(name)
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        start = 0
        ranged = request.headers.get("Range", "")
        if ranged.startswith("bytes=") and request.headers.get("If-Range", etag) == etag:
            start = int(ranged[6:].split("-")[0])
        self.starts.append((name, start))
        status = 206 if ranged and start else 200
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(len(data) - start)})
        await response.prepare(request)
        offset = start
        while offset < len(data):
            if offset - start >= self.hold_after:
                await self.flowing.wait()
            piece = data[offset : offset + (16 << 10)]
            await response.write(piece)
            offset += len(piece)
        await response.write_eof()
        return response


@pytest.fixture
async def gated(aiohttp_server: Any) -> tuple[Gated, str]:
    source = Gated()
    app = web.Application()
    app.router.add_route("*", "/{name}", source.handle)
    server = await aiohttp_server(app)
    yield source, f"http://127.0.0.1:{server.port}"
    source.flowing.set()


JOB_SETTINGS: dict[str, Any] = {"job_hosts": ("127.0.0.1",), "lease_time": 1.5, "job_stall_timeout": 30.0}


async def submit(store: Store, headers: dict[str, str] = ADA, **job: Any) -> dict[str, Any]:
    reply = await store.client.post("/_api/v1/jobs", json=job, headers=headers)
    assert reply.status in (200, 201), await reply.text()
    document: dict[str, Any] = await reply.json()
    return document


async def reach(store: Store, job_id: str, condition: Any, what: str) -> dict[str, Any]:
    last: dict[str, Any] = {}

    async def holds() -> bool:
        nonlocal last
        last = await job_state(store, job_id)
        return bool(condition(last))

    try:
        await eventually(holds, what)
    except AssertionError:
        raise AssertionError(f"{what}: {last}") from None
    return last


async def test_with_one_slot_a_later_job_of_higher_priority_runs_first(
    make_store: MakeStore, gated: tuple[Gated, str]
) -> None:
    source, base = gated
    store = await make_store(job_concurrency=1, **JOB_SETTINGS)
    source.put("big.bin", b"x" * (1 << 20))
    await upload(store, "small.bin", b"small")
    source.flowing.clear()
    blocker = await submit(store, files=[{"source": f"{base}/big.bin", "destination": "local:/files/big.bin"}])
    await reach(store, blocker["id"], lambda d: d["state"] == "ACTIVE", "the blocker runs")
    refused = await store.client.patch(f"/_api/v1/jobs/{blocker['id']}", json={"priority": 5}, headers=ADA)
    assert refused.status == 409 and "ACTIVE" in (await refused.json())["message"]
    low = await submit(
        store, priority=1, files=[{"source": "local:/files/small.bin", "destination": "local:/files/low"}]
    )
    high = await submit(
        store, priority=5, files=[{"source": "local:/files/small.bin", "destination": "local:/files/hi"}]
    )
    changed = await store.client.patch(f"/_api/v1/jobs/{low['id']}", json={"priority": 2}, headers=ADA)
    assert changed.status == 200 and (await changed.json())["priority"] == 2
    source.flowing.set()
    done = {job["id"]: await finished(store, job["id"]) for job in (blocker, low, high)}
    first, second = done[high["id"]]["files"][0], done[low["id"]]["files"][0]
    assert first["finished_at"] <= second["started_at"]


async def test_pause_stop_resume_and_clear_keep_the_bytes_already_copied(
    make_store: MakeStore, gated: tuple[Gated, str]
) -> None:
    source, base = gated
    # Staged in pieces smaller than what the source sends before it holds back: all of it reaches the disk.
    store = await make_store(chunk_size=16 << 10, **JOB_SETTINGS)
    data = bytes(range(256)) * 4096
    source.put("a.bin", data)
    source.flowing.clear()
    job = await submit(store, files=[{"source": f"{base}/a.bin", "destination": "local:/files/a.bin"}])
    await until(lambda: staged_bytes(store.staging) >= source.hold_after, "what the source sent is staged")
    paused = await store.client.post(f"/_api/v1/jobs/{job['id']}/pause", headers=ADA)
    assert paused.status == 200 and (await paused.json())["state"] == "PAUSED"
    again = await store.client.post(f"/_api/v1/jobs/{job['id']}/pause", headers=ADA)
    assert again.status == 409
    held = await reach(store, job["id"], lambda d: d["files"][0]["state"] == "PAUSED", "the running file paused")
    assert held["files"][0]["bytes"] == source.hold_after
    source.flowing.set()
    resumed = await store.client.post(f"/_api/v1/jobs/{job['id']}/resume", headers=ADA)
    assert resumed.status == 200
    done = await finished(store, job["id"])
    assert [h["from"] for h in done["files"][0]["history"]] == [0, source.hold_after]
    # The source states no digest: the runner hashes what the destination holds from the source again
    # (from byte 0), then copies from the offset the destination held.
    assert source.starts == [("a.bin", 0), ("a.bin", 0), ("a.bin", source.hold_after)]
    assert await (await store.client.get("/files/a.bin", headers=ADA)).read() == data

    # Stopped, the partial file waits; cleared, the store drops what it staged.
    source.flowing.clear()
    stopped_job = await submit(store, files=[{"source": f"{base}/a.bin", "destination": "local:/files/b.bin"}])
    await until(lambda: staged_bytes(store.staging) >= source.hold_after, "the second job's first bytes are staged")
    busy = await store.client.delete(f"/_api/v1/jobs/{stopped_job['id']}", headers=ADA)
    assert busy.status == 409
    stop = await store.client.post(f"/_api/v1/jobs/{stopped_job['id']}/stop", headers=ADA)
    assert (await stop.json())["state"] == "USER_STOPPED"
    await reach(store, stopped_job["id"], lambda d: d["files"][0]["state"] == "USER_STOPPED", "the file stopped")
    assert any(store.staging.iterdir())
    cleared = await store.client.delete(f"/_api/v1/jobs/{stopped_job['id']}", headers=ADA)
    assert cleared.status == 204
    assert (await store.client.get(f"/_api/v1/jobs/{stopped_job['id']}", headers=ADA)).status == 404
    assert not any(store.staging.iterdir())
    source.flowing.set()


async def test_a_missing_source_fails_for_good_and_retry_runs_it_again(make_store: MakeStore) -> None:
    store = await make_store(**JOB_SETTINGS)
    job = await submit(store, files=[{"source": "local:/files/later.bin", "destination": "local:/files/copy.bin"}])
    failed = await finished(store, job["id"], "FAILED")
    assert failed["last_error"]["reason"] == "not_found" and failed["files"][0]["attempts"] == 1
    await upload(store, "later.bin", b"at last")
    retried = await store.client.post(f"/_api/v1/jobs/{job['id']}/retry", headers=ADA)
    assert retried.status == 200 and (await retried.json())["state"] == "QUEUED"
    await finished(store, job["id"])
    assert await (await store.client.get("/files/copy.bin", headers=ADA)).read() == b"at last"


async def test_a_source_that_changes_restarts_cleanly_unless_its_checksum_was_pinned(
    make_store: MakeStore, gated: tuple[Gated, str]
) -> None:
    source, base = gated
    store = await make_store(**JOB_SETTINGS)
    first, second = b"A" * (512 << 10), b"B" * (600 << 10)
    source.put("v.bin", first)
    source.flowing.clear()
    job = await submit(store, files=[{"source": f"{base}/v.bin", "destination": "local:/files/v.bin"}], retry_delay=0)
    await reach(store, job["id"], lambda d: d["state"] == "ACTIVE", "the job runs")
    source.put("v.bin", second)
    await store.client.post(f"/_api/v1/jobs/{job['id']}/pause", headers=ADA)
    await reach(store, job["id"], lambda d: d["files"][0]["state"] == "PAUSED", "paused mid-file")
    source.flowing.set()
    await store.client.post(f"/_api/v1/jobs/{job['id']}/resume", headers=ADA)
    done = await finished(store, job["id"])
    # Whether the runner saw the change as it read (source_changed) or at its next look, the file
    # was copied again from byte 0, and nothing of the first version was kept.
    assert done["files"][0]["sha256"] == sha256_hex(second)
    assert done["files"][0]["history"][-1]["from"] == 0
    assert await (await store.client.get("/files/v.bin", headers=ADA)).read() == second

    pinned = await submit(
        store,
        files=[{"source": f"{base}/v.bin", "destination": "local:/files/w.bin", "checksum": f"md5:{md5_hex(first)}"}],
    )
    failed = await finished(store, pinned["id"], "FAILED")
    assert failed["last_error"]["reason"] == "checksum_mismatch"
    assert (await store.client.get("/files/w.bin", headers=ADA)).status == 404


async def test_submissions_are_checked_and_a_submission_id_is_honoured(make_store: MakeStore) -> None:
    store = await make_store(max_jobs_per_client=2, **JOB_SETTINGS)
    await upload(store, "a.bin", b"a")
    one = {"source": "local:/files/a.bin", "destination": "local:/files/b.bin"}
    anonymous = await store.client.post("/_api/v1/jobs", json={"files": [one]})
    assert anonymous.status == 401
    cases = [
        ({"files": []}, 400, "files"),
        ({"files": [one], "priority": 9}, 400, "priority"),
        ({"files": [one], "colour": 1}, 400, "colour"),
        ({"files": [{**one, "checksum": "md5:xyz"}]}, 400, "checksum"),
        ({"files": [{**one, "source": "ftp://example.org/a"}]}, 400, "local:/PREFIX/NAME"),
        ({"files": [{**one, "source": "http://10.1.2.3/files/a"}]}, 403, "job_hosts"),
        ({"files": [{**one, "source": "http://u:p@127.0.0.1/files/a"}]}, 400, "source_token"),
        ({"files": [{**one, "source": "local:/nowhere/a.bin"}]}, 404, ""),
        ({"files": [{**one, "destination": "local:/files/../x"}]}, 400, ""),
        ({"files": [{**one, "source": "rclone:dav:x"}]}, 403, "rclone"),
        ({"files": [one], "deadline": "tomorrow"}, 400, "deadline"),
    ]
    for body, status, words in cases:
        reply = await store.client.post("/_api/v1/jobs", json=body, headers=ADA)
        assert reply.status == status, (body, await reply.text())
        assert words in (await reply.json())["message"], body
    first = await submit(store, files=[one], submission_id="nightly-1", commit=False)
    again = await store.client.post("/_api/v1/jobs", json={"files": [one], "submission_id": "nightly-1"}, headers=ADA)
    assert again.status == 200 and (await again.json())["id"] == first["id"]
    await submit(store, files=[one], commit=False)
    over = await store.client.post("/_api/v1/jobs", json={"files": [one]}, headers=ADA)
    assert over.status == 429
    others = await store.client.get(f"/_api/v1/jobs/{first['id']}", headers=BOB)
    assert others.status == 403
    listed = await (await store.client.get("/_api/v1/jobs?state=SUBMITTED&limit=1", headers=ADA)).json()
    assert [j["id"] for j in listed["jobs"]] == [first["id"]] and listed["next"] is not None


async def test_finished_jobs_are_purged_after_the_cache_time(make_store: MakeStore, monkeypatch: Any) -> None:
    store = await make_store(job_retention=3600.0, **JOB_SETTINGS)
    await upload(store, "a.bin", b"a")
    job = await submit(store, files=[{"source": "local:/files/a.bin", "destination": "local:/files/b.bin"}])
    await finished(store, job["id"])
    clock = WallClock(monkeypatch)
    lifecycle = store.client.app[CONTEXT].lifecycle
    await lifecycle.sweep()
    assert (await store.client.get(f"/_api/v1/jobs/{job['id']}", headers=ADA)).status == 200
    clock.advance(3601.0)
    await lifecycle.sweep()
    assert (await store.client.get(f"/_api/v1/jobs/{job['id']}", headers=ADA)).status == 404


async def test_a_jobs_event_stream_replays_from_last_event_id(make_store: MakeStore) -> None:
    store = await make_store(**JOB_SETTINGS)
    await upload(store, "a.bin", b"abc")
    job = await submit(store, files=[{"source": "local:/files/a.bin", "destination": "local:/files/b.bin"}])
    await finished(store, job["id"])
    seen = []
    async with store.client.get(f"/_api/v1/jobs/{job['id']}/events", headers={**ADA, "Last-Event-ID": "0"}) as stream:
        async for line in stream.content:
            text = line.decode().strip()
            if text.startswith("data:"):
                event = json.loads(text[5:])
                seen.append(event["type"])
                assert event["job"] == job["id"]
                if event["type"] == "job.finished":
                    break
    assert seen[0] == "job.submitted" and "job.file.finished" in seen and seen[-1] == "job.finished"


async def test_a_redirect_to_a_host_jobs_may_not_reach_is_not_followed(
    make_store: MakeStore, gated: tuple[Gated, str]
) -> None:
    source, base = gated
    store = await make_store(**JOB_SETTINGS)
    source.put("a.bin", b"secret")
    job = await submit(store, files=[{"source": f"{base}/elsewhere", "destination": "local:/files/a.bin"}])
    failed = await finished(store, job["id"], "FAILED")
    assert failed["last_error"]["reason"] == "forbidden" and "job_hosts" in failed["last_error"]["message"]
    assert source.asked == []  # the redirect's target was never asked
