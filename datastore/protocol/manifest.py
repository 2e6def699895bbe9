"""Parse and format upload manifests: the AccessGrid INI form and JSON.

A manifest lists the files a client is about to upload, each with a name, a
size and optionally digests. This module turns request bodies into a
:class:`Manifest` and replies into bytes. It is pure: no aiohttp, no disk,
no clock. Every problem raises :class:`ManifestError` (400, naming the
section or field) or :class:`PayloadTooLarge` (413, naming the limit).

The INI form is what Python's ConfigParser writes (AccessGrid 2.x clients)::

    [manifest]
    num_files = 1

    [0]
    name = slides.ppt
    size = 482304
    checksum = 0cc175b9c0f1b6a831c399e269772661

Sections and keys may come in any order and case, with ``=`` or ``:``;
values are taken literally (no interpolation, no inline comments). ``checksum``
is the MD5 in hex; ``md5`` is accepted as its alias and ``sha256`` as well.
The JSON form is ``{"files": [{"name", "size", "md5"?, "sha256"?}]}`` with
``checksum`` again an alias of ``md5``.
"""

from __future__ import annotations

import configparser
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import InvalidName, ManifestError, PayloadTooLarge
from .names import fold_name, validate_name

_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_INT = re.compile(r"^[0-9]+$")
_JSON_FILE_KEYS = frozenset({"name", "size", "md5", "checksum", "sha256"})


@dataclass(frozen=True, slots=True)
class ManifestLimits:
    """The bounds a manifest must respect."""

    max_files: int = 10_000
    max_file_size: int = 1 << 40


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One file a client announced: validated name, size, lower-case hex digests."""

    name: str
    size: int
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    """The files of one transfer, in upload order (file number = index)."""

    files: tuple[ManifestFile, ...]

    @property
    def total_size(self) -> int:
        """Sum of the declared sizes."""
        return sum(f.size for f in self.files)


#: What an INI manifest of N files may hold beyond what N files need: ConfigParser costs about
#: 10 µs a line and more than that once a file has thousands of sections, so the shape of the
#: text is bounded before it is parsed. A file takes 4 to 6 lines ([N], name, size, checksum,
#: a blank line, perhaps sha256); AccessGrid ignored sections it did not know.
INI_LINES_PER_FILE = 8
INI_SPARE_LINES = 64
INI_SPARE_SECTIONS = 8

_NUM_FILES = re.compile(r"^[ \t]*num_files[ \t]*[=:][ \t]*([0-9]{1,9})[ \t]*$", re.MULTILINE | re.IGNORECASE)
_SECTION = re.compile(r"^[ \t]*\[", re.MULTILINE)


def parse_ini(body: bytes, limits: ManifestLimits) -> Manifest:
    """Parse an AccessGrid INI manifest.

    Before ConfigParser sees it, the text may hold at most
    :data:`INI_LINES_PER_FILE` lines per declared file (and
    :data:`INI_SPARE_LINES`) and one section per file (and
    :data:`INI_SPARE_SECTIONS`), counting ``max_files`` where ``num_files``
    cannot be found; beyond that, ManifestError naming the bound.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Python 2 clients wrote names in the platform's 8-bit encoding.
        text = body.decode("latin-1")
    _check_shape(text, limits)
    # default_section is set to something no client can write, so that a
    # "[DEFAULT]" section is not silently inherited into every file.
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00", strict=True)
    try:
        parser.read_string(text, source="manifest")
        count_text = parser.get("manifest", "num_files")
    except configparser.Error as exc:
        raise ManifestError(_one_line(str(exc))) from None
    count = _parse_count(count_text, limits)
    files = []
    for index in range(count):
        section = str(index)
        if not parser.has_section(section):
            raise ManifestError(f"No section: {section!r}")
        values = dict(parser.items(section))
        files.append(_file_from_fields(values, where=f"[{section}]", limits=limits))
    return _checked_manifest(files, lambda i: f"[{i}] name")


def _check_shape(text: str, limits: ManifestLimits) -> None:
    declared = _NUM_FILES.search(text)
    files = min(int(declared[1]) if declared else limits.max_files, limits.max_files)
    lines = text.count("\n") + 1
    most_lines = INI_LINES_PER_FILE * (files + 1) + INI_SPARE_LINES
    if lines > most_lines:
        raise ManifestError(f"{lines} lines; a manifest of {files} file(s) may have at most {most_lines}")
    sections = len(_SECTION.findall(text))
    most_sections = files + 1 + INI_SPARE_SECTIONS
    if sections > most_sections:
        raise ManifestError(f"{sections} sections; a manifest of {files} file(s) may have at most {most_sections}")


