"""Evaluation on a data set protocol: Recall@K, per-query results, per-stage latency, plots."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vlm_vpr.core.calibration import (
    SPLIT_BLOCK,
    fraction,
    open_set_report,
    plot_precision_recall,
    plot_reliability,
)
from vlm_vpr.core.confidence import Calibration
from vlm_vpr.core.config import ConfidenceConfig, LocalizerConfig, MapBuildConfig
from vlm_vpr.core.datasets import Dataset, Protocol, Traversal, read_dataset, read_poses_csv
from vlm_vpr.core.errors import ConfigError, DatasetError, MapError
from vlm_vpr.core.images import read_image
from vlm_vpr.core.localizer import Localizer
from vlm_vpr.core.map_build import build_map, build_map_from_folder
from vlm_vpr.core.map_format import VprMap, check_compatible, read_map
from vlm_vpr.core.sequence import SequenceMatcher

log = logging.getLogger(__name__)
RECALL_KS = (1, 5, 10)


def evaluate(
    dataset_dir: str | Path,
    protocol: str,
    build_config: MapBuildConfig | None = None,
    localizer_config: LocalizerConfig | None = None,
    *,
    map_dir: str | Path | None = None,
    max_queries: int | None = None,
    progress: bool = True,
    holdout: str | None = None,
    split: str | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the protocol's map, localise every query, and report.

    ``map_dir``: an existing map there is reused (its backbone must match ``build_config``);
    otherwise the map is built there (or in a temporary folder when None).
    ``holdout``: ``'A:B'`` (see :func:`parse_map_range`), a stretch of the map to leave out, a
    true open set: the queries run against a map built without those images (codebook and PCA
    included; kept beside ``map_dir`` as ``<map_dir>.holdout-A-B`` and reused), which uses the
    calibration of the full map (``vlm-vpr calibrate`` stores its fit there).
    ``split``: see :func:`run_queries`.
    ``calibration``: the confidence model; None: the map's, as the node uses (``vlm-vpr
    calibrate`` passes the defaults: it refits the confidence on the report's rows).
    Returns the report dict described in the README (``recall``, ``timing_ms``, ``per_query``,
    ``open_set``).
    """
    dataset = read_dataset(dataset_dir)
    proto = dataset.protocol(protocol)
    build_config = build_config or MapBuildConfig()
    localizer_config = localizer_config or LocalizerConfig()
    with tempfile.TemporaryDirectory(prefix='vlm_vpr_eval_') as tmp:
        path = Path(map_dir) if map_dir is not None else Path(tmp) / 'map'
        if not (path / 'manifest.json').is_file():
            map_folder = dataset.root / proto.map
            build_map_from_folder(
                map_folder / 'images',
                map_folder / 'poses.csv',
                path,
                build_config,
                progress=progress,
            )
        vpr_map = read_map(path)
        check_compatible(vpr_map, build_config.features.backbone)
        _check_built_from(vpr_map, dataset.root / proto.map)
        held_out = parse_map_range(holdout, len(vpr_map)) if holdout else None
        if calibration is None:
            calibration = Calibration.from_map(vpr_map, localizer_config)  # what the node uses
        if held_out is not None:
            vpr_map = read_map(
                build_holdout_map(vpr_map, dataset.traversal(proto.map), held_out, progress)
            )
        localizer = Localizer(vpr_map, localizer_config, calibration)
        queries = dataset.traversal(proto.query)
        report = run_queries(
            localizer, dataset, protocol, queries, max_queries, progress, split=split
        )
        if held_out is not None:
            report['holdout_map_ids'] = [int(held_out[0]), int(held_out[-1]) + 1]
        return report


def _check_built_from(vpr_map: VprMap, traversal_dir: Path) -> None:
    """DatasetError unless the map was built from ``traversal_dir``'s images (compared by the
    last three parts of the stored source, so a data folder that moved still matches; image
    names alone cannot tell Gardens Point's traversals apart)."""
    source = vpr_map.content.source
    expected = (Path(traversal_dir) / 'images').resolve().parts[-3:]  # as map build stores it
    if source and Path(source).parts[-3:] != expected:
        raise DatasetError(
            f'map {vpr_map.path} was built from {source}, not from {"/".join(expected)}: '
            'drop --map or point it to a new folder'
        )


