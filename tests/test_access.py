"""Who may do what: bearer tokens, the trusted X-Client-DN header, per-prefix policies, owners.

Every test runs the real store on loopback with the settings a deployment
would have (the safe defaults unless the test opens something), and acts as
a careless user or an attacker would: no credentials, a copied DN, a token
that was revoked, a token for another prefix, another user's key.
Certificates are covered beside the TLS tests (tests/test_tls.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import stat
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from datastore.config import SettingsError, load_settings
from datastore.errors import NotAuthorized
from datastore.handlers.directory import DirectoryHandler
from datastore.handlers.interface import FileInfo
from datastore.http.context import CONTEXT
from datastore.security.identity import Identity
from datastore.security.policy import Audience, Policy

from .conftest import MakeStore
from .harness import (
    OPEN_POLICY,
    Store,
    assert_one_line_failure,
    datastore,
    json_manifest,
    md5_hex,
    sha256_hex,
    spawn_serve,
)

ADA, BOB = "/O=Lab/CN=Ada", "/O=Lab/CN=Bob"
DATA = b"the minutes of the meeting\n"


async def safe_store(make_store: MakeStore, **settings: Any) -> Store:
    """A store with the shipped defaults: the safe policy, X-Client-DN not trusted."""
    values: dict[str, Any] = {"policy": Policy(), "trust_client_dn": False, **settings}
    return await make_store(**values)


async def issue(store: Store, subject: str, *actions: str, prefixes: list[str] | None = None) -> str:
    """A token of the running store (as ``datastore tokens create`` issues it)."""
    issued = await store.client.app[CONTEXT].tokens.create(subject, actions, prefixes=prefixes)
    return issued.token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def upload(
    store: Store, name: str, data: bytes, headers: Mapping[str, str], *, prefix: str = "files"
) -> tuple[int, str]:
    """Manifest then PUT with ``headers``; (status of the first failing step or of the PUT, its body)."""
    manifest = await store.client.post(f"/{prefix}/manifest", json=json_manifest([(name, data)]), headers=dict(headers))
    if manifest.status != 201:
        return manifest.status, await manifest.text()
    key = (await manifest.json())["transfer_key"]
    put = await store.client.put(f"/{prefix}/{key}/0", data=data, headers=dict(headers))
    return put.status, await put.text()


async def listing(store: Store, headers: Mapping[str, str]) -> list[dict[str, Any]]:
    response = await store.client.get("/files/", headers={"Accept": "application/json", **headers})
    assert response.status == 200, await response.text()
    files: list[dict[str, Any]] = (await response.json())["files"]
    return files


# -- the defaults: nothing for anonymous clients ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        pytest.param("GET", "/files/", None, id="listing"),
        pytest.param("GET", "/files/minutes.txt", None, id="download"),
        pytest.param("POST", "/files/manifest", json_manifest([("x.txt", DATA)]), id="manifest"),
        pytest.param("DELETE", "/files/minutes.txt", None, id="delete"),
    ],
)
async def test_anonymous_clients_get_401_from_a_store_with_the_default_policy(
    make_store: MakeStore, method: str, path: str, body: Any
) -> None:
    store = await safe_store(make_store)
    token = await issue(store, "ada", "read", "upload")
    assert (await upload(store, "minutes.txt", DATA, bearer(token)))[0] == 200

    response = await store.client.request(method, path, json=body, headers={"Accept": "application/json"})

    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="datastore"'
    assert (await response.json())["error"] == "unauthorized"
    assert store.served_files() == ["minutes.txt"]


async def test_tus_creation_without_credentials_gets_401(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    response = await store.client.post(
        "/files/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "3", "Upload-Metadata": "filename eC50eHQ="}
    )
    assert response.status == 401
    assert store.staged_files() == []


async def test_the_browser_page_needs_no_credentials_but_lists_nothing_without_them(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    assert (await upload(store, "minutes.txt", DATA, bearer(await issue(store, "ada", "upload"))))[0] == 200
    response = await store.client.get("/files/", headers={"Accept": "text/html"})
    # The page and its sign-in, with the status the JSON listing would have, and no file named.
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="datastore"'
    page = await response.text()
    assert '<form id="signin"' in page
    assert "Sign in to see the files." in page
    assert "minutes.txt" not in page


async def test_x_client_dn_is_ignored_unless_the_operator_trusts_it(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    status, _ = await upload(store, "minutes.txt", DATA, {"X-Client-DN": ADA})
    assert status == 401
    # With anonymous uploads opened, the header still makes no owner: the file belongs to nobody.
    opened = await safe_store(make_store, policy=OPEN_POLICY, root=store.root.parent / "r2")
    assert (await upload(opened, "minutes.txt", DATA, {"X-Client-DN": ADA}))[0] == 200
    (entry,) = await listing(opened, {"X-Client-DN": ADA})
    assert (entry["owner"], entry["yours"]) == (None, False)
    who = await (await opened.client.get("/_api/v1/identity", headers={"X-Client-DN": ADA})).json()
    assert who["kind"] == "anonymous"


async def test_a_trusted_x_client_dn_is_an_identity_that_owns_what_it_uploads(make_store: MakeStore) -> None:
    store = await safe_store(make_store, trust_client_dn=True)
    assert (await upload(store, "minutes.txt", DATA, {"X-Client-DN": ADA}))[0] == 200
    (entry,) = await listing(store, {"X-Client-DN": ADA})
    assert (entry["owner"], entry["yours"]) == (ADA, True)
    who = await (await store.client.get("/_api/v1/identity", headers={"X-Client-DN": ADA})).json()
    assert (who["kind"], who["subject"], who["admin"]) == ("asserted", ADA, False)


async def test_an_x_client_dn_longer_than_the_limit_is_refused_with_400(make_store: MakeStore) -> None:
    store = await safe_store(make_store, trust_client_dn=True)
    response = await store.client.post(
        "/files/manifest", json=json_manifest([("x.txt", DATA)]), headers={"X-Client-DN": "/CN=" + "a" * 1100}
    )
    assert response.status == 400
    assert "X-Client-DN is longer than 1024 bytes" in await response.text()


# -- tokens -----------------------------------------------------------------------------------------------------


async def test_a_token_uploads_and_its_subject_owns_the_file(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    token = await issue(store, "ada", "read", "upload")

    assert await upload(store, "minutes.txt", DATA, bearer(token)) == (200, "File transfer OK\n")

    (entry,) = await listing(store, bearer(token))
    assert (entry["name"], entry["owner"], entry["owner_authenticated"], entry["yours"]) == (
        "minutes.txt",
        "ada",
        True,
        True,
    )
    download = await store.client.get("/files/minutes.txt", headers=bearer(token))
    assert (download.status, await download.read()) == (200, DATA)


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Bearer dst_000000000000_" + "A" * 43, id="unknown-token"),
        pytest.param("Bearer not-a-token", id="malformed-token"),
        pytest.param("Bearer ", id="empty-token"),
        pytest.param("Basic YWRhOnNlY3JldA==", id="basic-auth"),
    ],
)
async def test_a_bad_authorization_header_gets_401_invalid_token(make_store: MakeStore, authorization: str) -> None:
    store = await safe_store(make_store, policy=OPEN_POLICY)
    response = await store.client.get("/files/", headers={"Authorization": authorization, "Accept": "application/json"})
    assert response.status == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    # Even where anonymous clients are welcome: a credential that fails is never taken for nobody.
    assert (await response.json())["error"] == "invalid_token"


async def test_a_token_with_the_right_id_and_a_wrong_secret_is_refused(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    token = await issue(store, "ada", "read")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    response = await store.client.get("/files/", headers=bearer(forged))
    assert response.status == 401


async def test_a_revoked_token_is_refused_at_its_next_request(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    tokens = store.client.app[CONTEXT].tokens
    issued = await tokens.create("ada", ["read", "upload"])
    assert (await store.client.get("/files/", headers=bearer(issued.token))).status == 200

    await tokens.revoke(issued.record.id)

    response = await store.client.get("/files/", headers=bearer(issued.token))
    assert response.status == 401


async def test_an_expired_token_is_refused(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    issued = await store.client.app[CONTEXT].tokens.create("ada", ["read"])
    assert (await store.client.get("/files/", headers=bearer(issued.token))).status == 200

    def expire() -> None:
        with sqlite3.connect(store.state_dir / "tokens.sqlite3") as db:
            db.execute("UPDATE tokens SET expires_at = 0 WHERE id = ?", (issued.record.id,))

    await asyncio.to_thread(expire)
    assert (await store.client.get("/files/", headers=bearer(issued.token))).status == 401


@pytest.mark.parametrize(
    ("actions", "prefixes", "method", "path", "expected"),
    [
        pytest.param(("read",), None, "POST", "/files/manifest", 403, id="read-token-cannot-upload"),
        pytest.param(("upload",), None, "GET", "/files/", 403, id="upload-token-cannot-list"),
        pytest.param(("read", "upload"), ["other"], "GET", "/files/", 403, id="token-for-another-prefix"),
        pytest.param(("read", "upload"), ["files"], "GET", "/files/", 200, id="token-for-this-prefix"),
        pytest.param(("read", "upload"), None, "GET", "/_api/v1/tokens", 403, id="user-token-cannot-manage-tokens"),
    ],
)
async def test_a_token_allows_only_what_it_was_issued_for(
    make_store: MakeStore,
    actions: tuple[str, ...],
    prefixes: list[str] | None,
    method: str,
    path: str,
    expected: int,
) -> None:
    store = await safe_store(make_store)
    token = await issue(store, "ada", *actions, prefixes=prefixes)
    body = json_manifest([("x.txt", DATA)]) if method == "POST" else None
    response = await store.client.request(method, path, json=body, headers=bearer(token))
    assert response.status == expected, await response.text()


async def test_the_admin_api_issues_lists_and_revokes_tokens(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    admin = bearer(await issue(store, "root", "admin"))

    created = await store.client.post(
        "/_api/v1/tokens",
        json={"subject": "ada", "actions": ["read", "upload"], "prefixes": ["files"], "expires_in": 3600},
        headers=admin,
    )
    assert created.status == 201
    new = await created.json()
    assert (new["subject"], new["actions"], new["prefixes"], new["state"]) == (
        "ada",
        ["read", "upload"],
        ["files"],
        "active",
    )
    assert (await upload(store, "minutes.txt", DATA, bearer(new["token"])))[0] == 200

    listed = await (await store.client.get("/_api/v1/tokens", headers=admin)).json()
    assert new["id"] in {t["id"] for t in listed["tokens"]}
    assert all("token" not in t and "hash" not in t for t in listed["tokens"])

    revoked = await store.client.delete(f"/_api/v1/tokens/{new['id']}", headers=admin)
    assert (revoked.status, (await revoked.json())["state"]) == (200, "revoked")
    assert (await store.client.get("/files/", headers=bearer(new["token"]))).status == 401


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({"subject": "ada", "actions": ["fly"]}, "unknown action 'fly'", id="unknown-action"),
        pytest.param({"subject": "", "actions": ["read"]}, "subject", id="empty-subject"),
        pytest.param({"subject": "ada\x1b[31m", "actions": ["read"]}, "printable", id="control-characters"),
        pytest.param({"subject": "ada", "prefixes": ["../etc"]}, "invalid prefix", id="bad-prefix"),
        pytest.param({"subject": "ada", "expires_in": -1}, "lifetime", id="negative-lifetime"),
        pytest.param({"subject": "ada", "expires_in": 1e12}, "lifetime", id="endless-lifetime"),
        pytest.param({"subject": "ada", "expires_in": 10**400}, "lifetime", id="lifetime-beyond-any-float"),
        pytest.param({"subject": "ada", "admin": True}, "unknown field 'admin'", id="unknown-field"),
    ],
)
async def test_the_admin_api_refuses_a_bad_token_request_with_400(
    make_store: MakeStore, body: dict[str, Any], message: str
) -> None:
    store = await safe_store(make_store)
    admin = bearer(await issue(store, "root", "admin"))
    response = await store.client.post("/_api/v1/tokens", json=body, headers=admin)
    assert response.status == 400
    assert message in (await response.json())["message"]


async def test_token_management_needs_an_administrator(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    user = bearer(await issue(store, "ada", "read", "upload", "delete"))
    assert (await store.client.get("/_api/v1/tokens")).status == 401
    assert (await store.client.get("/_api/v1/tokens", headers=user)).status == 403
    assert (await store.client.post("/_api/v1/tokens", json={"subject": "ada"}, headers=user)).status == 403


async def test_whoami_describes_a_token_without_its_secret(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    token = await issue(store, "ada", "read", prefixes=["files"])
    who = await (await store.client.get("/_api/v1/identity", headers=bearer(token))).json()
    assert (who["kind"], who["subject"], who["admin"], who["token"]["actions"], who["token"]["prefixes"]) == (
        "token",
        "ada",
        False,
        ["read"],
        ["files"],
    )
    assert token.split("_", 2)[2] not in json.dumps(who)


# -- owners: delete, overwrite, transfers, listings -------------------------------------------------------------


async def test_only_the_owner_or_an_administrator_deletes_a_file(make_store: MakeStore) -> None:
    store = await safe_store(make_store, trust_client_dn=True)
    ada = bearer(await issue(store, "ada", "read", "upload", "delete"))
    bob = bearer(await issue(store, "bob", "read", "upload", "delete"))
    root = bearer(await issue(store, "root", "admin"))
    assert (await upload(store, "a.txt", DATA, ada))[0] == 200
    assert (await upload(store, "b.txt", DATA, ada))[0] == 200

    assert (await store.client.delete("/files/a.txt", headers=bob)).status == 403
    # A header naming the owner's subject is another kind of identity: not the owner.
    assert (await store.client.delete("/files/a.txt", headers={"X-Client-DN": "ada"})).status == 403
    assert store.served_files() == ["a.txt", "b.txt"]

    assert (await store.client.delete("/files/a.txt", headers=ada)).status == 204
    assert (await store.client.delete("/files/b.txt", headers=root)).status == 204
    assert store.served_files() == []


async def test_a_token_without_the_delete_action_cannot_delete_even_its_own_file(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    ada = bearer(await issue(store, "ada", "read", "upload"))
    assert (await upload(store, "a.txt", DATA, ada))[0] == 200
    assert (await store.client.delete("/files/a.txt", headers=ada)).status == 403
    assert store.served_files() == ["a.txt"]


async def test_an_anonymous_upload_belongs_to_nobody_and_only_an_administrator_deletes_it(
    make_store: MakeStore,
) -> None:
    store = await safe_store(make_store, policy=replace(OPEN_POLICY, delete=Audience.OWNER))
    assert (await upload(store, "drop.txt", DATA, {}))[0] == 200
    ada = bearer(await issue(store, "ada", "read", "upload", "delete"))

    assert (await store.client.delete("/files/drop.txt")).status == 401
    assert (await store.client.delete("/files/drop.txt", headers=ada)).status == 403
    assert store.served_files() == ["drop.txt"]
    root = bearer(await issue(store, "root", "admin"))
    assert (await store.client.delete("/files/drop.txt", headers=root)).status == 204


async def test_deletion_limited_to_administrators_refuses_even_the_owner(make_store: MakeStore) -> None:
    store = await safe_store(make_store, policy=Policy(delete=Audience.ADMINS))
    ada = bearer(await issue(store, "ada", "read", "upload", "delete"))
    assert (await upload(store, "a.txt", DATA, ada))[0] == 200
    assert (await store.client.delete("/files/a.txt", headers=ada)).status == 403
    assert store.served_files() == ["a.txt"]


async def test_only_the_owner_may_overwrite_a_file(make_store: MakeStore, tmp_path: Path) -> None:
    handler = DirectoryHandler(tmp_path / "root" / "files", catalogue=tmp_path / "cat.sqlite3", overwrite=True)
    store = await safe_store(make_store, handler=handler)
    ada = bearer(await issue(store, "ada", "read", "upload"))
    bob = bearer(await issue(store, "bob", "read", "upload"))
    assert (await upload(store, "report.txt", b"Ada's report\n", ada))[0] == 200

    refused = await store.client.post(
        "/files/manifest", json=json_manifest([("report.txt", b"Bob's version\n")]), headers=bob
    )
    assert refused.status == 403
    assert (await upload(store, "report.txt", b"Ada's second draft\n", ada))[0] == 200
    served = await store.client.get("/files/report.txt", headers=bob)
    assert await served.read() == b"Ada's second draft\n"


async def test_a_file_replaced_while_its_owner_deletes_it_is_judged_again(tmp_path: Path) -> None:
    handler = DirectoryHandler(tmp_path / "root" / "files", catalogue=tmp_path / "cat.sqlite3", overwrite=True)
    ada, root = Identity.asserted(ADA), replace(Identity.asserted("/CN=root"), admin=True)

    async def publish(identity: Identity, data: bytes) -> None:
        info = FileInfo("report.txt", len(data), md5_hex(data), sha256_hex(data))
        assert await handler.reserve_many(identity, [info]) == []
        await handler.complete_upload(identity, info)

    await publish(ada, b"Ada's report\n")
    describe = handler.catalogue.describe

    async def replaced_after_the_first_read(name):  # type: ignore[no-untyped-def]
        found = await describe(name)
        if handler.catalogue.describe is replaced_after_the_first_read:
            handler.catalogue.describe = describe  # type: ignore[method-assign]
            await publish(root, b"the administrator's version\n")
        return found

    handler.catalogue.describe = replaced_after_the_first_read  # type: ignore[method-assign]
    try:
        # Ada's deletion was judged on her record; the administrator's, published meanwhile, is not hers.
        with pytest.raises(NotAuthorized):
            await handler.delete_file(ada, "report.txt")
        stored = await handler.describe_file(ada, "report.txt")
        assert stored is not None and stored.owner_id == root.principal
    finally:
        await handler.close()


async def test_another_identity_can_neither_read_nor_cancel_nor_use_a_transfer(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    ada = bearer(await issue(store, "ada", "read", "upload"))
    bob = bearer(await issue(store, "bob", "read", "upload"))
    manifest = await store.client.post("/files/manifest", json=json_manifest([("a.txt", DATA)]), headers=ada)
    key = (await manifest.json())["transfer_key"]

    assert (await store.client.get(f"/_api/v1/transfers/{key}", headers=bob)).status == 403
    assert (await store.client.delete(f"/_api/v1/transfers/{key}", headers=bob)).status == 403
    assert (await store.client.put(f"/files/{key}/0", data=DATA, headers=bob)).status == 403
    status = await (await store.client.get(f"/_api/v1/transfers/{key}", headers=ada)).json()
    assert status["state"] == "PENDING"


async def test_an_administrator_reads_and_cancels_another_identitys_transfer(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    ada = bearer(await issue(store, "ada", "read", "upload"))
    root = bearer(await issue(store, "root", "admin"))
    manifest = await store.client.post("/files/manifest", json=json_manifest([("a.txt", DATA)]), headers=ada)
    key = (await manifest.json())["transfer_key"]

    assert (await (await store.client.get(f"/_api/v1/transfers/{key}", headers=root)).json())["owner"] == "ada"
    cancelled = await store.client.delete(f"/_api/v1/transfers/{key}", headers=root)
    assert (await cancelled.json())["state"] == "CANCELLED"
    assert (await store.client.put(f"/files/{key}/0", data=DATA, headers=ada)).status == 410


async def test_listings_show_owners_only_to_themselves_and_administrators(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    ada = bearer(await issue(store, "ada", "read", "upload"))
    bob = bearer(await issue(store, "bob", "read"))
    root = bearer(await issue(store, "root", "admin"))
    assert (await upload(store, "a.txt", DATA, ada))[0] == 200

    assert [(f["owner"], f["yours"]) for f in await listing(store, ada)] == [("ada", True)]
    assert [(f["owner"], f["yours"]) for f in await listing(store, bob)] == [(None, False)]
    assert [(f["owner"], f["yours"]) for f in await listing(store, root)] == [("ada", False)]


async def test_a_prefix_that_shows_owners_shows_them_to_every_reader(make_store: MakeStore) -> None:
    store = await safe_store(make_store, policy=Policy(show_owners=True))
    ada = bearer(await issue(store, "ada", "read", "upload"))
    bob = bearer(await issue(store, "bob", "read"))
    assert (await upload(store, "a.txt", DATA, ada))[0] == 200
    assert [(f["owner"], f["yours"]) for f in await listing(store, bob)] == [("ada", False)]


async def test_a_prefix_open_for_reading_serves_anonymous_clients_but_takes_uploads_only_from_users(
    make_store: MakeStore,
) -> None:
    store = await safe_store(make_store, policy=Policy(read=Audience.ANYONE, list=Audience.ANYONE))
    ada = bearer(await issue(store, "ada", "read", "upload"))
    assert (await upload(store, "a.txt", DATA, ada))[0] == 200

    assert [f["name"] for f in await listing(store, {})] == ["a.txt"]
    assert await (await store.client.get("/files/a.txt")).read() == DATA
    assert (await upload(store, "b.txt", DATA, {}))[0] == 401


class PrivateNamesHandler(DirectoryHandler):
    """An application's own rule on top of the policy: names starting with ``private-`` are the owner's."""

    async def authorize(self, identity: Identity, action: str, name: str | None) -> bool:
        if action != "read" or name is None or not name.startswith("private-"):
            return True
        stored = await self.describe_file(identity, name)
        return stored is not None and identity.owns(stored.owner_id)


async def test_a_handler_may_refuse_what_the_policy_allows(make_store: MakeStore, tmp_path: Path) -> None:
    handler = PrivateNamesHandler(tmp_path / "root" / "files", catalogue=tmp_path / "cat.sqlite3")
    store = await safe_store(make_store, handler=handler)
    ada = bearer(await issue(store, "ada", "read", "upload"))
    bob = bearer(await issue(store, "bob", "read"))
    assert (await upload(store, "private-diary.txt", DATA, ada))[0] == 200
    assert (await upload(store, "public.txt", DATA, ada))[0] == 200

    assert (await store.client.get("/files/private-diary.txt", headers=bob)).status == 403
    assert (await store.client.get("/files/public.txt", headers=bob)).status == 200
    assert (await store.client.get("/files/private-diary.txt", headers=ada)).status == 200


async def test_a_per_prefix_policy_opens_only_what_it_names(make_store: MakeStore) -> None:
    store = await safe_store(make_store, prefix_policies=(("files", Policy(upload=Audience.ANYONE)),))
    assert (await upload(store, "anonymous.txt", DATA, {}))[0] == 200
    # Listing and reading keep the default: users only.
    assert (await store.client.get("/files/", headers={"Accept": "application/json"})).status == 401
    assert (await store.client.get("/files/anonymous.txt")).status == 401
    stored = await store.handler.describe_file(Identity.from_principal(None), "anonymous.txt")
    assert stored is not None and stored.owner_id is None


# -- settings ---------------------------------------------------------------------------------------------------


def test_policies_come_from_the_config_file_the_environment_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "datastore.toml"
    config.write_text(
        '[policy]\nlist = "anyone"\nshow_owners = true\n\n[policy.drop]\nupload = "anyone"\ndelete = "admins"\n'
    )
    settings = load_settings({"policy": ["read=anyone"]}, {"DATASTORE_POLICY": "upload=admins"}, config_file=config)
    assert settings.policy_for("files") == Policy(
        list=Audience.ANYONE, read=Audience.ANYONE, upload=Audience.ADMINS, show_owners=True
    )
    assert settings.policy_for("drop") == Policy(
        list=Audience.ANYONE, upload=Audience.ANYONE, delete=Audience.ADMINS, show_owners=True
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        pytest.param('[policy]\nread = "everybody"\n', "policy.read: 'everybody' is not one of", id="bad-audience"),
        pytest.param('[policy]\nwrite = "anyone"\n', "unknown key 'write'", id="unknown-action"),
        pytest.param('[policy]\nread = "owner"\n', "'owner' applies to delete only", id="owner-for-read"),
        pytest.param('[policy]\ndelete = "anyone"\n', "delete: use owner", id="anyone-deletes"),
        pytest.param('[policy."../x"]\nread = "anyone"\n', "invalid prefix", id="bad-prefix"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_setting(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "datastore.toml"
    config.write_text(toml)
    with pytest.raises(SettingsError) as raised:
        load_settings({}, {}, config_file=config)
    assert message in str(raised.value)


# -- datastore serve and datastore tokens, as an operator runs them ---------------------------------------------


async def test_the_first_start_leaves_an_administrator_token_in_a_private_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    process, (match,) = await spawn_serve("--root", str(root), open_store=False, stderr=asyncio.subprocess.PIPE)
    token_file = root / ".datastore" / "admin.token"
    try:
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{match['base']}/_api/v1/identity", headers=bearer(token)) as response:
                who = await response.json()
            assert (who["kind"], who["admin"]) == ("token", True)
            async with http.get(f"{match['base']}/files/", headers={"Accept": "application/json"}) as response:
                assert response.status == 401
    finally:
        process.terminate()
        _, err = await process.communicate()
    assert token not in err.decode()
    # A second start keeps the token: it is issued only while the store has none.
    process, _ = await spawn_serve("--root", str(root), open_store=False)
    process.terminate()
    await process.wait()
    assert token_file.read_text().strip() == token


async def test_the_tokens_command_issues_lists_and_revokes_while_the_store_runs(tmp_path: Path) -> None:
    root = tmp_path / "data"
    process, (match,) = await spawn_serve("--root", str(root), open_store=False)
    try:
        created = await datastore("tokens", "--root", str(root), "create", "ada", "--actions", "read,upload")
        assert created.returncode == 0, created
        token = created.stdout.strip()
        listed = (await datastore("tokens", "--root", str(root), "ls", "--json")).stdout
        ada = next(t for t in json.loads(listed) if t["subject"] == "ada")
        assert (ada["actions"], ada["state"]) == (["read", "upload"], "active")
        assert token.split("_", 2)[2] not in listed

        async with aiohttp.ClientSession() as http:
            data = b"hello"
            manifest = {"files": [{"name": "hello.txt", "size": 5, "sha256": sha256_hex(data)}]}
            async with http.post(f"{match['base']}/files/manifest", json=manifest, headers=bearer(token)) as r:
                assert r.status == 201
            revoked = await datastore("tokens", "--root", str(root), "revoke", ada["id"])
            assert (revoked.returncode, revoked.stdout.strip()) == (0, f"revoked {ada['id']} (ada)"), revoked
            async with http.get(f"{match['base']}/files/", headers=bearer(token)) as r:
                assert r.status == 401
    finally:
        process.terminate()
        await process.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["create", "ada", "--actions", "fly"], "unknown action 'fly'", id="unknown-action"),
        pytest.param(["create", "ada", "--expires", "soon"], "is not a duration", id="bad-duration"),
        pytest.param(["create", "ada", "--prefix", "../x"], "invalid prefix", id="bad-prefix"),
    ],
)
async def test_the_tokens_command_refuses_bad_requests_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    ran = await datastore("tokens", "--root", str(tmp_path), *args)
    assert_one_line_failure(ran, 2, re.compile(f"datastore tokens: .*{re.escape(message)}.*"))


# -- browsers: the session cookie and requests from other sites ---------------------------------------------------


async def test_a_session_cookie_carries_the_token_for_links_and_ends_with_it(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    tokens = store.client.app[CONTEXT].tokens
    issued = await tokens.create("ada", ["read", "upload"])
    assert (await upload(store, "a.txt", DATA, bearer(issued.token)))[0] == 200
    assert (await store.client.post("/_api/v1/session")).status == 401

    signed_in = await store.client.post("/_api/v1/session", headers=bearer(issued.token))
    assert signed_in.status == 200
    cookie = signed_in.cookies["datastore_token"]
    assert (cookie["httponly"], cookie["samesite"], cookie["max-age"]) == (True, "Strict", "")
    # The client's cookie jar now authorises a plain GET, as a link in the page would.
    assert (await store.client.get("/files/a.txt")).status == 200

    await tokens.revoke(issued.record.id)
    assert (await store.client.get("/files/a.txt")).status == 401
    signed_out = await store.client.delete("/_api/v1/session")
    assert signed_out.status == 204
    assert (await store.client.get("/files/a.txt")).status == 401
    assert "datastore_token" not in {c.key for c in store.client.session.cookie_jar}


INI = b"[manifest]\nnum_files = 1\n\n[0]\nname = x.txt\nsize = 3\n"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({}, 200, id="a-legacy-client-sends-neither"),
        pytest.param({"Sec-Fetch-Site": "same-origin"}, 200, id="the-page-itself"),
        pytest.param({"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}, 403, id="cross-site-form"),
        pytest.param({"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"}, 403, id="same-site-other-port"),
        pytest.param({"Origin": "http://evil.example"}, 403, id="an-older-browser-sends-only-origin"),
        pytest.param({"Origin": "null"}, 403, id="a-sandboxed-page"),
    ],
)
async def test_a_browser_cannot_post_a_manifest_for_another_site(
    make_store: MakeStore, headers: dict[str, str], expected: int
) -> None:
    store = await make_store()  # open to anyone: a cross-site page must still not use a visitor's browser
    response = await store.client.post("/files/manifest", data=INI, headers={"Content-Type": "text/plain", **headers})
    assert response.status == expected, await response.text()
    if expected == 403:
        assert (await response.text()).startswith("Cross-site request refused")


async def test_the_pages_own_origin_may_post_without_sec_fetch_site(make_store: MakeStore) -> None:
    store = await make_store()
    origin = str(store.client.make_url("/")).rstrip("/")
    response = await store.client.post(
        "/files/manifest", data=INI, headers={"Content-Type": "text/plain", "Origin": origin}
    )
    assert response.status == 200


async def test_a_cross_site_delete_is_refused_even_with_a_valid_session(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    token = await issue(store, "ada", "read", "upload", "delete")
    assert (await upload(store, "a.txt", DATA, bearer(token)))[0] == 200
    await store.client.post("/_api/v1/session", headers=bearer(token))

    response = await store.client.delete("/files/a.txt", headers={"Sec-Fetch-Site": "cross-site"})

    assert response.status == 403
    assert store.served_files() == ["a.txt"]


# -- what a second look found -----------------------------------------------------------------------------------


async def test_an_admin_token_cannot_be_limited_to_prefixes(make_store: MakeStore) -> None:
    store = await safe_store(make_store)
    admin = bearer(await issue(store, "root", "admin"))
    response = await store.client.post(
        "/_api/v1/tokens", json={"subject": "bob", "actions": ["admin"], "prefixes": ["dropbox"]}, headers=admin
    )
    assert response.status == 400
    assert "an admin token is for every prefix" in (await response.json())["message"]


async def test_a_browser_never_gets_an_identity_from_x_client_dn(make_store: MakeStore) -> None:
    # A page of any site that DNS rebinds to a trusted store could otherwise write any DN.
    store = await safe_store(make_store, trust_client_dn=True)
    from_page = {"X-Client-DN": ADA, "Sec-Fetch-Site": "same-origin"}
    assert (await upload(store, "a.txt", DATA, from_page))[0] == 401
    who = await (await store.client.get("/_api/v1/identity", headers={"X-Client-DN": ADA, "Origin": "x"})).json()
    assert who["kind"] == "anonymous"
    assert (await upload(store, "a.txt", DATA, {"X-Client-DN": ADA}))[0] == 200


async def test_with_overwrite_a_file_the_catalogue_does_not_know_is_replaced_only_by_an_administrator(
    make_store: MakeStore, tmp_path: Path
) -> None:
    folder = tmp_path / "root" / "files"
    folder.mkdir(parents=True)
    (folder / "operator.cfg").write_bytes(b"put here by the operator\n")
    handler = DirectoryHandler(folder, catalogue=tmp_path / "cat.sqlite3", overwrite=True)
    store = await safe_store(make_store, handler=handler)
    ada = bearer(await issue(store, "ada", "read", "upload"))

    refused = await store.client.post("/files/manifest", json=json_manifest([("operator.cfg", b"EVIL!")]), headers=ada)

    assert refused.status == 403
    assert (folder / "operator.cfg").read_bytes() == b"put here by the operator\n"
    root = bearer(await issue(store, "root", "admin"))
    assert (await upload(store, "operator.cfg", b"new settings\n", root))[0] == 200


def test_transfers_and_files_of_old_certificate_owners_belong_to_nobody_after_the_migration(tmp_path: Path) -> None:
    """Before principals, a certificate's owner was stored in a form no certificate has now."""
    from datastore.state.sqlite import _migrate as migrate_transfers

    with sqlite3.connect(tmp_path / "old.sqlite3") as db:
        db.row_factory = sqlite3.Row
        db.execute(
            "CREATE TABLE transfers (key TEXT PRIMARY KEY, prefix TEXT, owner TEXT, owner_authenticated INTEGER,"
            " state TEXT, created_at REAL, updated_at REAL, expires_at REAL)"
        )
        db.execute("CREATE TABLE transfer_files (key TEXT, num INTEGER, name TEXT)")
        db.executemany(
            "INSERT INTO transfers VALUES (?, 'files', ?, ?, 'OPEN', 0, 0, 9e9)",
            [("a" * 40, "/O=Lab/CN=ada", 1), ("b" * 40, "/O=Lab/CN=bob", 0), ("c" * 40, None, 0)],
        )
        migrate_transfers(db)
        owners = {
            row["key"][0]: Identity.from_principal(row["owner_id"], row["owner"])
            for row in db.execute("SELECT * FROM transfers")
        }
    assert owners["a"] != Identity.from_principal(None) and owners["a"].issuer == ""
    assert owners["b"] == Identity.asserted("/O=Lab/CN=bob")
    assert owners["c"].anonymous
