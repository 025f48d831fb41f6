"""One place that sets how many threads the numeric libraries use."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def limit_threads(num_threads: int) -> None:
    """Use ``num_threads`` threads in torch (when loaded), OpenCV, FAISS and BLAS; 0 keeps
    the library defaults.

    numpy's OpenBLAS is limited through threadpoolctl when it is installed (scikit-learn,
    pulled in by sentence-transformers, brings it); without it, set OPENBLAS_NUM_THREADS
    before Python starts. A single-query search runs on one thread (retrieval.search).
    """
    import cv2
    import faiss

    if num_threads > 0:
        cv2.setNumThreads(num_threads)
        if 'torch' in sys.modules:  # never import torch just to configure it
            sys.modules['torch'].set_num_threads(num_threads)
        _limit_blas(num_threads)
        faiss.omp_set_num_threads(num_threads)  # after BLAS: an OpenMP OpenBLAS resets it


def _limit_blas(num_threads: int) -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log.debug('threadpoolctl is not installed; BLAS threads follow OPENBLAS_NUM_THREADS')
        return
    threadpool_limits(limits=num_threads, user_api='blas')
