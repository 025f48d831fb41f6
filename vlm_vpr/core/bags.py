"""ROS bags read and written with the pure-Python ``rosbags`` library (no ROS install needed).

A bag is a rosbag2 folder (``metadata.yaml`` + ``.mcap`` or ``.db3``), a bare ``.mcap`` / ``.db3``
file, or a ROS 1 ``.bag`` file. Three uses:

- map building: :func:`read_posed_images` yields keyframe images with poses interpolated at
  the image stamps from an Odometry, PoseStamped, PoseWithCovarianceStamped or TF source;
- replay and bag evaluation: :func:`list_topics` and :func:`iter_bag_messages` (raw CDR bytes
  of rosbag2 bags, for ``rclpy.serialization.deserialize_message`` on the ROS side);
- tests and the demo: :class:`BagWriter` and :func:`write_traversal_bag`.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np

from vlm_vpr.core.datasets import Traversal
from vlm_vpr.core.errors import BagError, ImageError
from vlm_vpr.core.images import as_bgr, read_image
from vlm_vpr.core.types import Pose

log = logging.getLogger(__name__)

IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE = 'sensor_msgs/msg/CompressedImage'
ODOMETRY = 'nav_msgs/msg/Odometry'
POSE_STAMPED = 'geometry_msgs/msg/PoseStamped'
MAX_POSE_GAP_S = 1.0  # poses further apart than this are a gap: no pose between them
BASE_FRAME = 'base_link'  # the robot frame whose pose /tf and Odometry poses are read for
POSE_WITH_COVARIANCE_STAMPED = 'geometry_msgs/msg/PoseWithCovarianceStamped'
TF_MESSAGE = 'tf2_msgs/msg/TFMessage'
IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)
POSE_TYPES = (ODOMETRY, POSE_STAMPED, POSE_WITH_COVARIANCE_STAMPED, TF_MESSAGE)
TF_STATIC_TOPIC = '/tf_static'
STORAGES = ('mcap', 'sqlite3')
WRITE_ENCODINGS = ('bgr8', 'mono8', 'jpeg', 'png')  # the last two write CompressedImage
TRUTH_STD_M = 0.01  # standard deviation written in the covariance of ground-truth poses


class PosedImage(NamedTuple):
    """One keyframe of a bag: ``image_bgr`` is [H x W x 3] uint8 BGR; ``pose`` is in the map
    frame at ``stamp_ns`` (the image header stamp, or its recording time where that stamp is
    zero; ns since the epoch)."""

    name: str
    stamp_ns: int
    image_bgr: np.ndarray
    pose: Pose


# ---------------------------------------------------------------------------------------------
# Reading


def list_topics(bag_path: str | Path) -> dict[str, str]:
    """``{topic: message type}`` of every topic in the bag (``'sensor_msgs/msg/Image'`` ...)."""
    with _open_bag(bag_path) as reader:
        return {c.topic: c.msgtype for c in reader.connections}


def iter_bag_messages(
    bag_path: str | Path,
    topics: Sequence[str] | None = None,
) -> Iterator[tuple[str, str, int, bytes]]:
    """Yield ``(topic, msgtype, stamp_ns, cdr_bytes)`` in bag-time order.

    ``stamp_ns`` is the recording time (not the header stamp); ``cdr_bytes`` is the ROS 2 CDR
    serialisation, ready for ``rclpy.serialization.deserialize_message``. ``topics=None`` reads
    every topic. ROS 1 bags are refused (convert them with ``rosbags-convert`` first). Being a
    generator, it raises BagError (missing bag or topic) at the first ``next()``.
    """
    with _open_bag(bag_path) as reader:
        if not reader.is2:
            raise BagError(
                f'{bag_path} is a ROS 1 bag; convert it to rosbag2 first: '
                f'rosbags-convert --src {bag_path} --dst OUT_FOLDER'
            )
        connections = reader.connections
        if topics is not None:
            for topic in topics:
                _topic_type(reader, topic, None)
            connections = [c for c in connections if c.topic in set(topics)]
        if not connections:
            return  # rosbags reads every connection when given none
        for connection, stamp_ns, raw in reader.messages(connections=connections):
            yield connection.topic, connection.msgtype, stamp_ns, bytes(raw)


def read_posed_images(
    bag_path: str | Path,
    image_topic: str,
    pose_topic: str,
    *,
    map_frame: str = 'map',
    base_frame: str = BASE_FRAME,
    min_distance_m: float = 1.0,
    min_rotation_rad: float = math.radians(15),
    max_pose_gap_s: float = MAX_POSE_GAP_S,
    progress: bool = True,
) -> Generator[PosedImage, None, None]:
    """Keyframe images of ``image_topic`` with their poses from ``pose_topic``.

    The pose source is a ``nav_msgs/msg/Odometry``, ``geometry_msgs/msg/PoseStamped`` or
    ``PoseWithCovarianceStamped`` topic (its header frame becomes the map frame), or a
    ``tf2_msgs/msg/TFMessage`` topic such as ``/tf`` (plus ``/tf_static`` when recorded), from
    which the chain ``map_frame -> ... -> base_frame`` is composed. Each image's pose is
    interpolated at its header stamp (linear position, slerp rotation) between the two
    surrounding pose samples (a zero header stamp of an image, pose or transform means its
    recording time); images outside the poses' time range or between samples more
    than ``max_pose_gap_s`` apart are skipped and counted in the log. An image is kept when it
    is the first, or lies ``min_distance_m`` from the last kept one, or has turned
    ``min_rotation_rad`` from it (set both to 0 to keep every image).

    The bag, topics and poses are checked before this returns (BagError); images are then
    decoded lazily, one keyframe at a time (``close()`` the generator to stop reading early).
    Undecodable images are skipped with a warning. ``progress`` shows a tqdm bar on a terminal.
    """
    if min_distance_m < 0 or min_rotation_rad < 0 or max_pose_gap_s <= 0:
        raise BagError('min_distance_m and min_rotation_rad must be >= 0 and max_pose_gap_s > 0')
    with _open_bag(bag_path) as reader:
        _topic_type(reader, image_topic, IMAGE_TYPES)
        chain = _read_chain(reader, pose_topic, map_frame, base_frame)
        if not sum(c.msgcount for c in reader.connections if c.topic == image_topic):
            raise BagError(f'topic {image_topic} has no messages in the bag; choose another topic')
    max_gap_ns = int(max_pose_gap_s * 1e9)
    return _iter_keyframes(
        bag_path,
        image_topic,
        lambda t: _chain_at(chain, t, max_gap_ns),
        min_distance_m,
        min_rotation_rad,
        progress,
    )


def read_pose_track(
    bag_path: str | Path,
    pose_topic: str,
    parent_frame: str,
    base_frame: str = BASE_FRAME,
) -> Callable[[int], Pose | None]:
    """The pose of ``base_frame`` in ``parent_frame`` at any stamp (ns), read from
    ``pose_topic`` and interpolated as in :func:`read_posed_images` (the same sources: Odometry,
    PoseStamped, PoseWithCovarianceStamped, or /tf composed from ``parent_frame`` down to
    ``base_frame``); None at a stamp outside the poses' time range or in a gap over 1 s. For
    odometry: ``read_pose_track(bag, '/odom', 'odom')``. BagError when the topic cannot give
    such poses."""
    with _open_bag(bag_path) as reader:
        chain = _read_chain(reader, pose_topic, parent_frame, base_frame)
    max_gap_ns = int(MAX_POSE_GAP_S * 1e9)

    def pose_at(stamp_ns: int) -> Pose | None:
        try:
            xyz, quat = _chain_at(chain, stamp_ns, max_gap_ns)
        except _PoseUnavailable:
            return None
        return _pose(xyz, quat)

    return pose_at


@contextmanager
def _open_bag(bag_path: str | Path) -> Iterator[Any]:
    """An open ``rosbags.highlevel.AnyReader``; every way a bag can be unreadable -> BagError."""
    import sqlite3

    from rosbags.highlevel import AnyReader, AnyReaderError
    from rosbags.rosbag1 import ReaderError as Ros1ReaderError
    from rosbags.rosbag2 import ReaderError as Ros2ReaderError
    from rosbags.serde import SerdeError

    path = Path(bag_path)
    if not path.exists():
        raise BagError(
            f'bag {path} does not exist; give a rosbag2 folder (with metadata.yaml), '
            'a .mcap or .db3 file, or a ROS 1 .bag file'
        )
    unreadable = (
        AnyReaderError,
        Ros1ReaderError,
        Ros2ReaderError,
        SerdeError,
        sqlite3.Error,
        OSError,
    )
    try:
        reader = AnyReader([path], default_typestore=_typestore())
        reader.open()
    except unreadable as exc:
        raise BagError(
            f'{path} is not a readable ROS bag ({exc}); give a rosbag2 folder with '
            'metadata.yaml or a complete .mcap, .db3 or ROS 1 .bag file (repair an '
            'unfinished recording with `mcap recover` or `ros2 bag reindex`)'
        ) from exc
    try:
        yield reader
    except unreadable as exc:
        raise BagError(
            f'{path} is corrupt or truncated ({exc}); repair it with '
            '`mcap recover` or `ros2 bag reindex`, or re-record it'
        ) from exc
    finally:
        reader.close()


def _topic_type(reader: Any, topic: str, allowed: Sequence[str] | None) -> str:
    types = {c.msgtype for c in reader.connections if c.topic == topic}
    if not types:
        available = ', '.join(f'{c.topic} [{c.msgtype}]' for c in reader.connections) or 'none'
        raise BagError(f'topic {topic} is not in the bag; available topics: {available}')
    if len(types) > 1:
        raise BagError(f'topic {topic} carries several message types {sorted(types)}')
    msgtype = types.pop()
    if allowed is not None and msgtype not in allowed:
        raise BagError(f'topic {topic} carries {msgtype}; expected one of {", ".join(allowed)}')
    return msgtype


def _stamp_ns(header: Any, bag_ns: int) -> int:
    """The header stamp, or the recording time ``bag_ns`` where the stamp is zero (unset)."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec) or bag_ns


