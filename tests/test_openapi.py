"""The OpenAPI document: served without credentials, valid OpenAPI 3.1, describing every route."""

from __future__ import annotations

from openapi_spec_validator import validate

from datastore.openapi import OPENAPI_PATH
from datastore.security.policy import Policy

from .conftest import MakeStore

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
