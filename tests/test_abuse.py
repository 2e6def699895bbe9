"""No single client can deny the store to the others.

Each test plays one hostile or careless client against a real store on
loopback (bounded in time and load) and checks two things: the client gets
a clear refusal (status, reason, the limit), and a well-behaved client is
still served. Limits tested: the shape of an INI manifest and parsing it off
the event loop, quotas per identity (open transfers, reserved names and
bytes, uploads at once), the start timeout of reservations, the minimum
upload rate, connections in all and per address, and the size of the state
one manifest may write.
"""

from __future__ import annotations

import asyncio
import io
import json
import resource
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from datastore.http.context import CONTEXT
from datastore.http.server import HTTPTransferServer

from .conftest import MakeStore
from .harness import Store, ini_manifest, json_manifest, make_settings, spawn_serve, until

WAIT = 20.0


async def people(store: Store) -> tuple[dict[str, str], dict[str, str]]:
    """Ada's and Bob's credentials: tokens, proved identities, each with a share of their own."""
    tokens = store.client.app[CONTEXT].tokens
    ada, bob = [(await tokens.create(name, ["read", "upload"])).token for name in ("ada", "bob")]
    return {"Authorization": f"Bearer {ada}"}, {"Authorization": f"Bearer {bob}"}


async def register(store: Store, files: list[tuple[str, bytes]], headers: dict[str, str]) -> aiohttp.ClientResponse:
    return await store.client.post("/files/manifest", json=json_manifest(files), headers=headers)


async def health_latencies(store_url: Callable[[str], Any], until_done: asyncio.Future[Any]) -> list[float]:
    """How long each health check took, one after another, until ``until_done`` resolves."""
    latencies = []
    while not until_done.done():
        started = time.monotonic()
        async with store_url("/_api/v1/health") as response:
            assert response.status == 200
        latencies.append(time.monotonic() - started)
    return latencies


# -- manifests: bounded before they are parsed, and never parsed on the event loop ------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            b"[manifest]\nnum_files = 10000\n" + b"".join(b"[s%d]\n" % i for i in range(50_000)),
            "50001 sections; a manifest of 10000 file(s) may have at most 10009",
            id="a-flood-of-sections",
        ),
        pytest.param(
            b"[manifest]\nnum_files = 1\n[0]\nname = a\nsize = 1\n" + b"k = v\n" * 700_000,
            "700006 lines; a manifest of 1 file(s) may have at most 80",
            id="a-flood-of-keys",
        ),
    ],
)
async def test_a_hostile_ini_manifest_is_refused_before_it_is_parsed(
    make_store: MakeStore, body: bytes, message: str
) -> None:
    store = await make_store()
    started = time.monotonic()
    response = await store.client.post("/files/manifest", data=io.BytesIO(body))
    assert response.status == 400
    assert (await response.text()) == f"ConfigParser error: {message}\n"
    # Refused from its shape: ConfigParser took tens of seconds over the first.
    assert time.monotonic() - started < 5


async def test_the_event_loop_answers_health_checks_while_large_manifests_are_parsed(make_store: MakeStore) -> None:
    store = await make_store(max_reserved_names_per_client=30_000)  # three clients of one address

    def manifest(client: int) -> bytes:
        # The costliest shape the bounds admit: 10,000 files with extra keys, most of a second of
        # ConfigParser each; three in a row would hold a loop that parsed them for seconds.
        return b"[manifest]\nnum_files = 10000\n" + b"".join(
            b"[%d]\nname = c%d-%05d.dat\nsize = 1\nx1 = y\nx2 = y\nx3 = y\nx4 = y\nx5 = y\n" % (i, client, i)
            for i in range(10_000)
        )

    posting = asyncio.gather(
        *(
            store.client.post("/files/manifest", data=io.BytesIO(manifest(n)), headers={"X-Client-DN": f"/CN={n}"})
            for n in range(3)
        )
    )

    latencies = await health_latencies(store.client.get, posting)

    assert [response.status for response in await posting] == [200, 200, 200]
    assert latencies, "the manifests were answered before a single health check"
    assert max(latencies) < 1.0, latencies


async def test_many_small_costly_manifests_are_parsed_off_the_loop(make_store: MakeStore) -> None:
    store = await make_store()
    # Under 64 KiB, yet about 9,500 sections: a tenth of a second of ConfigParser each, refused in the end.
    body = b"[manifest]\nnum_files = 10000\n" + b"".join(b"[%d]\n" % i for i in range(9_500))
    assert len(body) < 64 << 10

    async def flood() -> list[int]:
        return [(await store.client.post("/files/manifest", data=body)).status for _ in range(3)]

    posting = asyncio.gather(*(flood() for _ in range(8)))
    latencies = await health_latencies(store.client.get, posting)

    assert {status for statuses in await posting for status in statuses} == {400}
    assert max(latencies) < 1.0, latencies


