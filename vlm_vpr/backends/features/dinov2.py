"""DINOv2 patch descriptors as in AnyLoc: one block's output tokens or attention key/query/value.

The forward pass stops at ``features.dinov2_layer``: only the patch embedding and the first
blocks run, and for a key/query/value facet the chosen block runs only its first LayerNorm and
that one projection. ``runtime.dtype`` picks the arithmetic:

- 'auto' (default): 'bfloat16' where the hardware computes it natively (:func:`native_bfloat16`),
  else 'float32'.
- 'float32': the reference.
- 'bfloat16' / 'float16': weights and activations in that type (float16 is slow on CPUs).
- 'int8' (CPU): every Linear layer becomes an int8 x int8 -> int32 matrix product
  (``torch._int_mm``) with one scale per weight row and one per token, the token scales
  computed afresh for each input (dynamic quantisation); patch embedding, LayerNorm, GELU and
  attention stay float32.

``runtime.compile`` hands the truncated network to ``torch.compile`` (Inductor, needs a C++
compiler on CPU), which fuses the element-wise work around the matrix products, such as
int8's quantisation and rescaling: with random ViT-S/B weights at 322 px, one thread, int8
took 0.81x / 0.83x the eager time, after about 40 s of compilation per input size.

``runtime.engine: openvino`` runs the truncated network with OpenVINO's CPU plugin instead of
torch (:class:`OpenVinoNetwork`): 'float32' / 'bfloat16' / 'float16' become its inference
precision; 'int8' stores the Linear weights as int8 and lets the plugin quantise the
activations at run time (one scale per D values of a token) for int8 x int8 products,
everything else in bfloat16 where native, else float32 (timings: README, ``make bench``).

This module imports torch at load time; ``create_extractor`` imports it only for 'dinov2'.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlm_vpr.backends import is_model_folder, model_location
from vlm_vpr.core.config import FeatureConfig, RuntimeConfig
from vlm_vpr.core.errors import ConfigError
from vlm_vpr.core.images import as_bgr, resize_shorter_side
from vlm_vpr.core.types import LocalFeatures
from vlm_vpr.core.vlad import l2_normalize

log = logging.getLogger(__name__)

# DINOv2 was trained on inputs normalised with these
IMAGENET_MEAN_RGB = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD_RGB = np.array((0.229, 0.224, 0.225), np.float32)
MODEL_TYPES = ('dinov2', 'dinov2_with_registers')  # transformers config.model_type accepted
CPUINFO = Path('/proc/cpuinfo')  # where native_bfloat16 reads the CPU's flags (Linux)


class Dinov2Extractor:
    """Grid of DINOv2 patch descriptors ([H/14 x W/14 x D] float32, unit L2 rows) per image.

    Images are resized so the shorter side is ``features.image_size_px`` (both sides rounded
    down to the patch size), converted to RGB and normalised with the ImageNet mean and std.
    Images of equal size after resizing share forward passes of up to ``runtime.batch_size``.
    torch's thread count is set by :func:`vlm_vpr.core.threads.limit_threads` (the Localizer and
    the map build call it after creating the extractor); the OpenVINO engine takes
    ``runtime.num_threads`` itself.
    """

    def __init__(self, features: FeatureConfig, runtime: RuntimeConfig) -> None:
        dtype = resolve_dtype(runtime)
        if dtype == 'int8' and runtime.device != 'cpu':
            raise ConfigError(
                "runtime.dtype 'int8' runs on the CPU only: on CUDA use 'bfloat16' or 'float16'"
            )
        model = _load_model(features.dinov2_model, features.dinov2_layer)
        self._patch_px = int(model.config.patch_size)
        self._size_px = features.image_size_px
        self._batch_size = runtime.batch_size
        self._device = torch.device(runtime.device)
        net = _truncate(model, features.dinov2_layer, features.dinov2_facet).eval()
        _cache_position_embeddings(model.embeddings)
        self._net: OpenVinoNetwork | Callable[[torch.Tensor], torch.Tensor]
        if runtime.engine == 'openvino':
            self._net = OpenVinoNetwork(
                net, dtype, runtime.num_threads, int(model.config.hidden_size)
            )
        else:
            self._dtype = torch.float32 if dtype == 'int8' else getattr(torch, dtype)
            if dtype == 'int8':
                _quantize_linear_layers(net)
            self._net = net.to(self._device, self._dtype)
            if runtime.compile:  # compiled lazily: the first image of each size waits for it
                self._net = torch.compile(self._net)
        log.info(
            'DINOv2 %s: layer %d of %d, facet %s, dtype %s, device %s, engine %s, compiled %s',
            features.dinov2_model,
            features.dinov2_layer,
            model.config.num_hidden_layers,
            features.dinov2_facet,
            dtype,
            runtime.device,
            runtime.engine,
            runtime.compile,
        )

    def extract(self, images_bgr: list[np.ndarray]) -> list[LocalFeatures]:
        resized = [
            resize_shorter_side(as_bgr(image), self._size_px, self._patch_px)
            for image in images_bgr
        ]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(resized):
            groups.setdefault(image.shape, []).append(i)
        by_index: dict[int, LocalFeatures] = {}
        for indices in groups.values():
            for start in range(0, len(indices), self._batch_size):
                chunk = indices[start : start + self._batch_size]
                grids = self._describe(np.stack([resized[i] for i in chunk]))
                by_index.update((i, LocalFeatures(grid)) for i, grid in zip(chunk, grids))
        return [by_index[i] for i in range(len(resized))]

    def _describe(self, batch_bgr: np.ndarray) -> np.ndarray:
        """[B x h x w x D] float32 unit descriptors of images [B x H x W x 3] uint8 BGR.

        Pixels and patches are prepared with numpy, not torch: around OpenVINO's threads,
        torch's idle OpenMP workers would spin on the same cores.
        """
        pixels = normalized_pixels(batch_bgr)
        if isinstance(self._net, OpenVinoNetwork):
            tokens = self._net(pixels)
        else:
            with torch.inference_mode():
                inputs = torch.from_numpy(pixels).to(self._device, self._dtype)
                tokens = self._net(inputs).float().cpu().numpy()  # [B x (prefix + h*w) x D]
        b, _, height, width = pixels.shape
        rows, cols = height // self._patch_px, width // self._patch_px
        patches = tokens[:, tokens.shape[1] - rows * cols :]  # drop CLS and register tokens
        return l2_normalize(patches).reshape(b, rows, cols, -1)


def normalized_pixels(batch_bgr: np.ndarray) -> np.ndarray:
    """DINOv2's input [B x 3 x H x W] float32 (RGB, ImageNet mean and std) of images
    [B x H x W x 3] uint8 BGR."""
    rgb = batch_bgr[..., ::-1].astype(np.float32) / np.float32(255.0)
    pixels = (rgb - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def resolve_dtype(runtime: RuntimeConfig) -> str:
    """``runtime.dtype``, with 'auto' made 'bfloat16' where :func:`native_bfloat16`, else
    'float32'."""
    if runtime.dtype != 'auto':
        return runtime.dtype
    return 'bfloat16' if native_bfloat16(runtime.device) else 'float32'


def native_bfloat16(device: str) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU
    with the avx512_bf16 or amx_bf16 (x86) or bf16 (Arm) flag in /proc/cpuinfo. Elsewhere
    bfloat16 is emulated and slower than float32."""
    if device.startswith('cuda'):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        cpuinfo = CPUINFO.read_text()
    except OSError:
        return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.lower().startswith(('flags', 'features')):
            flags.update(line.split(':', 1)[-1].split())
    return bool(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})