def _xyz_quat(point: Any, quaternion: Any) -> tuple[list[float], list[float]]:
    """``[x, y, z]`` and ``[qx, qy, qz, qw]`` of a Point / Vector3 and a Quaternion message."""
    return ([point.x, point.y, point.z], [quaternion.x, quaternion.y, quaternion.z, quaternion.w])


def _strip(frame: str) -> str:
    return frame.lstrip('/')  # ROS 1 bags may write '/map'


def _read_chain(reader: Any, topic: str, map_frame: str, base_frame: str) -> list[_Track]:
    """The tracks whose composition is ``base_frame`` in ``map_frame`` over time."""
    map_frame, base_frame = _strip(map_frame), _strip(base_frame)  # '/map' names 'map' too
    if map_frame == base_frame:
        raise BagError(f'both frames are {map_frame!r}; give two frames')
    if _topic_type(reader, topic, POSE_TYPES) == TF_MESSAGE:
        return _read_tf_chain(reader, topic, map_frame, base_frame)
    return [_read_pose_track(reader, topic, map_frame, base_frame)]


def _read_pose_track(reader: Any, topic: str, map_frame: str, base_frame: str) -> _Track:
    samples: list[tuple[int, list[float], list[float]]] = []
    frames: Counter[str] = Counter()
    children: Counter[str] = Counter()  # Odometry's child_frame_id: whose pose it is
    connections = [c for c in reader.connections if c.topic == topic]
    for connection, bag_ns, raw in reader.messages(connections=connections):
        msg = reader.deserialize(raw, connection.msgtype)
        pose = msg.pose if connection.msgtype == POSE_STAMPED else msg.pose.pose
        stamp_ns = _stamp_ns(msg.header, bag_ns)
        samples.append((stamp_ns, *_xyz_quat(pose.position, pose.orientation)))
        frames[_strip(msg.header.frame_id)] += 1
        if connection.msgtype == ODOMETRY:
            children[_strip(msg.child_frame_id)] += 1
    if not samples:
        raise BagError(
            f'no poses on {topic}: the topic has no messages; record it or choose '
            'another pose topic'
        )
    frame = frames.most_common(1)[0][0]
    if frame != map_frame:
        log.warning(
            'poses on %s are in frame %r, not %r: used as they are',
            topic,
            frame,
            map_frame,
        )
    if not children and base_frame != BASE_FRAME:
        log.warning(
            'poses on %s (%s) name no child frame: base_frame %r has no effect (only /tf '
            'and Odometry say whose pose they give)',
            topic,
            connections[0].msgtype.rsplit('/', 1)[-1],
            base_frame,
        )
    child = children.most_common(1)[0][0] if children else base_frame
    if child != base_frame:
        log.warning(
            'poses on %s are of frame %r, not base_frame %r: used as they are (only /tf '
            'gives the pose of another frame)',
            topic,
            child,
            base_frame,
        )
    return _make_track(topic, map_frame, base_frame, samples, static=False)


