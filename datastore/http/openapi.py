"""The OpenAPI 3.1 document of the store's HTTP interface, served at ``GET /_api/v1/openapi.json``.

This module owns the document: every route of ``server.py`` (legacy INI and
JSON manifests, whole-body and form uploads, tus, downloads, the listing,
the control plane, the token API, invitations and the transfer jobs API), its parameters,
request bodies, security schemes, and for each operation the status codes it
really answers with their content types, headers and schemas.

It is built in code rather than shipped as a JSON file so that it takes its
numbers from the same places the server does (the prefix pattern, the
error codes of :mod:`datastore.errors`, tus's version, extensions and
checksum algorithms, token actions and lifetimes, the job and file states,
the jobs API's steps and limits, the invitations' limits, the running
store's manifest limits and prefixes) and cannot drift from them; ``servers`` names the URL the client
reached the store under. The tests validate it with
``openapi-spec-validator`` and fuzz the running store from it with
Schemathesis.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..config import PREFIX_PATTERN, Settings
from ..errors import DatastoreError
from ..jobs.states import (
    CLEARABLE_JOB_STATES,
    REPRIORITIZABLE_JOB_STATES,
    FailureReason,
    FileJobState,
    JobState,
    VerifyChecksum,
    job_sources,
)
from ..lifecycle.states import EventType
from ..security.identity import DN_HEADER, MAX_IDENTITY_BYTES, IdentityKind
from ..security.tokens import ACTIONS, DEFAULT_LIFETIME, MAX_LIFETIME
from .api import MAX_TOKEN_REQUEST
from .context import CONTEXT
from .jobs import JOB_STEPS as JOB_STEPS
from .jobs import LAST_DEADLINE, MAX_JOB_REQUEST, MAX_SIZE, MAX_URL
from .metrics_page import METRICS_PATH
from .tus import CHECKSUM_ALGORITHMS, EXTENSIONS, MAX_METADATA_BYTES, OFFSET_CONTENT_TYPE, TUS_VERSION
from .vouchers import MAX_INVITATION_NAMES, MAX_INVITATION_REQUEST

#: Where the document is served.
OPENAPI_PATH = "/_api/v1/openapi.json"

JSON = "application/json"
TEXT = "text/plain"
BINARY = "application/octet-stream"

Object = dict[str, Any]


async def handle_openapi(request: web.Request) -> web.Response:
    """``GET /_api/v1/openapi.json``: the document, with ``servers`` naming the URL the client used."""
    ctx = request.app[CONTEXT]
    document = build_document(ctx.settings, sorted(ctx.mounts))
    document["servers"] = [{"url": str(request.url.origin()), "description": "the listener that answered"}]
    return web.json_response(document, headers={"Cache-Control": "no-cache"})


def build_document(settings: Settings, prefixes: list[str]) -> Object:
    """The whole document for a store with ``settings`` serving ``prefixes`` (``servers`` left empty)."""
    from .. import __version__  # the package's own module is complete by the time a request comes

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "datastore",
            "version": __version__,
            "summary": "An HTTP file store in the line of the AccessGrid TransferServer.",
            "description": _DESCRIPTION,
            "license": {"name": "BSD-3-Clause", "identifier": "BSD-3-Clause"},
        },
        "servers": [],
        "tags": [
            {
                "name": "transfers",
                "description": "Manifests and whole-body uploads (the AccessGrid protocol and JSON).",
            },
            {"name": "tus", "description": f"tus {TUS_VERSION} resumable uploads on the same upload URLs."},
            {"name": "files", "description": "Downloads, the listing and deletion."},
            {"name": "control", "description": "The control plane under /_api/v1/."},
            {"name": "tokens", "description": "Bearer tokens (administrators)."},
            {
                "name": "invitations",
                "description": "Invitations: another store asks for a voucher (a token scoped to a prefix, push or "
                "pull, the names and a byte budget) that works once someone who may upload to the prefix accepts it.",
            },
            {
                "name": "jobs",
                "description": "Transfer jobs: copies the store runs between its own prefixes (`local:/PREFIX/NAME`), "
                "http(s) stores the operator allows (`job_hosts`) and rclone remotes, for their owner.",
            },
            {"name": "events", "description": "The store's events, live, as Server-Sent Events."},
            {"name": "browser", "description": "The browser page and its assets."},
        ],
        "security": _ANY_IDENTITY,
        "paths": _paths(),
        "components": {
            "schemas": _schemas(settings),
            "parameters": _parameters(prefixes),
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }


_DESCRIPTION = f"""\
Applications register URL *prefixes*; a client posts a manifest (name, size and digests of each file) to
`/{{prefix}}/manifest`, receives a transfer key, uploads file *num* to `/{{prefix}}/{{key}}/{{num}}` (whole,
raw or as a form, or piece by piece with tus), and downloads it by name from `/{{prefix}}/{{name}}`. Every
upload is checked against the manifest's size and digests before it is published. Paths starting with `_`
belong to the server.

**Errors.** An error's message is the status line's reason phrase and the body: a one-line `text/plain`
body, or `{{"error", "message", "field"?}}` as `application/json` when the request's `Content-Type` is
JSON or its `Accept` names JSON. `error` is a stable machine-readable code. A path of no known shape is
`404 File not found`; a method a path does not take is `405` with `Allow`; a request that cannot be parsed as
HTTP is `400 Bad Request` before any route.

**Identity.** On the plain listener a request is identified by `Authorization: Bearer TOKEN` (a token this
store issued) or the browser page's session cookie, else by an `{DN_HEADER}` header if (and only if) the
operator trusts it, else it is anonymous. On the TLS listener the verified client certificate is the
identity and both headers are ignored. Each prefix's policy says who may list, read, upload and delete;
anonymous clients get 401 where the policy wants an identity, others 403.

