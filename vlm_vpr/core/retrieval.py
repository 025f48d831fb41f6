"""Top-K search by inner product with FAISS, over the whole map or a subset of it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vlm_vpr.core.config import IndexConfig


def build_index(descriptors: np.ndarray, config: IndexConfig, force_flat: bool = False) -> Any:
    """A FAISS inner-product index over ``descriptors`` [N x D] (float16 rows, L2-normalised).

    Exact (fp16 scalar-quantised flat, i.e. the stored values) below
    ``config.approximate_above`` rows, else HNSW or IVF-PQ trained on the descriptors.
    """
    import faiss

    data = np.ascontiguousarray(descriptors, dtype=np.float32)
    n, dim = data.shape
    if force_flat or n < config.approximate_above:
        index = faiss.IndexScalarQuantizer(
            dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
    elif config.approximate_type == 'hnsw':
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        nlist = config.ivf_nlist or int(4 * math.sqrt(n))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, config.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(data)
    index.add(data)
    configure_index(index, config)
    return index


def configure_index(index: Any, config: IndexConfig) -> None:
    """Set the search-time knobs (HNSW efSearch, IVF nprobe) on a built or loaded index."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = config.hnsw_ef_search
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = config.ivf_nprobe


def search(
    index: Any,
    descriptors: np.ndarray,
    query: np.ndarray,
    k: int,
    subset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores [k'] float32 descending, map ids [k'] int64) for one query [D] float32.

    ``subset`` (map ids) restricts the search to a submap; it is searched exactly.
    k' = min(k, number of searchable images).
    """
    query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    if subset is not None:
        subset = np.asarray(subset, dtype=np.int64)
        if len(subset) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        scores = descriptors[subset].astype(np.float32) @ query[0]
        order = np.argsort(-scores, kind='stable')[:k]
        return scores[order].astype(np.float32), subset[order]
    k = min(k, index.ntotal)
    scores, ids = index.search(query, k)
    keep = ids[0] >= 0
    return scores[0][keep], ids[0][keep].astype(np.int64)


def ids_within_radius(
    positions_xyz: np.ndarray, center_xy: tuple[float, float], radius_m: float
) -> np.ndarray:
    """Map ids whose x, y lie within ``radius_m`` of ``center_xy`` (a submap around a prior)."""
    d2 = ((positions_xyz[:, :2] - np.asarray(center_xy)) ** 2).sum(axis=1)
    return np.flatnonzero(d2 <= radius_m * radius_m)
