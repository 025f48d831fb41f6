"""Vision-language model clients: one small protocol, two backends (in-process, HTTP).

A client sends images and a prompt and returns the model's answer parsed as one JSON object.
The task prompts and the validation of each answer live in :mod:`vlm_vpr.backends.vlm.tasks`.
Every failure is a :class:`~vlm_vpr.core.errors.VlmError`: the re-rankers catch it, count it,
note it and keep the coarse order. What a model answers is data: it is parsed and validated,
never followed as an instruction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from vlm_vpr.core.config import VlmConfig
from vlm_vpr.core.errors import ConfigError, VlmError, VlmOutputError


class VlmTimeoutError(VlmError):
    """The model did not answer within the request timeout or the query's time budget."""


class VlmUnavailableError(VlmError):
    """The model server refused the connection or answered with an HTTP error."""


class VlmClient(Protocol):
    model_name: str  # what answers; stored with map-side descriptions

    def ask_json(
        self, prompt: str, images_bgr: Sequence[np.ndarray], timeout_s: float
    ) -> dict[str, Any]:
        """The answer to ``prompt`` about ``images_bgr`` ([H x W x 3] uint8 BGR, shown in order).

        Raises VlmTimeoutError after ``timeout_s`` seconds, VlmUnavailableError when the model
        cannot be reached and VlmOutputError when the answer is not one JSON object.
        """
        ...


def create_vlm_client(config: VlmConfig) -> VlmClient:
    """The client named by ``config.backend`` (loads the model for 'transformers')."""
    if config.backend == 'transformers':
        from vlm_vpr.backends.vlm.hf_transformers import TransformersVlm

        return TransformersVlm(config)
    if config.backend == 'openai':
        from vlm_vpr.backends.vlm.openai_http import OpenAiVlm

        return OpenAiVlm(config)
    raise ConfigError(
        "no VLM configured: set vlm.backend to 'transformers' or 'openai' "
        '(and vlm.model) to use a VLM re-ranker or describe a map'
    )


def prepare_image_rgb(image_bgr: np.ndarray, max_side_px: int) -> np.ndarray:
    """[h x w x 3] uint8 RGB copy of a BGR image, shrunk so its longer side is <= max_side_px."""
    import cv2

    from vlm_vpr.core.images import as_bgr

    image = as_bgr(image_bgr)
    scale = max_side_px / max(image.shape[:2])
    if scale < 1.0:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


_FENCE = re.compile(r'^```(?:json)?\s*(.*?)\s*```$', re.DOTALL | re.IGNORECASE)


def parse_json_object(text: str) -> dict[str, Any]:
    """The one JSON object in a model's answer (a ```json fence around it is accepted).

    Raises VlmOutputError, quoting the start of the answer, for anything else.
    """
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1)
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise VlmOutputError(f'VLM answer is not JSON ({exc.msg}): {quote_answer(text)}') from exc
    except ValueError as exc:  # an integer of more digits than Python converts
        raise VlmOutputError(
            f'VLM answer is not usable JSON (a number is too long): {quote_answer(text)}'
        ) from exc
    except RecursionError as exc:
        raise VlmOutputError(
            f'VLM answer is not usable JSON (nested too deeply): {quote_answer(text)}'
        ) from exc
    if not isinstance(value, dict):
        raise VlmOutputError(f'VLM answer is JSON but not an object: {quote_answer(text)}')
    return value


def parse_json_answer(text: str, cut_at_tokens: int | None) -> dict[str, Any]:
    """:func:`parse_json_object` of a model's answer; ``cut_at_tokens`` is the token limit
    (vlm.max_new_tokens) when generation stopped there, else None.

    An answer cut at the limit that does not parse raises a VlmOutputError naming
    vlm.max_new_tokens: to be raised when the JSON had begun (it is unfinished), only
    mentioned when the answer is not JSON from its start.
    """
    try:
        return parse_json_object(text)
    except VlmOutputError as exc:
        if cut_at_tokens is None:
            raise
        if text.lstrip().startswith(('{', '`')):
            raise VlmOutputError(
                f'VLM answer was cut at the token limit (vlm.max_new_tokens = {cut_at_tokens}) '
                f'before its JSON ended; raise vlm.max_new_tokens. {exc}'
            ) from exc
        raise VlmOutputError(
            f'{exc} (and it used all vlm.max_new_tokens = {cut_at_tokens} tokens)'
        ) from exc


def quote_answer(text: str, limit: int = 120) -> str:
    """A short, single-line, repr-quoted excerpt of model output for messages and logs."""
    return repr(text[:limit] + ('...' if len(text) > limit else ''))