async def test_manifests_in_memory_are_bounded_and_the_next_one_is_told_to_come_back(make_store: MakeStore) -> None:
    store = await make_store(max_manifest_bytes=32 << 10, max_manifest_memory=64 << 10)
    held = []
    for _ in range(2):  # two manifests of 32 KiB, each one byte short of done: 64 KiB held
        reader, writer = await asyncio.open_connection("127.0.0.1", store.client.port)
        writer.write(b"POST /files/manifest HTTP/1.1\r\nHost: x\r\nContent-Length: 32768\r\n\r\n" + b"#" * 32767)
        await writer.drain()
        held.append((reader, writer))
    body = ini_manifest([("a.txt", b"a")])
    try:
        async with asyncio.timeout(WAIT):
            while True:  # the two bodies reach the store on their own time; ask until they have
                refused = await store.client.post("/files/manifest", data=body)
                if refused.status != 200:
                    break
                await asyncio.sleep(0.01)
        assert (refused.status, refused.headers["Retry-After"]) == (503, "1")
        assert (await refused.text()).startswith("Too many manifests at once: the store holds")
    finally:
        for _, writer in held:
            writer.close()
    # Once the held bodies are dropped (the store notices their closed connections), manifests come in again.
    async with asyncio.timeout(WAIT):
        while (await store.client.post("/files/manifest", data=ini_manifest([("b.txt", b"b")]))).status != 200:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_hostile_manifest_leaves_no_memory_behind(tmp_path: Path) -> None:
    process, (match,) = await spawn_serve("--root", str(tmp_path / "data"))
    hostile = b"[manifest]\nnum_files = 1\n" + b"".join(b"[s%d]\n" % i for i in range(900_000))
    try:
        async with aiohttp.ClientSession(match["base"]) as http:
            for _ in range(3):
                async with http.post("/files/manifest", data=io.BytesIO(hostile[: 8 << 20])) as response:
                    assert response.status == 400
        peak = peak_rss_mib(process.pid)
    finally:
        process.terminate()
        await process.wait()
    # ConfigParser held well over a gigabyte for one such manifest; the store idles near 60 MiB.
    assert peak < 200, f"peak RSS {peak} MiB"


def peak_rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


async def test_one_manifest_with_a_long_dn_writes_its_owner_once(make_store: MakeStore) -> None:
    store = await make_store()
    state = store.state_dir
    dn = {"X-Client-DN": "/O=Lab/CN=" + "d" * 1000}
    before = state_bytes(state)
    body = json_manifest([(f"f{i:05d}", b"") for i in range(10_000)])
    response = await store.client.post(
        "/files/manifest",
        data=io.BytesIO(json.dumps(body).encode()),
        headers={**dn, "Content-Type": "application/json"},
    )
    assert response.status == 201
    grown = state_bytes(state) - before
    # 10,000 names of 6 bytes; the DN alone, once per file, would be 10 MB.
    assert grown < 8 << 20, f"the state grew by {grown} bytes"


def state_bytes(state: Path) -> int:
    return sum(path.stat().st_size for path in state.rglob("*") if path.is_file())


# -- quotas per identity ---------------------------------------------------------------------------------------


async def test_open_transfers_per_client_are_limited_and_others_still_register(make_store: MakeStore) -> None:
    store = await make_store(max_transfers_per_client=2)
    ada, bob = await people(store)
    first = await register(store, [("a1", b"1")], ada)
    assert (await register(store, [("a2", b"2")], ada)).status == 201

    refused = await register(store, [("a3", b"3")], ada)

    assert refused.status == 429
    assert (await refused.json())["message"] == "Quota exceeded: you hold 2 open transfers; the limit is 2"
    assert (await register(store, [("b1", b"1")], bob)).status == 201
    # Ada's share comes back as soon as one of hers ends.
    await store.client.delete(f"/_api/v1/transfers/{(await first.json())['transfer_key']}", headers=ada)
    assert (await register(store, [("a3", b"3")], ada)).status == 201


async def test_reserved_names_per_client_are_limited(make_store: MakeStore) -> None:
    store = await make_store(max_reserved_names_per_client=5)
    ada, bob = await people(store)
    assert (await register(store, [(f"a{i}", b"") for i in range(3)], ada)).status == 201
    refused = await register(store, [(f"b{i}", b"") for i in range(3)], ada)
    assert refused.status == 429
    assert "reserve 3 names and this one 3; the limit is 5" in (await refused.json())["message"]
    # Nothing of the refused manifest stays reserved.
    assert (await register(store, [(f"b{i}", b"") for i in range(3)], bob)).status == 201


