"""The OpenAPI document: served without credentials, valid OpenAPI 3.1, describing every route;
and Schemathesis fuzzing a running ``datastore serve`` from it, as an administrator and without
credentials: no 5xx, no traceback, and every answer as the document describes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from datastore.http.jobs import JOB_FIELDS
from datastore.http.jobs import JOB_STEPS as JOB_STEPS
from datastore.http.openapi import INVITATION_ANSWERS, OPENAPI_PATH
from datastore.jobs.states import JobState
from datastore.security.policy import Policy

from .conftest import MakeStore
from .harness import SERVING

# -- the document -------------------------------------------------------------------------------


async def test_the_document_is_served_without_credentials_and_is_valid_openapi_3_1(make_store: MakeStore) -> None:
    # The default policy: anonymous clients get 401 everywhere else.
    store = await make_store(policy=Policy(), trust_client_dn=False)
    assert (await store.client.get("/files/")).status == 401

    response = await store.client.get(OPENAPI_PATH)

    assert response.status == 200
    assert response.content_type == "application/json"
    document = await response.json()
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": str(store.client.make_url("")), "description": "the listener that answered"}]


async def test_the_document_takes_its_limits_and_prefixes_from_the_running_store(make_store: MakeStore) -> None:
    store = await make_store(prefix="venue-1", max_files=7, max_file_size=1000)

    document = await (await store.client.get(OPENAPI_PATH)).json()

    files = document["components"]["schemas"]["ManifestRequest"]["properties"]["files"]
    assert (files["maxItems"], files["items"]["properties"]["size"]["maximum"]) == (7, 1000)
    assert document["components"]["parameters"]["prefix"]["examples"] == {"venue-1": {"value": "venue-1"}}


async def test_the_document_describes_every_route_and_nothing_else(make_store: MakeStore) -> None:
    store = await make_store()
    document = await (await store.client.get(OPENAPI_PATH)).json()
    documented = {(path, method.upper()) for path, item in document["paths"].items() for method in item} - {
        (path, field.upper()) for path, item in document["paths"].items() for field in ("parameters", "description")
    }
    routed = set()
    for route in store.client.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        routed.add((info.get("path") or info["formatter"], route.method))
    # aiohttp answers HEAD on every GET route, as the document says once; other HEADs are operations.
    implicit_heads = {(path, "HEAD") for path, method in routed if method == "GET"} - documented
    assert documented == routed - implicit_heads


async def test_the_job_submission_schema_lists_what_the_parser_takes(make_store: MakeStore) -> None:
    store = await make_store()
    document = await (await store.client.get(OPENAPI_PATH)).json()

    schemas = document["components"]["schemas"]
    submission = schemas["JobSubmission"]
    assert set(submission["properties"]) == JOB_FIELDS
    assert set(submission["properties"]["files"]["items"]["properties"]) == {
        "source",
        "destination",
        "size",
        "checksum",
    }
    assert document["components"]["parameters"]["step"]["schema"]["enum"] == list(JOB_STEPS)
    assert schemas["Job"]["properties"]["state"]["enum"] == [str(state) for state in JobState]


_END = {"source": "local:/files/a.bin", "destination": "local:/files/b.bin"}


@pytest.mark.parametrize(
    "body",
    [
        {"files": [_END], "verify_checksum": {}},
        {"files": [{**_END, "size": 2**63}]},
        {"files": [{**_END, "size": 2**63 - 1}, {**_END, "destination": "local:/files/c.bin", "size": 1}]},
        {"files": [_END], "deadline": 1e30},
        {"files": [_END], "deadline": 10**400},
        {"files": [_END], "deadline": "0001-01-01T00:00:00+14:00"},
        {"files": [{**_END, "checksum": "md5:" + "a" * 31 + "\n"}]},
    ],
    ids=["verify-object", "size", "total-size", "deadline", "deadline-int", "deadline-iso", "checksum-newline"],
)
async def test_a_job_submission_beyond_the_documented_bounds_is_400(make_store: MakeStore, body: Any) -> None:
    # Each of these was a 500 (or, the checksum, accepted) before the parser bounded it.
    store = await make_store()

    reply = await store.client.post("/_api/v1/jobs", json=body, headers={"X-Client-DN": "/O=Lab/CN=Ada"})

    assert reply.status == 400, await reply.text()


_INVITATION = {"prefix": "files", "names": ["invited.bin"], "size": 10}


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        ("accept", {"budget": 2**62}),
        ("accept", {"lifetime": 10**400}),
        ("extend", {"bytes": 2**62 - 10}),
        ("extend", {"bytes": 2**70}),
    ],
    ids=["budget", "lifetime-int", "extend-to-bound", "extend-huge"],
)
async def test_an_invitation_answer_beyond_the_documented_bounds_is_400(
    make_store: MakeStore, answer: str, body: Any
) -> None:
    # Each of these was a 500 (SQLite or float overflow) or, the extension, a budget SQLite kept as a float.
    store = await make_store()
    who = {"X-Client-DN": "/O=Lab/CN=Ada"}
    asked = await store.client.post("/_api/v1/invitations", json=_INVITATION)
    assert asked.status == 201, await asked.text()
    url = (await asked.json())["url"]
    if answer == "extend":
        accepted = await store.client.post(f"{url}/accept", json={}, headers=who)
        assert accepted.status == 200, await accepted.text()

    reply = await store.client.post(f"{url}/{answer}", json=body, headers=who)

    assert reply.status == 400, await reply.text()


# -- fuzzing ------------------------------------------------------------------------------------

#: Examples per operation in each generating phase, and the bound of one run over every operation.
MAX_EXAMPLES = 40
RUN_BOUND = 40.0
HOOKS = Path(__file__).with_name("fuzz_hooks.py")

#: The fuzzed store: "files" keeps the default policy (users only), "open" lets anonymous clients
#: list, read and upload, so that the run without credentials reaches uploads too. Small limits keep
#: every manifest the fuzzer declares within the disk (a 507 would be a 5xx).
STORE_CONFIG = """\
prefixes = ["files", "open"]
max_files = 8
max_file_size = 65536

