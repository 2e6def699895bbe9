"""File-name validation and containment: the only way a client-supplied name
reaches the filesystem.

Names in a store are flat: one path segment, portable to every filesystem
a store may be copied to, and shown to people as what it is. ``validate_name``
enforces that (and normalises to Unicode NFC, so two names that look the same
are the same): it refuses the reserved characters ``/\\:*?"<>|`` and their
look-alikes, characters that are invisible or break lines, names that are
hidden, end in a dot or space, or are Windows device names, including once
compatibility characters are folded (NFKC, which reads a fullwidth ``CON`` as ``CON``).
``fold_name`` gives the key under which names collide on case-insensitive
filesystems; ``contained_path`` joins a validated name to a directory and
proves, after resolving links, that the result is still a direct child of it.

Character classes come from the ``unicodedata`` of the running Python (Unicode
14.0 for Python 3.11), so a code point assigned in a later Unicode is refused
as unassigned until the server runs on a Python that knows it.

Pure apart from ``contained_path``, which resolves symlinks and so reads the
filesystem (call it from a worker thread).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path

from ..errors import InvalidName

#: Longest name accepted, in UTF-8 bytes (the common filesystem limit).
MAX_NAME_BYTES = 255

# Characters that are separators or reserved on some filesystem a store may
# be copied to (Windows forbids all of these in file names).
_FORBIDDEN_CHARS = frozenset('/\\:*?"<>|')

# Look-alikes of the reserved characters that NFKC leaves as they are (those it
# folds, such as U+FF0F FULLWIDTH SOLIDUS or U+FE68 SMALL REVERSE SOLIDUS, are
# refused by folding each character). All are in Unicode's confusables.txt
# (UTS #39) as confusable with the reserved character, and all are symbols or
# modifiers drawn like it, with no use in a file name but to pass for it.
# confusables.txt maps more, deliberately not refused here: letters and marks
# of living scripts (KATAKANA LETTER NO and CJK U+4E3F as "/", the Devanagari
# and Gujarati visarga as ":", the glottal stop letters as "?", Canadian
# syllabics as "<" ">") and everyday punctuation (curly quotes and primes as
# '"', single guillemets as "<" ">"): refusing those would refuse real words.
_LOOK_ALIKES: dict[str, str] = {
    "\u2044": "/",  # FRACTION SLASH
    "\u2215": "/",  # DIVISION SLASH
    "\u29f8": "/",  # BIG SOLIDUS
    "\u2216": "\\",  # SET MINUS
    "\u29f5": "\\",  # REVERSE SOLIDUS OPERATOR
    "\u29f9": "\\",  # BIG REVERSE SOLIDUS
    "\u02d0": ":",  # MODIFIER LETTER TRIANGULAR COLON
    "\u02f8": ":",  # MODIFIER LETTER RAISED COLON
    "\u0589": ":",  # ARMENIAN FULL STOP
    "\u05c3": ":",  # HEBREW PUNCTUATION SOF PASUQ
    "\u2236": ":",  # RATIO
    "\ua789": ":",  # MODIFIER LETTER COLON
    "\u2217": "*",  # ASTERISK OPERATOR
    "\u02c2": "<",  # MODIFIER LETTER LEFT ARROWHEAD
    "\u02c3": ">",  # MODIFIER LETTER RIGHT ARROWHEAD
    "\u2223": "|",  # DIVIDES
}

# General categories refused wherever they occur, each with the words that name
# the rule ("{}" is the code point): controls, format characters (zero-width
# characters, the bidirectional controls that make "gpj.exe" display as
# "exe.jpg", the soft hyphen, tags...), surrogates, private-use and unassigned
# code points (no one can tell what they show), line and paragraph separators,
# and every space but U+0020.
_REFUSED_CATEGORIES = {
    "Cc": "the control character {}",
    "Cf": "the invisible format character {}",
    "Cs": "the surrogate {}",
    "Co": "the private-use character {}",
    "Cn": "the unassigned code point {}",
    "Zl": "the line separator {}",
    "Zp": "the paragraph separator {}",
    "Zs": "{}, a space other than U+0020",
}

# Default_Ignorable_Code_Point, as Unicode's DerivedCoreProperties.txt lists it
# (Unicode 14.0; 4,174 code points): characters a renderer shows as nothing
# when it has no glyph for them, so they hide in a name. Most are format (Cf)
# or unassigned (Cn) and refused as such; the others are letters and marks
# that display as blank: COMBINING GRAPHEME JOINER, the Hangul fillers, the
# Khmer inherent vowels, the Mongolian free variation selectors and the
# variation selectors. The whole list is kept, so that a later Unicode that
# assigns one of its reserved code points (they stay ignorable) changes nothing.
_DEFAULT_IGNORABLE_RANGES = (
    (0x00AD, 0x00AD),  # SOFT HYPHEN (Cf)
    (0x034F, 0x034F),  # COMBINING GRAPHEME JOINER (Mn)
    (0x061C, 0x061C),  # ARABIC LETTER MARK (Cf)
    (0x115F, 0x1160),  # HANGUL CHOSEONG FILLER, HANGUL JUNGSEONG FILLER (Lo)
    (0x17B4, 0x17B5),  # KHMER VOWEL INHERENT AQ, AA (Mn)
    (0x180B, 0x180F),  # MONGOLIAN FREE VARIATION SELECTORS (Mn), VOWEL SEPARATOR (Cf)
    (0x200B, 0x200F),  # ZERO WIDTH SPACE .. RIGHT-TO-LEFT MARK (Cf)
    (0x202A, 0x202E),  # LEFT-TO-RIGHT EMBEDDING .. RIGHT-TO-LEFT OVERRIDE (Cf)
    (0x2060, 0x206F),  # WORD JOINER .. NOMINAL DIGIT SHAPES (Cf; U+2065 Cn)
    (0x3164, 0x3164),  # HANGUL FILLER (Lo)
    (0xFE00, 0xFE0F),  # VARIATION SELECTOR-1 .. 16 (Mn)
    (0xFEFF, 0xFEFF),  # ZERO WIDTH NO-BREAK SPACE, the byte order mark (Cf)
    (0xFFA0, 0xFFA0),  # HALFWIDTH HANGUL FILLER (Lo)
    (0xFFF0, 0xFFF8),  # reserved (Cn)
    (0x1BCA0, 0x1BCA3),  # SHORTHAND FORMAT LETTER OVERLAP .. UP STEP (Cf)
    (0x1D173, 0x1D17A),  # MUSICAL SYMBOL BEGIN BEAM .. END PHRASE (Cf)
    (0xE0000, 0xE0FFF),  # tags (Cf), VARIATION SELECTOR-17 .. 256 (Mn), reserved (Cn)
)
_DEFAULT_IGNORABLE = frozenset(chr(cp) for low, high in _DEFAULT_IGNORABLE_RANGES for cp in range(low, high + 1))

# Device names Windows reserves with any extension, also when spaces stand
# before it ("CON", "nul.txt", "COM1.log", "CON .txt", "CONIN$").
_WINDOWS_DEVICE = re.compile(
    r"(CON|PRN|AUX|NUL|COM[0-9¹²³]|LPT[0-9¹²³]|CONIN\$|CONOUT\$|CLOCK\$) *(?:\..*)?",
    re.IGNORECASE | re.DOTALL,
)


def validate_name(name: object) -> str:
    """Return ``name`` in NFC form if it is an acceptable flat file name.

    Raises :class:`InvalidName` (400) saying which rule the name breaks, and
    for a character rule which code point (``U+XXXX``): empty, too long, a
    reserved character ``/\\:*?"<>|`` or a look-alike of one, a control,
    format, surrogate, private-use or unassigned code point, a line or
    paragraph separator, a space other than U+0020, another default-ignorable
    code point, a leading dot (hidden and reserved names such as
    ``.datastore``; ``.`` and ``..``), a leading or trailing space, a trailing
    dot, or a Windows device name. The leading-dot and device rules hold for
    the NFKC form too, which is only checked, never stored.
    """
    if not isinstance(name, str):
        raise InvalidName("name must be a string")
    return _validated(name)


@functools.lru_cache(maxsize=4096)
def _validated(name: str) -> str:
    """:func:`validate_name` of a string; the names found valid lately are remembered (a job of 1,000
    files checks each name several times), a refusal is not."""
    if name == "":
        raise InvalidName("name is empty")
    name = unicodedata.normalize("NFC", name)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidName(f"name is longer than {MAX_NAME_BYTES} bytes")
    for char in name:
        _check_character(char)
    if name != name.strip():
        raise InvalidName("name starts or ends with a space (U+0020)")
    broken = _broken_dot_or_device_rule(name)
    if broken is not None:
        raise InvalidName(broken[0])
    # In the compatibility form only what makes a name look hidden, like ".." or like a device:
    # a trailing "…" is no dot to any filesystem ("to be continued…" is a fine name).
    broken = _broken_dot_or_device_rule(unicodedata.normalize("NFKC", name), trailing=False)
    if broken is not None:
        rule, at_end = broken
        # The name keeps the rule, so a character folded by NFKC broke it:
        # the first or last one, by which end of the name the rule looks at.
        folded = next(char for char in (name[::-1] if at_end else name) if unicodedata.normalize("NFKC", char) != char)
        raise InvalidName(f"{rule} once {_code_point(folded)} is read in its compatibility form (NFKC)")
    return name


def _check_character(char: str) -> None:
    """Raise :class:`InvalidName` if ``char`` may not stand anywhere in a name."""
    if char in _FORBIDDEN_CHARS:
        raise InvalidName(f"name contains the reserved character {char!r} ({_code_point(char)})")
    rule = _REFUSED_CATEGORIES.get(unicodedata.category(char))
    if rule is not None and char != " ":
        raise InvalidName("name contains " + rule.format(_code_point(char)))
    if char in _DEFAULT_IGNORABLE:
        raise InvalidName(f"name contains the invisible (default-ignorable) character {_code_point(char)}")
    reserved = _LOOK_ALIKES.get(char) or next(
        (folded for folded in unicodedata.normalize("NFKC", char) if folded in _FORBIDDEN_CHARS), None
    )
    if reserved is not None:
        raise InvalidName(f"name contains {_code_point(char)}, a look-alike of the reserved character {reserved!r}")


def _broken_dot_or_device_rule(name: str, *, trailing: bool = True) -> tuple[str, bool] | None:
    """The dot or device rule ``name`` breaks, if any, and whether at its end (else at its start).

    ``trailing=False`` leaves out the trailing-dot rule (which exists because Windows drops real trailing dots).
    """
    if name.startswith("."):
        return "name starts with a dot", False
    if trailing and name.endswith("."):
        return "name ends with a dot", True
    device = _WINDOWS_DEVICE.fullmatch(name)
    if device:
        # Named in ASCII (COM¹ as COM1), as the reason phrase carries only ASCII.
        return f"name is the Windows device name {unicodedata.normalize('NFKC', device.group(1)).upper()}", False
    return None


def _code_point(char: str) -> str:
    """``U+XXXX`` and the character's Unicode name, when it has one."""
    label = unicodedata.name(char, "")
    return f"U+{ord(char):04X} {label}" if label else f"U+{ord(char):04X}"


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
    candidate = base / name
    # Only the last part can still be a link (the rest is resolved): resolving the joined path
    # again, part by part, would tell nothing more.
    if candidate.is_symlink():
        candidate = candidate.resolve()
    if candidate.parent != base or candidate.name != name:
        raise InvalidName("name resolves outside the store")
    return candidate
