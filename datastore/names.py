"""File-name validation and containment: the only way a client-supplied name
reaches the filesystem.

Names in a store are flat: one path segment, portable to every filesystem
a store may be copied to. ``validate_name`` enforces that (and normalises to
Unicode NFC, so two names that look the same are the same); ``fold_name``
gives the key under which names collide on case-insensitive filesystems;
``contained_path`` joins a validated name to a directory and proves, after
resolving links, that the result is still a direct child of it.

Pure apart from ``contained_path``, which resolves symlinks and so reads the
filesystem (call it from a worker thread).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from .errors import InvalidName

#: Longest name accepted, in UTF-8 bytes (the common filesystem limit).
MAX_NAME_BYTES = 255

# Characters that are separators or reserved on some filesystem a store may
# be copied to (Windows forbids all of these in file names).
_FORBIDDEN_CHARS = frozenset('/\\:*?"<>|')

# Device names Windows reserves with any extension ("CON", "nul.txt", "COM1.log").
_WINDOWS_DEVICE = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9¹²³]|LPT[0-9¹²³])(\..*)?$", re.IGNORECASE)

# Bidirectional overrides and isolates make a name display differently from
# what it is ("gpj.exe" shown as "exe.jpg"); zero-width characters hide in it.
_INVISIBLE = frozenset(
    "\u061c\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\ufeff"
)

# Control (Cc), surrogate (Cs) and line or paragraph separator (Zl, Zp)
# characters: each breaks a line somewhere or cannot be stored.
_CONTROL_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def validate_name(name: object) -> str:
    """Return ``name`` in NFC form if it is an acceptable flat file name.

    Raises :class:`InvalidName` (400) saying which rule the name breaks:
    empty, too long, a path separator or reserved character, a control or
    invisible character, a leading dot (hidden and reserved names such as
    ``.datastore``), ``.``/``..``, leading or trailing whitespace, a trailing
    dot, or a Windows device name.
    """
    if not isinstance(name, str):
        raise InvalidName("name must be a string")
    if name == "":
        raise InvalidName("name is empty")
    name = unicodedata.normalize("NFC", name)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidName(f"name is longer than {MAX_NAME_BYTES} bytes")
    for char in name:
        if char in _FORBIDDEN_CHARS:
            raise InvalidName(f"name contains the reserved character {char!r}")
        category = unicodedata.category(char)
        if category in _CONTROL_CATEGORIES or char in _INVISIBLE:
            raise InvalidName(f"name contains the control character U+{ord(char):04X}")
    if name.startswith("."):
        raise InvalidName("name starts with a dot")
    if name != name.strip():
        raise InvalidName("name starts or ends with whitespace")
    if name.endswith("."):
        raise InvalidName("name ends with a dot")
    if _WINDOWS_DEVICE.match(name):
        raise InvalidName("name is a reserved device name")
    return name


def fold_name(name: str) -> str:
    """The key under which two names collide on a case-insensitive filesystem."""
    return unicodedata.normalize("NFC", name.casefold())


def contained_path(directory: Path, name: str) -> Path:
    """Join a validated ``name`` to ``directory`` and prove containment.

    The directory is resolved first; the joined path is resolved too (so a
    symlink planted at the name cannot lead elsewhere) and must be a direct
    child of the resolved directory. Raises :class:`InvalidName` otherwise.
    Touches the filesystem: run it in a worker thread.
    """
    name = validate_name(name)
    base = directory.resolve()
    candidate = (base / name).resolve()
    if candidate.parent != base or candidate.name != name:
        raise InvalidName("name resolves outside the store")
    return candidate
