"""Kidnapped-robot recovery without a reset: a query traversal's frames go to one sequence
matcher in stretches (``--stretch A:B``, repeated), the robot carried from the end of one
stretch to the start of the next without the matcher being told (no ``relocalize``). Prints
one row per stretch: the index in it (from 0) of the first correct result on track and of
the first correct result at the /initialpose threshold, and how many of the stretch's frames
reached that threshold, correct and wrong (correct: the top candidate within the protocol's
tolerance).

    .venv/bin/python benchmarks/kidnap.py --dataset ../shared/data/gardens_point \
        --protocol day_to_day_viewpoint --map out/gp_day \
        --stretch 0:60 --stretch 140:200 --sequence 10

``--map``: a map calibrated for the same sequence length (README, "Open-set evaluation and
sequence evidence": ``out/gp_day``); without one the default weights decide "accepted".
"""

from __future__ import annotations

import argparse
import itertools
import logging
from typing import Any

from vlm_vpr.core.confidence import on_track
from vlm_vpr.core.config import LocalizerConfig, SequenceConfig
from vlm_vpr.core.datasets import Traversal, read_dataset
from vlm_vpr.core.evaluation import run_queries
from vlm_vpr.core.localizer import Localizer


def measure(
    localizer: Localizer, dataset_dir: str, protocol: str, stretches: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    """One row per stretch, the stretches fed in the order given to one SequenceMatcher
    (``run_queries`` on the query traversal's frames in that order)."""
    dataset = read_dataset(dataset_dir)
    queries = dataset.traversal(dataset.protocol(protocol).query)
    order = [i for start, stop in stretches for i in range(start, stop)]
    fed = Traversal(
        queries.name,
        [queries.image_paths[i] for i in order],
        queries.xy[order],
        queries.yaw_rad[order],
    )
    report = run_queries(localizer, dataset, protocol, fed, progress=False)
    threshold = localizer.config.confidence.initial_pose_threshold
    per_query = iter(report['per_query'])
    rows = []
    for start, stop in stretches:
        part = list(itertools.islice(per_query, stop - start))
        correct = [q['first_correct_rank'] == 1 for q in part]
        on = [on_track(q['evidence']) for q in part]
        accepted = [q['confidence'] >= threshold for q in part]
        found = [k for k in range(len(part)) if correct[k] and on[k]]
        trusted = [k for k in range(len(part)) if correct[k] and accepted[k]]
        rows.append(
            {
                'stretch': f'{start}:{stop}',
                'first_on_track': found[0] if found else None,
                'first_accepted': trusted[0] if trusted else None,
                'accepted_correct': sum(a and c for a, c in zip(accepted, correct)),
                'accepted_wrong': sum(a and not c for a, c in zip(accepted, correct)),
                'frames': stop - start,
            }
        )
    return rows


def stretch(text: str) -> tuple[int, int]:
    start, stop = text.split(':')
    return int(start), int(stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset', required=True, help='data set folder (its dataset.yaml)')
    parser.add_argument('--protocol', required=True)
    parser.add_argument('--map', required=True, help='map folder, calibrated for --sequence')
    parser.add_argument(
        '--stretch',
        type=stretch,
        action='append',
        required=True,
        help='A:B, query frames A..B-1; repeat',
    )
    parser.add_argument('--sequence', type=int, default=10, help='sequence length L')
    args = parser.parse_args(argv)
    if args.sequence < 2:
        parser.error('--sequence must be >= 2: a single frame is never on track')
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    config = LocalizerConfig(sequence=SequenceConfig(length=args.sequence))
    localizer = Localizer.from_map_path(args.map, config)
    rows = measure(localizer, args.dataset, args.protocol, args.stretch)
    print(
        '| stretch | first correct on track | first correct accepted | accepted: correct, wrong |'
    )
    print('|---|---|---|---|')
    for r in rows:
        print(
            f'| {r["stretch"]} | {r["first_on_track"]} | {r["first_accepted"]} '
            f'| {r["accepted_correct"]}, {r["accepted_wrong"]} of {r["frames"]} |'
        )


if __name__ == '__main__':
    main()