def _load_model(name: str, layer: int) -> Any:
    """DINOv2 model ``name`` (hub id or folder) in float32, once ``layer`` is checked: a
    transformers Dinov2Model or Dinov2WithRegistersModel (typed Any: its parts are reached by
    attribute)."""
    from transformers import AutoConfig, AutoModel

    fix = (
        'set features.dinov2_model to a local folder holding config.json and '
        'model.safetensors, or to a hub id (facebook/dinov2-small|base|large|giant) that is '
        'in the Hugging Face cache or can be downloaded (network on, HF_HUB_OFFLINE unset)'
    )
    folder, name = is_model_folder(name), model_location(name)
    if folder and not Path(name).is_dir():
        raise ConfigError(f'DINOv2 model folder {name!r} does not exist: {fix}')
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f'cannot load the DINOv2 config of {name!r} ({str(exc).splitlines()[0]}): {fix}'
        ) from exc
    if config.model_type not in MODEL_TYPES:
        raise ConfigError(
            f'{name!r} is a {config.model_type!r} model, not DINOv2 {MODEL_TYPES}: {fix}'
        )
    if layer > config.num_hidden_layers:
        raise ConfigError(
            f'features.dinov2_layer is {layer} but {name!r} has only '
            f'{config.num_hidden_layers} layers: use 1..{config.num_hidden_layers}'
        )
    try:
        return AutoModel.from_pretrained(name, dtype=torch.float32, attn_implementation='sdpa')
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f'cannot load the DINOv2 weights of {name!r} ({str(exc).splitlines()[0]}): {fix}'
        ) from exc


