"""Published files' digests computed after publishing, off the requests' path.

An upload verifies inline only the digests its client declared (``staging.py``); the others are
computed here once the file is published, by threads that yield the CPU to everything else (their
nice value is the lowest priority) and read large blocks. A file is digested only if it is still
the one the caller expects: the bytes read are its size, and the name still leads to the file read
(not replaced, not changed) once they are all read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: How much one read takes, into one buffer reused: large enough for hashlib to release the GIL
#: and for few system calls, small enough to add little to the memory of many uploads at once.
_BLOCK = 1 << 20


def digest_pool(threads: int) -> ThreadPoolExecutor:
    """The threads that digest published files: ``threads`` of them, of the lowest priority."""
    return ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="digest", initializer=_low_priority)


def _low_priority() -> None:
    """Let every thread of normal priority go first (on Linux a thread's nice value is its own)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def digest_file(path: Path, size: int, *, md5: bool, sha256: bool) -> tuple[str | None, str | None] | None:
    """The MD5 and SHA-256 (those asked for, lower-case hex; ``None`` for the others) of the file at
    ``path``, if it holds ``size`` bytes and the name still leads to it, unchanged, once they are
    read; ``None`` if it does not (gone, replaced, truncated or written meanwhile)."""
    hashes = (hashlib.md5(usedforsecurity=False) if md5 else None, hashlib.sha256() if sha256 else None)
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as handle:
            before = os.fstat(handle.fileno())
            if before.st_size != size:
                return None
            read = 0
            while count := handle.readinto(buffer):
                read += count
                for digest in hashes:
                    if digest is not None:
                        digest.update(view[:count])
            after = os.stat(path)
    except FileNotFoundError:
        return None
    if read != size or _version(before) != _version(after):
        return None
    md5_hex, sha256_hex = (digest.hexdigest() if digest is not None else None for digest in hashes)
    return md5_hex, sha256_hex


def _version(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
