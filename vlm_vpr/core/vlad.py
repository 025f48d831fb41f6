"""VLAD aggregation as in the InternVL-VPR paper, eqs. (1)-(4), plus codebook and PCA fits.

(1) a_is = softmax_s(x_i . c_s / T)  (or one-hot on the nearest centre: hard assignment)
(2) v_s  = sum_i a_is (x_i - c_s)
(3) v_s <- v_s / ||v_s||              (intra-normalisation)
(4) v   <- v / ||v||                  (global L2 normalisation)
"""

from __future__ import annotations

import logging

import numpy as np

from vlm_vpr.core.config import VladConfig
from vlm_vpr.core.errors import MapError

log = logging.getLogger(__name__)
_EPS = 1e-12


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x / ||x|| along ``axis`` (zero vectors stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), _EPS)


def assign(local: np.ndarray, codebook: np.ndarray, config: VladConfig) -> np.ndarray:
    """Assignment weights [M x K] float32 of local descriptors [M x D] to centres [K x D]."""
    sims = local @ codebook.T
    if not config.soft_assignment:
        weights = np.zeros_like(sims)
        weights[np.arange(len(sims)), sims.argmax(axis=1)] = 1.0
        return weights
    logits = sims / config.temperature
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def aggregate_vlad(local: np.ndarray, codebook: np.ndarray, config: VladConfig) -> np.ndarray:
    """VLAD vector [K*D] float32 (L2-normalised) of local descriptors [M x D] (L2-normalised)."""
    local = np.asarray(local, dtype=np.float32)
    if config.soft_assignment:
        weights = assign(local, codebook, config)  # [M x K]
        residuals = weights.T @ local - weights.sum(axis=0)[:, None] * codebook  # [K x D]
    else:  # one-hot weights: sum each cluster's members without a [M x K] matrix product
        nearest = (local @ codebook.T).argmax(axis=1)
        order = np.argsort(nearest, kind='stable')
        counts = np.bincount(nearest, minlength=len(codebook))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums = np.zeros_like(codebook)
        used = counts > 0
        sums[used] = np.add.reduceat(np.take(local, order, axis=0), starts[used], axis=0)
        residuals = sums - counts[:, None].astype(np.float32) * codebook
    residuals = l2_normalize(residuals, axis=1)
    return l2_normalize(residuals.reshape(-1)).astype(np.float32)


def fit_codebook(local_sets: list[np.ndarray], config: VladConfig) -> np.ndarray:
    """Spherical k-means centres [K x D] float32 on at most ``kmeans_max_descriptors`` rows.

    ``local_sets`` holds one [M_i x D] array per image; each image contributes equally to the
    subsample, so memory stays bounded whatever the map size. Raises MapError when the
    subsample has fewer descriptors than ``vlad.num_clusters``.
    """
    import faiss

    rng = np.random.default_rng(config.seed)
    per_image = max(1, config.kmeans_max_descriptors // max(1, len(local_sets)))
    picked = [
        s[rng.choice(len(s), size=min(per_image, len(s)), replace=False)] for s in local_sets
    ]
    sample = np.concatenate(picked).astype(np.float32) if picked else np.zeros((0, 0), np.float32)
    k = config.num_clusters
    if len(sample) < k:
        raise MapError(
            f'{len(sample)} local descriptors from {len(local_sets)} map images cannot fit '
            f'{k} clusters: lower vlad.num_clusters (e.g. --set vlad.num_clusters='
            f'{max(2, len(sample) // 4)}) or build the map from more images, or more textured '
            'ones (flat, plain images give few local descriptors)'
        )
    kmeans = faiss.Kmeans(
        sample.shape[1],
        k,
        niter=config.kmeans_iterations,
        seed=config.seed,
        spherical=True,
        max_points_per_centroid=max(256, len(sample) // k + 1),
    )
    kmeans.train(np.ascontiguousarray(sample))
    log.info('codebook: %d centres from %d local descriptors', k, len(sample))
    return l2_normalize(np.asarray(kmeans.centroids, np.float32), axis=1)


def fit_pca(vlads: np.ndarray, config: VladConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean [D_vlad] float32, components [D x D_vlad] float32) or None when PCA is off or
    would not reduce.

    PCA is fitted only when the map has more images than ``pca_dim`` (enough samples for a
    ``pca_dim``-dimensional basis); smaller maps keep the full VLAD vector. Large maps fit it
    on a seeded sample of ``4 * pca_dim`` rows, so memory and time stay bounded. The basis is
    the top eigenvectors of the smaller Gram matrix (rows x rows when there are fewer samples
    than VLAD dimensions, the usual case), equal to the SVD's up to sign; each component's
    sign is fixed (largest entry positive) and its values are rounded to float16, the
    precision the map stores, so map and query descriptors use the same projection.
    """
    n, d_vlad = vlads.shape
    dim = config.pca_dim
    if dim == 0 or dim >= d_vlad or n <= dim:
        return None
    if n > 4 * dim:  # a basis of `dim` vectors needs a few times `dim` samples, not all of them
        rows = np.random.default_rng(config.seed).choice(n, size=4 * dim, replace=False)
        vlads = vlads[np.sort(rows)]
        n = len(vlads)
    vlads = vlads.astype(np.float32)
    mean = vlads.mean(axis=0)
    centred = vlads - mean
    by_rows = n < d_vlad  # the smaller Gram matrix: X X^T (rows) or X^T X (columns)
    eigvals, eigvecs = np.linalg.eigh(centred @ centred.T if by_rows else centred.T @ centred)
    top = eigvecs[:, ::-1][:, :dim]
    singular = np.sqrt(np.maximum(eigvals[::-1][:dim], 0.0))
    # eigenvectors u of X X^T give the components u^T X / sigma; those of X^T X are them
    components = (top.T @ centred) / np.maximum(singular, _EPS)[:, None] if by_rows else top.T
    components = l2_normalize(components, axis=1)
    signs = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
    components *= signs[:, None]
    if config.pca_whiten:
        components = components / np.sqrt(singular**2 / max(1, n - 1) + 1e-6)[:, None]
    return mean, components.astype(np.float16).astype(np.float32)


def apply_pca(vlads: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Project VLAD vectors [Q x D_vlad] to [Q x D] float32 and L2-normalise."""
    vlads = np.atleast_2d(vlads).astype(np.float32, copy=False)
    return l2_normalize((vlads - mean) @ components.T).astype(np.float32)
