"""build_map reads every image once and keeps thumbnails in map order (real campus_loop)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from vlm_vpr.core.config import MapBuildConfig, VladConfig
from vlm_vpr.core.datasets import read_traversal
from vlm_vpr.core.images import read_image
from vlm_vpr.core.map_build import build_map, encode_thumbnail
from vlm_vpr.core.map_format import read_map


def test_each_image_is_read_once_and_thumbnails_follow_the_map_order(
    data_root: Path, tmp_path: Path
) -> None:
    traversal = read_traversal(data_root / 'campus_loop' / 'map')
    n = len(traversal)
    reads: Counter[int] = Counter()

    def load(i: int):
        reads[i] += 1
        return read_image(traversal.image_paths[i])

    # a codebook sample of 10 images: both the sample pass and the main pass are used
    config = MapBuildConfig(vlad=VladConfig(num_clusters=16, kmeans_max_images=10))
    names = [p.name for p in traversal.image_paths]
    out = build_map(
        names,
        [traversal.pose(i) for i in range(n)],
        load,
        tmp_path / 'map',
        config,
        progress=False,
    )

    assert reads == Counter(range(n))
    assert len(read_map(out)) == n
    for i in (0, 1, n // 2, n - 1):
        expected = encode_thumbnail(read_image(traversal.image_paths[i]), 240)
        assert (out / 'thumbnails' / f'{i:06d}.jpg').read_bytes() == expected
