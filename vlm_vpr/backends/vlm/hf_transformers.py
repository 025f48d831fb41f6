"""An in-process VLM with Hugging Face transformers: any chat-template image-text model that
``AutoModelForImageTextToText`` and ``AutoProcessor`` load (Qwen2.5-VL, InternVL3-hf, SmolVLM,
LLaVA ...), from a hub id or a local folder.

Quantization: 'bnb-4bit' (bitsandbytes NF4, CUDA / Jetson) or 'torchao-int8' (int8 weight-only,
CPU). Both need their package installed; a missing one raises ConfigError naming it.
Generation is greedy and stopped at what is left of the caller's time budget after image
preprocessing (``generate(max_time=...)``, checked between tokens: the first forward pass, which
encodes the images and the prompt, cannot be cut short; a budget it overruns is reported as a
timeout once it ends). Any exception of the model's code (a chat-template error, a processor's
IndexError, CUDA out of memory) is a VlmError, so a re-ranker keeps the coarse order.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from vlm_vpr.backends import model_location
from vlm_vpr.backends.vlm import (
    VlmTimeoutError,
    VlmUnavailableError,
    parse_json_answer,
    prepare_image_rgb,
)
from vlm_vpr.core.config import VlmConfig
from vlm_vpr.core.errors import ConfigError, VlmError

log = logging.getLogger(__name__)


class TransformersVlm:
    """VlmClient running a transformers image-text-to-text model in this process."""

    def __init__(self, config: VlmConfig) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.config = config
        self.model_name = config.model
        kwargs: dict[str, Any] = {'dtype': getattr(torch, config.dtype)}
        kwargs.update(_quantization_kwargs(config))
        source = model_location(config.model)
        try:
            self.processor = AutoProcessor.from_pretrained(source)
            # Any: transformers' stubs type the loaded model's .to and .generate wrongly
            self.model = cast(Any, AutoModelForImageTextToText.from_pretrained(source, **kwargs))
        except (OSError, ValueError) as exc:
            if Path(source).exists():
                fix = (
                    'the folder must hold an image-text-to-text (vision chat) model with its '
                    'processor, one AutoModelForImageTextToText loads (e.g. Qwen2.5-VL, '
                    'SmolVLM, LLaVA), not a text-only model'
                )
            else:
                fix = (
                    'give a local model folder or a hub id that is already in the local '
                    'Hugging Face cache'
                )
            raise VlmUnavailableError(f'cannot load VLM {config.model!r} ({exc}); {fix}') from exc
        if 'device_map' not in kwargs:
            self.model.to(config.device)
        self.model.eval()
        if not getattr(self.processor, 'chat_template', None):
            raise ConfigError(
                f'VLM {config.model!r} has no chat template; use an instruction-tuned (chat) model'
            )
        log.info(
            'loaded VLM %s on %s (%s, quantization %s)',
            config.model,
            config.device,
            config.dtype,
            config.quantization,
        )

    def ask_json(
        self, prompt: str, images_bgr: Sequence[np.ndarray], timeout_s: float
    ) -> dict[str, Any]:
        import torch
        from PIL import Image

        if timeout_s <= 0:
            raise VlmTimeoutError('no time left for a VLM call')
        start = time.monotonic()
        size_px = self.config.image_size_px
        content: list[dict[str, Any]] = [
            {'type': 'image', 'image': Image.fromarray(prepare_image_rgb(image, size_px))}
            for image in images_bgr
        ]
        content.append({'type': 'text', 'text': prompt})
        try:
            inputs = self.processor.apply_chat_template(
                [{'role': 'user', 'content': content}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors='pt',
            ).to(self.model.device)
            remaining_s = timeout_s - (time.monotonic() - start)
            if remaining_s <= 0:
                raise VlmTimeoutError(
                    f'preparing the images took the whole {timeout_s:.1f} s time limit; '
                    'lower vlm.image_size_px or raise rerank.time_budget_s'
                )
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs,
                    max_new_tokens=self.config.max_new_tokens,
                    do_sample=False,
                    max_time=remaining_s,
                )
            new_tokens = output[:, inputs['input_ids'].shape[1] :]
            text = self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
        except VlmError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model's code, whatever it raises
            raise VlmError(
                f'VLM {self.model_name!r} failed to run ({type(exc).__name__}: {exc})'
            ) from exc
        elapsed_s = time.monotonic() - start
        log.debug('VLM answered %d tokens in %.2f s', new_tokens.shape[1], elapsed_s)
        if elapsed_s >= timeout_s:
            raise VlmTimeoutError(f'VLM generation stopped at the {timeout_s:.1f} s time limit')
        cut = new_tokens.shape[1] >= self.config.max_new_tokens  # stopped by the limit
        return parse_json_answer(text, self.config.max_new_tokens if cut else None)


def _quantization_kwargs(config: VlmConfig) -> dict[str, Any]:
    """``from_pretrained`` arguments for ``config.quantization``; ConfigError if unusable."""
    if config.quantization == 'bnb-4bit':
        import torch
        from transformers import BitsAndBytesConfig

        if not config.device.startswith('cuda'):
            raise ConfigError(
                "vlm.quantization 'bnb-4bit' needs a CUDA device: set vlm.device "
                "to 'cuda', or use 'torchao-int8' on CPU"
            )
        _require('bitsandbytes', 'bnb-4bit')
        return {
            'quantization_config': BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type='nf4',
                bnb_4bit_compute_dtype=getattr(torch, config.dtype),
            ),
            'device_map': {'': config.device},
        }
    if config.quantization == 'torchao-int8':
        from transformers import TorchAoConfig

        _require('torchao', 'torchao-int8')
        from torchao.quantization import Int8WeightOnlyConfig

        return {'quantization_config': TorchAoConfig(quant_type=Int8WeightOnlyConfig())}
    return {}


def _require(package: str, quantization: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"vlm.quantization {quantization!r} needs the '{package}' package: "
            f"pip install {package}, or set vlm.quantization to 'none'"
        )
