"""datastore.protocol.manifest on its own: parsing INI and JSON manifests and formatting
the legacy replies, byte for byte.

No server: these call the pure functions with the bodies clients send and
check what a client would see come back (the parsed files, or the 400/413
error and the field it names).
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest

from datastore.errors import ManifestError, PayloadTooLarge
from datastore.protocol.manifest import (
    Manifest,
    ManifestFile,
    ManifestLimits,
    format_ini_accepted,
    format_ini_refused,
    parse_ini,
    parse_json,
)

LIMITS = ManifestLimits(max_files=5, max_file_size=1000)

MD5 = "0cc175b9c0f1b6a831c399e269772661"  # md5(b"a")
SHA256 = "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"  # sha256(b"a")


def ini(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def one_file_ini(*file_lines: str, count: str = "1") -> bytes:
    return ini("[manifest]", f"num_files = {count}", "", "[0]", *file_lines)


def json_body(document: Any) -> bytes:
    return json.dumps(document).encode()


def one_file_json(**entry: Any) -> bytes:
    return json_body({"files": [entry]})


# -- INI: what parses ---------------------------------------------------------


def test_ini_as_configparser_writes_it() -> None:
    body = ini(
        "[manifest]",
        "num_files = 2",
        "",
        "[0]",
        "name = slides.ppt",
        "size = 482304",
        f"checksum = {MD5}",
        "",
        "[1]",
        "name = notes.txt",
        "size = 43",
        "checksum = 9e107d9d372bb6826bd81d3542a419d6",
        "",
    )
    manifest = parse_ini(body, ManifestLimits())
    assert manifest == Manifest(
        files=(
            ManifestFile("slides.ppt", 482304, MD5),
            ManifestFile("notes.txt", 43, "9e107d9d372bb6826bd81d3542a419d6"),
        )
    )
    assert manifest.total_size == 482347


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            ini("[1]", "size = 2", "name = b.txt", "[0]", "name = a.txt", "size = 1", "[manifest]", "num_files = 2"),
            id="sections-reversed",
        ),
        pytest.param(
            ini("[0]", "size: 1", "name: a.txt", "[manifest]", "num_files: 2", "[1]", "name:b.txt", "size:2"),
            id="colon-delimiters",
        ),
        pytest.param(
            ini("[manifest]", "NUM_FILES = 2", "[0]", "NAME = a.txt", "Size = 1", "[1]", "Name=b.txt", "SIZE=2"),
            id="key-case",
        ),
        pytest.param(
            ini(
                "# written by hand",
                "; another comment",
                "[manifest]",
                "  num_files   =   2  ",
                "",
                "",
                "[0]",
                "name=a.txt",
                "size    = 1",
                "[1]",
                "name =   b.txt   ",
                "size= 2",
            ),
            id="comments-and-spacing",
        ),
        pytest.param(
            b"[manifest]\r\nnum_files = 2\r\n\r\n"
            b"[0]\r\nname = a.txt\r\nsize = 1\r\n[1]\r\nname = b.txt\r\nsize = 2\r\n",
            id="crlf-line-ends",
        ),
    ],
)
def test_ini_sections_and_keys_in_any_order_and_spelling(body: bytes) -> None:
    manifest = parse_ini(body, LIMITS)
    assert [(f.name, f.size) for f in manifest.files] == [("a.txt", 1), ("b.txt", 2)]


@pytest.mark.parametrize(
    ("lines", "md5"),
    [
        pytest.param([f"checksum = {MD5}"], MD5, id="checksum"),
        pytest.param([f"md5 = {MD5}"], MD5, id="md5-alias"),
        pytest.param([f"checksum = {MD5}", f"md5 = {MD5}"], MD5, id="both-agree"),
        pytest.param([f"checksum = {MD5.upper()}", f"md5 = {MD5}"], MD5, id="both-agree-up-to-case"),
        pytest.param([f"CHECKSUM = {MD5.upper()}"], MD5, id="upper-case-hex-lowered"),
        pytest.param([], None, id="no-digest"),
    ],
)
def test_ini_checksum_and_its_md5_alias(lines: list[str], md5: str | None) -> None:
    manifest = parse_ini(one_file_ini("name = a", "size = 1", *lines), LIMITS)
    assert manifest.files[0].md5 == md5


def test_ini_checksum_and_md5_that_disagree_are_refused() -> None:
    body = one_file_ini("name = a", "size = 1", f"checksum = {MD5}", "md5 = 9e107d9d372bb6826bd81d3542a419d6")
    with pytest.raises(ManifestError) as caught:
        parse_ini(body, LIMITS)
    assert caught.value.field == "[0] md5"


@pytest.mark.parametrize("spelling", [SHA256, SHA256.upper()], ids=["lower", "upper"])
def test_ini_sha256_is_kept_in_lower_case(spelling: str) -> None:
    manifest = parse_ini(one_file_ini("name = a", "size = 1", f"sha256 = {spelling}"), LIMITS)
    assert manifest.files[0].sha256 == SHA256
    assert manifest.files[0].md5 is None


@pytest.mark.parametrize(
    ("line", "field"),
    [
        pytest.param("checksum = 0cc175b9c0f1b6a831c399e26977266", "[0] md5", id="md5-31-digits"),
        pytest.param("checksum = 0cc175b9c0f1b6a831c399e2697726611", "[0] md5", id="md5-33-digits"),
        pytest.param("md5 = 0cc175b9c0f1b6a831c399e26977266g", "[0] md5", id="md5-not-hex"),
        pytest.param("checksum =", "[0] md5", id="md5-empty"),
        pytest.param(f"sha256 = {SHA256[:-1]}", "[0] sha256", id="sha256-63-digits"),
        pytest.param(f"sha256 = {MD5}", "[0] sha256", id="sha256-given-an-md5"),
    ],
)
def test_ini_malformed_digest_is_refused_naming_it(line: str, field: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_ini(one_file_ini("name = a", "size = 1", line), LIMITS)
    assert caught.value.field == field
    assert caught.value.status == 400


def test_ini_default_section_does_not_leak_into_files() -> None:
    body = ini(
        "[DEFAULT]",
        "name = ../../etc/passwd",
        f"checksum = {MD5}",
        "size = 1",
        "[manifest]",
        "num_files = 1",
        "[0]",
        "name = a.txt",
        "size = 1",
    )
    manifest = parse_ini(body, LIMITS)
    assert manifest.files == (ManifestFile("a.txt", 1),)


def test_ini_default_section_cannot_supply_a_missing_name() -> None:
    body = ini("[DEFAULT]", "name = shared.txt", "[manifest]", "num_files = 1", "[0]", "size = 1")
    with pytest.raises(ManifestError) as caught:
        parse_ini(body, LIMITS)
    assert caught.value.field == "[0] name"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("%(x)s.txt", id="interpolation-syntax"),
        pytest.param("%(name)s", id="self-reference"),
        pytest.param("${x}.txt", id="extended-interpolation-syntax"),
        pytest.param("100%.txt", id="lone-percent"),
        pytest.param("a ;b", id="semicolon-after-space"),
        pytest.param("a #b", id="hash-after-space"),
        pytest.param("#a", id="leading-hash"),
        pytest.param("a=b", id="equals-inside"),
        pytest.param("[0]", id="section-syntax"),
    ],
)
def test_ini_name_is_taken_literally(name: str) -> None:
    manifest = parse_ini(one_file_ini(f"name = {name}", "size = 1"), LIMITS)
    assert manifest.files[0].name == name


def test_ini_latin1_body_is_decoded() -> None:
    # Python 2 clients wrote names in the platform's 8-bit encoding.
    body = b"[manifest]\nnum_files = 1\n[0]\nname = r\xe9sum\xe9.pdf\nsize = 1\n"
    assert parse_ini(body, LIMITS).files[0].name == "résumé.pdf"


def test_ini_utf8_body_is_decoded() -> None:
    body = "[manifest]\nnum_files = 1\n[0]\nname = 日本語.txt\nsize = 1\n".encode()
    assert parse_ini(body, LIMITS).files[0].name == "日本語.txt"


def test_ini_utf8_byte_order_mark_is_ignored() -> None:
    # Windows tools (Notepad, PowerShell 5's Out-File) start UTF-8 files with a BOM.
    body = "\ufeff[manifest]\nnum_files = 1\n[0]\nname = a.txt\nsize = 1\n".encode()
    assert parse_ini(body, LIMITS).files[0].name == "a.txt"


def test_ini_nfd_name_becomes_nfc() -> None:
    body = one_file_ini(f"name = {unicodedata.normalize('NFD', 'résumé.pdf')}", "size = 1")
    assert parse_ini(body, LIMITS).files[0].name == "résumé.pdf"


def test_ini_extra_sections_and_keys_are_ignored() -> None:
    body = ini(
        "[manifest]",
        "num_files = 1",
        "comment = sent by hand",
        "[0]",
        "name = a.txt",
        "size = 1",
        "description = the first file",
        "[1]",
        "name = ../not-announced",
        "size = 5",
        "[client]",
        "version = 2.4",
    )
    assert parse_ini(body, LIMITS).files == (ManifestFile("a.txt", 1),)


@pytest.mark.parametrize(
    ("text", "value"),
    [pytest.param("0", 0, id="zero"), pytest.param("007", 7, id="leading-zeros"), pytest.param("1000", 1000, id="max")],
)
def test_ini_sizes_accepted(text: str, value: int) -> None:
    assert parse_ini(one_file_ini("name = a", f"size = {text}"), LIMITS).files[0].size == value


def test_ini_files_up_to_the_limit_are_accepted() -> None:
    lines = ["[manifest]", "num_files = 5"]
    for index in range(5):
        lines += [f"[{index}]", f"name = f{index}", "size = 1"]
    assert [f.name for f in parse_ini(ini(*lines), LIMITS).files] == ["f0", "f1", "f2", "f3", "f4"]


# -- INI: what is refused -----------------------------------------------------


@pytest.mark.parametrize(
    "count",
    [
        pytest.param("0", id="zero"),
        pytest.param("-1", id="negative"),
        pytest.param("abc", id="not-a-number"),
        pytest.param("1.0", id="decimal"),
        pytest.param("1e2", id="exponent"),
        pytest.param("", id="empty"),
        pytest.param("٣", id="arabic-indic-digit"),
        pytest.param("0x1", id="hex"),
    ],
)
def test_ini_bad_num_files_is_400(count: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_ini(one_file_ini("name = a", "size = 1", count=count), LIMITS)
    assert caught.value.status == 400
    assert caught.value.message.startswith("ConfigParser error: ")


@pytest.mark.parametrize(
    "count",
    [
        pytest.param("6", id="one-over"),
        pytest.param("1000000000", id="billion"),
        pytest.param("9" * 5000, id="5000-digits"),
    ],
)
def test_ini_num_files_over_the_limit_is_413(count: str) -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        parse_ini(one_file_ini("name = a", "size = 1", count=count), LIMITS)
    assert caught.value.status == 413


@pytest.mark.parametrize(
    "size",
    [
        pytest.param("1001", id="one-over"),
        pytest.param("99999999999999999999999", id="huge"),
        pytest.param("1" + "0" * 5000, id="5000-digits"),
    ],
)
def test_ini_size_over_the_limit_is_413(size: str) -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        parse_ini(one_file_ini("name = a", f"size = {size}"), LIMITS)
    assert caught.value.status == 413


@pytest.mark.parametrize(
    "size",
    [
        pytest.param("-1", id="negative"),
        pytest.param("abc", id="not-a-number"),
        pytest.param("1.5", id="decimal"),
        pytest.param("1e3", id="exponent"),
        pytest.param("", id="empty"),
        pytest.param("١٢", id="arabic-indic-digits"),
        pytest.param("1_000", id="underscore"),
        pytest.param("None", id="none"),
    ],
)
def test_ini_bad_size_is_400_naming_the_field(size: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_ini(one_file_ini("name = a", f"size = {size}"), LIMITS)
    assert caught.value.field == "[0] size"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(ini("[0]", "name = a", "size = 1"), None, id="no-manifest-section"),
        pytest.param(ini("[manifest]", "[0]", "name = a", "size = 1"), None, id="no-num-files"),
        pytest.param(
            ini("[manifest]", "num_files = 2", "[0]", "name = a", "size = 1"), None, id="missing-file-section"
        ),
        pytest.param(one_file_ini("size = 1"), "[0] name", id="missing-name"),
        pytest.param(one_file_ini("name = a"), "[0] size", id="missing-size"),
        pytest.param(one_file_ini("name = ../a", "size = 1"), "[0] name", id="traversal-name"),
        pytest.param(b"", None, id="empty-body"),
        pytest.param(b"name = a\nsize = 1\n", None, id="no-section-header"),
        pytest.param(ini("[manifest", "num_files = 1"), None, id="unclosed-section"),
        pytest.param(one_file_ini("name = a", "size = 1", "just some words"), None, id="line-without-delimiter"),
    ],
)
def test_ini_incomplete_or_malformed_manifest_is_400(body: bytes, field: str | None) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_ini(body, LIMITS)
    assert caught.value.status == 400
    assert caught.value.field == field
    assert caught.value.message.startswith("ConfigParser error: ")
    assert "\n" not in caught.value.message and "\r" not in caught.value.message


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            ini("[manifest]", "num_files = 1", "[0]", "name = a", "size = 1", "[0]", "name = b", "size = 1"),
            id="duplicate-section",
        ),
        pytest.param(
            ini("[manifest]", "num_files = 1", "num_files = 2", "[0]", "name = a", "size = 1"),
            id="duplicate-key",
        ),
        pytest.param(one_file_ini("name = a", "size = 1", "name = ../b"), id="duplicate-name-key"),
        pytest.param(one_file_ini("name = a", "size = 1", "NAME = b"), id="duplicate-key-by-case"),
    ],
)
def test_ini_duplicates_are_refused_not_silently_resolved(body: bytes) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_ini(body, LIMITS)
    assert caught.value.message.startswith("ConfigParser error: ")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("Report.pdf", "report.pdf", id="case"),
        pytest.param("a.txt", "a.txt", id="identical"),
        pytest.param("résumé.pdf", unicodedata.normalize("NFD", "RÉSUMÉ.pdf"), id="case-and-nfd"),
    ],
)
def test_ini_same_file_twice_is_refused_naming_the_second(first: str, second: str) -> None:
    body = ini(
        "[manifest]", "num_files = 2", "[0]", f"name = {first}", "size = 1", "[1]", f"name = {second}", "size = 1"
    )
    with pytest.raises(ManifestError) as caught:
        parse_ini(body, LIMITS)
    assert caught.value.field == "[1] name"


def test_ini_parser_error_message_is_one_line_even_with_the_attackers_line() -> None:
    body = b"[manifest]\nnum_files = 1\r\nHTTP/1.1 200 OK\r\nX-Evil: 1\n[0]\nname = a\nsize = 1\n"
    with pytest.raises(ManifestError) as caught:
        parse_ini(body, LIMITS)
    message = caught.value.message
    assert message.startswith("ConfigParser error: ")
    assert "\n" not in message and "\r" not in message


# -- JSON ---------------------------------------------------------------------


def test_json_manifest_parses() -> None:
    body = json_body(
        {
            "files": [
                {"name": "a.txt", "size": 1, "md5": MD5.upper(), "sha256": SHA256.upper()},
                {"name": "b.txt", "size": 0},
                {"name": "c.txt", "size": 1, "checksum": MD5},
            ]
        }
    )
    assert parse_json(body, LIMITS) == Manifest(
        files=(
            ManifestFile("a.txt", 1, MD5, SHA256),
            ManifestFile("b.txt", 0),
            ManifestFile("c.txt", 1, MD5),
        )
    )


def test_json_nfd_name_becomes_nfc() -> None:
    body = one_file_json(name=unicodedata.normalize("NFD", "résumé.pdf"), size=1)
    assert parse_json(body, LIMITS).files[0].name == "résumé.pdf"


def test_json_utf8_byte_order_mark_is_accepted() -> None:
    body = b"\xef\xbb\xbf" + one_file_json(name="a.txt", size=1)
    assert parse_json(body, LIMITS).files[0].name == "a.txt"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(json_body([]), "", id="array"),
        pytest.param(json_body("files"), "", id="string"),
        pytest.param(json_body(1), "", id="number"),
        pytest.param(json_body(None), "", id="null"),
        pytest.param(json_body({}), "files", id="no-files"),
        pytest.param(json_body({"files": {"name": "a", "size": 1}}), "files", id="files-an-object"),
        pytest.param(json_body({"files": "a.txt"}), "files", id="files-a-string"),
        pytest.param(json_body({"files": None}), "files", id="files-null"),
        pytest.param(json_body({"files": []}), "files", id="files-empty"),
        pytest.param(json_body({"files": ["a.txt"]}), "files[0]", id="entry-a-string"),
        pytest.param(json_body({"files": [{"name": "a", "size": 1}, []]}), "files[1]", id="second-entry-a-list"),
        pytest.param(one_file_json(name="a", size=1, path="/tmp/a"), "files[0].path", id="unknown-field"),
        pytest.param(one_file_json(name="a", size=1, Name="b"), "files[0].Name", id="field-name-case"),
        pytest.param(one_file_json(size=1), "files[0].name", id="name-missing"),
        pytest.param(one_file_json(name=7, size=1), "files[0].name", id="name-a-number"),
        pytest.param(one_file_json(name=None, size=1), "files[0].name", id="name-null"),
        pytest.param(one_file_json(name="../a", size=1), "files[0].name", id="name-traversal"),
        pytest.param(one_file_json(name="a"), "files[0].size", id="size-missing"),
        pytest.param(one_file_json(name="a", size="5"), "files[0].size", id="size-a-string"),
        pytest.param(one_file_json(name="a", size=True), "files[0].size", id="size-true"),
        pytest.param(one_file_json(name="a", size=False), "files[0].size", id="size-false"),
        pytest.param(one_file_json(name="a", size=-1), "files[0].size", id="size-negative"),
        pytest.param(one_file_json(name="a", size=1.0), "files[0].size", id="size-a-float"),
        pytest.param(one_file_json(name="a", size=None), "files[0].size", id="size-null"),
        pytest.param(one_file_json(name="a", size=1, md5=MD5[:-1]), "files[0].md5", id="md5-31-digits"),
        pytest.param(one_file_json(name="a", size=1, md5=MD5 + "0"), "files[0].md5", id="md5-33-digits"),
        pytest.param(one_file_json(name="a", size=1, md5="z" * 32), "files[0].md5", id="md5-not-hex"),
        pytest.param(one_file_json(name="a", size=1, md5=None), "files[0].md5", id="md5-null"),
        pytest.param(one_file_json(name="a", size=1, checksum=SHA256), "files[0].md5", id="checksum-given-a-sha256"),
        pytest.param(one_file_json(name="a", size=1, md5=MD5, checksum="f" * 32), "files[0].md5", id="md5-vs-checksum"),
        pytest.param(one_file_json(name="a", size=1, sha256=MD5), "files[0].sha256", id="sha256-given-an-md5"),
        pytest.param(one_file_json(name="a", size=1, sha256=123), "files[0].sha256", id="sha256-a-number"),
        pytest.param(
            json_body({"files": [{"name": "Report.pdf", "size": 1}, {"name": "report.pdf", "size": 1}]}),
            "files[1].name",
            id="duplicate-by-case",
        ),
        pytest.param(
            json_body(
                {
                    "files": [
                        {"name": "résumé.pdf", "size": 1},
                        {"name": unicodedata.normalize("NFD", "résumé.pdf"), "size": 1},
                    ]
                }
            ),
            "files[1].name",
            id="duplicate-by-normal-form",
        ),
        pytest.param(
            json_body({"files": [{"name": "a", "size": 1}, {"name": "b", "size": "2"}]}),
            "files[1].size",
            id="second-file-bad-size",
        ),
    ],
)
def test_json_malformed_manifest_is_400_naming_the_field(body: bytes, field: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_json(body, LIMITS)
    assert caught.value.status == 400
    assert caught.value.field == field


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"[manifest]\nnum_files = 1\n", id="ini-sent-as-json"),
        pytest.param(b'{"files": [{"name": "\xff", "size": 1}]}', id="invalid-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested"),
        pytest.param(b'{"files": [{"name": "a", "size": 1' + b"0" * 5000 + b"}]}", id="5000-digit-size"),
    ],
)
def test_json_that_does_not_parse_is_refused_cleanly(body: bytes) -> None:
    with pytest.raises((ManifestError, PayloadTooLarge)) as caught:
        parse_json(body, LIMITS)
    assert caught.value.status in (400, 413)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(one_file_json(name="a", size=1001), id="size-one-over"),
        pytest.param(one_file_json(name="a", size=2**70), id="size-huge"),
        pytest.param(json_body({"files": [{"name": f"f{i}", "size": 1} for i in range(6)]}), id="too-many-files"),
    ],
)
def test_json_over_a_limit_is_413(body: bytes) -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        parse_json(body, LIMITS)
    assert caught.value.status == 413


def test_json_size_at_the_limit_is_accepted() -> None:
    assert parse_json(one_file_json(name="a", size=1000), LIMITS).files[0].size == 1000


# -- replies ------------------------------------------------------------------


def test_accepted_reply_bytes() -> None:
    assert format_ini_accepted("0123abcd") == b"return_code: 0\ntransfer_key: 0123abcd\n"


@pytest.mark.parametrize(
    ("names", "reply"),
    [
        pytest.param(["a.txt"], b"return_code: 1\nerror_reason: Upload error for file a.txt\n", id="one"),
        pytest.param(
            ["a.txt", "b c.txt"],
            b"return_code: 1\nerror_reason: Upload error for file a.txt\nerror_reason: Upload error for file b c.txt\n",
            id="two",
        ),
        pytest.param(
            ["résumé.pdf"],
            "return_code: 1\nerror_reason: Upload error for file résumé.pdf\n".encode(),
            id="utf8",
        ),
        pytest.param(
            ["two  spaces.txt"],
            b"return_code: 1\nerror_reason: Upload error for file two  spaces.txt\n",
            id="inner-spaces-kept",
        ),
    ],
)
def test_refused_reply_bytes(names: list[str], reply: bytes) -> None:
    assert format_ini_refused(names) == reply


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("evil\nreturn_code: 0\ntransfer_key: stolen", id="newline"),
        pytest.param("evil\r\nreturn_code: 0", id="crlf"),
        pytest.param("evil\rreturn_code: 0", id="carriage-return"),
        pytest.param("evil\x0breturn_code: 0", id="vertical-tab"),
        pytest.param("evil\x0creturn_code: 0", id="form-feed"),
        pytest.param("evil\x1ereturn_code: 0", id="record-separator"),
        pytest.param("evil\x85return_code: 0", id="next-line"),
        pytest.param("evil\u2028return_code: 0", id="line-separator"),
        pytest.param("evil\u2029return_code: 0", id="paragraph-separator"),
        pytest.param("\n", id="only-a-newline"),
    ],
)
def test_refused_reply_name_cannot_add_lines(name: str) -> None:
    reply = format_ini_refused(["ok.txt", name])
    text = reply.decode("utf-8")
    # However a client splits lines, it sees exactly three: the code and two reasons.
    for lines in (reply.split(b"\n"), text.splitlines(keepends=True)):
        assert len([line for line in lines if line]) == 3, lines
    assert b"\r" not in reply
    lines = text.splitlines()
    assert lines[0] == "return_code: 1"
    assert lines[1] == "error_reason: Upload error for file ok.txt"
    assert lines[2].startswith("error_reason: Upload error for file ")
    assert not any(line.startswith(("return_code: 0", "transfer_key")) for line in lines)


def test_refused_reply_with_an_unencodable_name_is_still_bytes_on_one_line() -> None:
    reply = format_ini_refused(["bad\udcffname"])
    assert reply == b"return_code: 1\nerror_reason: Upload error for file bad\\udcffname\n"