def _read_tf_chain(reader: Any, topic: str, map_frame: str, base_frame: str) -> list[_Track]:
    """Tracks from ``map_frame`` down to ``base_frame`` (TF edges are parent -> child). An edge
    is static when only ``/tf_static`` carries it; one on both topics is one moving edge."""
    topics = {topic}
    if any(c.topic == TF_STATIC_TOPIC and c.msgtype == TF_MESSAGE for c in reader.connections):
        topics.add(TF_STATIC_TOPIC)
    edges: dict[tuple[str, str], list[tuple[int, list[float], list[float]]]] = {}
    moving: set[tuple[str, str]] = set()
    connections = [c for c in reader.connections if c.topic in topics]
    for connection, bag_ns, raw in reader.messages(connections=connections):
        for tf in reader.deserialize(raw, connection.msgtype).transforms:
            edge = (_strip(tf.header.frame_id), _strip(tf.child_frame_id))
            sample = _xyz_quat(tf.transform.translation, tf.transform.rotation)
            edges.setdefault(edge, []).append((_stamp_ns(tf.header, bag_ns), *sample))
            if connection.topic != TF_STATIC_TOPIC:
                moving.add(edge)
    chain: list[_Track] = []
    frames = [base_frame]  # from base_frame up towards map_frame
    while frames[-1] != map_frame:
        frame = frames[-1]
        parents = sorted(p for p, c in edges if c == frame)
        if len(parents) == 1 and parents[0] not in frames:
            edge = (parents[0], frame)
            chain.append(_make_track(topic, *edge, edges[edge], static=edge not in moving))
            frames.append(parents[0])
            continue
        if not parents:
            problem = f'no parent of {frame!r}'
        elif len(parents) > 1:
            problem = f'several parents of {frame!r}: {", ".join(parents)}'
        else:
            cycle = frames[frames.index(parents[0]) :] + parents
            problem = f'a cycle {" -> ".join(reversed(cycle))}'
        seen = ', '.join(sorted(f'{p}->{c}' for p, c in edges)) or 'none'
        raise BagError(
            f'no poses: TF on {topic} has no chain {map_frame} -> {base_frame} '
            f'({problem}; transforms: {seen}); set map_frame / base_frame to frames in the bag'
        )
    return chain[::-1]


