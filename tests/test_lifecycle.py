"""The lifecycle of a transfer under ``/_api/v1/transfers/{key}``: status, cancel,
expiry and purge by the sweeper, and the disk headroom a manifest must fit in.

Every test runs a real store on loopback with a handler that records what the
server asks of it. Nothing sleeps to guess at timing: where a timer is the
behaviour under test (the sweeper), the test polls what a client can observe
until it shows the expected state, bounded by a deadline. Where a lifetime is
(a key's, a finished transfer's record), the test moves the wall clock past it
(:class:`WallClock`) once the transfer is set up, so the lifetime never runs out
while the test is still preparing it. The disk headroom tests give the store a
disk whose free space stays put (:func:`disk`): the real one changes under
other processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from datastore.config import Settings, SettingsError
from datastore.handlers.interface import FileInfo
from datastore.http.context import CONTEXT
from datastore.security.identity import Identity
from datastore.state.catalogue import Reservation

from .conftest import MakeStore
from .fakes import RecordingHandler
from .harness import Store, eventually, md5_hex, sha256_hex, staged_bytes, start_stalled_upload, until
from .waiting import WallClock

ADA = "/O=Lab/CN=Ada"
MALLORY = "/O=Lab/CN=Mallory"

#: Upper bound on anything a test awaits from the server.
WAIT = 10.0
#: How long a cancel of a running upload may take: far below the body timeout (60 s).
PROMPTLY = 5.0

KIB = 1 << 10
MIB = 1 << 20

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)$")


class ReleaseWatcher(RecordingHandler):
    """A RecordingHandler a test can await: ``released(count)`` comes back once
    ``count`` calls of cancel_upload have returned; ``released_names`` lists them."""

    def __init__(self, directory: Path, catalogue: Path) -> None:
        super().__init__(directory, catalogue)
        self.released_names: list[str] = []
        self._changed = asyncio.Event()

    async def cancel_upload(self, identity: Identity, file: FileInfo) -> None:
        try:
            await super().cancel_upload(identity, file)
        finally:
            self.released_names.append(file.name)
            self._changed.set()

    async def released(self, count: int) -> None:
        try:
            async with asyncio.timeout(WAIT):
                while len(self.released_names) < count:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"cancel_upload returned {len(self.released_names)} times, not {count}") from None

    def cancel_calls(self) -> list[str]:
        """Names cancel_upload was called with, in call order."""
        return [name for method, name in self.calls if method == "cancel_upload"]


async def start(make_store: MakeStore, tmp_path: Path, **settings: Any) -> tuple[Store, ReleaseWatcher]:
    handler = ReleaseWatcher(tmp_path / "root" / "files", tmp_path / "state" / "catalogue" / "files.sqlite3")
    store = await make_store(handler, **settings)
    return store, handler


def content(label: str, size: int) -> bytes:
    """``size`` bytes that differ from every other label's."""
    seed = label.encode() + b":"
    return (seed * (size // len(seed) + 1))[:size]


def dn_headers(identity: str | None) -> dict[str, str]:
    return {"X-Client-DN": identity} if identity is not None else {}


# -- the control plane --------------------------------------------------------------


async def get_status(store: Store, key: str, identity: str | None = ADA) -> tuple[int, Any]:
    """``GET /_api/v1/transfers/{key}``: (status, JSON body)."""
    headers = {"Accept": "application/json", **dn_headers(identity)}
    async with store.client.get(f"/_api/v1/transfers/{key}", headers=headers) as response:
        return response.status, await response.json()


async def cancel(store: Store, key: str, identity: str | None = ADA) -> tuple[int, Any]:
    """``DELETE /_api/v1/transfers/{key}``: (status, JSON body)."""
    headers = {"Accept": "application/json", **dn_headers(identity)}
    async with store.client.delete(f"/_api/v1/transfers/{key}", headers=headers) as response:
        return response.status, await response.json()


async def status_of(store: Store, key: str, identity: str | None = ADA) -> Any:
    """The status body of a transfer the client may see (asserting 200)."""
    code, body = await get_status(store, key, identity)
    assert code == 200, body
    return body


async def poll_status(
    store: Store, key: str, done: Callable[[int, Any], bool], what: str, identity: str | None = ADA
) -> tuple[int, Any]:
    """GET the status until ``done(status, body)`` holds; fail after WAIT seconds.

    Only for what a timer of the server does (the sweeper): nothing else
    tells the client that it has run.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        code, body = await get_status(store, key, identity)
        if done(code, body):
            return code, body
        if loop.time() >= deadline:
            raise AssertionError(f"timed out waiting until {what}; last answer {code}: {body}")
        await asyncio.sleep(0.02)


def file_rows(body: Any) -> list[tuple[str, int, int, str]]:
    """(name, size, received, state) of each file of a status body, in order."""
    return [(f["name"], f["size"], f["received"], f["state"]) for f in body["files"]]


def utc_time(text: str) -> datetime:
    """An ISO 8601 UTC time of a status body (asserting its form)."""
    assert ISO_UTC.match(text), text
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert moment.utcoffset() == timedelta(0)
    return moment


def now_ms() -> datetime:
    """The time now, cut to the milliseconds a status shows."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


# -- uploads ------------------------------------------------------------------------


async def patch(store: Store, key: str, num: int, offset: int, data: bytes, identity: str | None = ADA) -> int:
    """A tus PATCH appending ``data`` at ``offset``; returns the status."""
    headers = {
        "Tus-Resumable": "1.0.0",
        "Content-Type": "application/offset+octet-stream",
        "Upload-Offset": str(offset),
        **dn_headers(identity),
    }
    async with store.client.patch(f"/{store.prefix}/{key}/{num}", data=data, headers=headers) as response:
        await response.read()
        if response.status == 204:
            assert response.headers["Upload-Offset"] == str(offset + len(data))
        return response.status


async def head(store: Store, key: str, num: int, identity: str | None = ADA) -> int:
    """A tus HEAD for the offset; returns the status."""
    headers = {"Tus-Resumable": "1.0.0", **dn_headers(identity)}
    async with store.client.head(f"/{store.prefix}/{key}/{num}", headers=headers) as response:
        return response.status


async def upload_status(store: Store, method: str, key: str, num: int, data: bytes) -> int:
    """The status of a PUT, PATCH (from 0) or HEAD of file ``num``."""
    if method == "PUT":
        return (await store.put(key, num, data, identity=ADA))[0]
    if method == "PATCH":
        return await patch(store, key, num, 0, data)
    return await head(store, key, num)


async def download(store: Store, name: str) -> tuple[int, bytes]:
    async with store.client.get(f"/{store.prefix}/{name}") as response:
        return response.status, await response.read()


UPLOAD_METHODS = pytest.mark.parametrize("method", ["PUT", "PATCH", "HEAD"], ids=["put", "tus-patch", "tus-head"])


# -- status --------------------------------------------------------------------------


async def test_status_of_three_files_goes_pending_in_progress_finished(make_store: MakeStore, tmp_path: Path) -> None:
    store, _handler = await start(make_store, tmp_path)
    first, second, third = content("first", 64 * KIB), content("second", 40 * KIB), content("third", 10 * KIB)
    key = await store.register([("first.bin", first), ("second.bin", second), ("third.bin", third)], identity=ADA)

    pending = await status_of(store, key)
    assert (pending["transfer_key"], pending["prefix"], pending["owner"]) == (key, "files", ADA)
    assert pending["state"] == "PENDING"
    assert file_rows(pending) == [
        ("first.bin", len(first), 0, "PENDING"),
        ("second.bin", len(second), 0, "PENDING"),
        ("third.bin", len(third), 0, "PENDING"),
    ]
    assert [f["num"] for f in pending["files"]] == [0, 1, 2]
    created, updated = utc_time(pending["created_at"]), utc_time(pending["updated_at"])
    assert created <= updated
    # The default key lifetime is 24 h (each time is cut to the millisecond).
    assert abs(utc_time(pending["expires_at"]) - created - timedelta(hours=24)) <= timedelta(milliseconds=1)

    half = len(first) // 2
    mark = now_ms()
    assert await patch(store, key, 0, 0, first[:half]) == 204
    partial = await status_of(store, key)
    assert partial["state"] == "IN_PROGRESS"
    assert file_rows(partial) == [
        ("first.bin", len(first), half, "IN_PROGRESS"),
        ("second.bin", len(second), 0, "PENDING"),
        ("third.bin", len(third), 0, "PENDING"),
    ]
    assert partial["created_at"] == pending["created_at"]
    assert utc_time(partial["updated_at"]) >= mark

    mark = now_ms()
    assert await patch(store, key, 0, half, first[half:]) == 204
    assert await store.put(key, 1, second, identity=ADA) == (200, "File transfer OK")
    two_done = await status_of(store, key)
    assert two_done["state"] == "IN_PROGRESS"
    assert file_rows(two_done) == [
        ("first.bin", len(first), len(first), "FINISHED"),
        ("second.bin", len(second), len(second), "FINISHED"),
        ("third.bin", len(third), 0, "PENDING"),
    ]
    assert utc_time(two_done["updated_at"]) >= max(mark, utc_time(partial["updated_at"]))

    mark = now_ms()
    assert await store.put(key, 2, third, identity=ADA) == (200, "File transfer OK")
    finished = await status_of(store, key)
    assert finished["state"] == "FINISHED"
    assert file_rows(finished) == [
        ("first.bin", len(first), len(first), "FINISHED"),
        ("second.bin", len(second), len(second), "FINISHED"),
        ("third.bin", len(third), len(third), "FINISHED"),
    ]
    assert [(f["md5"], f["sha256"]) for f in finished["files"]] == [
        (md5_hex(data), sha256_hex(data)) for data in (first, second, third)
    ]
    assert utc_time(finished["updated_at"]) >= max(mark, utc_time(two_done["updated_at"]))
    assert finished["created_at"] == pending["created_at"]
    assert finished["expires_at"] == pending["expires_at"]


async def test_checksum_mismatch_makes_file_and_transfer_failed_until_a_correct_retry(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store, _handler = await start(make_store, tmp_path)
    good, other = content("good", 8 * KIB), content("other", 8 * KIB)
    key = await store.register([("good.bin", good), ("other.bin", other)], identity=ADA)
    assert await store.put(key, 0, good, identity=ADA) == (200, "File transfer OK")

    corrupted = bytes([other[0] ^ 0xFF]) + other[1:]
    assert await store.put(key, 1, corrupted, identity=ADA) == (405, "Checksum mismatch on upload")

    failed = await status_of(store, key)
    assert failed["state"] == "FAILED"
    assert file_rows(failed) == [
        ("good.bin", len(good), len(good), "FINISHED"),
        ("other.bin", len(other), 0, "FAILED"),
    ]
    assert failed["files"][0]["error"] is None
    assert "Checksum mismatch" in failed["files"][1]["error"]

    assert await store.put(key, 1, other, identity=ADA) == (200, "File transfer OK")
    finished = await status_of(store, key)
    assert finished["state"] == "FINISHED"
    assert file_rows(finished)[1] == ("other.bin", len(other), len(other), "FINISHED")
    assert finished["files"][1]["error"] is None


# -- cancel ---------------------------------------------------------------------------


async def published_partial_untouched(store: Store) -> tuple[str, dict[str, bytes]]:
    """A transfer of three files: one published, one half sent by tus PATCH, one untouched."""
    files = {
        "kept.bin": content("kept", 16 * KIB),
        "partial.bin": content("partial", 32 * KIB),
        "untouched.bin": content("untouched", 8 * KIB),
    }
    key = await store.register(list(files.items()), identity=ADA)
    assert await store.put(key, 0, files["kept.bin"], identity=ADA) == (200, "File transfer OK")
    assert await patch(store, key, 1, 0, files["partial.bin"][: 16 * KIB]) == 204
    assert store.staged_files() == [f"{key}.1.part"]
    return key, files


async def test_cancel_answers_cancelled_keeps_the_published_file_and_releases_the_rest(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store, handler = await start(make_store, tmp_path)
    key, files = await published_partial_untouched(store)

    code, body = await cancel(store, key)

    assert code == 200, body
    assert body["state"] == "CANCELLED"
    assert file_rows(body) == [
        ("kept.bin", len(files["kept.bin"]), len(files["kept.bin"]), "FINISHED"),
        ("partial.bin", len(files["partial.bin"]), 0, "CANCELLED"),
        ("untouched.bin", len(files["untouched.bin"]), 0, "CANCELLED"),
    ]
    assert await status_of(store, key) == body
    assert await download(store, "kept.bin") == (200, files["kept.bin"])
    assert store.staged_files() == []
    assert sorted(handler.cancel_calls()) == ["partial.bin", "untouched.bin"]
    assert sorted(handler.released_names) == ["partial.bin", "untouched.bin"]


@UPLOAD_METHODS
async def test_cancelled_transfer_refuses_uploads_with_410(make_store: MakeStore, tmp_path: Path, method: str) -> None:
    store, handler = await start(make_store, tmp_path)
    key, files = await published_partial_untouched(store)
    assert (await cancel(store, key))[0] == 200
    calls_before = len(handler.calls)

    for num, name in ((1, "partial.bin"), (2, "untouched.bin")):
        assert await upload_status(store, method, key, num, files[name]) == 410

    assert handler.calls[calls_before:] == []
    assert store.staged_files() == []
    assert store.served_files() == ["kept.bin"]


async def test_names_of_a_cancelled_transfer_can_be_registered_and_uploaded_again(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store, _handler = await start(make_store, tmp_path)
    key, files = await published_partial_untouched(store)
    assert (await cancel(store, key))[0] == 200

    again = [("partial.bin", files["partial.bin"]), ("untouched.bin", files["untouched.bin"])]
    new_key = await store.register(again, identity=ADA)

    assert new_key != key
    for num, (name, data) in enumerate(again):
        assert await store.put(new_key, num, data, identity=ADA) == (200, "File transfer OK")
        assert await download(store, name) == (200, data)
    assert (await status_of(store, new_key))["state"] == "FINISHED"


async def test_cancelling_twice_answers_cancelled_again_and_releases_nothing_more(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store, handler = await start(make_store, tmp_path)
    key, files = await published_partial_untouched(store)
    first_code, first = await cancel(store, key)
    assert first_code == 200
    calls_after_first = list(handler.calls)

    second_code, second = await cancel(store, key)

    assert second_code == 200, second
    assert second == first
    assert handler.calls == calls_after_first
    assert await download(store, "kept.bin") == (200, files["kept.bin"])


async def test_cancelling_a_finished_transfer_is_409_and_changes_nothing(make_store: MakeStore, tmp_path: Path) -> None:
    store, handler = await start(make_store, tmp_path)
    data = content("done", 4 * KIB)
    key = await store.register([("done.bin", data)], identity=ADA)
    assert await store.put(key, 0, data, identity=ADA) == (200, "File transfer OK")
    before = await status_of(store, key)

    code, body = await cancel(store, key)

    assert code == 409, body
    assert await status_of(store, key) == before
    assert before["state"] == "FINISHED"
    assert handler.cancel_calls() == []
    assert await download(store, "done.bin") == (200, data)


async def test_cancel_stops_a_running_upload_promptly_and_removes_its_staged_bytes(
    make_store: MakeStore, tmp_path: Path
) -> None:
    chunk = 4 * KIB
    store, handler = await start(make_store, tmp_path, chunk_size=chunk)
    running, waiting = content("running", 64 * KIB), content("waiting", 4 * KIB)
    # The raw socket sends no X-Client-DN: the transfer is the anonymous client's.
    key = await store.register([("running.bin", running), ("waiting.bin", waiting)])
    staging_file = store.staging / f"{key}.0.part"
    port = store.client.port
    assert port is not None
    reader, writer = await start_stalled_upload(
        store.client.host, port, store.prefix, key, 0, len(running), running[: 4 * chunk]
    )
    try:
        await until(lambda: staged_bytes(store.staging) >= chunk, "the store staged part of the body")

        async with asyncio.timeout(PROMPTLY):
            code, body = await cancel(store, key, identity=None)

        assert code == 200, body
        assert body["state"] == "CANCELLED"
        assert [f["state"] for f in body["files"]] == ["CANCELLED", "CANCELLED"]
        assert not staging_file.exists()
        assert store.staged_files() == []
        assert handler.cancel_calls().count("running.bin") == 1
        assert "complete_upload" not in handler.methods()

        # The rest of the body, sent now, publishes nothing either.
        with contextlib.suppress(ConnectionError):
            writer.write(running[4 * chunk :])
            await writer.drain()
        # The client, still sending, was told why its upload stopped (and the store's side of the
        # connection ended after the answer, so that reading to the end does not wait).
        async with asyncio.timeout(WAIT):
            answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 410 Transfer cancelled\r\n"), answer[:200]
        assert answer.endswith(b"\r\n\r\nTransfer cancelled\n"), answer[-200:]
        assert not (store.root / store.prefix / "running.bin").exists()
        assert store.served_files() == []
        assert (await download(store, "running.bin"))[0] == 404
        assert handler.cancel_calls().count("running.bin") == 1
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# -- who may see and cancel ---------------------------------------------------------------

STRANGERS = pytest.mark.parametrize(
    ("owner", "stranger"),
    [(ADA, MALLORY), (ADA, None), (None, MALLORY)],
    ids=["another-dn", "anonymous-on-a-dn-transfer", "a-dn-on-an-anonymous-transfer"],
)


@STRANGERS
async def test_another_identity_gets_403_on_status(
    make_store: MakeStore, tmp_path: Path, owner: str | None, stranger: str | None
) -> None:
    store, _handler = await start(make_store, tmp_path)
    key = await store.register([("mine.bin", b"mine")], identity=owner)

    code, body = await get_status(store, key, identity=stranger)

    assert code == 403
    assert body["error"] == "identity_mismatch"
    assert key not in str(body)


@STRANGERS
async def test_another_identity_gets_403_on_cancel_and_the_transfer_stays_open(
    make_store: MakeStore, tmp_path: Path, owner: str | None, stranger: str | None
) -> None:
    store, handler = await start(make_store, tmp_path)
    data = b"mine"
    key = await store.register([("mine.bin", data)], identity=owner)

    code, body = await cancel(store, key, identity=stranger)

    assert code == 403
    assert body["error"] == "identity_mismatch"
    assert handler.cancel_calls() == []
    assert (await status_of(store, key, identity=owner))["state"] == "PENDING"
    assert await store.put(key, 0, data, identity=owner) == (200, "File transfer OK")


@pytest.mark.parametrize("request_method", ["GET", "DELETE"], ids=["status", "cancel"])
@pytest.mark.parametrize("key", [secrets.token_hex(20), "not-a-key"], ids=["unknown-key", "malformed-key"])
async def test_unknown_transfer_key_is_404(
    make_store: MakeStore, tmp_path: Path, request_method: str, key: str
) -> None:
    store, _handler = await start(make_store, tmp_path)
    await store.register([("other.bin", b"other")], identity=ADA)

    code, body = await (get_status if request_method == "GET" else cancel)(store, key)

    assert code == 404
    assert body["error"] == "unknown_transfer"


# -- expiry and purge by the sweeper -----------------------------------------------------


#: The key lifetime of the expiry tests: the test moves the clock past it once its transfer is set up.
KEY_LIFETIME = 3600.0


async def start_expiring(make_store: MakeStore, tmp_path: Path) -> tuple[Store, ReleaseWatcher]:
    """A store whose sweeper runs every 50 ms, with keys that live KEY_LIFETIME seconds."""
    return await start(make_store, tmp_path, key_lifetime=KEY_LIFETIME, sweep_interval=0.05)


async def expired_transfer(store: Store, clock: WallClock) -> tuple[str, dict[str, bytes], Any]:
    """Two files registered, one half sent by tus PATCH, then the key's lifetime passes on ``clock``;
    returns once the sweeper expired them."""
    files = {"first.bin": content("first", 32 * KIB), "second.bin": content("second", 8 * KIB)}
    key = await store.register(list(files.items()), identity=ADA)
    assert await patch(store, key, 0, 0, files["first.bin"][: 16 * KIB]) == 204
    clock.advance(KEY_LIFETIME + 1)
    _code, body = await poll_status(
        store, key, lambda code, body: code == 200 and body["state"] == "EXPIRED", "the sweeper expired the transfer"
    )
    return key, files, body


async def test_sweeper_expires_an_old_transfer_and_releases_its_staging_and_reservations(
    make_store: MakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = WallClock(monkeypatch)
    store, handler = await start_expiring(make_store, tmp_path)

    await expired_transfer(store, clock)

    await handler.released(2)
    assert sorted(handler.cancel_calls()) == ["first.bin", "second.bin"]
    assert store.staged_files() == []
    assert store.served_files() == []


async def test_files_of_an_expired_transfer_show_expired_with_nothing_received(
    make_store: MakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = WallClock(monkeypatch)
    store, _handler = await start_expiring(make_store, tmp_path)

    key, files, body = await expired_transfer(store, clock)

    assert file_rows(body) == [
        ("first.bin", len(files["first.bin"]), 0, "EXPIRED"),
        ("second.bin", len(files["second.bin"]), 0, "EXPIRED"),
    ]
    assert await status_of(store, key) == body


@UPLOAD_METHODS
async def test_expired_transfer_refuses_uploads_with_410(
    make_store: MakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    clock = WallClock(monkeypatch)
    store, handler = await start_expiring(make_store, tmp_path)
    key, files, _body = await expired_transfer(store, clock)
    await handler.released(2)

    for num, data in enumerate(files.values()):
        assert await upload_status(store, method, key, num, data) == 410

    assert store.staged_files() == []
    assert store.served_files() == []


async def test_names_of_an_expired_transfer_can_be_uploaded_again_under_a_new_key(
    make_store: MakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = WallClock(monkeypatch)
    store, handler = await start_expiring(make_store, tmp_path)
    key, files, _body = await expired_transfer(store, clock)
    await handler.released(2)

    new_key = await store.register(list(files.items()), identity=ADA)

    assert new_key != key
    for num, (name, data) in enumerate(files.items()):
        assert await store.put(new_key, num, data, identity=ADA) == (200, "File transfer OK")
        assert await download(store, name) == (200, data)


async def test_status_says_expired_once_the_key_lifetime_has_passed_before_any_sweep(
    make_store: MakeStore, tmp_path: Path
) -> None:
    # The sweeper will not run during the test: the key's lifetime alone decides.
    store, _handler = await start(make_store, tmp_path, key_lifetime=0.3, sweep_interval=3600)
    data = content("late", 4 * KIB)
    key = await store.register([("late.bin", data)], identity=ADA)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    # The timer under test: the store itself says when the key has expired (HEAD turns 410).
    while await head(store, key, 0) != 410:
        assert loop.time() < deadline, "the key never expired"
        await asyncio.sleep(0.02)

    body = await status_of(store, key)

    assert body["state"] == "EXPIRED"
    assert [f["state"] for f in body["files"]] == ["EXPIRED"]


async def test_finished_transfer_is_purged_after_the_retention_time_and_its_file_stays(
    make_store: MakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = WallClock(monkeypatch)
    retention = 3600.0
    store, _handler = await start(make_store, tmp_path, transfer_retention=retention, sweep_interval=0.05)
    data = content("kept", 4 * KIB)
    key = await store.register([("kept.bin", data)], identity=ADA)
    assert await store.put(key, 0, data, identity=ADA) == (200, "File transfer OK")
    assert (await status_of(store, key))["state"] == "FINISHED"

    clock.advance(retention + 1)
    _code, body = await poll_status(store, key, lambda code, _body: code == 404, "the sweeper purged the record")

    assert body["error"] == "unknown_transfer"
    assert await download(store, "kept.bin") == (200, data)


async def test_open_transfer_is_not_purged_by_the_retention_time(make_store: MakeStore, tmp_path: Path) -> None:
    store, _handler = await start(make_store, tmp_path, transfer_retention=0.2, sweep_interval=0.05)
    waiting = content("waiting", 4 * KIB)
    open_key = await store.register([("waiting.bin", waiting)], identity=ADA)
    done = content("done", 4 * KIB)
    done_key = await store.register([("done.bin", done)], identity=ADA)
    assert await store.put(done_key, 0, done, identity=ADA) == (200, "File transfer OK")

    # The open transfer is older than the finished one, which the sweeper has now purged.
    await poll_status(store, done_key, lambda code, _body: code == 404, "the sweeper purged the finished record")

    assert (await status_of(store, open_key))["state"] == "PENDING"
    assert await store.put(open_key, 0, waiting, identity=ADA) == (200, "File transfer OK")


# -- disk headroom ----------------------------------------------------------------------


#: Free bytes on the disk the headroom tests give their store.
FREE = 64 * MIB


class Usage(NamedTuple):
    """What ``shutil.disk_usage`` answers."""

    total: int
    used: int
    free: int


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's disk (everything under tmp_path) has exactly FREE bytes free throughout the test.

    The real disk's free space changes while a test runs (other processes write and delete files),
    and these tests draw the line between "fits" and "does not fit" within a mebibyte.
    """
    real = shutil.disk_usage

    def usage(path: str | Path) -> Usage | tuple[int, int, int]:
        if Path(path).is_relative_to(tmp_path):
            return Usage(total=4 * FREE, used=3 * FREE, free=FREE)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", usage)


def margin_leaving(headroom: int) -> int:
    """min_free_bytes that leaves ``headroom`` bytes for uploads on the disk of :func:`disk`."""
    return FREE - headroom


def sized_json(name: str, size: int) -> dict[str, Any]:
    return {"files": [{"name": name, "size": size}]}


def sized_ini(name: str, size: int) -> bytes:
    return f"[manifest]\nnum_files = 1\n\n[0]\nname = {name}\nsize = {size}\n".encode()


async def post_json_manifest(store: Store, manifest: Any) -> tuple[int, Any]:
    async with store.client.post(f"/{store.prefix}/manifest", json=manifest, headers=dn_headers(ADA)) as response:
        return response.status, await response.json()


@pytest.mark.usefixtures("disk")
async def test_json_manifest_beyond_the_disk_headroom_is_507_and_reserves_nothing(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store, handler = await start(make_store, tmp_path, min_free_bytes=margin_leaving(MIB))

    code, body = await post_json_manifest(store, sized_json("big.bin", 2 * MIB))

    assert code == 507, body
    assert body["error"] == "insufficient_storage"
    assert "add_pending_upload" not in handler.methods()
    assert store.staged_files() == []


@pytest.mark.usefixtures("disk")
async def test_ini_manifest_beyond_the_disk_headroom_is_405_not_enough_disk_space(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store, handler = await start(make_store, tmp_path, min_free_bytes=margin_leaving(MIB))

    async with store.client.post(f"/{store.prefix}/manifest", data=sized_ini("big.bin", 2 * MIB)) as response:
        text = await response.text()

    assert (response.status, response.reason) == (405, "Not enough disk space for upload")
    assert "transfer_key" not in text
    assert "add_pending_upload" not in handler.methods()


@pytest.mark.usefixtures("disk")
async def test_manifest_within_the_disk_headroom_is_accepted(make_store: MakeStore, tmp_path: Path) -> None:
    store, handler = await start(make_store, tmp_path, min_free_bytes=margin_leaving(MIB))

    code, body = await post_json_manifest(store, sized_json("small.bin", 512 * KIB))

    assert code == 201, body
    assert handler.methods() == ["can_upload", "add_pending_upload"]
    assert (await status_of(store, body["transfer_key"]))["state"] == "PENDING"


@pytest.mark.usefixtures("disk")
async def test_open_transfer_reservation_counts_against_the_next_manifest_until_cancelled(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store, _handler = await start(make_store, tmp_path, min_free_bytes=margin_leaving(3 * MIB // 2))

    first_code, first = await post_json_manifest(store, sized_json("first.bin", MIB))
    assert first_code == 201, first
    refused_code, refused = await post_json_manifest(store, sized_json("second.bin", MIB))
    assert refused_code == 507, refused
    assert refused["error"] == "insufficient_storage"

    assert (await cancel(store, first["transfer_key"]))[0] == 200
    second_code, second = await post_json_manifest(store, sized_json("second.bin", MIB))

    assert second_code == 201, second


# -- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"transfer_retention": -1.0},
        {"sweep_interval": 0.0},
        {"sweep_interval": -5.0},
        {"key_lifetime": 0.0},
        {"min_free_bytes": -1},
    ],
    ids=[
        "negative-transfer-retention",
        "zero-sweep-interval",
        "negative-sweep-interval",
        "zero-key-lifetime",
        "negative-min-free-bytes",
    ],
)
def test_lifecycle_settings_out_of_range_are_refused(tmp_path: Path, overrides: dict[str, Any]) -> None:
    (name,) = overrides
    with pytest.raises(SettingsError, match=name if name != "min_free_bytes" else "negative"):
        Settings(root=tmp_path, port=0, **overrides)


def test_key_lifetime_defaults_to_a_day_and_record_retention_to_a_week() -> None:
    settings = Settings()
    assert (settings.key_lifetime, settings.transfer_retention) == (24 * 3600.0, 7 * 24 * 3600.0)


async def test_names_reserved_for_a_transfer_never_recorded_are_freed_by_the_sweep(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process that dies between reserving a manifest's names (the catalogue) and recording its
    # transfer (the state) leaves the names reserved for nothing: here, the reservation alone.
    store = await make_store(lease_time=30.0)
    held = await store.register([("held.bin", b"h")])
    assert (
        await store.handler.catalogue.reserve([Reservation("orphan.bin", 1)], may_take=lambda *_: True, now=0.0) == []
    )
    refused = await store.client.post("/files/manifest", json={"files": [{"name": "orphan.bin", "size": 1}]})
    assert refused.status == 403
    lifecycle = store.client.app[CONTEXT].lifecycle
    clock = WallClock(monkeypatch)
    clock.advance(31.0)
    await lifecycle.sweep()
    # Freed once older than a lease; the name of a recorded transfer stays reserved.
    assert not await store.handler.catalogue.is_reserved("orphan.bin")
    assert await store.handler.catalogue.is_reserved("held.bin")
    assert (await store.put(held, 0, b"h"))[0] == 200
    await store.register([("orphan.bin", b"o")])


async def test_a_patch_whose_transfer_another_node_cancelled_meanwhile_leaves_no_staged_bytes(
    make_store: MakeStore,
) -> None:
    # Another node's cancel commits in the shared state and removes the staging file it sees (none yet:
    # this request's bytes are still buffered); the bytes this request writes after it must go too.
    store = await make_store(lease_time=30.0)
    data = b"x" * 40_000
    key = await store.register([("cancelled.bin", data)])
    lifecycle = store.client.app[CONTEXT].lifecycle
    host, port = store.client.host, store.client.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            (
                f"PATCH /files/{key}/0 HTTP/1.1\r\nHost: {host}:{port}\r\nTus-Resumable: 1.0.0\r\n"
                "Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\nContent-Length: 20000\r\n\r\n"
            ).encode()
            + data[:10_000]
        )
        await writer.drain()

        async def uploading() -> bool:
            status = await lifecycle.state.status(key, 0)
            return status is not None and status.holder is not None

        await eventually(uploading, "the PATCH holds the file")
        assert await lifecycle.state.cancel(key, now=time.time()) is not None  # the other node's commit
        writer.write(data[10_000:20_000])
        await writer.drain()
        async with asyncio.timeout(20):
            answer = await reader.readline()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 410"), answer[:80]
    assert store.staged_files() == []


async def test_a_file_its_dead_holder_published_but_never_recorded_is_recorded_when_its_lease_is_reaped(
    make_store: MakeStore,
) -> None:
    # The holder verified the file, moved it into place and published it in the catalogue, then died
    # before recording the publish in the state (two transactions): the reaper records it.
    store = await make_store(lease_time=30.0)
    data = b"published, then the node died"
    dn = "/O=Lab/CN=Ada"
    key = await store.register([("late.bin", data)], identity=dn)
    lifecycle = store.client.app[CONTEXT].lifecycle
    await lifecycle.state.claim(key, 0, "gone:1", lease=1.0, now=time.time() - 10)
    await asyncio.to_thread((store.root / "files").mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread((store.root / "files" / "late.bin").write_bytes, data)
    verified = FileInfo("late.bin", len(data), md5_hex(data), sha256_hex(data))
    await store.handler.complete_upload(Identity.asserted(dn), verified)

    await lifecycle.sweep()

    transfer = await lifecycle.state.get(key)
    assert transfer is not None and transfer.public_state() == "FINISHED"
    events = [e.type for e in await lifecycle.state.events_after(0, limit=100) if e.key == key]
    assert events[-2:] == ["file.completed", "transfer.finished"], events
    assert (await store.put(key, 0, data, identity=dn))[0] == 409
