"""`make bench`: every speed, size and memory figure of issue 5 in one table, targets beside.

    .venv/bin/python benchmarks/bench.py --data ../shared/data [--quick] [--max-map-size N]
        [--skip PART ...] [--backbones NAME ...] [--anyloc NAME ...] [--runs N] ...

Parts (skip any with ``--skip``):
  frame   per frame, JPEG bytes in -> pose prior out through the real Localizer on a
          ``--map-images`` (10k) image map, per backbone; and the map-build throughput
  anyloc  DINOv2 descriptor time (layer 10 value facet, 32 clusters, batch 1) against the
          AnyLoc reference times of issue 5, and the fast runtimes' cosine to float32. Our
          descriptor uses soft assignment (eq. 1); the cosine under AnyLoc's hard assignment
          is printed beside: with random weights it is set by single patches that move to
          another centre (about 1/K each), not by the size of the arithmetic error
  search  exact and approximate (IVF, HNSW) top-100 search from 1k to ``--max-map-size``
          images in ``--search-dim`` dimensions: latency, build time, recall@100 against exact
          search
  memory  map size per 10k images (default config) and the resident memory of a process that
          holds a ``--memory-map-size`` (100k) image map in a Localizer
  rerank  VLM calls and time per query of the descriptions re-ranker (benchmarks/bench_rerank.py)
  node    image receipt -> pose publish inside the ROS node (vlm_vpr.ros.demo_replay)

``--engines`` (default torch and openvino) runs the ``--dtypes`` on each engine
(runtime.engine); float32 is the torch reference.

Timings use 2 threads (torch, OpenVINO, OpenMP, faiss, OpenCV): the median and 95th
percentile of warm repeated calls after 2 warm-up calls. DINOv2 has random weights (same
compute as real ones), built from the real ViT-S/14 or ViT-B/14 configuration, saved and
loaded by folder path.

Large maps are made from a real map of the first ``--build-images`` (at most vlad.pca_dim)
Gardens Point day_left images: each map row is one real image's VLAD vector plus Gaussian
noise, re-normalised. The noise makes two copies of one image as similar as adjacent real
map images are (median cosine c of neighbours: copy-to-original cosine sqrt(c)). PCA (the
default vlad.pca_dim, 512, which a real map fits only above 512 images) is fitted on 1100
such copies. Search sets replicate the real images' descriptors the same way after a PCA to
``--search-dim`` (1024, the issue's figure) fitted on 1100 copies; queries are real day_right
images. The full search part (1k to 1M images, 1024-d, exact and IVF) takes about 6 min and
6 GB RAM on 2 cores; ``--approximate ivf hnsw`` adds HNSW, whose 1M build alone takes
about 16 min.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THREADS = 2
for _variable in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
    os.environ.setdefault(_variable, str(THREADS))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
START = time.perf_counter()

import numpy as np  # noqa: E402
from bench_dinov2 import (  # noqa: E402
    ANYLOC_MS,
    random_dinov2,
    runtimes,
    square_crops,
    time_ms,
)

from vlm_vpr.backends.features.dinov2 import normalized_pixels, resolve_dtype  # noqa: E402
from vlm_vpr.core.config import (  # noqa: E402
    APPROXIMATE_INDEX_TYPES,
    ENGINES,
    RUNTIME_DTYPES,
    FeatureConfig,
    IndexConfig,
    LocalizerConfig,
    MapBuildConfig,
    RuntimeConfig,
    VladConfig,
)
from vlm_vpr.core.datasets import default_data_root, read_traversal  # noqa: E402
from vlm_vpr.core.images import decode_image, read_image, resize_shorter_side  # noqa: E402
from vlm_vpr.core.localizer import Localizer  # noqa: E402
from vlm_vpr.core.map_build import build_map  # noqa: E402
from vlm_vpr.core.map_format import (  # noqa: E402
    MapContent,
    read_map,
    write_map,
)
from vlm_vpr.core.retrieval import build_index, search  # noqa: E402
from vlm_vpr.core.vlad import (  # noqa: E402
    aggregate_vlad,
    apply_pca,
    fit_codebook,
    fit_pca,
    l2_normalize,
)

PARTS = ('frame', 'anyloc', 'search', 'memory', 'rerank', 'node')
SECTIONS = {
    1: 'Per frame: JPEG in -> pose prior out (Localizer, replicated map)',
    2: 'DINOv2 descriptor vs AnyLoc (layer 10 value, 32 clusters, batch 1; ours soft-assigned)',
    3: 'Search: top-100 over float16 descriptors, one query at a time',
    4: 'Map build throughput (Gardens Point day_left, 960x540 JPEG)',
    5: 'Map size and memory (default configuration: dense RootSIFT)',
    6: 'VLM re-ranking cost (descriptions re-ranker, stand-in VLM)',
    7: 'ROS node',
}
BACKBONES = {  # name: (DINOv2 architecture in ARCHITECTURES, or None = dense RootSIFT; px)
    'rootsift': (None, FeatureConfig().image_size_px),
    'S224': ('S', 224),
    'S322': ('S', 322),
    'B224': ('B', 224),
}
FRAME_TARGET_P95_MS = {'rootsift': 150.0, 'S224': 80.0, 'B224': 200.0}  # rootsift: extract+VLAD
BUILD_TARGET_IMAGES_S = {'rootsift': 4.0, 'S224': 8.0}
COSINE_TARGET = 0.995  # fast dtypes' descriptor against float32
DEFAULT_DTYPE = resolve_dtype(RuntimeConfig())  # what runtime.dtype 'auto' picks on this machine
ANYLOC_NAMES = {f'{arch}{px}': (arch, px) for arch, px in ANYLOC_MS}
SEARCH_SIZES = (1_000, 10_000, 100_000, 1_000_000)
SEARCH_K = 100
EXACT_TARGET_MS, EXACT_TARGET_SIZE = 10.0, 100_000
APPROX_TARGET_MS, APPROX_TARGET_RECALL, APPROX_TARGET_SIZE = 10.0, 0.95, 1_000_000
APPROX_TARGET = f'<= {APPROX_TARGET_MS:.0f} ms, recall >= {APPROX_TARGET_RECALL}'
MAP_MB_PER_10K_TARGET = 40.0
RSS_MB_TARGET = 1000.0
PCA_FIT_ROWS = 1100  # replicated rows the PCA of a large map is fitted on (> pca_dim)
FRAME_IMAGES = 8  # distinct query frames cycled through in the per-frame timing
# (full run, --quick) defaults of the size options
DEFAULTS = {
    'runs': (30, 8),
    'build_images': (200, 24),
    'map_images': (10_000, 2_000),
    'max_map_size': (1_000_000, 10_000),
    'memory_map_size': (100_000, 20_000),
    'queries': (50, 10),
    'photos': (8, 4),
    'rerank_queries': (3, 1),
    'node_frames': (20, 5),
    'backbones': (list(BACKBONES), ['rootsift', 'S224']),
    'anyloc': (list(ANYLOC_NAMES), ['S224']),
}
RSS_CHILD = """
import sys
from vlm_vpr.core.images import read_image
import time
from vlm_vpr.core.localizer import Localizer
from vlm_vpr.core.map_format import read_map
start = time.perf_counter()
vpr_map = read_map(sys.argv[1])
load_s = time.perf_counter() - start
localizer = Localizer(vpr_map)  # held while the memory is read
localizer.localize(read_image(sys.argv[2]))
status = dict(line.split(':', 1) for line in open('/proc/self/status'))
print(int(status['VmRSS'].split()[0]) * 1024 / 1e6, int(status['VmHWM'].split()[0]) * 1024 / 1e6,
      load_s)
