"""Image decoding and checks shared by every entry point (CLI, node, bag reader)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from vlm_vpr.core.errors import ImageError

MAX_IMAGE_PIXELS = 40_000_000  # larger frames are rejected (a 10000 x 10000 image is 100 MP)
# Frames longer than this many times their width (or wider than this many times their height)
# are rejected (check_aspect_ratio): scaling a thin strip's shorter side up to the feature
# size makes its longer side huge (a 2 x 1500 strip at 240 px: 240 x 180000).
MAX_ASPECT_RATIO = 8.0


def as_bgr(image: np.ndarray, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A checked [H x W x 3] uint8 BGR copy-free view of a grey, BGR or BGRA uint8 image."""
    import cv2

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        dtype = getattr(image, 'dtype', type(image).__name__)
        raise ImageError(f'expected a uint8 image, got {dtype}; convert to 8-bit first')
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f'image of shape {image.shape} is empty or not 2-D')
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageError(
            f'image of {image.shape[1]}x{image.shape[0]} exceeds {max_pixels} pixels; '
            'downscale it before sending it for localisation'
        )
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    if channels == 3:
        return image
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise ImageError(f'image with {channels} channels is not grey, BGR or BGRA')


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode JPEG/PNG/... bytes to [H x W x 3] uint8 BGR; ImageError if corrupt or too large."""
    import cv2

    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size == 0:
        raise ImageError('empty image data')
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(
            f'could not decode {buffer.size} bytes as an image (corrupt or truncated)'
        )
    return as_bgr(image, max_pixels)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as [H x W x 3] uint8 BGR; ImageError names the file on failure."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f'cannot read image {path}: {exc.strerror}') from exc
    try:
        return decode_image(data)
    except ImageError as exc:
        raise ImageError(f'{path}: {exc}') from exc


def check_aspect_ratio(width: int, height: int) -> None:
    """ImageError for a frame more than MAX_ASPECT_RATIO (8:1) times longer one way than the
    other."""
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise ImageError(
            f'image of {width}x{height} is {max(height, width) / min(height, width):.3g}:1, '
            f'beyond the {MAX_ASPECT_RATIO:g}:1 aspect ratio limit; crop it or send whole '
            'camera frames'
        )


def resize_shorter_side(
    image: np.ndarray,
    size_px: int,
    multiple: int = 1,
) -> np.ndarray:
    """Resize so the shorter side is ``size_px``; both sides rounded down to ``multiple``.

    ImageError for an image beyond the aspect ratio limit (:func:`check_aspect_ratio`), or one
    whose resized size would exceed MAX_IMAGE_PIXELS.
    """
    import cv2

    h, w = image.shape[:2]
    check_aspect_ratio(w, h)
    scale = size_px / min(h, w)
    new_h = max(multiple, int(round(h * scale)) // multiple * multiple)
    new_w = max(multiple, int(round(w * scale)) // multiple * multiple)
    if new_h * new_w > MAX_IMAGE_PIXELS:
        raise ImageError(
            f'image of {w}x{h} resized to a shorter side of {size_px} px would be '
            f'{new_w}x{new_h}, over the {MAX_IMAGE_PIXELS} pixel limit'
        )
    if (new_h, new_w) == (h, w):
        return image
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interp)


# Distortion models of sensor_msgs/CameraInfo and the number of coefficients D each takes.
DISTORTION_COEFFS = {'plumb_bob': 5, 'rational_polynomial': 8, 'equidistant': 4}


def rectify_image(
    image: np.ndarray,
    camera_matrix: np.ndarray,
    dist_coeffs: np.ndarray,
    projection: np.ndarray,
    model: str,
    width: int,
    height: int,
) -> np.ndarray:
    """Undistort a frame with its calibration, in sensor_msgs/CameraInfo conventions.

    ``image`` [H x W x C] uint8 of the calibrated size ``width`` x ``height``; ``camera_matrix``
    K [3 x 3]; ``dist_coeffs`` D of ``model`` ('plumb_bob': 5, 'rational_polynomial': 8, both
    OpenCV's pinhole model; 'equidistant': 4, OpenCV's fisheye model); ``projection`` P [3 x 4]
    (or [3 x 3]) whose left 3 x 3 is the camera matrix of the output (all zero: K). Returns
    the rectified [H x W x C] uint8 image; the input itself when D is all zero (nothing to
    undo, whatever the size). ImageError when the size differs from the calibration's, the
    model is unknown or D, K or P are unusable.
    """
    k = np.asarray(camera_matrix, np.float64).reshape(3, 3)
    d = np.asarray(dist_coeffs, np.float64).ravel()
    p = np.asarray(projection, np.float64).reshape(3, -1)[:, :3]
    if not d.any():
        return image
    if image.shape[0] != height or image.shape[1] != width:
        raise ImageError(
            f'image of {image.shape[1]}x{image.shape[0]} does not match its '
            f'calibration of {width}x{height}; publish the camera_info of this '
            'resolution (or recalibrate)'
        )
    if model not in DISTORTION_COEFFS:
        raise ImageError(
            f'distortion model {model!r} is not one of {sorted(DISTORTION_COEFFS)};'
            ' calibrate with one of them'
        )
    if d.size != DISTORTION_COEFFS[model] or not np.isfinite(d).all():
        raise ImageError(
            f'{model} needs {DISTORTION_COEFFS[model]} finite distortion '
            f'coefficients, got {d.tolist()}; check the calibration file'
        )
    if not p.any():
        p = k
    for name, matrix in (('K', k), ('P', p)):
        if not (np.isfinite(matrix).all() and matrix[0, 0] > 0 and matrix[1, 1] > 0):
            raise ImageError(
                f'camera matrix {name} has no positive focal lengths '
                f'({matrix[0, 0]}, {matrix[1, 1]}): the camera is not calibrated'
            )
    map_x, map_y = _rectify_maps(model, width, height, k.tobytes(), d.tobytes(), p.tobytes())
    import cv2

    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


@functools.lru_cache(maxsize=8)
def _rectify_maps(
    model: str, width: int, height: int, k: bytes, d: bytes, p: bytes
) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap maps of one calibration (cached: a camera's calibration rarely changes)."""
    import cv2

    k_matrix, new_k = (np.frombuffer(b, np.float64).reshape(3, 3) for b in (k, p))
    coeffs = np.frombuffer(d, np.float64)
    if model == 'equidistant':
        return cv2.fisheye.initUndistortRectifyMap(
            k_matrix, coeffs, np.eye(3), new_k, (width, height), cv2.CV_16SC2
        )
    return cv2.initUndistortRectifyMap(
        k_matrix, coeffs, np.eye(3), new_k, (width, height), cv2.CV_16SC2
    )
