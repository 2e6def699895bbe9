"""The layers the folders name hold: the lifecycle, the state store, pure protocol code and the
storage of bytes know nothing of HTTP (no aiohttp, nothing of ``datastore.http``), and pure
protocol code touches no state, storage or lifecycle; the state, which keeps the handlers'
catalogues, imports no handler; the job service reaches this store only below its HTTP layer. Read
from the source, so that an import added anywhere in those folders fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "datastore"

#: Per folder: imports its modules must not make (absolute module names, and what they start with).
FORBIDDEN = {
    "lifecycle": ("aiohttp", "aiohttp_sse", "datastore.http", "datastore.client"),
    "state": (
        "aiohttp",
        "aiohttp_sse",
        "datastore.http",
        "datastore.client",
        "datastore.lifecycle.machine",
        "datastore.handlers",
        # Of the jobs, the state knows only their vocabulary (jobs/states.py).
        "datastore.jobs.runner",
        "datastore.jobs.ends",
        "datastore.jobs.drivers",
    ),
    # The job service drives the store through its lifecycle and other stores as their clients do,
    # but never through this store's HTTP layer or its client package.
    "jobs": ("aiohttp_sse", "datastore.http", "datastore.client"),
    "jobs/drivers": ("aiohttp_sse", "datastore.http", "datastore.client", "datastore.jobs.runner"),
    "storage": ("aiohttp", "datastore.http", "datastore.client", "datastore.lifecycle", "datastore.state"),
    "protocol": (
        "aiohttp",
        "datastore.http",
        "datastore.client",
        "datastore.lifecycle",
        "datastore.state",
        "datastore.storage",
    ),
}


def imports_of(path: Path) -> set[str]:
    """The absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(folder: str) -> None:
    modules = sorted((PACKAGE / folder).glob("*.py"))
    assert modules
    offending = {
        f"{module.name}: {name}"
        for module in modules
        for name in imports_of(module)
        if any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN[folder])
    }
    assert not offending


def test_the_reader_of_imports_sees_relative_imports() -> None:
    names = imports_of(PACKAGE / "lifecycle" / "machine.py")
    assert "datastore.storage.staging" in names and "datastore.state.interface" in names
