"""The jobs API against a real store in this process: submissions and their refusals, copies within
the store (local: ends), the user's steps, the queue's order, statuses and event streams."""

from __future__ import annotations

from typing import Any

from .conftest import MakeStore
from .harness import Store, eventually, json_manifest, md5_hex, sha256_hex

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

    await eventually(done, f"job {job_id} is {state}")
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
