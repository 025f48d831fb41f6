"""Reading data sets in the shared layout (``dataset.yaml`` + ``<traversal>/poses.csv``)."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm_vpr.core.errors import DatasetError
from vlm_vpr.core.types import Pose

DATA_ENV = 'VLM_VPR_DATA'


def default_data_root() -> Path:
    """``$VLM_VPR_DATA``, else ``../shared/data`` beside the current directory (the repo root)."""
    return Path(os.environ.get(DATA_ENV, Path.cwd().parent / 'shared' / 'data'))


@dataclass(frozen=True)
class Traversal:
    """One pass along the route: image paths with poses (NaN x, y = no true match in the map)."""

    name: str
    image_paths: list[Path]
    xy: np.ndarray  # [N x 2] float64, NaN rows for out-of-map queries
    yaw_rad: np.ndarray  # [N] float64, NaN where unknown

    def __len__(self) -> int:
        return len(self.image_paths)

    def pose(self, i: int) -> Pose:
        yaw = float(self.yaw_rad[i])
        return Pose.from_yaw(
            float(self.xy[i, 0]), float(self.xy[i, 1]), yaw if math.isfinite(yaw) else None
        )


@dataclass(frozen=True)
class Protocol:
    name: str
    map: str
    query: str
    tolerance: float


@dataclass(frozen=True)
class Dataset:
    root: Path
    name: str
    units: str  # 'm' or 'frames'
    protocols: dict[str, Protocol]

    def traversal(self, name: str) -> Traversal:
        return read_traversal(self.root / name)

    def protocol(self, name: str) -> Protocol:
        if name not in self.protocols:
            raise DatasetError(
                f'{self.name} has no protocol {name!r}; choose one of {sorted(self.protocols)}'
            )
        return self.protocols[name]


def read_dataset(root: str | Path) -> Dataset:
    import yaml

    root = Path(root)
    meta_path = root / 'dataset.yaml'
    if not meta_path.is_file():
        raise DatasetError(
            f'{root} has no dataset.yaml; point --dataset at a data set folder '
            f'(e.g. ../shared/data/gardens_point)'
        )
    try:
        meta = yaml.safe_load(meta_path.read_text())
        protocols = {
            p['name']: Protocol(p['name'], p['map'], p['query'], float(p['tolerance']))
            for p in meta['protocols']
        }
        return Dataset(root, str(meta['name']), str(meta['units']), protocols)
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f'{meta_path} is malformed ({exc})') from exc


def read_traversal(folder: str | Path) -> Traversal:
    """Read a traversal folder in the shared layout (``poses.csv`` + ``images/``)."""
    folder = Path(folder)
    return read_poses_csv(folder / 'poses.csv', folder / 'images', name=folder.name)


def read_poses_csv(poses_csv: str | Path, images_dir: str | Path, name: str = '') -> Traversal:
    """Read ``poses_csv`` (header image,x,y[,yaw]) naming images inside ``images_dir``."""
    poses_csv, images_dir = Path(poses_csv), Path(images_dir)
    if not poses_csv.is_file():
        raise DatasetError(
            f'{poses_csv} does not exist (expected a CSV with header image,x,y,yaw)'
        )
    paths: list[Path] = []
    rows: list[tuple[float, float, float]] = []
    with poses_csv.open(newline='') as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {'image', 'x', 'y'} <= set(reader.fieldnames):
            raise DatasetError(f'{poses_csv} needs the columns image,x,y[,yaw]')
        for line, row in enumerate(reader, start=2):
            missing = [k for k in ('image', 'x', 'y') if row.get(k) is None]
            if missing:  # a short row: DictReader fills the absent fields with None
                raise DatasetError(
                    f'{poses_csv} line {line}: missing field(s) {", ".join(missing)} '
                    '(each row needs image,x,y[,yaw]; leave x and y empty, not out, '
                    'for a query with no true match)'
                )
            try:
                rows.append((_num(row['x']), _num(row['y']), _num(row.get('yaw') or '')))
            except ValueError as exc:
                raise DatasetError(f'{poses_csv} line {line}: {exc}') from exc
            path = images_dir / row['image']
            if not path.is_file():
                raise DatasetError(
                    f'image {row["image"]} listed in {poses_csv} is missing from {images_dir}'
                )
            paths.append(path)
    data = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return Traversal(name or images_dir.name, paths, data[:, :2], data[:, 2])


def _num(text: str) -> float:
    return float(text) if text.strip() else math.nan
