"""Re-ranking latency per query of the ``descriptions`` re-ranker: map-side precomputed
descriptions (`vlm-vpr map describe`) versus describing every candidate online.

    .venv/bin/python benchmarks/bench_rerank.py [--generation-s 0.1] [--shortlists 10 50 100]
        [--queries 3] [--threads 1]

The VLM is a stand-in (``StandInVlm``) that waits ``--generation-s`` per call, the generation
time of a real VLM, and returns three descriptions; everything else is the product code:
thumbnails read from a synthetic map, Sentence-BERT (all-MiniLM-L6-v2) embeddings, scoring and
ordering. For each shortlist size K it prints the VLM calls and the median wall time per query.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from vlm_vpr.backends.rerank import Query  # noqa: E402
from vlm_vpr.backends.rerank.descriptions import DescriptionsReranker  # noqa: E402
from vlm_vpr.backends.text_embedding import TextEmbedder  # noqa: E402
from vlm_vpr.core.config import LocalizerConfig, MapBuildConfig, RerankConfig  # noqa: E402
from vlm_vpr.core.map_describe import describe_map  # noqa: E402
from vlm_vpr.core.map_format import MapContent, VprMap, read_map, write_map  # noqa: E402
from vlm_vpr.core.types import Candidate, Pose  # noqa: E402

THINGS = [
    'red brick building',
    'glass office tower',
    'stone bridge',
    'row of palm trees',
    'car park entrance',
    'white lighthouse',
    'bus shelter',
    'fountain',
    'clock tower',
    'wooden footbridge',
    'statue on a plinth',
    'tiled plaza',
]


class StandInVlm:
    """Stand-in for a VLM client: waits ``generation_s`` per call, then answers three
    descriptions drawn from a fixed vocabulary (seeded per call, so runs repeat)."""

    model_name = 'stand-in-vlm'

    def __init__(self, generation_s: float) -> None:
        self.generation_s = generation_s
        self.calls = 0

    def ask_json(
        self, prompt: str, images_bgr: Sequence[np.ndarray], timeout_s: float
    ) -> dict[str, Any]:
        rng = np.random.default_rng(self.calls)
        self.calls += 1
        time.sleep(self.generation_s)
        picks = rng.choice(len(THINGS), size=3, replace=False)
        return {
            'descriptions': [
                {'text': f'a {THINGS[i]}', 'weight': float(w)}
                for i, w in zip(picks, rng.uniform(0.2, 1.0, 3))
            ]
        }


def synthetic_map(folder: Path, num_images: int) -> VprMap:
    """A map of ``num_images`` with random descriptors and 240 x 320 noise thumbnails."""
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(num_images, 64)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    thumbnails = [
        cv2.imencode('.jpg', rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))[1].tobytes()
        for _ in range(num_images)
    ]
    content = MapContent(
        MapBuildConfig(),
        np.eye(4, 3, dtype=np.float32),
        descriptors.astype(np.float16),
        [f'{j:06d}.jpg' for j in range(num_images)],
        [Pose.from_yaw(float(j), 0.0, 0.0) for j in range(num_images)],
        thumbnails=thumbnails,
    )
    return read_map(write_map(content, folder / 'map'))


def time_queries(
    reranker: DescriptionsReranker, vpr_map: VprMap, k: int, queries: int
) -> tuple[float, float]:
    """(median ms per query, VLM calls per query) re-ranking a K-candidate shortlist."""
    rng = np.random.default_rng(1)
    times_ms = []
    calls_before = reranker.client.calls
    for _ in range(queries):
        image = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        query = Query(image, np.zeros(64, np.float32), time.monotonic() + 3600.0)
        candidates = [
            Candidate(
                j,
                vpr_map.content.image_names[j],
                vpr_map.content.poses[j],
                0.5 - 1e-4 * j,
                0.5 - 1e-4 * j,
            )
            for j in range(k)
        ]
        start = time.perf_counter()
        reranker.rerank(query, candidates, vpr_map)
        times_ms.append((time.perf_counter() - start) * 1000.0)
        if query.notes:
            raise RuntimeError(f're-ranking fell back: {query.notes}')
    return statistics.median(times_ms), (reranker.client.calls - calls_before) / queries


def measure_rerank(shortlists: Sequence[int], generation_s: float, queries: int) -> dict[str, Any]:
    """Time the ``descriptions`` re-ranker with precomputed and with online map descriptions.

    Returns ``{'describe_ms', 'map_images', 'rows'}``; each row is ``{'k', 'precomputed_calls',
    'precomputed_ms', 'online_calls', 'online_ms'}`` (VLM calls and median ms per query).
    """
    config = LocalizerConfig(
        rerank=RerankConfig(chain=('descriptions',), vlm_always=True, time_budget_s=3600.0)
    )
    embedder = TextEmbedder()
    with tempfile.TemporaryDirectory() as tmp:
        bare_map = synthetic_map(Path(tmp) / 'bare', max(shortlists))
        described_map = synthetic_map(Path(tmp) / 'described', max(shortlists))
        start = time.perf_counter()
        describe_map(described_map.path, config.vlm, config.rerank, StandInVlm(0.0), embedder)
        describe_ms = (time.perf_counter() - start) * 1000.0
        described_map = read_map(described_map.path)
        precomputed = DescriptionsReranker(
            config, described_map, StandInVlm(generation_s), embedder
        )
        online = DescriptionsReranker(config, bare_map, StandInVlm(generation_s), embedder)
        time_queries(precomputed, described_map, 2, 1)  # warm-up, not counted
        time_queries(online, bare_map, 2, 1)
        rows = []
        for k in shortlists:
            pre_ms, pre_calls = time_queries(precomputed, described_map, k, queries)
            on_ms, on_calls = time_queries(online, bare_map, k, queries)
            rows.append(
                {
                    'k': k,
                    'precomputed_calls': pre_calls,
                    'precomputed_ms': pre_ms,
                    'online_calls': on_calls,
                    'online_ms': on_ms,
                }
            )
    return {'describe_ms': describe_ms, 'map_images': max(shortlists), 'rows': rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--generation-s', type=float, default=0.1, help='stand-in VLM time per call in seconds'
    )
    parser.add_argument('--shortlists', type=int, nargs='+', default=[10, 50, 100])
    parser.add_argument('--queries', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1, help='torch threads (SBERT)')
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    result = measure_rerank(args.shortlists, args.generation_s, args.queries)
    print(
        f'stand-in VLM generation {args.generation_s:.3f} s/call, {args.queries} queries, '
        f'torch threads {args.threads}; map describe without generation time: '
        f'{result["describe_ms"]:.0f} ms for {result["map_images"]} images '
        f'(+ {result["map_images"]} x generation)'
    )
    print(
        '| K | precomputed: VLM calls | precomputed: ms/query | online: VLM calls '
        '| online: ms/query |'
    )
    print('|---|---|---|---|---|')
    for row in result['rows']:
        print(
            f'| {row["k"]} | {row["precomputed_calls"]:.0f} | {row["precomputed_ms"]:.0f} '
            f'| {row["online_calls"]:.0f} | {row["online_ms"]:.0f} |'
        )


if __name__ == '__main__':
    main()
