"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm_vpr.core.datasets import default_data_root


@pytest.fixture(scope='session')
def data_root() -> Path:
    """The shared data folder; CI has it, so its absence fails the test instead of skipping."""
    root = default_data_root()
    if not (root / 'campus_loop' / 'dataset.yaml').is_file():
        pytest.fail(
            f'shared data not found at {root}: set VLM_VPR_DATA to the shared data folder '
            '(the one holding campus_loop/, gardens_point/ ...)'
        )
    return root


def pytest_configure(config: pytest.Config) -> None:
    """Offline models, and a DDS domain of this run's own so parallel runs never cross-talk."""
    import os

    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    os.environ['ROS_DOMAIN_ID'] = str(10 + os.getpid() % 90)
    os.environ.setdefault('ROS_LOCALHOST_ONLY', '1')
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')


@pytest.fixture(scope='session')
def campus_map(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A map built (default weight-free config) from the real campus_loop `map` traversal."""
    from vlm_vpr.core.map_build import build_map_from_folder

    folder = data_root / 'campus_loop' / 'map'
    out = tmp_path_factory.mktemp('maps') / 'campus_loop'
    return build_map_from_folder(folder / 'images', folder / 'poses.csv', out, progress=False)


@pytest.fixture(scope='session')
def embedder():
    """The real all-MiniLM-L6-v2 Sentence-BERT (bundled package, offline), loaded once."""
    import torch

    from vlm_vpr.backends.text_embedding import TextEmbedder

    torch.set_num_threads(1)
    return TextEmbedder()
