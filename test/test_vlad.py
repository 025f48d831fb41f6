"""VLAD against a direct numpy transcription of the InternVL-VPR eqs. (1)-(4)."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_vpr.core.config import VladConfig
from vlm_vpr.core.errors import MapError
from vlm_vpr.core.vlad import aggregate_vlad, apply_pca, fit_codebook, fit_pca, l2_normalize


def direct_vlad(x: np.ndarray, c: np.ndarray, temperature: float | None) -> np.ndarray:
    """Loops over clusters and descriptors, exactly as the equations read."""
    k, d = c.shape
    v = np.zeros((k, d))
    for i in range(len(x)):
        if temperature is None:
            a = np.zeros(k)
            a[np.argmax(c @ x[i])] = 1.0
        else:
            e = np.exp(np.array([x[i] @ c[s] for s in range(k)]) / temperature)
            a = e / e.sum()  # eq. (1)
        for s in range(k):
            v[s] += a[s] * (x[i] - c[s])  # eq. (2)
    v = np.stack([vs / np.linalg.norm(vs) for vs in v])  # eq. (3)
    v = v.reshape(-1)
    return v / np.linalg.norm(v)  # eq. (4)


@pytest.fixture
def local_and_codebook() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = l2_normalize(rng.normal(size=(50, 16))).astype(np.float32)
    c = l2_normalize(rng.normal(size=(6, 16))).astype(np.float32)
    return x, c


@pytest.mark.parametrize('temperature', [0.05, 0.5, 2.0])
def test_soft_vlad_matches_direct_equations(local_and_codebook, temperature: float) -> None:
    x, c = local_and_codebook
    config = VladConfig(num_clusters=6, soft_assignment=True, temperature=temperature)
    np.testing.assert_allclose(
        aggregate_vlad(x, c, config), direct_vlad(x, c, temperature), atol=1e-5
    )


def test_hard_vlad_matches_direct_equations(local_and_codebook) -> None:
    x, c = local_and_codebook
    config = VladConfig(num_clusters=6, soft_assignment=False)
    np.testing.assert_allclose(aggregate_vlad(x, c, config), direct_vlad(x, c, None), atol=1e-5)


def test_vlad_is_unit_norm_and_differs_between_descriptor_sets(local_and_codebook) -> None:
    x, c = local_and_codebook
    config = VladConfig(num_clusters=6)
    a, b = aggregate_vlad(x[:25], c, config), aggregate_vlad(x[25:], c, config)
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    assert a @ b < 0.99


def test_fit_codebook_returns_unit_centres_from_a_bounded_subsample() -> None:
    rng = np.random.default_rng(0)
    sets = [l2_normalize(rng.normal(size=(500, 8))).astype(np.float32) for _ in range(10)]
    config = VladConfig(num_clusters=4, kmeans_max_descriptors=1000, kmeans_iterations=5)
    centres = fit_codebook(sets, config)
    assert centres.shape == (4, 8)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1.0, atol=1e-5)


def test_fit_codebook_rejects_fewer_descriptors_than_clusters_with_a_map_error() -> None:
    with pytest.raises(MapError, match='3 local descriptors .* cannot fit 8 clusters') as error:
        fit_codebook([np.ones((3, 4), np.float32)], VladConfig(num_clusters=8))
    assert 'lower vlad.num_clusters' in str(error.value) and 'more textured' in str(error.value)
    with pytest.raises(MapError, match='0 local descriptors from 0 map images'):
        fit_codebook([], VladConfig(num_clusters=8))


def test_pca_is_skipped_when_the_map_is_smaller_than_the_target_dimension() -> None:
    vlads = np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32)
    assert fit_pca(vlads, VladConfig(pca_dim=32)) is None
    assert fit_pca(vlads, VladConfig(pca_dim=0)) is None


def test_pca_projection_preserves_neighbours_of_map_vectors() -> None:
    rng = np.random.default_rng(1)
    vlads = l2_normalize(rng.normal(size=(300, 64))).astype(np.float32)
    mean, components = fit_pca(vlads, VladConfig(pca_dim=48))
    projected = apply_pca(vlads, mean, components)
    assert projected.shape == (300, 48)
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0, atol=1e-5)
    query = apply_pca(vlads[7] + 0.01 * rng.normal(size=64), mean, components)
    assert int(np.argmax(projected @ query[0])) == 7


@pytest.mark.parametrize(('rows', 'cols'), [(120, 400), (400, 60)])
def test_fit_pca_matches_the_svd_basis_up_to_sign(rows: int, cols: int) -> None:
    rng = np.random.default_rng(2)
    scales = np.linspace(3.0, 0.1, cols)  # distinct variances: a well-defined basis
    vlads = (rng.normal(size=(rows, cols)) * scales).astype(np.float32)
    dim = 24
    mean, components = fit_pca(vlads, VladConfig(pca_dim=dim, seed=0))
    used = np.random.default_rng(0).choice(rows, size=4 * dim, replace=False)  # rows > 4 * dim
    sample = vlads[np.sort(used)]
    _, _, vt = np.linalg.svd(sample - sample.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(mean, sample.mean(axis=0), atol=1e-5)
    cosines = np.abs((components * vt[:dim]).sum(axis=1))
    np.testing.assert_allclose(cosines, 1.0, atol=2e-3)  # float16-rounded components
    assert components.dtype == np.float32
    np.testing.assert_array_equal(components, components.astype(np.float16).astype(np.float32))


def test_whitened_pca_gives_unit_variance_on_its_samples() -> None:
    rng = np.random.default_rng(3)
    vlads = (rng.normal(size=(40, 200)) * np.linspace(5.0, 0.5, 200)).astype(np.float32)
    mean, components = fit_pca(vlads, VladConfig(pca_dim=10, pca_whiten=True))
    projected = (vlads - mean) @ components.T
    np.testing.assert_allclose(projected.var(axis=0, ddof=1), 1.0, rtol=1e-2)
