"""Map folder round trip and every way a map can be rejected."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from vlm_vpr.core.config import IndexConfig, MapBuildConfig
from vlm_vpr.core.errors import IncompatibleMapError, MapError
from vlm_vpr.core.map_format import (
    MapContent,
    check_compatible,
    read_map,
    write_extra,
    write_extras,
    write_map,
)
from vlm_vpr.core.types import Pose
from vlm_vpr.core.vlad import l2_normalize


def make_content(n: int = 12, dim: int = 32, config: MapBuildConfig | None = None) -> MapContent:
    rng = np.random.default_rng(0)
    poses = [Pose.from_yaw(float(i), 2.0 * i, 0.1 * i if i % 3 else None) for i in range(n)]
    return MapContent(
        build_config=config or MapBuildConfig(),
        codebook=l2_normalize(rng.normal(size=(4, 8))).astype(np.float32),
        descriptors=l2_normalize(rng.normal(size=(n, dim))).astype(np.float16),
        image_names=[f'img_{i}.png' for i in range(n)],
        poses=poses,
        thumbnails=[b'\xff\xd8fakejpeg'] * n,
        source='synthetic',
    )


@pytest.fixture
def map_dir(tmp_path: Path) -> Path:
    return write_map(make_content(), tmp_path / 'm')


def test_map_round_trip_keeps_descriptors_poses_and_config(map_dir: Path) -> None:
    content = make_content()
    loaded = read_map(map_dir)
    np.testing.assert_array_equal(loaded.content.descriptors, content.descriptors)
    np.testing.assert_array_equal(loaded.content.codebook, content.codebook)
    assert loaded.content.image_names == content.image_names
    assert loaded.content.build_config == content.build_config
    for a, b in zip(loaded.content.poses, content.poses):
        assert a.yaw_known == b.yaw_known
        assert (a.x, a.y) == (b.x, b.y)
        if a.yaw_known:
            assert math.isclose(a.yaw_rad, b.yaw_rad, abs_tol=1e-12)
    assert loaded.index.ntotal == 12
    assert loaded.frame_id == 'map'
    assert (map_dir / 'thumbnails' / '000011.jpg').read_bytes() == b'\xff\xd8fakejpeg'


def test_poses_given_as_numpy_scalars_are_written_as_plain_numbers(tmp_path: Path) -> None:
    content = make_content(n=3)
    content.poses = [
        Pose.from_yaw(np.float64(i) / 3, np.float32(-1.5), np.float64(0.5)) for i in range(3)
    ]
    loaded = read_map(write_map(content, tmp_path / 'm'))
    assert [(p.x, p.y) for p in loaded.content.poses] == [(i / 3, -1.5) for i in range(3)]
    assert loaded.content.poses[0].yaw_rad == pytest.approx(0.5)


def test_approximate_index_is_stored_and_reloaded(tmp_path: Path) -> None:
    config = MapBuildConfig(index=IndexConfig(approximate_above=10, approximate_type='hnsw'))
    path = write_map(make_content(n=40, config=config), tmp_path / 'm')
    loaded = read_map(path)
    assert loaded.manifest['index_type'] == 'hnsw'
    assert (path / 'index.faiss').is_file()
    scores, ids = loaded.index.search(loaded.content.descriptors[5:6].astype(np.float32), 1)
    assert ids[0, 0] == 5


def test_write_map_refuses_to_overwrite_without_permission(map_dir: Path) -> None:
    with pytest.raises(MapError, match='exists; pass overwrite=True'):
        write_map(make_content(), map_dir)
    write_map(make_content(n=5), map_dir, overwrite=True)
    assert len(read_map(map_dir)) == 5
    assert not list(map_dir.parent.glob('.m.*')), 'temporary folders were left behind'


def test_failed_write_leaves_the_existing_map_untouched(map_dir: Path) -> None:
    bad = make_content()
    bad.poses = bad.poses[:3]
    with pytest.raises(MapError, match='3 poses for 12 images'):
        write_map(bad, map_dir, overwrite=True)
    assert len(read_map(map_dir)) == 12


def test_read_map_rejects_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(MapError, match='does not exist; build one'):
        read_map(tmp_path / 'nope')


def test_read_map_rejects_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(MapError, match='no manifest.json'):
        read_map(tmp_path)


def test_read_map_rejects_unknown_format_version(map_dir: Path) -> None:
    manifest = json.loads((map_dir / 'manifest.json').read_text())
    manifest['format_version'] = 99
    (map_dir / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(MapError, match='version 99 is not supported'):
        read_map(map_dir)


@pytest.mark.parametrize('version', [1, 3])
def test_read_map_rejects_the_previous_and_future_format_versions(
    map_dir: Path, version: int
) -> None:
    manifest = json.loads((map_dir / 'manifest.json').read_text())
    manifest['format_version'] = version
    (map_dir / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(MapError, match=f'version {version} is not supported.*rebuild'):
        read_map(map_dir)


def test_read_map_rejects_unknown_index_type(map_dir: Path) -> None:
    manifest = json.loads((map_dir / 'manifest.json').read_text())
    manifest['index_type'] = 'ivfpq'
    (map_dir / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(MapError, match="unknown index_type 'ivfpq'; rebuild the map"):
        read_map(map_dir)


def test_pca_is_stored_as_float16_and_read_back_as_the_same_values(tmp_path: Path) -> None:
    content = make_content(dim=16)
    rng = np.random.default_rng(4)
    mean = rng.normal(size=32).astype(np.float32)
    components = rng.normal(size=(16, 32)).astype(np.float16).astype(np.float32)
    content.pca = (mean, components)
    path = write_map(content, tmp_path / 'm')
    assert np.load(path / 'pca_components.npy').dtype == np.float16
    loaded_mean, loaded_components = read_map(path).content.pca
    assert loaded_components.dtype == np.float32
    np.testing.assert_array_equal(loaded_components, components)
    np.testing.assert_array_equal(loaded_mean, mean)


def test_exact_map_stores_no_index_file_and_rebuilds_it_on_read(map_dir: Path) -> None:
    assert not (map_dir / 'index.faiss').exists()
    vpr_map = read_map(map_dir)
    assert vpr_map.manifest['index_type'] == 'flat'
    query = vpr_map.content.descriptors[3].astype(np.float32)
    assert vpr_map.index.search(query[None], 1)[1][0, 0] == 3


def test_ivf_index_is_stored_and_reloaded_with_its_search_settings(tmp_path: Path) -> None:
    config = MapBuildConfig(index=IndexConfig(approximate_above=10, ivf_nprobe=3))
    path = write_map(make_content(n=60, config=config), tmp_path / 'm')
    loaded = read_map(path)
    assert loaded.manifest['index_type'] == 'ivf' and loaded.index.nprobe == 3
    query = loaded.content.descriptors[7:8].astype(np.float32)
    assert loaded.index.search(query, 1)[1][0, 0] == 7


def test_read_map_rejects_corrupt_manifest(map_dir: Path) -> None:
    (map_dir / 'manifest.json').write_text('{not json')
    with pytest.raises(MapError, match='not valid JSON'):
        read_map(map_dir)


def test_read_map_rejects_unknown_config_key(map_dir: Path) -> None:
    manifest = json.loads((map_dir / 'manifest.json').read_text())
    manifest['build_config']['vlad.bogus'] = 1
    (map_dir / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(MapError, match='incomplete or invalid'):
        read_map(map_dir)


@pytest.mark.parametrize(
    ('key', 'value'),
    [
        ('num_clusters', None),  # None: the key is missing
        ('local_dim', None),
        ('num_images', None),
        ('descriptor_dim', None),
        ('build_config', None),
        ('frame_id', None),
        ('num_clusters', 'four'),
        ('local_dim', [8]),
        ('build_config', ['vlad.num_clusters']),
        ('extras', ['calibration']),
        ('extras', {'calibration': 3}),
    ],
)
def test_read_map_rejects_a_manifest_missing_or_garbling_a_field(
    map_dir: Path, key: str, value: object
) -> None:
    manifest = json.loads((map_dir / 'manifest.json').read_text())
    if value is None:
        del manifest[key]
    else:
        manifest[key] = value
    (map_dir / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(MapError, match=f'incomplete or invalid .*{key}'):
        read_map(map_dir)


def test_read_map_rejects_missing_descriptor_file(map_dir: Path) -> None:
    (map_dir / 'descriptors.npy').unlink()
    with pytest.raises(MapError, match='descriptors.npy is missing'):
        read_map(map_dir)


def test_read_map_rejects_corrupt_descriptor_file(map_dir: Path) -> None:
    (map_dir / 'descriptors.npy').write_bytes(b'garbage')
    with pytest.raises(MapError, match='descriptors.npy is corrupt'):
        read_map(map_dir)


def test_read_map_rejects_descriptors_of_the_wrong_shape(map_dir: Path) -> None:
    np.save(map_dir / 'descriptors.npy', np.zeros((12, 5), np.float16))
    with pytest.raises(MapError, match='inconsistent'):
        read_map(map_dir)


def test_read_map_rejects_pose_count_mismatch(map_dir: Path) -> None:
    lines = (map_dir / 'poses.csv').read_text().splitlines()
    (map_dir / 'poses.csv').write_text('\n'.join(lines[:-2]) + '\n')
    with pytest.raises(MapError, match='has 10 rows but the manifest says 12'):
        read_map(map_dir)


def test_read_map_rejects_invalid_pose_row(map_dir: Path) -> None:
    text = (map_dir / 'poses.csv').read_text().replace('img_3.png,3.0', 'img_3.png,abc', 1)
    (map_dir / 'poses.csv').write_text(text)
    with pytest.raises(MapError, match='line 5 is not a valid pose'):
        read_map(map_dir)


def test_read_map_rejects_pickled_arrays(map_dir: Path) -> None:
    np.save(map_dir / 'codebook.npy', np.array([{'a': 1}], dtype=object), allow_pickle=True)
    with pytest.raises(MapError, match='codebook.npy is corrupt'):
        read_map(map_dir)


def test_read_map_rejects_missing_approximate_index(tmp_path: Path) -> None:
    config = MapBuildConfig(index=IndexConfig(approximate_above=10))
    path = write_map(make_content(n=20, config=config), tmp_path / 'm')
    (path / 'index.faiss').unlink()
    with pytest.raises(MapError, match='index.faiss is missing'):
        read_map(path)


def test_query_backbone_must_match_the_map(map_dir: Path) -> None:
    vpr_map = read_map(map_dir)
    check_compatible(vpr_map, 'dense-rootsift')
    with pytest.raises(
        IncompatibleMapError,
        match="built with backbone 'dense-rootsift'.*--backbone dense-rootsift or rebuild",
    ):
        check_compatible(vpr_map, 'dinov2')
    with pytest.raises(IncompatibleMapError, match='features.image_size_px=240'):
        check_compatible(vpr_map, image_size_px=320)


def test_extras_are_added_atomically_and_read_back(map_dir: Path) -> None:
    write_extra(map_dir, 'calibration', {'weights': {'margin': 1.0}, 'bias': 0.0})
    write_extra(map_dir, 'embeddings', np.eye(3, dtype=np.float32))
    vpr_map = read_map(map_dir)
    assert vpr_map.read_extra_json('calibration')['bias'] == 0.0
    np.testing.assert_array_equal(vpr_map.read_extra_array('embeddings'), np.eye(3))
    assert vpr_map.read_extra_json('absent') is None


@pytest.mark.parametrize(
    'value', [{'a': object()}, np.array([object()], dtype=object)], ids=['json', 'npy']
)
def test_an_extra_that_cannot_be_serialised_leaves_the_map_as_it_was(
    map_dir: Path, value: object
) -> None:
    write_extra(map_dir, 'kept', {'bias': 0.0})
    before = sorted(p.name for p in map_dir.rglob('*'))
    with pytest.raises((TypeError, ValueError)):
        write_extra(map_dir, 'broken', value)
    assert sorted(p.name for p in map_dir.rglob('*')) == before
    assert read_map(map_dir).extra_path('broken') is None


def test_a_failed_file_write_leaves_no_temporary_file(
    map_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    write_extra(map_dir, 'kept', {'bias': 0.0})
    before = sorted(p.name for p in map_dir.rglob('*'))

    def disk_full(fd: int, mode: str) -> object:  # the temporary file exists: mkstemp made it
        os.close(fd)
        raise OSError('disk full')

    monkeypatch.setattr(os, 'fdopen', disk_full)
    with pytest.raises(OSError, match='disk full'):
        write_extra(map_dir, 'broken', {'bias': 1.0})
    monkeypatch.undo()
    assert sorted(p.name for p in map_dir.rglob('*')) == before


@pytest.mark.parametrize('failing_call', [1, 2])  # 1: the extra's rename, 2: the manifest's
def test_a_failed_rename_leaves_no_temporary_file(
    map_dir: Path, monkeypatch: pytest.MonkeyPatch, failing_call: int
) -> None:
    import os

    manifest = (map_dir / 'manifest.json').read_text()
    real_replace, calls = os.replace, []

    def replace(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == failing_call:
            raise OSError('disk full')
        real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', replace)
    with pytest.raises(OSError, match='disk full'):
        write_extra(map_dir, 'calibration', {'bias': 0.0})
    monkeypatch.undo()
    leftovers = [p.name for p in map_dir.rglob('*') if p.name.startswith('.')]  # temporaries
    assert leftovers == []
    assert (map_dir / 'manifest.json').read_text() == manifest


def test_extras_written_together_are_read_together_after_a_failed_write(
    map_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    write_extras(map_dir, {'labels': np.arange(3), 'meta': {'count': 3}})
    real_replace = os.replace

    def replace(src: object, dst: object) -> None:  # the new set's second file fails
        if Path(dst).name.startswith('meta.'):
            raise OSError('disk full')
        real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', replace)
    with pytest.raises(OSError, match='disk full'):
        write_extras(map_dir, {'labels': np.arange(5), 'meta': {'count': 5}})
    monkeypatch.undo()
    vpr_map = read_map(map_dir)
    assert vpr_map.read_extra_json('meta') == {'count': 3}  # the old set, both halves
    np.testing.assert_array_equal(vpr_map.read_extra_array('labels'), np.arange(3))

    written = write_extras(map_dir, {'labels': np.arange(5), 'meta': {'count': 5}})
    assert sorted((map_dir / 'extras').iterdir()) == sorted(written.values())  # no leftovers
    assert read_map(map_dir).read_extra_json('meta') == {'count': 5}


def test_an_extra_of_the_earlier_layout_is_read_and_replaced(map_dir: Path) -> None:
    import json

    (map_dir / 'extras').mkdir()
    (map_dir / 'extras' / 'calibration.json').write_text('{"bias": 1.0}')
    manifest = json.loads((map_dir / 'manifest.json').read_text())
    manifest['extras'] = {'calibration': 'extras/calibration.json'}
    (map_dir / 'manifest.json').write_text(json.dumps(manifest))
    assert read_map(map_dir).read_extra_json('calibration') == {'bias': 1.0}

    path = write_extra(map_dir, 'calibration', {'bias': 2.0})
    assert list((map_dir / 'extras').iterdir()) == [path]
    assert read_map(map_dir).read_extra_json('calibration') == {'bias': 2.0}


def test_corrupt_extra_is_reported_with_a_fix(map_dir: Path) -> None:
    path = write_extra(map_dir, 'calibration', {'bias': 0.0})
    path.write_text('{')
    with pytest.raises(MapError, match="extra 'calibration'.*unreadable"):
        read_map(map_dir).read_extra_json('calibration')


def test_map_info_reports_the_size_of_each_part(map_dir: Path) -> None:
    from vlm_vpr.cli import map_summary

    info = map_summary(map_dir)
    parts = info['size_mb']
    assert set(parts) == {'codebook', 'descriptors', 'manifest', 'poses', 'thumbnails'}
    assert parts['descriptors'] == round((map_dir / 'descriptors.npy').stat().st_size / 1e6, 3)
    assert info['thumbnails_mb'] == parts['thumbnails']
    sizes = {f.name: f.stat().st_size / 1e6 for f in map_dir.iterdir() if f.is_file()}
    fixed = sizes['codebook.npy']
    per_image = sum(sizes.values()) - fixed
    assert info['retrieval_mb_per_10k_images'] == pytest.approx(
        fixed + per_image * 10_000 / 12, abs=1e-3
    )