def parse_json(body: bytes, limits: ManifestLimits) -> Manifest:
    """Parse a JSON manifest; errors name the offending field."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"invalid JSON: {exc}") from None
    except (RecursionError, ValueError):
        # Nesting deeper than the parser allows, or an integer of thousands of digits.
        raise ManifestError("invalid JSON: nested too deeply or a number too long") from None
    if not isinstance(document, dict):
        raise ManifestError("the manifest must be a JSON object", field="")
    entries = document.get("files")
    if not isinstance(entries, list):
        raise ManifestError("'files' must be a list", field="files")
    if not entries:
        raise ManifestError("the manifest lists no files", field="files")
    if len(entries) > limits.max_files:
        raise PayloadTooLarge(f"{len(entries)} files, more than the limit of {limits.max_files}")
    files = []
    for index, entry in enumerate(entries):
        where = f"files[{index}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{where} must be an object", field=where)
        unknown = sorted(set(entry) - _JSON_FILE_KEYS)
        if unknown:
            raise ManifestError(f"{where} has unknown field {unknown[0]!r}", field=f"{where}.{unknown[0]}")
        size = entry.get("size")
        if isinstance(size, bool) or not isinstance(size, int):
            raise ManifestError(f"{where}.size must be an integer", field=f"{where}.size")
        fields = {k: v for k, v in entry.items() if k != "size"}
        for key, value in fields.items():
            if not isinstance(value, str):
                raise ManifestError(f"{where}.{key} must be a string", field=f"{where}.{key}")
        fields["size"] = str(size)
        files.append(_file_from_fields(fields, where=where, limits=limits, separator="."))
    return _checked_manifest(files, lambda i: f"files[{i}].name")


def single_file(fields: Mapping[str, str], limits: ManifestLimits) -> Manifest:
    """A one-file manifest from string fields (``name``, ``size``, ``md5``/``checksum``, ``sha256``).

    Used for tus creation requests, whose Upload-Metadata names the file.
    """
    return Manifest(files=(_file_from_fields(fields, where="upload", limits=limits, separator=" "),))


def format_ini_accepted(transfer_key: str) -> bytes:
    """The legacy reply for an accepted manifest."""
    return f"return_code: 0\ntransfer_key: {transfer_key}\n".encode()


def format_ini_refused(names: Sequence[str]) -> bytes:
    """The legacy reply for a refused manifest: one ``error_reason`` per file."""
    lines = ["return_code: 1\n"]
    lines.extend(f"error_reason: Upload error for file {_one_line(name)}\n" for name in names)
    return "".join(lines).encode("utf-8", "backslashreplace")


def _parse_count(text: str, limits: ManifestLimits) -> int:
    text = text.strip()
    if not _INT.match(text):
        raise ManifestError(f"[manifest] num_files is not a non-negative integer: {_one_line(text)[:40]!r}")
    count = _bounded_int(text, limits.max_files)
    if count == 0:
        raise ManifestError("[manifest] num_files is 0: the manifest lists no files")
    if count > limits.max_files:
        raise PayloadTooLarge(f"{count} files, more than the limit of {limits.max_files}")
    return count


def _file_from_fields(
    values: Mapping[str, str], *, where: str, limits: ManifestLimits, separator: str = " "
) -> ManifestFile:
    def field(key: str) -> str:
        return f"{where}{separator}{key}"

    if "name" not in values:
        raise ManifestError(f"{field('name')} is missing", field=field("name"))
    try:
        name = validate_name(values["name"])
    except InvalidName as exc:
        raise ManifestError(f"{field('name')}: {exc.detail}", field=field("name")) from None
    size_text = values.get("size")
    if size_text is None:
        raise ManifestError(f"{field('size')} is missing", field=field("size"))
    if not _INT.match(size_text.strip()):
        raise ManifestError(f"{field('size')} is not a non-negative integer", field=field("size"))
    size = _bounded_int(size_text.strip(), limits.max_file_size)
    if size > limits.max_file_size:
        raise PayloadTooLarge(f"{field('size')} is {size} bytes, more than the limit of {limits.max_file_size}")
    md5 = values.get("md5")
    checksum = values.get("checksum")
    if md5 is not None and checksum is not None and md5.strip().lower() != checksum.strip().lower():
        raise ManifestError(f"{field('checksum')} and {field('md5')} differ", field=field("md5"))
    md5 = md5 if md5 is not None else checksum
    if md5 is not None:
        md5 = md5.strip()
        if not _MD5.match(md5):
            raise ManifestError(f"{field('md5')} is not 32 hex digits", field=field("md5"))
        md5 = md5.lower()
    sha256 = values.get("sha256")
    if sha256 is not None:
        sha256 = sha256.strip()
        if not _SHA256.match(sha256):
            raise ManifestError(f"{field('sha256')} is not 64 hex digits", field=field("sha256"))
        sha256 = sha256.lower()
    return ManifestFile(name=name, size=size, md5=md5, sha256=sha256)


def _checked_manifest(files: list[ManifestFile], name_field: Callable[[int], str]) -> Manifest:
    seen: dict[str, int] = {}
    for index, entry in enumerate(files):
        folded = fold_name(entry.name)
        if folded in seen:
            where = name_field(index)
            raise ManifestError(
                f"{where}: {entry.name!r} duplicates file {seen[folded]} of this manifest",
                field=where,
            )
        seen[folded] = index
    return Manifest(files=tuple(files))


def _bounded_int(digits: str, limit: int) -> int:
    """``int(digits)``, or ``limit + 1`` for a number too long to be under ``limit``.

    Python refuses to convert strings of thousands of digits; such a number
    is over any limit anyway.
    """
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(limit)):
        return limit + 1
    return int(digits)


def _one_line(text: str) -> str:
    """Text safe for one line of a reply: every line break becomes a space."""
    return " ".join(text.splitlines())
