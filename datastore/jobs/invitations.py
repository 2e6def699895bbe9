"""The asking side of invitations: a job that pushes to another datastore without a credential for
it asks that store for an invitation (``http/vouchers.py`` is the answering side), waits in
AWAITING_ACCEPTANCE while the store's people decide, and follows the answer with the invitation's
token: accepted, the token is the job's voucher and the job is queued; declined, the job is
DECLINED; unanswered in time, INVITE_NOT_ACCEPTED_ON_TIME. A job paused because its voucher's
budget ran out resumes once the issuer extended it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp

from .drivers.http import driver_error, refuse
from .drivers.interface import DriverError
from .states import FailureReason

#: The reason a job paused for an exhausted voucher starts with.
VOUCHER_PAUSE = "voucher_exhausted"


def invitation_target(destinations: list[str], *, certificate: bool = False) -> tuple[str, str] | None:
    """The (base URL, prefix) of the one store a job's http(s) destinations are on (https ones only
    without a store ``certificate`` to present), or None if it has none; ValueError if they are on
    several (one invitation per job)."""
    targets = set()
    for url in destinations:
        parts = urlsplit(url)
        if parts.scheme == "http" or (parts.scheme == "https" and not certificate):
            prefix = parts.path.split("/")[1]
            targets.add((f"{parts.scheme}://{parts.netloc}", prefix))
    if len(targets) > 1:
        raise ValueError("a job without a destination_token may push to one store's prefix only (one invitation)")
    return targets.pop() if targets else None


def needs_invitation(destination_token: str | None, destinations: list[str], *, certificate: bool) -> bool:
    """Whether a job must ask its destination store for an invitation before it runs: it pushes to
    another datastore with no credential for it (no token; over TLS, no store ``certificate``).
    ValueError if it would have to ask several."""
    return destination_token is None and invitation_target(destinations, certificate=certificate) is not None


def destination_name(url: str) -> str:
    """The file name a datastore destination URL ends in."""
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


async def ask(
    session: aiohttp.ClientSession,
    base: str,
    prefix: str,
    *,
    names: list[str],
    size: int,
    requester: str,
    wait: float | None,
) -> tuple[dict[str, Any], str]:
    """POST the invitation; its answer (without the token) and its token."""
    body: dict[str, Any] = {"prefix": prefix, "direction": "push", "names": names, "size": size, "requester": requester}
    if wait is not None:
        body["wait"] = wait
    what = f"ask {base} for an invitation to /{prefix}/"
    try:
        async with session.post(f"{base}/_api/v1/invitations", json=body) as response:
            if response.status != 201:
                refuse(response.status, what, response.reason)
            document: dict[str, Any] = await response.json()
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise driver_error(exc, what) from None
    token = document.pop("token", None)
    if not isinstance(token, str):
        raise DriverError(FailureReason.BAD_REQUEST, f"{what}: the answer holds no token")
    return document, token


async def answer_of(session: aiohttp.ClientSession, invitation: Mapping[str, Any], token: str) -> dict[str, Any]:
    """The invitation as its store says it stands now (state, budget, used, left, answered_by)."""
    what = f"follow the invitation {invitation.get('id')} of {invitation.get('base')}"
    try:
        async with session.get(
            f"{invitation['base']}/_api/v1/invitations/{invitation['id']}",
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            if response.status != 200:
                refuse(response.status, what, response.reason)
            document: dict[str, Any] = await response.json()
            return document
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise driver_error(exc, what) from None
