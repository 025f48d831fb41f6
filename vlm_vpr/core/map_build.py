"""Building a map from posed images: codebook, VLAD descriptors, PCA, thumbnails, index."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from vlm_vpr.core.bags import BASE_FRAME, read_posed_images
from vlm_vpr.core.config import MapBuildConfig
from vlm_vpr.core.datasets import read_poses_csv
from vlm_vpr.core.errors import BagError, DatasetError, ImageError, MapError
from vlm_vpr.core.images import read_image, resize_shorter_side
from vlm_vpr.core.map_format import MapContent, write_map
from vlm_vpr.core.threads import limit_threads
from vlm_vpr.core.types import Pose
from vlm_vpr.core.vlad import aggregate_vlad, apply_pca, fit_codebook, fit_pca

log = logging.getLogger(__name__)

T = TypeVar('T')


def build_map_from_folder(
    images_dir: str | Path,
    poses_csv: str | Path,
    out_dir: str | Path,
    config: MapBuildConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build a map from an image folder and a CSV (header image,x,y[,yaw]) naming its images.

    Rows with empty x, y (images with no known place) are skipped.
    """
    traversal = read_poses_csv(poses_csv, images_dir)
    keep = [i for i in range(len(traversal)) if np.isfinite(traversal.xy[i]).all()]
    if not keep:
        raise DatasetError(f'{poses_csv} has no row with x, y: nothing to map')
    paths = [traversal.image_paths[i] for i in keep]
    return build_map(
        names=[p.name for p in paths],
        poses=[traversal.pose(i) for i in keep],
        load_image=lambda j: read_image(paths[j]),
        out_dir=out_dir,
        config=config,
        source=str(Path(images_dir).resolve()),
        overwrite=overwrite,
        progress=progress,
    )