**Browsers.** A `POST`, `PUT`, `PATCH` or `DELETE` that a browser sends for another site (`Sec-Fetch-Site`
other than `same-origin`/`none`, else an `Origin` other than the store's) is refused with 403.

**HEAD.** Every `GET` also answers `HEAD`, with the same status and headers and no body.

**Method override (tus).** A request with `Tus-Resumable` and `X-HTTP-Method-Override` is handled as the
method that header names (`POST`, `HEAD`, `PATCH`, `DELETE` or `OPTIONS`) on the same path, with that
operation's answers; naming any other method is 400.
"""

# -- security -----------------------------------------------------------------------------------

_SECURITY_SCHEMES: Object = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "dst_<12 hex digits>_<43 base64url characters>",
        "description": "A token this store issued (`datastore tokens create`, or `POST /_api/v1/tokens`); "
        "401 if it is unknown, expired or revoked. Plain-HTTP listener only.",
    },
    "sessionCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "datastore_token",
        "description": "The browser page's session: the same token, set by `POST /_api/v1/session`.",
    },
    "clientDN": {
        "type": "apiKey",
        "in": "header",
        "name": DN_HEADER,
        "description": f"An asserted identity (AccessGrid 2.x clients), proved by nothing: honoured only "
        f"on the plain listener of a store started with `--trust-client-dn`, and ignored otherwise. At most "
        f"{MAX_IDENTITY_BYTES} bytes (400 beyond); the literal `None` is anonymous.",
    },
    "mutualTLS": {
        "type": "mutualTLS",
        "description": "The TLS listener requires a client certificate signed by the configured CA; the "
        "verified subject is the identity, checked against the CRL and its validity on every request (403 "
        "and the connection closed once it is revoked or expired). `Authorization` and the client-DN "
        "header are ignored there.",
    },
}

#: Who may call an operation whose access the prefix's policy decides (anonymous clients included).
_ANY_IDENTITY: list[Object] = [{}, {"bearerAuth": []}, {"sessionCookie": []}, {"clientDN": []}, {"mutualTLS": []}]
#: Administrators: a token with the admin action, or a certificate the operator named.
_ADMIN: list[Object] = [{"bearerAuth": []}, {"sessionCookie": []}, {"mutualTLS": []}]
_NONE: list[Object] = []

# -- reasons, shared by many operations ----------------------------------------------------------

BAD_DN = f"an `{DN_HEADER}` longer than {MAX_IDENTITY_BYTES} bytes, where the store trusts that header"
BAD_CREDENTIAL = (
    "the bearer token (or the session cookie's) is unknown, expired or revoked, "
    "or `Authorization` is not `Bearer TOKEN`"
)
SIGN_IN = "an anonymous client, where the prefix's policy wants an identity"
CERTIFICATE = "TLS: the client certificate was revoked or expired since the handshake (the connection is closed)"
CROSS_SITE = "a browser sent this state-changing request for another site"
POLICY = "the prefix's policy, the token's grant or the handler does not allow it"
NO_PREFIX = "no such prefix (`Path not found`)"
SLOW = (
    "the client sent no byte of the body for `body_timeout` seconds, or sent it slower than `min_upload_rate` over "
    "`rate_window`"
)
QUOTA = (
    "the client's open transfers would hold more than its share (`max_transfers_per_client`, "
    "`max_reserved_names_per_client`, `max_reserved_bytes_per_client`)"
)

EXHAUSTED = (
    "a voucher's byte budget is used up (`voucher_exhausted`, with `WWW-Authenticate`; bytes that arrived before "
    "are kept): its issuer may extend it"
)
VOUCHER_NAMES = "a voucher that does not name the file"

_IDENTIFIED = {400: [BAD_DN], 401: [BAD_CREDENTIAL], 403: [CERTIFICATE]}
_ON_A_PREFIX = {400: [BAD_DN], 401: [SIGN_IN, BAD_CREDENTIAL], 403: [POLICY, CERTIFICATE], 404: [NO_PREFIX]}


def _merge(*groups: dict[int, list[str]]) -> dict[int, list[str]]:
    merged: dict[int, list[str]] = {}
    for group in groups:
        for status, reasons in group.items():
            known = merged.setdefault(status, [])
            known.extend(reason for reason in reasons if reason not in known)
    return merged


def _sentence(reasons: list[str]) -> str:
    text = "; ".join(reasons)
    return text[:1].upper() + text[1:]


def _ref(kind: str, name: str) -> Object:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> Object:
    return _ref("schemas", name)


def _header(description: str, schema: Object | None = None, *, required: bool = True) -> Object:
    return {"description": description, "required": required, "schema": schema or {"type": "string"}}


_WWW_AUTHENTICATE = _header('`Bearer realm="datastore"`, with `error="invalid_token"` for a bad token')
_ALLOW = _header("the methods the path takes")
_RETRY_AFTER = _header("seconds to wait", {"type": "string", "pattern": "^[0-9]+$"})
_INSUFFICIENT_SCOPE = _header(
    '`voucher_exhausted` only: `Bearer realm="datastore", error="insufficient_scope", '
    'error_description="voucher_exhausted"`',
    required=False,
)
_TUS_RESUMABLE_OUT = _header("the protocol version", {"const": TUS_VERSION})
_UPLOAD_EXPIRES = _header("when the transfer key expires (RFC 9110 date)")
_OFFSET_OUT = _header("bytes of the file the store holds", {"type": "string", "pattern": "^[0-9]+$"})
_NO_STORE = _header("`no-store`")


def _errors(reasons: dict[int, list[str]], *, body: bool = True) -> dict[str, Object]:
    """Error responses: a one-line text body, or the JSON error object; none for HEAD."""
    responses: dict[str, Object] = {}
    for status in sorted(reasons):
        response: Object = {"description": _sentence(reasons[status])}
        if body:
            response["content"] = {JSON: {"schema": _schema("Error")}, TEXT: {"schema": {"type": "string"}}}
        headers = {
            401: {"WWW-Authenticate": _WWW_AUTHENTICATE},
            # Sent when the client runs too many uploads; a quota on reservations names no time.
            429: {"Retry-After": {**_RETRY_AFTER, "required": False}},
            503: {"Retry-After": _RETRY_AFTER},
        }.get(status)
        if status == 403 and EXHAUSTED in reasons[status]:
            headers = {"WWW-Authenticate": _INSUFFICIENT_SCOPE}
        if headers:
            response["headers"] = headers
        responses[str(status)] = response
    return responses


def _json(description: str, schema: Object, headers: dict[str, Object] | None = None) -> Object:
    response: Object = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _operation(
    operation_id: str,
    tag: str,
    summary: str,
    responses: dict[str, Object],
    *,
    description: str | None = None,
    parameters: list[Object] | None = None,
    body: Object | None = None,
    security: list[Object] | None = None,
) -> Object:
    operation: Object = {"operationId": operation_id, "tags": [tag], "summary": summary}
    if description:
        operation["description"] = description
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = body
    if security is not None:
        operation["security"] = security
    operation["responses"] = dict(sorted(responses.items()))
    return operation


# -- paths --------------------------------------------------------------------------------------


def _paths() -> Object:
    return {
        OPENAPI_PATH: {"get": _openapi_operation()},
        "/_api/v1/health": {"get": _health()},
        METRICS_PATH: {"get": _metrics()},
        "/_api/v1/identity": {"get": _identity()},
        "/_api/v1/session": {"post": _session_start(), "delete": _session_end()},
        "/_api/v1/tokens": {"get": _token_list(), "post": _token_create()},
        "/_api/v1/tokens/{id}": {
            "parameters": [_ref("parameters", "tokenId")],
            "get": _token_show(),
            "delete": _token_revoke(),
        },
        "/_api/v1/invitations": {"get": _invitation_list(), "post": _invitation_ask()},
        "/_api/v1/invitations/{id}": {
            "parameters": [_ref("parameters", "invitationId")],
            "get": _invitation_show(),
            "delete": _invitation_revoke(),
        },
        "/_api/v1/invitations/{id}/{answer}": {
            "parameters": [_ref("parameters", "invitationId"), _ref("parameters", "answer")],
            "post": _invitation_answer(),
        },
        "/_api/v1/events": {"get": _events()},
        "/_api/v1/transfers/{key}/events": {"parameters": [_ref("parameters", "key")], "get": _transfer_events()},
        "/_api/v1/transfers/{key}": {
            "parameters": [_ref("parameters", "key")],
            "get": _transfer_status(),
            "delete": _transfer_cancel(),
        },
        "/_api/v1/jobs": {"get": _job_list(), "post": _job_submit()},
        "/_api/v1/jobs/events": {"get": _job_events()},
        "/_api/v1/jobs/{id}": {
            "parameters": [_ref("parameters", "jobId")],
            "get": _job_status(),
            "patch": _job_priority(),
            "delete": _job_clear(),
        },
        "/_api/v1/jobs/{id}/events": {"parameters": [_ref("parameters", "jobId")], "get": _job_events_one()},
        "/_api/v1/jobs/{id}/{step}": {
            "parameters": [_ref("parameters", "jobId"), _ref("parameters", "step")],
            "post": _job_step(),
        },
        "/_static/{asset}": {"get": _asset()},
        "/{prefix}/manifest": {
            "description": "`GET`, `HEAD` and `DELETE` of this path download and delete a file named `manifest`, "
            "as `/{prefix}/{name}` describes.",
            "parameters": [_ref("parameters", "prefix")],
            "post": _manifest(),
        },
        "/{prefix}/{key}/{num}": {
            "parameters": [_ref("parameters", "prefix"), _ref("parameters", "key"), _ref("parameters", "num")],
            "post": _upload_post(),
            "put": _upload_put(),
            "head": _tus_head(),
            "patch": _tus_patch(),
            "delete": _tus_terminate(),
            "options": _tus_options("tusOptions"),
        },
        "/{prefix}/": {
            "parameters": [_ref("parameters", "prefix")],
            "get": _listing(),
            "post": _tus_create(),
            "options": _tus_options("tusOptionsOnPrefix"),
        },
        "/{prefix}": {"parameters": [_ref("parameters", "prefix")], "get": _add_slash()},
        "/{prefix}/{name}": {
            "parameters": [_ref("parameters", "prefix"), _ref("parameters", "name")],
            "get": _download("downloadFile", head=False),
            "head": _download("downloadFileHead", head=True),
            "delete": _delete(),
        },
    }


def _openapi_operation() -> Object:
    return _operation(
        "openapi",
        "control",
        "This document",
        {"200": _json("The OpenAPI 3.1 document; `servers` names the URL the request used", {"type": "object"})},
        security=_NONE,
    )


def _health() -> Object:
    return _operation(
        "health",
        "control",
        "Whether this node can serve (a load balancer's health check)",
        {
            "200": _json(
                "The node reaches its state store and writes to its storage; `node` and `worker` name the node "
                "and worker process that answered",
                _schema("Health"),
            ),
            "503": _json(
                "The state store is out of reach, the storage takes no file, or (on PostgreSQL) staging is on "
                "another filesystem than the files: `database` and `storage` say which",
                _schema("Health"),
            ),
        },
        description="Each check is bounded (2 s): a database or a mount that does not answer fails it. A full "
        "disk does not (uploads are refused with 507, downloads go on): `storage.space_low` says it.",
        security=_NONE,
    )


def _metrics() -> Object:
    return _operation(
        "metrics",
        "control",
        "The store's metrics, in the Prometheus text format",
        {
            "200": {
                "description": "Every `datastore_*` metric (of every worker process), and the staged and reserved "
                "bytes and the disk's free space measured now",
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "headers": {"Cache-Control": _NO_STORE},
            },
            **_errors(
                _merge(
                    _IDENTIFIED,
                    {
                        401: ["an anonymous client, where the `metrics_access` setting does not open the page"],
                        403: ["the client is neither an administrator nor holds a token issued for `metrics`"],
                    },
                )
            ),
        },
        description="For administrators and for tokens issued for `metrics` (which allow nothing else); the "
        "operator's `metrics_access` setting may open it to clients on the loopback address (`loopback`) or to "
        "anyone (`anyone`). The content type is `text/plain; version=0.0.4; charset=utf-8`.",
        security=[*_ADMIN, {}],
    )


def _identity() -> Object:
    return _operation(
        "identity",
        "control",
        "Who the store takes the client for",
        {
            "200": _json("The identity, and what its token allows", _schema("Identity"), {"Cache-Control": _NO_STORE}),
            **_errors(_IDENTIFIED),
        },
    )


def _session_start() -> Object:
    return _operation(
        "signIn",
        "control",
        "The browser page signs in with a token",
        {
            "200": _json(
                "The identity, as `GET /_api/v1/identity`; the token is now in an HttpOnly, SameSite=Strict "
                "session cookie (Secure on TLS)",
                _schema("Identity"),
                {"Set-Cookie": _header("`datastore_token=TOKEN; HttpOnly; Path=/; SameSite=Strict`")},
            ),
            **_errors(_merge(_IDENTIFIED, {401: ["no `Authorization: Bearer TOKEN`"], 403: [CROSS_SITE]})),
        },
        description="Send `Authorization: Bearer TOKEN`; the answer sets the cookie that authorises the page's "
        "requests and links (downloads) from then on.",
        security=[{"bearerAuth": []}],
    )


def _session_end() -> Object:
    return _operation(
        "signOut",
        "control",
        "The browser page signs out",
        {
            "204": {
                "description": "The session cookie is cleared (the token itself stays valid)",
                "headers": {"Set-Cookie": _header("the expired cookie")},
            },
            **_errors({403: [CROSS_SITE]}),
        },
        security=_NONE,
    )


_ADMIN_ERRORS = _merge(_IDENTIFIED, {401: ["an anonymous client"], 403: ["the client is not an administrator"]})


def _token_list() -> Object:
    return _operation(
        "listTokens",
        "tokens",
        "Bearer tokens, newest first (never their secrets)",
        {
            "200": _json(
                "Active tokens, or every recorded one with `all`", _schema("TokenList"), {"Cache-Control": _NO_STORE}
            ),
            **_errors(_ADMIN_ERRORS),
        },
        parameters=[
            {
                "name": "all",
                "in": "query",
                "required": False,
                "description": "also expired and revoked tokens (`1`, `true` or `yes`)",
                "schema": {"type": "boolean"},
            }
        ],
        security=_ADMIN,
    )


def _token_create() -> Object:
    return _operation(
        "issueToken",
        "tokens",
        "Issue a token",
        {
            "201": _json(
                "The token's record and, this once, its secret (`token`)",
                _schema("IssuedToken"),
                {"Cache-Control": _NO_STORE},
            ),
            **_errors(
                _merge(
                    _ADMIN_ERRORS,
                    {
                        400: [
                            "the body is not a JSON object of the fields below, or names a bad subject, action, "
                            "prefix, lifetime or description"
                        ],
                        403: [CROSS_SITE],
                        408: [SLOW],
                        413: [f"a body of more than {MAX_TOKEN_REQUEST} bytes"],
                        415: ["a body that is not `application/json`"],
                    },
                )
            ),
        },
        body={
            "required": True,
            "content": {
                JSON: {
                    "schema": _schema("TokenRequest"),
                    "example": {
                        "subject": "ada",
                        "actions": ["read", "upload"],
                        "prefixes": ["files"],
                        "expires_in": 2592000,
                        "description": "Ada's laptop",
                    },
                }
            },
        },
        security=_ADMIN,
    )


def _token_show() -> Object:
    return _operation(
        "showToken",
        "tokens",
        "One token",
        {
            "200": _json("The token's record", _schema("TokenRecord"), {"Cache-Control": _NO_STORE}),
            **_errors(_merge(_ADMIN_ERRORS, {404: ["no such token"]})),
        },
        security=_ADMIN,
    )


def _token_revoke() -> Object:
    return _operation(
        "revokeToken",
        "tokens",
        "Revoke a token, at once and for every worker",
        {
            "200": _json("The revoked record", _schema("TokenRecord"), {"Cache-Control": _NO_STORE}),
            **_errors(_merge(_ADMIN_ERRORS, {403: [CROSS_SITE], 404: ["no such token"]})),
        },
        security=_ADMIN,
    )


# -- invitations ---------------------------------------------------------------------------------

#: The answers ``POST /_api/v1/invitations/{id}/{answer}`` takes (``vouchers.handle_answer``).
INVITATION_ANSWERS = ("accept", "decline", "extend")
#: Sizes, budgets and extensions are below this (``vouchers.handle_invite``, ``handle_answer``).
_MAX_BYTES = 2**62 - 1

_ANSWERER = _merge(
    _IDENTIFIED,
    {
        401: ["an anonymous client"],
        403: ["a voucher (vouchers answer no invitation)"],
    },
)
_ANSWERABLE = _merge(
    _ANSWERER,
    {
        403: [
            "the client may not upload to the invitation's prefix (only those who may, and administrators, answer it)"
        ],
        404: ["no such invitation"],
    },
)


def _invitation_list() -> Object:
    return _operation(
        "invitationList",
        "invitations",
        "The invitations the client may answer, newest first (never their tokens)",
        {
            "200": _json(
                "Every recorded invitation to a prefix the client may upload to (an administrator's: all), in any "
                "state",
                _schema("InvitationList"),
                {"Cache-Control": _NO_STORE},
            ),
            **_errors(_ANSWERER),
        },
        security=_KNOWN,
    )


def _invitation_ask() -> Object:
    return _operation(
        "invitationAsk",
        "invitations",
        "Ask for an invitation: a voucher that works once it is accepted",
        {
            "201": _json(
                "The invitation, `PENDING`, and, this once, its token (`token`): the asker follows the answer with "
                "it (`GET /_api/v1/invitations/{id}`) and, accepted, uses it as its voucher",
                _schema("IssuedInvitation"),
                {
                    "Location": _header("the invitation's URL, `/_api/v1/invitations/{id}`"),
                    "Cache-Control": _NO_STORE,
                },
            ),
            **_errors(
                _merge(
                    _IDENTIFIED,
                    {
                        400: [
                            "the body is not JSON, not an object of the fields below, or breaks a field's rule (the "
                            "message names it), or a name breaks the naming rules",
                            "`requester` (or, without one, the client's identity) is not 1 to 200 printable characters",
                        ],
                        429: ["the client has `max_invitations_per_client` invitations waiting for an answer already"],
                        403: [CROSS_SITE],
                        404: ["no such prefix (`Path not found`)"],
                        408: [SLOW],
                        413: [f"a body of more than {MAX_INVITATION_REQUEST} bytes"],
                        415: ["a body that is not `application/json`"],
                    },
                )
            ),
        },
        description="Anyone may ask (no credential needed): the answer is a voucher-to-be, a token of this store "
        "scoped to the prefix, the direction (`push`: upload; `pull`: read), the names and a byte budget (`size`), "
        "that works for nothing until someone who may upload to the prefix (or an administrator) accepts it, "
        "within `wait` seconds (at most the store's `invitation_max_wait`). Declined, revoked or unanswered in "
        "time, it never works.",
        body={
            "required": True,
            "content": {
                JSON: {
                    "schema": _schema("InvitationRequest"),
                    "example": {
                        "prefix": "files",
                        "direction": "push",
                        "names": ["report.pdf"],
                        "size": 1048576,
                        "requester": "https://other.example: job 1a2b3c4d of ada",
                    },
                }
            },
        },
    )


def _invitation_show() -> Object:
    return _operation(
        "invitationShow",
        "invitations",
        "One invitation: whether it was answered, and its voucher's budget",
        {
            "200": _json("The invitation", _schema("Invitation"), {"Cache-Control": _NO_STORE}),
            **_errors(
                _merge(
                    _ANSWERABLE,
                    {401: ["another invitation's token (a pending or declined invitation's token works nowhere else)"]},
                )
            ),
        },
        description="To those who may answer it, and to its asker, who presents the invitation's own token as "
        "`Authorization: Bearer` (whatever the invitation's state: pending, declined, expired or revoked too).",
        security=_KNOWN,
    )


def _invitation_revoke() -> Object:
    return _operation(
        "invitationRevoke",
        "invitations",
        "Revoke an invitation: its voucher stops working at once",
        {
            "200": _json("The invitation, `REVOKED`", _schema("Invitation"), {"Cache-Control": _NO_STORE}),
            **_errors(_merge(_ANSWERABLE, {403: [CROSS_SITE]})),
        },
        security=_KNOWN,
    )


def _invitation_answer() -> Object:
    return _operation(
        "invitationAnswer",
        "invitations",
        "Accept or decline an invitation, or extend its voucher's budget",
        {
            "200": _json("The invitation after the answer", _schema("Invitation"), {"Cache-Control": _NO_STORE}),
            **_errors(
                _merge(
                    _ANSWERABLE,
                    {
                        400: [
                            "the body is not JSON or not an object",
                            "`accept` and `decline`: a `budget` that is not a number of bytes below 2^62, or a "
                            f"`lifetime` that is not seconds up to {MAX_LIFETIME:.0f}",
                            "`extend`: `bytes` is not a positive number of bytes, or would take the budget to 2^62",
                        ],
                        403: [CROSS_SITE],
                        404: ["no such answer"],
                        408: [SLOW],
                        409: [
                            "`accept` or `decline` of an invitation that is not pending (answered, revoked or past its "
                            "wait)",
                            "`extend` of a voucher that is not active (pending, declined, expired or revoked)",
                        ],
                        413: ["a body of more than 4096 bytes"],
                    },
                )
            ),
        },
        description="`accept`: the voucher works from now, for `lifetime` seconds (default 30 days) and `budget` "
        "bytes (default the size asked); `decline`: it never works (a `budget` sent is recorded); `extend`: an "
        "accepted voucher's budget grows by `bytes` (a transfer paused on `voucher_exhausted` goes on). The body "
        "may be empty (`accept` and `decline`); each answer reads only its own fields and ignores others.",
        body={
            "required": False,
            "content": {
                JSON: {
                    "schema": {"anyOf": [_schema("InvitationAcceptance"), _schema("InvitationExtension")]},
                    "examples": {
                        "accept": {"value": {"budget": 1048576, "lifetime": 86400}},
                        "extend": {"value": {"bytes": 1048576}},
                    },
                }
            },
        },
        security=_KNOWN,
    )


_TRANSFER_ERRORS = _merge(
    _IDENTIFIED,
    {
        403: ["the transfer belongs to another identity (only its owner or an administrator may see it)"],
        404: ["no such transfer key"],
    },
)


def _transfer_status() -> Object:
    return _operation(
        "transferStatus",
        "control",
        "A transfer's state and each file's bytes",
        {
            "200": _json("The transfer", _schema("TransferStatus"), {"Cache-Control": _NO_STORE}),
            **_errors(_TRANSFER_ERRORS),
        },
        description="Only the identity that registered the transfer, or an administrator, may see it; an "
        "anonymous transfer, whoever holds its key.",
    )


_EVENT_STREAM_DESCRIPTION = (
    "A `text/event-stream` that never ends by itself: one message per event (`id`: the event's id, "
    "`event`: its type, `data`: the Event object as JSON), and `: ping` comments every 15 s. A client "
    "that reconnects with `Last-Event-ID` (or asks `?after=ID`) first receives every event after that "
    "id still in the log (kept `event_retention` seconds), then the live ones, none twice."
)


def _stream_parameters() -> list[Object]:
    return [
        {
            "name": "Last-Event-ID",
            "in": "header",
            "description": "Replay the events after this id first (an EventSource sends it on reconnecting).",
            "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
        },
        {
            "name": "after",
            "in": "query",
            "description": "As Last-Event-ID, for clients that cannot set headers.",
            "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
        },
    ]


def _event_stream(description: str, item: str = "Event") -> Object:
    return {
        "description": description,
        "content": {"text/event-stream": {"schema": {"type": "string"}, "x-item-schema": _schema(item)}},
    }


def _events() -> Object:
    return _operation(
        "events",
        "events",
        "Follow the store's events",
        {
            "200": _event_stream("The events of every prefix the client may list, or of `prefix`"),
            **_errors(
                _merge(
                    _IDENTIFIED,
                    {
                        400: ["a malformed Last-Event-ID"],
                        403: ["the client may list no prefix (or not `prefix`)"],
                        404: ["no such prefix"],
                    },
                )
            ),
        },
        description=_EVENT_STREAM_DESCRIPTION
        + " Names are shown to whoever may list the prefix; a transfer's key only to its owner and "
        "administrators (others see `transfer`, a handle that does not give the key away); owners as "
        "the prefix's listing shows them.",
        parameters=[
            {
                "name": "prefix",
                "in": "query",
                "description": "Only this prefix's events.",
                "schema": {"type": "string"},
            },
            *_stream_parameters(),
        ],
    )


def _transfer_events() -> Object:
    return _operation(
        "transferEvents",
        "events",
        "Follow one transfer's events",
        {
            "200": _event_stream("The transfer's events"),
            **_errors(_merge(_TRANSFER_ERRORS, {400: ["a malformed Last-Event-ID"]})),
        },
        description=_EVENT_STREAM_DESCRIPTION + " Only the transfer's owner, or an administrator, may follow it.",
        parameters=_stream_parameters(),
    )


def _transfer_cancel() -> Object:
    return _operation(
        "cancelTransfer",
        "control",
        "Cancel a transfer",
        {
            "200": _json(
                "The final state: running uploads stopped, staged bytes removed, names released",
                _schema("TransferStatus"),
            ),
            **_errors(
                _merge(
                    _TRANSFER_ERRORS,
                    {
                        403: [CROSS_SITE],
                        409: ["the transfer has finished; delete its files instead"],
                        410: ["the transfer key expired"],
                    },
                )
            ),
        },
    )


#: Who may have transfer jobs: a known identity (a token issued for `jobs` or an administrator's, a
#: certificate, or a client DN the operator trusts); never an anonymous client.
_KNOWN: list[Object] = [{"bearerAuth": []}, {"sessionCookie": []}, {"clientDN": []}, {"mutualTLS": []}]

_JOB_CLIENT = _merge(
    _IDENTIFIED,
    {
        401: ["an anonymous client (a job is a known identity's: a token, a client certificate or a trusted DN)"],
        403: ["the token does not allow `jobs`"],
    },
)
_OWNED_JOB = _merge(
    _JOB_CLIENT,
    {
        403: ["the job belongs to another identity (only its owner or an administrator may see or change it)"],
        404: ["no such job"],
    },
)


def _states(states: Any) -> str:
    return ", ".join(f"`{state}`" for state in sorted(states))


def _job_list() -> Object:
    return _operation(
        "jobList",
        "jobs",
        "The client's transfer jobs, oldest first (without their files)",
        {
            "200": _json(
                "A page of jobs; `next` is the `after` of the following page (null on the last)",
                _schema("JobList"),
                {"Cache-Control": _NO_STORE},
            ),
            **_errors(
                _merge(_JOB_CLIENT, {400: ["a `state` that is no job state, or `limit` or `after` out of range"]})
            ),
        },
        parameters=[
            {
                "name": "state",
                "in": "query",
                "required": False,
                "description": "only jobs in these states (repeat the parameter for several; any case)",
                "schema": {"type": "array", "items": {"enum": [str(state) for state in JobState]}},
                "style": "form",
                "explode": True,
            },
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "description": "jobs per page",
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            },
            {
                "name": "after",
                "in": "query",
                "required": False,
                "description": "the previous page's `next`",
                "schema": {"type": "integer", "minimum": 0, "maximum": 2**62, "default": 0},
            },
            {
                "name": "all",
                "in": "query",
                "required": False,
                "description": "an administrator's `1` or `true`: everyone's jobs (ignored for others)",
                "schema": {"type": "boolean"},
            },
        ],
        security=_KNOWN,
    )


def _job_submit() -> Object:
    job_headers = {"Location": _header("the job's URL, `/_api/v1/jobs/{id}`"), "Cache-Control": _NO_STORE}
    return _operation(
        "jobSubmit",
        "jobs",
        "Submit a transfer job",
        {
            "201": _json('The new job, queued (or `SUBMITTED` with `"commit": false`)', _schema("Job"), job_headers),
            "200": _json(
                "The job submitted before under the same `submission_id` (nothing new)", _schema("Job"), job_headers
            ),
            **_errors(
                _merge(
                    _JOB_CLIENT,
                    {
                        400: [
                            "the body is not JSON, not an object of the fields below, or breaks a field's rule (the "
                            "message names it), or an end is no `local:/PREFIX/NAME`, `http(s)://HOST/...` or "
                            "`rclone:REMOTE:PATH` (a destination on another store is `http(s)://HOST/PREFIX/NAME`; "
                            "credentials go in `source_token` or `destination_token`, not in the URL)"
                        ],
                        403: [
                            "an http(s) end whose host is not in `job_hosts`, or an rclone end where the store has "
                            "no rclone remotes",
                            "the prefix's policy or handler does not let the client read a `local:` source or upload "
                            "a `local:` destination",
                            CROSS_SITE,
                        ],
                        404: ["a `local:` end names no prefix this store serves (`Path not found`)"],
                        408: [SLOW],
                        413: [f"a body of more than {MAX_JOB_REQUEST} bytes, or more than `max_job_files` files"],
                        415: ["a body that is not `application/json`"],
                        429: ["the client has `max_jobs_per_client` unfinished jobs already"],
                    },
                )
            ),
        },
        description="Each end is checked now (a clear 400 or 403 rather than a failed job): this store's prefixes "
        "as the submitter may use them (read a source, upload a destination), http(s) hosts against `job_hosts`, "
        "rclone remotes against the operator's configuration. The job is committed (queued) unless "
        '`"commit": false`. Credentials for the other ends (`source_token`, `destination_token`) are stored with '
        "the job and never shown again; the URLs are shown without user information, query or fragment.",
        body={
            "required": True,
            "content": {
                JSON: {
                    "schema": _schema("JobSubmission"),
                    "example": {
                        "files": [{"source": "local:/files/report.pdf", "destination": "local:/files/report-copy.pdf"}],
                        "priority": 3,
                        "verify_checksum": "both",
                    },
                }
            },
        },
        security=_KNOWN,
    )


def _job_status() -> Object:
    return _operation(
        "jobStatus",
        "jobs",
        "A job: its state, files, their attempts and its totals",
        {
            "200": _json("The job", _schema("Job"), {"Cache-Control": _NO_STORE}),
            **_errors(_OWNED_JOB),
        },
        security=_KNOWN,
    )


def _job_priority() -> Object:
    return _operation(
        "jobPriority",
        "jobs",
        "Change a job's priority",
        {
            "200": _json("The job, with its new priority", _schema("Job")),
            **_errors(
                _merge(
                    _OWNED_JOB,
                    {
                        400: ['the body is not JSON, or not exactly `{"priority": 1-5}`'],
                        403: [CROSS_SITE],
                        408: [SLOW],
                        409: [
                            "the job's priority can change only while it is "
                            + _states(REPRIORITIZABLE_JOB_STATES)
                            + " (not once it runs or has finished)"
                        ],
                        413: ["a body of more than 4096 bytes"],
                    },
                )
            ),
        },
        body={
            "required": True,
            "content": {
                JSON: {
                    "schema": _closed({"priority": {"type": "integer", "minimum": 1, "maximum": 5}}),
                    "example": {"priority": 5},
                }
            },
        },
        security=_KNOWN,
    )


def _job_clear() -> Object:
    return _operation(
        "jobClear",
        "jobs",
        "Clear a job: forget it, and drop what its destinations hold of unfinished files",
        {
            "204": {"description": "Cleared"},
            **_errors(
                _merge(
                    _OWNED_JOB,
                    {
                        403: [CROSS_SITE],
                        409: [
                            "only a job that is "
                            + _states(CLEARABLE_JOB_STATES)
                            + " (and none of whose files is still being copied) can be cleared"
                        ],
                    },
                )
            ),
        },
        security=_KNOWN,
    )


def _job_step() -> Object:
    allowed = "; ".join(f"`{verb}` from {_states(job_sources(step))}" for verb, step in JOB_STEPS.items())
    return _operation(
        "jobStep",
        "jobs",
        "Commit, pause, resume, stop or retry a job",
        {
            "200": _json("The job after the step", _schema("Job")),
            **_errors(
                _merge(
                    _OWNED_JOB,
                    {
                        403: [CROSS_SITE],
                        404: ["no such step"],
                        409: ["the job's state does not allow the step"],
                    },
                )
            ),
        },
        description=f"A step applies to a job in these states: {allowed}. `commit` queues a job submitted with "
        '`"commit": false`; `stop` keeps the bytes copied so far, and `resume` continues from them; `retry` '
        "queues again the files that did not finish.",
        security=_KNOWN,
    )


def _job_events() -> Object:
    return _operation(
        "jobEvents",
        "events",
        "Follow the events of the client's transfer jobs",
        {
            "200": _event_stream("The events of the client's jobs (an administrator's: everyone's)", "JobEvent"),
            **_errors(_merge(_JOB_CLIENT, {400: ["a malformed Last-Event-ID"]})),
        },
        description=_EVENT_STREAM_DESCRIPTION + " The `data` is a JobEvent object.",
        parameters=_stream_parameters(),
        security=_KNOWN,
    )


def _job_events_one() -> Object:
    return _operation(
        "jobEventsOne",
        "events",
        "Follow one transfer job's events",
        {
            "200": _event_stream("The job's events", "JobEvent"),
            **_errors(_merge(_OWNED_JOB, {400: ["a malformed Last-Event-ID"]})),
        },
        description=_EVENT_STREAM_DESCRIPTION
        + " The `data` is a JobEvent object. Only the job's owner, or an administrator, may follow it.",
        parameters=_stream_parameters(),
        security=_KNOWN,
    )


def _asset() -> Object:
    return _operation(
        "staticAsset",
        "browser",
        "The browser page's script and style sheet",
        {
            "200": {
                "description": "The asset",
                "content": {
                    "text/javascript": {"schema": {"type": "string"}},
                    "text/css": {"schema": {"type": "string"}},
                },
            },
            "304": {"description": "Not modified (a conditional request)"},
            **_errors({404: ["no such asset"]}),
        },
        parameters=[
            {
                "name": "asset",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "enum": ["app.js", "app.css"]},
            }
        ],
        security=_NONE,
    )


def _manifest() -> Object:
    ini_example = (
        "[manifest]\nnum_files = 1\n\n[0]\nname = hello.txt\nsize = 6\nchecksum = b1946ac92492d2347c6235b4d2611184\n"
    )
    return _operation(
        "registerTransfer",
        "transfers",
        "Register a transfer: announce the files, receive a transfer key",
        {
            "200": {
                "description": "The INI form's answer: `return_code: 0` and `transfer_key: KEY`, or `return_code: 1` "
                "and one `error_reason: Upload error for file NAME` per file the store refused",
                "content": {TEXT: {"schema": {"type": "string"}, "example": "return_code: 0\ntransfer_key: 9f1c…\n"}},
            },
            "201": _json("The JSON form's answer: the key and each file's upload URL", _schema("ManifestAccepted")),
            **_errors(
                _merge(
                    {
                        400: [
                            "a manifest that cannot be parsed or breaks a rule (`ConfigParser error: …`; JSON "
                            "names the bad `field`)"
                        ]
                    },
                    _ON_A_PREFIX,
                    {
                        405: [
                            "the INI form: the declared sizes do not fit on the disk "
                            "(`Not enough disk space for upload`)"
                        ],
                        408: [SLOW],
                        413: [
                            "a manifest over `max_manifest_bytes`, with more than `max_files` files, or a file over "
                            "`max_file_size`"
                        ],
                        429: [QUOTA],
                        507: [
                            "the JSON form: the declared sizes do not fit in the free space, less what open "
                            "transfers may still write and `min_free_bytes`"
                        ],
                    },
                )
            ),
            # Replaces the plain 403 of _ON_A_PREFIX: the JSON form may also list the refused files.
            "403": _refused_403(),
        },
        description="Every announced file passes the prefix's handler (all or nothing). A transfer key works "
        "only for the identity that registered it. A body of any type but `application/json` is read as the "
        "AccessGrid INI form.",
        body={
            "required": True,
            "content": {
                JSON: {
                    "schema": _schema("ManifestRequest"),
                    "example": {"files": [{"name": "hello.txt", "size": 6, "md5": "b1946ac92492d2347c6235b4d2611184"}]},
                },
                TEXT: {
                    "schema": {"type": "string", "description": "The AccessGrid INI manifest (ConfigParser)"},
                    "example": ini_example,
                },
            },
        },
    )


def _refused_403() -> Object:
    reasons = [
        POLICY,
        "the JSON form: the handler refused files (listed in `files`)",
        "a voucher that does not name every file of the manifest",
        CROSS_SITE,
        CERTIFICATE,
    ]
    return {
        "description": _sentence(reasons),
        "content": {
            JSON: {"schema": {"anyOf": [_schema("RefusedManifest"), _schema("Error")]}},
            TEXT: {"schema": {"type": "string"}},
        },
    }


#: What resolving ``/{prefix}/{key}/{num}`` for a client can answer (``upload.resolve_upload``).
_RESOLVE = _merge(
    _ON_A_PREFIX,
    {
        403: ["the transfer key belongs to another identity"],
        404: ["no such transfer key under this prefix, or no such file number in it"],
        410: ["the transfer key expired, or the transfer or this upload was cancelled"],
    },
)

#: What receiving a file's bytes can answer, whatever the route.
_RECEIVE = {
    400: ["the body ended before its declared length, or the connection failed"],
    403: ["the handler no longer accepts the file (sent again after a failure)", EXHAUSTED],
    404: ["the handler gave no path for the file (`Upload file not found`)"],
    405: [
        "a client that asks for no JSON: the running uploads would not leave `min_free_bytes` free, or the disk "
        "filled up during the upload (`Not enough disk space for upload`; nothing staged is kept)"
    ],
    408: [SLOW],
    409: ["the file is being uploaded by another request, or was already uploaded"],
    429: ["the client runs `max_uploads_per_client` uploads already; retry after `Retry-After`"],
    503: ["too many uploads at once (`max_concurrent_uploads`); retry after `Retry-After`"],
    507: ["a client that asks for JSON, or tus: as 405, `Not enough disk space for upload`"],
}

_WHOLE_BODY = {
    405: [
        "a body whose length is not the manifest's size (`Size in manifest != size in Content-Length`)",
        "the bytes do not match the manifest's digests (`Checksum mismatch on upload`)",
    ],
    400: ["a `multipart/form-data` body without a boundary of 1 to 70 characters"],
    411: ["a raw body without `Content-Length`"],
    413: ["a body over `max_file_size`, or a form larger than the file it carries"],
}


def _upload_result() -> Object:
    return {
        "description": "`File transfer OK`: the file was verified against the manifest and published (JSON with "
        "its digests when `Accept` names JSON)",
        "content": {
            TEXT: {"schema": {"type": "string"}, "example": "File transfer OK\n"},
            JSON: {"schema": _schema("UploadResult")},
        },
    }


def _upload_post() -> Object:
    reasons = _merge(
        _RESOLVE,
        _RECEIVE,
        _WHOLE_BODY,
        {
            400: ["a form with no file field, a malformed form, or a form whose other fields are too large"],
            403: [CROSS_SITE],
        },
    )
    return _operation(
        "uploadFilePost",
        "transfers",
        "Upload file num whole: a raw body (AccessGrid) or a browser's form",
        {"200": _upload_result(), **_errors(reasons)},
        description="The body is the file's bytes with `Content-Length` equal to the manifest's size, or a "
        "`multipart/form-data` form whose first file field is the file. `Expect: 100-continue` is answered "
        "only for an upload that can start.\n\nA tus client that cannot send PATCH or DELETE sends `POST` with "
        "`Tus-Resumable: 1.0.0` and `X-HTTP-Method-Override: PATCH` (or `DELETE`, `HEAD`, `OPTIONS`): the "
        "request is then that operation, with its headers and answers; another method named there is 400. "
        "Without `Tus-Resumable` the override header is ignored.",
        body={
            "required": True,
            "content": {
                BINARY: {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
            },
        },
    )


def _upload_put() -> Object:
    return _operation(
        "uploadFilePut",
        "transfers",
        "Upload file num whole: a raw body (curl -T)",
        {"200": _upload_result(), **_errors(_merge(_RESOLVE, _RECEIVE, _WHOLE_BODY))},
        description="The body is the file's bytes with `Content-Length` equal to the manifest's size. "
        "`Expect: 100-continue` is answered only for an upload that can start.",
        body={"required": True, "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}}},
    )


def _tus_resumable(*, required: bool) -> Object:
    return {
        "name": "Tus-Resumable",
        "in": "header",
        "required": required,
        "description": "the tus protocol version (412 for another)",
        "schema": {"type": "string", "const": TUS_VERSION},
    }


_TUS_OUT = {"Tus-Resumable": _TUS_RESUMABLE_OUT, "Upload-Expires": _UPLOAD_EXPIRES}
_TUS_412 = {412: ["`Tus-Resumable` is missing or not `1.0.0`"]}


def _tus_head() -> Object:
    return _operation(
        "tusOffset",
        "tus",
        "tus: how many bytes of the file the store holds",
        {
            "200": {
                "description": "The offset (the file's length once it is published)",
                "headers": {
                    **_TUS_OUT,
                    "Upload-Offset": _OFFSET_OUT,
                    "Upload-Length": _header("the file's size", {"type": "string", "pattern": "^[0-9]+$"}),
                    "Upload-Metadata": _header(
                        "as the creation request sent it; for a manifest's file, its `filename`"
                    ),
                    "Cache-Control": _NO_STORE,
                },
            },
            **_errors(_merge(_RESOLVE, {410: ["this upload was terminated"]}), body=False),
        },
        parameters=[_tus_resumable(required=False)],
    )


def _tus_patch() -> Object:
    return _operation(
        "tusAppend",
        "tus",
        "tus: append bytes at the offset",
        {
            "204": {
                "description": "The bytes are on disk; once the last arrives the whole file is verified against "
                "the manifest and published. A PATCH of no bytes at the end of a complete upload changes nothing",
                "headers": {**_TUS_OUT, "Upload-Offset": _OFFSET_OUT},
            },
            **_errors(
                _merge(
                    _RESOLVE,
                    _RECEIVE,
                    _TUS_412,
                    {
                        400: ["`Upload-Offset` is not a non-negative integer, or `Upload-Checksum` is malformed"],
                        403: [CROSS_SITE],
                        409: ["`Upload-Offset` is not the upload's offset, or bytes sent to a complete upload"],
                        413: ["more bytes than the file's length"],
                        415: [f"a body that is not `{OFFSET_CONTENT_TYPE}`"],
                        460: [
                            "the bytes do not match `Upload-Checksum` (they are discarded), or the whole file does "
                            "not match the manifest's digests"
                        ],
                    },
                )
            ),
        },
        parameters=[
            _tus_resumable(required=True),
            {
                "name": "Upload-Offset",
                "in": "header",
                "required": True,
                "description": "where these bytes go: the upload's current offset",
                "schema": {"type": "integer", "minimum": 0},
            },
            _upload_checksum(),
        ],
        body={"required": True, "content": {OFFSET_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
    )


#: Padded base64, as ``base64.b64decode(..., validate=True)`` takes it.
_BASE64 = "(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"


def _upload_checksum() -> Object:
    return {
        "name": "Upload-Checksum",
        "in": "header",
        "required": False,
        "description": "`ALGORITHM BASE64-DIGEST` of this request's bytes; algorithms: "
        + ", ".join(CHECKSUM_ALGORITHMS),
        "schema": {"type": "string", "pattern": f"^({'|'.join(CHECKSUM_ALGORITHMS)}) {_BASE64}$"},
    }


def _tus_terminate() -> Object:
    return _operation(
        "tusTerminate",
        "tus",
        "tus: terminate the upload",
        {
            "204": {
                "description": "Staged bytes removed, the name released",
                "headers": {"Tus-Resumable": _TUS_RESUMABLE_OUT},
            },
            **_errors(_merge(_RESOLVE, _TUS_412, {403: [CROSS_SITE], 409: ["the file was already uploaded"]})),
        },
        parameters=[_tus_resumable(required=True)],
    )


def _tus_options(operation_id: str) -> Object:
    return _operation(
        operation_id,
        "tus",
        "tus: what the store supports",
        {
            "204": {
                "description": "The capabilities",
                "headers": {
                    "Tus-Resumable": _TUS_RESUMABLE_OUT,
                    "Tus-Version": _header("versions spoken", {"const": TUS_VERSION}),
                    "Tus-Extension": _header("extensions", {"const": EXTENSIONS}),
                    "Tus-Max-Size": _header(
                        "largest file (`max_file_size`)", {"type": "string", "pattern": "^[0-9]+$"}
                    ),
                    "Tus-Checksum-Algorithm": _header("checksum algorithms", {"const": ",".join(CHECKSUM_ALGORITHMS)}),
                },
            },
            **_errors({404: [NO_PREFIX]}),
        },
        security=_NONE,
    )


def _tus_create() -> Object:
    return _operation(
        "tusCreate",
        "tus",
        "tus creation: a one-file transfer (with its first bytes, optionally)",
        {
            "201": {
                "description": "Created, through the same handler gate as a manifest; with a body, `Upload-Offset` "
                "says how much of it the store kept",
                "headers": {
                    **_TUS_OUT,
                    "Location": _header("the upload URL, `/{prefix}/{key}/0`"),
                    "Upload-Offset": _header(
                        "bytes kept from the body", {"type": "string", "pattern": "^[0-9]+$"}, required=False
                    ),
                },
            },
            **_errors(
                _merge(
                    _ON_A_PREFIX,
                    _TUS_412,
                    {
                        400: [
                            "`Upload-Length` missing or not a size, `Upload-Defer-Length` sent, `Upload-Metadata` "
                            f"malformed, longer than {MAX_METADATA_BYTES} bytes or naming no valid file (`filename`),"
                            " or `Upload-Checksum` malformed"
                        ],
                        403: ["the handler refused the file", VOUCHER_NAMES, CROSS_SITE],
                        413: ["`Upload-Length` over `max_file_size`"],
                        429: [QUOTA],
                        507: [
                            "the file does not fit in the free space, less what open transfers may still write and "
                            "`min_free_bytes`"
                        ],
                    },
                )
            ),
        },
        description="`Upload-Metadata` names the file (`filename`, base64) and may declare `md5` or `sha256` "
        "(hex, base64-encoded) to check the whole file against. A body of type "
        f"`{OFFSET_CONTENT_TYPE}` is the file's first bytes (creation-with-upload).",
        parameters=[
            _tus_resumable(required=True),
            {
                "name": "Upload-Length",
                "in": "header",
                "required": True,
                "description": "the file's size",
                "schema": {"type": "integer", "minimum": 0},
            },
            {
                "name": "Upload-Metadata",
                "in": "header",
                "required": True,
                "description": "comma-separated `KEY BASE64VALUE` pairs; `filename` is required",
                "schema": {"type": "string"},
                "example": "filename cmVwb3J0LnBkZg==",
            },
            _upload_checksum(),
        ],
        body={"required": False, "content": {OFFSET_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
    )


def _listing() -> Object:
    errors = _errors(
        _merge(
            _ON_A_PREFIX,
            {
                403: ["a voucher that names its files (it lists nothing)"],
                404: ["the prefix's handler offers no listing"],
            },
        )
    )
    for status in ("401", "403", "404"):
        # The page, without the list, where the listing is refused (an unknown prefix stays text or JSON).
        errors[status]["content"]["text/html"] = {"schema": {"type": "string"}}
    return _operation(
        "listFiles",
        "files",
        "The files of a prefix (JSON), or the browser page with them as links",
        {
            "200": {
                "description": "The listing for an `Accept` naming `application/json` (or other types only); the "
                "browser page, with the files as plain links, for one naming `text/html`, only wildcards, or none",
                "content": {
                    JSON: {"schema": _schema("Listing")},
                    "text/html": {"schema": {"type": "string"}},
                },
            },
            **errors,
        },
        description="A file uploaded over TLS is listed only over TLS where the prefix's policy keeps such files "
        "off plain HTTP. `owner` is shown to the owner and administrators, or to every reader with `show_owners`. "
        "The page obeys the same rules; a client that may not list gets it without the list, with the status "
        "the JSON listing would have.",
    )


def _add_slash() -> Object:
    return _operation(
        "prefixWithoutSlash",
        "browser",
        "Redirect to the prefix's page",
        {
            "301": {"description": "Moved to `/{prefix}/`", "headers": {"Location": _header("`/{prefix}/`")}},
            **_errors({404: [NO_PREFIX]}),
        },
        security=_NONE,
    )


def _download(operation_id: str, *, head: bool) -> Object:
    body = not head
    file_headers = {
        "Content-Disposition": _header("`attachment`, with the name (ASCII fallback and UTF-8)"),
        "ETag": _header("strong validator"),
        "Last-Modified": _header("when the file was published"),
        "X-Content-Type-Options": _header("`nosniff`"),
        "Cache-Control": _header("`no-cache`"),
        "Repr-Digest": _header(
            "RFC 9530 digests of the whole file, `sha-256=:…:, md5=:…:` (where the handler describes the file)",
            required=False,
        ),
    }
    content = {BINARY: {"schema": {"type": "string", "format": "binary"}}} if body else None

    def answer(description: str, headers: dict[str, Object]) -> Object:
        response: Object = {"description": description, "headers": headers}
        if content is not None:
            response["content"] = content
        return response

    conditional = [
        ("Range", "`bytes=FIRST-LAST`, one range (206; 416 if it cannot be satisfied)"),
        ("If-Range", "an entity-tag or date: the Range applies only if the file is still that one"),
        ("If-None-Match", "304 if the file still has this entity-tag"),
        ("If-Modified-Since", "304 if the file has not changed since"),
        ("If-Match", "412 unless the file has this entity-tag"),
        ("If-Unmodified-Since", "412 if the file changed since"),
    ]
    return _operation(
        operation_id,
        "files",
        "Download a file" + (" (headers only)" if head else ""),
        {
            "200": answer("The file", {**file_headers, "Accept-Ranges": _header("`bytes`")}),
            "206": answer("The range asked for", {**file_headers, "Content-Range": _header("`bytes FIRST-LAST/SIZE`")}),
            "304": {"description": "Not modified"},
            "412": {"description": "A precondition (`If-Match`, `If-Unmodified-Since`) failed"},
            "416": {
                "description": "The range cannot be satisfied",
                "headers": {"Content-Range": _header("`bytes */SIZE`", required=False)},
            },
            **_errors(
                _merge(
                    {400: ["a name that breaks the naming rules"]},
                    _ON_A_PREFIX,
                    {
                        403: [
                            "the file was uploaded over TLS and is served over TLS only",
                            VOUCHER_NAMES,
                            *([] if head else [EXHAUSTED]),
                        ],
                        404: ["no such file (`File not found`)"],
                    },
                ),
                body=body,
            ),
        },
        parameters=[
            {"name": name, "in": "header", "required": False, "description": text, "schema": {"type": "string"}}
            for name, text in conditional
        ],
    )


def _delete() -> Object:
    return _operation(
        "deleteFile",
        "files",
        "Delete a published file",
        {
            "204": {"description": "Deleted"},
            **_errors(
                _merge(
                    {400: ["a name that breaks the naming rules"]},
                    _ON_A_PREFIX,
                    {
                        403: ["only the file's owner (or an administrator) may delete it", CROSS_SITE],
                        404: ["no such file (`File not found`)"],
                    },
                )
            ),
            "405": {
                "description": "The prefix's handler cannot delete files",
                "headers": {"Allow": _ALLOW},
                "content": {TEXT: {"schema": {"type": "string"}}},
            },
        },
    )


# -- parameters ---------------------------------------------------------------------------------


def _parameters(prefixes: list[str]) -> Object:
    prefix: Object = {
        "name": "prefix",
        "in": "path",
        "required": True,
        "description": "a prefix the store serves (404 `Path not found` for another)",
        "schema": {"type": "string", "pattern": f"^{PREFIX_PATTERN}$"},
    }
    if prefixes:
        prefix["examples"] = {name: {"value": name} for name in prefixes}
    return {
        "prefix": prefix,
        "key": {
            "name": "key",
            "in": "path",
            "required": True,
            "description": "a transfer key (40 hex digits), as the manifest's answer gave it",
            "schema": {"type": "string", "pattern": "^[0-9a-f]{40}$"},
        },
        "num": {
            "name": "num",
            "in": "path",
            "required": True,
            "description": "the file's number: its index in the manifest, from 0",
            "schema": {"type": "integer", "minimum": 0},
        },
        "name": {
            "name": "name",
            "in": "path",
            "required": True,
            "description": "a file's name: one path segment of at most 255 UTF-8 bytes, NFC; no reserved character "
            '(`/ \\ : * ? " < > |` or a look-alike), control, format or private-use code point, leading dot, '
            "trailing dot or space, or Windows device name (400 for one that breaks a rule)",
            "schema": {"type": "string", "minLength": 1},
        },
        "invitationId": {
            "name": "id",
            "in": "path",
            "required": True,
            "description": "an invitation's id (12 hex digits: its token's id), as the answer to asking for it gave it",
            "schema": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
        },
        "answer": {
            "name": "answer",
            "in": "path",
            "required": True,
            "description": "the answer (404 for another)",
            "schema": {"type": "string", "enum": list(INVITATION_ANSWERS)},
        },
        "tokenId": {
            "name": "id",
            "in": "path",
            "required": True,
            "description": "a token's id (the 12 hex digits after `dst_`)",
            "schema": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
        },
        "jobId": {
            "name": "id",
            "in": "path",
            "required": True,
            "description": "a transfer job's id (32 hex digits), as its submission's answer gave it",
            "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        },
        "step": {
            "name": "step",
            "in": "path",
            "required": True,
            "description": "the step to take (404 for another)",
            "schema": {"type": "string", "enum": list(JOB_STEPS)},
        },
    }


# -- schemas ------------------------------------------------------------------------------------


def _error_codes() -> list[str]:
    codes: set[str] = set()
    pending: list[type[DatastoreError]] = [DatastoreError]
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending.extend(cls.__subclasses__())
    return sorted(codes)


_HEX32 = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
_HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_TIME = {"type": "string", "format": "date-time"}
_TOKEN_SECRET = {
    "type": "string",
    "pattern": "^dst_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$",
    "description": "the secret, shown this once",
}


def _nullable(schema: Object) -> Object:
    return {"anyOf": [schema, {"type": "null"}]}


def _closed(properties: Object, required: list[str] | None = None, **extra: Any) -> Object:
    """An object of exactly these properties (all required unless ``required`` says otherwise)."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


def _invitation_schemas(settings: Settings) -> Object:
    """The invitations API's bodies: what ``handle_invite`` and ``handle_answer`` take, what
    ``invitation_json`` gives."""
    count = {"type": "integer", "minimum": 0}
    invitation = {
        "id": {"type": "string", "pattern": "^[0-9a-f]{12}$", "description": "its token's id"},
        "url": {"type": "string", "description": "`/_api/v1/invitations/{id}`"},
        "state": {
            "enum": ["PENDING", "ACCEPTED", "DECLINED", "EXPIRED", "REVOKED"],
            "description": "`ACCEPTED`: its token is an active voucher; `EXPIRED`: unanswered in time, or the "
            "voucher's lifetime ended",
        },
        "prefix": _nullable({"type": "string"}),
        "direction": {"enum": ["push", "pull"]},
        "names": {"type": "array", "items": {"type": "string"}},
        "budget": _nullable({**count, "description": "the bytes the voucher lets its holder move in all"}),
        "used": {**count, "description": "the bytes moved, or reserved by requests under way"},
        "left": _nullable(count),
        "requester": _nullable({"type": "string", "description": "who asked, as the asker says"}),
        "created_at": _TIME,
        "answer_by": _nullable({**_TIME, "description": "until when it waits for its answer"}),
        "answered_by": _nullable({"type": "string"}),
        "answered_at": _nullable(_TIME),
        "expires_at": _TIME,
    }
    return {
        "InvitationRequest": _closed(
            {
                "prefix": {"type": "string", "description": "a prefix the store serves (404 for another)"},
                "direction": {
                    "enum": ["push", "pull"],
                    "default": "push",
                    "description": "`push`: upload into this store; `pull`: read out of it",
                },
                "names": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_INVITATION_NAMES,
                    "items": {"type": "string", "minLength": 1, "description": "a file name (the naming rules)"},
                },
                "size": {**count, "maximum": _MAX_BYTES, "description": "the bytes to move, in all"},
                "requester": {
                    "type": "string",
                    "maxLength": 200,
                    "description": "who asks, in printable characters (empty or absent: the client's identity)",
                },
                "wait": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": settings.invitation_max_wait,
                    "default": settings.invitation_max_wait,
                    "description": "seconds the invitation waits for its answer",
                },
            },
            required=["prefix", "names", "size"],
            description="An invitation asked for: a voucher for these names under the prefix.",
        ),
        "Invitation": _closed(invitation, description="An invitation as its asker and its answerers see it."),
        "IssuedInvitation": _closed(
            {**invitation, "token": {**_TOKEN_SECRET, "description": "the invitation's token, shown this once"}}
        ),
        "InvitationList": _closed({"invitations": {"type": "array", "items": _schema("Invitation")}}),
        "InvitationAcceptance": _closed(
            {
                "budget": _nullable({**count, "maximum": _MAX_BYTES, "description": "bytes (default: the size asked)"}),
                "lifetime": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": MAX_LIFETIME,
                    "default": DEFAULT_LIFETIME,
                    "description": "seconds the voucher works from now",
                },
            },
            required=[],
            description="`accept`'s (and `decline`'s) body.",
        ),
        "InvitationExtension": _closed(
            {"bytes": {"type": "integer", "minimum": 1, "maximum": _MAX_BYTES, "description": "bytes to add"}},
            description="`extend`'s body: the bytes to add to the voucher's budget (which stays below 2^62).",
        ),
    }


