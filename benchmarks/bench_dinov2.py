"""Time the DINOv2 extractor per image (batch 1) on real architecture sizes with random weights.

    .venv/bin/python benchmarks/bench_dinov2.py [--models S B] [--sizes 224 322]
        [--dtypes float32 bfloat16 int8] [--runs 20] [--threads 2]

For each model, input size and runtime.dtype it prints the median and 95th percentile of the
wall time of ``extract([image])`` over warm runs, the median CPU time (all threads; steadier
than wall time when other processes share the cores), and the cosine of the image's VLAD vector
(32 clusters, hard assignment, random unit codebook) to the float32 one. ``hf-full`` is the
whole transformers model (all blocks, as AnyLoc runs it) in float32 under the same conditions;
``target`` is a third of the AnyLoc reference time measured for issue 5.
Random weights give realistic timings but not realistic activation statistics: check the
accuracy of a fast dtype on real weights before relying on it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import Dinov2Config, Dinov2Model  # noqa: E402

from vlm_vpr.backends.features.dinov2 import Dinov2Extractor  # noqa: E402
from vlm_vpr.core.config import FeatureConfig, RuntimeConfig, VladConfig  # noqa: E402
from vlm_vpr.core.vlad import aggregate_vlad, l2_normalize  # noqa: E402

ARCHITECTURES = {'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16)}  # D, blocks, heads
ANYLOC_MS = {('S', 224): 82, ('S', 322): 165, ('B', 224): 273, ('B', 322): 629}


def time_ms(function, argument, runs: int) -> tuple[float, float, float]:
    """Wall median, wall 95th percentile and CPU-time median in ms (after 2 warm-up calls)."""
    for _ in range(2):
        function(argument)
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        function(argument)
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    return float(np.median(wall)), float(np.percentile(wall, 95)), float(np.median(cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['S', 'B'], choices=list(ARCHITECTURES))
    parser.add_argument('--sizes', nargs='+', type=int, default=[224, 322])
    parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16', 'int8'])
    parser.add_argument('--layer', type=int, default=10)
    parser.add_argument('--facet', default='value')
    parser.add_argument('--runs', type=int, default=20)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f'torch {torch.__version__}, {args.threads} threads, load average '
          f'{os.getloadavg()[0]:.1f}, layer {args.layer} {args.facet}, batch 1')
    print(f'{"model":6} {"px":>4} {"dtype":9} {"median ms":>10} {"p95 ms":>8} {"CPU ms":>7} '
          f'{"target":>7} {"VLAD cos":>9} {"min patch cos":>14}')
    for name in args.models:
        hidden, layers, heads = ARCHITECTURES[name]
        torch.manual_seed(0)
        model = Dinov2Model(Dinov2Config(hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, patch_size=14,
                                         image_size=518, attn_implementation='sdpa')).eval()
        codebook = l2_normalize(rng.standard_normal((32, hidden)).astype(np.float32))
        vlad = VladConfig(num_clusters=32, soft_assignment=False)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            for size in args.sizes:
                image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels = torch.randn(1, 3, size, size)
                with torch.inference_mode():
                    median, p95, cpu = time_ms(model, pixels, args.runs)
                target = ANYLOC_MS.get((name, size), 0) / 3
                print(f'ViT-{name:2} {size:4} {"hf-full":9} {median:10.1f} {p95:8.1f} {cpu:7.1f} '
                      f'{target:7.0f}')
                features = FeatureConfig(backbone='dinov2', dinov2_model=folder,
                                         dinov2_layer=args.layer, dinov2_facet=args.facet,
                                         image_size_px=size)
                reference = None
                for dtype in ['float32', *args.dtypes]:
                    runtime = RuntimeConfig(dtype=dtype, batch_size=1,
                                            num_threads=args.threads)
                    extractor = Dinov2Extractor(features, runtime)
                    local = extractor.extract([image])[0].flat
                    if reference is None:  # the float32 result every dtype is compared with
                        reference = local
                        continue
                    median, p95, cpu = time_ms(extractor.extract, [image], args.runs)
                    vlad_cos = aggregate_vlad(reference, codebook, vlad) @ aggregate_vlad(
                        local, codebook, vlad)
                    patch_cos = (reference * local).sum(axis=1).min()
                    print(f'ViT-{name:2} {size:4} {dtype:9} {median:10.1f} {p95:8.1f} {cpu:7.1f} '
                          f'{target:7.0f} {vlad_cos:9.4f} {patch_cos:14.4f}')


if __name__ == '__main__':
    main()
