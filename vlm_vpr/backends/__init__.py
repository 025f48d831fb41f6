"""Model back-ends: feature extractors, re-rankers, VLM clients, the text embedder."""

from __future__ import annotations

from pathlib import Path


def is_model_folder(name: str) -> bool:
    """A model setting names a folder (``/...``, ``./...`` or ``~/...``), not a hub id."""
    return name.startswith(('/', '.', '~'))


def model_location(name: str) -> str:
    """What ``from_pretrained`` gets for a model setting: a hub id unchanged, a folder with
    ``~`` expanded."""
    return str(Path(name).expanduser()) if is_model_folder(name) else name