def _job_schemas(settings: Settings) -> Object:
    """The jobs API's bodies: what ``parse_job`` takes, what ``job_summary``, ``job_document`` and
    ``job_event_document`` give."""
    count = {"type": "integer", "minimum": 0}
    job_states = {"enum": [str(state) for state in JobState]}
    file_states = {"enum": [str(state) for state in FileJobState]}
    reason = _nullable({"enum": [str(reason) for reason in FailureReason]})
    verify = {"enum": [str(v) for v in VerifyChecksum]}
    text = {"type": "string", "minLength": 1, "description": "printable characters"}
    credential = {
        **text,
        "maxLength": MAX_URL,
        "writeOnly": True,
        "description": "sent as `Authorization: Bearer` to those ends; stored with the job, never shown",
    }
    end = {"type": "string", "minLength": 1, "maxLength": MAX_URL}
    summary = {
        "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "url": {"type": "string", "description": "`/_api/v1/jobs/{id}`"},
        "state": job_states,
        "owner": _nullable({"type": "string"}),
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "verify_checksum": verify,
        "retry": {"type": "integer", "minimum": 0, "maximum": 100},
        "retry_delay": {"type": "number", "minimum": 0},
        "max_time_in_queue": _nullable({"type": "number", "minimum": 0}),
        "deadline": _nullable(_TIME),
        "submission_id": _nullable({"type": "string"}),
        "bandwidth": _nullable(count),
        "chunk_size": _nullable(count),
        "reason": _nullable({"type": "string", "description": "why the job is where it is (a stop, an expiry)"}),
        "invitation": _nullable(
            _closed(
                {
                    "base": {"type": "string", "description": "the destination store's URL"},
                    "prefix": {"type": "string"},
                    "id": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
                    "state": {
                        "type": "string",
                        "description": "`ASKING`, then the invitation's state as the destination store says it",
                    },
                    "answer_by": _nullable(_TIME),
                    "left": _nullable({**count, "description": "bytes left of the voucher's budget"}),
                },
                required=["base", "prefix", "state"],
                description="The invitation the job asked of its destination store (never its token)",
            )
        ),
        "created_at": _TIME,
        "committed_at": _nullable(_TIME),
        "started_at": _nullable(_TIME),
        "finished_at": _nullable(_TIME),
        "updated_at": _TIME,
    }
    attempt = _closed(
        {
            "attempt": {"type": "integer", "minimum": 1},
            "started_at": _TIME,
            "ended_at": _nullable(_TIME),
            "from": {**count, "description": "the offset the attempt started at"},
            "to": _nullable({**count, "description": "the bytes the file had when the attempt ended"}),
            "outcome": _nullable(
                {
                    "enum": ["finished", "retrying", "failed", "interrupted"],
                    "description": "`interrupted`: the job was paused, stopped or expired while the attempt ran",
                }
            ),
            "reason": reason,
            "error": _nullable({"type": "string"}),
        }
    )
    job_file = _closed(
        {
            "index": count,
            "source": {"type": "string", "description": "without user information, query or fragment"},
            "destination": {"type": "string", "description": "without user information, query or fragment"},
            "state": file_states,
            "size": _nullable(count),
            "bytes": count,
            "rate": {"type": "number", "minimum": 0, "description": "bytes per second"},
            "attempts": count,
            "reason": reason,
            "error": _nullable({"type": "string"}),
            "stalled": {"type": "boolean"},
            "next_attempt_at": _nullable(_TIME),
            "md5": _nullable(_HEX32),
            "sha256": _nullable(_HEX64),
            "started_at": _nullable(_TIME),
            "finished_at": _nullable(_TIME),
            "history": {"type": "array", "items": attempt},
        }
    )
    checksum = "^(?:(?:[Mm][Dd]-?5)?:)?[0-9a-fA-F]{32}$|^(?:(?:[Ss][Hh][Aa]-?256)?:)?[0-9a-fA-F]{64}$"
    return {
        "JobSubmission": _closed(
            {
                "files": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": settings.max_job_files,
                    "items": _closed(
                        {
                            "source": {
                                **end,
                                "description": "`local:/PREFIX/NAME`, `http(s)://HOST/...` or `rclone:REMOTE:PATH`",
                            },
                            "destination": {
                                **end,
                                "description": "`local:/PREFIX/NAME`, `http(s)://HOST/PREFIX/NAME` (a store's "
                                "upload) or `rclone:REMOTE:PATH`",
                            },
                            "size": _nullable(
                                {
                                    **count,
                                    "maximum": MAX_SIZE,
                                    "description": "the bytes the source should have (all the files' together at "
                                    f"most {MAX_SIZE}, 400 beyond)",
                                }
                            ),
                            "checksum": _nullable(
                                {
                                    "type": "string",
                                    "pattern": checksum,
                                    "description": "`md5:HEX`, `sha256:HEX` (or `sha-256:HEX`), or bare hex (32 "
                                    "digits MD5, 64 SHA-256): what the copy must have",
                                }
                            ),
                        },
                        required=["source", "destination"],
                    ),
                },
                "priority": {"type": "integer", "minimum": 1, "maximum": 5, "default": 3},
                "verify_checksum": {**verify, "default": str(VerifyChecksum.BOTH)},
                "retry": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": 100,
                    "default": 3,
                    "description": "attempts after the first for a file that failed for a transient reason",
                },
                "retry_delay": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 86400,
                    "default": 5,
                    "description": "seconds before the first retry; each further one waits twice as long",
                },
                "max_time_in_queue": _nullable(
                    {
                        "type": "number",
                        "minimum": 1,
                        "maximum": 10 * 365 * 86400,
                        "description": "seconds the job may wait queued before it expires (null: forever)",
                    }
                ),
                "deadline": _nullable(
                    {
                        "anyOf": [
                            {
                                **_TIME,
                                "description": "an ISO 8601 time with its zone, from 1970 to 9999 (400 otherwise)",
                            },
                            {
                                "type": "number",
                                "minimum": 0,
                                "maximum": LAST_DEADLINE,
                                "description": "seconds since the epoch",
                            },
                        ],
                        "description": "when the job must have finished, or it expires",
                    }
                ),
                "commit": {"type": "boolean", "default": True, "description": "false: `SUBMITTED`, until a `commit`"},
                "submission_id": _nullable(
                    {
                        **text,
                        "maxLength": 255,
                        "description": "the client's name for the submission: sent again, the same job answers",
                    }
                ),
                "bandwidth": _nullable(
                    {"type": "integer", "minimum": 1024, "maximum": 1 << 40, "description": "bytes per second"}
                ),
                "chunk_size": _nullable(
                    {"type": "integer", "minimum": 4096, "maximum": 64 << 20, "description": "bytes per step"}
                ),
                "source_token": _nullable(credential),
                "destination_token": _nullable(credential),
            },
            required=["files"],
            description="A transfer job: the files to copy and how.",
        ),
        "JobSummary": _closed(summary, description="A job without its files."),
        "Job": _closed(
            {
                **summary,
                "files_by_state": {
                    "type": "object",
                    "propertyNames": file_states,
                    "additionalProperties": {"type": "integer", "minimum": 1},
                },
                "bytes": count,
                "size": _nullable({**count, "description": "null while a file's size is unknown"}),
                "rate": {"type": "number", "minimum": 0, "description": "bytes per second"},
                "last_error": _nullable(_closed({"file": count, "reason": reason, "message": {"type": "string"}})),
                "files": {"type": "array", "items": job_file},
            },
            description="A job, its files, their attempts and its totals.",
        ),
        "JobList": _closed(
            {
                "jobs": {"type": "array", "items": _schema("JobSummary")},
                "next": _nullable(count),
            }
        ),
        "JobEvent": _closed(
            {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": [str(kind) for kind in EventType if kind.startswith("job.")]},
                "time": _TIME,
                "job": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                "file": _nullable(count),
                "destination": _nullable({"type": "string"}),
                "owner": _nullable({"type": "string"}),
                "bytes": _nullable(count),
                "size": _nullable(count),
                "md5": _nullable({"type": "string"}),
                "sha256": _nullable({"type": "string"}),
                "reason": _nullable({"type": "string"}),
            },
            description="One transfer job's event, as the `data` of an SSE message.",
        ),
    }