"""


@dataclass
class Row:
    """One line of the table; ``ok`` is None where the figure has no target."""

    section: int
    figure: str
    measured: str
    target: str = ''
    ok: bool | None = None


class Workspace:
    """Models and maps the parts share, made once on first use under ``root``."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self._made: dict[str, Any] = {}

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def dinov2_folder(self, arch: str) -> str:
        """A random-weight DINOv2 of the real ViT-``arch``/14 architecture, saved to a folder."""

        def make() -> str:
            folder = self.root / f'dinov2_vit{arch.lower()}14'
            random_dinov2(arch).save_pretrained(folder)
            return str(folder)

        return self._once(f'dinov2 {arch}', make)

    def features(self, backbone: str) -> FeatureConfig:
        arch, size_px = BACKBONES[backbone]
        if arch is None:
            return FeatureConfig(image_size_px=size_px)
        return FeatureConfig(
            backbone='dinov2', dinov2_model=self.dinov2_folder(arch), image_size_px=size_px
        )

    def real_map(self, backbone: str, dtype: str = 'float32') -> tuple[Path, float]:
        """(map folder, build seconds) from the first ``--build-images`` day_left images,
        DINOv2 computed in ``dtype``."""
        name = backbone if dtype == 'float32' else f'{backbone}_{dtype}'

        def make() -> tuple[Path, float]:
            traversal = read_traversal(self.args.data / 'gardens_point' / 'day_left')
            count = min(self.args.build_images, len(traversal))
            config = MapBuildConfig(
                features=self.features(backbone),
                runtime=RuntimeConfig(num_threads=THREADS, dtype=dtype),
            )
            note(f'building a {count}-image {name} map')
            start = time.perf_counter()
            path = build_map(
                [p.name for p in traversal.image_paths[:count]],
                [traversal.pose(i) for i in range(count)],
                lambda i: read_image(traversal.image_paths[i]),
                self.root / f'real_{name}',
                config,
                progress=False,
            )
            return path, time.perf_counter() - start

        return self._once(f'real {name}', make)

    def big_map(self, backbone: str) -> Path:
        """The ``--map-images`` map replicated from ``real_map`` (thumbnails for rootsift)."""
        return self._once(
            f'big {backbone}',
            lambda: write_replicated_map(
                self.real_map(backbone)[0],
                self.root / f'big_{backbone}',
                self.args.map_images,
                thumbnails=backbone == 'rootsift',
            ),
        )


