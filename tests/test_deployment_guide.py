"""``docs/deployment.md`` works as written: every block marked ``<!-- tested -->`` runs, in the guide's
order, against the session's own PostgreSQL cluster (``postgres_server.py``) and a temporary folder
as the shared storage; ``<!-- tested: node -->`` starts two nodes, and ``<!-- tested: health -->``
asks each of them. The guide's example host names, paths and ports are replaced by the test's
(:data:`REPLACEMENTS`, which the guide lists too). SQL blocks run as the cluster's superuser; shell
blocks run in bash with ``-euo pipefail``, each seeing what the blocks before it exported, with this
checkout's ``datastore`` first on the PATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from .haproxy_server import free_port
from .harness import SERVING
from .postgres_server import shared_cluster

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"

#: A marked block: ``<!-- tested -->`` or ``<!-- tested: KIND -->``, then a fenced block.
BLOCK = re.compile(r"<!-- tested(?:: (?P<kind>[a-z]+))? -->\n```(?P<language>[a-z]+)\n(?P<text>.*?)\n```", re.DOTALL)

#: The guide's examples that the test replaces, with what (filled in per test and node).
REPLACEMENTS = ("db.example.org:5432", "/srv/datastore", "10.0.0.10", "0.0.0.0", "8006", "node1")


@dataclass(frozen=True)
class Block:
    kind: str | None
    language: str
    text: str


def blocks() -> list[Block]:
    return [Block(m["kind"], m["language"], m["text"]) for m in BLOCK.finditer(GUIDE.read_text())]


def replaced(text: str, values: dict[str, str]) -> str:
    for example, value in values.items():
        text = text.replace(example, value)
    return text


@pytest.fixture
def cleanup_database() -> Iterator[None]:
    """Drop what the guide's SQL makes (the database and its role), whatever happens."""
    yield
    with psycopg.connect(shared_cluster().url("postgres"), autocommit=True) as admin:
        admin.execute('DROP DATABASE IF EXISTS "datastore" WITH (FORCE)')
        admin.execute("DROP ROLE IF EXISTS datastore_app")


def test_the_guide_marks_its_blocks_and_uses_every_replaced_example() -> None:
    found = blocks()
    assert {(b.kind, b.language) for b in found} >= {(None, "sql"), (None, "sh"), ("node", "sh"), ("health", "sh")}
    text = "\n".join(b.text for b in found)
    for example in REPLACEMENTS:
        assert example in text, f"no tested block of the guide uses {example!r}: update REPLACEMENTS"


async def bash(script: str, cwd: Path, env_file: Path) -> str:
    """Run ``script`` after what ``env_file`` exports, save what it exports; its standard output."""
    wrapped = (
        f"set -euo pipefail\nsource {shlex.quote(str(env_file))}\n{script}\nexport -p > {shlex.quote(str(env_file))}\n"
    )
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        wrapped,
        cwd=cwd,
        env=_environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, f"the guide's block failed ({process.returncode}):\n{script}\n{stderr.decode()}"
    return stdout.decode()


def _environment() -> dict[str, str]:
    """This process's environment with no DATASTORE_* setting and this checkout's datastore first."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("DATASTORE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


async def start_node(script: str, cwd: Path, env_file: Path) -> asyncio.subprocess.Process:
    """Start the guide's serve command (it runs until stopped), and return once it serves."""
    wrapped = f"source {shlex.quote(str(env_file))}\nexec {script}\n"
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        wrapped,
        cwd=cwd,
        env=_environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(60):
            while True:
                line = (await process.stdout.readline()).decode()
                assert line, f"the node exited before serving:\n{script}"
                if SERVING.search(line):
                    return process
    except BaseException:
        process.kill()
        await process.wait()
        raise


async def test_the_deployment_guide_works_as_written(tmp_path: Path, cleanup_database: None) -> None:
    cluster = shared_cluster()
    shared = tmp_path / "shared"
    shared.mkdir()
    values = {
        "db.example.org:5432": f"127.0.0.1:{cluster.port}",
        "/srv/datastore": str(shared),
        "10.0.0.10": "127.0.0.1",
        "0.0.0.0": "127.0.0.1",
    }
    env_file = tmp_path / "environment.sh"
    env_file.write_text("")
    work = tmp_path / "work"
    work.mkdir()
    nodes: list[tuple[asyncio.subprocess.Process, str, str]] = []
    try:
        for block in blocks():
            if block.text.strip() == "datastore migrate":
                # The first install's step: it applies every component's schema to the new database.
                applied = await bash(replaced(block.text, values), work, env_file)
                assert applied.startswith("applied: state 0 -> "), applied
            elif block.language == "sql":
                await asyncio.to_thread(_run_sql, cluster.url("postgres"), block.text)
            elif block.kind == "node":
                for name in ("node1", "node2"):
                    port = str(free_port())
                    script = replaced(block.text, {**values, "8006": port, "node1": name})
                    process = await start_node(script, work, env_file)
                    nodes.append((process, name, port))
            elif block.kind == "health":
                assert nodes, "the guide checks a node's health before starting one"
                for _, name, port in nodes:
                    answer = json.loads(await bash(replaced(block.text, {**values, "8006": port}), work, env_file))
                    assert (answer["status"], answer["node"], answer["state"]) == ("ok", name, "postgresql")
                    assert answer["database"]["reachable"] and answer["storage"]["writable"]
            else:
                assert block.kind is None, f"unknown kind of tested block: {block.kind}"
                await bash(replaced(block.text, values), work, env_file)
        assert len(nodes) == 2
        # The guide's backup ran, and its migrate block left the schema current.
        assert (work / "datastore.dump").stat().st_size > 0
        await bash("datastore migrate --check", work, env_file)
    finally:
        for process, _, _ in nodes:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for process, _, _ in nodes:
            await asyncio.wait_for(process.wait(), 60)


def _run_sql(url: str, text: str) -> None:
    """Each statement of ``text`` on its own (CREATE DATABASE cannot run in a transaction block)."""
    with psycopg.connect(url, autocommit=True) as db:
        for statement in (s.strip() for s in text.split(";")):
            if statement:
                db.execute(statement.encode())
