"""Search, and every search/size speed-up leaving results unchanged on real (Nordland) data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlm_vpr.core import retrieval
from vlm_vpr.core.config import FeatureConfig, IndexConfig, RuntimeConfig, VladConfig
from vlm_vpr.core.datasets import read_traversal
from vlm_vpr.core.errors import ConfigError
from vlm_vpr.core.images import read_image
from vlm_vpr.core.map_build import project_in_chunks
from vlm_vpr.core.retrieval import build_index, search
from vlm_vpr.core.threads import limit_threads
from vlm_vpr.core.vlad import aggregate_vlad, apply_pca, fit_codebook, fit_pca

MAP_IMAGES, QUERIES, K = 600, 80, 10
VLAD = VladConfig(num_clusters=16, pca_dim=256)


@pytest.fixture(scope='module')
def nordland(data_root: Path) -> dict[str, np.ndarray]:
    """Real VLAD vectors [N x 2048] float32 of Nordland summer (map) and winter (queries)."""
    from vlm_vpr.backends.features import create_extractor

    limit_threads(1)
    extractor = create_extractor(FeatureConfig(image_size_px=64), RuntimeConfig(num_threads=1))

    def local(traversal: str, count: int) -> list[np.ndarray]:
        paths = read_traversal(data_root / 'nordland_64x32' / traversal).image_paths[:count]
        return [extractor.extract([read_image(p)])[0].flat for p in paths]

    map_local, query_local = local('summer', MAP_IMAGES), local('winter', QUERIES)
    codebook = fit_codebook(map_local, VLAD)
    return {
        name: np.stack([aggregate_vlad(x, codebook, VLAD) for x in sets])
        for name, sets in (('map', map_local), ('queries', query_local))
    }


@pytest.fixture(scope='module')
def projected(nordland: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map descriptors [N x 256] float16 and queries [Q x 256] float32 (the product's PCA)."""
    mean, components = fit_pca(nordland['map'], VLAD)
    return {
        'map': project_in_chunks(nordland['map'], mean, components),
        'queries': apply_pca(nordland['queries'], mean, components),
    }


def exact_top_k(descriptors: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """[Q x k] map ids by descending inner product, computed directly in float64."""
    scores = queries.astype(np.float64) @ descriptors.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind='stable')[:, :k]


def test_float16_gram_pca_keeps_the_top_k_of_a_float32_svd_pca(
    nordland: dict[str, np.ndarray], projected: dict[str, np.ndarray]
) -> None:
    vlads = nordland['map']
    mean = vlads.mean(axis=0)
    _, _, vt = np.linalg.svd(vlads - mean, full_matrices=False)  # the former implementation
    _, ours = fit_pca(vlads, VLAD)
    reference = vt[: VLAD.pca_dim] * np.sign((vt[: VLAD.pca_dim] * ours).sum(axis=1))[:, None]
    ref_map = apply_pca(vlads, mean, reference).astype(np.float16)
    ref_queries = apply_pca(nordland['queries'], mean, reference)
    cosines = (ref_queries * projected['queries']).sum(axis=1)
    assert cosines.min() >= 0.999
    ours_top = exact_top_k(projected['map'], projected['queries'])
    ref_top = exact_top_k(ref_map, ref_queries)
    np.testing.assert_array_equal(ours_top[:, 0], ref_top[:, 0])
    overlap = np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(ours_top, ref_top)])
    assert overlap >= 0.97


def test_chunked_projection_equals_projecting_all_rows_at_once(
    nordland: dict[str, np.ndarray],
) -> None:
    mean, components = fit_pca(nordland['map'], VLAD)
    chunked = project_in_chunks(nordland['map'], mean, components, chunk_rows=64)
    at_once = apply_pca(nordland['map'], mean, components).astype(np.float16)
    np.testing.assert_array_equal(chunked, at_once)


def test_chunked_exact_index_returns_the_exact_top_k(
    projected: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retrieval, 'CHUNK_ROWS', 100)  # 600 rows: six chunks
    descriptors = projected['map']
    index = build_index(descriptors, IndexConfig())
    assert index.ntotal == MAP_IMAGES
    expected = exact_top_k(descriptors, projected['queries'])
    for query, top in zip(projected['queries'], expected):
        scores, ids = search(index, descriptors, query, K)
        np.testing.assert_array_equal(ids, top)
        direct = descriptors[ids].astype(np.float32) @ query
        np.testing.assert_allclose(scores, direct, atol=1e-5)


