"""`vlm-vpr` command line: each subcommand calls one library function.

Errors from the library (VprError) print one line naming the fix and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vlm_vpr.core.config import LocalizerConfig, MapBuildConfig, from_flat_dict, to_flat_dict
from vlm_vpr.core.errors import ConfigError, VprError
from vlm_vpr.core.initial_pose import InitialPoseConfig

log = logging.getLogger('vlm_vpr')
INITIAL_POSE_PREFIX = (
    'initial_pose.'  # the node's /initialpose gate keys, which eval-bag also reads
)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format='%(levelname)s %(name)s: %(message)s',
        stream=sys.stderr,
    )
    logging.getLogger('faiss.loader').setLevel(logging.WARNING)  # CPU-feature probing noise
    if not hasattr(args, 'run'):  # no command, or `map` without its action
        getattr(args, 'help_of', parser).print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except VprError as exc:
        print(f'vlm-vpr: error: {exc}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='vlm-vpr', description=__doc__.splitlines()[0])
    parser.add_argument('-v', '--verbose', action='store_true')
    sub = parser.add_subparsers(metavar='COMMAND')

    map_parser = sub.add_parser('map', help='build and inspect maps')
    map_sub = map_parser.add_subparsers(metavar='ACTION')
    map_parser.set_defaults(help_of=map_parser)
    build = map_sub.add_parser('build', help='build a map from posed images or a ROS 2 bag')
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument('--images', type=Path, help='image folder (with --poses)')
    source.add_argument('--bag', type=Path, help='ROS 2 bag (.mcap, .db3 or bag folder)')
    build.add_argument('--poses', type=Path, help='CSV with header image,x,y[,yaw]')
    _add_bag_topic_args(build, '--pose-topic', 'poses', required=False)
    build.add_argument(
        '--min-distance-m', type=float, help='keyframe spacing (with --bag; default 1.0)'
    )
    build.add_argument(
        '--min-rotation-deg', type=float, help='keyframe rotation (with --bag; default 15)'
    )
    build.add_argument('--out', type=Path, required=True, help='map folder to write')
    build.add_argument('--overwrite', action='store_true', help='replace an existing map')
    _add_config_args(build, backbone=True)
    build.set_defaults(run=_cmd_map_build)

    info = map_sub.add_parser('info', help='print a map manifest and sizes')
    info.add_argument('map', type=Path)
    info.set_defaults(run=_cmd_map_info)

    describe = map_sub.add_parser(
        'describe',
        help='store VLM scene descriptions of every map '
        'image (for --rerank descriptions / region)',
    )
    describe.add_argument('map', type=Path)
    _add_config_args(describe)
    describe.set_defaults(run=_cmd_map_describe)

    regions = map_sub.add_parser(
        'regions', help='cluster map positions into labelled regions (for --rerank region)'
    )
    regions.add_argument('map', type=Path)
    regions.add_argument(
        '--count',
        type=int,
        help='number of regions (default: as many as --names, else rerank.region_count)',
    )
    regions.add_argument(
        '--names',
        help='comma-separated region names, in route order (without them the regions are '
        "named from the map's VLM descriptions: run `map describe` first)",
    )
    _add_config_args(regions)
    regions.set_defaults(run=_cmd_map_regions)

    localize = sub.add_parser('localize', help='localise images; one JSON line per image')
    localize.add_argument('--map', type=Path, required=True)
    localize.add_argument('images', type=Path, nargs='+')
    localize.add_argument(
        '--near',
        type=float,
        nargs=2,
        metavar=('X', 'Y'),
        help='search only map images within --radius-m of this position',
    )
    localize.add_argument('--radius-m', type=float, help='radius for --near (default 20)')
    localize.add_argument('--region', help='search only this region (see `vlm-vpr map regions`)')
    _add_config_args(localize, backbone=True, rerank=True)
    localize.set_defaults(run=_cmd_localize)

    evaluate = sub.add_parser('eval', help='Recall@K and latency on a data set protocol')
    evaluate.add_argument('--dataset', type=Path, required=True, help='data set folder')
    evaluate.add_argument('--protocol', required=True, help='protocol name in dataset.yaml')
    evaluate.add_argument('--map', type=Path, help='reuse this map, or build it here')
    evaluate.add_argument('--max-queries', type=int, help='evaluate an evenly spread subset')
    evaluate.add_argument('--json', type=Path, help='write the report here')
    evaluate.add_argument('--plot', type=Path, help='write the Recall@K plot (PNG) here')
    evaluate.add_argument('--failures', type=Path, help='write failed queries strip (PNG) here')
    evaluate.add_argument(
        '--pr-plot', type=Path, help='write the open-set precision-recall plot (PNG) here'
    )
    evaluate.add_argument(
        '--reliability-plot', type=Path, help='write the reliability plot (PNG) here'
    )
    evaluate.add_argument(
        '--cross-fit',
        type=int,
        metavar='K',
        help='score every query with a calibration fitted on the other K-1 folds (blocks of '
        "10 consecutive queries, round robin) instead of the map's; the map is not changed",
    )
    _add_open_set_args(evaluate)
    _add_config_args(evaluate, backbone=True, rerank=True, sequence=True)
    evaluate.set_defaults(run=_cmd_eval)

    calibrate = sub.add_parser('calibrate', help="fit the map's confidence on posed queries")
    calibrate.add_argument(
        '--map',
        type=Path,
        required=True,
        help='map to calibrate (built here from --dataset if missing)',
    )
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument('--dataset', type=Path, help='data set folder (with --protocol)')
    source.add_argument('--images', type=Path, help='query image folder (with --poses)')
    source.add_argument(
        '--bag',
        type=Path,
        action='append',
        help='ROS 2 bag with ground-truth poses (with --image-topic, --truth-topic); repeat it '
        'to fit on several drives together (each runs on its own, with the same topics)',
    )
    calibrate.add_argument('--protocol', help='protocol name in dataset.yaml')
    calibrate.add_argument(
        '--poses', type=Path, help='CSV image,x,y[,yaw]; empty x,y = a place not in the map'
    )
    calibrate.add_argument(
        '--tolerance',
        type=float,
        help='a top-1 this close to the truth is correct (with --images; with --bag in m, '
        'default 5)',
    )
    calibrate.add_argument(
        '--units',
        choices=['m', 'frames'],
        help='units of --poses and --tolerance (with --images; default m)',
    )
    _add_bag_topic_args(calibrate, '--truth-topic', 'ground truth', required=False)
    _add_odometry_args(calibrate, ' (with --bag)')
    calibrate.add_argument('--json', type=Path, help='write the report here')
    calibrate.add_argument(
        '--reliability-plot', type=Path, help='write the (in-sample) reliability plot (PNG) here'
    )
    _add_open_set_args(calibrate)
    _add_config_args(calibrate, backbone=True, rerank=True, sequence=True)
    calibrate.set_defaults(run=_cmd_calibrate)

    replay = sub.add_parser(
        'replay',
        help='publish a ROS 2 bag on the live ROS graph with its '
        'timing (needs rclpy; for machines without `ros2 bag play`)',
    )
    replay.add_argument('bag', type=Path, help='rosbag2 folder, .mcap or .db3')
    replay.add_argument('--rate', type=float, default=1.0, help='speed factor (default 1.0)')
    replay.add_argument(
        '--topics',
        nargs='+',
        help='topics to publish (default: all whose message types are installed)',
    )
    replay.add_argument(
        '--start-delay-s',
        type=float,
        default=1.0,
        help='wait for subscribers to connect before the first message (>= 0)',
    )
    replay.set_defaults(run=_cmd_replay)

    eval_bag = sub.add_parser(
        'eval-bag',
        help='Recall@K, pose error, success and false '
        'positives of the Localizer on a bag with ground-truth poses',
        description="The node's /initialpose gate runs on the frames too: set it with the "
        "node's keys (--set initial_pose.consecutive_frames=5, or a --config ROS params file).",
    )
    eval_bag.add_argument('bag', type=Path, help='rosbag2 folder, .mcap or .db3')
    eval_bag.add_argument('--map', type=Path, required=True)
    _add_bag_topic_args(eval_bag, '--truth-topic', 'ground truth', required=True)
    _add_odometry_args(eval_bag, '')
    eval_bag.add_argument(
        '--tolerance',
        dest='tolerance_m',
        type=float,
        help="a pose or candidate this close to the truth is correct (in the bag's pose units: "
        'm; default 5)',
    )
    eval_bag.add_argument(
        '--confidence-threshold',
        type=float,
        help='for the accepted rates and the /initialpose gate, in [0, 1] (default '
        'confidence.initial_pose_threshold)',
    )
    eval_bag.add_argument('--max-frames', type=int, help='only the first N images')
    eval_bag.add_argument('--json', type=Path, help='write the report here')
    eval_bag.add_argument('--plot', type=Path, help='write the trajectory plot (PNG) here')
    _add_config_args(eval_bag, rerank=True, sequence=True)
    eval_bag.set_defaults(run=_cmd_eval_bag)
    return parser


def _add_bag_topic_args(
    parser: argparse.ArgumentParser, pose_option: str, poses: str, required: bool
) -> None:
    """--image-topic, ``pose_option`` (the topic of the ``poses``) and --base-frame."""
    when = '' if required else ' (with --bag)'
    parser.add_argument(
        '--image-topic', required=required, help=f'Image or CompressedImage topic{when}'
    )
    parser.add_argument(
        pose_option,
        required=required,
        help=f'{poses}{when}: Odometry / PoseStamped / PoseWithCovarianceStamped topic, or /tf',
    )
    parser.add_argument(
        '--base-frame', help=f'robot frame for /tf {poses}{when} (default base_link)'
    )


def _add_odometry_args(parser: argparse.ArgumentParser, when: str) -> None:
    parser.add_argument(
        '--odom-topic',
        help=f"odometry{when}, as the node's odom_topic / odom_frame: the distance moved sets "
        'the sequence step and the gate compares poses after the motion (Odometry / pose '
        'topic, or /tf with --odom-frame); default: frame order',
    )
    parser.add_argument(
        '--odom-frame',
        help='odometry frame (default odom): with /tf the chain starts there; an Odometry or '
        'pose topic in another frame is used with a warning',
    )


def _add_open_set_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--holdout-map-range',
        metavar='A:B',
        help='leave map images A..B-1 (or fractions, e.g. 0.4:0.6) out: with --dataset the '
        'map is rebuilt without them (kept beside it as MAP.holdout-A-B), with --images they '
        'are only left out of the search; their queries become out-of-map negatives',
    )
    parser.add_argument(
        '--split',
        choices=['fit', 'test'],
        help='use only even (fit) or odd (test) blocks of 10 consecutive queries',
    )


def _add_config_args(
    parser: argparse.ArgumentParser,
    backbone: bool = False,
    rerank: bool = False,
    sequence: bool = False,
) -> None:
    if sequence:
        parser.add_argument(
            '--sequence',
            type=int,
            metavar='L',
            help='the last L frames vote (shortcut for --set sequence.length=L)',
        )
    if backbone:
        parser.add_argument(
            '--backbone',
            choices=['dense-rootsift', 'dinov2'],
            help="feature backbone (default: the map's, or dense-rootsift)",
        )
    if rerank:
        parser.add_argument(
            '--rerank',
            default='',
            help='re-ranker chain, e.g. geometric,consensus (default: none)',
        )
    parser.add_argument(
        '--config',
        type=Path,
        help='YAML of dotted config keys (a ROS params file works: its ros__parameters are read)',
    )
    parser.add_argument(
        '--set',
        action='append',
        default=[],
        metavar='KEY=VALUE',
        help='override one config key, e.g. --set vlad.num_clusters=32',
    )


def load_overrides(args: argparse.Namespace, keep_initial_pose: bool = False) -> dict[str, Any]:
    """Dotted config keys from --config, then --set, then the shortcut flags (see
    :func:`read_config_yaml` for ``keep_initial_pose``). With ``--map`` naming an existing map,
    map-build keys that differ from its build are a ConfigError."""
    values: dict[str, Any] = {}
    if getattr(args, 'config', None):
        values.update(read_config_yaml(args.config, keep_initial_pose))
    for item in args.set:
        key, sep, text = item.partition('=')
        if not sep:
            raise ConfigError(f'--set {item!r}: write KEY=VALUE, e.g. --set top_k=5')
        values[key.strip()] = yaml.safe_load(text)
    if getattr(args, 'backbone', None):
        values['features.backbone'] = args.backbone
    if getattr(args, 'rerank', ''):
        values['rerank.chain'] = [r.strip() for r in args.rerank.split(',') if r.strip()]
    if getattr(args, 'sequence', None) is not None:  # --sequence 0 is an error, not absent
        values['sequence.length'] = args.sequence
    if getattr(args, 'map', None) is not None:
        _refuse_build_keys_of_another_map(values, args.map)
    return values


def _refuse_build_keys_of_another_map(values: dict[str, Any], map_dir: Path) -> None:
    """ConfigError when map-build settings in ``values`` differ from those the existing map at
    ``map_dir`` was built with: they apply only when a map is built (the backbone is checked
    by the commands themselves)."""
    build_only = set(to_flat_dict(MapBuildConfig())) - set(to_flat_dict(LocalizerConfig()))
    given = {k: v for k, v in values.items() if k in build_only and k != 'features.backbone'}
    if not given or not (Path(map_dir) / 'manifest.json').is_file():
        return
    from vlm_vpr.core.map_format import read_map

    wanted = to_flat_dict(from_flat_dict(MapBuildConfig, given))
    built = to_flat_dict(read_map(map_dir, load_index=False).build_config)
    differ = [
        f'{k}={wanted[k]!r} (built with {built.get(k)!r})'
        for k in given
        if wanted[k] != built.get(k)
    ]
    if differ:
        raise ConfigError(
            f'map {map_dir} was built with other settings: {", ".join(differ)}; map-build '
            'settings apply only when a map is built: drop them, or give a new --map folder'
        )


def _given(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The options among ``names`` that were given (not None): the library has the defaults."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _odometry(args: argparse.Namespace) -> dict[str, Any]:
    """evaluate_bags' odometry keywords from --odom-topic / --odom-frame."""
    if args.odom_frame is not None and args.odom_topic is None:
        raise ConfigError('--odom-frame needs --odom-topic (the /tf or odometry topic)')
    return _given(args, ['odom_topic', 'odom_frame'])


