"""Feature extractors: each returns a grid of L2-normalised local descriptors per image."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from vlm_vpr.core.config import FeatureConfig, RuntimeConfig
from vlm_vpr.core.errors import ConfigError
from vlm_vpr.core.types import LocalFeatures


class FeatureExtractor(Protocol):
    def extract(self, images_bgr: list[np.ndarray]) -> list[LocalFeatures]:
        """Local features of each image ([H x W x 3] uint8 BGR, any size)."""
        ...


def create_extractor(features: FeatureConfig, runtime: RuntimeConfig) -> FeatureExtractor:
    """The extractor named by ``features.backbone``."""
    if features.backbone == 'dense-rootsift':
        from vlm_vpr.backends.features.dense_rootsift import DenseRootSift

        return DenseRootSift(features, runtime)
    if features.backbone == 'dinov2':
        from vlm_vpr.backends.features.dinov2 import Dinov2Extractor

        return Dinov2Extractor(features, runtime)
    raise ConfigError(f'unknown backbone {features.backbone!r}')
