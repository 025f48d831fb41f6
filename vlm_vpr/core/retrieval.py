"""Top-K search by inner product with FAISS, over the whole map or a subset of it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vlm_vpr.core.config import IndexConfig

CHUNK_ROWS = 16_384  # rows converted to float32 at a time while an index is filled


def index_type(config: IndexConfig, n: int) -> str:
    """'flat' (exact) below ``config.approximate_above`` rows, else ``config.approximate_type``."""
    return 'flat' if n < config.approximate_above else config.approximate_type


def build_index(descriptors: np.ndarray, config: IndexConfig, force_flat: bool = False) -> Any:
    """A FAISS inner-product index over ``descriptors`` [N x D] (float16 rows, L2-normalised).

    'flat': exact search over the stored float16 values (scalar-quantised flat). 'ivf':
    inverted lists of float16 vectors, coarse centres trained on at most
    ``config.train_max_rows`` seeded sample rows; scores within the searched lists are exact.
    'hnsw': a graph over float16 vectors. Rows are added ``CHUNK_ROWS`` at a time, so memory
    never holds a float32 copy of the whole map.
    """
    import faiss

    n, dim = descriptors.shape
    kind = 'flat' if force_flat else index_type(config, n)
    fp16 = faiss.ScalarQuantizer.QT_fp16
    index: Any
    if kind == 'flat':
        index = faiss.IndexScalarQuantizer(dim, fp16, faiss.METRIC_INNER_PRODUCT)
    elif kind == 'hnsw':  # faiss's stubs miss this SWIG overload
        hnsw_sq: Any = faiss.IndexHNSWSQ
        index = hnsw_sq(dim, fp16, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
    else:
        train_rows = min(n, config.train_max_rows)
        nlist = min(config.ivf_nlist or round(math.sqrt(n)), max(1, train_rows // 39))
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(dim), dim, nlist, fp16, faiss.METRIC_INNER_PRODUCT
        )
        rows = np.random.default_rng(0).choice(n, size=train_rows, replace=False)
        index.train(np.ascontiguousarray(descriptors[np.sort(rows)], dtype=np.float32))
    for start in range(0, n, CHUNK_ROWS):
        index.add(np.ascontiguousarray(descriptors[start : start + CHUNK_ROWS], np.float32))
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
        scores = descriptors[subset].astype(np.float32) @ query[0]
        order = np.argsort(-scores, kind='stable')[:k]
        return scores[order].astype(np.float32), subset[order]
    k = min(k, index.ntotal)
    scores, ids = _search_one_thread(index, query, k)
    keep = ids[0] >= 0
    return scores[0][keep], ids[0][keep].astype(np.int64)


def _search_one_thread(index: Any, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` on one OpenMP thread, then the caller's thread count again.

    FAISS parallelises over queries, so one query gains nothing from more threads and, on a
    busy CPU, waits for descheduled ones. The OpenMP thread count is per calling thread and
    torch reads it too (``torch.get_num_threads()`` follows it), so it is restored at once
    instead of being set to one for good.
    """
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(query, k)
    finally:
        faiss.omp_set_num_threads(threads)


def ids_within_radius(
    positions_xyz: np.ndarray, center_xy: tuple[float, float], radius_m: float
) -> np.ndarray:
    """Map ids whose x, y lie within ``radius_m`` of ``center_xy`` (a submap around a prior)."""
    d2 = ((positions_xyz[:, :2] - np.asarray(center_xy)) ** 2).sum(axis=1)
    return np.flatnonzero(d2 <= radius_m * radius_m)
