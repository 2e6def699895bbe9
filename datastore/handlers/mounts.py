"""Mounts: a registered prefix, its handler, its access policy and the handler's optional
capabilities, detected once at registration so that no request ever probes a handler with
``hasattr``."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FileNotFound, NotAuthorized
from ..security.identity import Identity
from ..security.policy import Action, Policy
from .interface import (
    CanAddDigests,
    CanAuthorize,
    CanClose,
    CanDelete,
    CanDescribe,
    CanList,
    CanLocateDownload,
    CanObserve,
    CanReclaimReservations,
    CanReserveMany,
    Download,
    TransferHandler,
)


@dataclass(slots=True)
class Mount:
    """A registered prefix: its handler and the capabilities it offers."""

    prefix: str
    handler: TransferHandler
    policy: Policy
    lister: CanList | None = None
    describer: CanDescribe | None = None
    deleter: CanDelete | None = None
    closer: CanClose | None = None
    reserver: CanReserveMany | None = None
    reclaimer: CanReclaimReservations | None = None
    locator: CanLocateDownload | None = None
    authorizer: CanAuthorize | None = None
    observer: CanObserve | None = None
    digests: CanAddDigests | None = None
    #: Held across can_upload and add_pending_upload so reservations are atomic.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def detect(cls, prefix: str, handler: TransferHandler, policy: Policy) -> Mount:
        """Build a mount, detecting the handler's optional capabilities once."""
        return cls(
            prefix=prefix,
            handler=handler,
            policy=policy,
            lister=handler if isinstance(handler, CanList) else None,
            describer=handler if isinstance(handler, CanDescribe) else None,
            deleter=handler if isinstance(handler, CanDelete) else None,
            closer=handler if isinstance(handler, CanClose) else None,
            reserver=handler if isinstance(handler, CanReserveMany) else None,
            reclaimer=handler if isinstance(handler, CanReclaimReservations) else None,
            locator=handler if isinstance(handler, CanLocateDownload) else None,
            authorizer=handler if isinstance(handler, CanAuthorize) else None,
            observer=handler if isinstance(handler, CanObserve) else None,
            digests=handler if isinstance(handler, CanAddDigests) else None,
        )

    async def authorize(self, identity: Identity, action: Action, name: str | None = None) -> None:
        """Raise 401/403 unless the prefix's policy, and then its handler, let ``identity`` do ``action``
        (on ``name``; a voucher that names its files reaches no other, and lists nothing; an upload's
        names are checked as its manifest names them: :meth:`authorize_names`)."""
        self.policy.check(identity, action, self.prefix)
        if not (action is Action.UPLOAD and name is None):
            self.authorize_names(identity, [name])
        if self.authorizer is not None and not await self.authorizer.authorize(identity, action.value, name):
            raise NotAuthorized(f"the store does not let you {action} here")

    def authorize_names(self, identity: Identity, names: Iterable[str | None]) -> None:
        """NotAuthorized unless ``identity``'s voucher (if it names files) covers each of ``names``."""
        grant = identity.grant
        if grant is None or grant.names is None:
            return
        for name in names:
            if not grant.covers_name(name):
                if name is None:
                    raise NotAuthorized("the voucher covers only the files it names")
                raise NotAuthorized(f"the voucher does not cover {name!r}")

    async def locate(self, identity: Identity, name: str) -> Download:
        """What a download of ``name`` serves (the caller authorized the read): its path, its status
        (a regular file, else FileNotFound) and its catalogue record, from the handler."""
        if self.locator is not None:
            return await self.locator.locate_download(identity, name)
        path = await self.handler.get_download_filename(identity, name)
        st = await asyncio.to_thread(_regular_file_stat, path)
        stored = await self.describer.describe_file(identity, name) if self.describer is not None else None
        return Download(path, st, stored)


def file_etag(st: os.stat_result) -> str:
    """A stored file's strong validator (unquoted): the ETag of its downloads, and what a transfer job
    reading it locally compares to see that it changed. It is aiohttp's FileResponse's."""
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


def _regular_file_stat(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except OSError:
        raise FileNotFound() from None
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFound()
    return st
