"""The planner's persistent cache on disk (planner.cache): what is traced from a model's modules
(layouts, activation profiles, trainable counts) is kept under ``$ORCH_CACHE_DIR`` (default
``$XDG_CACHE_HOME/orch`` or ``~/.cache/orch``), one JSON file per entry, so a repeated
``orch plan`` needs neither torch nor transformers. Entries are keyed by their inputs and the
library versions; a damaged or unwritable entry is recomputed, never an error."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    if os.environ.get("ORCH_CACHE_DIR"):
        return Path(os.environ["ORCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "orch"


class DiskStore:
    """planner.cache.Store on a directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_dir()

    def _path(self, namespace: str, key: str) -> Path:
        return self.root / namespace / f"{key}.json"

    def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        try:
            value = json.loads(self._path(namespace, key).read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def put(self, namespace: str, key: str, value: dict[str, Any]) -> None:
        path = self._path(namespace, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written whole, then renamed: concurrent runs never read half a file.
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(value, f)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: the value stays in memory for this run