async def test_reserved_bytes_per_client_are_limited_also_for_the_legacy_form(make_store: MakeStore) -> None:
    store = await make_store(max_reserved_bytes_per_client=1000)
    ada, bob = await people(store)
    assert (await register(store, [("a", b"x" * 600)], ada)).status == 201
    refused = await store.client.post("/files/manifest", data=ini_manifest([("b", b"x" * 600)]), headers=ada)
    assert refused.status == 429
    assert "may still write 600 bytes and this one 600; the limit is 1000" in await refused.text()
    assert (await register(store, [("b", b"x" * 600)], bob)).status == 201


async def test_anonymous_clients_and_asserted_dns_share_their_addresss_quota(make_store: MakeStore) -> None:
    store = await make_store(max_transfers_per_client=1)  # and X-Client-DN trusted (make_settings)
    ada, _ = await people(store)
    assert (await register(store, [("a", b"1")], {})).status == 201
    assert (await register(store, [("b", b"2")], {})).status == 429
    # A DN written into a header is no share of its own: a client could write a new one every time.
    assert (await register(store, [("b", b"2")], {"X-Client-DN": "/CN=someone else"})).status == 429
    assert (await register(store, [("b", b"2")], ada)).status == 201


async def test_uploads_at_once_per_client_are_limited_and_others_still_upload(make_store: MakeStore) -> None:
    store = await make_store(max_uploads_per_client=2)
    ada, bob = await people(store)
    key = (await (await register(store, [(f"a{i}", b"x" * 100) for i in range(3)], ada)).json())["transfer_key"]
    host, port = "127.0.0.1", store.client.port
    lifecycle = store.client.app[CONTEXT].lifecycle
    held = [await hold_upload(host, port, key, num, ada) for num in (0, 1)]
    try:
        await until(lambda: lifecycle.active_uploads >= 2, "two uploads of Ada's hold their slots", timeout=WAIT)

        refused = await store.client.put(f"/files/{key}/2", data=b"x" * 100, headers=ada)

        assert (refused.status, refused.headers["Retry-After"]) == (429, "1")
        assert "you are running 2 uploads" in await refused.text()
        bobs = (await (await register(store, [("b", b"y")], bob)).json())["transfer_key"]
        assert (await store.client.put(f"/files/{bobs}/0", data=b"y", headers=bob)).status == 200
    finally:
        for _, writer in held:
            writer.close()


