"""`make demo`: build a Gardens Point map, evaluate two protocols, calibrate the confidence and
measure it on held-out queries and an out-of-map stretch, then run the ROS node.

python -m vlm_vpr.demo --data ../shared/data --out out/demo
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from vlm_vpr.core.calibration import calibrate
from vlm_vpr.core.confidence import Calibration
from vlm_vpr.core.config import LocalizerConfig, MapBuildConfig, SequenceConfig
from vlm_vpr.core.evaluation import evaluate, plot_recall, write_report

PROTOCOLS = ('day_to_day_viewpoint', 'day_to_night')
CONFIDENCE_PROTOCOL = 'day_to_night'  # the hard one: is a night answer right, is it on the map
CONFIDENCE_HOLDOUT = '0.4:0.6'  # map stretch left out, so that some queries have no true match
CONFIDENCE_SEQUENCE = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', type=Path, required=True, help='shared data folder')
    parser.add_argument('--out', type=Path, default=Path('out/demo'))
    parser.add_argument('--skip-node', action='store_true', help='only the offline evaluation')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    args.out.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty()

    dataset = args.data / 'gardens_point'
    map_dir = args.out / 'gardens_point_day_left'
    print(f'1/3 Gardens Point: map from day_left, weight-free dense RootSIFT + VLAD -> {map_dir}')
    reports = []
    for protocol in PROTOCOLS:
        report = evaluate(
            dataset,
            protocol,
            MapBuildConfig(),
            LocalizerConfig(),
            map_dir=map_dir,
            progress=progress,
            calibration=Calibration(),  # retrieval only: the confidence is step 2's
        )
        write_report(
            report, args.out / f'{protocol}.json', None, args.out / f'{protocol}_failures.png'
        )
        reports.append(report)
    plot_recall(reports, args.out / 'recall_at_k.png')
    print(format_table(reports))
    print(f'   reports, Recall@K plot and failure strips in {args.out}/')

    calibrated_map = args.out / 'gardens_point_day_left_calibrated'
    print(
        f'2/3 Confidence: {CONFIDENCE_PROTOCOL} with map stretch {CONFIDENCE_HOLDOUT} held out '
        f'(those queries are not in the map) and sequence length {CONFIDENCE_SEQUENCE}; '
        f'calibrate on the fit split, measure on the test split -> {calibrated_map}'
    )
    print(format_confidence_table(confidence_step(dataset, map_dir, calibrated_map, args.out)))
    print(f'   reports and reliability plot in {args.out}/')

    if not args.skip_node:
        from vlm_vpr.core.map_build import build_map_from_folder
        from vlm_vpr.ros.demo_replay import run_node_demo

        campus = args.data / 'campus_loop' / 'map'
        campus_map = args.out / 'campus_loop_map'
        print(
            f'3/3 ROS 2 node: map from campus_loop/map -> {campus_map}; the query traversal '
            'is written to an .mcap bag and replayed into the running vpr_node'
        )
        if not (campus_map / 'manifest.json').is_file():
            build_map_from_folder(
                campus / 'images', campus / 'poses.csv', campus_map, progress=progress
            )
        run_node_demo(campus_map, args.data, args.out / 'node')
    return 0


def confidence_step(
    dataset: Path, map_dir: Path, calibrated_map: Path, out: Path
) -> list[dict[str, Any]]:
    """`vlm-vpr calibrate --split fit` then `vlm-vpr eval --split test`, both with the map
    stretch held out and sequence evidence, on a copy of ``map_dir`` (the calibration is stored
    in the map). Returns the two reports (fit: in-sample; test: not used for fitting)."""
    shutil.rmtree(calibrated_map, ignore_errors=True)  # a fresh copy of this run's map:
    shutil.copytree(map_dir, calibrated_map)  # the same build, with a calibration of its own
    config = LocalizerConfig(sequence=SequenceConfig(length=CONFIDENCE_SEQUENCE))

    def run(split: str, calibration: Calibration | None) -> dict[str, Any]:
        return evaluate(
            dataset,
            CONFIDENCE_PROTOCOL,
            MapBuildConfig(),
            config,
            map_dir=calibrated_map,
            progress=False,
            holdout=CONFIDENCE_HOLDOUT,
            split=split,
            calibration=calibration,
        )

    fit = calibrate(run('fit', Calibration()), calibrated_map, config)  # refits the defaults
    test = run('test', None)  # the map's calibration, just stored
    for split, report in (('fit', fit), ('test', test)):
        write_report(
            report,
            out / f'{CONFIDENCE_PROTOCOL}_{split}_open_set.json',
            reliability_plot_path=out / f'{CONFIDENCE_PROTOCOL}_{split}_reliability.png',
        )
    return [fit, test]


def format_confidence_table(reports: list[dict[str, Any]]) -> str:
    threshold = reports[0]['open_set']['threshold']
    lines = [
        f'| split | in / out of map | R@1 in map | out-of-map accepted | in-map accepted '
        f'| precision | ECE | (accepted: confidence >= {threshold:g}, the /initialpose gate)',
        '|---|---|---|---|---|---|---|',
    ]
    for r in reports:
        o = r['open_set']
        name = 'fit (in-sample)' if r['split'] == 'fit' else 'test (held out)'
        lines.append(
            f'| {name} | {o["num_in_map"]} / {o["num_out_of_map"]} | {r["recall"]["1"]:.3f} | '
            f'{o["false_accept_rate"]:.3f} | {o["accepted_in_map"]:.3f} | '
            f'{o["precision"]:.3f} | {o["ece"]:.3f} |'
        )
    return '\n'.join(lines)


def format_table(reports: list[dict]) -> str:
    lines = [
        '| protocol | queries | R@1 | R@5 | R@10 | median ms | p95 ms |',
        '|---|---|---|---|---|---|---|',
    ]
    for r in reports:
        rec, t = r['recall'], r['timing_ms']
        lines.append(
            f'| {r["map"]} -> {r["query"]} | {r["num_queries"]} | {rec["1"]:.3f} | '
            f'{rec["5"]:.3f} | {rec["10"]:.3f} | {t["total_median"]:.0f} | '
            f'{t["total_p95"]:.0f} |'
        )
    return '\n'.join(lines)


if __name__ == '__main__':
    raise SystemExit(main())
