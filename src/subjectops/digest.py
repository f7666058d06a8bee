"""One way to hash things: files, bytes and JSON-able values, always SHA-256.

`DIGEST_CHARS` is the one truncation used for short identities (cache keys, config digests, seed sets);
full hex digests are kept where a value is compared for integrity (files, manifests).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

DIGEST_CHARS = 16


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_json(value: Any, short: bool = True) -> str:
    """SHA-256 of a value's canonical JSON (sorted keys); `short` truncates to DIGEST_CHARS."""
    full = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    return full[:DIGEST_CHARS] if short else full
