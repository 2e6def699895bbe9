"""``datastore serve`` as a user runs it: a real process, real sockets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from datastore.config import Settings, SettingsError, load_settings

from .harness import ini_manifest, parse_legacy_reply, spawn_serve


class Served:
    def __init__(self, process: asyncio.subprocess.Process, urls: dict[str, str]) -> None:
        self.process = process
        self.urls = urls


async def start_cli(*args: str, prefixes: int = 1) -> Served:
    process, lines = await spawn_serve(*args, stderr=asyncio.subprocess.PIPE, urls=prefixes)
    return Served(process, {match["prefix"]: match["url"] for match in lines})


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    folders = ("--root", str(tmp_path / "data"), "--prefix", "venue-1", "--prefix", "files")
    running = await start_cli(*folders, "--node-id", "venue-a.1", prefixes=2)
    yield running
    if running.process.returncode is None:
        running.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await running.process.wait()


async def test_serve_prints_one_url_per_prefix_and_stores_files(served: Served, tmp_path: Path) -> None:
    assert set(served.urls) == {"venue-1", "files"}
    content = b"payload " * 4096
    async with aiohttp.ClientSession() as session:
        url = served.urls["venue-1"]
        async with session.post(url + "manifest", data=ini_manifest([("a.bin", content)])) as response:
            reply = parse_legacy_reply(await response.text())
        key = reply["transfer_key"][0]
        async with session.put(f"{url}{key}/0", data=content) as response:
            assert response.status == 200
        async with session.get(url + "a.bin") as response:
            assert await response.read() == content
        async with session.get(url.rsplit("/", 2)[0] + "/_api/v1/health") as response:
            assert response.status == 200
            health = await response.json()
        assert (health["node"], health["state"]) == ("venue-a.1", "sqlite")
    stored = await asyncio.to_thread((tmp_path / "data" / "venue-1" / "a.bin").read_bytes)
    assert stored == content


async def test_serve_stops_cleanly_on_sigterm(served: Served) -> None:
    served.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        assert await served.process.wait() == 0


async def test_serve_logs_one_line_per_request(served: Served) -> None:
    async with aiohttp.ClientSession() as session, session.get(served.urls["files"] + "nothing-here") as response:
        assert response.status == 404
    served.process.send_signal(signal.SIGTERM)
    assert served.process.stderr is not None
    async with asyncio.timeout(30):
        log = (await served.process.stderr.read()).decode()
    access = [line for line in log.splitlines() if "GET /files/nothing-here" in line]
    assert len(access) == 1
    assert " 404 " in access[0]


async def test_a_request_that_cannot_be_parsed_is_one_log_line_not_a_traceback(served: Served) -> None:
    url = served.urls["files"]
    host, port = url.split("/")[2].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /files/ HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(30):
        answer = await reader.read()
    writer.close()
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    served.process.send_signal(signal.SIGTERM)
    assert served.process.stderr is not None
    async with asyncio.timeout(30):
        log = (await served.process.stderr.read()).decode()
    assert "Traceback" not in log
    assert " ERROR " not in log
    malformed = [line for line in log.splitlines() if "malformed request from 127.0.0.1: 400 " in line]
    assert len(malformed) == 1, log
    assert " INFO datastore.http: " in malformed[0]


async def test_state_dir_defaults_under_the_root_and_is_not_servable(served: Served, tmp_path: Path) -> None:
    assert await asyncio.to_thread((tmp_path / "data" / ".datastore" / "transfers.sqlite3").exists)
    async with aiohttp.ClientSession() as session:
        base = served.urls["files"].rsplit("/", 2)[0]
        paths = ("/.datastore/transfers.sqlite3", "/files/.datastore", "/files/..%2F.datastore%2Ftransfers.sqlite3")
        for path in paths:
            async with session.get(base + path) as response:
                assert response.status in (400, 404), path
                assert b"SQLite" not in await response.read()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "datastore", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param(["serve", "--prefix", "_api"], None, "invalid prefix '_api'", id="reserved-prefix"),
        pytest.param(["serve", "--prefix", "a/b"], None, "invalid prefix 'a/b'", id="slash-in-prefix"),
        pytest.param(["serve", "--port", "70000"], None, "port must be between", id="port-out-of-range"),
        pytest.param(["serve"], {"DATASTORE_MAX_FILES": "many"}, "setting max_files", id="bad-environment"),
        pytest.param(["serve", "--config", "/nonexistent.toml"], None, "cannot read config file", id="missing-config"),
        pytest.param(["serve", "--node-id", "a b"], None, "node_id must be 1 to 64 letters", id="bad-node-id"),
        pytest.param(["serve", "--trusted-proxy", "lb.example"], None, "trusted_proxies: 'lb.example'", id="bad-proxy"),
    ],
)
def test_bad_settings_exit_2_with_one_line(args: list[str], env: dict[str, str] | None, message: str) -> None:
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


async def test_port_in_use_is_a_one_line_error(served: Served, tmp_path: Path) -> None:
    port = served.urls["files"].split(":")[2].split("/")[0]
    result = await asyncio.to_thread(run_cli, "serve", "--root", str(tmp_path / "other"), "--port", port)
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_dash_m_and_console_script_agree() -> None:
    module = run_cli("--version")
    script = subprocess.run(
        [str(Path(sys.executable).parent / "datastore"), "--version"], capture_output=True, text=True, check=False
    )
    assert module.returncode == script.returncode == 0
    assert module.stdout == script.stdout
    assert module.stdout.startswith("datastore ")


def test_help_lists_every_setting() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for name in Settings.__dataclass_fields__:
        assert name in result.stdout


# -- settings precedence: flags > environment > TOML > defaults -------------------------------


def test_defaults_are_the_embedded_ones() -> None:
    settings = load_settings()
    assert (settings.root, settings.host, settings.port, settings.prefixes) == (
        Path("data"),
        "127.0.0.1",
        8006,
        ("files",),
    )
    assert settings.effective_state_dir == Path("data/.datastore")


def test_flags_beat_environment_beat_toml(tmp_path: Path) -> None:
    config = tmp_path / "datastore.toml"
    config.write_text('port = 7001\nhost = "127.0.0.2"\nmax-files = 12\nprefixes = ["a", "b"]\nroot = "/srv/x"\n')
    settings = load_settings(
        {"port": 7003, "host": None},
        {"DATASTORE_PORT": "7002", "DATASTORE_HOST": "127.0.0.3", "DATASTORE_MAX_FILE_SIZE": "2G"},
        config,
    )
    assert settings.port == 7003
    assert settings.host == "127.0.0.3"
    assert settings.max_files == 12
    assert settings.max_file_size == 2 << 30
    assert settings.prefixes == ("a", "b")
    assert settings.root == Path("/srv/x")


def test_toml_may_use_a_datastore_table(tmp_path: Path) -> None:
    config = tmp_path / "datastore.toml"
    config.write_text("[datastore]\nkey_lifetime = 60\noverwrite = true\n")
    settings = load_settings(config_file=config)
    assert settings.key_lifetime == 60.0
    assert settings.overwrite is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("colour = 1\n", "unknown setting 'colour'", id="unknown-key"),
        pytest.param("port = \n", "config file", id="bad-toml"),
        pytest.param("max_files = 0\n", "max_files must be positive", id="zero-limit"),
        pytest.param('max_file_size = "lots"\n', "setting max_file_size", id="bad-size"),
    ],
)
def test_bad_toml_names_the_setting(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "datastore.toml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(config_file=config)
