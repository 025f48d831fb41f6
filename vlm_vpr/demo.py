"""`make demo`: build a Gardens Point map, evaluate two protocols, then run the ROS node.

python -m vlm_vpr.demo --data ../shared/data --out out/demo
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vlm_vpr.core.config import LocalizerConfig, MapBuildConfig
from vlm_vpr.core.evaluation import evaluate, plot_recall, write_report

PROTOCOLS = ('day_to_day_viewpoint', 'day_to_night')


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
    print(f'1/2 Gardens Point: map from day_left, weight-free dense RootSIFT + VLAD -> {map_dir}')
    reports = []
    for protocol in PROTOCOLS:
        report = evaluate(
            dataset,
            protocol,
            MapBuildConfig(),
            LocalizerConfig(),
            map_dir=map_dir,
            progress=progress,
        )
        write_report(
            report, args.out / f'{protocol}.json', None, args.out / f'{protocol}_failures.png'
        )
        reports.append(report)
    plot_recall(reports, args.out / 'recall_at_k.png')
    print(format_table(reports))
    print(f'   reports, Recall@K plot and failure strips in {args.out}/')

    if not args.skip_node:
        from vlm_vpr.core.map_build import build_map_from_folder
        from vlm_vpr.ros.demo_replay import run_node_demo

        campus = args.data / 'campus_loop' / 'map'
        campus_map = args.out / 'campus_loop_map'
        print(
            f'2/2 ROS 2 node: map from campus_loop/map -> {campus_map}; the query traversal '
            'is written to an .mcap bag and replayed into the running vpr_node'
        )
        if not (campus_map / 'manifest.json').is_file():
            build_map_from_folder(
                campus / 'images', campus / 'poses.csv', campus_map, progress=progress
            )
        run_node_demo(campus_map, args.data, args.out / 'node')
    return 0


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
