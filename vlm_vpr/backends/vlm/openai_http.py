"""A VLM behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp server,
Ollama, hosted APIs), spoken with the standard library only.

Images travel as base64 JPEG data URLs. ``vlm.timeout_s`` bounds each attempt as a whole
(name lookup, connecting, sending, and reading the answer, however slowly the server sends
it). Redirects are not followed; replies over 8 MB are refused. Timeouts,
connection errors, HTTP 408/429/5xx are retried with exponential back-off inside the caller's
time budget. The API key is read from the environment variable named by ``vlm.api_key_env``
and never logged or quoted in an error (also where a server quotes it back).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vlm_vpr.backends.vlm import (
    VlmTimeoutError,
    VlmUnavailableError,
    parse_json_answer,
    prepare_image_rgb,
    quote_answer,
)
from vlm_vpr.core.config import VlmConfig
from vlm_vpr.core.errors import VlmError, VlmOutputError

log = logging.getLogger(__name__)

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_REPLY_BYTES = 8_000_000  # a chat completion is kilobytes; more is a server fault


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
                return _parse_reply(
                    self._post(body, min(self.config.timeout_s, remaining_s)),
                    self.config.max_new_tokens,
                )
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

    def _api_key(self) -> str:
        """The API key from the environment (surrounding white space removed), or ''."""
        name = self.config.api_key_env
        api_key = os.environ.get(name, '').strip() if name else ''
        if not all(' ' <= char <= '~' for char in api_key):
            raise VlmUnavailableError(
                f'the API key in the environment variable {name!r} (vlm.api_key_env) holds a '
                'line break, control or non-ASCII character, which an HTTP header cannot '
                'carry; set it to the key alone (printable ASCII)'
            )
        return api_key

    def _post(self, body: bytes, timeout_s: float) -> bytes:
        """The body of the server's reply to one POST; everything within ``timeout_s``."""
        headers = {'Content-Type': 'application/json'}
        api_key = self._api_key()
        if api_key:
            headers['Authorization'] = f'Bearer {api_key}'
        timeout = _Transient(
            VlmTimeoutError(f'{self.url} did not answer within {timeout_s:.1f} s')
        )
        with _Deadline(timeout_s) as deadline:
            try:
                try:
                    request = urllib.request.Request(
                        self.url, data=body, headers=headers, method='POST'
                    )
                    with deadline.opener().open(request, timeout=timeout_s) as response:
                        raw = response.read(_MAX_REPLY_BYTES + 1)
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    # once the deadline has cut the connection, any failure is the timeout; a
                    # URLError wraps the socket's own timeout in .reason
                    timed_out = isinstance(exc, TimeoutError) or isinstance(
                        getattr(exc, 'reason', None), TimeoutError
                    )
                    if deadline.passed or timed_out:
                        raise timeout from exc
                    raise
            except urllib.error.HTTPError as exc:
                try:
                    detail = _without_key(exc.read(300), api_key).decode('utf-8', 'replace')
                except (OSError, http.client.HTTPException):
                    detail = ''
                hint = _http_hint(exc.code, self.config.json_mode, exc.headers.get('Location'))
                error = VlmUnavailableError(
                    f'{self.url} answered HTTP {exc.code}: {quote_answer(detail)}{hint}'
                )
                if exc.code in _TRANSIENT_STATUS:
                    raise _Transient(error) from exc
                raise error from exc
            except urllib.error.URLError as exc:
                raise _Transient(
                    VlmUnavailableError(
                        f'cannot reach {self.url} ({exc.reason}); '
                        'start the server or fix vlm.base_url'
                    )
                ) from exc
            except (ValueError, http.client.InvalidURL) as exc:  # refused by http.client
                raise VlmUnavailableError(  # _api_key refused keys http.client would reject
                    f'request to {self.url} failed ({type(exc).__name__}: {exc}); '
                    'check vlm.base_url and the server'
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(
                    VlmUnavailableError(
                        f'connection to {self.url} failed ({exc!r}); check the server'
                    )
                ) from exc
        if deadline.passed:  # the server closed the connection only when cut off
            raise timeout
        if len(raw) > _MAX_REPLY_BYTES:
            raise VlmOutputError(
                f'{self.url} sent a reply over {_MAX_REPLY_BYTES // 1_000_000} MB; a chat '
                'completion of vlm.max_new_tokens tokens is far smaller: check the server'
            )
        return _without_key(raw, api_key)


class _Deadline:
    """Cuts the connection of one request when ``timeout_s`` has passed.

    A socket timeout only bounds each read; a server that sends a few bytes at a time would
    never hit it. At the deadline a timer shuts the socket down, which ends any read or
    write in progress; ``passed`` then tells that the failure was the deadline.
    """

    def __init__(self, timeout_s: float) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(timeout_s, self._expire)
        self._end = time.monotonic() + timeout_s
        self._timer.daemon = True
        self.passed = False

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def opener(self) -> urllib.request.OpenerDirector:
        """A urllib opener whose connections this deadline watches and that follows no
        redirect (urllib would send the API key on to the new address, whatever its host)."""
        return urllib.request.build_opener(_WatchedHttp(self), _WatchedHttps(self), _NoRedirect)

    def connect(self, connect: Callable[[], None], conn: http.client.HTTPConnection) -> None:
        """Run ``connect`` (name lookup, TCP and TLS set-up) within the deadline, then watch
        the connection's socket. The lookup cannot be interrupted, so it runs on a helper
        thread; past the deadline it is left to finish there (a socket it then opens is shut
        down at once) and TimeoutError is raised here."""
        finished, errors = threading.Event(), []

        def run() -> None:
            try:
                connect()
            except BaseException as exc:  # handed to the caller
                errors.append(exc)
            finally:
                self.watch(conn.sock)
                finished.set()

        threading.Thread(target=run, daemon=True, name='vlm-connect').start()
        if not finished.wait(max(0.0, self._end - time.monotonic())):
            self._expire()  # now: the timer may not have fired yet, and leaving cancels it
            raise TimeoutError(f'connecting to {conn.host} took the whole time')
        if errors:
            raise errors[0]

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            if self.passed:
                _shut_down(sock)

    def _expire(self) -> None:
        with self._lock:
            self.passed = True
            for sock in self._sockets:
                _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
    try:  # on the plain socket, also under TLS: the reader then sees the connection end
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _Watched:
    """Mixin for urllib's HTTP(S) handlers: each new connection is shown to a _Deadline."""

    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        deadline = self.deadline

        def watched(*args: Any, **conn_kwargs: Any) -> http.client.HTTPConnection:
            conn = http_class(*args, **conn_kwargs)
            connect = conn.connect

            def connect_and_watch() -> None:
                deadline.connect(connect, conn)

            conn.connect = connect_and_watch
            return conn

        return super().do_open(watched, req, **kwargs)  # type: ignore[misc]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx reply is an HTTPError (``_http_hint`` names the new address)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _WatchedHttp(_Watched, urllib.request.HTTPHandler):
    pass


class _WatchedHttps(_Watched, urllib.request.HTTPSHandler):
    pass


def _parse_reply(raw: bytes, max_new_tokens: int) -> dict[str, Any]:
    """The JSON object in the first choice's message; refusals and odd replies raise."""
    try:
        reply = json.loads(raw)
        choice = reply['choices'][0]
        message = choice['message']
    except (ValueError, KeyError, IndexError, TypeError, RecursionError) as exc:
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
    cut = choice.get('finish_reason') == 'length'
    return parse_json_answer(content, max_new_tokens if cut else None)


def _without_key(data: bytes, api_key: str) -> bytes:
    """``data`` with the API key replaced (a server or proxy may quote the key it was sent,
    and its reply ends up in errors and logs)."""
    return data.replace(api_key.encode(), b'<api key>') if api_key else data


def _http_hint(code: int, json_mode: bool, location: str | None) -> str:
    if 300 <= code < 400:
        return (
            f'; the server redirects to {location or "another address"}: set vlm.base_url '
            'to the address that answers (redirects are not followed, so the API key goes '
            'nowhere else)'
        )
    if code in (401, 403):
        return '; put a valid API key in the environment variable named by vlm.api_key_env'
    if code == 404:
        return '; check vlm.base_url (it usually ends in /v1) and vlm.model'
    if code == 400:
        hint = (
            'check that the server takes images (llama.cpp: start it with --mmproj; vLLM, '
            'Ollama: serve a vision model) and that its context size fits the images, the '
            'prompt and vlm.max_new_tokens'
        )
        if json_mode:
            hint = f'if the server rejects response_format, set vlm.json_mode false, else {hint}'
        return f'; {hint}'
    return ''