# ---------------------------------------------------------------------------------------------
# Poses over time


class _PoseUnavailable(Exception):
    """No pose at a stamp; ``args[0]`` is the reason counted in the log."""


@dataclass(frozen=True)
class _Track:
    """Transforms of a child frame in its parent over time; a static track (``/tf_static``)
    holds the edge's every message and uses the latest, as tf2 does."""

    stamps_ns: np.ndarray  # [N] int64, strictly increasing
    xyz: np.ndarray  # [N x 3] float64, metres
    quat: np.ndarray  # [N x 4] float64 (x, y, z, w), unit norm
    static: bool

    def at(self, stamp_ns: int, max_gap_ns: int) -> tuple[np.ndarray, np.ndarray]:
        if self.static:
            return self.xyz[-1], self.quat[-1]
        i = int(np.searchsorted(self.stamps_ns, stamp_ns, side='right'))
        if i > 0 and self.stamps_ns[i - 1] == stamp_ns:
            return self.xyz[i - 1], self.quat[i - 1]
        if i == 0 or i == len(self.stamps_ns):
            raise _PoseUnavailable('outside the pose time range')
        t0, t1 = int(self.stamps_ns[i - 1]), int(self.stamps_ns[i])
        if t1 - t0 > max_gap_ns:
            raise _PoseUnavailable('in a gap between poses')
        w = (stamp_ns - t0) / (t1 - t0)
        xyz = self.xyz[i - 1] + w * (self.xyz[i] - self.xyz[i - 1])
        return xyz, _slerp(self.quat[i - 1], self.quat[i], w)


