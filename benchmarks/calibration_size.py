"""How many posed calibration queries the confidence needs: the calibration refitted on random
subsets of the calibration split's blocks (10 consecutive queries each), every fit measured on
the held-out test split; prints a table (false accepts, in-map accepted, ECE per size).

    .venv/bin/python benchmarks/calibration_size.py --fit out/fit.json --test out/test.json \
        [--sizes 5 10 20 40 80 1000] [--draws 30] [--seed 0]

``--fit``: the report of ``vlm-vpr calibrate --json`` (its rows carry each query's evidence),
``--test``: the report of ``vlm-vpr eval --json`` on another split with the same settings (the
open-set table's commands in the README). The evidence does not depend on the calibration, so
each fit re-scores the test rows directly, as ``eval --cross-fit`` does.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from vlm_vpr.core.calibration import SPLIT_BLOCK, expected_calibration_error, fit_rows
from vlm_vpr.core.config import LocalizerConfig
from vlm_vpr.core.errors import DatasetError

ECE_BAR = 0.10  # issue 4: ECE <= 0.10 on a split not used for fitting


def measure(
    fit: list[dict[str, Any]],
    test: list[dict[str, Any]],
    sizes: list[int],
    draws: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per calibration size (in blocks; a size of all the blocks is one draw): how the
    fits on ``draws`` random block subsets of ``fit`` do on ``test`` at the /initialpose
    threshold. Fits that fail (a subset without both outcomes) are counted, not measured."""
    config = LocalizerConfig()  # what `vlm-vpr calibrate` fits with
    threshold = config.confidence.initial_pose_threshold
    blocks = [fit[i : i + SPLIT_BLOCK] for i in range(0, len(fit), SPLIT_BLOCK)]
    out_of_map = np.array([q['truth_xy'] is None for q in test])
    correct = np.array([q['first_correct_rank'] == 1 for q in test])
    rows = []
    for size in sorted({min(s, len(blocks)) for s in sizes}):
        rng = np.random.default_rng([seed, size])  # a size's draws do not depend on the others
        false_accepts, accepted_in_map, ece, failed = [], [], [], 0
        for _ in range(1 if size == len(blocks) else draws):
            picked = rng.choice(len(blocks), size, replace=False)
            try:
                calibration = fit_rows([q for b in sorted(picked) for q in blocks[b]], config)
            except DatasetError:
                failed += 1
                continue
            confidence = np.array([calibration.confidence(q['evidence']) for q in test])
            accepted = confidence >= threshold
            false_accepts.append(int((accepted & out_of_map).sum()))
            accepted_in_map.append(float(accepted[~out_of_map].mean()))
            ece.append(expected_calibration_error(confidence, correct))
        row = {
            'blocks': size,
            'queries': sum(len(blocks[b]) for b in range(size)),
            'fits': len(false_accepts),
            'failed_fits': failed,
        }
        if false_accepts:  # the measures of the fits (none when every draw failed to fit)
            fa, ece_arr = np.array(false_accepts), np.array(ece)
            row |= {
                'with_false_accept': float(np.mean(fa > 0)),
                'false_accepts_max': int(fa.max()),
                'accepted_in_map_median': float(np.median(accepted_in_map)),
                'ece_median': float(np.median(ece_arr)),
                'ece_p90': float(np.percentile(ece_arr, 90)),
                'ece_over_bar': float(np.mean(ece_arr > ECE_BAR)),
            }
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], test: list[dict[str, Any]]) -> str:
    out = sum(q['truth_xy'] is None for q in test)
    lines = [
        f'test split: {len(test) - out} in / {out} out of map',
        '| calibration blocks (queries) | fits (failed) | fits with a false accept | most '
        'false accepts | in-map accepted (median) | ECE median, 90th pct | fits with ECE > '
        f'{ECE_BAR:g} |',
        '|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        if not r['fits']:
            lines.append(f'| {r["blocks"]} ({r["queries"]}) | 0 ({r["failed_fits"]}) |||||')
            continue
        lines.append(
            f'| {r["blocks"]} ({r["queries"]}) | {r["fits"]} ({r["failed_fits"]}) | '
            f'{r["with_false_accept"]:.2f} | {r["false_accepts_max"]} | '
            f'{r["accepted_in_map_median"]:.3f} | {r["ece_median"]:.3f}, {r["ece_p90"]:.3f} | '
            f'{r["ece_over_bar"]:.2f} |'
        )
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--fit', type=Path, required=True, help='`vlm-vpr calibrate --json`')
    parser.add_argument('--test', type=Path, required=True, help='`vlm-vpr eval --json`')
    parser.add_argument('--sizes', type=int, nargs='+', default=[5, 10, 20, 40, 80, 1000])
    parser.add_argument('--draws', type=int, default=30, help='random subsets per size')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # each small fit warns about its split
    fit = json.loads(args.fit.read_text())['per_query']
    test = json.loads(args.test.read_text())['per_query']
    print(format_table(measure(fit, test, args.sizes, args.draws, args.seed), test))


if __name__ == '__main__':
    main()
