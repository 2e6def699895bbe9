"""Schemathesis hooks and checks for the fuzz runs of ``test_openapi.py`` (loaded by ``schemathesis run``).

The test writes the real values of the fuzzed store to the JSON file named by
``FUZZ_TARGETS``: half of the generated path parameters are swapped for a
real transfer key and file number, a published file, a token id, a job id
or an invitation id, so that fuzzing reaches past the 404s of random keys.
Targets are keyed by the operation's path where one is given for it (a job's
or an invitation's ``id`` is not a token's), else by the names of its path
parameters. The check ``no_traceback`` fails any answer whose body shows a
Python traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import strategies as st

TARGETS: dict[str, list[dict[str, Any]]] = json.loads(Path(os.environ["FUZZ_TARGETS"]).read_text())

# tus's PATCH and creation bodies are raw bytes, as application/octet-stream's.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")


@schemathesis.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """The generated parameters, or as often real ones for the same path."""
    if not path_parameters:
        return st.just(path_parameters)
    path = context.operation.path if context.operation is not None else None
    real = TARGETS.get(path or "") or TARGETS.get(",".join(sorted(path_parameters)), [])
    if not real:
        return st.just(path_parameters)
    return st.one_of(st.just(path_parameters), st.sampled_from(real))


#: What a Python traceback looks like in a body.
TRACEBACK_MARKERS = (b"Traceback (most recent call last)", b'File "/', b"site-packages/")


@schemathesis.check
def no_traceback(ctx: Any, response: Any, case: Any) -> bool | None:
    """No answer shows the server's insides."""
    for marker in TRACEBACK_MARKERS:
        if marker in response.content:
            raise AssertionError(f"the body shows a traceback: {response.content[:300]!r}")
    return None