def note(message: str) -> None:
    print(f'[bench {time.perf_counter() - START:6.0f} s] {message}', file=sys.stderr, flush=True)


def replication_noise(descriptors: np.ndarray) -> float:
    """Noise norm that makes two copies of one row as similar as adjacent rows are.

    ``descriptors`` [N x D] (L2-normalised, N >= 2) in map order; with c the median cosine of
    rows i and i+1, a copy (row + noise, re-normalised) has cosine sqrt(c) to its row and about
    c to another copy of it.
    """
    rows = np.asarray(descriptors, dtype=np.float32)
    adjacent = float(np.clip(np.median((rows[:-1] * rows[1:]).sum(axis=1)), 0.05, 0.999))
    return float(np.sqrt(1.0 / adjacent - 1.0))


def replicate(
    base: np.ndarray,
    count: int,
    noise: float,
    seed: int,
    project: Callable[[np.ndarray], np.ndarray] | None = None,
    chunk_rows: int = 16384,
) -> np.ndarray:
    """[count x D'] float16, L2-normalised: row i is ``base[i % N]`` plus isotropic Gaussian
    noise of expected norm ``noise``, re-normalised, then mapped by ``project`` ([n x D] ->
    [n x D'] float32, e.g. a PCA). ``base`` is [N x D] L2-normalised; memory stays bounded."""
    rng = np.random.default_rng(seed)
    base = np.asarray(base, dtype=np.float32)
    out = None
    for start in range(0, count, chunk_rows):
        rows = base[np.arange(start, min(count, start + chunk_rows)) % len(base)]
        rows = l2_normalize(
            rows
            + rng.standard_normal(rows.shape, dtype=np.float32)
            * np.float32(noise / np.sqrt(base.shape[1]))
        )
        rows = project(rows) if project is not None else rows
        if out is None:
            out = np.empty((count, rows.shape[1]), dtype=np.float16)
        out[start : start + len(rows)] = rows
    return out


