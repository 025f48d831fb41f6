"""Kidnapped-robot recovery without a reset: a query traversal's frames go to one sequence
matcher in stretches (``--stretch A:B``, repeated), the robot carried from the end of one
stretch to the start of the next without the matcher being told (no ``relocalize``). Prints
one row per stretch: the index in it (from 0) of the first correct result on track and of
the first correct result at the /initialpose threshold, and how many of the stretch's frames
reached that threshold, correct and wrong (correct: the top candidate within the protocol's
tolerance).

    .venv/bin/python benchmarks/kidnap.py --dataset ../shared/data/gardens_point \
        --protocol day_to_day_viewpoint --map out/gp_day_left \
        --stretch 0:60 --stretch 140:200 --sequence 10
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np

from vlm_vpr.core.confidence import on_track
from vlm_vpr.core.config import LocalizerConfig, SequenceConfig
from vlm_vpr.core.datasets import read_dataset
from vlm_vpr.core.evaluation import within_tolerance
from vlm_vpr.core.images import read_image
from vlm_vpr.core.localizer import Localizer
from vlm_vpr.core.sequence import SequenceMatcher


def measure(
    localizer: Localizer, dataset_dir: str, protocol: str, stretches: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    """One row per stretch, the stretches fed in the order given to one SequenceMatcher."""
    dataset = read_dataset(dataset_dir)
    proto = dataset.protocol(protocol)
    queries = dataset.traversal(proto.query)
    map_xy = localizer.map.positions_xyz[:, :2]
    threshold = localizer.config.confidence.initial_pose_threshold
    matcher = SequenceMatcher(localizer)
    rows = []
    for start, stop in stretches:
        on, accepted, correct = [], [], []
        for i in range(start, stop):
            result = localizer.localize(read_image(queries.image_paths[i]))
            result = matcher.update(result)
            truth = queries.xy[i]
            best = map_xy[[result.candidates[0].map_index]]
            correct.append(
                bool(np.isfinite(truth).all())
                and bool(within_tolerance(best, truth, proto.tolerance, dataset.units)[0])
            )
            on.append(on_track(result.evidence))
            accepted.append(result.confidence >= threshold)
        found = [k for k in range(len(correct)) if correct[k] and on[k]]
        trusted = [k for k in range(len(correct)) if correct[k] and accepted[k]]
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
