"""Sequence evidence: the last L frames vote for places along the map's route (SeqSLAM-like).

The map images are taken to be in route order (as built from a traversal or a bag), so each
has a route coordinate: the distance travelled along the map poses up to it. A hypothesis
"the current frame is at map image j, moving v map spacings per frame" puts frame t-l at route
coordinate route[j] - v * offset[l], where offset[l] is the distance travelled since frame t-l
(from odometry when known, else one map spacing per frame). Its score is the mean over the
frames of their z-scored similarity to the best map image at the route coordinate nearest that
point (the current frame: map image j itself; several images can share a coordinate); a point
with no map image within ``max_gap_spacings`` (a gap, or a held-out stretch) contributes 0. Before
z-scoring, each frame's similarities lose ``column_centring`` times the running mean similarity
of each map image to the past frames (shrunk towards 0 over the first frames): map images that
resemble every query under the current conditions (night, say) stop winning. Each map image
keeps its best hypothesis over ``sequence.velocities``. Diagonal matching on the similarity
matrix (SeqSLAM, Milford & Wyeth 2012) is the special case of an evenly spaced map.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from vlm_vpr.core.confidence import collect_evidence, on_track
from vlm_vpr.core.pose_fusion import fuse_poses
from vlm_vpr.core.types import Candidate, LocalizationResult

if TYPE_CHECKING:
    from vlm_vpr.core.localizer import Localizer

_COLUMN_PRIOR_FRAMES = 2.0  # the past-frame mean is shrunk towards 0 as if by this many frames
_MEMORY_LENGTHS = 3  # progress_error looks back, and beyond_reach remembers, 3 L frames
_PROGRESS_QUANTILE = 0.25  # progress_error takes the lower quartile of its errors


def route_coordinates(positions_xy: np.ndarray) -> tuple[np.ndarray, float]:
    """(route [N] float64 cumulative distance along the map poses [N x 2], median step > 0)."""
    steps = np.hypot(*np.diff(positions_xy, axis=0).T) if len(positions_xy) > 1 else np.zeros(0)
    route = np.concatenate([[0.0], np.cumsum(steps)])
    moving = steps[steps > 0]
    return route, float(np.median(moving)) if len(moving) else 1.0


def vote(
    z: np.ndarray, route: np.ndarray, offsets: np.ndarray, velocities: np.ndarray, max_gap: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sequence scores of every map image as the end of a path.

    z: [n x N] float32 z-scored similarities, row l = the frame l steps back (row 0 = now);
      NaN = map image not searchable for that frame.
    route: [N] float64 non-decreasing route coordinates; offsets: [n] float64 route distance
    travelled from frame l to now (offsets[0] = 0); velocities: [V] float64 scale factors.
    The current frame reads the end image itself; a past frame reads the best of the map
    images at the route coordinate nearest its point (several images can share one: views
    of several headings, or keyframes taken while the robot turned on the spot).
    Returns (scores [N] float64 = best mean contribution over velocities,
    best [N] int64 = index into ``velocities`` of the best one).
    """
    n = len(z)
    places, first = np.unique(route, return_index=True)  # [P] distinct route coordinates
    best_at_place = np.fmax.reduceat(z, first, axis=1)  # [n x P], NaN only if all are NaN
    best_scores = np.full(len(route), -np.inf)
    best_v = np.zeros(len(route), np.int64)
    for v_index, velocity in enumerate(velocities):
        points = route[None, :] - velocity * offsets[:, None]  # [n x N]
        nearest = nearest_on_route(places, points)
        values = np.take_along_axis(best_at_place, nearest, axis=1)
        values[0] = z[0]  # the current frame: the end image's own score
        mapped = (np.abs(places[nearest] - points) <= max_gap) & np.isfinite(values)
        scores = np.where(mapped, values, 0.0).sum(axis=0) / n
        better = scores > best_scores
        best_scores[better], best_v[better] = scores[better], v_index
    return best_scores, best_v