def build_holdout_map(
    vpr_map: VprMap, traversal: Traversal, held_out: np.ndarray, progress: bool = True
) -> Path:
    """The map of ``traversal`` (the one ``vpr_map`` was built from) without the map ids
    ``held_out`` [M] int64, built with ``vpr_map``'s settings beside it as
    ``<map>.holdout-A-B``; reused when one with the same images and settings is there."""
    kept = [i for i in range(len(traversal)) if np.isfinite(traversal.xy[i]).all()]
    if [traversal.image_paths[i].name for i in kept] != vpr_map.content.image_names:
        raise DatasetError(
            f'map {vpr_map.path} was not built from {traversal.name} of this '
            'data set: build it again (drop --map or point it to a new folder)'
        )
    kept = [kept[j] for j in np.setdiff1d(np.arange(len(kept)), held_out)]
    names = [traversal.image_paths[i].name for i in kept]
    out = Path(vpr_map.path).with_name(
        f'{Path(vpr_map.path).name}.holdout-{held_out[0]}-{held_out[-1] + 1}'
    )
    try:
        old = read_map(out) if (out / 'manifest.json').is_file() else None
    except MapError:  # e.g. an older map format: build it again
        old = None
    if old is not None and (old.content.image_names, old.build_config) == (
        names,
        vpr_map.build_config,
    ):
        return out
    return build_map(
        names,
        [traversal.pose(i) for i in kept],
        lambda j: read_image(traversal.image_paths[kept[j]]),
        out,
        vpr_map.build_config,
        source=vpr_map.content.source,
        overwrite=True,
        progress=progress,
    )