@pytest.mark.parametrize(
    'config',
    [
        IndexConfig(approximate_above=1, approximate_type='ivf', ivf_nprobe=10),  # of 15 lists
        IndexConfig(approximate_above=1, approximate_type='hnsw'),
    ],
    ids=['ivf', 'hnsw'],
)
def test_approximate_index_recalls_the_exact_top_k_on_real_descriptors(
    projected: dict[str, np.ndarray], config: IndexConfig
) -> None:
    descriptors = projected['map']
    index = build_index(descriptors, config)
    found = [search(index, descriptors, q, K)[1] for q in projected['queries']]
    expected = exact_top_k(descriptors, projected['queries'])
    recall = np.mean([len(np.intersect1d(a, e)) / K for a, e in zip(found, expected)])
    assert recall >= 0.95


def test_ivf_index_trains_on_a_bounded_sample() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(6000, 32)).astype(np.float32)
    descriptors = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)
    config = IndexConfig(approximate_above=1, approximate_type='ivf', train_max_rows=1000)
    index = build_index(descriptors, config)
    assert index.nlist == 1000 // 39  # sqrt(6000) = 77 lists would need more training rows
    assert index.ntotal == 6000 and index.nprobe == config.ivf_nprobe


def test_index_type_switches_to_approximate_at_the_configured_size() -> None:
    config = IndexConfig(approximate_above=1000, approximate_type='hnsw')
    assert retrieval.index_type(config, 999) == 'flat'
    assert retrieval.index_type(config, 1000) == 'hnsw'


def test_subset_search_ranks_only_the_given_ids(projected: dict[str, np.ndarray]) -> None:
    descriptors = projected['map']
    subset = np.arange(100, 200)
    scores, ids = search(None, descriptors, projected['queries'][0], K, subset)
    assert set(ids) <= set(subset) and np.all(np.diff(scores) <= 0)
    np.testing.assert_array_equal(
        ids, subset[exact_top_k(descriptors[subset], projected['queries'][:1])[0]]
    )


def test_limit_threads_sets_torch_faiss_opencv_and_blas() -> None:
    import cv2
    import faiss
    import torch
    from threadpoolctl import threadpool_info

    limit_threads(2)
    assert faiss.omp_get_max_threads() == 2 and torch.get_num_threads() == 2
    assert cv2.getNumThreads() == 2
    numpy_blas = [p for p in threadpool_info() if 'numpy' in p['filepath']]
    assert numpy_blas and all(p['num_threads'] == 2 for p in numpy_blas)
    limit_threads(1)
    assert faiss.omp_get_max_threads() == 1 and cv2.getNumThreads() == 1


def test_search_leaves_the_thread_count_of_torch_alone() -> None:
    """A search runs on one OpenMP thread; torch (same OpenMP runtime) keeps its threads."""
    import faiss
    import torch

    limit_threads(2)
    descriptors = np.random.default_rng(3).standard_normal((500, 64)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    index = build_index(descriptors.astype(np.float16), IndexConfig())
    search(index, descriptors, descriptors[0], 5)
    assert faiss.omp_get_max_threads() == 2 and torch.get_num_threads() == 2


@pytest.mark.parametrize(
    ('overrides', 'message'),
    [
        ({'approximate_type': 'ivfpq'}, "approximate_type must be 'ivf' or 'hnsw'"),
        ({'approximate_above': 0}, 'approximate_above must be >= 1'),
        ({'train_max_rows': 10}, 'train_max_rows must be >= 1000'),
        ({'ivf_nlist': -1}, 'ivf_nlist must be >= 0'),
        ({'ivf_nprobe': 0}, 'ivf_nprobe must be >= 1'),
        ({'hnsw_m': 2}, 'hnsw_m must be >= 4'),
        ({'hnsw_ef_search': 0}, 'hnsw_ef_search must be >= 1'),
    ],
)
def test_index_config_rejects_invalid_values(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IndexConfig(**overrides)


def test_localizer_sets_the_threads_of_a_torch_its_rerankers_imported(tmp_path: Path) -> None:
    """A dense-RootSIFT map does not import torch; the Sentence-BERT embedder of the
    descriptions re-ranker does. Run in a process of its own, where torch is not loaded yet."""
    import subprocess
    import sys

    script = f"""
import os, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from vlm_doubles import make_map
from vlm_vpr.core.config import LocalizerConfig, RerankConfig, RuntimeConfig, VlmConfig
from vlm_vpr.core.localizer import Localizer
vpr_map = make_map(Path({str(tmp_path)!r}), [(0, 0), (5, 0), (10, 0)])
assert 'torch' not in sys.modules
threads = os.cpu_count() + 1  # never torch's default
config = LocalizerConfig(
    runtime=RuntimeConfig(num_threads=threads),
    rerank=RerankConfig(chain=('descriptions',)),
    vlm=VlmConfig(backend='openai', model='m'),
)
Localizer(vpr_map, config)
import torch
print(torch.get_num_threads() == threads)
"""
    done = subprocess.run(
        [sys.executable, '-c', script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == 'True'