async def hold_upload(
    host: str, port: int, key: str, num: int, identity: dict[str, str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A PUT of 100 declared bytes that sends one and then nothing, as ``identity``."""
    reader, writer = await asyncio.open_connection(host, port)
    head = f"PUT /files/{key}/{num} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in identity.items())
    writer.write(head.encode() + b"\r\nx")
    await writer.drain()
    return reader, writer


# -- reservations that never start ------------------------------------------------------------------------------


async def test_a_transfer_that_never_starts_expires_after_the_start_timeout_and_frees_its_names(
    make_store: MakeStore,
) -> None:
    store = await make_store(start_timeout=60)
    ada, bob = await people(store)
    idle = (await (await register(store, [("taken.txt", b"x")], ada)).json())["transfer_key"]
    started = (await (await register(store, [("begun.txt", b"xy")], ada)).json())["transfer_key"]
    tus = {"Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0", **ada}
    assert (await store.client.patch(f"/files/{started}/0", data=b"x", headers=tus)).status == 204

    await store.client.app[CONTEXT].lifecycle.expire(now=time.time() + 61)

    status = await (await store.client.get(f"/_api/v1/transfers/{idle}", headers=ada)).json()
    assert status["state"] == "EXPIRED"
    assert (await register(store, [("taken.txt", b"x")], bob)).status == 201
    begun = await (await store.client.get(f"/_api/v1/transfers/{started}", headers=ada)).json()
    assert begun["state"] == "IN_PROGRESS"


# -- slow clients -----------------------------------------------------------------------------------------------


async def trickle(host: str, port: int, head: bytes, body: bytes, every: float) -> bytes:
    """Send ``head``, then ``body`` ten bytes at a time every ``every`` seconds, until the server answers."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head)
        answer = asyncio.ensure_future(reader.read(4096))
        for start in range(0, len(body), 10):
            done, _ = await asyncio.wait([answer], timeout=every)
            if done:
                break
            writer.write(body[start : start + 10])
            await writer.drain()
        async with asyncio.timeout(WAIT):
            return await answer
    finally:
        writer.close()


async def test_an_upload_slower_than_the_minimum_rate_is_dropped_and_a_fast_one_succeeds(
    make_store: MakeStore,
) -> None:
    store = await make_store(min_upload_rate=1000, rate_window=0.5)
    ada, _ = await people(store)
    data = b"x" * 10_000
    key = (await (await register(store, [("slow.bin", data), ("fast.bin", data)], ada)).json())["transfer_key"]
    head = f"PUT /files/{key}/0 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
    head += f"Authorization: {ada['Authorization']}\r\n\r\n"

    # Ten bytes every 50 ms is 200 bytes a second: never silent for long, always too slow.
    answer = await trickle("127.0.0.1", store.client.port, head.encode(), data, every=0.05)

    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"less than the minimum of 1000 bytes/s" in answer
    assert store.staged_files() == []
    assert (await store.client.put(f"/files/{key}/1", data=data, headers=ada)).status == 200


async def test_a_manifest_trickled_slower_than_the_minimum_rate_is_dropped(make_store: MakeStore) -> None:
    store = await make_store(min_upload_rate=1000, rate_window=0.5)
    body = ini_manifest([("a.txt", b"x")])
    head = f"POST /files/manifest HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) + 10_000}\r\n\r\n"
    answer = await trickle("127.0.0.1", store.client.port, head.encode(), body + b"\n" * 10_000, every=0.05)
    assert answer.startswith(b"HTTP/1.1 408 ")


# -- connections ------------------------------------------------------------------------------------------------


@asynccontextmanager
async def running(tmp_path: Path, **settings: Any) -> AsyncIterator[HTTPTransferServer]:
    server = HTTPTransferServer(make_settings(tmp_path / "root", tmp_path / "state", **settings))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def ask_health(port: int, count: int) -> tuple[list[Connection], list[bytes]]:
    """Open ``count`` connections, each asking for the health once; they stay open. Their status lines."""
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    for _, writer in connections:
        writer.write(b"GET /_api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    answers = []
    for reader, _ in connections:
        async with asyncio.timeout(WAIT):
            answers.append(await reader.readuntil(b"\r\n"))
    return connections, answers


async def get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(WAIT):
            return await reader.read()
    finally:
        writer.close()


async def test_connections_over_the_cap_get_a_clean_503_and_the_store_serves_again_when_they_go(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(tmp_path, max_connections=8) as server:
        # Each asks something, so that the store has taken every one of them in.
        idle, answers = await ask_health(server.port, 8)
        assert answers == [b"HTTP/1.1 200 OK\r\n"] * 8

        refused = await get(server.port, "/_api/v1/health")

        assert refused.startswith(b"HTTP/1.1 503 Too many connections\r\n")
        why = b"Too many connections: the store holds 8 connections, as many as it may; try again later\n"
        assert refused.endswith(why)
        idle.pop()[1].close()
        await until_served(server.port)
        for _, writer in idle:
            writer.close()
    assert not [r for r in caplog.records if r.exc_info]


async def until_served(port: int) -> None:
    """Wait (bounded) until a new connection is served: the server notices a closed one when it reads it."""
    async with asyncio.timeout(WAIT):
        while not (await get(port, "/_api/v1/health")).startswith(b"HTTP/1.1 200 "):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_one_address_may_hold_only_its_share_of_connections(tmp_path: Path) -> None:
    async with running(tmp_path, max_connections_per_client=3) as server:
        idle, answers = await ask_health(server.port, 3)
        assert answers == [b"HTTP/1.1 200 OK\r\n"] * 3
        refused = await get(server.port, "/_api/v1/health")
        assert b"your address holds 3 connections, as many as one may" in refused
        for _, writer in idle:
            writer.close()


def low_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def test_near_the_file_descriptor_limit_the_store_refuses_cleanly_and_logs_no_traceback(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with log.open("wb") as stderr:
        process, (match,) = await spawn_serve(
            "--root", str(tmp_path / "data"), stderr=stderr, preexec_fn=low_file_limit
        )
    port = int(match["port"])
    try:
        # 256 descriptors: the store takes (256 - 128) / 2 = 64 connections and refuses the rest.
        sockets, answers = await ask_health(port, 150)
        assert answers.count(b"HTTP/1.1 200 OK\r\n") == 64
        assert answers.count(b"HTTP/1.1 503 Too many connections\r\n") == 150 - 64
        for _, writer in sockets:
            writer.close()
        await until_served(port)
    finally:
        process.terminate()
        await process.wait()
    output = log.read_text()
    assert "Traceback" not in output
    assert output.count("refused") <= 2, output