def run_queries(
    localizer: Localizer,
    dataset: Dataset,
    protocol: str,
    queries: Traversal,
    max_queries: int | None = None,
    progress: bool = True,
    *,
    holdout: str | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """Localise each query image and score it against the protocol's tolerance.

    holdout: ``'A:B'``, a stretch of map images left out of the search (see
      :func:`parse_map_range`; the map's codebook and PCA still saw them: :func:`evaluate`
      rebuilds the map without them instead); queries with no searchable map image within
      tolerance of their true place (or with empty x, y) are out of the map: correct is to
      reject them.
    split: ``'fit'`` or ``'test'``: report only the queries in even or odd blocks of
      ``SPLIT_BLOCK`` consecutive queries (calibrate on one, measure on the other).
    With ``sequence.length`` > 1 every query is localised in order (the sequence needs the
    past frames) and the :class:`~vlm_vpr.core.sequence.SequenceMatcher` fuses the results.
    """
    proto = dataset.protocol(protocol)
    map_xy = localizer.map.positions_xyz[:, :2]
    held_out = parse_map_range(holdout, len(map_xy)) if holdout else np.zeros(0, np.int64)
    searchable = np.setdiff1d(np.arange(len(map_xy)), held_out) if holdout else None
    searchable_xy = map_xy if searchable is None else map_xy[searchable]
    sequence = SequenceMatcher(localizer) if localizer.config.sequence.length > 1 else None
    if sequence is not None and max_queries is not None:
        raise ConfigError(
            '--max-queries picks spread-out queries but sequence matching needs '
            'consecutive ones: drop --max-queries or use --sequence 1'
        )
    if split not in (None, 'fit', 'test'):
        raise ConfigError(f"split must be 'fit' or 'test', got {split!r}")
    count = len(queries) if max_queries is None else min(max(max_queries, 0), len(queries))
    spread = np.unique(np.linspace(0, len(queries) - 1, count).astype(int))
    wanted = {
        int(i) for i in spread if split is None or (i // SPLIT_BLOCK) % 2 == (split == 'test')
    }
    if not wanted:
        raise DatasetError(_no_query_selected(len(queries), max_queries, split))
    # a sequence votes over every query in order (max_queries is refused with one); it reports
    # the wanted ones
    ids = sorted(wanted) if sequence is None else list(range(len(queries)))
    per_query = []
    iterator = ids
    if progress:
        from tqdm import tqdm

        iterator = tqdm(ids, desc=f'{dataset.name}/{protocol}', leave=False)
    for i in iterator:
        image = read_image(queries.image_paths[i])
        result = localizer.localize(image, submap=searchable)
        if sequence is not None:
            result = sequence.update(result, submap=searchable)
        if i not in wanted:
            continue
        top = [c.map_index for c in result.candidates]
        truth = queries.xy[i]
        in_map = bool(np.isfinite(truth).all()) and bool(
            within_tolerance(searchable_xy, truth, proto.tolerance, dataset.units).any()
        )
        hits = (
            within_tolerance(map_xy[top], truth, proto.tolerance, dataset.units)
            if in_map
            else np.zeros(len(top), bool)
        )
        per_query.append(
            {
                'query': queries.image_paths[i].name,
                'truth_xy': truth.tolist() if in_map else None,
                'top_ids': top,
                'top_names': [c.image_name for c in result.candidates],
                'top_scores': [round(c.score, 6) for c in result.candidates],
                'first_correct_rank': int(np.argmax(hits)) + 1 if hits.any() else None,
                'pose_xy': [result.pose.x, result.pose.y],
                'confidence': result.confidence,
                'evidence': result.evidence,
                'timing_ms': result.timing_ms,
                'notes': result.notes,
            }
        )
    report = summarize(
        per_query, dataset, protocol, localizer.config.confidence.initial_pose_threshold
    )
    report.update(
        {
            'holdout_map_ids': [int(held_out.min()), int(held_out.max()) + 1]
            if len(held_out)
            else None,
            'split': split,
            'sequence_length': localizer.config.sequence.length,
        }
    )
    return report


def _no_query_selected(num_queries: int, max_queries: int | None, split: str | None) -> str:
    """Why :func:`run_queries` has no query to report, and what to change."""
    if num_queries == 0:
        return 'the protocol has no query images'
    if max_queries is not None and max_queries < 1:
        return f'--max-queries {max_queries} selects no query: give 1 or more (or drop it)'
    selected = '' if max_queries is None else f' (--max-queries {max_queries})'
    return (
        f'--split {split} selects no query: the protocol has {num_queries} queries{selected}, '
        f'split in blocks of {SPLIT_BLOCK} (fit: blocks 1, 3, ...; test: 2, 4, ...): '
        'use more queries or drop --split'
    )


def posed_queries(
    images_dir: str | Path, poses_csv: str | Path, tolerance: float, units: str
) -> tuple[Dataset, str, Traversal]:
    """(dataset, protocol name, queries) for :func:`run_queries` from any posed image folder."""
    if units not in ('m', 'frames'):
        raise ConfigError(f"units must be 'm' or 'frames', got {units!r}")
    if not tolerance > 0:
        raise ConfigError(f'tolerance must be > 0 (in {units}), got {tolerance}')
    queries = read_poses_csv(poses_csv, images_dir, name=Path(poses_csv).resolve().parent.name)
    protocol = Protocol('posed', '', queries.name, float(tolerance))
    return (
        Dataset(Path(images_dir).parent, queries.name, units, {'posed': protocol}),
        'posed',
        queries,
    )


def parse_map_range(text: str, num_images: int) -> np.ndarray:
    """Map ids [M] int64 of ``'A:B'``: indices A <= i < B, or fractions of the map when A or B
    has a decimal point (``'0.4:0.6'`` = the middle fifth). Raises ConfigError."""
    first, sep, last = text.partition(':')
    try:
        if not sep:
            raise ValueError('no colon')
        if '.' in first + last:
            a, b = (int(round(float(v) * num_images)) for v in (first, last))
        else:
            a, b = int(first), int(last)
    except ValueError as exc:
        raise ConfigError(
            f'map range {text!r} is not A:B ({exc}); write e.g. 0.4:0.6 '
            '(fractions) or 80:120 (map indices)'
        ) from exc
    if not 0 <= a < b <= num_images or b - a == num_images:
        raise ConfigError(
            f'map range {text!r} must select some but not all of the {num_images} map images'
        )
    return np.arange(a, b, dtype=np.int64)


def within_tolerance(
    map_xy: np.ndarray, truth_xy: np.ndarray, tolerance: float, units: str
) -> np.ndarray:
    """[K] bool: which of the map positions [K x 2] count as the same place as ``truth_xy``."""
    if units == 'frames':
        return np.abs(map_xy[:, 0] - truth_xy[0]) <= tolerance
    return np.hypot(*(map_xy - truth_xy).T) <= tolerance


def summarize(
    per_query: list[dict],
    dataset: Dataset,
    protocol: str,
    threshold: float = ConfidenceConfig().initial_pose_threshold,
) -> dict[str, Any]:
    in_map = [q for q in per_query if q['truth_xy'] is not None]
    ranks = [q['first_correct_rank'] for q in in_map]
    recall = {str(k): recall_at(ranks, k) for k in RECALL_KS}
    stages = sorted({s for q in per_query for s in q['timing_ms']})
    timing = {s: _stat(per_query, s, 50) for s in stages if s != 'total'}
    timing['total_median'] = _stat(per_query, 'total', 50)
    timing['total_p95'] = _stat(per_query, 'total', 95)
    proto = dataset.protocol(protocol)
    return {
        'dataset': dataset.name,
        'dataset_dir': str(dataset.root),
        'protocol': protocol,
        'map': proto.map,
        'query': proto.query,
        'tolerance': proto.tolerance,
        'units': dataset.units,
        'num_queries': len(per_query),
        'num_in_map': len(in_map),
        'recall': recall,
        'recall_curve': [
            recall_at(ranks, k)
            for k in range(1, 1 + max((len(q['top_ids']) for q in per_query), default=0))
        ],
        'timing_ms': timing,
        'timing_p95_ms': {s: _stat(per_query, s, 95) for s in stages},
        'open_set': open_set_report(per_query, threshold),
        'per_query': per_query,
    }


def write_report(
    report: dict[str, Any],
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    failures_path: str | Path | None = None,
    pr_plot_path: str | Path | None = None,
    reliability_plot_path: str | Path | None = None,
) -> None:
    """Write the JSON report, the Recall@K plot, the failed-queries strip, the open-set
    precision-recall plot and the reliability plot (each optional)."""
    if pr_plot_path:
        plot_precision_recall([report], pr_plot_path)
    if reliability_plot_path:
        plot_reliability([report], reliability_plot_path)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1) + '\n')
    if plot_path:
        plot_recall([report], plot_path)
    if failures_path:
        write_failure_strip(report, failures_path)


