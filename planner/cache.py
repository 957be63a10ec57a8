"""Memoisation of what the planner derives from a model's own modules (layouts, activation
profiles, trainable counts): computed once per process, and kept across runs when the caller
installs a persistent store (orchestrator.store.DiskStore does, for the CLI).

The planner itself does no I/O: a store is anything with ``get(namespace, key) -> dict | None``
and ``put(namespace, key, value)``. Keys hash the inputs and the versions of the libraries whose
modules were traced, so an upgrade of transformers, peft, bitsandbytes or torch recomputes.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from typing import Any, Callable, Protocol

# Bump when what a namespace holds changes meaning (a new field, a fixed trace).
SCHEMA_VERSION = 3
_TRACED_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")


class Store(Protocol):
    def get(self, namespace: str, key: str) -> dict[str, Any] | None: ...

    def put(self, namespace: str, key: str, value: dict[str, Any]) -> None: ...


_memory: dict[tuple[str, str], dict[str, Any]] = {}
_store: Store | None = None


def install_store(store: Store | None) -> None:
    """Use ``store`` for every later lookup (None: in-process memory only)."""
    global _store
    _store = store


def _versions() -> dict[str, str]:
    out = {}
    for lib in _TRACED_LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


_VERSIONS: dict[str, str] | None = None


def key_of(*parts: Any) -> str:
    """A stable key for JSON-serialisable inputs, salted with the traced libraries' versions."""
    global _VERSIONS
    if _VERSIONS is None:
        _VERSIONS = _versions()
    blob = json.dumps([SCHEMA_VERSION, _VERSIONS, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cached(namespace: str, key: str, compute: Callable[[], dict[str, Any]],
           parse: Callable[[dict[str, Any]], Any] | None = None) -> Any:
    """The value for (namespace, key): from memory, else the store, else ``compute()`` (then kept).
    With ``parse``, its result is returned, and a stored value it rejects (a file from an older
    orch, damaged) is recomputed rather than an error."""
    parse = parse or (lambda value: value)
    hit = _memory.get((namespace, key))
    if hit is not None:
        return parse(hit)
    if _store is not None:
        hit = _store.get(namespace, key)
        if hit is not None:
            try:
                parsed = parse(hit)
            except (KeyError, TypeError, IndexError, ValueError, AttributeError):
                pass
            else:
                _memory[(namespace, key)] = hit
                return parsed
    value = compute()
    parsed = parse(value)
    _memory[(namespace, key)] = value
    if _store is not None:
        _store.put(namespace, key, value)
    return parsed