def _schemas(settings: Settings) -> Object:
    size = {"type": "integer", "minimum": 0}
    token_record = {
        "id": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
        "subject": {"type": "string"},
        "actions": {"type": "array", "items": {"enum": list(ACTIONS)}},
        "prefixes": _nullable({"type": "array", "items": {"type": "string"}}),
        "description": {"type": "string"},
        "created_at": _TIME,
        "expires_at": _TIME,
        "revoked_at": _nullable(_TIME),
        "state": {
            "enum": ["active", "expired", "revoked", "pending", "declined"],
            "description": "`pending` and `declined`: an invitation's token, which works for nothing",
        },
        # A voucher's (an invitation's token's) scope beyond actions and prefixes; absent for other tokens.
        "names": _nullable({"type": "array", "items": {"type": "string"}, "description": "the files it covers"}),
        "budget": _nullable({**size, "description": "the bytes it lets its holder move in all (null: no limit)"}),
        "used": {**size, "description": "the bytes moved, or reserved by requests under way"},
    }
    token_required = [field for field in token_record if field not in ("names", "budget", "used")]
    file_states = ["PENDING", "IN_PROGRESS", "FINISHED", "FAILED", "CANCELLED", "EXPIRED"]
    manifest_hex = {"type": "string", "description": "hex digits, either case"}
    return {
        "Error": _closed(
            {
                "error": {"enum": _error_codes(), "description": "a stable machine-readable code"},
                "message": {"type": "string", "description": "the reason phrase, with detail"},
                "field": {"type": "string", "description": "the manifest field at fault (JSON manifests)"},
            },
            required=["error", "message"],
        ),
        "RefusedManifest": _closed(
            {
                "error": {"const": "refused"},
                "message": {"type": "string"},
                "files": {
                    "type": "array",
                    "items": _closed({"name": {"type": "string"}, "reason": {"type": "string"}}),
                },
            }
        ),
        "ManifestRequest": {
            "type": "object",
            "description": "The files of one transfer, in upload order (file number = index)",
            "properties": {
                "files": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": settings.max_files,
                    "items": _closed(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "size": {**size, "maximum": settings.max_file_size},
                            "md5": {**manifest_hex, "pattern": "^[0-9a-fA-F]{32}$"},
                            "checksum": {**manifest_hex, "pattern": "^[0-9a-fA-F]{32}$", "description": "alias of md5"},
                            "sha256": {**manifest_hex, "pattern": "^[0-9a-fA-F]{64}$"},
                        },
                        required=["name", "size"],
                    ),
                }
            },
            "required": ["files"],
        },
        "ManifestAccepted": _closed(
            {
                "transfer_key": {"type": "string", "pattern": "^[0-9a-f]{40}$"},
                "expires_at": _TIME,
                "status_url": {"type": "string", "format": "uri"},
                "files": {
                    "type": "array",
                    "items": _closed(
                        {
                            "num": size,
                            "name": {"type": "string"},
                            "size": size,
                            "upload_url": {"type": "string", "format": "uri"},
                        }
                    ),
                },
            }
        ),
        "UploadResult": _closed(
            {"name": {"type": "string"}, "size": size, "md5": _nullable(_HEX32), "sha256": _nullable(_HEX64)},
            description="The file as verified: the digests its manifest declared (a digest not declared is null:"
            " it is computed after publishing, and the listing gives it then).",
        ),
        "Event": _closed(
            {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": [str(kind) for kind in EventType]},
                "time": _TIME,
                "prefix": {"type": "string"},
                "transfer": _nullable({"type": "string", "pattern": "^[0-9a-f]{16}$"}),
                "transfer_key": _nullable({"type": "string"}),
                "file": _nullable({"type": "integer", "minimum": 0}),
                "name": _nullable({"type": "string"}),
                "owner": _nullable({"type": "string"}),
                "bytes": _nullable(size),
                "size": _nullable(size),
                "md5": _nullable({"type": "string"}),
                "sha256": _nullable({"type": "string"}),
                "reason": _nullable({"type": "string"}),
            },
            description="One event, as the `data` of an SSE message and the body of a webhook delivery.",
        ),
        "TransferStatus": _closed(
            {
                "transfer_key": {"type": "string", "pattern": "^[0-9a-f]{40}$"},
                "prefix": {"type": "string"},
                "state": {"enum": file_states},
                "owner": _nullable({"type": "string"}),
                "created_at": _TIME,
                "updated_at": _TIME,
                "expires_at": _TIME,
                "files": {
                    "type": "array",
                    "items": _closed(
                        {
                            "num": size,
                            "name": {"type": "string"},
                            "size": size,
                            "received": size,
                            "state": {"enum": file_states},
                            "md5": _nullable(_HEX32),
                            "sha256": _nullable(_HEX64),
                            "error": _nullable({"type": "string"}),
                        }
                    ),
                },
            }
        ),
        "Listing": _closed(
            {
                "prefix": {"type": "string"},
                "files": {
                    "type": "array",
                    "items": _closed(
                        {
                            "name": {"type": "string"},
                            "size": size,
                            "md5": _nullable(_HEX32),
                            "sha256": _nullable(_HEX64),
                            "digests": {
                                "enum": ["complete", "pending"],
                                "description": "`pending` while a digest the upload did not declare is computed"
                                " (it is null until then); `file.digested` announces it",
                            },
                            "owner": _nullable({"type": "string"}),
                            "owner_authenticated": _nullable({"type": "boolean"}),
                            "yours": {"type": "boolean"},
                            "uploaded_at": {"type": "number", "description": "POSIX time"},
                            "url": {"type": "string", "format": "uri"},
                        }
                    ),
                },
            }
        ),
        "Health": _closed(
            {
                "status": {"enum": ["ok", "failing"], "description": "`ok` with 200, `failing` with 503"},
                "prefixes": {"type": "array", "items": {"type": "string"}},
                "node": {"type": "string", "description": "the answering node's name (--node-id)"},
                "worker": {"type": "integer", "minimum": 0},
                "state": {"enum": ["sqlite", "postgresql"], "description": "the state store's kind"},
                "event_streams": {"type": "integer", "minimum": 0},
                "database": _closed(
                    {
                        "reachable": {"type": "boolean", "description": "one read of the state store succeeded"},
                        "round_trip_ms": _nullable(
                            {
                                "type": "number",
                                "minimum": 0,
                                "description": "its time, a wait for a connection included",
                            }
                        ),
                        "error": _nullable({"type": "string", "description": "why it failed"}),
                    }
                ),
                "storage": _closed(
                    {
                        "writable": {
                            "type": "boolean",
                            "description": "a file was made in staging; the folders take files",
                        },
                        "free_bytes": _nullable(
                            {"type": "integer", "minimum": 0, "description": "free on the root's filesystem"}
                        ),
                        "space_low": {"type": "boolean", "description": "fewer free bytes than min_free_bytes"},
                        "staging_same_filesystem": _nullable(
                            {
                                "type": "boolean",
                                "description": "staging, the root and each prefix's folder on one filesystem",
                            }
                        ),
                        "error": _nullable({"type": "string", "description": "why the storage fails"}),
                    }
                ),
            }
        ),
        "Identity": _closed(
            {
                "kind": {"enum": [kind.value for kind in IdentityKind]},
                "subject": _nullable({"type": "string"}),
                "issuer": _nullable({"type": "string"}),
                "dn": _nullable({"type": "string", "description": "AccessGrid's one-line form, for display"}),
                "admin": {"type": "boolean"},
                "token": _nullable(
                    _closed(
                        {
                            "id": token_record["id"],
                            "actions": token_record["actions"],
                            "prefixes": token_record["prefixes"],
                            "expires_at": _TIME,
                        }
                    )
                ),
            }
        ),
        "TokenRecord": _closed(token_record, required=token_required),
        "IssuedToken": _closed(
            {**token_record, "token": _TOKEN_SECRET},
            required=[*token_required, "token"],
        ),
        "TokenList": _closed({"tokens": {"type": "array", "items": _schema("TokenRecord")}}),
        **_invitation_schemas(settings),
        **_job_schemas(settings),
        "TokenRequest": _closed(
            {
                "subject": {"type": "string", "minLength": 1, "description": "the identity the token is for"},
                "actions": {
                    "type": "array",
                    "items": {"enum": list(ACTIONS)},
                    "minItems": 1,
                    "default": ["read", "upload"],
                },
                "prefixes": _nullable(
                    {"type": "array", "items": {"type": "string", "pattern": f"^{PREFIX_PATTERN}$"}, "minItems": 1}
                ),
                "expires_in": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": MAX_LIFETIME,
                    "description": "seconds (default 30 days)",
                },
                "description": {"type": "string", "maxLength": 200},
            },
            required=["subject"],
        ),
    }
