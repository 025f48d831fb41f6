"""Model back-ends: feature extractors, re-rankers, VLM clients, the text embedder."""

from __future__ import annotations

from pathlib import Path


def model_location(name: str) -> str:
    """What ``from_pretrained`` gets for a model setting: a hub id unchanged, a folder given as
    ``/...``, ``./...`` or ``~/...`` with ``~`` expanded."""
    return str(Path(name).expanduser()) if name.startswith(('/', '.', '~')) else name