[policy.open]
list = "anyone"
read = "anyone"
upload = "anyone"
"""

#: Deterministic, bounded, every check that compares an answer with the document, plus no_traceback.
FUZZ_CONFIG = f"""\
workers = 1
request-timeout = 10
suppress-health-check = ["all"]

[generation]
max-examples = {MAX_EXAMPLES}
deterministic = true
database = "none"

[phases.stateful]
enabled = false

# The event streams never end by themselves (test_events.py follows them).
[[operations]]
include-tag = "events"
enabled = false

[checks]
enabled = false
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_headers_conformance.enabled = true
response_schema_conformance.enabled = true
no_traceback.enabled = true
"""


@dataclasses.dataclass
class FuzzStore:
    url: str
    root: Path
    admin_token: str
    #: Real path parameters for the hooks, per run, keyed by the parameters' names.
    targets: dict[str, dict[str, list[dict[str, Any]]]]

    @property
    def log(self) -> Path:
        return self.root / "server.log"


def _call(url: str, method: str, path: str, headers: dict[str, str], body: Any = None) -> tuple[int, Any]:
    """One request (a JSON body unless bytes); (status, the JSON answer or the text)."""
    if body is not None and not isinstance(body, bytes):
        body, headers = json.dumps(body).encode(), {**headers, "Content-Type": "application/json"}
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        text = response.read().decode()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        return response.status, json.loads(text) if is_json else text
    finally:
        connection.close()


def _prepare(url: str, headers: dict[str, str], prefix: str, run: str) -> dict[str, list[dict[str, Any]]]:
    """Transfers and a published file under ``prefix`` for one run: the hooks' targets."""
    content = f"published by the {run} run\n".encode()
    published = {"name": f"{run}.txt", "size": len(content), "md5": hashlib.md5(content).hexdigest()}
    # Files 1-4 declare no digests: any body of their size is accepted.
    files = [published, *({"name": f"{run}-{size}.bin", "size": size} for size in range(4))]
    status, made = _call(url, "POST", f"/{prefix}/manifest", headers, {"files": files})
    assert status == 201, made
    key = made["transfer_key"]
    status, text = _call(url, "PUT", f"/{prefix}/{key}/0", headers, content)
    assert status == 200, text
    # A transfer of its own for the status and cancel operations: a cancelled key takes no upload.
    status, other = _call(url, "POST", f"/{prefix}/manifest", headers, {"files": [{"name": f"{run}-x", "size": 1}]})
    assert status == 201, other
    return {
        "key,num,prefix": [{"prefix": prefix, "key": key, "num": num} for num in range(1, 5)],
        "key": [{"key": other["transfer_key"]}],
        "name,prefix": [{"prefix": prefix, "name": f"{run}.txt"}],
        "prefix": [{"prefix": prefix}],
    }


def _jobs(url: str, headers: dict[str, str], prefix: str, run: str) -> dict[str, list[dict[str, Any]]]:
    """Jobs copying the run's published file within the store: one left uncommitted (for commit,
    priority and clear) and one queued; the hooks' targets for the jobs routes."""
    ids = []
    for number, commit in enumerate((False, True)):
        files = [{"source": f"local:/{prefix}/{run}.txt", "destination": f"local:/{prefix}/{run}-copy-{number}.txt"}]
        status, job = _call(url, "POST", "/_api/v1/jobs", headers, {"files": files, "commit": commit})
        assert status == 201, job
        ids.append(job["id"])
    return {
        "/_api/v1/jobs/{id}": [{"id": id} for id in ids],
        "/_api/v1/jobs/{id}/{step}": [{"id": id, "step": step} for id in ids for step in JOB_STEPS],
    }


