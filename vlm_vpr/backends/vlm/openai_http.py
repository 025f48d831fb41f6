"""A VLM behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp server,
Ollama, hosted APIs), spoken with the standard library only.

Images travel as base64 JPEG data URLs. Timeouts, connection errors, HTTP 408/429/5xx are
retried with exponential back-off inside the caller's time budget. The API key is read from
the environment variable named by ``vlm.api_key_env`` and never logged.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlm_vpr.backends.vlm import (
    VlmTimeoutError,
    VlmUnavailableError,
    parse_json_object,
    prepare_image_rgb,
    quote_answer,
)
from vlm_vpr.core.config import VlmConfig
from vlm_vpr.core.errors import VlmError, VlmOutputError

log = logging.getLogger(__name__)

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class _Transient(Exception):
    """A failure worth retrying; ``error`` is raised when no attempt is left."""

    def __init__(self, error: VlmError) -> None:
        super().__init__(str(error))
        self.error = error


class OpenAiVlm:
    """VlmClient for an OpenAI-compatible HTTP server."""

    def __init__(self, config: VlmConfig) -> None:
        self.config = config
        self.model_name = config.model
        self.url = config.base_url.rstrip('/') + '/chat/completions'

    def ask_json(
        self, prompt: str, images_bgr: Sequence[np.ndarray], timeout_s: float
    ) -> dict[str, Any]:
        body = json.dumps(self._request(prompt, images_bgr)).encode()
        deadline = time.monotonic() + timeout_s
        wait_s = self.config.retry_backoff_s
        error: VlmError = VlmTimeoutError(f'no time left to ask {self.url}')
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(max(0.0, min(wait_s, deadline - time.monotonic())))
                wait_s *= 2
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                break
            try:
                return _parse_reply(self._post(body, min(self.config.timeout_s, remaining_s)))
            except _Transient as failure:
                error = failure.error
                log.warning(
                    'VLM request %d/%d failed: %s', attempt + 1, self.config.retries + 1, error
                )
        raise error

    def _request(self, prompt: str, images_bgr: Sequence[np.ndarray]) -> dict[str, Any]:
        import cv2

        content: list[dict[str, Any]] = []
        for image in images_bgr:
            bgr = cv2.cvtColor(
                prepare_image_rgb(image, self.config.image_size_px), cv2.COLOR_RGB2BGR
            )
            ok, jpeg = cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                raise VlmError('could not JPEG-encode an image for the VLM request')
            url = 'data:image/jpeg;base64,' + base64.b64encode(jpeg.tobytes()).decode('ascii')
            content.append({'type': 'image_url', 'image_url': {'url': url}})
        content.append({'type': 'text', 'text': prompt})
        request: dict[str, Any] = {
            'model': self.config.model,
            'messages': [{'role': 'user', 'content': content}],
            'max_tokens': self.config.max_new_tokens,
            'temperature': 0.0,
        }
        if self.config.json_mode:
            request['response_format'] = {'type': 'json_object'}
        return request

    def _post(self, body: bytes, timeout_s: float) -> bytes:
        headers = {'Content-Type': 'application/json'}
        api_key = os.environ.get(self.config.api_key_env, '')
        if api_key:
            headers['Authorization'] = f'Bearer {api_key}'
        request = urllib.request.Request(self.url, data=body, headers=headers, method='POST')
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode('utf-8', 'replace')
            error = VlmUnavailableError(
                f'{self.url} answered HTTP {exc.code}: '
                f'{quote_answer(detail)}{_http_hint(exc.code)}'
            )
            if exc.code in _TRANSIENT_STATUS:
                raise _Transient(error) from exc
            raise error from exc
        except TimeoutError as exc:
            raise _Transient(
                VlmTimeoutError(f'{self.url} did not answer within {timeout_s:.1f} s')
            ) from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _Transient(
                    VlmTimeoutError(f'{self.url} did not answer within {timeout_s:.1f} s')
                ) from exc
            raise _Transient(
                VlmUnavailableError(
                    f'cannot reach {self.url} ({exc.reason}); start the server or fix vlm.base_url'
                )
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(
                VlmUnavailableError(f'connection to {self.url} failed ({exc!r}); check the server')
            ) from exc


def _parse_reply(raw: bytes) -> dict[str, Any]:
    """The JSON object in the first choice's message; refusals and odd replies raise."""
    try:
        reply = json.loads(raw)
        message = reply['choices'][0]['message']
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise VlmOutputError(
            'server reply is not an OpenAI chat completion: '
            f'{quote_answer(raw.decode("utf-8", "replace"))}'
        ) from exc
    if not isinstance(message, dict):
        raise VlmOutputError(
            f'chat completion message is not an object: {quote_answer(str(message))}'
        )
    if message.get('refusal'):
        raise VlmOutputError(f'the model refused: {quote_answer(str(message["refusal"]))}')
    content = message.get('content')
    if not isinstance(content, str):
        raise VlmOutputError(f'chat completion has no text content: {quote_answer(str(message))}')
    return parse_json_object(content)


def _http_hint(code: int) -> str:
    if code in (401, 403):
        return '; put a valid API key in the environment variable named by vlm.api_key_env'
    if code == 404:
        return '; check vlm.base_url (it usually ends in /v1) and vlm.model'
    if code == 400:
        return '; if the server rejects response_format, set vlm.json_mode to false'
    return ''