def _truncate(model: Any, layer: int, facet: str) -> nn.Sequential:
    """Embeddings and blocks up to ``layer`` (1-based); tokens [B x T x D] out of pixels in.

    For a 'key' / 'query' / 'value' facet the last block contributes only its first LayerNorm
    and that attention projection (the input of the attention, as AnyLoc's facets).
    """
    blocks = list(model.encoder.layer[:layer])
    if facet == 'token':
        return nn.Sequential(model.embeddings, *blocks)
    last = blocks.pop()
    projection = getattr(last.attention, f'{facet[0]}_proj')
    return nn.Sequential(model.embeddings, *blocks, last.norm1, projection)


def _cache_position_embeddings(embeddings: Any, max_sizes: int = 32) -> None:
    """Memoise the bicubic resampling of the position embeddings per input size.

    transformers resamples them at every forward pass (about 3% of a ViT-S/14 pass at 224 px);
    the result depends only on the token count and the image size, not on the pixels. A cached
    tensor is also what :class:`OpenVinoNetwork` traces as a constant.
    """
    resample = embeddings.interpolate_pos_encoding
    cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def cached(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        key = (int(tokens.shape[1]), int(height), int(width))  # sizes are tensors in a trace
        if key not in cache:
            if len(cache) >= max_sizes:
                cache.clear()
            cache[key] = resample(tokens, height, width)
        return cache[key]

    embeddings.interpolate_pos_encoding = cached


def _quantize_linear_layers(module: nn.Module) -> None:
    """Make every Linear layer inside ``module`` int8; fuse each attention's q, k, v."""

    def int8(child: nn.Module) -> nn.Module | None:
        if isinstance(child, nn.Linear):
            return Int8Linear(child.weight, child.bias)
        if hasattr(child, 'o_proj'):  # a block's self-attention
            return Int8Attention(child)
        return None

    _swap_modules(module, int8)


def _swap_modules(module: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> None:
    """Replace each child of ``module`` by ``swap(child)``; where that is None, recurse."""
    for name, child in module.named_children():
        replacement = swap(child)
        if replacement is None:
            _swap_modules(child, swap)
        else:
            setattr(module, name, replacement)


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights [N x K] and their per-row (output channel) scales [N] float32."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(weight / scale[:, None]).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A Linear layer as int8 x int8 -> int32 products: y ~ (s_x q_x) (s_w q_w)^T + b.

    Weights: symmetric int8 with one scale per output channel (fixed). Inputs: symmetric int8
    with one scale per token (row), from that row's largest magnitude at every call.
    """

    weight_t: torch.Tensor  # buffers, declared for the type checker
    weight_scale: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        quantized, scale = _int8_rows(weight)
        self.register_buffer('weight_t', quantized.t())
        self.register_buffer('weight_scale', scale)  # [N] float32
        self.register_buffer('bias', torch.zeros_like(scale) if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / 127.0
        quantized = (rows / row_scale).round_().to(torch.int8)
        out = torch._int_mm(quantized, self.weight_t).float().mul_(row_scale)
        return torch.addcmul(self.bias, out, self.weight_scale).reshape(*x.shape[:-1], -1)


class Int8Attention(nn.Module):
    """transformers' DINOv2 self-attention with q, k, v fused into one :class:`Int8Linear`."""

    def __init__(self, attention: Any) -> None:
        """attention: a transformers Dinov2SelfAttention."""
        super().__init__()
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        biases = [
            p.bias if p.bias is not None else torch.zeros(p.out_features) for p in projections
        ]
        self.qkv = Int8Linear(torch.cat([p.weight for p in projections]), torch.cat(biases))
        self.o_proj = Int8Linear(attention.o_proj.weight, attention.o_proj.bias)
        self.heads = attention.num_attention_heads
        self.scaling = float(attention.scaling)

    def forward(
        self, hidden: torch.Tensor, attention_mask: None = None, **kwargs: object
    ) -> tuple[torch.Tensor, None]:
        b, n, _ = hidden.shape
        qkv = self.qkv(hidden).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), None


class OpenVinoNetwork:
    """The truncated network run by OpenVINO's CPU plugin (``runtime.engine: openvino``).

    Converted from torch and compiled for each input shape when it first comes (about 2 s for
    ViT-S/14 at 224 px); the last ``max_shapes`` shapes stay compiled. The position embeddings
    of that shape are resampled by torch and enter the graph as constants: OpenVINO's bicubic
    resampling differs from torch's antialiased one (DINOv2 with registers). For 'int8' every
    Linear weight is stored as int8 with one scale per output channel
    (:class:`DequantizedInt8Linear`, the form the plugin reads as compressed weights) and the
    plugin quantises the activations at run time in groups of ``hidden`` values per token.
    """

    def __init__(
        self, net: nn.Sequential, dtype: str, num_threads: int, hidden: int, max_shapes: int = 8
    ) -> None:
        """net: :func:`_truncate`'s network (its first module is the embeddings), with
        :func:`_cache_position_embeddings` applied."""
        try:
            import openvino
        except ImportError as exc:
            raise ConfigError(
                "runtime.engine 'openvino' needs the openvino package: pip install "
                '--no-deps openvino (without openvino-telemetry, see the README)'
            ) from exc
        if dtype == 'int8':
            _dequantize_int8_in_graph(net)
            precision = 'bf16' if native_bfloat16('cpu') else 'f32'
        else:
            precision = {'float32': 'f32', 'bfloat16': 'bf16', 'float16': 'f16'}[dtype]
        self._config = {
            'INFERENCE_PRECISION_HINT': precision,
            'PERFORMANCE_HINT': 'LATENCY',
            **({'INFERENCE_NUM_THREADS': num_threads} if num_threads > 0 else {}),
            **({'DYNAMIC_QUANTIZATION_GROUP_SIZE': hidden} if dtype == 'int8' else {}),
        }
        self._openvino = openvino
        self._core = openvino.Core()
        self._net = net
        self._max_shapes = max_shapes
        self._compiled: dict[tuple[int, ...], Any] = {}  # shape -> openvino InferRequest

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Tokens [B x T x D] float32 of normalised pixels [B x 3 x H x W] float32."""
        request = self._compiled.get(pixels.shape)
        if request is None:
            if len(self._compiled) >= self._max_shapes:
                self._compiled.pop(next(iter(self._compiled)))
            request = self._compile(pixels.shape)
            self._compiled[pixels.shape] = request
        return request.infer([pixels])[0].copy()  # the request reuses its output buffer

    def _compile(self, shape: tuple[int, ...]) -> Any:
        start = time.perf_counter()
        example = torch.zeros(shape)
        with torch.no_grad(), warnings.catch_warnings():
            self._net[0](example)  # the embeddings, eagerly: fills the position-embedding cache
            warnings.simplefilter('ignore')  # the tracer's notes on shape-dependent Python code
            model = self._openvino.convert_model(self._net, example_input=example, input=[shape])
        request = self._core.compile_model(model, 'CPU', self._config).create_infer_request()
        log.info(
            'OpenVINO: DINOv2 compiled for input %s in %.1f s', shape, time.perf_counter() - start
        )
        return request


def _dequantize_int8_in_graph(module: nn.Module) -> None:
    """Make every Linear layer inside ``module`` a :class:`DequantizedInt8Linear`."""

    def dequantized(child: nn.Module) -> nn.Module | None:
        if isinstance(child, nn.Linear):
            return DequantizedInt8Linear(child.weight, child.bias)
        return None

    _swap_modules(module, dequantized)


class DequantizedInt8Linear(nn.Module):
    """A Linear layer whose weights are int8 (one scale per output channel) and turned back into
    float in the forward pass: OpenVINO converts this to an int8 compressed-weight product."""

    weight: torch.Tensor  # buffers, declared for the type checker
    scale: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        quantized, scale = _int8_rows(weight)
        self.register_buffer('weight', quantized)  # [N x K] int8
        self.register_buffer('scale', scale[:, None])  # [N x 1] float32
        self.register_buffer('bias', torch.zeros(len(scale)) if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.float() * self.scale, self.bias)
