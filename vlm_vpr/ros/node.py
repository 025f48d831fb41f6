"""`vpr_node`: a lifecycle node that turns camera frames into a pose prior in the map frame.

Inputs: ``image_topics`` (Image, or CompressedImage for names ending in ``/compressed``) with
sensor-data QoS; with ``use_camera_info`` each camera's sibling ``camera_info`` (CameraInfo,
sensor-data QoS: frames are rectified with the latest one); optionally ``odom_topic``
(nav_msgs/Odometry), or the motion from TF ``odom_frame -> base_frame``. Outputs (relative names):
``pose`` (PoseWithCovarianceStamped, stamped with the image's stamp), ``confidence``
(Float32), ``candidates`` (PoseArray), ``candidate_markers`` (MarkerArray), ``debug_image``
(when enabled), ``initialpose`` (when enabled, gated) and ``/diagnostics`` (absolute). Services:
``relocalize`` and ``rearm_initial_pose`` (std_srvs/Trigger).

Threads: subscription callbacks only store the newest frame per camera (a replaced frame is
counted as dropped); one worker thread localises at most ``max_rate_hz`` frames per second and
publishes. ``relocalize`` waits until the worker answers, in a mutually exclusive callback
group of its own (calls take turns, so callers retrying cannot hold every executor thread),
so the node is spun by a MultiThreadedExecutor (``main`` does).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Float32, Header
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from vlm_vpr.core.config import LocalizerConfig
from vlm_vpr.core.errors import ConfigError, VprError
from vlm_vpr.core.initial_pose import InitialPoseGate
from vlm_vpr.core.types import LocalizationResult, Pose, planar_motion
from vlm_vpr.ros import params
from vlm_vpr.ros.conversions import (
    FrameSkipped,
    base_pose_from_camera,
    camera_info_topic,
    check_output,
    debug_image,
    image_from_msg,
    image_msg,
    markers_msg,
    pose_array_msg,
    pose_with_covariance_msg,
    rectify_with_camera_info,
    stamp_ns,
)
from vlm_vpr.ros.odometry import OdometryTrack
from vlm_vpr.ros.params import NodeConfig
from vlm_vpr.ros.tf_adapter import (
    FixedOffset,
    Lookup,
    OffsetSource,
    TfOdometry,
    TfOffset,
    TfTree,
    TransformUnavailable,
    tf_available,
)

NODE_NAME = 'vpr_node'
STATS_WINDOW = 200  # frames over which latencies are summarised
WARN_PERIOD_S = 5.0  # a skip reason (or frame warning) is logged at most this often; all count
# a camera's state in /diagnostics while active: its last frame's outcome
NO_FRAME_YET = 'no frame yet'
LOCALISING = 'localising'
# ... unless it is stale (see camera_silence): no frame for max(STALE_MIN_S, STALE_PERIODS x
# the median gap between its last RECEIPTS_KEPT frames)
STALE_MIN_S = 3.0  # below the 5 s after which a diagnostic_aggregator calls a status stale
STALE_PERIODS = 5.0
RECEIPTS_KEPT = 20


def record_receipt(receipts_ns: deque[int], now_ns: int) -> None:
    """Add a frame's receipt time (ROS clock, ns) to its camera's ``receipts_ns``; a clock
    that went backwards (a looped bag with use_sim_time) restarts the record."""
    if receipts_ns and now_ns < receipts_ns[-1]:
        receipts_ns.clear()
    receipts_ns.append(now_ns)


def camera_silence(receipts_ns: Sequence[int], now_ns: int) -> tuple[float, float] | None:
    """(seconds since the camera's last frame, its usual gap between frames in seconds) while
    the camera is stale, else None. ``receipts_ns``: its recent frame receipt times (ROS clock,
    ns, oldest first); the usual gap is the median gap between them. Stale: the last frame is
    more than max(STALE_MIN_S, STALE_PERIODS x the usual gap) old. Two frames (one gap) are
    needed to judge; a clock now before the last frame (gone backwards) is not stale."""
    if len(receipts_ns) < 2:
        return None
    times = list(receipts_ns)
    usual_s = statistics.median(b - a for a, b in zip(times, times[1:])) / 1e9
    silent_s = (now_ns - times[-1]) / 1e9
    if silent_s <= max(STALE_MIN_S, STALE_PERIODS * usual_s):
        return None
    return silent_s, usual_s


@dataclass
class _Camera:
    """A camera's state while active, for /diagnostics."""

    outcome: str = NO_FRAME_YET  # its last frame's: NO_FRAME_YET, LOCALISING or a skip
    receipts_ns: deque[int] = field(default_factory=lambda: deque(maxlen=RECEIPTS_KEPT))


@dataclass
class _Frame:
    msg: Any
    topic: str
    received_s: float  # time.monotonic() at the callback
    batch: int = 0  # number of the batch the worker took it in (0: not taken yet)


@dataclass
class _Prepared:
    """A frame ready to localise."""

    frame: _Frame
    header: Any  # the image header (stamped with the receipt time if it had no stamp)
    image: np.ndarray  # [H x W x 3] uint8 BGR, rectified where camera_info is used
    base_in_camera: Pose  # the robot base in the camera frame


@dataclass
class _Waiter:
    """A `relocalize` call waiting for ``needed`` frames of batches taken after it."""

    needed: int
    after: int  # batches taken before the call: only later ones answer it
    results: list[dict[str, Any]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: str = ''  # why processing stopped before the answer ('deactivated', ...)


def _logs_errors(
    callback: Callable[[VprNode, LifecycleState], TransitionCallbackReturn],
) -> Callable[[VprNode, LifecycleState], TransitionCallbackReturn]:
    """A lifecycle transition that logs an exception it raises (rclpy turns it into ERROR
    without a word) and keeps it for on_error's status."""

    @functools.wraps(callback)
    def transition(node: VprNode, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            return callback(node, state)
        except Exception as exc:  # noqa: BLE001 - rclpy would swallow it: log it, then ERROR
            node._transition_error = f'{callback.__name__} raised {type(exc).__name__}: {exc}'
            node.get_logger().error(f'{callback.__name__} failed:\n{traceback.format_exc()}')
            return TransitionCallbackReturn.ERROR

    return transition


class VprNode(LifecycleNode):
    """The localisation node; ``tf_lookup`` replaces tf2 (``TfTree.lookup``) for the camera
    mount (``use_tf``) and the motion (``odom_frame``), e.g. with a stand-in where tf2 cannot
    run."""

    def __init__(self, *, tf_lookup: Lookup | None = None, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        # the state first: a bad parameter fails __init__, and rclpy's shutdown still calls
        # destroy_node
        self._tf_lookup = tf_lookup
        self._tf_tree: TfTree | None = None  # the tf2 listener, when the node made one
        self._odometry_source: TfOdometry | OdometryTrack | None = None  # odom_frame / _topic
        self._lock = threading.Condition()
        self._slots: dict[str, _Frame] = {}
        self._waiters: list[_Waiter] = []
        self._counts: Counter[str] = Counter()
        self._latency_ms: deque[float] = deque(maxlen=STATS_WINDOW)
        self._stage_ms: dict[str, deque[float]] = {}
        self._last: dict[str, Any] = {}
        self._status = (DiagnosticStatus.WARN, 'unconfigured')  # the lifecycle's; see status
        self._cameras: dict[str, _Camera] = {}  # image topic -> its state (while active)
        self._transition_error = ''  # the exception a lifecycle transition raised, for on_error
        self._warned_s: dict[str, float] = {}
        self._info_topics: dict[str, str] = {}  # image topic -> its camera_info topic
        self._camera_infos: dict[str, CameraInfo] = {}  # latest per camera_info topic
        self._odometry = OdometryTrack()
        self._gate = InitialPoseGate()
        self._batches = 0  # batches the worker has taken
        self._reset_sequence = False  # set by relocalize: the next batch forgets the past frames
        self._worker: threading.Thread | None = None
        self._stopping = True  # no worker runs (or it is to stop)
        self._localizer: Any = None
        self._matchers: dict[str, Any] = {}  # image topic -> its SequenceMatcher
        self._offsets: OffsetSource | None = None
        self._pubs: dict[str, Any] = {}
        self._subs: list[Any] = []
        self._previous_stamp_ns: int | None = None  # the last localised frame: gate motion
        self._camera_stamp_ns: dict[str, int] = {}  # each camera's last one: sequence travel
        self._configured: dict[str, Any] | None = None  # parameter values at the last configure
        params.declare(self)
        self._unconfigure_parameters()  # the settings in use: _cfg, _query_cfg
        self.add_on_set_parameters_callback(self._on_set_parameters)
        # The services live from start to destruction, in every lifecycle state (relocalize
        # answers 'not active' when the node is not), so that no call waiting in relocalize
        # meets a destroyed service when the node stops. relocalize waits for frames, holding
        # an executor thread: calls take turns, so that callers retrying faster than it answers
        # cannot hold every thread and stop the frames they wait for. rearm stays out of the
        # default group, where change_state may be loading a map.
        self.create_service(
            Trigger,
            'relocalize',
            self._on_relocalize,
            callback_group=MutuallyExclusiveCallbackGroup(),
        )
        self.create_service(
            Trigger, 'rearm_initial_pose', self._on_rearm, callback_group=ReentrantCallbackGroup()
        )
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diagnostics_timer = self.create_timer(
            self._cfg.diagnostics_period_s, self.publish_diagnostics
        )
        if self._cfg.autostart and self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    # -----------------------------------------------------------------------------------------
    # Lifecycle

    @_logs_errors
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from vlm_vpr.core.localizer import Localizer
        from vlm_vpr.core.map_format import read_map

        values = params.current_values(self)  # validated when set
        cfg, query_cfg = params.split_values(values)
        try:
            if not cfg.map_path:
                raise ConfigError(
                    'map_path is empty: give the map folder built by `vlm-vpr map '
                    'build`, e.g. --ros-args -p map_path:=/path/to/map'
                )
            vpr_map = read_map(cfg.map_path)
            localizer = Localizer(vpr_map, query_cfg)
            matchers = {}
            if query_cfg.sequence.length > 1:  # one per camera: each moves along the route
                from vlm_vpr.core.sequence import SequenceMatcher

                matchers = {topic: SequenceMatcher(localizer) for topic in cfg.image_topics}
        except (VprError, OSError) as exc:
            self._status = (DiagnosticStatus.ERROR, f'configure failed: {exc}')
            self.get_logger().error(f'configure failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        if vpr_map.frame_id != cfg.map_frame:
            self.get_logger().warning(
                f'the map was built in frame {vpr_map.frame_id!r}; poses '
                f'are published in map_frame {cfg.map_frame!r}'
            )
        self._configured, self._cfg, self._query_cfg = values, cfg, query_cfg
        self._localizer, self._matchers = localizer, matchers
        self._offsets, tf_odometry = self._create_tf_users(cfg)
        self._odometry_source = tf_odometry or (self._odometry if cfg.odom_topic else None)
        self._create_outputs()
        self.destroy_timer(self._diagnostics_timer)
        self._diagnostics_timer = self.create_timer(
            cfg.diagnostics_period_s, self.publish_diagnostics
        )
        with self._lock:
            self._counts.clear()
            self._latency_ms.clear()
            self._stage_ms.clear()
        self._status = (DiagnosticStatus.OK, 'inactive')
        self.get_logger().info(
            f'map {cfg.map_path}: {len(vpr_map)} images, backbone '
            f'{vpr_map.build_config.features.backbone}; sequence length '
            f'{query_cfg.sequence.length}; re-rankers '
            f'{list(query_cfg.rerank.chain) or "none"}'
        )
        return super().on_configure(state)

    @_logs_errors
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        cfg = self._cfg
        for topic in cfg.image_topics:
            msg_type = CompressedImage if topic.endswith('/compressed') else Image
            self._subs.append(
                self.create_subscription(
                    msg_type,
                    topic,
                    lambda msg, t=topic: self._on_image(msg, t),
                    qos_profile_sensor_data,
                )
            )
        self._info_topics = (
            {t: camera_info_topic(t) for t in cfg.image_topics} if cfg.use_camera_info else {}
        )
        for topic in set(self._info_topics.values()):
            self._subs.append(
                self.create_subscription(
                    CameraInfo,
                    topic,
                    lambda msg, t=topic: self._on_camera_info(msg, t),
                    qos_profile_sensor_data,
                )
            )
        if cfg.odom_topic:
            self._subs.append(
                self.create_subscription(
                    Odometry, cfg.odom_topic, self._on_odom, qos_profile_sensor_data
                )
            )
        self._forget_past_frames()
        with self._lock:
            self._cameras = {topic: _Camera() for topic in cfg.image_topics}
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name='vpr_worker', daemon=True)
        self._worker.start()
        self.get_logger().info(
            f'active: localising {list(cfg.image_topics)} at most '
            f'{cfg.max_rate_hz} Hz ({cfg.mode})'
        )
        return super().on_activate(state)

    @_logs_errors
    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_processing('deactivated')
        self._status = (DiagnosticStatus.OK, 'inactive')
        return super().on_deactivate(state)

    @_logs_errors
    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._unconfigure_parameters()
        self._status = (DiagnosticStatus.WARN, 'unconfigured')
        return super().on_cleanup(state)

    @_logs_errors
    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_processing('shut down')
        self._release()
        self._status = (DiagnosticStatus.WARN, 'shut down (finalized): restart the node')
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_processing('reset after an error')
        self._release()
        self._unconfigure_parameters()
        why, self._transition_error = self._transition_error or 'an error', ''
        self._status = (DiagnosticStatus.ERROR, f'recovered from {why}: unconfigured')
        return TransitionCallbackReturn.SUCCESS

    def destroy_node(self) -> None:
        self._stop_processing('destroyed')
        self._release()  # the TF listener too, when destroyed while configured
        super().destroy_node()

    def _create_tf_users(self, cfg: NodeConfig) -> tuple[OffsetSource, TfOdometry | None]:
        """The camera mount (TF with ``use_tf``, else ``camera_offset.*``) and the motion
        from TF (with ``odom_frame``; None: ``odom_topic`` or frame order). Without tf2 the
        TF ones fall back, with a warning."""
        lookup = self._tf_lookup
        if lookup is None and (cfg.use_tf or cfg.odom_frame):
            if tf_available():
                self._tf_tree = TfTree(self)
                lookup = self._tf_tree.lookup
            else:
                for name, fallback in (
                    ('use_tf', 'using the camera_offset.* parameters'),
                    ('odom_frame', 'frames vote in frame order (odom_topic needs no tf2)'),
                ):
                    if getattr(cfg, name):
                        self.get_logger().warning(
                            f'{name} is set but tf2_ros is not installed: {fallback}'
                        )
        offsets = (
            TfOffset(lookup, cfg.base_frame)
            if cfg.use_tf and lookup is not None
            else FixedOffset(cfg.camera_offset)
        )
        motion = (
            TfOdometry(lookup, cfg.odom_frame, cfg.base_frame)
            if cfg.odom_frame and lookup is not None
            else None
        )
        return offsets, motion

    def _create_outputs(self) -> None:
        pub = self.create_lifecycle_publisher
        self._pubs = {
            'pose': pub(PoseWithCovarianceStamped, 'pose', 10),
            'confidence': pub(Float32, 'confidence', 10),
            'candidates': pub(PoseArray, 'candidates', 10),
            'markers': pub(MarkerArray, 'candidate_markers', 10),
            'debug_image': pub(Image, 'debug_image', 2),
            # relative like nav2 AMCL's subscription: /initialpose, or /<ns>/initialpose
            'initialpose': pub(PoseWithCovarianceStamped, 'initialpose', 10),
        }

    def _stop_processing(self, why: str) -> None:
        with self._lock:
            self._stopping = True
            self._slots.clear()
            self._camera_infos.clear()
            self._cameras = {}
            for waiter in self._waiters:
                waiter.cancelled = why
                waiter.done.set()
            self._lock.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join()
        self._worker = None
        self._info_topics = {}
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []

    def _release(self) -> None:
        for publisher in self._pubs.values():
            self.destroy_lifecycle_publisher(publisher)
        self._pubs = {}
        if self._tf_tree is not None:
            self._tf_tree.close()  # the listener's /tf subscriptions go with it
        self._localizer = self._offsets = self._odometry_source = self._tf_tree = None
        self._matchers = {}

    def _unconfigure_parameters(self) -> None:
        """Unconfigured: the parameters as they are now are what the next configure reads
        (and what /diagnostics shows), not those of the last configure."""
        self._configured = None
        cfg, query_cfg = params.split_values(params.current_values(self))
        with self._lock:
            self._cfg, self._query_cfg = cfg, query_cfg

    def _forget_past_frames(self) -> None:
        """Forget the frames localised so far: sequence votes, odometry anchors and the
        /initialpose gate's run (re-armed). On the worker thread, or while none runs."""
        for matcher in self._matchers.values():
            matcher.reset()
        self._previous_stamp_ns = None
        self._camera_stamp_ns.clear()
        with self._lock:
            self._gate.rearm()

    # -----------------------------------------------------------------------------------------
    # Parameters

    def _on_set_parameters(self, parameters: list[Any]) -> SetParametersResult:
        names = {spec.name for spec in params.param_specs()}
        changed = {p.name: p.value for p in parameters if p.name in names}
        if not changed:
            return SetParametersResult(successful=True)
        values = params.current_values(self)
        values.update(changed)
        try:
            cfg, query_cfg = params.split_values(values)
            if self._configured is not None:  # the others apply at the next configure
                live = {name: values[name] for name in params.LIVE}
                cfg, query_cfg = params.split_values({**self._configured, **live})
        except ConfigError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        with self._lock:  # wakes the worker: a new max_rate_hz applies to the next batch
            self._cfg, self._query_cfg = cfg, query_cfg
            self._lock.notify_all()
        if isinstance(self._offsets, FixedOffset):
            self._offsets.offset = cfg.camera_offset
        later = sorted(set(changed) - params.LIVE)
        if later and self._localizer is not None:
            self.get_logger().info(f'{later} take effect at the next configure')
        return SetParametersResult(successful=True)

    # -----------------------------------------------------------------------------------------
    # Callbacks (executor threads: never block)

    def _on_image(self, msg: Any, topic: str) -> None:
        with self._lock:
            self._counts['received'] += 1
            if topic in self._slots:
                self._counts['dropped'] += 1
            self._slots[topic] = _Frame(msg, topic, time.monotonic())
            if topic in self._cameras:  # every frame, dropped or not: is the camera alive
                record_receipt(
                    self._cameras[topic].receipts_ns, self.get_clock().now().nanoseconds
                )
            self._lock.notify_all()

    def _on_camera_info(self, msg: CameraInfo, topic: str) -> None:
        with self._lock:
            self._counts['camera_info_received'] += 1
            self._camera_infos[topic] = msg

    def _on_odom(self, msg: Odometry) -> None:
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        stored = self._odometry.add(stamp_ns(msg.header), Pose(p.x, p.y, p.z, q.x, q.y, q.z, q.w))
        with self._lock:
            self._counts['odometry' if stored else 'odometry_not_finite'] += 1
        if not stored:
            self._warn(
                'odometry', f'{self._cfg.odom_topic}: odometry with NaN or infinite values ignored'
            )

    def _on_rearm(self, request: Any, response: Any) -> Any:
        with self._lock:
            self._gate.rearm()
        response.success = True
        response.message = 'initial pose gate re-armed'
        return response

    def _on_relocalize(self, request: Any, response: Any) -> Any:
        """From the next batch on, forget the past frames and re-arm the /initialpose gate;
        answer with the result of the first ``relocalize_frames`` frames taken after the call
        (or a failure after the timeout, or when the node stops processing)."""
        cfg = self._cfg
        with self._lock:
            if self._stopping:
                response.success = False
                response.message = f'vpr_node is not active: {self._status[1]}'
                return response
            waiter = _Waiter(cfg.relocalize_frames, after=self._batches)
            self._waiters.append(waiter)
            self._reset_sequence = True
            self._lock.notify_all()
        answered = waiter.done.wait(cfg.relocalize_timeout_s)
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        last = waiter.results[-1] if waiter.results else None
        threshold = self._query_cfg.confidence.initial_pose_threshold
        response.success = bool(
            answered and not waiter.cancelled and last and last['confidence'] >= threshold
        )
        if waiter.cancelled:
            response.message = f'relocalize cancelled: vpr_node was {waiter.cancelled}'
        elif last is None:
            response.message = (
                f'no frame localised within {cfg.relocalize_timeout_s} s; '
                f'check that images arrive on {list(cfg.image_topics)}'
            )
        else:
            response.message = json.dumps(
                {**last, 'frames': len(waiter.results), 'confidence_threshold': threshold}
            )
        return response

    # -----------------------------------------------------------------------------------------
    # Worker thread

    def _run(self) -> None:
        started = -math.inf  # time.monotonic() when the last batch was taken
        while True:
            with self._lock:
                while not self._stopping:  # max_rate_hz is read again at each wake-up
                    delay = started + 1.0 / self._cfg.max_rate_hz - time.monotonic()
                    if self._slots and delay <= 0:
                        break
                    self._lock.wait(delay if self._slots else None)
                if self._stopping:
                    return
                if self._cfg.mode == 'on_demand' and not self._waiters:
                    self._counts['ignored_on_demand'] += len(self._slots)
                    self._slots.clear()
                    continue
                # the newest frame of every camera that has one, oldest first: one batch
                frames = sorted(self._slots.values(), key=lambda f: f.received_s)
                self._slots.clear()
                self._batches += 1
                for frame in frames:
                    frame.batch = self._batches
                reset, self._reset_sequence = self._reset_sequence, False
                started = time.monotonic()
            if reset:
                self._forget_past_frames()
            try:
                self._process(frames)
            except Exception:  # noqa: BLE001 - a bug must not silence the node: log, count, go on
                for frame in frames:  # failed before any frame was published (see _process)
                    self._skip('internal_error', frame, traceback.format_exc())

    def _process(self, frames: list[_Frame]) -> None:
        """Localise a batch of frames (one per camera) with one batched feature extraction;
        a frame that cannot be used is skipped, the others go on."""
        cfg, query_cfg = self._cfg, self._query_cfg
        ready = [prepared for frame in frames if (prepared := self._prepare(frame, cfg))]
        if not ready:
            return
        for prepared, result in self._localize_batch(ready):
            try:
                self._finish(prepared, result, cfg, query_cfg)
            except Exception:  # noqa: BLE001 - a bug costs this frame only: log, count, go on
                self._skip('internal_error', prepared.frame, traceback.format_exc())

    def _finish(
        self,
        prepared: _Prepared,
        result: LocalizationResult,
        cfg: NodeConfig,
        query_cfg: LocalizerConfig,
    ) -> None:
        """Sequence vote, camera-to-base offset, output checks and publishing of one frame."""
        t_ns, topic = stamp_ns(prepared.header), prepared.frame.topic
        motion, travel = self._motions(t_ns, topic, cfg)
        result = self._sequence_vote(result, topic, travel)
        self._camera_stamp_ns[topic] = t_ns  # the sequence has this frame, published or not
        try:
            pose, covariance = base_pose_from_camera(
                result.pose, result.covariance, prepared.base_in_camera
            )
            check_output(pose, covariance)
        except VprError as exc:
            self._skip_error(exc, prepared.frame)
            return
        self._previous_stamp_ns = t_ns  # the gate's last frame
        self._publish(
            prepared.frame,
            prepared.header,
            prepared.image,
            result,
            pose,
            covariance,
            prepared.base_in_camera,
            motion,
            cfg,
            query_cfg,
        )

    def _localize_batch(
        self, ready: list[_Prepared]
    ) -> list[tuple[_Prepared, LocalizationResult]]:
        """(frame, Localizer result) pairs of the frames localised; a frame without a usable
        feature is skipped (counted, logged) and the others go on. If the whole batch fails,
        each frame is tried alone, so only the frame at fault is skipped."""
        try:
            results = self._localizer.localize_batch([p.image for p in ready])
        except VprError as exc:
            if len(ready) == 1:
                self._skip_error(exc, ready[0].frame)
                return []
            return [pair for prepared in ready for pair in self._localize_batch([prepared])]
        pairs: list[tuple[_Prepared, LocalizationResult]] = []
        for prepared, result in zip(ready, results):
            if isinstance(result, VprError):
                self._skip_error(result, prepared.frame)
            else:
                pairs.append((prepared, result))
        return pairs

    def _prepare(self, frame: _Frame, cfg: NodeConfig) -> _Prepared | None:
        """The frame decoded (and rectified) with its header and camera mount; None
        (counted, logged) if it cannot be used."""
        assert self._offsets is not None  # from configure until cleanup, which stops the worker
        header = frame.msg.header
        if stamp_ns(header) == 0:  # a driver without stamps: the receipt time is the best guess
            header = Header(stamp=self.get_clock().now().to_msg(), frame_id=header.frame_id)
        try:
            image = image_from_msg(frame.msg)
            if frame.topic in self._info_topics:
                image = self._rectify(image, frame)
            base_in_camera = self._offsets.base_in_camera(cfg.camera_frame or header.frame_id)
        except (FrameSkipped, TransformUnavailable) as exc:
            self._skip_error(exc, frame)
            return None
        return _Prepared(frame, header, image, base_in_camera)

    def _rectify(self, image: np.ndarray, frame: _Frame) -> np.ndarray:
        """The frame rectified with its camera's latest CameraInfo. Without one (yet), or with
        a region-of-interest / binned calibration, it is localised as it is: counted in
        /diagnostics and logged, never blocked. FrameSkipped if it does not fit the calibration.
        """
        topic = self._info_topics[frame.topic]
        with self._lock:
            info = self._camera_infos.get(topic)
        start = time.perf_counter()
        if info is None:
            state = 'missing'
            self._warn(
                f'camera_info_{state}',
                f'{frame.topic}: no CameraInfo on {topic} yet: localising the frame unrectified',
            )
        else:
            image, state = rectify_with_camera_info(image, info)
        if state == 'roi_or_binning':
            self._warn(
                f'camera_info_{state}',
                f'{frame.topic}: rectifying a region of interest '
                'or binned frames is not supported: localising the frame unrectified',
            )
        with self._lock:
            self._counts[f'camera_info_{state}'] += 1
            if state == 'rectified':
                self._stage_ms.setdefault('rectify', deque(maxlen=STATS_WINDOW)).append(
                    (time.perf_counter() - start) * 1000.0
                )
        return image

    def _motions(self, t_ns: int, topic: str, cfg: NodeConfig) -> tuple[Pose | None, Pose | None]:
        """The robot's motion up to ``t_ns`` since the last localised frame (for the
        /initialpose gate, when enabled and armed) and since ``topic``'s last frame (for its
        sequence vote, when it has one), from TF (``odom_frame``) or the ``odom_topic``. None
        without a source, a use or a previous frame; a frame whose motion the source cannot
        give (no pose near a stamp) counts once as ``motion_unknown``. Each stamp is looked up
        once (two cameras: three TF lookups, not four), and none but this frame's when it has
        no pose."""
        source = self._odometry_source
        with self._lock:  # a shut gate takes no motion until it is re-armed
            gate_open = cfg.initial_pose.enabled and self._gate.armed
        wanted = (
            self._previous_stamp_ns if gate_open else None,
            self._camera_stamp_ns.get(topic) if topic in self._matchers else None,
        )
        if source is None or wanted == (None, None):
            return None, None
        now = source.pose_at(t_ns)  # first: without it the earlier stamps need no lookup
        poses = {t_ns: now}
        if now is not None:
            poses.update((s, source.pose_at(s)) for s in set(wanted) if s not in (None, t_ns))
        if None in poses.values():
            with self._lock:
                self._counts['motion_unknown'] += 1
        motions = []
        for since in wanted:
            before = None if since is None else poses.get(since)
            motions.append(None if before is None or now is None else planar_motion(before, now))
        gate, vote = motions
        return gate, vote

    def _sequence_vote(
        self, result: LocalizationResult, topic: str, motion: Pose | None
    ) -> LocalizationResult:
        """The result voted in the sequence of its camera's frames (``motion``: since its
        camera's previous one)."""
        matcher = self._matchers.get(topic)
        if matcher is None:
            return result
        travelled = math.hypot(motion.x, motion.y) if motion is not None else None
        return matcher.update(result, travelled)

    def _publish(
        self,
        frame: _Frame,
        header: Any,
        image: np.ndarray,
        result: LocalizationResult,
        pose: Pose,
        covariance: np.ndarray,
        base_in_camera: Pose,
        motion: Pose | None,
        cfg: NodeConfig,
        query_cfg: LocalizerConfig,
    ) -> None:
        out = Header(stamp=header.stamp, frame_id=cfg.map_frame)
        pose_out = pose_with_covariance_msg(pose, covariance, out)
        published = result.confidence >= cfg.min_confidence
        if published:
            self._pubs['pose'].publish(pose_out)
        self._pubs['confidence'].publish(Float32(data=float(result.confidence)))
        candidates = [
            base_pose_from_camera(c.pose, result.covariance, base_in_camera)[0]
            for c in result.candidates
        ]
        self._pubs['candidates'].publish(pose_array_msg(candidates, out))
        self._pubs['markers'].publish(
            markers_msg(candidates, [c.score for c in result.candidates], out)
        )
        if cfg.debug_image and result.candidates:
            match = self._localizer.map.thumbnail(result.candidates[0].map_index)
            caption = f'{result.candidates[0].image_name}  conf {result.confidence:.2f}'
            self._pubs['debug_image'].publish(
                image_msg(
                    debug_image(image, match, caption),
                    Header(stamp=header.stamp, frame_id=header.frame_id),
                )
            )
        latency_ms = (time.monotonic() - frame.received_s) * 1000.0
        summary = {
            'stamp_ns': stamp_ns(header),
            'x': round(pose.x, 3),
            'y': round(pose.y, 3),
            'yaw_rad': round(pose.yaw_rad, 4) if pose.yaw_known else None,
            'confidence': round(result.confidence, 4),
            'best': result.candidates[0].image_name if result.candidates else None,
        }
        with self._lock:
            gate_passed = cfg.initial_pose.enabled and self._gate.update(
                pose,
                result.confidence,
                motion,
                cfg.initial_pose,
                query_cfg.confidence.initial_pose_threshold,
            )
            self._counts['localized'] += 1
            self._counts['published'] += int(published)
            self._counts['result_notes'] += len(result.notes)
            if frame.topic in self._cameras:  # not stopped meanwhile
                self._cameras[frame.topic].outcome = LOCALISING
            self._latency_ms.append(latency_ms)
            for stage, ms in result.timing_ms.items():
                self._stage_ms.setdefault(stage, deque(maxlen=STATS_WINDOW)).append(ms)
            self._last = {**summary, 'notes': list(result.notes)}
            for waiter in self._waiters:
                if frame.batch <= waiter.after:  # taken before the call
                    continue
                waiter.results.append(summary)
                if len(waiter.results) >= waiter.needed:
                    waiter.done.set()
            self._waiters = [w for w in self._waiters if not w.done.is_set()]
        if gate_passed:
            self._pubs['initialpose'].publish(pose_out)
            self.get_logger().info(
                f'published /initialpose x={pose.x:.2f} y={pose.y:.2f} '
                f'(confidence {result.confidence:.2f}); the gate is shut '
                'until rearm_initial_pose or relocalize is called'
            )

    def _skip_error(self, exc: VprError, frame: _Frame) -> None:
        """Skip ``frame`` for ``exc``, counted under the error's ``reason`` (FrameSkipped,
        TransformUnavailable, NoFeaturesError carry one), else as ``localize_error``."""
        self._skip(getattr(exc, 'reason', 'localize_error'), frame, str(exc))

    def _skip(self, reason: str, frame: _Frame, message: str) -> None:
        with self._lock:
            self._counts[f'skipped_{reason}'] += 1
            if frame.topic in self._cameras:
                self._cameras[frame.topic].outcome = f'last frame skipped ({reason})'
        self._warn(reason, f'{frame.topic}: frame skipped ({reason}): {message}')

    def _warn(self, key: str, message: str) -> None:
        """Log ``message`` unless a warning of the same ``key`` was logged in WARN_PERIOD_S."""
        now = time.monotonic()
        if now - self._warned_s.get(key, -math.inf) >= WARN_PERIOD_S:
            self._warned_s[key] = now
            self.get_logger().warning(message)

    # -----------------------------------------------------------------------------------------
    # Diagnostics

    @property
    def settings(self) -> tuple[NodeConfig, LocalizerConfig]:
        """The settings in use (validated): the current values of the live parameters
        (params.LIVE), the others' as read at the last configure (unconfigured: their current
        values)."""
        return self._cfg, self._query_cfg

    @property
    def status(self) -> tuple[bytes, str]:
        """(DiagnosticStatus level, message) as published on /diagnostics (which also warns of
        missing camera_info). While active, from each camera's last frame: OK when every
        camera's was localised (or none has sent one yet), WARN naming each camera whose last
        frame was skipped, that has sent none while others have, or that is stale (no frame for
        longer than max(STALE_MIN_S, STALE_PERIODS x its usual gap): see camera_silence)."""
        return self._status_of(self._camera_states())

    def _camera_states(self) -> dict[str, str]:
        """Each camera's state (active): ``no frame for ...`` while it is stale, else its last
        frame's outcome."""
        now_ns = self.get_clock().now().nanoseconds
        states = {}
        with self._lock:
            for topic, camera in self._cameras.items():
                silence = camera_silence(camera.receipts_ns, now_ns)
                states[topic] = (
                    camera.outcome
                    if silence is None
                    else f'no frame for {silence[0]:.1f} s (usually every {silence[1]:.2f} s)'
                )
        return states

    def _status_of(self, cameras: dict[str, str]) -> tuple[bytes, str]:
        """The status for the cameras' states (``_camera_states``); the lifecycle's without."""
        if not cameras:
            return self._status
        if set(cameras.values()) == {NO_FRAME_YET}:
            return DiagnosticStatus.OK, 'active, waiting for images'
        if set(cameras.values()) == {LOCALISING}:
            return DiagnosticStatus.OK, 'localising'
        return DiagnosticStatus.WARN, '; '.join(
            f'{topic}: {state}' for topic, state in cameras.items() if state != LOCALISING
        )

    def latency_stats(self) -> dict[str, float]:
        """Image receipt to pose publish over the last frames: count, median_ms, p95_ms."""
        with self._lock:
            values = list(self._latency_ms)
        if not values:
            return {'count': 0, 'median_ms': math.nan, 'p95_ms': math.nan}
        return {
            'count': len(values),
            'median_ms': float(np.median(values)),
            'p95_ms': float(np.percentile(values, 95)),
        }

    def counts(self) -> dict[str, int]:
        """Frames received, localised, published, dropped and skipped (by reason)."""
        with self._lock:
            return dict(self._counts)

    def publish_diagnostics(self) -> None:
        cameras = self._camera_states()
        level, message = self._status_of(cameras)
        with self._lock:
            values = {k: str(v) for k, v in sorted(self._counts.items())}
            stages = {k: float(np.median(v)) for k, v in self._stage_ms.items() if v}
            notes = self._last.get('notes', [])
            no_info = sorted(set(self._info_topics.values()) - set(self._camera_infos))
        latency = self.latency_stats()
        values.update({f'latency_{k}_ms': f'{v:.1f}' for k, v in stages.items()})
        values['receipt_to_publish_median_ms'] = f'{latency["median_ms"]:.1f}'
        values['receipt_to_publish_p95_ms'] = f'{latency["p95_ms"]:.1f}'
        localizer = self._localizer
        values['map_size'] = str(len(localizer.map) if localizer is not None else 0)
        calibration = localizer.calibration if localizer is not None else None
        values['confidence_calibration'] = (
            'none: no map'
            if calibration is None
            else f'fitted for {calibration.settings}'
            if calibration.fitted
            else 'default weights: the map has no calibration for these settings '
            '(run vlm-vpr calibrate with them)'
        )
        values['map_path'] = self._cfg.map_path
        values['last_notes'] = '; '.join(notes)
        values['initial_pose_armed'] = str(self._gate.armed)
        values.update({f'camera {topic}': state for topic, state in cameras.items()})
        if self._info_topics:
            values['camera_info_missing_on'] = ', '.join(no_info)
            if no_info:  # also beside another warning
                level = max(level, DiagnosticStatus.WARN)
                message = f'{message}; no camera_info on {no_info}'
        status = DiagnosticStatus(
            level=level,
            name=f'{self.get_name()}: localization',
            message=message,
            hardware_id='vlm_vpr',
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics_pub.publish(array)


def main(args: list[str] | None = None) -> int:
    """Console script and `ros2 run vlm_vpr vpr_node`."""
    from rclpy.exceptions import InvalidParameterTypeException, ParameterException

    rclpy.init(args=args)
    try:
        node = VprNode()
    except (ConfigError, ParameterException, InvalidParameterTypeException) as exc:
        print(f'vpr_node: error: {exc}', flush=True)
        rclpy.try_shutdown()
        return 1
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
