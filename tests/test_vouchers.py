"""Invitations and vouchers on a real store in this process, which pushes to itself over HTTP (the
asking and the answering store are one here; ``test_jobs_processes`` has two): an invitation
declined, left to expire, accepted with a budget that runs out (the job pauses, then resumes from
its offset once the voucher is extended), and vouchers refused when revoked, expired, forged,
pending or used beyond their scope. Time is moved, never waited for."""

from __future__ import annotations

from typing import Any

import pytest

from datastore.jobs import runner

from .conftest import MakeStore
from .harness import Store, json_manifest, md5_hex
from .test_jobs_api import ADA, job_state, reach, submit, upload
from .waiting import WallClock

SETTINGS: dict[str, Any] = {"job_hosts": ("127.0.0.1",), "lease_time": 1.5}


@pytest.fixture(autouse=True)
def quick_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner asks for answers often (its pace, not a test's timing)."""
    monkeypatch.setattr(runner, "INVITATION_POLL", 0.05)


def base(store: Store) -> str:
    return str(store.client.make_url("/")).rstrip("/")


async def invitations(store: Store) -> list[dict[str, Any]]:
    reply = await store.client.get("/_api/v1/invitations", headers=ADA)
    assert reply.status == 200, await reply.text()
    found: list[dict[str, Any]] = (await reply.json())["invitations"]
    return found


async def asked(store: Store, job_id: str) -> dict[str, Any]:
    """The job once it has asked for its invitation; that invitation, as its store lists it."""
    job = await reach(store, job_id, lambda d: d["invitation"] and "id" in d["invitation"], "the job asked")
    assert job["state"] == "AWAITING_ACCEPTANCE"
    (invitation,) = [i for i in await invitations(store) if i["id"] == job["invitation"]["id"]]
    return invitation


async def push_job(store: Store, data: bytes, name: str = "pushed.bin") -> str:
    await upload(store, "a.bin", data)
    job = await submit(store, files=[{"source": "local:/files/a.bin", "destination": f"{base(store)}/files/{name}"}])
    assert job["state"] == "AWAITING_ACCEPTANCE"
    job_id: str = job["id"]
    return job_id


async def test_a_declined_invitation_ends_the_job_declined(make_store: MakeStore) -> None:
    store = await make_store(**SETTINGS)
    job_id = await push_job(store, b"x" * 1000)
    invitation = await asked(store, job_id)
    assert (invitation["names"], invitation["budget"], invitation["direction"]) == (["pushed.bin"], 1000, "push")
    declined = await store.client.post(f"/_api/v1/invitations/{invitation['id']}/decline", headers=ADA)
    assert declined.status == 200 and (await declined.json())["state"] == "DECLINED"
    done = await reach(store, job_id, lambda d: d["state"] == "DECLINED", "the job was declined")
    assert done["reason"].startswith("declined by") and done["files"][0]["state"] == "DECLINED"
    again = await store.client.post(f"/_api/v1/invitations/{invitation['id']}/accept", headers=ADA)
    assert again.status == 409


async def test_an_unanswered_invitation_expires_and_so_does_the_job(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await make_store(invitation_max_wait=3600.0, **SETTINGS)
    job_id = await push_job(store, b"y" * 10)
    invitation = await asked(store, job_id)
    WallClock(monkeypatch).advance(3601.0)
    done = await reach(store, job_id, lambda d: d["state"] == "INVITE_NOT_ACCEPTED_ON_TIME", "the wait ran out")
    assert done["files"][0]["state"] == "INVITE_NOT_ACCEPTED_ON_TIME"
    late = await store.client.post(
        f"/_api/v1/invitations/{invitation['id']}/accept", headers={**ADA, "Accept": "application/json"}
    )
    assert late.status == 409 and "EXPIRED" in (await late.json())["message"]


async def test_a_used_up_budget_pauses_the_job_until_the_voucher_is_extended(make_store: MakeStore) -> None:
    store = await make_store(chunk_size=64 << 10, **SETTINGS)
    data = bytes(range(256)) * 4096  # 1 MiB
    job_id = await push_job(store, data)
    invitation = await asked(store, job_id)
    half = len(data) // 2
    accepted = await store.client.post(
        f"/_api/v1/invitations/{invitation['id']}/accept", json={"budget": half}, headers=ADA
    )
    assert accepted.status == 200 and (await accepted.json())["left"] == half
    paused = await reach(store, job_id, lambda d: d["state"] == "PAUSED", "the budget ran out")
    assert paused["reason"].startswith("voucher_exhausted") and paused["files"][0]["state"] == "PAUSED"
    assert paused["files"][0]["reason"] == "voucher_exhausted"
    extended = await store.client.post(
        f"/_api/v1/invitations/{invitation['id']}/extend", json={"bytes": len(data) - half}, headers=ADA
    )
    assert extended.status == 200
    done = await reach(store, job_id, lambda d: d["state"] == "FINISHED", "the extended job finished")
    history = done["files"][0]["history"]
    assert history[0]["reason"] == "voucher_exhausted" and history[-1]["from"] == half, history
    assert done["files"][0]["md5"] == md5_hex(data)
    assert await (await store.client.get("/files/pushed.bin", headers=ADA)).read() == data
    shown = await (await store.client.get(f"/_api/v1/invitations/{invitation['id']}", headers=ADA)).json()
    assert (shown["used"], shown["left"]) == (len(data), 0)


async def voucher(store: Store, *, direction: str, names: list[str], **answer: Any) -> tuple[str, str]:
    """An accepted voucher asked for directly: (its id, its token)."""
    reply = await store.client.post(
        "/_api/v1/invitations",
        json={"prefix": "files", "direction": direction, "names": names, "size": 100, "requester": "a test"},
    )
    assert reply.status == 201, await reply.text()
    document = await reply.json()
    pending = {"Authorization": f"Bearer {document['token']}"}
    assert (await store.client.get("/files/", headers=pending)).status == 401  # pending: works for nothing
    followed = await store.client.get(document["url"], headers=pending)
    assert followed.status == 200 and (await followed.json())["state"] == "PENDING"
    accepted = await store.client.post(f"{document['url']}/accept", json=answer, headers=ADA)
    assert accepted.status == 200, await accepted.text()
    return document["id"], document["token"]


async def test_vouchers_out_of_scope_revoked_expired_or_forged_are_refused_clearly(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await make_store(**SETTINGS)
    await upload(store, "a.bin", b"a" * 100)
    push_id, push = await voucher(store, direction="push", names=["new.bin"])
    pushing = {"Authorization": f"Bearer {push}"}
    other = await store.client.post("/files/manifest", json=json_manifest([("other.bin", b"o")]), headers=pushing)
    assert other.status == 403 and "does not cover 'other.bin'" in (await other.json())["message"]
    reading = await store.client.get("/files/a.bin", headers=pushing)
    assert reading.status == 403 and "does not allow read" in await reading.text()
    ok = await store.client.post("/files/manifest", json=json_manifest([("new.bin", b"n" * 10)]), headers=pushing)
    assert ok.status == 201

    pull_id, pull = await voucher(store, direction="pull", names=["a.bin"], budget=150)
    pulling = {"Authorization": f"Bearer {pull}"}
    assert (await store.client.get("/files/a.bin", headers=pulling)).status == 200
    listing = await store.client.get("/files/", headers={**pulling, "Accept": "application/json"})
    assert listing.status == 403 and "only the files it names" in (await listing.json())["message"]
    upload_with_pull = await store.client.post(
        "/files/manifest", json=json_manifest([("a2.bin", b"x")]), headers=pulling
    )
    assert upload_with_pull.status == 403
    exhausted = await store.client.get("/files/a.bin", headers=pulling)  # 100 of 150 used: 100 more do not fit
    assert exhausted.status == 403 and "budget" in await exhausted.text()
    assert exhausted.headers["WWW-Authenticate"].endswith('error_description="voucher_exhausted"')

    revoked = await store.client.delete(f"/_api/v1/invitations/{push_id}", headers=ADA)
    assert revoked.status == 200 and (await revoked.json())["state"] == "REVOKED"
    after = await store.client.post("/files/manifest", json=json_manifest([("new.bin", b"n")]), headers=pushing)
    assert after.status == 401 and "revoked" in (await after.json())["message"]

    short_id, short = await voucher(store, direction="pull", names=["a.bin"], lifetime=60)
    WallClock(monkeypatch).advance(61.0)
    expired = await store.client.get("/files/a.bin", headers={"Authorization": f"Bearer {short}"})
    assert expired.status == 401
    forged = await store.client.get("/files/a.bin", headers={"Authorization": f"Bearer dst_{short_id}_{'A' * 43}"})
    assert forged.status == 401 and "unknown, expired or revoked" in await forged.text()
    # A voucher answers no invitation, and nobody anonymous does.
    assert (await store.client.get("/_api/v1/invitations", headers=pulling)).status in (401, 403)
    assert (await store.client.get("/_api/v1/invitations")).status == 401
    shown = await job_state_or_none(store, pull_id)
    assert shown is None


async def job_state_or_none(store: Store, job_id: str) -> dict[str, Any] | None:
    """No job is named like a voucher: the jobs API answers 404."""
    reply = await store.client.get(f"/_api/v1/jobs/{job_id}", headers=ADA)
    return None if reply.status == 404 else await job_state(store, job_id)
