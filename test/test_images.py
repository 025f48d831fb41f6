from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlm_vpr.core.errors import ImageError
from vlm_vpr.core.images import decode_image, read_image, resize_shorter_side


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
