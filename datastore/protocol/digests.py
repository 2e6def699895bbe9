"""RFC 9530 digest fields: what a ``Repr-Digest`` header says of a representation, as lowercase hex
per algorithm. Pure parsing, shared by the client and the transfer-job drivers."""

from __future__ import annotations

import base64
import re

_DIGEST_ITEM = re.compile(r"([A-Za-z0-9-]+)=:([A-Za-z0-9+/=]*):")


def parse_repr_digest(value: str) -> dict[str, str]:
    """``sha-256=:B64:, md5=:B64:`` -> {"sha-256": hex, "md5": hex} (RFC 9530)."""
    digests = {}
    for algorithm, encoded in _DIGEST_ITEM.findall(value):
        try:
            digests[algorithm.lower()] = base64.b64decode(encoded).hex()
        except ValueError:
            continue
    return digests