def write_replicated_map(
    real_dir: Path,
    out_dir: Path,
    count: int,
    thumbnails: bool,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """A ``count``-image map whose rows are noisy copies of a small real map's (see module doc).

    The real map must be small enough to hold raw VLAD vectors (no PCA); the copy gets the
    real map's codebook and build config, ``pca`` (mean, components) or else a PCA fitted on
    ``PCA_FIT_ROWS`` copies when ``count`` exceeds ``vlad.pca_dim``, each copied image's pose
    and, if asked, its thumbnail.
    """
    real = read_map(real_dir, load_index=False)
    content = real.content
    vlads = content.descriptors.astype(np.float32)  # [N x K*D_local]: no PCA below pca_dim
    noise = replication_noise(vlads)
    note(f'replicating {real_dir.name} ({len(vlads)} x {vlads.shape[1]}) to {count} images')
    if pca is None:
        pca = fit_pca(
            replicate(vlads, min(count, PCA_FIT_ROWS), noise, seed=1), real.build_config.vlad
        )
    descriptors = replicate(
        vlads, count, noise, seed=2, project=(lambda rows: apply_pca(rows, *pca)) if pca else None
    )
    n = len(vlads)
    jpegs = None
    if thumbnails:
        jpegs = [(real.path / 'thumbnails' / f'{i:06d}.jpg').read_bytes() for i in range(n)]
    copy = MapContent(
        real.build_config,
        content.codebook,
        descriptors,
        [f'{i:07d}_{content.image_names[i % n]}' for i in range(count)],
        [content.poses[i % n] for i in range(count)],
        pca,
        [jpegs[i % n] for i in range(count)] if jpegs else None,
        f'{count} noisy copies of {real_dir}',
    )
    return write_map(copy, out_dir)


def dtype_label(dtype: str) -> str:
    """A DINOv2 dtype, marked where it is what the default runtime.dtype 'auto' picks here."""
    return f'{dtype} (the default here)' if dtype == DEFAULT_DTYPE else dtype


def stats(values_ms: Any) -> str:
    return f'median {np.median(values_ms):.1f} ms, p95 {np.percentile(values_ms, 95):.1f} ms'


def count_label(n: int) -> str:
    for unit, name in ((1_000_000, 'M'), (1_000, 'k')):
        if n >= unit and n % unit == 0:
            return f'{n // unit}{name}'
    return str(n)


# ---- part: frame (sections 1 and 4) ----------------------------------------------------------


def frame_rows(ws: Workspace) -> list[Row]:
    rows = []
    for backbone in ws.args.backbones:
        target = BUILD_TARGET_IMAGES_S.get(backbone)
        dinov2 = BACKBONES[backbone][0] is not None
        timed_dtypes = ['float32', *(ws.args.dtypes if dinov2 and target else [])]
        for dtype in timed_dtypes:
            map_dir, build_s = ws.real_map(backbone, dtype)
            count = len(read_map(map_dir, load_index=False))
            rows.append(
                Row(
                    4,
                    f'map build, {backbone_label(backbone)}, {count} images '
                    f'({dtype_label(dtype) if dinov2 else dtype}, '
                    'batch 8, codebook + thumbnails + write)',
                    f'{count / build_s:.1f} images/s ({build_s:.0f} s)',
                    f'>= {target:.0f} images/s' if target else '',
                    count / build_s >= target if target else None,
                )
            )
        rows.extend(per_frame_rows(ws, backbone))
    return rows


def dinov2_runtimes(args: argparse.Namespace) -> list[tuple[str, RuntimeConfig]]:
    """(label, batch-1 runtime) of float32 and each ``--dtypes`` value (and compiled ones)."""
    return runtimes(args.dtypes, args.compile, THREADS, args.engines)


def backbone_label(backbone: str) -> str:
    arch, size_px = BACKBONES[backbone]
    if arch is None:
        return f'dense RootSIFT {size_px} px'
    return f'DINOv2 ViT-{arch}/14 {size_px} px'


def per_frame_rows(ws: Workspace, backbone: str) -> list[Row]:
    """Decode + Localizer.localize on the big map, one row per runtime dtype."""
    import cv2

    vpr_map = read_map(ws.big_map(backbone))
    day_right = read_traversal(ws.args.data / 'gardens_point' / 'day_right')
    dinov2 = BACKBONES[backbone][0] is not None
    if dinov2:  # square frames: 224 px gives 16 x 16 patches, the 12.2 GFLOP of issue 5
        crops = square_crops(day_right.image_paths[0].parent, FRAME_IMAGES)
        jpegs = [cv2.imencode('.jpg', crop)[1].tobytes() for crop in crops]
        frame = f'{crops[0].shape[1]}x{crops[0].shape[0]} JPEG'
    else:
        jpegs = [p.read_bytes() for p in day_right.image_paths[:FRAME_IMAGES]]
        frame = 'Gardens Point 960x540 JPEG'
    dim = f'{vpr_map.content.codebook.size}-d VLAD -> {vpr_map.content.descriptors.shape[1]}-d'
    rows = []
    for dtype, runtime in dinov2_runtimes(ws.args) if dinov2 else dinov2_runtimes(ws.args)[:1]:
        note(f'per frame: {backbone} {dtype}')
        localizer = Localizer(vpr_map, LocalizerConfig(runtime=runtime))
        stages = []
        frames = itertools.cycle(jpegs)

        def per_frame(
            _: object,
            localizer: Localizer = localizer,
            stages: list[dict[str, float]] = stages,
            frames: Any = frames,
        ) -> None:
            start = time.perf_counter()
            image = decode_image(next(frames))
            decode_ms = (time.perf_counter() - start) * 1000.0
            stages.append({'decode': decode_ms, **localizer.localize(image).timing_ms})

        median, p95, _ = time_ms(per_frame, None, ws.args.runs)
        stages = stages[2:]  # time_ms warms up with two calls
        breakdown = ', '.join(
            f'{k} {np.median([s[k] for s in stages]):.1f}'
            for k in ('decode', 'extract', 'aggregate', 'search', 'fuse')
        )
        label = (
            f'{backbone_label(backbone)}{", " + dtype_label(dtype) if dinov2 else ""}: '
            f'{frame}, '
            f'{count_label(len(vpr_map))}-image map ({dim})'
        )
        measured = f'total median {median:.1f} ms, p95 {p95:.1f} ms (stage medians: {breakdown})'
        target = FRAME_TARGET_P95_MS.get(backbone)
        if dinov2:
            rows.append(
                Row(
                    1,
                    label,
                    measured,
                    f'p95 <= {target:.0f} ms' if target else '',
                    p95 <= target if target else None,
                )
            )
        else:
            extract_vlad = [s['extract'] + s['aggregate'] for s in stages]
            rows.append(
                Row(
                    1,
                    label,
                    f'extract + VLAD {stats(extract_vlad)}; {measured}',
                    f'extract + VLAD <= {target:.0f} ms',
                    float(np.percentile(extract_vlad, 95)) <= target,
                )
            )
    return rows


# ---- part: anyloc (section 2) ----------------------------------------------------------------


def anyloc_rows(ws: Workspace) -> list[Row]:
    from vlm_vpr.backends.features import create_extractor
    from vlm_vpr.core.threads import limit_threads

    limit_threads(THREADS, blas_threads=1)  # as the Localizer does

    # our descriptor: soft assignment (eq. 1); AnyLoc's hard assignment is shown beside it
    vlad = VladConfig(num_clusters=32, soft_assignment=True)
    hard = VladConfig(num_clusters=32, soft_assignment=False)
    crops = square_crops(ws.args.data / 'gardens_point' / 'day_left' / 'images', ws.args.photos)
    rows = []
    for name in ws.args.anyloc:
        arch, size_px = ANYLOC_NAMES[name]
        features = FeatureConfig(
            backbone='dinov2',
            dinov2_model=ws.dinov2_folder(arch),
            dinov2_layer=10,
            dinov2_facet='value',
            image_size_px=size_px,
        )
        photos = [resize_shorter_side(crop, size_px) for crop in crops]
        timing, locals_ = {}, {}
        for dtype, runtime in dinov2_runtimes(ws.args):
            note(f'AnyLoc comparison: {name} {dtype}')
            extractor = create_extractor(features, runtime)
            locals_[dtype] = [f.flat for f in extractor.extract(photos)]
            if dtype == 'float32':  # the codebook a float32 map build would fit
                codebook = fit_codebook(locals_[dtype], vlad)

            def describe(
                photo: np.ndarray, extractor: Any = extractor, codebook: np.ndarray = codebook
            ) -> np.ndarray:
                return aggregate_vlad(extractor.extract([photo])[0].flat, codebook, vlad)

            timing[dtype] = time_ms(describe, photos[0], ws.args.runs)[:2]
        reference_ms = ANYLOC_MS[(arch, size_px)]
        full_ms = time_full_forward(
            ws.dinov2_folder(arch), photos[0], codebook, hard, ws.args.runs
        )
        cosines = {}  # assignment -> dtype -> cosine to float32 per photo
        for assignment, config in (('soft', vlad), ('hard', hard)):
            vlads = {d: [aggregate_vlad(x, codebook, config) for x in locals_[d]] for d in locals_}
            cosines[assignment] = {
                d: [float(a @ b) for a, b in zip(vlads['float32'], vlads[d])] for d in vlads
            }
        # the target counts only descriptors within cosine 0.995 of float32 (float32 itself)
        faithful = [d for d in timing if min(cosines['soft'][d]) >= COSINE_TARGET]
        fastest = min(faithful, key=lambda d: timing[d][0])
        spread = '; '.join(
            f'{d} {timing[d][0]:.1f} ({timing[d][0] / reference_ms:.2f}x'
            f'{"" if d in faithful else ", cosine too low"})'
            for d in timing
            if d != fastest
        )
        rows.append(
            Row(
                2,
                f'ViT-{arch}/14 {size_px}x{size_px} descriptor, median vs AnyLoc {reference_ms} '
                f'ms (fastest within cosine {COSINE_TARGET} of float32)',
                f'{fastest} {timing[fastest][0]:.1f} ms = '
                f'{timing[fastest][0] / reference_ms:.2f}x (p95 {timing[fastest][1]:.1f}); '
                f'{spread}; AnyLoc-like descriptor timed in this '
                f'run (whole float32 model, hard assignment) {full_ms:.1f} ms: fastest '
                f'{timing[fastest][0] / full_ms:.2f}x of it',
                f'<= {reference_ms / 3:.1f} ms (1/3)',
                timing[fastest][0] <= reference_ms / 3,
            )
        )
        for dtype in list(locals_)[1:]:
            soft, hard_cos = cosines['soft'][dtype], cosines['hard'][dtype]
            rows.append(
                Row(
                    2,
                    f'ViT-{arch}/14 {size_px} px: cosine of the {dtype} descriptor to '
                    f'float32 (min, mean over {len(photos)} photos, soft assignment; '
                    'hard)',
                    f'{min(soft):.4f}, {np.mean(soft):.4f}; hard {min(hard_cos):.4f}, '
                    f'{np.mean(hard_cos):.4f}',
                    f'>= {COSINE_TARGET}',
                    min(soft) >= COSINE_TARGET,
                )
            )
    return rows


def time_full_forward(
    folder: str, photo: np.ndarray, codebook: np.ndarray, vlad: VladConfig, runs: int
) -> float:
    """Median ms of an AnyLoc-like descriptor timed beside ours: the whole DINOv2 model in
    float32 (all blocks, as AnyLoc runs it), block 10's value captured by a hook, then VLAD."""
    import torch
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(folder, dtype=torch.float32).eval()
    captured = []
    model.encoder.layer[9].attention.v_proj.register_forward_hook(
        lambda module, args, out: captured.append(out)
    )
    pixels = torch.from_numpy(normalized_pixels(photo[None]))

    def describe(x: Any) -> np.ndarray:
        with torch.inference_mode():
            model(x)
        patches = captured.pop()[0, 1:].numpy()
        return aggregate_vlad(l2_normalize(patches), codebook, vlad)

    return time_ms(describe, pixels, runs)[0]


# ---- part: search (section 3) ----------------------------------------------------------------


def search_rows(ws: Workspace) -> list[Row]:
    """Exact and approximate search over replicated real descriptors in ``--search-dim``
    dimensions; indexes are built with ``THREADS`` FAISS threads and searched with one, as
    the Localizer does (one query at a time)."""
    from vlm_vpr.core.threads import limit_threads

    real = read_map(ws.real_map('rootsift')[0], load_index=False)
    vlads = real.content.descriptors.astype(np.float32)  # [N x K*D_local]: no PCA below pca_dim
    pca = fit_pca(
        replicate(vlads, PCA_FIT_ROWS, replication_noise(vlads), seed=1),
        VladConfig(pca_dim=ws.args.search_dim),
    )
    base = apply_pca(vlads, *pca)
    noise = replication_noise(base)
    day_right = read_traversal(ws.args.data / 'gardens_point' / 'day_right')
    localizer = Localizer(real, LocalizerConfig(runtime=RuntimeConfig(num_threads=THREADS)))
    queries = [
        apply_pca(localizer.describe(read_image(p)), *pca)[0]
        for p in day_right.image_paths[: ws.args.queries]
    ]
    limit_threads(THREADS)  # index builds on every thread (the Localizer set BLAS to one)
    sizes = [n for n in SEARCH_SIZES if n <= ws.args.max_map_size]
    kinds = {
        'exact': f'exact (flat float16, {base.shape[1]}-d)',
        **{k: approximate_label(k) for k in ws.args.approximate},
    }
    medians: dict[str, list[float]] = {kind: [] for kind in kinds}
    rows = []
    for size in sizes:
        data = replicate(base, size, noise, seed=size)
        exact_ids = None
        for kind, label in kinds.items():
            note(f'search: {kind} over {count_label(size)}')
            exact = kind == 'exact'
            config = (
                IndexConfig() if exact else IndexConfig(approximate_above=1, approximate_type=kind)
            )
            start = time.perf_counter()
            index = build_index(data, config, force_flat=exact)
            build_s = time.perf_counter() - start
            times_ms, ids = time_search(index, data, queries)
            del index
            median_ms = float(np.median(times_ms))
            medians[kind].append(median_ms)
            row = Row(
                3,
                f'{label}, {count_label(size)} images',
                f'{stats(times_ms)}; build {build_s:.1f} s',
            )
            if exact:
                exact_ids = ids
                if size == EXACT_TARGET_SIZE:
                    row.target = f'<= {EXACT_TARGET_MS:.0f} ms'
                    row.ok = median_ms <= EXACT_TARGET_MS
            else:
                recall = float(
                    np.mean([len(np.intersect1d(a, e)) / len(e) for a, e in zip(ids, exact_ids)])
                )
                row.measured += f'; recall@{SEARCH_K} {recall:.3f}'
                if size == APPROX_TARGET_SIZE:
                    row.target = APPROX_TARGET
                    row.ok = median_ms <= APPROX_TARGET_MS and recall >= APPROX_TARGET_RECALL
            rows.append(row)
        del data
    growth = '; '.join(
        f'{kind} {m[0]:.2f} -> {m[-1]:.2f} ms (x{m[-1] / m[0]:.1f})' for kind, m in medians.items()
    )
    rows.append(
        Row(
            3,
            f'latency growth {count_label(sizes[0])} -> {count_label(sizes[-1])} (median)',
            growth,
        )
    )
    if sizes[-1] < APPROX_TARGET_SIZE:
        rows.append(
            Row(
                3,
                'approximate search at 1M images',
                f'not run (--max-map-size {ws.args.max_map_size}); target there: {APPROX_TARGET}',
            )
        )
    rows.append(
        Row(
            3,
            'search set',
            f'{len(base)} real day_left descriptors (16384-d VLAD, '
            f'PCA to {base.shape[1]}-d) + noise (norm {noise:.2f}); {len(queries)} real '
            'day_right queries; maps at or above index.approximate_above '
            f'({IndexConfig().approximate_above}) use index.approximate_type '
            f'({IndexConfig().approximate_type})',
        )
    )
    return rows


def approximate_label(kind: str) -> str:
    config = IndexConfig()
    if kind == 'hnsw':
        return (
            f'HNSW float16 (M {config.hnsw_m}, efConstruction '
            f'{config.hnsw_ef_construction}, efSearch {config.hnsw_ef_search})'
        )
    return (
        f'IVF float16 (nlist {config.ivf_nlist or "sqrt(N)"}, nprobe {config.ivf_nprobe}, '
        f'trained on <= {config.train_max_rows} rows)'
    )


def time_search(
    index: Any, data: np.ndarray, queries: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(ms per query [Q], top-k map ids per query) searching one query at a time, warm."""
    search(index, data, queries[0], SEARCH_K)
    times_ms, ids = [], []
    for query in queries:
        start = time.perf_counter()
        ids.append(search(index, data, query, SEARCH_K)[1])
        times_ms.append((time.perf_counter() - start) * 1000.0)
    return np.array(times_ms), ids


# ---- part: memory (section 5) ----------------------------------------------------------------


def memory_rows(ws: Workspace) -> list[Row]:
    from vlm_vpr.cli import map_summary

    big = ws.big_map('rootsift')
    summary = map_summary(big)
    n = summary['num_images']
    parts = ', '.join(
        f'{k} {v:.1f}' for k, v in summary['size_mb'].items() if k not in ('thumbnails', 'extras')
    )
    rows = [
        Row(
            5,
            f'map size per 10k images (`vlm-vpr map info` '
            f'retrieval_mb_per_10k_images of a {count_label(n)}-image map)',
            f'{summary["retrieval_mb_per_10k_images"]:.1f} MB ({summary["descriptor_dim"]}-d '
            f'float16; {count_label(n)} map MB: {parts}); thumbnails '
            f'{summary["thumbnails_mb"] * 10_000 / n:.0f} MB per 10k separately',
            f'<= {MAP_MB_PER_10K_TARGET:.0f} MB',
            summary['retrieval_mb_per_10k_images'] <= MAP_MB_PER_10K_TARGET,
        )
    ]
    size = ws.args.memory_map_size
    pca = read_map(big, load_index=False).content.pca
    map_dir = write_replicated_map(
        ws.real_map('rootsift')[0], ws.root / 'memory_map', size, thumbnails=False, pca=pca
    )
    note(f'resident memory with a {count_label(size)}-image map')
    image = read_traversal(ws.args.data / 'gardens_point' / 'day_right').image_paths[0]
    child = subprocess.run(
        [sys.executable, '-c', RSS_CHILD, str(map_dir), str(image)], capture_output=True, text=True
    )
    if child.returncode != 0:
        raise RuntimeError(f'memory child process failed: {child.stderr.strip()[-500:]}')
    rss_mb, peak_mb, load_s = (float(v) for v in child.stdout.split())
    rows.append(
        Row(
            5,
            f'resident memory of a process holding a {count_label(size)}-image map '
            '(read_map + Localizer, no VLM, one localize)',
            f'peak {peak_mb:.0f} MB (VmHWM), {rss_mb:.0f} MB after; read_map (exact '
            f'index rebuilt from descriptors.npy) {load_s:.2f} s',
        )
    )
    if size == 100_000:
        rows[-1].target, rows[-1].ok = f'peak <= {RSS_MB_TARGET:.0f} MB', peak_mb <= RSS_MB_TARGET
    return rows


# ---- part: rerank (section 6) ----------------------------------------------------------------


def rerank_rows(ws: Workspace) -> list[Row]:
    from bench_rerank import measure_rerank

    note('re-ranking cost')
    result = measure_rerank([10, 50, 100], ws.args.generation_s, ws.args.rerank_queries)
    return [
        Row(
            6,
            f'K = {row["k"]}, map descriptions precomputed (stand-in VLM '
            f'{ws.args.generation_s:.2f} s/call)',
            f'{row["precomputed_calls"]:.0f} VLM call(s), {row["precomputed_ms"]:.0f} ms '
            f'per query (described online: {row["online_calls"]:.0f} calls, '
            f'{row["online_ms"]:.0f} ms)',
            '1 VLM call per query',
            row['precomputed_calls'] == 1,
        )
        for row in result['rows']
    ]


# ---- part: node (section 7) ------------------------------------------------------------------


def node_rows(ws: Workspace) -> list[Row]:
    from vlm_vpr.ros.demo_replay import measure_node_latency

    big = ws.big_map('rootsift')
    size = count_label(len(read_map(big, load_index=False)))
    note('node latency')
    latency = measure_node_latency(big, ws.args.data, num_frames=ws.args.node_frames)
    return [
        Row(
            7,
            f'image receipt -> pose publish, {size}-image dense RootSIFT map, '
            f'campus_loop 426x240 frames one at a time ({latency["count"]:.0f})',
            f'median {latency["median_ms"]:.1f} ms, p95 {latency["p95_ms"]:.1f} ms',
        )
    ]


PART_ROWS = {
    'frame': frame_rows,
    'anyloc': anyloc_rows,
    'search': search_rows,
    'memory': memory_rows,
    'rerank': rerank_rows,
    'node': node_rows,
}


# ---- table -----------------------------------------------------------------------------------


def format_table(rows: list[Row]) -> str:
    """The markdown table, rows grouped by section under a bold heading row."""
    lines = ['| figure | measured | target | ok? |', '|---|---|---|---|']
    for section, group in itertools.groupby(
        sorted(rows, key=lambda r: r.section), key=lambda r: r.section
    ):
        lines.append(f'| **{section}. {SECTIONS[section]}** | | | |')
        for row in group:
            ok = {True: 'yes', False: '**NO**', None: ''}[row.ok]
            lines.append(f'| {row.figure} | {row.measured} | {row.target} | {ok} |')
    return '\n'.join(lines)


def machine_description() -> str:
    import cv2
    import faiss
    import torch
    import transformers

    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    model = next(
        (
            line.split(':', 1)[1].strip()
            for line in lscpu.splitlines()
            if line.startswith('Model name')
        ),
        platform.processor(),
    )
    flags = Path('/proc/cpuinfo').read_text().split('flags', 2)[1].split('\n')[0].split()
    wanted = ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_bf16', 'amx_int8')
    memory_kb = int(Path('/proc/meminfo').read_text().split()[1])
    present = ', '.join(f for f in wanted if f in flags)
    return (
        f'{model}, {len(os.sched_getaffinity(0))} cores ({present}), '
        f'{memory_kb / 1e6:.0f} GB RAM, {THREADS} threads; '
        f'Python {platform.python_version()}, '
        f'torch {torch.__version__}, numpy {np.__version__}, faiss {faiss.__version__}, '
        f'OpenCV {cv2.__version__}, transformers {transformers.__version__}'
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--data',
        type=Path,
        default=default_data_root(),
        help='shared data folder (default $VLM_VPR_DATA or ../shared/data)',
    )
    parser.add_argument(
        '--quick',
        action='store_true',
        help='smaller maps, fewer runs and backbones (a few minutes)',
    )
    parser.add_argument('--skip', nargs='+', default=[], choices=PARTS, help='parts to leave out')
    parser.add_argument(
        '--backbones',
        nargs='+',
        choices=list(BACKBONES),
        help='frame part: backbones to build and time (default all; quick: rootsift S224)',
    )
    parser.add_argument(
        '--anyloc',
        nargs='+',
        choices=list(ANYLOC_NAMES),
        help='anyloc part: architecture and size (default all; quick: S224)',
    )
    parser.add_argument(
        '--dtypes',
        nargs='+',
        default=['bfloat16', 'int8'],
        choices=[d for d in RUNTIME_DTYPES if d not in ('float32', 'auto')],
        help='DINOv2 runtime.dtype values timed beside float32',
    )
    parser.add_argument(
        '--compile',
        action='store_true',
        help='frame and anyloc parts: also time those dtypes under torch.compile '
        '(runtime.compile; about 40 s of compilation each, not timed)',
    )
    parser.add_argument(
        '--engines',
        nargs='+',
        default=list(ENGINES),
        choices=ENGINES,
        help='frame and anyloc parts: runtime.engine values that run those '
        'dtypes (openvino needs requirements-openvino.txt)',
    )
    parser.add_argument(
        '--approximate',
        nargs='+',
        default=['ivf'],
        choices=APPROXIMATE_INDEX_TYPES,
        help='approximate index types to time',
    )
    parser.add_argument(
        '--search-dim',
        type=int,
        default=1024,
        help='search part: PCA dimension of the descriptors (default 1024, the '
        "issue's figure; maps default to vlad.pca_dim)",
    )
    parser.add_argument(
        '--max-map-size',
        type=int,
        help='largest search set of 1k, 10k, 100k, 1M (default 1000000; quick: 10000)',
    )
    parser.add_argument('--runs', type=int, help='timed repetitions per figure (default 30)')
    parser.add_argument(
        '--build-images', type=int, help='real map images, at most vlad.pca_dim (default 200)'
    )
    parser.add_argument('--map-images', type=int, help='per-frame map size (default 10000)')
    parser.add_argument('--memory-map-size', type=int, help='images of the memory map (100000)')
    parser.add_argument('--queries', type=int, help='search queries (default 50)')
    parser.add_argument('--photos', type=int, help='anyloc cosine photos (default 8)')
    parser.add_argument('--rerank-queries', type=int, help='re-ranked queries per K (default 3)')
    parser.add_argument(
        '--generation-s', type=float, default=0.1, help='stand-in VLM generation time per call (s)'
    )
    parser.add_argument('--node-frames', type=int, help='frames sent to the node (default 20)')
    args = parser.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    pca_dim = MapBuildConfig().vlad.pca_dim
    if not 2 <= args.build_images <= pca_dim:
        parser.error(
            f'--build-images must be in [2, {pca_dim}] (vlad.pca_dim): the large maps are '
            "copies of the real map's raw VLAD vectors, which a bigger map replaces by PCA"
        )
    return args


def run(args: argparse.Namespace) -> list[Row]:
    """Every part not skipped; a part that fails gives one FAILED row and the rest go on."""
    import cv2
    import faiss
    import torch

    torch.set_num_threads(THREADS)
    faiss.omp_set_num_threads(THREADS)
    cv2.setNumThreads(THREADS)
    os.environ.setdefault('ROS_DOMAIN_ID', str(10 + os.getpid() % 90))
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix='vlm_vpr_bench_') as tmp:
        workspace = Workspace(args, Path(tmp))
        for part in PARTS:
            if part in args.skip:
                continue
            try:
                rows.extend(PART_ROWS[part](workspace))
                note(f'{part} part done')
            except Exception as exc:  # one broken part must not lose the others' figures
                traceback.print_exc()
                section = {
                    'frame': 1,
                    'anyloc': 2,
                    'search': 3,
                    'memory': 5,
                    'rerank': 6,
                    'node': 7,
                }[part]
                rows.append(
                    Row(
                        section,
                        f'{part} part',
                        f'FAILED: {type(exc).__name__}: '
                        f'{str(exc).splitlines()[0] if str(exc) else ""}',
                        '',
                        False,
                    )
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = run(args)
    print(
        f'Machine: {machine_description()}; load average {load_before:.1f} before, '
        f'{os.getloadavg()[0]:.1f} after; {time.perf_counter() - START:.0f} s for '
        f'`{" ".join(["benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])])}`'
        '\n'
    )
    print(format_table(rows))


if __name__ == '__main__':
    main()
