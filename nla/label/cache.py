"""The labelers' on-disk response cache: one JSON file per request, written atomically.

Keyed by a hash of everything that determines the answer (request body, or model + prompt +
decoding settings), so a crashed or repeated run asks nothing twice and a changed prompt
never reuses a stale answer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nla.io import atomic_write_text


class ResponseCache:
    """One JSON file per request, named by the hash of what determines the answer."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            response = json.loads(self._path(key).read_text(encoding="utf-8"))["response"]
        except (OSError, ValueError, KeyError, TypeError):  # missing or unreadable: ask again
            return None
        return response if isinstance(response, str) else None

    def put(self, key: str, response: str) -> None:
        atomic_write_text(self._path(key), json.dumps({"response": response}, ensure_ascii=False))