def plot_recall(reports: list[dict[str, Any]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for report in reports:
        curve = report['recall_curve']
        ax.plot(
            range(1, len(curve) + 1),
            curve,
            marker='o',
            label=f'{report["dataset"]}/{report["protocol"]}',
        )
    ax.set_xlabel('K')
    ax.set_ylabel('Recall@K')
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_failure_strip(
    report: dict[str, Any], path: str | Path, max_rows: int = 8, height_px: int = 120
) -> int:
    """PNG with one row per failed query: query | top-1 | true match. Returns rows written."""
    import cv2

    dataset = read_dataset(report['dataset_dir'])
    queries = dataset.traversal(report['query'])
    db = dataset.traversal(report['map'])
    by_name = {p.name: p for p in queries.image_paths}
    rows = []
    for q in report['per_query']:
        if q['truth_xy'] is None or q['first_correct_rank'] == 1 or not q['top_names']:
            continue
        truth = np.asarray(q['truth_xy'])
        finite = np.isfinite(db.xy).all(axis=1)
        dist = np.where(finite, np.hypot(*(db.xy - truth).T), np.inf)
        if dataset.units == 'frames':
            dist = np.where(finite, np.abs(db.xy[:, 0] - truth[0]), np.inf)
        true_path = db.image_paths[int(np.argmin(dist))]
        top1_path = next(p for p in db.image_paths if p.name == q['top_names'][0])
        tiles = [read_image(p) for p in (by_name[q['query']], top1_path, true_path)]
        tiles = [
            cv2.resize(t, (int(t.shape[1] * height_px / t.shape[0]), height_px)) for t in tiles
        ]
        rows.append(np.hstack(tiles))
        if len(rows) == max_rows:
            break
    if rows:
        width = max(r.shape[1] for r in rows)
        strip = np.vstack([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows])
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), strip)
    return len(rows)


def _stat(per_query: list[dict], stage: str, percentile: float) -> float:
    values = [q['timing_ms'][stage] for q in per_query if stage in q['timing_ms']]
    return round(float(np.percentile(values, percentile)), 3) if values else 0.0


def recall_at(ranks: list[int | None], k: int) -> float:
    """Recall@k: the share of in-map queries whose first correct answer (``ranks``, None: no
    correct answer in the list) is within the top k."""
    return fraction(sum(r is not None and r <= k for r in ranks), len(ranks))
