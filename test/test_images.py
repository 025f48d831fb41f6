from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from vlm_vpr.core.errors import ImageError
from vlm_vpr.core.images import (
    MAX_ASPECT_RATIO,
    decode_image,
    read_image,
    resize_shorter_side,
)


def test_truncated_jpeg_is_rejected(data_root: Path) -> None:
    data = (data_root / 'corridor' / 'ref' / 'images' / '0000000.jpg').read_bytes()
    with pytest.raises(ImageError, match='could not decode'):
        decode_image(data[: len(data) // 8])


def test_empty_bytes_are_rejected() -> None:
    with pytest.raises(ImageError, match='empty image data'):
        decode_image(b'')


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match='cannot read image .*nope.png'):
        read_image(tmp_path / 'nope.png')


def test_grey_png_is_read_as_three_channel_bgr(data_root: Path) -> None:
    image = read_image(data_root / 'campus_loop' / 'map' / 'images' / 'image_0.png')
    assert image.shape == (240, 426, 3) and image.dtype == np.uint8


def test_resize_rounds_both_sides_to_the_multiple() -> None:
    out = resize_shorter_side(np.zeros((540, 960, 3), np.uint8), 224, multiple=14)
    assert out.shape[:2] == (224, 392)


@pytest.mark.parametrize('shape', [(2, 1500), (1500, 2), (30, 300), (100, 801)])
def test_resize_rejects_a_thin_strip_naming_its_shape_and_the_aspect_limit(
    shape: tuple[int, int],
) -> None:
    # scaled up to a 240 px shorter side, a 2 x 1500 strip would be 240 x 180000 pixels
    with pytest.raises(ImageError, match=f'{shape[1]}x{shape[0]} .*beyond the 8:1 aspect'):
        resize_shorter_side(np.zeros((*shape, 3), np.uint8), 240)


@pytest.mark.parametrize(
    'shape, resized',
    [
        ((480, 640), (240, 320)),  # 4:3
        ((1080, 1920), (240, 427)),  # 16:9
        ((960, 1920), (240, 480)),  # a 2:1 panorama
        ((100, 800), (240, 1920)),  # exactly the 8:1 limit
        ((800, 100), (1920, 240)),
    ],
)
def test_resize_keeps_frames_within_the_aspect_limit(
    shape: tuple[int, int], resized: tuple[int, int]
) -> None:
    assert MAX_ASPECT_RATIO == 8
    assert resize_shorter_side(np.zeros((*shape, 3), np.uint8), 240).shape[:2] == resized


def test_resize_rejects_a_result_over_the_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    def no_resize(*args: object, **kwargs: object) -> None:  # checked first: no 44 MP array
        pytest.fail('resized before the pixel limit was checked')

    monkeypatch.setattr(cv2, 'resize', no_resize)
    with pytest.raises(ImageError, match='640x480 .* would be 7680x5760, over the 40000000 pixel'):
        resize_shorter_side(np.zeros((480, 640), np.uint8), 5760)


WIDTH, HEIGHT = 640, 480
K = np.array([[400.0, 0.0, 320.0], [0.0, 400.0, 240.0], [0.0, 0.0, 1.0]])
P = np.hstack([K, np.zeros((3, 1))])  # CameraInfo's P [3 x 4]: a monocular camera, output K
DISTORTIONS = {
    'plumb_bob': np.array([-0.3, 0.1, 0.001, -0.001, 0.0]),
    'rational_polynomial': np.array([-0.3, 0.1, 0.001, -0.001, 0.0, 0.05, 0.0, 0.0]),
    'equidistant': np.array([0.1, -0.05, 0.01, 0.0]),
}
LINE_ROW = 60  # a horizontal line near the top edge, where the distortion bends it most


def ideal_image() -> np.ndarray:
    """A pinhole (undistorted) [H x W] uint8 view: white, one black horizontal line."""
    image = np.full((HEIGHT, WIDTH), 255, np.uint8)
    image[LINE_ROW - 2 : LINE_ROW + 3] = 0
    return image


def distort(image: np.ndarray, model: str, d: np.ndarray) -> np.ndarray:
    """What the real lens sees: each distorted pixel samples the ideal pixel that OpenCV's own
    point undistortion (an iterative solver, not the remap under test) assigns to it."""
    u, v = np.meshgrid(np.arange(WIDTH, dtype=np.float64), np.arange(HEIGHT, dtype=np.float64))
    pixels = np.stack([u.ravel(), v.ravel()], axis=1).reshape(-1, 1, 2)
    if model == 'equidistant':
        ideal = cv2.fisheye.undistortPoints(pixels, K, d, R=np.eye(3), P=K)
    else:
        ideal = cv2.undistortPoints(pixels, K, d, P=K)
    maps = ideal.reshape(HEIGHT, WIDTH, 2).astype(np.float32)
    return cv2.remap(image, maps[..., 0], maps[..., 1], cv2.INTER_LINEAR, borderValue=255)


def line_rows(image: np.ndarray) -> np.ndarray:
    """Row centroid of the dark line in each column of the middle half (sub-pixel)."""
    band = 255.0 - image[: LINE_ROW + 60, WIDTH // 4 : 3 * WIDTH // 4].astype(np.float64)
    rows = np.arange(band.shape[0])[:, None]
    return (band * rows).sum(axis=0) / band.sum(axis=0)


@pytest.mark.parametrize('model', sorted(DISTORTIONS))
def test_rectify_image_makes_a_line_bent_by_the_lens_straight_again(model: str) -> None:
    from vlm_vpr.core.images import rectify_image

    distorted = distort(ideal_image(), model, DISTORTIONS[model])
    bent = line_rows(distorted)
    assert np.ptp(bent) > 4.0, 'the test distortion should bend the line'
    rectified = rectify_image(distorted, K, DISTORTIONS[model], P, model, WIDTH, HEIGHT)
    straight = line_rows(rectified)
    assert rectified.shape == distorted.shape and rectified.dtype == np.uint8
    assert np.ptp(straight) < 0.5
    assert np.abs(straight - LINE_ROW).max() < 0.5


def test_rectify_image_matches_cv2_undistort_for_a_pinhole_camera() -> None:
    from vlm_vpr.core.images import rectify_image

    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8), (5, 5), 0)
    d = DISTORTIONS['plumb_bob']
    expected = cv2.undistort(image, K, d, None, K)
    rectified = rectify_image(image, K, d, P, 'plumb_bob', WIDTH, HEIGHT)
    inner = (slice(40, -40), slice(40, -40))  # the borders differ only in fill
    assert np.abs(rectified[inner].astype(int) - expected[inner]).mean() < 1.0