def _refuse_unused(args: argparse.Namespace, source: str, names: list[str]) -> None:
    """ConfigError naming the given options (not None) that ``source`` does not use."""
    given = ['--' + name.replace('_', '-') for name in _given(args, names)]
    if given:
        raise ConfigError(f'{", ".join(given)} not used with {source}: drop it')


def read_config_yaml(path: Path, keep_initial_pose: bool = False) -> dict[str, Any]:
    """Flat dotted keys from a YAML file (plain, nested, or a ROS 2 parameters file; of the
    node's own parameters only ``initial_pose.*`` are kept, and only if ``keep_initial_pose``)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f'cannot read config {path}: {exc}') from exc
    if not isinstance(data, dict):
        raise ConfigError(f'config {path} is not a mapping of keys to values')
    if len(data) == 1:
        only = next(iter(data.values()))
        if isinstance(only, dict) and 'ros__parameters' in only:
            from vlm_vpr.ros.params import NodeConfig  # imports no rclpy

            node_defaults = to_flat_dict(NodeConfig())
            flat = _flatten(only['ros__parameters'])
            kept = {
                k: v
                for k, v in flat.items()
                if k not in node_defaults
                or (keep_initial_pose and k.startswith(INITIAL_POSE_PREFIX))
            }
            unused = [
                f'{k}={v!r}' for k, v in flat.items() if k not in kept and v != node_defaults[k]
            ]
            if unused:
                log.warning(
                    'config %s: node parameters %s are not used here (the bag commands take '
                    '--odom-topic, --odom-frame and --base-frame)',
                    path,
                    ', '.join(unused),
                )
            return kept
    return _flatten(data)


def split_config(values: dict[str, Any]) -> tuple[MapBuildConfig, LocalizerConfig]:
    """Route dotted keys to the map-build and/or localizer config (``runtime.*`` goes to both)."""
    build_keys = set(to_flat_dict(MapBuildConfig()))
    query_keys = set(to_flat_dict(LocalizerConfig()))
    unknown = sorted(k for k in values if k not in build_keys | query_keys)
    if unknown:
        raise ConfigError(
            f'unknown config key(s) {unknown}; see vlm_vpr/core/config.py for names (the '
            'query keys are also in config/vpr_node.yaml)'
        )
    build = from_flat_dict(MapBuildConfig, {k: v for k, v in values.items() if k in build_keys})
    query = from_flat_dict(LocalizerConfig, {k: v for k, v in values.items() if k in query_keys})
    return build, query


def _flatten(data: Any, prefix: str = '') -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def _cmd_map_build(args: argparse.Namespace) -> int:
    build_config, _ = split_config(load_overrides(args))
    if args.images is not None:
        from vlm_vpr.core.map_build import build_map_from_folder

        _refuse_unused(
            args,
            '--images',
            ['image_topic', 'pose_topic', 'base_frame', 'min_distance_m', 'min_rotation_deg'],
        )
        if args.poses is None:
            raise ConfigError('--images needs --poses CSV (header image,x,y[,yaw])')
        out = build_map_from_folder(
            args.images,
            args.poses,
            args.out,
            build_config,
            overwrite=args.overwrite,
            progress=sys.stderr.isatty(),
        )
    else:
        from vlm_vpr.core.map_build import build_map_from_bag

        _refuse_unused(args, '--bag', ['poses'])
        if not args.image_topic or not args.pose_topic:
            raise ConfigError('--bag needs --image-topic and --pose-topic')
        out = build_map_from_bag(
            args.bag,
            args.image_topic,
            args.pose_topic,
            args.out,
            build_config,
            overwrite=args.overwrite,
            **_given(args, ['base_frame', 'min_distance_m', 'min_rotation_deg']),
            progress=sys.stderr.isatty(),
        )
    print(json.dumps(map_summary(out)))
    return 0


MAP_PARTS = {  # file or top folder of a map -> the part `map info` reports its size under
    'descriptors.npy': 'descriptors',
    'pca_mean.npy': 'pca',
    'pca_components.npy': 'pca',
    'codebook.npy': 'codebook',
    'poses.csv': 'poses',
    'index.faiss': 'index',
    'manifest.json': 'manifest',
    'thumbnails': 'thumbnails',
    'extras': 'extras',
}


def map_summary(map_dir: Path) -> dict[str, Any]:
    """The manifest plus sizes: ``size_mb`` per part, ``retrieval_mb`` (all but thumbnails and
    extras), ``thumbnails_mb``, ``extras_mb`` and ``retrieval_mb_per_10k_images`` (fixed
    parts, the codebook and PCA, counted once; per-image parts scaled to 10k images)."""
    from vlm_vpr.core.map_format import read_map

    vpr_map = read_map(map_dir, load_index=False)
    parts: dict[str, float] = {}
    for file in map_dir.rglob('*'):
        if file.is_file():
            part = MAP_PARTS.get(file.relative_to(map_dir).parts[0], 'other')
            parts[part] = parts.get(part, 0.0) + file.stat().st_size / 1e6
    retrieval_mb = sum(v for k, v in parts.items() if k not in ('thumbnails', 'extras'))
    fixed_mb = parts.get('codebook', 0.0) + parts.get('pca', 0.0)
    manifest = dict(vpr_map.manifest)
    manifest.update(
        {
            'size_mb': {k: round(v, 3) for k, v in sorted(parts.items())},
            'retrieval_mb': round(retrieval_mb, 3),
            'retrieval_mb_per_10k_images': round(
                fixed_mb + (retrieval_mb - fixed_mb) * 10_000 / len(vpr_map), 3
            ),
            'thumbnails_mb': round(parts.get('thumbnails', 0.0), 3),
            'extras_mb': round(parts.get('extras', 0.0), 3),
            'path': str(map_dir),
        }
    )
    return manifest


def _cmd_map_info(args: argparse.Namespace) -> int:
    print(json.dumps(map_summary(args.map), indent=2))
    return 0


def _cmd_map_describe(args: argparse.Namespace) -> int:
    from vlm_vpr.core.map_describe import describe_map

    _, query_config = split_config(load_overrides(args))
    print(describe_map(args.map, query_config.vlm, query_config.rerank))
    return 0


def _cmd_map_regions(args: argparse.Namespace) -> int:
    from vlm_vpr.core.map_describe import build_regions

    _, query_config = split_config(load_overrides(args))
    names = [n.strip() for n in args.names.split(',')] if args.names else None
    count = args.count
    if count is None:  # as many regions as names, else the configured count
        count = len(names) if names else query_config.rerank.region_count
    print(build_regions(args.map, count, names))
    return 0


def _cmd_localize(args: argparse.Namespace) -> int:
    from vlm_vpr.core.images import read_image
    from vlm_vpr.core.localizer import Localizer
    from vlm_vpr.core.map_format import check_compatible, read_map
    from vlm_vpr.core.retrieval import ids_within_radius

    if args.near is None and args.radius_m is not None:
        raise ConfigError('--radius-m needs --near X Y')
    radius_m = 20.0 if args.radius_m is None else args.radius_m
    if not radius_m > 0:
        raise ConfigError(f'--radius-m must be > 0, got {radius_m}')
    values = load_overrides(args)
    _, query_config = split_config(
        {k: v for k, v in values.items() if not k.startswith('features.')}
    )
    vpr_map = read_map(args.map)
    if 'features.backbone' in values:
        check_compatible(vpr_map, values['features.backbone'])
    localizer = Localizer(vpr_map, query_config)
    submap = None
    if args.near is not None:
        submap = ids_within_radius(vpr_map.positions_xyz, tuple(args.near), radius_m)
    if args.region is not None:
        from vlm_vpr.core.map_describe import region_ids

        chosen = region_ids(vpr_map, args.region)
        submap = chosen if submap is None else np.intersect1d(submap, chosen)
    failures = 0
    for path in args.images:
        try:
            result = localizer.localize(read_image(path), submap=submap)
        except VprError as exc:
            failures += 1
            print(json.dumps({'image': str(path), 'error': str(exc)}))
            continue
        print(json.dumps(result_to_json(str(path), result)))
    return 1 if failures else 0


def result_to_json(image: str, result: Any) -> dict[str, Any]:
    return {
        'image': image,
        'pose': {
            'x': result.pose.x,
            'y': result.pose.y,
            'z': result.pose.z,
            'yaw_rad': result.pose.yaw_rad if result.pose.yaw_known else None,
        },
        'confidence': round(result.confidence, 4),
        'covariance_diag': [round(float(v), 6) for v in result.covariance.diagonal()],
        'candidates': [
            {
                'id': c.map_index,
                'image': c.image_name,
                'score': round(c.score, 6),
                'x': c.pose.x,
                'y': c.pose.y,
            }
            for c in result.candidates
        ],
        'timing_ms': {k: round(v, 2) for k, v in result.timing_ms.items()},
        'notes': result.notes,
    }


def _cmd_eval(args: argparse.Namespace) -> int:
    from vlm_vpr.core.calibration import cross_fit
    from vlm_vpr.core.confidence import Calibration
    from vlm_vpr.core.evaluation import evaluate, write_report

    build_config, query_config = split_config(load_overrides(args))
    if args.cross_fit is not None and args.split is not None:
        raise ConfigError('--cross-fit uses every query: drop --split')
    report = evaluate(
        args.dataset,
        args.protocol,
        build_config,
        query_config,
        map_dir=args.map,
        max_queries=args.max_queries,
        progress=sys.stderr.isatty(),
        holdout=args.holdout_map_range,
        split=args.split,
        # cross-fitting re-scores every query: the map's calibration is not used
        calibration=None if args.cross_fit is None else Calibration(),
    )
    if args.cross_fit is not None:
        report = cross_fit(report, query_config, args.cross_fit)
    write_report(report, args.json, args.plot, args.failures, args.pr_plot, args.reliability_plot)
    print(format_report_line(report))
    open_set_line = format_open_set_line(report)
    if args.cross_fit is not None:
        open_set_line += (
            f' (cross-fitted: each query scored by a calibration of the other '
            f'{args.cross_fit - 1} of {args.cross_fit} folds)'
        )
    print(open_set_line)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from vlm_vpr.core.calibration import calibrate
    from vlm_vpr.core.confidence import Calibration
    from vlm_vpr.core.evaluation import evaluate, posed_queries, run_queries, write_report
    from vlm_vpr.core.localizer import Localizer
    from vlm_vpr.core.map_format import read_map

    build_config, query_config = split_config(load_overrides(args))
    progress = sys.stderr.isatty()
    unfitted = Calibration()  # the confidence is refitted on the rows: the map's is not used
    bag_only = ['image_topic', 'truth_topic', 'base_frame', 'odom_topic', 'odom_frame']
    if args.dataset is not None:
        _refuse_unused(args, '--dataset', ['poses', 'tolerance', 'units', *bag_only])
        if not args.protocol:
            raise ConfigError('--dataset needs --protocol (a name in its dataset.yaml)')
        report = evaluate(
            args.dataset,
            args.protocol,
            build_config,
            query_config,
            map_dir=args.map,
            progress=progress,
            holdout=args.holdout_map_range,
            split=args.split,
            calibration=unfitted,
        )
    elif args.bag is not None:
        from vlm_vpr.core.bag_eval import evaluate_bags

        _refuse_unused(
            args,
            '--bag (it fits on every frame, in metres; measure with `eval-bag` on another bag)',
            ['protocol', 'poses', 'units', 'split', 'holdout_map_range'],
        )
        if not args.image_topic or not args.truth_topic:
            raise ConfigError('--bag needs --image-topic and --truth-topic')
        report = evaluate_bags(
            args.map,
            args.bag,
            args.image_topic,
            args.truth_topic,
            query_config,
            progress=progress,
            calibration=unfitted,
            **_given(args, ['base_frame']),
            **_odometry(args),
            **({} if args.tolerance is None else {'tolerance_m': args.tolerance}),
        )
    else:
        _refuse_unused(args, '--images', ['protocol', *bag_only])
        if args.poses is None or args.tolerance is None:
            raise ConfigError('--images needs --poses CSV and --tolerance (in --units)')
        dataset, protocol, queries = posed_queries(
            args.images, args.poses, args.tolerance, args.units or 'm'
        )
        report = run_queries(
            Localizer(read_map(args.map), query_config, unfitted),
            dataset,
            protocol,
            queries,
            progress=progress,
            holdout=args.holdout_map_range,
            split=args.split,
        )
    report = calibrate(report, args.map, query_config)
    write_report(report, args.json, reliability_plot_path=args.reliability_plot)
    print(f'calibration stored in {args.map}: {json.dumps(report["calibration"])}')
    print(
        format_open_set_line(report)
        + ' (in-sample: measure on other queries, `vlm-vpr eval --split test` or `eval-bag`)'
    )
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from vlm_vpr.ros.replay import replay_bag

    sent = replay_bag(
        args.bag, rate=args.rate, topics=args.topics, start_delay_s=args.start_delay_s
    )
    print(json.dumps({'bag': str(args.bag), 'published': sent}))
    return 0


def _cmd_eval_bag(args: argparse.Namespace) -> int:
    from vlm_vpr.core.bag_eval import evaluate_bags, write_bag_report

    values = load_overrides(args, keep_initial_pose=True)
    gate = {k: v for k, v in values.items() if k.startswith(INITIAL_POSE_PREFIX)}
    _, query_config = split_config({k: v for k, v in values.items() if k not in gate})
    report = evaluate_bags(
        args.map,
        [args.bag],
        args.image_topic,
        args.truth_topic,
        query_config,
        confidence_threshold=args.confidence_threshold,
        **_given(args, ['base_frame', 'tolerance_m']),
        **_odometry(args),
        max_frames=args.max_frames,
        initial_pose=from_flat_dict(
            InitialPoseConfig, {k.removeprefix(INITIAL_POSE_PREFIX): v for k, v in gate.items()}
        ),
        progress=sys.stderr.isatty(),
    )
    write_bag_report(report, args.json, args.plot)
    r, e, t = report['recall'], report['position_error_m'], report['at_threshold']
    print(
        f'{args.bag}: {report["num_frames"]} frames  R@1 {r["1"]:.3f}  R@5 {r["5"]:.3f}  '
        f'success {report["success_rate"]:.3f}  error median {e["median"]} m  '
        f'accepted {t["accepted_rate"]:.3f} (wrong {t["wrong_share_of_accepted"]:.3f} of them) '
        f'at confidence {t["confidence_threshold"]}  '
        f'latency median {report["timing_ms"]["total"]["median"]} ms'
    )
    print(format_open_set_line(report))
    g, p = report['initial_pose_gate'], report['initial_pose']
    print(
        f'/initialpose gate ({g["consecutive_frames"]} frames within {g["max_distance_m"]} m, '
        f're-armed after each): {p["published"]} published, {p["wrong"]} wrong, '
        f'{p["out_of_map"]} off the map'
    )
    return 0


def format_open_set_line(report: dict[str, Any]) -> str:
    o = report['open_set']
    return (
        f'open set @ confidence >= {o["threshold"]:.2f}: {o["num_in_map"]} in map, '
        f'{o["num_out_of_map"]} out  accepted in map {o["accepted_in_map"]:.3f}  '
        f'false accepts {o["false_accept_rate"]:.3f}  precision {o["precision"]:.3f}  '
        f'recall {o["recall"]:.3f}  recall@100%P {o["recall_at_full_precision"]:.3f}  '
        f'ECE {o["ece"]:.3f} (if perfectly calibrated: median {o["ece_if_calibrated"][0]:.3f}, '
        f'90th percentile {o["ece_if_calibrated"][1]:.3f})'
    )


def format_report_line(report: dict[str, Any]) -> str:
    r, t = report['recall'], report['timing_ms']
    return (
        f'{report["dataset"]}/{report["protocol"]}: {report["num_queries"]} queries  '
        f'R@1 {r["1"]:.3f}  R@5 {r["5"]:.3f}  R@10 {r["10"]:.3f}  '
        f'latency median {t["total_median"]:.1f} ms, p95 {t["total_p95"]:.1f} ms'
    )


if __name__ == '__main__':
    raise SystemExit(main())
