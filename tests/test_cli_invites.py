"""``datastore invites ...`` and the Python client's invitation methods, run as a user runs them: one
``datastore serve`` process that pushes to itself over HTTP without a token (so its jobs ask it for
an invitation), each command a ``python -m datastore`` process over real sockets.

The runner looks at the invitations its jobs wait for every 2 s (its pace in a real process): the
waits here are bounded, never slept.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from datastore.client import DataStoreClient, RequestFailed, SyncDataStoreClient

from .harness import Ran, assert_one_line_failure, datastore, eventually, job_store, md5_hex

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADA = "/O=Lab/CN=Ada"
DATA = bytes(range(256)) * 1200 + b"tail"
#: How long a job may take to notice an answer (the runner's 2 s pace, and slow machines).
ANSWERED = 30.0


@dataclass
class Served:
    """The running ``datastore serve``: its base URL, its files' URL, and a user of it."""

    base: str
    files: str
    tmp: Path
    identity: str = ADA

    async def invites(self, *args: str) -> Ran:
        """``datastore invites ARGS[0] BASE ARGS[1:] --identity IDENTITY``."""
        return await datastore("invites", args[0], self.base, *args[1:], "--identity", self.identity)

    async def jobs(self, *args: str) -> Ran:
        """``datastore jobs ARGS[0] BASE ARGS[1:] --identity IDENTITY``."""
        return await datastore("jobs", args[0], self.base, *args[1:], "--identity", self.identity)

    async def job(self, job_id: str) -> dict[str, Any]:
        async with DataStoreClient(self.base, identity=self.identity) as client:
            return await client.job(job_id)

    async def reach(self, job_id: str, condition: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The job once ``condition`` holds of it (within ANSWERED seconds)."""
        seen: dict[str, Any] = {}

        async def holds() -> bool:
            seen.update(await self.job(job_id))
            return bool(condition(seen))

        await eventually(holds, what, timeout=ANSWERED)
        return seen

    async def push(self, name: str) -> tuple[str, str]:
        """Submit (by the CLI) a job pushing a.bin to this store's NAME over HTTP, without a token;
        once it has asked for its invitation: (the job's id, the invitation's id)."""
        submit = await self.jobs("submit", "local:/files/a.bin", f"{self.files}{name}")
        assert submit.returncode == 0, submit
        job_id = submit.stdout.strip()
        job = await self.reach(job_id, lambda d: "id" in (d["invitation"] or {}), "the job asked for its invitation")
        assert job["state"] == "AWAITING_ACCEPTANCE", job
        return job_id, str(job["invitation"]["id"])

    async def listed(self, *options: str) -> list[dict[str, Any]]:
        ran = await self.invites("ls", "--json", *options)
        assert ran.returncode == 0, ran
        found: list[dict[str, Any]] = json.loads(ran.stdout)
        return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def store(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """One ``datastore serve`` (jobs may reach 127.0.0.1) with ``a.bin`` uploaded by Ada; stopped at the end."""
    tmp = tmp_path_factory.mktemp("invites")
    async with job_store(tmp, DATA, ADA) as match:
        yield Served(match["base"], match["url"], tmp)


@pytest.fixture
def served(store: Served, request: pytest.FixtureRequest, tmp_path: Path) -> Served:
    """The store, as this test's own user (who may upload to files/, so answers its invitations)."""
    return replace(store, tmp=tmp_path, identity=f"/O=Lab/CN={request.node.name.removeprefix('test_')[:48]}")


async def test_an_invitation_accepted_with_half_the_size_pauses_the_job_until_extended(served: Served) -> None:
    job_id, invitation_id = await served.push("pushed.bin")

    pending = {i["id"]: i for i in await served.listed()}
    shown = pending[invitation_id]
    assert (shown["state"], shown["prefix"], shown["direction"]) == ("PENDING", "files", "push")
    assert (shown["names"], shown["budget"], shown["used"]) == (["pushed.bin"], len(DATA), 0)
    assert job_id[:8] in shown["requester"]
    table = await served.invites("ls")
    assert table.returncode == 0, table
    head, *rows = table.stdout.splitlines()
    assert head.split()[:7] == ["ID", "STATE", "PREFIX", "DIRECTION", "NAMES", "BUDGET", "USED"]
    (row,) = [r for r in rows if r.startswith(invitation_id)]
    assert row.split()[:7] == [invitation_id, "PENDING", "files", "push", "pushed.bin", str(len(DATA)), "0"]

    half = len(DATA) // 2
    accepted = await served.invites("accept", invitation_id, "--budget", str(half), "--lifetime", "1d")
    assert accepted.returncode == 0, accepted
    assert accepted.stdout.split()[:6] == [invitation_id, "ACCEPTED", "budget", str(half), "left", str(half)]

    await served.reach(job_id, lambda d: d["state"] == "PAUSED", "the voucher's budget ran out")
    status = await served.jobs("status", job_id, "--json")
    assert status.returncode == 0, status
    paused = json.loads(status.stdout)
    assert paused["state"] == "PAUSED" and paused["reason"].startswith("voucher_exhausted"), paused
    assert paused["files"][0]["reason"] == "voucher_exhausted"
    assert [i["id"] for i in await served.listed()].count(invitation_id) == 0  # answered: not pending

    extended = await served.invites("extend", invitation_id, str(len(DATA) - half), "--json")
    assert extended.returncode == 0, extended
    assert (json.loads(extended.stdout)["budget"], json.loads(extended.stdout)["state"]) == (len(DATA), "ACCEPTED")

    done = await served.reach(job_id, lambda d: d["state"] in ("FINISHED", "FAILED"), "the extended job ended")
    assert done["state"] == "FINISHED", done
    assert done["files"][0]["md5"] == md5_hex(DATA)
    target = served.tmp / "downloaded"
    await asyncio.to_thread(target.mkdir)
    download = await datastore("download", served.files + "pushed.bin", "-o", str(target), "--quiet")
    assert download.returncode == 0, download
    assert await asyncio.to_thread((target / "pushed.bin").read_bytes) == DATA
    (spent,) = [i for i in await served.listed("--all") if i["id"] == invitation_id]
    assert (spent["state"], spent["used"], spent["left"]) == ("ACCEPTED", len(DATA), 0)


_ANSWERED = re.compile(r"datastore: 409 .*the invitation is DECLINED: only a pending one can be answered")


async def test_a_declined_invitation_ends_the_job_and_cannot_be_accepted_then_one_is_revoked(
    served: Served,
) -> None:
    job_id, invitation_id = await served.push("declined.bin")
    declined = await served.invites("decline", invitation_id)
    assert declined.returncode == 0, declined
    assert declined.stdout.split() == [invitation_id, "DECLINED"]
    done = await served.reach(job_id, lambda d: d["state"] == "DECLINED", "the job saw the invitation declined")
    assert done["reason"].startswith("declined by ") and served.identity in done["reason"], done

    again = await served.invites("accept", invitation_id)
    assert_one_line_failure(again, 1, _ANSWERED)
    assert invitation_id not in [i["id"] for i in await served.listed()]
    assert [i["state"] for i in await served.listed("--all") if i["id"] == invitation_id] == ["DECLINED"]

    # An invitation asked for by the Python client, accepted, then revoked: its token stops working.
    async with DataStoreClient(served.base) as asker:
        asked = await asker.ask_invitation("files", ["a.bin"], len(DATA), direction="pull", requester="a test")
    token = asked.pop("token")
    assert asked["state"] == "PENDING" and asked["names"] == ["a.bin"]
    accept = await served.invites("accept", asked["id"], "--budget", "10M", "--json")
    assert accept.returncode == 0, accept
    assert json.loads(accept.stdout)["budget"] == 10 << 20
    revoked = await served.invites("revoke", asked["id"])
    assert revoked.returncode == 0, revoked
    assert revoked.stdout.split() == [asked["id"], "REVOKED"]
    (shown,) = [i for i in await served.listed("--all") if i["id"] == asked["id"]]
    assert shown["state"] == "REVOKED"
    async with DataStoreClient(served.base, token=token) as holder:
        with pytest.raises(RequestFailed) as refused:
            await holder.download("/files/a.bin", served.tmp / "a.bin")
        assert refused.value.status == 401


async def test_the_python_clients_answer_invitations(served: Served) -> None:
    def blocking() -> tuple[dict[str, Any], ...]:
        with SyncDataStoreClient(served.base) as asker:
            asked = asker.ask_invitation("files", ["x.bin", "y.bin"], 100, requester="a script", wait=600)
        with SyncDataStoreClient(served.base, identity=served.identity) as answerer:
            listed = [i for i in answerer.invitations() if i["id"] == asked["id"]]
            accepted = answerer.accept_invitation(asked["id"], budget=50, lifetime=3600)
            shown = answerer.invitation(asked["id"])
            extended = answerer.extend_invitation(asked["id"], 25)
            revoked = answerer.revoke_invitation(asked["id"])
        return asked, *listed, accepted, shown, extended, revoked

    asked, listed, accepted, shown, extended, revoked = await asyncio.to_thread(blocking)
    assert asked["token"].startswith("dst_") and "token" not in listed
    assert (listed["state"], listed["names"], listed["requester"]) == ("PENDING", ["x.bin", "y.bin"], "a script")
    assert (accepted["state"], accepted["budget"], shown["left"]) == ("ACCEPTED", 50, 50)
    assert (extended["budget"], revoked["state"]) == (75, "REVOKED")

    async with DataStoreClient(served.base, identity=served.identity) as client:
        asked = await client.ask_invitation("files", ["z.bin"], 1)
        assert (await client.decline_invitation(asked["id"]))["state"] == "DECLINED"
        with pytest.raises(RequestFailed) as refused:
            await client.extend_invitation(asked["id"], 1)
        assert refused.value.status == 409


async def test_bad_invites_command_lines_fail_in_one_line(served: Served) -> None:
    unknown = await served.invites("revoke", "0123456789ab")
    assert_one_line_failure(unknown, 1, re.compile(r"datastore: 404 .*no such invitation"))
    anonymous = await datastore("invites", "ls", served.base)
    assert anonymous.returncode == 1 and len(anonymous.errors) == 1, anonymous
    assert anonymous.errors[0].startswith("datastore: 401 "), anonymous.errors
    bad_size = await served.invites("extend", "0123456789ab", "10Q")
    assert bad_size.returncode == 2 and "Traceback" not in bad_size.stderr, bad_size
    assert "is not a size" in bad_size.stderr
    bad_lifetime = await served.invites("accept", "0123456789ab", "--lifetime", "soon")
    assert bad_lifetime.returncode == 2 and "is not a duration" in bad_lifetime.stderr, bad_lifetime
    not_a_url = await datastore("invites", "ls", "ftp://x", "--identity", ADA)
    assert_one_line_failure(not_a_url, 2, "datastore: not an http(s) URL: 'ftp://x'")