def test_rectify_image_returns_the_frame_itself_without_distortion() -> None:
    from vlm_vpr.core.images import rectify_image

    image = ideal_image()
    assert rectify_image(image, K, np.zeros(5), P, 'plumb_bob', WIDTH, HEIGHT) is image
    assert rectify_image(image, K, [], P, '', WIDTH, HEIGHT) is image
    assert rectify_image(image, K, np.zeros(5), P, 'plumb_bob', 320, 240) is image  # any size


@pytest.mark.parametrize(
    ('size', 'model', 'd', 'k', 'message'),
    [
        (
            (320, 240),
            'plumb_bob',
            DISTORTIONS['plumb_bob'],
            K,
            'image of 640x480 does not match its calibration of 320x240',
        ),
        (
            (WIDTH, HEIGHT),
            'kannala_brandt',
            DISTORTIONS['plumb_bob'],
            K,
            "distortion model 'kannala_brandt' is not one of",
        ),
        (
            (WIDTH, HEIGHT),
            'equidistant',
            DISTORTIONS['plumb_bob'],
            K,
            r'equidistant needs 4 finite distortion coefficients, got \[-0.3, ',
        ),
        (
            (WIDTH, HEIGHT),
            'plumb_bob',
            np.array([np.nan, 0.1, 0.0, 0.0, 0.0]),
            K,
            r'plumb_bob needs 5 finite distortion coefficients, got \[nan, ',
        ),
        (
            (WIDTH, HEIGHT),
            'plumb_bob',
            DISTORTIONS['plumb_bob'],
            np.zeros((3, 3)),
            'camera matrix K has no positive focal lengths',
        ),
    ],
)
def test_rectify_image_rejects_a_calibration_that_does_not_fit(
    size: tuple[int, int], model: str, d: np.ndarray, k: np.ndarray, message: str
) -> None:
    from vlm_vpr.core.images import rectify_image

    with pytest.raises(ImageError, match=message):
        rectify_image(ideal_image(), k, d, P, model, *size)
