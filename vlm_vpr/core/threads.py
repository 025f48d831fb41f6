"""One place that sets how many threads the numeric libraries use."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def limit_threads(num_threads: int, blas_threads: int | None = None) -> None:
    """Use ``num_threads`` threads in torch (when loaded), OpenCV and FAISS, and
    ``blas_threads`` (default ``num_threads``) in numpy's BLAS; 0 keeps a library's default.

    The Localizer and the map build pass ``blas_threads=1``: their numpy work is small (VLAD
    assignment, PCA projection), and OpenBLAS threads that spin-wait after each call take the
    cores from the DINOv2 forward pass that follows (`make bench`, ViT-S/14 224 px float32
    per frame on 2 cores: median 172 ms with two BLAS threads, 68-73 ms with one). BLAS is
    limited through threadpoolctl when it is installed (scikit-learn, pulled in by
    sentence-transformers, brings it); without it, set OPENBLAS_NUM_THREADS before Python
    starts. A single-query search runs on one thread (retrieval.search).
    """
    import cv2
    import faiss

    blas_threads = num_threads if blas_threads is None else blas_threads
    if blas_threads > 0:
        _limit_blas(blas_threads)
    if num_threads > 0:
        cv2.setNumThreads(num_threads)
        if 'torch' in sys.modules:  # never import torch just to configure it
            sys.modules['torch'].set_num_threads(num_threads)
        faiss.omp_set_num_threads(num_threads)  # after BLAS: an OpenMP OpenBLAS resets it


def _limit_blas(num_threads: int) -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log.debug('threadpoolctl is not installed; BLAS threads follow OPENBLAS_NUM_THREADS')
        return
    threadpool_limits(limits=num_threads, user_api='blas')