def _make_track(
    topic: str,
    parent: str,
    child: str,
    samples: list[tuple[int, list[float], list[float]]],
    static: bool,
) -> _Track:
    stamps = np.array([s[0] for s in samples], dtype=np.int64)
    xyz = np.array([s[1] for s in samples], dtype=np.float64)
    quat = np.array([s[2] for s in samples], dtype=np.float64)
    norms = np.linalg.norm(quat, axis=1)
    valid = np.isfinite(xyz).all(axis=1) & np.isfinite(norms) & (norms > 1e-6)
    if not valid.all():
        log.warning(
            '%s: dropped %d %s->%s poses with NaN or a zero quaternion',
            topic,
            int((~valid).sum()),
            parent,
            child,
        )
    if not valid.any():
        raise BagError(
            f'no poses on {topic}: every {parent}->{child} pose is NaN or has a zero quaternion'
        )
    order = np.argsort(stamps[valid], kind='stable')
    stamps, xyz = stamps[valid][order], xyz[valid][order]
    quat = (quat[valid] / norms[valid, None])[order]
    stamps, first = np.unique(stamps, return_index=True)  # one sample per stamp
    return _Track(stamps, xyz[first], quat[first], static)


def _chain_at(
    chain: list[_Track], stamp_ns: int, max_gap_ns: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pose (xyz, quat) of the last child in the first parent: T = T_0 * T_1 * ... ."""
    xyz, quat = np.zeros(3), np.array([0.0, 0.0, 0.0, 1.0])
    for track in chain:
        t_xyz, t_quat = track.at(stamp_ns, max_gap_ns)
        xyz = xyz + _quat_rotate(quat, t_xyz)
        quat = _quat_mul(quat, t_quat)
    return xyz, quat


def _pose(xyz: np.ndarray, quat: np.ndarray) -> Pose:
    x, y, z = (float(v) for v in xyz)
    qx, qy, qz, qw = (float(v) for v in quat)
    return Pose(x, y, z, qx, qy, qz, qw)


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (x, y, z, w) quaternions."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ]
    )


def _quat_rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rotate vector ``v`` [3] by unit quaternion ``q`` (x, y, z, w)."""
    u, w = q[:3], q[3]
    t = 2.0 * np.cross(u, v)
    return v + w * t + np.cross(u, t)


def _slerp(q0: np.ndarray, q1: np.ndarray, w: float) -> np.ndarray:
    """Spherical interpolation along the shorter arc, ``w`` in [0, 1]."""
    dot = float(q0 @ q1)
    if dot < 0.0:
        q1, dot = -q1, -dot
    if dot > 0.9995:
        q = q0 + w * (q1 - q0)
    else:
        theta = math.acos(dot)
        q = (math.sin((1.0 - w) * theta) * q0 + math.sin(w * theta) * q1) / math.sin(theta)
    return q / np.linalg.norm(q)


def _rotation_between(q0: np.ndarray, q1: np.ndarray) -> float:
    """Angle in radians of the rotation taking unit quaternion ``q0`` to ``q1``."""
    return 2.0 * math.acos(min(1.0, abs(float(q0 @ q1))))


# ---------------------------------------------------------------------------------------------
# Keyframes


def _iter_keyframes(
    bag_path: str | Path,
    image_topic: str,
    pose_at: Callable[[int], tuple[np.ndarray, np.ndarray]],
    min_distance_m: float,
    min_rotation_rad: float,
    progress: bool,
) -> Generator[PosedImage, None, None]:
    from rosbags.image import ImageError as RosImageError
    from tqdm import tqdm

    skipped: Counter[str] = Counter()
    kept = 0
    last: tuple[np.ndarray, np.ndarray] | None = None
    with _open_bag(bag_path) as reader:
        connections = [c for c in reader.connections if c.topic == image_topic]
        total = sum(c.msgcount for c in connections)
        messages = tqdm(
            reader.messages(connections=connections),
            total=total,
            unit='img',
            desc=f'reading {image_topic}',
            disable=None if progress else True,
        )
        for index, (connection, bag_ns, raw) in enumerate(messages):
            msg = reader.deserialize(raw, connection.msgtype)
            stamp_ns = _stamp_ns(msg.header, bag_ns)
            try:
                xyz, quat = pose_at(stamp_ns)
            except _PoseUnavailable as exc:
                skipped[exc.args[0]] += 1
                continue
            if last is not None and (
                np.linalg.norm(xyz - last[0]) < min_distance_m
                and _rotation_between(last[1], quat) < min_rotation_rad
            ):
                skipped['not a keyframe'] += 1
                continue
            try:
                image = as_bgr(image_message_to_cvimage(msg, 'bgr8'))
            # rosbags-image asserts on undecodable CompressedImage data and numpy raises
            # TypeError on an Image whose data is shorter than height * step
            except (RosImageError, ImageError, AssertionError, TypeError, ValueError) as exc:
                log.warning(
                    '%s message %d: cannot convert the image (%s); skipped',
                    image_topic,
                    index,
                    str(exc) or 'undecodable data',
                )
                skipped['undecodable'] += 1
                continue
            last = (xyz, quat)
            kept += 1
            pose = _pose(xyz, quat)
            yield PosedImage(f'{index:06d}_{stamp_ns}', stamp_ns, image, pose)
    log.info(
        '%s: kept %d of %d images; skipped: %s', image_topic, kept, total, dict(skipped) or 'none'
    )
    if kept == 0:
        undecodable = bool(skipped) and skipped.most_common(1)[0][0] == 'undecodable'
        advice = (
            'check the image encoding / format (the warnings above say why each failed)'
            if undecodable
            else 'check that the pose topic covers the image stamps'
        )
        raise BagError(
            f'no image on {image_topic} has a pose ({total} images; skipped: '
            f'{dict(skipped)}); {advice}'
        )


def image_message_to_cvimage(msg: Any, encoding: str | None = None) -> np.ndarray:
    """An Image or CompressedImage message (of rosbags or rclpy) as an OpenCV array, converted
    to ``encoding`` when given, by rosbags-image. That library reads Image rows as tightly
    packed, so row padding (``step`` beyond a row's bytes) is dropped first; ImageError when
    ``step`` is shorter than a row."""
    from rosbags.image import compressed_image_to_cvimage, image_to_cvimage

    if hasattr(msg, 'format'):
        return compressed_image_to_cvimage(msg, encoding)
    fields = {'width': msg.width, 'encoding': msg.encoding, 'is_bigendian': msg.is_bigendian}
    try:
        row = image_to_cvimage(_duck_image(height=1, data=bytes(msg.data[: msg.step]), **fields))
    except (TypeError, ValueError) as exc:  # numpy: the buffer is too small for one row
        raise ImageError(
            f'step {msg.step} is shorter than a row of {msg.width} {msg.encoding} pixels'
        ) from exc
    data = np.frombuffer(msg.data, np.uint8)[: msg.step * msg.height]
    if msg.step > row.nbytes:  # padded rows: a packed copy (unpadded ones are read in place)
        data = data.reshape(msg.height, msg.step)[:, : row.nbytes].reshape(-1)
    return image_to_cvimage(_duck_image(height=msg.height, data=data, **fields), encoding)


def _duck_image(**fields: Any) -> Any:
    """An object with the Image fields rosbags-image reads (it needs no header or step)."""
    return SimpleNamespace(**fields)


# ---------------------------------------------------------------------------------------------
# Writing


class BagWriter:
    """Writes a rosbag2 folder (the ``ros2 bag record -o OUT`` layout) in mcap or sqlite3.

    Use as a context manager; on an exception the half-written folder is removed. Message
    definitions are embedded, so any rosbag2 reader (``ros2 bag play``, rosbags) can read it.
    """

    def __init__(self, out_path: str | Path, *, storage: str = 'mcap') -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        if storage not in STORAGES:
            raise BagError(f'storage {storage!r} is not one of {STORAGES}')
        self.path = Path(out_path)
        if self.path.exists():
            raise BagError(
                f'{self.path} exists; choose a new bag path or delete it '
                '(bags are never overwritten)'
            )
        plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
        self._writer = Writer(self.path, version=Writer.VERSION_LATEST, storage_plugin=plugin)
        self._typestore = _typestore()
        self._connections: dict[str, Any] = {}

    def __enter__(self) -> BagWriter:
        self._writer.open()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._writer.close()
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def write_image(
        self,
        topic: str,
        stamp_ns: int,
        image_bgr: np.ndarray,
        *,
        frame_id: str = 'camera',
        encoding: str = 'bgr8',
    ) -> None:
        """Write [H x W x 3] uint8 BGR ``image_bgr`` as an Image ('bgr8', 'mono8') or a
        CompressedImage ('jpeg', 'png')."""
        import cv2

        image = as_bgr(image_bgr)
        types = self._typestore.types
        header = self._header(stamp_ns, frame_id)
        if encoding in ('jpeg', 'png'):
            ok, data = cv2.imencode('.jpg' if encoding == 'jpeg' else '.png', image)
            if not ok:
                raise ImageError(f'OpenCV could not encode a {image.shape} image as {encoding}')
            msg = types[COMPRESSED_IMAGE](header, encoding, data.reshape(-1))
        elif encoding in ('bgr8', 'mono8'):
            if encoding == 'mono8':
                image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
            image = np.ascontiguousarray(image)
            msg = types[IMAGE](
                header,
                image.shape[0],
                image.shape[1],
                encoding,
                0,
                image.strides[0],
                image.reshape(-1),
            )
        else:
            raise BagError(f'image encoding {encoding!r} is not one of {WRITE_ENCODINGS}')
        self._write(topic, stamp_ns, msg)

    def write_pose(
        self,
        topic: str,
        stamp_ns: int,
        pose: Pose,
        *,
        msgtype: str = POSE_STAMPED,
        frame_id: str = 'map',
        child_frame_id: str = BASE_FRAME,
    ) -> None:
        """Write ``pose`` (in ``frame_id``) as a PoseStamped, PoseWithCovarianceStamped or
        Odometry (zero twist); covariances say ``TRUTH_STD_M`` on every axis."""
        types = self._typestore.types
        header = self._header(stamp_ns, frame_id)
        pose_msg = self._pose(pose)
        covariance = np.diag(np.full(6, TRUTH_STD_M**2)).reshape(-1)
        if msgtype == POSE_STAMPED:
            msg = types[POSE_STAMPED](header, pose_msg)
        elif msgtype == POSE_WITH_COVARIANCE_STAMPED:
            msg = types[msgtype](
                header, types['geometry_msgs/msg/PoseWithCovariance'](pose_msg, covariance)
            )
        elif msgtype == ODOMETRY:
            vector = types['geometry_msgs/msg/Vector3']
            twist = types['geometry_msgs/msg/Twist'](vector(0.0, 0.0, 0.0), vector(0.0, 0.0, 0.0))
            msg = types[ODOMETRY](
                header,
                child_frame_id,
                types['geometry_msgs/msg/PoseWithCovariance'](pose_msg, covariance),
                types['geometry_msgs/msg/TwistWithCovariance'](twist, covariance),
            )
        else:
            raise BagError(f'pose message type {msgtype!r} is not one of {POSE_TYPES[:3]}')
        self._write(topic, stamp_ns, msg)

    def write_transforms(
        self, stamp_ns: int, transforms: Iterable[tuple[str, str, Pose]], *, static: bool = False
    ) -> None:
        """Write ``(parent, child, pose of child in parent)`` triples as one TFMessage on
        ``/tf`` (or ``/tf_static``)."""
        types = self._typestore.types
        stamped = []
        for parent, child, pose in transforms:
            transform = types['geometry_msgs/msg/Transform'](
                types['geometry_msgs/msg/Vector3'](pose.x, pose.y, pose.z),
                types['geometry_msgs/msg/Quaternion'](pose.qx, pose.qy, pose.qz, pose.qw),
            )
            stamped.append(
                types['geometry_msgs/msg/TransformStamped'](
                    self._header(stamp_ns, parent), child, transform
                )
            )
        self._write(TF_STATIC_TOPIC if static else '/tf', stamp_ns, types[TF_MESSAGE](stamped))

    def _header(self, stamp_ns: int, frame_id: str) -> Any:
        types = self._typestore.types
        sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
        return types['std_msgs/msg/Header'](
            types['builtin_interfaces/msg/Time'](sec, nanosec), frame_id
        )

    def _pose(self, pose: Pose) -> Any:
        types = self._typestore.types
        return types['geometry_msgs/msg/Pose'](
            types['geometry_msgs/msg/Point'](pose.x, pose.y, pose.z),
            types['geometry_msgs/msg/Quaternion'](pose.qx, pose.qy, pose.qz, pose.qw),
        )

    def _write(self, topic: str, stamp_ns: int, msg: Any) -> None:
        msgtype = msg.__msgtype__
        connection = self._connections.get(topic)
        if connection is None:
            connection = self._writer.add_connection(topic, msgtype, typestore=self._typestore)
            self._connections[topic] = connection
        elif connection.msgtype != msgtype:
            raise BagError(f'topic {topic} already carries {connection.msgtype}, not {msgtype}')
        self._writer.write(
            connection, int(stamp_ns), bytes(self._typestore.serialize_cdr(msg, msgtype))
        )


def write_traversal_bag(
    traversal: Traversal,
    out_path: str | Path,
    *,
    image_topic: str | None = None,
    compressed: bool = False,
    pose_topic: str = '/ground_truth/pose',
    odom_topic: str | None = None,
    frame_id: str = 'map',
    camera_frame: str = 'camera',
    base_frame: str = BASE_FRAME,
    rate_hz: float = 2.0,
    start_ns: int = 1_700_000_000_000_000_000,
    storage: str = 'mcap',
) -> Path:
    """Write a traversal as a bag: image ``i`` (Image 'bgr8', or CompressedImage 'jpeg' when
    ``compressed``) and its ground-truth PoseStamped on ``pose_topic`` (and an Odometry on
    ``odom_topic`` when given), both stamped ``start_ns + i / rate_hz``. ``image_topic``
    defaults to image_transport's names, which the node goes by: ``/camera/image_raw``, or
    ``/camera/image_raw/compressed`` when ``compressed``.

    Rows without a true position (NaN x, y) are left out: an image with no pose beside it
    would get one interpolated from its neighbours. A pose message cannot say "yaw unknown",
    so rows without a yaw get yaw 0 (the bag's yaw is then no truth). Returns the bag folder.
    """
    if not rate_hz > 0:
        raise BagError(f'rate_hz must be > 0, got {rate_hz}')
    period_ns = round(1e9 / rate_hz)
    if image_topic is None:
        image_topic = '/camera/image_raw/compressed' if compressed else '/camera/image_raw'
    no_pose = 0
    with BagWriter(out_path, storage=storage) as writer:
        for i, image_path in enumerate(traversal.image_paths):
            stamp_ns = start_ns + i * period_ns
            if not np.isfinite(traversal.xy[i]).all():
                no_pose += 1
                continue
            writer.write_image(
                image_topic,
                stamp_ns,
                read_image(image_path),
                frame_id=camera_frame,
                encoding='jpeg' if compressed else 'bgr8',
            )
            pose = traversal.pose(i)
            writer.write_pose(pose_topic, stamp_ns, pose, frame_id=frame_id)
            if odom_topic:
                writer.write_pose(
                    odom_topic,
                    stamp_ns,
                    pose,
                    msgtype=ODOMETRY,
                    frame_id=frame_id,
                    child_frame_id=base_frame,
                )
    if no_pose:
        log.info('%s: %d images without a true position were left out', out_path, no_pose)
    return writer.path


def _typestore() -> Any:
    """Message definitions for writing, and for reading bags that embed none (old .db3)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)
