"""DINOv2 extractor on tiny random-initialised models saved to disk and loaded by folder name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTModel,
)
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer

from vlm_vpr.backends.features import create_extractor, dinov2
from vlm_vpr.backends.features.dinov2 import Dinov2Extractor
from vlm_vpr.core.config import FeatureConfig, RuntimeConfig, VladConfig
from vlm_vpr.core.errors import ConfigError, ImageError
from vlm_vpr.core.images import read_image, resize_shorter_side
from vlm_vpr.core.vlad import aggregate_vlad, fit_codebook, l2_normalize

SIZE_PX = 56  # shorter side: 4 patches of 14 px
TINY = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    patch_size=14,
    image_size=SIZE_PX,
    initializer_range=0.3,
)  # large init: each block changes tokens


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never download: hub offline mode (the constant is read once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp('dinov2-tiny')
    Dinov2Model(Dinov2Config(**TINY)).save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def full_model(tiny_dir: Path) -> Dinov2Model:
    """The whole saved model, run the usual transformers way as the reference."""
    return Dinov2Model.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope='module')
def images() -> list[np.ndarray]:
    """Smoothed noise (neighbouring pixels correlate, as in photos) of several sizes."""
    import cv2

    rng = np.random.default_rng(0)
    return [
        cv2.GaussianBlur(rng.integers(0, 256, size, dtype=np.uint8), (0, 0), 2)
        for size in [(100, 150, 3), (80, 80, 3), (100, 150, 3), (120, 90, 3)]
    ]


def make(
    folder: Path,
    layer: int = 3,
    facet: str = 'token',
    dtype: str = 'float32',
    batch_size: int = 2,
    device: str = 'cpu',
    compile: bool = False,
    engine: str = 'torch',
) -> Dinov2Extractor:
    features = FeatureConfig(
        backbone='dinov2',
        dinov2_model=str(folder),
        dinov2_layer=layer,
        dinov2_facet=facet,
        image_size_px=SIZE_PX,
    )
    runtime = RuntimeConfig(
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        num_threads=1,
        compile=compile,
        engine=engine,
    )
    return Dinov2Extractor(features, runtime)


FAST = [
    ('torch', 'bfloat16'),
    ('torch', 'int8'),
    ('openvino', 'float32'),
    ('openvino', 'bfloat16'),
    ('openvino', 'int8'),
]  # (engine, dtype) beside torch float32


def hand_pixels(image_bgr: np.ndarray) -> torch.Tensor:
    """[1 x 3 x H x W] RGB input normalised with the ImageNet mean and std, written out here."""
    rgb = resize_shorter_side(image_bgr, SIZE_PX, multiple=14)[:, :, ::-1] / 255.0
    normalised = (rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(normalised.transpose(2, 0, 1).copy()).float()[None]


def unit_patch_grid(tokens: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """[rows x cols x D] unit rows from [1 x T x D] tokens whose last rows*cols are patches."""
    patches = tokens[0, -rows * cols :].detach().numpy()
    return l2_normalize(patches).reshape(rows, cols, -1)


def test_extract_returns_a_unit_norm_patch_grid_per_image_in_input_order(tiny_dir, images):
    features = FeatureConfig(
        backbone='dinov2', dinov2_model=str(tiny_dir), dinov2_layer=2, image_size_px=SIZE_PX
    )
    extractor = create_extractor(features, RuntimeConfig(batch_size=2, num_threads=1))
    out = extractor.extract(images)
    # shorter side 56 px, longer side scaled and rounded down to 14 px: 150 -> 84, 120 -> 70
    assert [f.descriptors.shape for f in out] == [(4, 6, 32), (4, 4, 32), (4, 6, 32), (5, 4, 32)]
    for f in out:
        assert f.descriptors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=-1), 1.0, atol=1e-5)
    alone = extractor.extract([images[2]])[0].descriptors
    np.testing.assert_allclose(out[2].descriptors, alone, atol=1e-5)
    assert not np.allclose(out[0].descriptors, out[2].descriptors, atol=1e-2)
    assert extractor.extract([]) == []


def test_extract_rejects_a_thin_strip_instead_of_scaling_it_up(tiny_dir):
    features = FeatureConfig(
        backbone='dinov2', dinov2_model=str(tiny_dir), dinov2_layer=2, image_size_px=SIZE_PX
    )
    extractor = create_extractor(features, RuntimeConfig(num_threads=1))
    with pytest.raises(ImageError, match='2x100 is 50:1, beyond the 8:1 aspect ratio limit'):
        extractor.extract([np.zeros((100, 2, 3), np.uint8)])


@pytest.mark.parametrize('layer', [1, 3])
def test_token_facet_equals_the_full_model_hidden_state_of_the_chosen_layer(
    tiny_dir, full_model, images, layer
):
    got = make(tiny_dir, layer=layer).extract([images[0]])[0].descriptors
    with torch.no_grad():
        hidden = full_model(hand_pixels(images[0]), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(got, unit_patch_grid(hidden[layer], 4, 6), atol=1e-4)
    for other in (layer - 1, layer + 1):  # neighbouring layers differ: the check can fail
        assert not np.allclose(got, unit_patch_grid(hidden[other], 4, 6), atol=1e-2)


def test_extract_feeds_the_model_rgb_normalised_with_imagenet_mean_and_std(
    tiny_dir, full_model, images
):
    got = make(tiny_dir, layer=4).extract([images[1]])[0].descriptors
    pixels = hand_pixels(images[1])
    with torch.no_grad():
        expected = full_model(pixels, output_hidden_states=True).hidden_states[4]
        as_bgr = full_model(pixels.flip(1), output_hidden_states=True).hidden_states[4]
        unnormalised = full_model(pixels * 0.229 + 0.485, output_hidden_states=True)
    np.testing.assert_allclose(got, unit_patch_grid(expected, 4, 4), atol=1e-4)
    assert not np.allclose(got, unit_patch_grid(as_bgr, 4, 4), atol=1e-2)
    assert not np.allclose(got, unit_patch_grid(unnormalised.hidden_states[4], 4, 4), atol=1e-2)


@pytest.mark.parametrize('facet', ['key', 'query', 'value'])
def test_attention_facets_equal_the_projection_captured_in_the_full_model(
    tiny_dir, full_model, images, facet
):
    layer = 3
    projection = getattr(full_model.encoder.layer[layer - 1].attention, f'{facet[0]}_proj')
    captured = []
    handle = projection.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        full_model(hand_pixels(images[3]))
    handle.remove()
    got = make(tiny_dir, layer=layer, facet=facet).extract([images[3]])[0].descriptors
    np.testing.assert_allclose(got, unit_patch_grid(captured[0], 5, 4), atol=1e-4)


@pytest.mark.parametrize(('facet', 'blocks_run'), [('token', 3), ('value', 2)])
def test_forward_pass_stops_at_the_chosen_layer(tiny_dir, images, monkeypatch, facet, blocks_run):
    extractor = make(tiny_dir, layer=3, facet=facet)
    calls = []
    block_forward = Dinov2Layer.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(self)
        return block_forward(self, *args, **kwargs)

    monkeypatch.setattr(Dinov2Layer, 'forward', counting_forward)
    extractor.extract([images[0]])
    assert len(calls) == blocks_run  # of 4; a value facet runs only LayerNorm + v_proj of block 3


@pytest.mark.parametrize('engine', ['torch', 'openvino'])
def test_register_tokens_are_dropped_from_the_patch_grid(tmp_path, images, engine):
    torch.manual_seed(1)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY, num_register_tokens=4))
    model.save_pretrained(tmp_path)
    got = make(tmp_path, layer=2, engine=engine).extract([images[0]])[0].descriptors
    with torch.no_grad():
        hidden = model.eval()(hand_pixels(images[0]), output_hidden_states=True).hidden_states
    assert hidden[2].shape[1] == 1 + 4 + 4 * 6  # CLS, 4 registers, patches
    np.testing.assert_allclose(got, unit_patch_grid(hidden[2], 4, 6), atol=1e-4)


@pytest.mark.parametrize(('engine', 'dtype'), FAST)
def test_fast_runtimes_keep_descriptors_close_to_float32(tiny_dir, images, engine, dtype):
    reference = make(tiny_dir, facet='value', dtype='float32').extract(images)
    fast = make(tiny_dir, facet='value', dtype=dtype, engine=engine).extract(images)
    # Soft assignment (eq. 1): with hard assignment one of these ~20 random-weight patches
    # moving to the next centre changes the VLAD cosine by ~0.1 however small its error is
    # (OpenVINO int8: patch cosine 0.9995, VLAD cosine 0.90 on one image); the top-1 test
    # below checks the hard-assignment retrieval.
    vlad = VladConfig(num_clusters=8, soft_assignment=True)
    codebook = fit_codebook([f.flat for f in reference], vlad)  # as a map build fits it
    for ref, got in zip(reference, fast):
        patch_cosine = (ref.flat * got.flat).sum(axis=1)
        assert patch_cosine.min() >= 0.999
        vlad_cosine = aggregate_vlad(ref.flat, codebook, vlad) @ aggregate_vlad(
            got.flat, codebook, vlad
        )
        assert vlad_cosine >= 0.995
    if (engine, dtype) != ('openvino', 'float32'):  # float32 may match to the last bit
        assert not np.array_equal(reference[0].descriptors, fast[0].descriptors)


def test_compiled_int8_forward_keeps_descriptors_close_to_eager_int8(tiny_dir, images):
    same_size = [images[0], images[2]]  # one input size: one compilation (15-30 s)
    eager = make(tiny_dir, facet='value', dtype='int8').extract(same_size)
    extractor = make(tiny_dir, facet='value', dtype='int8', compile=True)
    assert extractor._net.__class__.__name__ == 'OptimizedModule'
    for ref, got in zip(eager, extractor.extract(same_size)):
        assert (ref.flat * got.flat).sum(axis=1).min() >= 0.999


def test_openvino_engine_compiles_each_input_shape_once_and_matches_torch(
    tiny_dir, images, full_model
):
    extractor = make(tiny_dir, layer=2, facet='value', engine='openvino', batch_size=2)
    first = extractor.extract(images)  # 3 sizes; the two 100x150 images share a batch of 2
    assert sorted(extractor._net._compiled) == [(1, 3, 56, 56), (1, 3, 70, 56), (2, 3, 56, 84)]
    again = extractor.extract(images)
    assert len(extractor._net._compiled) == 3
    captured = []
    hook = full_model.encoder.layer[1].attention.v_proj.register_forward_hook(
        lambda module, args, out: captured.append(out)
    )
    try:
        for image, got, repeat in zip(images, first, again):
            with torch.no_grad():
                full_model(hand_pixels(image))
            rows, cols = got.descriptors.shape[:2]
            np.testing.assert_allclose(
                got.descriptors, unit_patch_grid(captured.pop(), rows, cols), atol=1e-4
            )
            np.testing.assert_array_equal(got.descriptors, repeat.descriptors)
    finally:
        hook.remove()


def test_openvino_int8_runs_every_linear_layer_with_int8_weights(tiny_dir, images):
    extractor = make(tiny_dir, layer=3, facet='value', engine='openvino', dtype='int8')
    extractor.extract(images[:1])
    (request,) = extractor._net._compiled.values()
    products = [
        op.get_rt_info()['runtimePrecision'].astype(str)
        for op in request.get_compiled_model().get_runtime_model().get_ordered_ops()
        if op.get_rt_info()['layerType'].astype(str) == 'FullyConnected'
    ]
    assert products == ['i8'] * (2 * 6 + 1)  # q, k, v, o, MLP in, out of 2 blocks + last v


@pytest.mark.parametrize(
    ('runtime', 'message'),
    [
        (dict(engine='onnx'), 'runtime.engine must be one of'),
        (dict(engine='openvino', device='cuda'), "'openvino' runs on the CPU"),
        (dict(engine='openvino', compile=True), 'applies to runtime.engine'),
    ],
)
def test_impossible_engine_settings_are_rejected(runtime, message):
    with pytest.raises(ConfigError, match=message):
        RuntimeConfig(**runtime)


def test_openvino_engine_without_the_package_says_how_to_install_it(tiny_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, 'openvino', None)  # import openvino raises ImportError
    with pytest.raises(ConfigError, match='pip install --no-deps openvino'):
        make(tiny_dir, engine='openvino')


def test_openvino_is_installed_without_its_telemetry_package():
    import importlib.util

    assert importlib.util.find_spec('openvino') is not None
    assert importlib.util.find_spec('openvino_telemetry') is None  # see requirements-openvino


def test_layer_beyond_the_model_depth_is_rejected(tiny_dir):
    with pytest.raises(ConfigError, match=r'dinov2_layer is 5 but .* has only 4 layers'):
        make(tiny_dir, layer=5)


def test_missing_model_folder_is_rejected_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match='folder .*no-such-model.* does not exist: set .*folder'):
        make(tmp_path / 'no-such-model')


def test_hub_id_not_in_the_offline_cache_is_rejected_with_the_fix():
    with pytest.raises(ConfigError, match='cannot load the DINOv2 config .*HF_HUB_OFFLINE'):
        make(Path('vlm-vpr-test/no-such-model'))


def test_model_folder_without_weights_is_rejected(tiny_dir, tmp_path):
    (tmp_path / 'config.json').write_text((tiny_dir / 'config.json').read_text())
    with pytest.raises(ConfigError, match='cannot load the DINOv2 weights'):
        make(tmp_path)


def test_a_model_that_is_not_dinov2_is_rejected(tmp_path):
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
    )
    ViTModel(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="is a 'vit' model, not DINOv2"):
        make(tmp_path)


def test_int8_on_cuda_is_rejected(tiny_dir):
    with pytest.raises(ConfigError, match="'int8' runs on the CPU only"):
        make(tiny_dir, dtype='int8', device='cuda')


def test_int8_runs_every_linear_layer_as_one_int8_product(tiny_dir, images, monkeypatch):
    extractor = make(tiny_dir, layer=3, facet='value', dtype='int8')
    calls = []
    int_mm = torch._int_mm

    def counting_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append((a.dtype, b.dtype))
        return int_mm(a, b)

    monkeypatch.setattr(torch, '_int_mm', counting_int_mm)
    extractor.extract([images[0]])
    # blocks 1-2: fused q/k/v, output projection, fc1, fc2; block 3: v_proj only
    assert calls == [(torch.int8, torch.int8)] * (2 * 4 + 1)


@pytest.mark.parametrize(('engine', 'dtype'), FAST)
def test_fast_runtimes_keep_the_float32_top1_on_gardens_point(tiny_dir, data_root, engine, dtype):
    folder = data_root / 'gardens_point'
    names = [f'Image{i:03d}.jpg' for i in (5, 60, 120, 180)]
    database = [read_image(folder / 'day_left' / 'images' / n) for n in names]
    queries = [read_image(folder / 'day_right' / 'images' / n) for n in names]
    vlad = VladConfig(num_clusters=8, soft_assignment=False)
    top1, codebook = {}, None
    for name, extractor in [
        ('reference', make(tiny_dir, facet='value')),
        ('fast', make(tiny_dir, facet='value', dtype=dtype, engine=engine)),
    ]:
        db_local = [f.flat for f in extractor.extract(database)]
        if codebook is None:  # fitted on the float32 map, as a map build with float32 does
            codebook = fit_codebook(db_local, vlad)
        db = np.stack([aggregate_vlad(x, codebook, vlad) for x in db_local])
        query = np.stack(
            [aggregate_vlad(f.flat, codebook, vlad) for f in extractor.extract(queries)]
        )
        top1[name] = (query @ db.T).argmax(axis=1).tolist()
    assert top1['fast'] == top1['reference']


@pytest.mark.parametrize(
    ('cpuinfo', 'expected'),
    [
        ('flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n', 'bfloat16'),
        ('flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n', 'bfloat16'),
        ('Features\t: fp asimd bf16 i8mm\n', 'bfloat16'),  # Arm
        ('flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n', 'float32'),
        (None, 'float32'),  # no /proc/cpuinfo
    ],
)
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it_natively(
    tmp_path, monkeypatch, cpuinfo, expected
):
    path = tmp_path / 'cpuinfo'
    if cpuinfo is not None:
        path.write_text('processor\t: 0\n' + cpuinfo)
    monkeypatch.setattr(dinov2, 'CPUINFO', path)
    assert dinov2.resolve_dtype(RuntimeConfig()) == expected  # the default is 'auto'
    assert dinov2.resolve_dtype(RuntimeConfig(dtype='float32')) == 'float32'
    assert dinov2.resolve_dtype(RuntimeConfig(dtype='int8')) == 'int8'


def test_auto_dtype_on_cuda_asks_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for supported, expected in ((True, 'bfloat16'), (False, 'float32')):
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda s=supported: s)
        assert dinov2.resolve_dtype(RuntimeConfig(device='cuda')) == expected