def _invitations(url: str, headers: dict[str, str], prefix: str, run: str) -> dict[str, list[dict[str, Any]]]:
    """Two invitations to ``prefix``, pending until the fuzzer answers or revokes them; the hooks'
    targets for the invitation routes."""
    ids = []
    for direction in ("push", "pull"):
        body = {"prefix": prefix, "direction": direction, "names": [f"{run}-invited.bin"], "size": 10}
        status, invitation = _call(url, "POST", "/_api/v1/invitations", headers, body)
        assert status == 201, invitation
        ids.append(invitation["id"])
    return {
        "/_api/v1/invitations/{id}": [{"id": id} for id in ids],
        "/_api/v1/invitations/{id}/{answer}": [
            {"id": id, "answer": answer} for id in ids for answer in INVITATION_ANSWERS
        ],
    }


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStore]:
    """``datastore serve`` on 127.0.0.1, port 0, with transfers and a published file for each run."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "store.toml").write_text(STORE_CONFIG)
    command = [sys.executable, "-m", "datastore", "serve", "--root", str(root / "data"), "--port", "0"]
    with (root / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [*command, "--config", str(root / "store.toml")],
            stdout=subprocess.PIPE,
            stderr=log,
            # The store as configured here, whatever the developer's shell exports.
            env={name: value for name, value in os.environ.items() if not name.startswith("DATASTORE_")},
        )
    assert process.stdout is not None
    try:
        watchdog = threading.Timer(30, process.kill)  # a store that never says where it serves
        watchdog.start()
        try:
            while not (match := SERVING.search(line := process.stdout.readline().decode())):
                assert line, "the store exited before printing its URL"
        finally:
            watchdog.cancel()
        url = match["base"]
        admin_token = (root / "data" / ".datastore" / "admin.token").read_text().strip()
        admin = {"Authorization": f"Bearer {admin_token}"}
        status, spare = _call(url, "POST", "/_api/v1/tokens", admin, {"subject": "spare", "actions": ["read"]})
        assert status == 201, spare
        tokens = {"id": [{"id": spare["id"]}]}
        targets = {
            "admin": {
                **_prepare(url, admin, "files", "admin"),
                **tokens,
                **_jobs(url, admin, "files", "admin"),
                **_invitations(url, admin, "files", "admin"),
            },
            "anonymous": {**_prepare(url, {}, "open", "anonymous"), **tokens},
        }
        yield FuzzStore(url, root, admin_token, targets)
    finally:
        process.stdout.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


#: Invitations: a client has at most `max_invitations_per_client` (20) waiting, so after the first
#: few the asks are 400 however many more the fuzzer sends; fewer examples keep the runs' time.
INVITATIONS_CONFIG = """
[[operations]]
include-tag = "invitations"
generation.max-examples = 15
"""

#: Without credentials every jobs operation, and every invitations operation but asking for one,
#: answers 401: a few examples show it; as many as the others get (and the coverage phase's
#: boundary values) would only make the run longer.
ANONYMOUS_CONFIG = """
[[operations]]
include-tag = "jobs"
generation.max-examples = 5
phases.coverage.enabled = false

[[operations]]
include-operation-id = "invitationAsk"
generation.max-examples = 15

[[operations]]
include-tag = "invitations"
exclude-operation-id = "invitationAsk"
generation.max-examples = 5
phases.coverage.enabled = false
"""


def fuzz(store: FuzzStore, run: str, headers: dict[str, str], extra: str = "") -> None:
    """``schemathesis run`` against the store, bounded in time; fail on any failed check or logged error."""
    targets, config = store.root / f"{run}.targets.json", store.root / f"{run}.schemathesis.toml"
    targets.write_text(json.dumps(store.targets[run]))
    config.write_text(
        FUZZ_CONFIG
        + extra
        + "\n[headers]\n"
        + "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in headers.items())
    )
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color"]
    log_size = store.log.stat().st_size
    started = time.monotonic()
    try:
        result = subprocess.run(
            [*command, "run", f"{store.url}{OPENAPI_PATH}"],
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "FUZZ_TARGETS": str(targets)},
            capture_output=True,
            text=True,
            timeout=RUN_BOUND,
            cwd=store.root,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the {run} run took more than {RUN_BOUND:.0f} s:\n{exc.stdout!r}") from None
    print(f"{run} fuzz run: {time.monotonic() - started:.1f} s\n{result.stdout[-2000:]}")
    assert result.returncode == 0, result.stdout + result.stderr
    with store.log.open("rb") as log:
        log.seek(log_size)
        logged = log.read().decode(errors="replace")
    assert "Traceback" not in logged and " ERROR " not in logged, logged[-6000:]


def test_fuzzing_as_an_administrator_finds_no_error(fuzz_store: FuzzStore) -> None:
    fuzz(fuzz_store, "admin", {"Authorization": f"Bearer {fuzz_store.admin_token}"}, INVITATIONS_CONFIG)


def test_fuzzing_without_credentials_finds_no_error(fuzz_store: FuzzStore) -> None:
    fuzz(fuzz_store, "anonymous", {}, ANONYMOUS_CONFIG)
