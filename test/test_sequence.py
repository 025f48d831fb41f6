"""Sequence evidence: the vote against a direct loop implementation, and the matcher end to end
on synthetic maps (known routes, noisy frames, odometry, held-out stretches)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlm_vpr.core.confidence import on_track
from vlm_vpr.core.config import LocalizerConfig, MapBuildConfig, SequenceConfig
from vlm_vpr.core.errors import ConfigError
from vlm_vpr.core.localizer import Localizer
from vlm_vpr.core.map_format import MapContent, read_map, write_map
from vlm_vpr.core.pose_fusion import fuse_poses
from vlm_vpr.core.retrieval import search
from vlm_vpr.core.sequence import SequenceMatcher, nearest_on_route, route_coordinates, vote
from vlm_vpr.core.types import Candidate, LocalizationResult, Pose


def direct_vote(
    z: np.ndarray, route: np.ndarray, offsets: np.ndarray, velocities: np.ndarray, max_gap: float
) -> np.ndarray:
    """Loop over every end image, velocity and frame; nearest route coordinate by linear scan;
    the current frame reads the end image, a past frame the best image at that coordinate."""
    n, num = z.shape
    scores = np.full(num, -np.inf)
    for j in range(num):
        for v in velocities:
            total = 0.0
            for lag in range(n):
                point = route[j] - v * offsets[lag]
                k = min(range(num), key=lambda i: (abs(route[i] - point), route[i]))
                there = [z[lag, i] for i in range(num) if route[i] == route[k]]
                value = (
                    z[lag, j]
                    if lag == 0
                    else max(there, key=lambda x: -np.inf if np.isnan(x) else x)
                )
                if abs(route[k] - point) <= max_gap and np.isfinite(value):
                    total += value
            scores[j] = max(scores[j], total / n)
    return scores


def test_vote_equals_a_direct_loop_implementation() -> None:
    rng = np.random.default_rng(0)
    steps = rng.choice([0.0, 1.0, 1.0, 2.5, 7.0], size=29)  # repeats, jitter and a gap
    route = np.concatenate([[0.0], np.cumsum(steps)])
    z = rng.normal(size=(6, 30)).astype(np.float32)
    z[rng.random(z.shape) < 0.15] = np.nan  # map images not searchable for some frames
    offsets = np.concatenate([[0.0], np.cumsum(rng.uniform(0.0, 3.0, size=5))])
    velocities = np.array([0.8, 1.0, 1.25, -1.0])

    scores, best = vote(z, route, offsets, velocities, max_gap=1.5)

    np.testing.assert_allclose(
        scores, direct_vote(z, route, offsets, velocities, 1.5), rtol=1e-6, atol=1e-6
    )
    for j in range(len(route)):  # the reported velocity is one that reaches the best score
        alone, _ = vote(z, route, offsets, velocities[best[j] : best[j] + 1], 1.5)
        assert alone[j] == pytest.approx(scores[j])


def test_nearest_on_route_picks_the_closest_place() -> None:
    places = np.array([0.0, 1.0, 4.0])
    points = np.array([[-3.0, 0.4, 0.6, 2.4, 2.5, 2.6, 9.0]])
    assert nearest_on_route(places, points).tolist() == [[0, 0, 1, 1, 1, 2, 2]]
    assert nearest_on_route(np.array([5.0]), points).tolist() == [[0] * 7]


def test_route_coordinates_accumulate_distance_and_ignore_repeats_for_spacing() -> None:
    route, spacing = route_coordinates(np.array([[0, 0], [3, 4], [3, 4], [3, 6]], float))
    assert route.tolist() == [0.0, 5.0, 5.0, 7.0]
    assert spacing == pytest.approx(3.5)


def make_route_map(
    tmp_path: Path, xs: np.ndarray, dim: int = 48, seed: int = 0, ys: np.ndarray | None = None
) -> tuple[Path, np.ndarray]:
    """A map (no images needed) of random unit descriptors placed at x = ``xs``, y = ``ys``
    (default 0) metres."""
    rng = np.random.default_rng(seed)
    desc = rng.normal(size=(len(xs), dim)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    codebook = rng.normal(size=(8, 128)).astype(np.float32)
    content = MapContent(
        MapBuildConfig(thumbnail_size_px=0),
        codebook / np.linalg.norm(codebook, axis=1, keepdims=True),
        desc.astype(np.float16),
        [f'{i:04d}.png' for i in range(len(xs))],
        [Pose(float(x), float(y)) for x, y in zip(xs, np.zeros(len(xs)) if ys is None else ys)],
    )
    return write_map(content, tmp_path / 'map'), desc


def noisy(desc: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    out = desc + noise * rng.normal(size=desc.shape) / np.sqrt(desc.shape[-1])
    return (out / np.linalg.norm(out, axis=-1, keepdims=True)).astype(np.float32)


def single_frame_result(localizer: Localizer, descriptor: np.ndarray) -> LocalizationResult:
    """Test double of Localizer.localize for a given descriptor (these maps have no images)."""
    vpr_map = localizer.map
    scores, ids = search(vpr_map.index, vpr_map.content.descriptors, descriptor, 10)
    candidates = [
        Candidate(
            int(i), vpr_map.content.image_names[i], vpr_map.content.poses[i], float(s), float(s)
        )
        for s, i in zip(scores, ids)
    ]
    pose, covariance = fuse_poses(candidates, localizer.config.fusion)
    return LocalizationResult(
        candidates, pose, covariance, 0.5, {'total': 1.0}, descriptor=descriptor
    )


def run_matcher(
    localizer: Localizer,
    queries: np.ndarray,
    travelled: list[float | None],
    submap: np.ndarray | None = None,
) -> list[LocalizationResult]:
    matcher = SequenceMatcher(localizer)
    return [
        matcher.update(single_frame_result(localizer, q), t, submap)
        for q, t in zip(queries, travelled)
    ]


def test_sequence_recovers_places_that_single_frames_miss(tmp_path: Path) -> None:
    map_dir, desc = make_route_map(tmp_path, np.arange(80, dtype=float))
    queries = noisy(desc, 2.5, np.random.default_rng(1))
    config = LocalizerConfig(sequence=SequenceConfig(length=8, column_centring=0.0))
    localizer = Localizer(read_map(map_dir), config)

    results = run_matcher(localizer, queries, [None] * len(queries))

    single = np.mean(np.argmax(queries @ desc.T, axis=1) == np.arange(80))
    best = np.array([r.candidates[0].map_index for r in results])
    sequence = np.mean(np.abs(best[8:] - np.arange(8, 80)) <= 1)
    assert single < 0.6, f'noise too weak for the test: single-frame recall {single:.2f}'
    assert sequence >= 0.95 and sequence > single + 0.3, (single, sequence)
    last = results[-1]
    assert {'seq_score', 'seq_margin', 'temporal_consistency', 'seq_fill'} <= set(last.evidence)
    assert last.evidence['seq_fill'] == 1.0 and results[0].evidence['seq_fill'] == 1 / 8
    assert 'sequence' in last.timing_ms and 0.0 <= last.confidence <= 1.0
    assert last.pose.x == pytest.approx(79.0, abs=1.5)

    # the path's lead and the frames' agreement with it: high on the route, low off the map
    rng = np.random.default_rng(11)
    clean = run_matcher(localizer, noisy(desc, 0.5, rng), [None] * 80)[8:]
    unmapped = run_matcher(localizer, noisy(rng.normal(size=desc.shape), 0.5, rng), [None] * 80)
    unmapped = unmapped[8:]

    def evidence(rows: list[LocalizationResult], key: str) -> np.ndarray:
        return np.array([r.evidence[key] for r in rows])

    # every clean frame's own best lies on the path, which wins by several z-score units
    assert (evidence(clean, 'temporal_consistency') == 1.0).all()
    assert evidence(clean, 'seq_margin').min() > 3.0
    # the noisy frames: a clear lead, but only some frames' own best lies on the path
    assert 0.5 < evidence(results[8:], 'seq_margin').min() < 3.0
    assert 0.3 < evidence(results[8:], 'temporal_consistency').mean() < 0.9
    # frames from nowhere on the map: no path leads, and few frames agree with the winner
    assert evidence(unmapped, 'seq_margin').max() < 0.6
    assert evidence(unmapped, 'temporal_consistency').mean() < 0.3
    for rows in (clean, results[8:], unmapped):
        assert (evidence(rows, 'seq_margin') <= evidence(rows, 'seq_score')).all()


def test_sequence_picks_the_view_seen_among_map_images_at_one_place(tmp_path: Path) -> None:
    """Two map images per place (two headings, or keyframes of a turn on the spot): the
    winner is the one the camera sees, not the first at that place."""
    map_dir, desc = make_route_map(tmp_path, np.repeat(np.arange(40.0), 2))
    seen = np.arange(1, 80, 2)  # the second view of every place
    queries = noisy(desc[seen], 0.5, np.random.default_rng(2))
    localizer = Localizer(read_map(map_dir), LocalizerConfig(sequence=SequenceConfig(length=8)))

    results = run_matcher(localizer, queries, [None] * len(queries))

    best = np.array([r.candidates[0].map_index for r in results])
    assert (best[8:] == seen[8:]).all(), best


def test_odometry_aligns_frames_when_the_camera_stops_and_speeds_up(tmp_path: Path) -> None:
    xs = np.cumsum(np.r_[0.0, np.tile([1.0, 3.0], 40)])  # uneven map spacing
    map_dir, desc = make_route_map(tmp_path, xs)
    rng = np.random.default_rng(2)
    visits = np.cumsum(rng.choice([0, 1, 1, 2, 3], size=100)).clip(0, len(xs) - 1)
    queries = noisy(desc[visits], 2.5, rng)
    travelled = [None] + list(np.diff(xs[visits]))
    config = LocalizerConfig(
        sequence=SequenceConfig(length=8, velocities=(1.0,), column_centring=0.0)
    )
    localizer = Localizer(read_map(map_dir), config)

    def recall(results: list[LocalizationResult]) -> float:
        best = np.array([r.candidates[0].map_index for r in results])
        return float(np.mean(np.abs(xs[best] - xs[visits])[8:] <= 1.0))

    with_odometry = recall(run_matcher(localizer, queries, travelled))
    frame_order = recall(run_matcher(localizer, queries, [None] * len(queries)))
    assert with_odometry >= 0.9 and with_odometry > frame_order + 0.2, (with_odometry, frame_order)


def test_held_out_stretch_is_never_returned_and_lowers_the_sequence_score(tmp_path: Path) -> None:
    map_dir, desc = make_route_map(tmp_path, np.arange(60, dtype=float))
    queries = noisy(desc, 1.0, np.random.default_rng(3))
    localizer = Localizer(
        read_map(map_dir), LocalizerConfig(sequence=SequenceConfig(length=6, column_centring=0.0))
    )
    submap = np.r_[0:25, 35:60]

    full = run_matcher(localizer, queries, [None] * 60)
    held = run_matcher(localizer, queries, [None] * 60, submap)

    returned = {c.map_index for r in held for c in r.candidates}
    assert returned.isdisjoint(range(25, 35))
    inside = range(27, 35)  # the sequence window lies mostly in the held-out stretch
    assert all(held[t].evidence['seq_score'] < 0.5 * full[t].evidence['seq_score'] for t in inside)


def test_submap_smaller_than_top_k_returns_only_submap_ids_and_a_finite_pose(
    tmp_path: Path,
) -> None:
    map_dir, desc = make_route_map(tmp_path, np.arange(30, dtype=float))
    queries = noisy(desc[10:16], 0.5, np.random.default_rng(8))
    localizer = Localizer(read_map(map_dir), LocalizerConfig(sequence=SequenceConfig(length=3)))
    submap = np.arange(11, 14)  # 3 searchable images: fewer than top_k (10) and fusion.top_n (5)

    results = run_matcher(localizer, queries, [None] * len(queries), submap)

    for result in results:
        ids = [c.map_index for c in result.candidates]
        assert ids and set(ids) <= set(submap.tolist()), ids
        assert all(np.isfinite(c.score) for c in result.candidates)
        assert np.isfinite([result.pose.x, result.pose.y, result.pose.z]).all()
        assert np.isfinite(result.covariance).all()
        assert 11.0 <= result.pose.x <= 13.0
        assert 0.0 <= result.confidence <= 1.0


def test_track_evidence_is_good_along_the_route_and_poor_for_unmapped_places(
    tmp_path: Path,
) -> None:
    map_dir, desc = make_route_map(tmp_path, np.arange(60, dtype=float))
    rng = np.random.default_rng(4)
    config = LocalizerConfig(sequence=SequenceConfig(length=6, column_centring=0.0))
    localizer = Localizer(read_map(map_dir), config)

    along = run_matcher(localizer, noisy(desc, 0.5, rng), [None] * 60)
    unmapped = run_matcher(localizer, noisy(rng.normal(size=desc.shape), 0.5, rng), [None] * 60)
    # a camera moving through unmapped space whose frames all resemble the map's last image
    stuck = run_matcher(localizer, noisy(np.repeat(desc[-1:], 30, axis=0), 0.5, rng), [None] * 30)

    track = [r.evidence['track_consistency'] for r in along]
    assert track[0] == 0.0 and track[2] == pytest.approx(2 / 5)  # past winners so far / (L-1)
    assert all(t == 1.0 for t in track[5:])
    assert np.mean([r.evidence['track_consistency'] for r in unmapped[5:]]) < 0.5
    assert along[0].evidence['progress_error'] == 0.0  # no past winner yet
    assert all(r.evidence['progress_error'] <= 0.25 for r in along[5:])
    assert np.mean([r.evidence['progress_error'] for r in unmapped[5:]]) > 0.5
    assert np.mean([r.evidence['progress_error'] for r in stuck[5:]]) > 0.5


def test_beyond_reach_flags_a_track_found_where_the_camera_cannot_have_driven(
    tmp_path: Path,
) -> None:
    """The camera drives places 0-19, then 6 frames through unmapped space (the track is lost),
    then on; odometry says 0.8 m a frame (map spacing 1 m, so the path's velocity is 1.25).
    Found again where it can be (place 26 on), the winner is within reach of the last on-track
    winner; found at a look-alike 10 places further on (36 on), it is not. Checked against the
    direct formula on every frame: 0 while the last on-track frame is under L frames back or
    over 3 L (forgotten), and after a reset (a cold start)."""
    map_dir, desc = make_route_map(tmp_path, np.arange(80, dtype=float))
    length, radius, fastest, metres_a_frame = 4, 3.0, 1.25, 0.8
    config = LocalizerConfig(
        sequence=SequenceConfig(length=length, velocities=(1.0, fastest), column_centring=0.0)
    )
    localizer = Localizer(read_map(map_dir), config)
    unmapped = np.random.default_rng(9).normal(size=(6, desc.shape[1]))

    def drive(then: np.ndarray, reset_at: int = -1) -> list[LocalizationResult]:
        frames = noisy(np.r_[desc[:20], unmapped, then], 0.3, np.random.default_rng(2))
        matcher, results = SequenceMatcher(localizer), []
        for k, frame in enumerate(frames):
            if k == reset_at:
                matcher.reset()
            results.append(matcher.update(single_frame_result(localizer, frame), metres_a_frame))
        return results

    def direct(results: list[LocalizationResult], k: int, since: int = 0) -> float:
        on = [i for i in range(since, k) if on_track(results[i].evidence)]
        if not on or not length <= k - on[-1] <= 3 * length:
            return 0.0
        reach = fastest * metres_a_frame * (k - on[-1])
        distance = abs(results[k].candidates[0].pose.x - results[on[-1]].candidates[0].pose.x)
        return min(1.0, max(0.0, distance - reach - radius) / max(reach, radius))

    consistent, jumped = drive(desc[26:40]), drive(desc[36:66])
    after_reset = drive(desc[36:66], reset_at=26)

    for results, since in ((consistent, 0), (jumped, 0), (after_reset, 26)):
        errors = [r.evidence['beyond_reach'] for r in results]
        assert errors == pytest.approx([direct(results, k, since) for k in range(len(results))])
    # once the new track is established (L frames after the stretch), in the window
    assert [r.candidates[0].map_index for r in consistent[30:34]] == [30, 31, 32, 33]
    assert [r.candidates[0].map_index for r in jumped[30:34]] == [40, 41, 42, 43]
    for k in range(30, 34):
        assert consistent[k].evidence['beyond_reach'] == 0.0 and on_track(consistent[k].evidence)
        assert jumped[k].evidence['track_consistency'] >= 0.5
        assert jumped[k].evidence['beyond_reach'] > 0.5 and not on_track(jumped[k].evidence)
        assert on_track(after_reset[k].evidence)  # reset: no anchor, a cold start
    assert all(0.5 < r.evidence['beyond_reach'] < 1.0 for r in jumped[30:34])  # fractions
    assert on_track(jumped[-1].evidence)  # the anchor is forgotten, the track taken


def test_driving_on_across_a_loop_closure_is_within_reach(tmp_path: Path) -> None:
    """A map of one loop (40 places on a circle, about 1 m apart): driving on from the route's
    end to its start is no jump. Along the route the start is 39 m from the end; in a straight
    line 1 m, which is what ``beyond_reach`` measures. The track is taken again at once."""
    angle = 2 * np.pi * np.arange(40) / 40
    radius = 40 / (2 * np.pi)
    map_dir, desc = make_route_map(tmp_path, radius * np.cos(angle), ys=radius * np.sin(angle))
    length = 4
    config = LocalizerConfig(sequence=SequenceConfig(length=length, column_centring=0.0))
    localizer = Localizer(read_map(map_dir), config)

    results = run_matcher(
        localizer, noisy(np.r_[desc, desc[:20]], 0.3, np.random.default_rng(2)), [None] * 60
    )

    assert [r.candidates[0].map_index for r in results[45:]] == list(range(5, 20))
    assert [r.evidence['beyond_reach'] for r in results] == [0.0] * 60
    after = [on_track(r.evidence) for r in results[40:]]
    assert after.index(True) < 2 * length and all(after[2 * length :])


def test_room_ahead_shrinks_towards_the_map_edge_in_the_direction_of_travel(
    tmp_path: Path,
) -> None:
    xs = np.r_[0:25, 35:60].astype(float)  # a gap of 10 spacings after x = 24
    map_dir, desc = make_route_map(tmp_path, xs)
    rng = np.random.default_rng(6)
    config = LocalizerConfig(sequence=SequenceConfig(length=4, column_centring=0.0))
    localizer = Localizer(read_map(map_dir), config)

    forward = run_matcher(localizer, noisy(desc[:25], 0.3, rng), [None] * 25)
    room = [r.evidence['room_ahead'] for r in forward]
    at = [r.candidates[0].map_index for r in forward]
    assert at[-1] == 24 and room[-1] == 0.0  # at the gap's edge, driving into it
    assert room[-3] == pytest.approx(2 / 3)  # 2 spacings left, consistency radius 3
    assert all(r == 1.0 for r in room[4:21])

    reverse = LocalizerConfig(sequence=SequenceConfig(length=4, velocities=(-1.0,)))
    localizer = Localizer(read_map(map_dir), reverse)  # the camera drives the route backwards
    backward = run_matcher(localizer, noisy(desc[49:24:-1], 0.3, rng), [None] * 25)
    assert backward[-1].candidates[0].map_index == 25  # x = 35, the gap's other edge
    assert backward[-1].evidence['room_ahead'] == 0.0
    assert backward[5].evidence['room_ahead'] == 1.0


def test_edge_overrun_counts_the_distance_driven_past_the_map_edge(tmp_path: Path) -> None:
    xs = np.r_[0:25, 35:60].astype(float)  # a gap of 10 spacings after x = 24
    map_dir, desc = make_route_map(tmp_path, xs)
    config = LocalizerConfig(
        sequence=SequenceConfig(length=4, velocities=(1.0,), column_centring=0.0)
    )
    localizer = Localizer(read_map(map_dir), config)
    # the camera drives to the gap's edge and on into the gap, where every frame looks like it
    frames = noisy(
        np.r_[desc[:25], np.repeat(desc[24:25], 5, axis=0)], 0.1, np.random.default_rng(7)
    )

    driving = run_matcher(localizer, frames, [None] * 30)  # one map spacing per frame
    standing = run_matcher(localizer, frames, [None] * 25 + [0.0] * 5)  # odometry: stopped there

    assert [r.candidates[0].map_index for r in driving[24:]] == [24] * 6
    overrun = [r.evidence['edge_overrun'] for r in driving]
    assert overrun[:24] == [0.0] * 24  # the winner has not reached the edge yet
    assert overrun[24:] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 1])  # consistency radius: 3
    assert on_track(driving[24].evidence) and not on_track(driving[27].evidence)
    assert [r.evidence['edge_overrun'] for r in standing[24:]] == [0.0] * 6


def test_a_stretch_left_out_of_the_submap_is_a_map_edge_as_an_unmapped_one_is(
    tmp_path: Path,
) -> None:
    """``calibrate --images --holdout-map-range`` leaves a stretch out of the search; evaluate
    builds a map without it. The sequence evidence must not tell them apart."""
    mapped = np.r_[0:25, 35:60]
    full_dir, desc = make_route_map(tmp_path, np.arange(60.0))
    full = read_map(full_dir).content
    gapped_dir = write_map(
        MapContent(
            full.build_config,
            full.codebook,
            full.descriptors[mapped],
            [full.image_names[i] for i in mapped],
            [full.poses[i] for i in mapped],
        ),
        tmp_path / 'gapped',
    )
    config = LocalizerConfig(sequence=SequenceConfig(length=4, column_centring=0.0))
    # the camera drives to x = 24 and on into the stretch, where every frame looks like x = 24
    frames = noisy(
        np.r_[desc[:25], np.repeat(desc[24:25], 5, axis=0)], 0.1, np.random.default_rng(7)
    )

    gapped = run_matcher(Localizer(read_map(gapped_dir), config), frames, [None] * 30)
    held_out = run_matcher(Localizer(read_map(full_dir), config), frames, [None] * 30, mapped)

    for a, b in zip(gapped, held_out):
        assert mapped[a.candidates[0].map_index] == b.candidates[0].map_index
        for key in ('room_ahead', 'edge_overrun', 'track_consistency', 'progress_error'):
            assert a.evidence[key] == pytest.approx(b.evidence[key]), key
    assert max(r.evidence['edge_overrun'] for r in held_out) == 1.0


def test_an_empty_submap_votes_over_the_whole_map(tmp_path: Path) -> None:
    """As the Localizer searches the whole map for an empty submap, so does the vote."""
    map_dir, desc = make_route_map(tmp_path, np.arange(30.0))
    localizer = Localizer(read_map(map_dir), LocalizerConfig(sequence=SequenceConfig(length=4)))
    frames = noisy(desc[5:12], 0.5, np.random.default_rng(3))
    whole = run_matcher(localizer, frames, [None] * 7)
    empty = run_matcher(localizer, frames, [None] * 7, np.array([], dtype=np.int64))
    assert [r.candidates[0].map_index for r in empty] == [r.candidates[0].map_index for r in whole]
    assert [r.evidence for r in empty] == [r.evidence for r in whole]


def test_hubness_is_high_when_a_map_stretch_resembling_every_frame_wins(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    xs = np.arange(40, dtype=float)
    _, desc = make_route_map(tmp_path, xs)
    desc[16:24] = noisy(np.repeat(desc[20:21], 8, axis=0), 1.0, rng)  # a look-alike stretch
    content = MapContent(
        MapBuildConfig(thumbnail_size_px=0),
        read_map(tmp_path / 'map').content.codebook,
        desc.astype(np.float16),
        [f'{i:04d}.png' for i in range(len(xs))],
        [Pose(float(x), 0.0) for x in xs],
    )
    config = LocalizerConfig(sequence=SequenceConfig(length=6, column_centring=0.0))
    localizer = Localizer(read_map(write_map(content, tmp_path / 'hub_map')), config)
    unmapped = noisy(rng.normal(size=(30, desc.shape[1])) + 3.0 * desc[20], 0.5, rng)

    along = run_matcher(localizer, noisy(desc, 0.5, rng), [None] * 40)
    aliased = run_matcher(localizer, unmapped, [None] * 30)  # unlike any place, like 16-23

    assert all(16 <= r.candidates[0].map_index < 27 for r in aliased[5:])
    hub = np.mean([r.evidence['hubness'] for r in aliased[5:]])
    place = np.mean([r.evidence['hubness'] for r in along[20:]])  # past the first frames
    assert hub > 1.0 and place < 0.5 and hub > place + 1.0, (hub, place)


def test_reset_forgets_past_frames(tmp_path: Path) -> None:
    map_dir, desc = make_route_map(tmp_path, np.arange(20, dtype=float))
    localizer = Localizer(read_map(map_dir), LocalizerConfig(sequence=SequenceConfig(length=4)))
    matcher = SequenceMatcher(localizer)
    # drive to the map's end and on past it: past winners, column sums and an edge overrun
    for q in desc[[12, 13, 14, 15, 16, 17, 18, 19, 19, 19]]:
        before = matcher.update(single_frame_result(localizer, q))
    assert before.evidence['edge_overrun'] > 0 and before.evidence['progress_error'] > 0
    matcher.reset()
    result = matcher.update(single_frame_result(localizer, desc[19]))
    fresh = SequenceMatcher(localizer).update(single_frame_result(localizer, desc[19]))
    assert result.evidence['seq_fill'] == 0.25 and matcher.count == 1
    assert result.candidates[0].map_index == 19
    # the next frame's result is that of a matcher that never saw the past frames
    assert result.evidence == pytest.approx(fresh.evidence, abs=1e-9)
    assert [c.map_index for c in result.candidates] == [c.map_index for c in fresh.candidates]
    assert [c.score for c in result.candidates] == pytest.approx(
        [c.score for c in fresh.candidates], abs=1e-9
    )
    assert result.confidence == pytest.approx(fresh.confidence, abs=1e-9)
    assert result.evidence['edge_overrun'] == 0.0 and result.evidence['progress_error'] == 0.0


@pytest.mark.parametrize(
    ('values', 'match'),
    [
        ({'length': 0}, 'sequence.length'),
        ({'velocities': ()}, 'sequence.velocities'),
        ({'velocities': (1.0, 0.0)}, 'sequence.velocities'),
        ({'max_gap_spacings': 0.0}, 'sequence.max_gap_spacings'),
        ({'consistency_radius_spacings': -1.0}, 'sequence.consistency_radius_spacings'),
        ({'column_centring': 1.5}, 'sequence.column_centring'),
    ],
)
def test_sequence_config_rejects_bad_values(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SequenceConfig(**values)