def nearest_on_route(places: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index (same shape as ``points``, int64) of the route coordinate in ``places`` [P]
    (strictly increasing) nearest each point; of two equally near, the lower."""
    if len(places) == 1:
        return np.zeros(points.shape, np.int64)
    right = np.clip(np.searchsorted(places, points), 1, len(places) - 1)
    left = right - 1
    return np.where(points - places[left] <= places[right] - points, left, right).astype(np.int64)


@dataclass
class _Anchor:
    map_index: int  # the last on-track sequence winner
    travelled: float = 0.0  # distance moved since that frame (map units)
    frames: int = 0  # frames since that frame


@dataclass
class _Frame:
    z: np.ndarray  # [N] float32 z-scored similarities, NaN where not searchable
    own_best: int  # the frame's own best map image
    travelled: float | None  # distance moved since the previous frame (map units), if known


class SequenceMatcher:
    """Fuses each new single-frame result with the last ``sequence.length - 1`` frames.

    Usage (node or eval), one call per frame in time order::

        matcher = SequenceMatcher(localizer)
        result = localizer.localize(image)
        result = matcher.update(result, travelled=odom_m)

    Uses the localizer's float32 copy of the map descriptors ([N x D], 4 bytes each, shared by
    all matchers of one localizer) and keeps L score vectors.
    """

    def __init__(self, localizer: Localizer) -> None:
        self.localizer = localizer
        self.config = localizer.config.sequence
        self.descriptors = localizer.descriptors_float32
        self.positions = localizer.map.positions_xyz[:, :2]  # [N x 2] float64
        self.route, self.spacing = route_coordinates(self.positions)
        self.radius = self.config.consistency_radius_spacings * self.spacing  # route units
        self.fastest = max(abs(v) for v in self.config.velocities)  # of the velocities' scales
        self.frames: deque[_Frame] = deque(maxlen=self.config.length)
        # past frames, newest first: (route coordinate of the frame's sequence winner, distance
        # moved since the frame before it)
        self.winners: deque[tuple[float, float]] = deque(
            maxlen=_MEMORY_LENGTHS * self.config.length
        )
        self.column_sum = np.zeros(len(self.descriptors))  # [N] sum of past frames' scores
        self.count = 0  # frames seen since the last reset
        # distance moved since the sequence winner reached the map's edge (None: not there)
        self.overrun: float | None = None
        self.anchor: _Anchor | None = None  # the last on-track winner (None: none recent)

    def _route_ends(self, submap: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Route coordinates where the searchable route ends, going forwards / backwards: the
        ends of the route and the edges of its gaps (never-mapped stretches, and map images
        left out of ``submap``, such as a held-out stretch)."""
        route = self.route if submap is None else self.route[np.sort(submap)]
        gap = np.diff(route) > self.config.max_gap_spacings * self.spacing
        return route[np.flatnonzero(np.r_[gap, True])], route[np.flatnonzero(np.r_[True, gap])]

    def reset(self) -> None:
        """Forget the past frames (after a jump: kidnapping, a new session, a long gap)."""
        self.frames.clear()
        self.winners.clear()
        self.column_sum[:] = 0.0
        self.count = 0
        self.overrun = None
        self.anchor = None

    def update(
        self,
        result: LocalizationResult,
        travelled: float | None = None,
        submap: np.ndarray | None = None,
    ) -> LocalizationResult:
        """The result with candidates, pose, evidence and confidence from the sequence vote.

        result: the frame's single-frame result; its ``descriptor`` ([D] float32, L2-normalised
          global descriptor) is what votes.
        travelled: distance (map units) moved since the previous frame, from odometry; None
          assumes one map spacing. submap: map ids searchable for this frame (None or empty =
          all); map images left out of it count as a gap for ``room_ahead`` and
          ``edge_overrun``.
        """
        if result.descriptor is None:
            raise ValueError('sequence matching needs the global descriptor of the frame')
        start = time.perf_counter()
        scores = self.descriptors @ np.asarray(result.descriptor, np.float32).reshape(-1)
        centred = scores - self.config.column_centring * self.column_sum / (
            self.count + _COLUMN_PRIOR_FRAMES
        )
        self.column_sum += scores
        self.count += 1
        if submap is not None and len(submap) == 0:
            submap = None  # the whole map, as the Localizer searched (its result says so)
        if submap is not None:
            centred = np.where(np.isin(np.arange(len(scores)), submap), centred, np.nan)
        z = (centred - np.nanmean(centred)) / max(float(np.nanstd(centred)), 1e-6)
        own = int(np.nanargmax(z))
        self.frames.appendleft(_Frame(z.astype(np.float32), own, travelled))

        frames = list(self.frames)
        steps = [self.spacing if f.travelled is None else abs(f.travelled) for f in frames[:-1]]
        offsets = np.concatenate([[0.0], np.cumsum(steps)])
        velocities = np.asarray(self.config.velocities, np.float64)
        seq, best_v = vote(
            np.stack([f.z for f in frames]),
            self.route,
            offsets,
            velocities,
            self.config.max_gap_spacings * self.spacing,
        )
        seq[~np.isfinite(z)] = -np.inf
        order = np.argsort(-seq, kind='stable')[: self.localizer.config.top_k]
        # map images outside the submap score -inf: never candidates (a submap smaller than
        # top_k would otherwise bring held-out images in, and NaN into the fused pose)
        order = order[np.isfinite(seq[order])]
        content = self.localizer.map.content
        reranked = {c.map_index: c.evidence for c in result.candidates}  # re-rankers' scores
        candidates = [
            Candidate(
                int(j),
                content.image_names[j],
                content.poses[j],
                float(scores[j]),
                float(seq[j]),
                dict(reranked.get(int(j), {})),
            )
            for j in order
        ]
        evidence = collect_evidence(result.candidates, candidates, self.localizer.config.fusion)
        velocity = velocities[best_v[order[0]]]
        evidence.update(self._evidence(seq, int(order[0]), velocity, offsets, frames))
        step = steps[0] if steps else self.spacing  # moved since the frame before
        evidence['progress_error'] = self._progress_error(int(order[0]), velocity, step)
        room = self._room(int(order[0]), velocity, self._route_ends(submap))
        evidence['room_ahead'] = float(min(room, self.radius) / self.radius)
        evidence['edge_overrun'] = self._edge_overrun(room, step)
        evidence['beyond_reach'] = self._beyond_reach(int(order[0]), step)
        self.winners.appendleft((float(self.route[order[0]]), step))
        if on_track(evidence):
            self.anchor = _Anchor(int(order[0]))
        pose, covariance = fuse_poses(candidates, self.localizer.config.fusion)
        timing = dict(result.timing_ms)
        timing['sequence'] = (time.perf_counter() - start) * 1000.0
        timing['total'] = timing.get('total', 0.0) + timing['sequence']
        return replace(
            result,
            candidates=candidates,
            pose=pose,
            covariance=covariance,
            confidence=self.localizer.calibration.confidence(evidence),
            timing_ms=timing,
            evidence=evidence,
        )

    def _room(self, best: int, velocity: float, ends: tuple[np.ndarray, np.ndarray]) -> float:
        """Mapped route left ahead of the winner in the direction of travel, to the route's
        end or the next gap (route units). ``room_ahead`` is it over the consistency radius,
        capped at 1: near 0 the camera may already have driven past the map's edge while the
        winner stays at it. ``ends``: where the searchable route ends (:meth:`_route_ends`)."""
        here, (forward, backward) = self.route[best], ends
        if velocity > 0:
            return float(forward[np.searchsorted(forward, here)] - here)
        return float(here - backward[np.searchsorted(backward, here, side='right') - 1])

    def _edge_overrun(self, room: float, step: float) -> float:
        """How far the camera has moved since the sequence winner reached the map's edge (the
        route's end or a gap: ``room`` under half a map spacing), while the winner stays
        there, over the consistency radius, capped at 1. At 1 the camera has moved as far past
        the edge as a track may stray from its path: it has most likely left the map, however
        well the winner still matches (the first out-of-map frames look like the edge).
        ``step``: distance moved since the frame before (0 when odometry says it stood)."""
        if room >= 0.5 * self.spacing:
            self.overrun = None
            return 0.0
        self.overrun = 0.0 if self.overrun is None else self.overrun + step
        return float(min(self.overrun, self.radius) / self.radius)

    def _progress_error(self, best: int, velocity: float, step: float) -> float:
        """How far the sequence winner moved along the route since each of the last
        ``_MEMORY_LENGTHS * sequence.length`` frames, against how far the path's velocity
        says the camera moved: the lower quartile over those frames of
        |moved - expected| / |expected|, each capped at 1 (frames the camera moved less than the
        consistency radius from are left out; 0 without any). About 0 on a true track; near 1
        where the camera drives through a stretch that is not in the map and the winner stays
        at the map's edge, drifts or jumps. The lower quartile (not the median) lets it fall
        back within about 0.75 L frames once the camera is on the map again.
        ``step``: distance the camera moved since the frame before."""
        offset, errors = step, []
        for winner, winner_step in self.winners:
            expected = velocity * offset
            if abs(expected) >= self.radius:
                moved = self.route[best] - winner
                errors.append(min(1.0, abs(moved - expected) / abs(expected)))
            offset += winner_step
        return float(np.quantile(errors, _PROGRESS_QUANTILE)) if errors else 0.0

    def _beyond_reach(self, best: int, step: float) -> float:
        """How far the sequence winner lies beyond the reach of the camera since the last
        on-track winner (the anchor): the straight-line distance between their map positions
        less the farthest the camera can have driven since (the fastest of
        ``sequence.velocities`` times the distance moved: odometry, or one map spacing a frame)
        and less the consistency radius, over that farthest drive (at least the radius), in
        [0, 1]. A camera that lost its track (an unmapped stretch, say) and finds one again
        where it cannot have driven to has found a look-alike; one found nearer than that
        (a loop closed, a detour, a stop) is not judged. 0 while the anchor is within the last
        ``sequence.length`` frames (the path itself checks those) and once it is more than
        ``_MEMORY_LENGTHS * sequence.length`` frames back (forgotten: a kidnapped robot is
        trusted again then, or at once after :meth:`reset`). ``step``: distance moved since the
        frame before."""
        anchor = self.anchor
        if anchor is None:
            return 0.0
        anchor.travelled += step
        anchor.frames += 1
        if anchor.frames > _MEMORY_LENGTHS * self.config.length:
            self.anchor = None
            return 0.0
        if anchor.frames < self.config.length:
            return 0.0
        reach = self.fastest * anchor.travelled
        distance = float(np.hypot(*(self.positions[best] - self.positions[anchor.map_index])))
        excess = distance - reach - self.radius
        return float(min(1.0, max(0.0, excess) / max(reach, self.radius)))

    def _evidence(
        self,
        seq: np.ndarray,
        best: int,
        velocity: float,
        offsets: np.ndarray,
        frames: list[_Frame],
    ) -> dict[str, float]:
        """seq_score: the best path's mean z-score; seq_margin: its lead over the best path
        ending elsewhere (beyond the consistency radius); temporal_consistency: fraction of
        the frames whose own best map image lies within that radius of the path;
        track_consistency: the past frames whose sequence winner lies within that radius of
        the path, over sequence.length - 1 (a true track moves along the route; a place that
        is not in the map wins by aliasing, which jumps or stands still); seq_fill: frames
        voting / sequence.length; hubness: the winner's mean similarity to all frames since
        the last reset, as a z-score over the map images (an image that resembles every frame
        under the current conditions wins by aliasing, not by place)."""
        elsewhere = np.abs(self.route - self.route[best]) > self.radius
        rivals = seq[elsewhere & np.isfinite(seq)]
        path = self.route[best] - velocity * offsets
        own = self.route[[f.own_best for f in frames]]
        past = self.column_sum / self.count  # [N] mean similarity of each map image so far
        winners = np.array([w for w, _ in itertools.islice(self.winners, len(frames) - 1)])
        track = np.abs(winners - path[1:]) <= self.radius
        return {
            'seq_score': float(seq[best]),
            'seq_margin': float(seq[best] - rivals.max()) if len(rivals) else float(seq[best]),
            'temporal_consistency': float(np.mean(np.abs(own - path) <= self.radius)),
            'track_consistency': float(track.sum()) / max(self.config.length - 1, 1),
            'seq_fill': len(frames) / self.config.length,
            'hubness': float((past[best] - past.mean()) / max(float(past.std()), 1e-9)),
        }
