"""The map on disk: a versioned folder, atomic writes, no pickle.

```
MAP/
  manifest.json        format + version, what built it, build config, dims, counts, frame id
  codebook.npy         [K x D_local] float32, L2-normalised VLAD centres
  pca_mean.npy         [D_vlad] float32           (only when PCA is on)
  pca_components.npy   [D x D_vlad] float16       (only when PCA is on)
  descriptors.npy      [N x D] float16, L2-normalised global descriptors
  index.faiss          FAISS index                (only for approximate indexes; the exact
                                                   index is rebuilt from descriptors.npy)
  poses.csv            image,x,y,z,qx,qy,qz,qw    (empty quaternion = yaw unknown)
  thumbnails/NNNNNN.jpg down-scaled map images    (optional, for re-ranking)
  extras/<name>.<digest>.json|.npy  data added by later stages (descriptions, calibration,
                       ...); the manifest names the current file of each
```
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlm_vpr import __version__
from vlm_vpr.core.config import (
    APPROXIMATE_INDEX_TYPES,
    MapBuildConfig,
    from_flat_dict,
    to_flat_dict,
)
from vlm_vpr.core.errors import ConfigError, IncompatibleMapError, MapError
from vlm_vpr.core.retrieval import build_index, configure_index, index_type
from vlm_vpr.core.types import Pose

log = logging.getLogger(__name__)

MAP_FORMAT = 'vlm_vpr.map'
MAP_FORMAT_VERSION = 2  # 2: pca_components.npy float16, IVF/HNSW indexes over float16
POSE_COLUMNS = ['image', 'x', 'y', 'z', 'qx', 'qy', 'qz', 'qw']


@dataclass
class MapContent:
    """What a map holds in memory, before or after it is written."""

    build_config: MapBuildConfig
    codebook: np.ndarray  # [K x D_local] float32, L2-normalised rows
    descriptors: np.ndarray  # [N x D] float16, L2-normalised rows
    image_names: list[str]
    poses: list[Pose]
    # (mean [D_vlad] float32, components [D x D_vlad] float32, float16 on disk); None: no PCA
    pca: tuple[np.ndarray, np.ndarray] | None = None
    thumbnails: list[bytes] | None = None  # JPEG-encoded down-scaled map images, one per image
    source: str = ''  # where the images came from, for `map info`


@dataclass
class VprMap:
    """A map read from disk, ready to search. ``index`` is built or loaded by ``read_map``."""

    path: Path
    manifest: dict[str, Any]
    content: MapContent
    index: Any = None  # faiss.Index over content.descriptors
    positions_xyz: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # [N x 3] f64

    @property
    def build_config(self) -> MapBuildConfig:
        return self.content.build_config

    @property
    def frame_id(self) -> str:
        return str(self.manifest['frame_id'])

    def __len__(self) -> int:
        return len(self.content.image_names)

    def thumbnail(self, map_index: int) -> np.ndarray | None:
        """The stored down-scaled image [H x W x 3] uint8 BGR, or None if the map has none."""
        import cv2

        path = self.path / 'thumbnails' / f'{map_index:06d}.jpg'
        image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        return image

    def extra_path(self, name: str) -> Path | None:
        """Path of a stored extra, the file the manifest names (``extras/<name>.<digest>.json``
        or ``.npy``; maps from before the digest layout: ``extras/<name>.json``), None if
        absent."""
        rel = self.manifest.get('extras', {}).get(name)
        return self.path / rel if rel else None

    def read_extra_json(self, name: str) -> Any | None:
        path = self.extra_path(name)
        if path is None:
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MapError(
                f'map extra {name!r} at {path} is unreadable ({exc}); rebuild it'
            ) from exc

    def read_extra_array(self, name: str) -> np.ndarray | None:
        path = self.extra_path(name)
        if path is None:
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise MapError(
                f'map extra {name!r} at {path} is unreadable ({exc}); rebuild it'
            ) from exc


def write_map(content: MapContent, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``content`` as a map folder atomically (temp folder in the same parent, rename)."""
    out = Path(out_dir)
    n = len(content.image_names)
    _check_content(content)
    if out.exists() and not overwrite:
        raise MapError(
            f'{out} exists; pass overwrite=True (CLI: --overwrite) or choose another path'
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', dir=out.parent))
    try:
        np.save(tmp / 'codebook.npy', content.codebook.astype(np.float32))
        np.save(tmp / 'descriptors.npy', np.asarray(content.descriptors, dtype=np.float16))
        if content.pca is not None:
            np.save(tmp / 'pca_mean.npy', content.pca[0].astype(np.float32))
            np.save(tmp / 'pca_components.npy', content.pca[1].astype(np.float16))
        _write_poses(tmp / 'poses.csv', content.image_names, content.poses)
        if content.thumbnails is not None:
            _write_thumbnails(tmp / 'thumbnails', content.thumbnails)
        kind = index_type(content.build_config.index, n)
        if kind != 'flat':
            import faiss

            faiss.write_index(
                build_index(content.descriptors, content.build_config.index),
                str(tmp / 'index.faiss'),
            )
        manifest = {
            'format': MAP_FORMAT,
            'format_version': MAP_FORMAT_VERSION,
            'created_by': f'vlm_vpr {__version__}',
            'created_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
            'source': content.source,
            'frame_id': content.build_config.frame_id,
            'build_config': to_flat_dict(content.build_config),
            'num_images': n,
            'descriptor_dim': int(content.descriptors.shape[1]),
            'local_dim': int(content.codebook.shape[1]),
            'num_clusters': int(content.codebook.shape[0]),
            'pca': content.pca is not None,
            'index_type': kind,
            'thumbnails': content.thumbnails is not None,
            'extras': {},
        }
        (tmp / 'manifest.json').write_text(json.dumps(manifest, indent=2) + '\n')
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info('wrote map %s (%d images, %d-d)', out, n, content.descriptors.shape[1])
    return out


def read_map(map_dir: str | Path, load_index: bool = True) -> VprMap:
    """Read and check a map folder; every failure raises MapError naming the fix."""
    path = Path(map_dir)
    manifest, build_config = _read_manifest(path)
    n, dim = _int_field(manifest, 'num_images'), _int_field(manifest, 'descriptor_dim')
    codebook_shape = (_int_field(manifest, 'num_clusters'), _int_field(manifest, 'local_dim'))
    codebook = _load_array(path, 'codebook.npy', codebook_shape)
    descriptors = _load_array(path, 'descriptors.npy', (n, dim))
    pca = None
    if manifest.get('pca'):
        pca_components = _load_array(path, 'pca_components.npy', (dim, None)).astype(np.float32)
        pca = (_load_array(path, 'pca_mean.npy', (pca_components.shape[1],)), pca_components)
    image_names, poses = _read_poses(path / 'poses.csv')
    if len(image_names) != n:
        raise MapError(
            f'{path}/poses.csv has {len(image_names)} rows but the manifest says {n} '
            'images; the map is inconsistent, rebuild it'
        )
    content = MapContent(
        build_config,
        codebook,
        descriptors,
        image_names,
        poses,
        pca,
        None,
        str(manifest.get('source', '')),
    )
    vpr_map = VprMap(
        path,
        manifest,
        content,
        positions_xyz=np.array([[p.x, p.y, p.z] for p in poses], dtype=np.float64).reshape(-1, 3),
    )
    if load_index:
        vpr_map.index = _load_index(vpr_map)
    return vpr_map


def _read_manifest(path: Path) -> tuple[dict[str, Any], MapBuildConfig]:
    """The checked manifest of the map folder ``path`` and its build config (MapError naming
    the fix); every field read from it later (by read_map and VprMap) is checked here."""
    manifest_path = path / 'manifest.json'
    if not path.is_dir():
        raise MapError(f'map folder {path} does not exist; build one with `vlm-vpr map build`')
    if not manifest_path.is_file():
        raise MapError(
            f'{path} has no manifest.json: not a vlm_vpr map (or an interrupted '
            'build); rebuild it with `vlm-vpr map build`'
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MapError(f'{manifest_path} is not valid JSON ({exc}); rebuild the map') from exc
    if not isinstance(manifest, dict) or manifest.get('format') != MAP_FORMAT:
        raise MapError(f'{manifest_path} is not a {MAP_FORMAT} manifest; rebuild the map')
    version = manifest.get('format_version')
    if version != MAP_FORMAT_VERSION:
        raise MapError(
            f'map format version {version!r} is not supported (this vlm_vpr reads '
            f'version {MAP_FORMAT_VERSION}); rebuild the map with this version'
        )
    try:  # every field read later (by read_map and VprMap) is checked here: a MapError
        if not isinstance(manifest['build_config'], dict):
            raise TypeError(f'build_config is {type(manifest["build_config"]).__name__}')
        build_config = from_flat_dict(MapBuildConfig, manifest['build_config'])
        for key in ('num_images', 'descriptor_dim', 'num_clusters', 'local_dim'):
            _int_field(manifest, key)
        if 'frame_id' not in manifest:  # VprMap.frame_id reads it
            raise KeyError('frame_id')
        extras = manifest.get('extras', {})
        if not isinstance(extras, dict) or not all(isinstance(v, str) for v in extras.values()):
            raise TypeError(f'extras is {extras!r}, not a mapping of names to files')
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise MapError(
            f'{manifest_path} is incomplete or invalid ({type(exc).__name__}: {exc}); '
            'rebuild the map'
        ) from exc
    return manifest, build_config


def _int_field(manifest: dict[str, Any], key: str) -> int:
    """``manifest[key]`` as an int; KeyError when absent, ValueError naming it otherwise."""
    value = manifest[key]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f'{key} is {value!r}, not an integer') from None


def check_compatible(vpr_map: VprMap, backbone: str | None = None, **features: Any) -> None:
    """Raise IncompatibleMapError if the query side would use other features than the map."""
    map_features = vpr_map.build_config.features
    if backbone is not None and backbone != map_features.backbone:
        raise IncompatibleMapError(
            f'map {vpr_map.path} was built with backbone {map_features.backbone!r} but the query '
            f'uses {backbone!r}; use --backbone {map_features.backbone} or rebuild the map'
        )
    for key, value in features.items():
        if getattr(map_features, key) != value:
            raise IncompatibleMapError(
                f'map {vpr_map.path} has features.{key}={getattr(map_features, key)!r} but the '
                f'query uses {value!r}; drop the override or rebuild the map'
            )


def write_extra(map_dir: str | Path, name: str, value: Any) -> Path:
    """Add or replace ``extras/<name>`` (see :func:`write_extras`)."""
    return write_extras(map_dir, {name: value})[name]


def write_extras(map_dir: str | Path, values: dict[str, Any]) -> dict[str, Path]:
    """Add or replace the extras ``values`` (a numpy array -> .npy, anything else -> .json),
    committed together.

    Each value goes to a file of its own, ``extras/<name>.<digest>.<suffix>`` (the digest of
    its bytes), beside the files the manifest names; then the manifest is replaced (the single
    commit point) and the files it no longer names are deleted. A crash or a failed write
    leaves the manifest naming the old set or the new one, never a mix; the rest of the map
    is untouched.
    """
    path = Path(map_dir)
    manifest = _read_manifest(path)[0]  # not the arrays: map describe saves every 20 images
    extras = manifest.setdefault('extras', {})
    (path / 'extras').mkdir(exist_ok=True)
    written = {}
    for name, value in values.items():
        if isinstance(value, np.ndarray):
            buffer = io.BytesIO()
            np.save(buffer, value, allow_pickle=False)
            data, suffix = buffer.getvalue(), 'npy'
        else:
            data, suffix = (json.dumps(value, indent=1) + '\n').encode(), 'json'
        rel = f'extras/{name}.{hashlib.sha256(data).hexdigest()[:16]}.{suffix}'
        _write_bytes_atomic(path / rel, data)
        extras[name] = rel
        written[name] = path / rel
    _write_bytes_atomic(path / 'manifest.json', (json.dumps(manifest, indent=2) + '\n').encode())
    for name, file in written.items():  # older versions, and files of a write that crashed
        for stale in (path / 'extras').glob(f'{name}.*'):
            if stale != file:
                _remove_quietly(stale)
    return written


def project_descriptor(vlad: np.ndarray, vpr_map: VprMap) -> np.ndarray:
    """Apply the map's PCA (if any) to VLAD vectors [Q x D_vlad] -> [Q x D], L2-normalised."""
    from vlm_vpr.core.vlad import apply_pca

    pca = vpr_map.content.pca
    if pca is None:
        return vlad.astype(np.float32)
    return apply_pca(vlad, *pca)


def _load_index(vpr_map: VprMap) -> Any:
    """The exact index is rebuilt from the descriptors (fast); approximate ones are read."""
    kind = vpr_map.manifest.get('index_type')
    if kind not in ('flat', *APPROXIMATE_INDEX_TYPES):
        raise MapError(f'{vpr_map.path} has unknown index_type {kind!r}; rebuild the map')
    if kind == 'flat':
        return build_index(
            vpr_map.content.descriptors, vpr_map.build_config.index, force_flat=True
        )
    import faiss

    index_path = vpr_map.path / 'index.faiss'
    if not index_path.is_file():
        raise MapError(f'{index_path} is missing for a {kind} map; rebuild the map')
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:
        raise MapError(f'{index_path} is corrupt ({exc}); rebuild the map') from exc
    if index.ntotal != len(vpr_map):
        raise MapError(
            f'{index_path} holds {index.ntotal} vectors, the map {len(vpr_map)}; rebuild the map'
        )
    configure_index(index, vpr_map.build_config.index)
    return index


def _check_content(content: MapContent) -> None:
    n = len(content.image_names)
    if n == 0:
        raise MapError('a map needs at least one image')
    if content.descriptors.ndim != 2 or content.descriptors.shape[0] != n:
        raise MapError(f'descriptors {content.descriptors.shape} do not match {n} images')
    if len(content.poses) != n:
        raise MapError(f'{len(content.poses)} poses for {n} images')
    if content.thumbnails is not None and len(content.thumbnails) != n:
        raise MapError(f'{len(content.thumbnails)} thumbnails for {n} images')


def _load_array(path: Path, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
    file = path / name
    if not file.is_file():
        raise MapError(f'{file} is missing; the map is incomplete, rebuild it')
    try:
        array = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MapError(f'{file} is corrupt ({exc}); rebuild the map') from exc
    if array.ndim != len(shape) or any(
        s is not None and s != a for s, a in zip(shape, array.shape)
    ):
        raise MapError(
            f'{file} has shape {array.shape}, the manifest expects {shape}; '
            'the map is inconsistent, rebuild it'
        )
    return array


def _write_poses(file: Path, names: list[str], poses: list[Pose]) -> None:
    with file.open('w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(POSE_COLUMNS)
        for name, p in zip(names, poses):
            quat = [p.qx, p.qy, p.qz, p.qw] if p.yaw_known else []
            # repr of a float round-trips exactly; float() first: a numpy scalar's repr is
            # 'np.float64(...)'
            values = [repr(float(v)) for v in (p.x, p.y, p.z, *quat)]
            writer.writerow([name, *values, *[''] * (4 - len(quat))])


def _read_poses(file: Path) -> tuple[list[str], list[Pose]]:
    if not file.is_file():
        raise MapError(f'{file} is missing; the map is incomplete, rebuild it')
    names: list[str] = []
    poses: list[Pose] = []
    with file.open(newline='') as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != POSE_COLUMNS:
            raise MapError(
                f'{file} header is {reader.fieldnames}, expected {POSE_COLUMNS}; rebuild the map'
            )
        for row_no, row in enumerate(reader, start=2):
            try:
                x, y, z = float(row['x']), float(row['y']), float(row['z'])
                if row['qw']:
                    pose = Pose(
                        x,
                        y,
                        z,
                        float(row['qx']),
                        float(row['qy']),
                        float(row['qz']),
                        float(row['qw']),
                    )
                else:
                    pose = Pose(x, y, z, yaw_known=False)
            except (TypeError, ValueError) as exc:
                raise MapError(
                    f'{file} line {row_no} is not a valid pose ({exc}); rebuild the map'
                ) from exc
            names.append(row['image'])
            poses.append(pose)
    return names, poses


def _write_thumbnails(folder: Path, thumbnails: list[bytes]) -> None:
    folder.mkdir()
    for i, jpeg in enumerate(thumbnails):
        (folder / f'{i:06d}.jpg').write_bytes(jpeg)


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f'.{out.name}.old-{os.getpid()}')
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _write_bytes_atomic(file: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=file.parent, prefix=f'.{file.name}.')
    try:
        with os.fdopen(fd, 'wb') as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename: a power cut keeps one
        os.replace(tmp_name, file)
    except BaseException:
        _remove_quietly(tmp_name)
        raise


def _remove_quietly(file: str | Path) -> None:
    """Delete a temporary file after a failed write (the write's error is the one to see)."""
    with contextlib.suppress(OSError):
        os.unlink(file)