def build_map_from_bag(
    bag: str | Path,
    image_topic: str,
    pose_topic: str,
    out_dir: str | Path,
    config: MapBuildConfig | None = None,
    *,
    base_frame: str = BASE_FRAME,
    min_distance_m: float = 1.0,
    min_rotation_deg: float = 15.0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build a map from a ROS 2 bag: keyframes of ``image_topic`` posed from ``pose_topic``.

    Keyframes are staged as PNG files in a temporary folder, so memory stays bounded.
    """
    import cv2

    if min_distance_m < 0 or min_rotation_deg < 0:
        raise BagError(
            f'--min-distance-m and --min-rotation-deg must be >= 0, got {min_distance_m:g} '
            f'and {min_rotation_deg:g}'
        )
    config = config or MapBuildConfig()
    frames = read_posed_images(
        bag,
        image_topic,
        pose_topic,
        map_frame=config.frame_id,
        base_frame=base_frame,
        min_distance_m=min_distance_m,
        min_rotation_rad=math.radians(min_rotation_deg),
        progress=progress,
    )
    with tempfile.TemporaryDirectory(prefix='vlm_vpr_bag_') as tmp:
        names, poses, paths = [], [], []
        for frame in frames:
            paths.append(Path(tmp) / f'{frame.name}.png')
            cv2.imwrite(str(paths[-1]), frame.image_bgr)
            names.append(frame.name)
            poses.append(frame.pose)
        return build_map(
            names,
            poses,
            lambda i: read_image(paths[i]),
            out_dir,
            config,
            source=str(Path(bag).resolve()),
            overwrite=overwrite,
            progress=progress,
        )


def build_map(
    names: Sequence[str],
    poses: Sequence[Pose],
    load_image: Callable[[int], np.ndarray],
    out_dir: str | Path,
    config: MapBuildConfig | None = None,
    *,
    source: str = '',
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build and write a map; ``load_image(i)`` returns image i as [H x W x 3] uint8 BGR.

    Every image is read once. Memory stays bounded: the codebook is fitted on the local
    features of at most ``vlad.kmeans_max_images`` images (evenly spread, kept until they are
    aggregated); the other images are aggregated and dropped batch by batch; thumbnails are
    kept as JPEG bytes.
    """
    from vlm_vpr.backends.features import create_extractor

    config = config or MapBuildConfig()
    n = len(names)
    if n == 0 or len(poses) != n:
        raise MapError(
            f'need one pose per image and at least one image (got {n} images, {len(poses)} poses)'
        )
    extractor = create_extractor(config.features, config.runtime)
    limit_threads(config.runtime.num_threads, blas_threads=1)  # see threads.limit_threads
    sample_ids = np.unique(
        np.linspace(0, n - 1, min(n, config.vlad.kmeans_max_images)).astype(int)
    )
    batch = config.runtime.batch_size
    size_px = config.thumbnail_size_px  # 0: no thumbnails
    thumbnails: dict[int, bytes] = {}

    def read(ids: Iterable[int]) -> dict[int, np.ndarray]:
        """Images by id; their thumbnails are encoded now, so each image is read once."""
        images = {int(i): load_image(int(i)) for i in ids}
        if size_px:
            thumbnails.update((i, encode_thumbnail(im, size_px)) for i, im in images.items())
        return images

    sample_features: dict[int, np.ndarray] = {}  # image id -> its local features [M x D]
    chunks = [sample_ids[i : i + batch] for i in range(0, len(sample_ids), batch)]
    for chunk in _progress(chunks, progress, 'codebook features'):
        images = read(chunk)
        sample_features.update(
            (i, feats.flat) for i, feats in zip(images, extractor.extract(list(images.values())))
        )
    codebook = fit_codebook(list(sample_features.values()), config.vlad)

    vlads = np.zeros((n, codebook.size), dtype=np.float16)  # halves build memory
    for start in _progress(range(0, n, batch), progress, 'map images', total=math.ceil(n / batch)):
        ids = range(start, min(n, start + batch))
        images = read([i for i in ids if i not in sample_features])
        for i, feats in zip(images, extractor.extract(list(images.values()))):
            vlads[i] = aggregate_vlad(feats.flat, codebook, config.vlad)
        for i in ids:
            if i in sample_features:
                vlads[i] = aggregate_vlad(sample_features.pop(i), codebook, config.vlad)

    pca = fit_pca(vlads, config.vlad)
    descriptors = project_in_chunks(vlads, *pca) if pca else vlads
    content = MapContent(
        config,
        codebook,
        descriptors,
        list(names),
        list(poses),
        pca,
        [thumbnails[i] for i in range(n)] if size_px else None,
        source,
    )
    return write_map(content, out_dir, overwrite=overwrite)


def project_in_chunks(
    vlads: np.ndarray, mean: np.ndarray, components: np.ndarray, chunk_rows: int = 4096
) -> np.ndarray:
    """``apply_pca`` of VLAD vectors [N x D_vlad] -> [N x D] float16, ``chunk_rows`` at a time,
    so no float32 copy of all VLAD vectors is made."""
    out = np.empty((len(vlads), components.shape[0]), dtype=np.float16)
    for start in range(0, len(vlads), chunk_rows):
        out[start : start + chunk_rows] = apply_pca(
            vlads[start : start + chunk_rows], mean, components
        )
    return out


def encode_thumbnail(image_bgr: np.ndarray, size_px: int) -> bytes:
    """JPEG bytes of the image with its shorter side scaled down to ``size_px``."""
    import cv2

    small = (
        image_bgr
        if min(image_bgr.shape[:2]) <= size_px
        else resize_shorter_side(image_bgr, size_px)
    )
    ok, jpeg = cv2.imencode('.jpg', small, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise ImageError('could not encode a thumbnail')
    return jpeg.tobytes()


def _progress(
    items: Iterable[T], enabled: bool, desc: str, total: int | None = None
) -> Iterable[T]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit='it', leave=False)
