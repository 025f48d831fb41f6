"""Test double for the ROS parts that cannot be installed here: tf2's buffer."""

from __future__ import annotations

from vlm_vpr.ros.tf_adapter import Transform, TransformUnavailable

IDENTITY: Transform = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)


class TfLookupDouble:
    """Test double for tf2's buffer (tf2_ros has no wheel), called as ``TfTree.lookup``:
    records the (target, source, stamp) asked for. ``transforms[(target, source)]`` maps
    stamps to transforms (key None: the latest, for any stamp); a pair not listed is the
    identity, a stamp not listed is TransformUnavailable (extrapolation; an empty table: a
    transform never published)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int | None]] = []
        self.transforms: dict[tuple[str, str], dict[int | None, Transform]] = {}

    def __call__(self, target: str, source: str, stamp_ns: int | None) -> Transform:
        self.calls.append((target, source, stamp_ns))
        table = self.transforms.get((target, source))
        if table is None:
            return IDENTITY
        if stamp_ns in table or None in table:
            return table[stamp_ns if stamp_ns in table else None]
        raise TransformUnavailable(f'no TF from {target!r} to {source!r} at {stamp_ns} (double)')
