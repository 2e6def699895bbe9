"""File names: the traversal and bad-name table, case and Unicode collisions,
good names that must survive a round trip, and download URLs that try to
reach outside the served folder.

Every bad name is tried three ways: ``validate_name`` directly, in a JSON
manifest and in an INI manifest (when ConfigParser can carry it unchanged);
the invisible, look-alike and device names of the Unicode table two ways,
``validate_name`` (whose message must name the code point or device) and a
JSON manifest. After each attempt the whole test directory, apart from the
store's own state directory, must be exactly as it was. Download URLs that try to leave
the served folder go over a raw socket, so no client normalises them first,
and a secret planted just outside the folder must never come back.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
from yarl import URL

from datastore.errors import InvalidName
from datastore.protocol.names import MAX_NAME_BYTES, validate_name

from .conftest import MakeStore
from .harness import Store, ini_manifest, json_manifest, md5_hex, parse_legacy_reply

SECRET = b"planted-secret-7c41e0b9d2"
SQLITE_MAGIC = b"SQLite format 3\x00"
PASSWD_MARK = b"root:x:0:0"

# Bad names that ConfigParser reads back unchanged from ``name = NAME``: each is
# tried in JSON and INI manifests alike.
INI_BAD_NAMES = [
    pytest.param("../x", id="parent-slash"),
    pytest.param("../../x", id="parent-parent"),
    pytest.param("..", id="dotdot"),
    pytest.param(".", id="dot"),
    pytest.param("...", id="three-dots"),
    pytest.param("/etc/passwd", id="absolute"),
    pytest.param("a/b", id="slash"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("..\\..\\x", id="parent-backslash"),
    pytest.param("C:\\x", id="drive-backslash"),
    pytest.param("C:x", id="drive-relative"),
    pytest.param("\\\\server\\share", id="unc"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\rb", id="carriage-return"),
    pytest.param("a\tb", id="tab"),
    pytest.param("a\x1bb", id="escape"),
    pytest.param("a\x7fb", id="delete"),
    pytest.param("a\x85b", id="next-line"),
    pytest.param("", id="empty"),
    pytest.param("a" * 300, id="300-bytes"),
    pytest.param("é" * 128, id="256-bytes-utf8"),
    pytest.param(".datastore", id="state-dir-name"),
    pytest.param(".hidden", id="hidden"),
    pytest.param("con", id="device-con"),
    pytest.param("NUL.txt", id="device-nul-extension"),
    pytest.param("lpt1.log", id="device-lpt1"),
    pytest.param("aux.tar.gz", id="device-aux-two-extensions"),
    pytest.param("COM¹", id="device-com-superscript"),
    pytest.param("a.", id="trailing-dot"),
    pytest.param("invoice\u202efdp.exe", id="right-to-left-override"),
    pytest.param("a\u200bb", id="zero-width-space"),
    pytest.param("\ufeffa", id="byte-order-mark"),
    pytest.param("a\u061cb", id="arabic-letter-mark"),
    pytest.param("a\u2060b", id="word-joiner"),
    pytest.param("a\u2028b", id="line-separator"),
    pytest.param("a\u2029b", id="paragraph-separator"),
    pytest.param("a:b", id="colon"),
    pytest.param("a*b", id="star"),
    pytest.param("a?b", id="question-mark"),
    pytest.param("a|b", id="pipe"),
    pytest.param("<x>", id="angle-brackets"),
    pytest.param('"q"', id="double-quotes"),
]

# Bad names an INI manifest cannot carry: ConfigParser strips surrounding
# whitespace (so " a" arrives as the good name "a"), a newline ends the value,
# and UTF-8 cannot encode a lone surrogate. JSON carries them all.
JSON_ONLY_BAD_NAMES = [
    pytest.param("a\nb", id="newline"),
    pytest.param("a\r\n", id="trailing-crlf"),
    pytest.param("a ", id="trailing-space"),
    pytest.param(" a", id="leading-space"),
    pytest.param("\u3000a", id="leading-ideographic-space"),
    pytest.param("a\u00a0", id="trailing-no-break-space"),
    pytest.param("\ud800", id="lone-surrogate"),
]

ALL_BAD_NAMES = INI_BAD_NAMES + JSON_ONLY_BAD_NAMES

# Names a user may well have, which must upload and download unchanged.
GOOD_NAMES = [
    pytest.param("my file.txt", id="space-inside"),
    pytest.param("two  spaces.txt", id="double-space-inside"),
    pytest.param("résumé.pdf", id="latin-accents"),
    pytest.param("日本語.txt", id="cjk"),
    pytest.param("emoji 📄.txt", id="emoji"),
    pytest.param("a%2Fb", id="literal-percent-2F"),
    pytest.param("%2e%2e", id="literal-percent-dots"),
    pytest.param("100%.txt", id="lone-percent"),
    pytest.param("%(x)s.txt", id="interpolation-syntax"),
    pytest.param("a ;b.txt", id="semicolon-after-space"),
    pytest.param("#hash.txt", id="leading-hash"),
    pytest.param("name with 'quote'", id="single-quotes"),
    pytest.param("a..b.txt", id="double-dot-inside"),
    pytest.param("(1) [copy].txt", id="brackets"),
    pytest.param("{braces}.txt", id="braces"),
    pytest.param("a+b=c&d.txt", id="query-characters"),
    pytest.param("-rf", id="leading-dash"),
    pytest.param("console.log", id="device-prefix-not-device"),
    pytest.param("com10.txt", id="com10-not-device"),
    pytest.param("x" * MAX_NAME_BYTES, id="255-bytes"),
    pytest.param("é" * 127 + "a", id="255-bytes-utf8"),
    # Other scripts, including letters confusables.txt likens to a reserved
    # character (KATAKANA LETTER NO to "/"): only symbols are look-alikes.
    pytest.param("Ελληνικά και русский.txt", id="greek-cyrillic"),
    pytest.param("한국어 문서.txt", id="hangul-syllables"),
    pytest.param("עברית.txt", id="hebrew"),
    pytest.param("العربية.txt", id="arabic"),
    pytest.param("हिन्दी.txt", id="devanagari-virama"),
    pytest.param("ノート.txt", id="katakana-no-not-a-slash"),
    # Emoji of one code point, with a skin-tone modifier, or a flag of two
    # regional indicators. (Emoji joined by ZERO WIDTH JOINER U+200D, tag
    # flags and emoji with VARIATION SELECTOR-16 are refused: UNICODE_BAD_NAMES.)
    pytest.param("👍🏽 ok.txt", id="emoji-skin-tone"),
    pytest.param("🇫🇷 trip.txt", id="emoji-regional-indicator-flag"),
    # Punctuation that is not a look-alike of a reserved character.
    pytest.param("“quoted” \u2039and\u203a «more».txt", id="curly-quotes-and-guillemets"),
    pytest.param("a\u2013b — c.txt", id="dashes"),
    pytest.param("to be continued….txt", id="ellipsis-inside"),
    pytest.param("to be continued…", id="trailing-ellipsis"),
    pytest.param("a\ufe52", id="small-full-stop-trailing"),
    # Names whose NFKC form differs, but breaks no rule: kept as they are.
    pytest.param("½ report.txt", id="vulgar-fraction"),
    pytest.param("ﬁle.txt", id="fi-ligature"),
    pytest.param("x² + y².txt", id="superscripts"),
    pytest.param("\uff21\uff22\uff23.txt", id="fullwidth-letters"),
    pytest.param("ｶﾀｶﾅ.txt", id="halfwidth-katakana"),
    # Close to a device name, but not one.
    pytest.param("CONIN.txt", id="conin-without-dollar"),
    pytest.param("clock.txt", id="clock-without-dollar"),
    pytest.param("con-notes.txt", id="device-then-dash"),
]

# Names refused for an invisible character, a look-alike of a reserved
# character, a dot or device name in the NFKC form, or a device name beyond
# CON..LPT9, each with what the refusal must name (the code point, or the
# device). ZERO WIDTH JOINER U+200D is invisible (a format character), so emoji
# joined by it are refused, as they were before.
UNICODE_BAD_NAMES = [
    # Format characters (Cf).
    pytest.param("a\u00adb", "U+00AD", id="soft-hyphen"),
    pytest.param("a\u200cb", "U+200C", id="zero-width-non-joiner"),
    pytest.param("family \U0001f468\u200d\U0001f469\u200d\U0001f467.txt", "U+200D", id="emoji-zwj-sequence"),
    pytest.param("a\u2066b\u2069", "U+2066", id="left-to-right-isolate"),
    pytest.param("a\u2064b", "U+2064", id="invisible-plus"),
    pytest.param("a\u206ab", "U+206A", id="inhibit-symmetric-swapping"),
    pytest.param("a\u180eb", "U+180E", id="mongolian-vowel-separator"),
    pytest.param("a\ufff9b\ufffbc", "U+FFF9", id="interlinear-annotation"),
    pytest.param("a\U0001d173b", "U+1D173", id="musical-begin-beam"),
    pytest.param("a\U000e0001b", "U+E0001", id="language-tag"),
    pytest.param(
        "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f.txt",
        "U+E0067",
        id="emoji-tag-flag",
    ),
    # Private-use and unassigned code points.
    pytest.param("a\ue000b", "U+E000", id="private-use"),
    pytest.param("a\U000f0000b", "U+F0000", id="supplementary-private-use"),
    pytest.param("a\u0378b", "U+0378", id="unassigned"),
    pytest.param("a\U000e0080b", "U+E0080", id="unassigned-default-ignorable"),
    # Spaces other than U+0020, wherever they stand.
    pytest.param("a\u00a0b", "U+00A0", id="no-break-space-inside"),
    pytest.param("a\u2002b", "U+2002", id="en-space"),
    pytest.param("a\u2003b", "U+2003", id="em-space"),
    pytest.param("a\u202fb", "U+202F", id="narrow-no-break-space"),
    pytest.param("a\u3000b", "U+3000", id="ideographic-space-inside"),
    pytest.param("a\u1680b", "U+1680", id="ogham-space-mark"),
    # Default-ignorable letters and marks that display as nothing.
    pytest.param("a\u034fb", "U+034F", id="combining-grapheme-joiner"),
    pytest.param("\u115f.txt", "U+115F", id="hangul-choseong-filler"),
    pytest.param("a\u1160b", "U+1160", id="hangul-jungseong-filler"),
    pytest.param("\u3164", "U+3164", id="hangul-filler-alone"),
    pytest.param("a\uffa0b", "U+FFA0", id="halfwidth-hangul-filler"),
    pytest.param("a\u17b4b", "U+17B4", id="khmer-vowel-inherent-aq"),
    pytest.param("a\u17b5b", "U+17B5", id="khmer-vowel-inherent-aa"),
    pytest.param("a\u180bb", "U+180B", id="mongolian-free-variation-selector"),
    pytest.param("a\ufe00b", "U+FE00", id="variation-selector-1"),
    pytest.param("\u2764\ufe0f.txt", "U+FE0F", id="emoji-variation-selector-16"),
    pytest.param("a\U000e0100b", "U+E0100", id="variation-selector-17"),
    # Look-alikes that NFKC folds to a reserved character.
    pytest.param("..\uff0fx", "U+FF0F", id="fullwidth-solidus"),
    pytest.param("a\uff3cb", "U+FF3C", id="fullwidth-reverse-solidus"),
    pytest.param("a\ufe68b", "U+FE68", id="small-reverse-solidus"),
    pytest.param("C\uff1ax", "U+FF1A", id="fullwidth-colon"),
    pytest.param("a\ufe55b", "U+FE55", id="small-colon"),
    pytest.param("a\uff0ab", "U+FF0A", id="fullwidth-asterisk"),
    pytest.param("a\uff1fb", "U+FF1F", id="fullwidth-question-mark"),
    pytest.param("\uff02q\uff02", "U+FF02", id="fullwidth-quotation-marks"),
    pytest.param("\uff1cx\uff1e", "U+FF1C", id="fullwidth-angle-brackets"),
    pytest.param("a\uff5cb", "U+FF5C", id="fullwidth-vertical-line"),
    pytest.param("a\u2105b", "U+2105", id="care-of-holds-a-solidus"),
    # Look-alikes that NFKC leaves alone.
    pytest.param("..\u2215x", "U+2215", id="division-slash"),
    pytest.param("1\u20442", "U+2044", id="fraction-slash"),
    pytest.param("a\u29f8b", "U+29F8", id="big-solidus"),
    pytest.param("a\u2216b", "U+2216", id="set-minus"),
    pytest.param("a\u29f5b", "U+29F5", id="reverse-solidus-operator"),
    pytest.param("a\u29f9b", "U+29F9", id="big-reverse-solidus"),
    pytest.param("C\u2236x", "U+2236", id="ratio"),
    pytest.param("C\ua789x", "U+A789", id="modifier-letter-colon"),
    pytest.param("C\u02f8x", "U+02F8", id="modifier-letter-raised-colon"),
    pytest.param("C\u02d0x", "U+02D0", id="modifier-letter-triangular-colon"),
    pytest.param("C\u0589x", "U+0589", id="armenian-full-stop"),
    pytest.param("C\u05c3x", "U+05C3", id="hebrew-sof-pasuq"),
    pytest.param("a\u2217b", "U+2217", id="asterisk-operator"),
    pytest.param("\u02c2x\u02c3", "U+02C2", id="modifier-letter-arrowheads"),
    pytest.param("a\u2223b", "U+2223", id="divides"),
    # The dot rules, for the NFKC form.
    pytest.param("\u2024\u2024", "U+2024", id="one-dot-leaders-as-dotdot"),
    pytest.param("\u2025", "U+2025", id="two-dot-leader"),
    pytest.param("\uff0edatastore", "U+FF0E", id="fullwidth-full-stop-leading"),
    pytest.param("\u2026draft.txt", "U+2026", id="leading-ellipsis"),
    # The device rule, for the NFKC form.
    pytest.param("\uff23\uff2f\uff2e", "CON", id="fullwidth-con"),
    pytest.param("\uff4c\uff50\uff54\uff11.log", "LPT1", id="fullwidth-lpt1"),
    pytest.param("nul\uff0etxt", "NUL", id="device-fullwidth-full-stop"),
    # The remaining Windows device names.
    pytest.param("CONIN$", "CONIN$", id="device-conin"),
    pytest.param("conout$.txt", "CONOUT$", id="device-conout-extension"),
    pytest.param("Clock$", "CLOCK$", id="device-clock-mixed-case"),
    pytest.param("clock$.tar.gz", "CLOCK$", id="device-clock-two-extensions"),
    pytest.param("CON .txt", "CON", id="device-space-before-extension"),
    pytest.param("nul   .tar.gz", "NUL", id="device-spaces-before-extensions"),
    pytest.param("com1  .log", "COM1", id="device-com1-spaces"),
    pytest.param("LPT\u00b2 .txt", "LPT2", id="device-lpt-superscript-space"),
]

# One refusal of each kind, word for word: the rule, then the code point.
REFUSAL_MESSAGES = [
    pytest.param("a/b", "name contains the reserved character '/' (U+002F SOLIDUS)", id="reserved"),
    pytest.param("a\x1bb", "name contains the control character U+001B", id="control"),
    pytest.param("a\u200bb", "name contains the invisible format character U+200B ZERO WIDTH SPACE", id="format"),
    pytest.param("a\ue000b", "name contains the private-use character U+E000", id="private-use"),
    pytest.param("a\u0378b", "name contains the unassigned code point U+0378", id="unassigned"),
    pytest.param("a\u2028b", "name contains the line separator U+2028 LINE SEPARATOR", id="line-separator"),
    pytest.param("a\u00a0b", "name contains U+00A0 NO-BREAK SPACE, a space other than U+0020", id="space"),
    pytest.param(
        "\u3164", "name contains the invisible (default-ignorable) character U+3164 HANGUL FILLER", id="ignorable"
    ),
    pytest.param(
        "a\uff0fb",
        "name contains U+FF0F FULLWIDTH SOLIDUS, a look-alike of the reserved character '/'",
        id="look-alike-folded",
    ),
    pytest.param(
        "a\u2215b",
        "name contains U+2215 DIVISION SLASH, a look-alike of the reserved character '/'",
        id="look-alike",
    ),
    pytest.param(
        "\u2024\u2024",
        "name starts with a dot once U+2024 ONE DOT LEADER is read in its compatibility form (NFKC)",
        id="nfkc-dot",
    ),
    pytest.param(
        "\uff23\uff2f\uff2e",
        "name is the Windows device name CON once U+FF23 FULLWIDTH LATIN CAPITAL LETTER C"
        " is read in its compatibility form (NFKC)",
        id="nfkc-device",
    ),
    pytest.param("CON .txt", "name is the Windows device name CON", id="device"),
]


# -- helpers ------------------------------------------------------------------


def snapshot(top: Path, *, exclude: Path) -> dict[str, tuple[str, str]]:
    """Every entry under ``top`` (not following links) with its kind and content digest."""
    tree: dict[str, tuple[str, str]] = {}

    def walk(directory: Path) -> None:
        for entry in os.scandir(directory):
            path = Path(entry.path)
            if path == exclude:
                continue
            relative = os.fsdecode(path.relative_to(top))
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                tree[relative] = ("link", os.readlink(path))
            elif stat.S_ISDIR(mode):
                tree[relative] = ("dir", "")
                walk(path)
            else:
                tree[relative] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())

    walk(top)
    return tree


def plant_secret_where_name_leads(folder: Path, name: str, *, within: Path) -> None:
    """Write SECRET where ``name`` would land if naively joined to ``folder`` (when that is under ``within``)."""
    target = Path(os.path.normpath(os.path.join(folder, name)))
    try:
        if target.is_relative_to(within) and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(SECRET)
    except (OSError, UnicodeError, ValueError):
        pass  # the name cannot exist on this filesystem at all


def quoted(name: str) -> str:
    """A name percent-encoded as one URL path segment (lone surrogates as their raw bytes)."""
    return quote(name.encode("utf-8", "surrogatepass"), safe="")


def ini_body(name: str, content: bytes = b"x") -> bytes:
    """An INI manifest for one file; a name UTF-8 cannot encode keeps its raw code points."""
    return ini_manifest([(name, content)]).decode().encode("utf-8", "surrogatepass")


async def raw_get(store: Store, target: str, *, method: str = "GET") -> tuple[int, bytes]:
    """Send ``METHOD target`` on a fresh socket, exactly as written; return the status and every byte read."""
    reader, writer = await asyncio.open_connection(store.client.host, store.client.port)
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: {store.client.host}:{store.client.port}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read(-1)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line = raw.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    assert len(parts) >= 2 and parts[0].startswith(b"HTTP/1."), f"not an HTTP response: {raw[:200]!r}"
    return int(parts[1]), raw


def assert_nothing_leaked(raw: bytes) -> None:
    assert SECRET not in raw
    assert SQLITE_MAGIC not in raw
    assert PASSWD_MARK not in raw


async def upload(store: Store, name: str, data: bytes) -> None:
    key = await store.register([(name, data)])
    assert await store.put(key, 0, data) == (200, "File transfer OK")


async def upload_ini(store: Store, name: str, data: bytes) -> None:
    """Upload the way an AccessGrid 2.x client does: INI manifest, then a raw POST."""
    response = await store.client.post(f"/{store.prefix}/manifest", data=ini_manifest([(name, data)]))
    reply = parse_legacy_reply(await response.text())
    assert response.status == 200 and reply["return_code"] == ["0"], reply
    key = reply["transfer_key"][0]
    posted = await store.client.post(
        f"/{store.prefix}/{key}/0", data=data, headers={"Content-Type": "application/octet-stream"}
    )
    assert posted.status == 200, await posted.text()


async def download(store: Store, name: str) -> Any:
    """GET the download URL of ``name``, percent-encoded and sent as is."""
    return await store.client.get(URL(f"/{store.prefix}/{quoted(name)}", encoded=True))


# -- validate_name --------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_BAD_NAMES)
def test_validate_name_refuses_bad_name(name: str) -> None:
    with pytest.raises(InvalidName) as caught:
        validate_name(name)
    assert caught.value.status == 400


@pytest.mark.parametrize(("name", "culprit"), UNICODE_BAD_NAMES)
def test_validate_name_refuses_invisible_look_alike_and_device_names_naming_the_culprit(
    name: str, culprit: str
) -> None:
    with pytest.raises(InvalidName) as caught:
        validate_name(name)
    assert caught.value.status == 400
    assert culprit in (caught.value.detail or "")


@pytest.mark.parametrize(("name", "message"), REFUSAL_MESSAGES)
def test_refusal_names_the_rule_and_the_code_point(name: str, message: str) -> None:
    with pytest.raises(InvalidName) as caught:
        validate_name(name)
    assert caught.value.detail == message


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_validate_name_accepts_good_name_unchanged(name: str) -> None:
    assert validate_name(name) == name


def test_validate_name_returns_nfc_form() -> None:
    decomposed = unicodedata.normalize("NFD", "résumé.pdf")
    assert decomposed != "résumé.pdf"
    assert validate_name(decomposed) == "résumé.pdf"


def test_length_limit_counts_the_nfc_form() -> None:
    # 255 bytes once composed, 382 bytes as sent by a client that writes NFD (macOS).
    composed = "é" * 127 + "a"
    decomposed = unicodedata.normalize("NFD", composed)
    assert len(decomposed.encode()) > MAX_NAME_BYTES
    assert validate_name(decomposed) == composed


@pytest.mark.parametrize("value", [None, 7, b"bytes.txt", ["a"]], ids=["none", "int", "bytes", "list"])
def test_validate_name_refuses_non_strings(value: object) -> None:
    with pytest.raises(InvalidName):
        validate_name(value)


# -- bad names in manifests ---------------------------------------------------


@pytest.mark.parametrize("name", ALL_BAD_NAMES)
async def test_json_manifest_with_bad_name_is_400_naming_the_field(
    make_store: MakeStore, tmp_path: Path, name: str
) -> None:
    store = await make_store()
    before = snapshot(tmp_path, exclude=store.state_dir)

    response = await store.client.post("/files/manifest", json=json_manifest([(name, b"x")]))

    body = await response.json()
    assert response.status == 400, body
    assert body["error"] == "bad_manifest"
    assert body["field"] == "files[0].name"
    assert snapshot(tmp_path, exclude=store.state_dir) == before


@pytest.mark.parametrize(("name", "culprit"), UNICODE_BAD_NAMES)
async def test_json_manifest_with_invisible_look_alike_or_device_name_is_400_naming_the_field(
    make_store: MakeStore, tmp_path: Path, name: str, culprit: str
) -> None:
    store = await make_store()
    before = snapshot(tmp_path, exclude=store.state_dir)

    response = await store.client.post("/files/manifest", json=json_manifest([(name, b"x")]))

    body = await response.json()
    assert response.status == 400, body
    assert body["error"] == "bad_manifest"
    assert body["field"] == "files[0].name"
    assert culprit in body["message"]
    assert snapshot(tmp_path, exclude=store.state_dir) == before


@pytest.mark.parametrize("name", INI_BAD_NAMES)
async def test_ini_manifest_with_bad_name_is_400_configparser_error(
    make_store: MakeStore, tmp_path: Path, name: str
) -> None:
    store = await make_store()
    before = snapshot(tmp_path, exclude=store.state_dir)

    response = await store.client.post("/files/manifest", data=ini_body(name))

    text = await response.text()
    assert response.status == 400, text
    assert text.startswith("ConfigParser error: ")
    assert (response.reason or "").startswith("ConfigParser error")
    # One line: the attacker's text never adds lines to the reply.
    assert text.endswith("\n") and text.count("\n") == 1 and "\r" not in text
    assert snapshot(tmp_path, exclude=store.state_dir) == before


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param(["name = evil", " ../x"], id="continuation-slash"),
        pytest.param(["name = evil", "\t.datastore"], id="continuation-tab"),
        pytest.param(["name = ", " ../x"], id="empty-then-continuation"),
    ],
)
async def test_ini_name_spread_over_continuation_lines_is_refused(
    make_store: MakeStore, tmp_path: Path, lines: list[str]
) -> None:
    # ConfigParser joins indented lines into a multi-line value: the name holds a newline.
    store = await make_store()
    before = snapshot(tmp_path, exclude=store.state_dir)
    body = "\n".join(["[manifest]", "num_files = 1", "", "[0]", *lines, "size = 1", ""]).encode()

    response = await store.client.post("/files/manifest", data=body)

    text = await response.text()
    assert response.status == 400, text
    assert text.startswith("ConfigParser error: ") and text.count("\n") == 1
    assert snapshot(tmp_path, exclude=store.state_dir) == before


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("../x", id="parent"),
        pytest.param("a/b", id="slash"),
        pytest.param("con", id="device"),
    ],
)
async def test_bad_name_after_a_good_one_reserves_nothing(make_store: MakeStore, tmp_path: Path, bad: str) -> None:
    store = await make_store()
    before = snapshot(tmp_path, exclude=store.state_dir)

    response = await store.client.post("/files/manifest", json=json_manifest([("good.txt", b"g"), (bad, b"b")]))

    body = await response.json()
    assert response.status == 400, body
    assert body["field"] == "files[1].name"
    assert snapshot(tmp_path, exclude=store.state_dir) == before
    # good.txt was not left pending: it can be registered and uploaded now.
    await upload(store, "good.txt", b"g")


@pytest.mark.parametrize("name", [p for p in ALL_BAD_NAMES if p.values != ("",)])
async def test_bad_name_is_never_served_even_when_a_file_sits_where_it_points(
    make_store: MakeStore, tmp_path: Path, name: str
) -> None:
    store = await make_store()
    served = store.root / store.prefix
    served.mkdir(parents=True, exist_ok=True)
    plant_secret_where_name_leads(served, name, within=tmp_path)
    (store.root / "secret.txt").write_bytes(SECRET)

    status, raw = await raw_get(store, f"/files/{quoted(name)}")

    assert status in (400, 404), raw[:300]
    assert_nothing_leaked(raw)


# -- names that differ only by case or normal form ----------------------------

CASE_PAIRS = [
    pytest.param("Report.pdf", "report.pdf", id="ascii"),
    pytest.param("été.txt", "ÉTÉ.TXT", id="accented"),
    pytest.param("Σίσυφος.txt", "ΣΊΣΥΦΟΣ.txt", id="greek-final-sigma"),
]


@pytest.mark.parametrize(("first", "second"), CASE_PAIRS)
async def test_name_differing_only_by_case_from_a_published_file_is_refused(
    make_store: MakeStore, first: str, second: str
) -> None:
    store = await make_store()
    await upload(store, first, b"the original")

    as_json = await store.client.post("/files/manifest", json=json_manifest([(second, b"an impostor")]))
    body = await as_json.json()
    assert as_json.status == 403, body
    assert [f["name"] for f in body["files"]] == [second]

    as_ini = await store.client.post("/files/manifest", data=ini_manifest([(second, b"an impostor")]))
    assert as_ini.status == 200
    assert parse_legacy_reply(await as_ini.text()) == {
        "return_code": ["1"],
        "error_reason": [f"Upload error for file {second}"],
    }

    assert store.served_files() == [first]
    original = await download(store, first)
    assert original.status == 200 and await original.read() == b"the original"
    assert (await download(store, second)).status == 404


@pytest.mark.parametrize(("first", "second"), CASE_PAIRS)
async def test_name_differing_only_by_case_from_a_pending_upload_is_refused(
    make_store: MakeStore, first: str, second: str
) -> None:
    store = await make_store()
    key = await store.register([(first, b"the original")])

    as_json = await store.client.post("/files/manifest", json=json_manifest([(second, b"an impostor")]))
    assert as_json.status == 403, await as_json.text()
    as_ini = await store.client.post("/files/manifest", data=ini_manifest([(second, b"an impostor")]))
    assert parse_legacy_reply(await as_ini.text())["return_code"] == ["1"]

    # The pending upload is unharmed and completes.
    assert await store.put(key, 0, b"the original") == (200, "File transfer OK")
    assert store.served_files() == [first]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("Report.pdf", "report.pdf", id="case"),
        pytest.param("same.txt", "same.txt", id="identical"),
        pytest.param("résumé.pdf", unicodedata.normalize("NFD", "résumé.pdf"), id="nfc-and-nfd"),
        pytest.param("été.txt", unicodedata.normalize("NFD", "ÉTÉ.txt"), id="case-and-nfd"),
    ],
)
async def test_one_manifest_naming_a_file_twice_is_400_and_reserves_nothing(
    make_store: MakeStore, tmp_path: Path, first: str, second: str
) -> None:
    store = await make_store()
    before = snapshot(tmp_path, exclude=store.state_dir)
    files = [(first, b"one"), (second, b"two")]

    as_json = await store.client.post("/files/manifest", json=json_manifest(files))
    body = await as_json.json()
    assert as_json.status == 400, body
    assert body["field"] == "files[1].name"

    as_ini = await store.client.post("/files/manifest", data=ini_manifest(files))
    text = await as_ini.text()
    assert as_ini.status == 400, text
    assert text.startswith("ConfigParser error: ")

    assert snapshot(tmp_path, exclude=store.state_dir) == before
    # Neither name was left pending.
    await upload(store, first, b"one")


@pytest.mark.parametrize("protocol", ["json", "ini"])
async def test_nfd_name_is_stored_under_its_nfc_form(make_store: MakeStore, tmp_path: Path, protocol: str) -> None:
    store = await make_store()
    composed = "résumé.pdf"
    decomposed = unicodedata.normalize("NFD", composed)
    content = b"curriculum vitae"

    if protocol == "json":
        response = await store.client.post("/files/manifest", json=json_manifest([(decomposed, content)]))
        body = await response.json()
        assert response.status == 201, body
        assert body["files"][0]["name"] == composed
        assert await store.put(body["transfer_key"], 0, content) == (200, "File transfer OK")
    else:
        await upload_ini(store, decomposed, content)

    assert store.served_files() == [composed]
    assert os.listdir(os.fsencode(store.root / store.prefix)) == [composed.encode()]
    listing = await (await store.client.get("/files/", headers={"Accept": "application/json"})).json()
    assert [f["name"] for f in listing["files"]] == [composed]
    for spelling in (composed, decomposed):
        response = await download(store, spelling)
        assert response.status == 200, spelling
        assert await response.read() == content
    # The other spelling of the same name is the same name: it is taken.
    again = await store.client.post("/files/manifest", json=json_manifest([(composed, b"other")]))
    assert again.status == 403


# -- good names round-trip ----------------------------------------------------


@pytest.mark.parametrize("protocol", ["json", "ini"])
@pytest.mark.parametrize("name", GOOD_NAMES)
async def test_good_name_uploads_and_downloads_unchanged(
    make_store: MakeStore, tmp_path: Path, name: str, protocol: str
) -> None:
    store = await make_store()
    content = f"the file called {name}\n".encode()
    before = snapshot(tmp_path, exclude=store.state_dir)

    if protocol == "json":
        await upload(store, name, content)
    else:
        await upload_ini(store, name, content)

    # Exactly one new entry, at the name, inside the served folder.
    after = snapshot(tmp_path, exclude=store.state_dir)
    added = {path: entry for path, entry in after.items() if before.get(path) != entry}
    assert added == {
        **({"root/files": ("dir", "")} if "root/files" not in before else {}),
        f"root/files/{name}": ("file", hashlib.sha256(content).hexdigest()),
    }
    assert set(before) <= set(after)

    response = await download(store, name)
    assert response.status == 200
    assert await response.read() == content
    disposition = response.headers["Content-Disposition"]
    assert disposition.startswith("attachment;")
    assert unquote(disposition.split("filename*=UTF-8''", 1)[1]) == name
    listing = await (await store.client.get("/files/", headers={"Accept": "application/json"})).json()
    assert [(f["name"], f["md5"]) for f in listing["files"]] == [(name, md5_hex(content))]


# -- download URLs that try to leave the served folder ------------------------

TRAVERSAL_TARGETS = [
    pytest.param("/files/..%2F..%2Fetc%2Fpasswd", id="encoded-slashes-to-passwd"),
    pytest.param("/files/%2e%2e", id="encoded-dotdot"),
    pytest.param("/files/..%5Cx", id="encoded-backslash"),
    pytest.param("/files/.datastore", id="state-dir"),
    pytest.param("/files/%00", id="encoded-nul"),
    pytest.param("/../../etc/passwd", id="above-root-to-passwd"),
    pytest.param("/files/../files/x", id="out-and-back-in"),
    pytest.param("/files/..", id="dotdot"),
    pytest.param("/files/..%2Fsecret.txt", id="encoded-slash-to-secret"),
    pytest.param("/files/%2e%2e%2fsecret.txt", id="all-encoded-to-secret"),
    pytest.param("/files/%2E%2E%2Fsecret.txt", id="upper-encoded-to-secret"),
    pytest.param("/files/..%5Csecret.txt", id="encoded-backslash-to-secret"),
    pytest.param("/files/%5C..%5Csecret.txt", id="leading-backslash-to-secret"),
    pytest.param("/files/./../secret.txt", id="dot-dotdot-to-secret"),
    pytest.param("/secret.txt", id="secret-as-prefix"),
    pytest.param("/files/%2F..%2Fsecret.txt", id="encoded-absolute-to-secret"),
    pytest.param("/files/%2Fetc%2Fpasswd", id="encoded-absolute-passwd"),
    pytest.param("/files//etc/passwd", id="double-slash-passwd"),
    pytest.param("/files/C:%5Csecret.txt", id="drive-to-secret"),
    pytest.param("/files/..%252Fsecret.txt", id="double-encoded-slash"),
    pytest.param("/files/%252e%252e%252fsecret.txt", id="double-encoded-all"),
    pytest.param("/files/..%c0%afsecret.txt", id="overlong-utf8-slash"),
    pytest.param("/files/..%ef%bc%8fsecret.txt", id="fullwidth-slash"),
    pytest.param("/files/secret.txt%00.pdf", id="nul-truncation"),
    pytest.param("/files/.datastore%2Ftransfers.sqlite3", id="state-db"),
    pytest.param("/files/..%2F.datastore%2Fcatalogue%2Ffiles.sqlite3", id="catalogue"),
    pytest.param("/.datastore/transfers.sqlite3", id="state-as-prefix"),
    pytest.param("/files/..%2Foutside.txt%3F", id="encoded-query"),
    pytest.param("/files/%2e%2e%2f%2e%2e%2foutside.txt", id="two-levels-to-outside"),
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("target", TRAVERSAL_TARGETS)
async def test_download_url_never_reaches_outside_the_served_folder(
    make_store: MakeStore, tmp_path: Path, target: str, method: str
) -> None:
    root = tmp_path / "root"
    # The default layout: the state directory (transfer state, catalogue) inside ROOT.
    store = await make_store(state_dir=root / ".datastore")
    await upload(store, "public.txt", b"public")
    (root / "secret.txt").write_bytes(SECRET)
    (root / "x").write_bytes(SECRET)
    (tmp_path / "outside.txt").write_bytes(SECRET)
    (tmp_path / "outside.txt?").write_bytes(SECRET)
    before = snapshot(tmp_path, exclude=store.state_dir)

    status, raw = await raw_get(store, target, method=method)

    assert status in (400, 404), raw[:300]
    assert_nothing_leaked(raw)
    assert snapshot(tmp_path, exclude=store.state_dir) == before


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/files/../secret.txt", id="dotdot-segment"),
        pytest.param("/files/%2e%2e/secret.txt", id="encoded-dotdot-segment"),
        pytest.param("/files/..;/secret.txt", id="semicolon-segment"),
        pytest.param("http://localhost/files/../secret.txt", id="absolute-form"),
        pytest.param("/files/%2e%2e/%2e%2e", id="two-encoded-segments"),
    ],
)
async def test_two_segment_download_url_is_refused_without_leaking(
    make_store: MakeStore, tmp_path: Path, target: str
) -> None:
    # These keep three segments after decoding, the shape of an upload URL.
    store = await make_store(state_dir=tmp_path / "root" / ".datastore")
    (store.root / "secret.txt").write_bytes(SECRET)

    status, raw = await raw_get(store, target)

    assert 400 <= status < 500, raw[:300]
    assert_nothing_leaked(raw)


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/files/..%2F..%2Fx/0", id="key-with-encoded-slashes"),
        pytest.param("/files/%2e%2e/0", id="key-dotdot"),
        pytest.param("/files/..%5Cx/0", id="key-with-backslash"),
        pytest.param("/files/key/..%2F..%2Fx", id="number-with-slashes"),
    ],
)
async def test_upload_url_with_traversal_writes_nothing(make_store: MakeStore, tmp_path: Path, target: str) -> None:
    store = await make_store()
    before = snapshot(tmp_path, exclude=store.state_dir)
    reader, writer = await asyncio.open_connection(store.client.host, store.client.port)
    try:
        writer.write(
            f"PUT {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(SECRET)}\r\n"
            f"Connection: close\r\n\r\n".encode()
            + SECRET
        )
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read(-1)
    finally:
        writer.close()
        await writer.wait_closed()

    assert raw.startswith(b"HTTP/1.1 404 "), raw[:300]
    assert snapshot(tmp_path, exclude=store.state_dir) == before
    assert store.staged_files() == []


# -- symlinks -----------------------------------------------------------------


async def test_symlink_dropped_into_the_folder_by_hand_is_not_served(make_store: MakeStore, tmp_path: Path) -> None:
    store = await make_store()
    await upload(store, "public.txt", b"public")
    (store.root / "secret.txt").write_bytes(SECRET)
    served = store.root / store.prefix
    (served / "link.txt").symlink_to(store.root / "secret.txt")
    (served / "relative.txt").symlink_to(Path("..") / "secret.txt")
    (served / "dropped.txt").write_bytes(SECRET)

    for name in ("link.txt", "relative.txt", "dropped.txt"):
        status, raw = await raw_get(store, f"/files/{name}")
        assert status == 404, (name, raw[:300])
        assert_nothing_leaked(raw)
    listing = await (await store.client.get("/files/", headers={"Accept": "application/json"})).json()
    assert [f["name"] for f in listing["files"]] == ["public.txt"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_published_file_replaced_by_a_symlink_outside_is_not_served(
    make_store: MakeStore, tmp_path: Path, method: str
) -> None:
    # The catalogue lists victim.txt, but on disk it now leads out of the folder.
    store = await make_store()
    await upload(store, "victim.txt", b"victim")
    (tmp_path / "outside.txt").write_bytes(SECRET)
    victim = store.root / store.prefix / "victim.txt"
    victim.unlink()
    victim.symlink_to(tmp_path / "outside.txt")

    status, raw = await raw_get(store, "/files/victim.txt", method=method)

    assert status == 404, raw[:300]
    assert_nothing_leaked(raw)


async def test_published_file_replaced_by_a_symlink_to_a_sibling_is_not_served(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "a.txt", b"a")
    served = store.root / store.prefix
    (served / "unlisted.txt").write_bytes(SECRET)
    (served / "a.txt").unlink()
    (served / "a.txt").symlink_to("unlisted.txt")

    status, raw = await raw_get(store, "/files/a.txt")

    assert status == 404, raw[:300]
    assert_nothing_leaked(raw)


async def test_symlink_planted_at_a_name_before_the_manifest_refuses_the_name(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store = await make_store()
    served = store.root / store.prefix
    served.mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(SECRET)
    (served / "trap.txt").symlink_to(outside)
    (served / "dangling.txt").symlink_to(tmp_path / "not-yet.txt")
    before = snapshot(tmp_path, exclude=store.state_dir)

    for name in ("trap.txt", "dangling.txt"):
        response = await store.client.post("/files/manifest", json=json_manifest([(name, b"overwrite")]))
        assert response.status == 403, (name, await response.text())

    assert snapshot(tmp_path, exclude=store.state_dir) == before
    assert outside.read_bytes() == SECRET


@pytest.mark.parametrize("dangling", [False, True], ids=["existing-target", "dangling"])
async def test_symlink_planted_between_manifest_and_upload_is_not_followed(
    make_store: MakeStore, tmp_path: Path, dangling: bool
) -> None:
    store = await make_store()
    content = b"the uploaded bytes"
    key = await store.register([("trap.txt", content)])
    served = store.root / store.prefix
    served.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "outside.txt"
    if not dangling:
        outside.write_bytes(SECRET)
    (served / "trap.txt").symlink_to(outside)

    status, reason = await store.put(key, 0, content)

    assert 400 <= status < 500, (status, reason)
    if dangling:
        assert not outside.exists()
    else:
        assert outside.read_bytes() == SECRET
    assert os.readlink(served / "trap.txt") == str(outside)
    assert store.staged_files() == []
    status, raw = await raw_get(store, "/files/trap.txt")
    assert status == 404
    assert_nothing_leaked(raw)
