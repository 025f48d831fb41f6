"""Test doubles and builders for the VLM tests: a scripted VLM client (a real VLM giving chosen
answers cannot run here), a fake OpenAI-compatible HTTP server on 127.0.0.1, and a small
synthetic map whose thumbnails are solid colours."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from vlm_vpr.backends.rerank import Query
from vlm_vpr.core.config import MapBuildConfig
from vlm_vpr.core.map_format import MapContent, VprMap, read_map, write_map
from vlm_vpr.core.types import Candidate, Pose

PALETTE = np.array(
    [(b, g, r) for b in (0, 120, 240) for g in (0, 120, 240) for r in (0, 240)], dtype=np.uint8
)  # 18 well-separated BGR colours


def colour_image(index: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A [H x W x 3] uint8 BGR image of palette colour ``index``."""
    return np.broadcast_to(PALETTE[index], (*size, 3)).copy()


def image_index(image_bgr: np.ndarray) -> int:
    """The palette index nearest to the image's mean colour (survives JPEG and resizing)."""
    mean = image_bgr.reshape(-1, 3).mean(axis=0)
    return int(np.argmin(((PALETTE.astype(np.float64) - mean) ** 2).sum(axis=1)))


def make_map(
    tmp_path: Path,
    positions_xy: Sequence[tuple[float, float]],
    thumbnails: bool = True,
    dim: int = 8,
) -> VprMap:
    """A written-and-read map; map image j has thumbnail colour j and a random descriptor."""
    n = len(positions_xy)
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(n, dim)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    codebook = rng.normal(size=(4, 3)).astype(np.float32)
    codebook /= np.linalg.norm(codebook, axis=1, keepdims=True)
    content = MapContent(
        build_config=MapBuildConfig(),
        codebook=codebook,
        descriptors=descriptors.astype(np.float16),
        image_names=[f'{j:03d}.jpg' for j in range(n)],
        poses=[Pose.from_yaw(x, y, 0.0) for x, y in positions_xy],
        thumbnails=[_jpeg(colour_image(j)) for j in range(n)] if thumbnails else None,
    )
    return read_map(write_map(content, tmp_path / 'map'))


def _jpeg(image_bgr: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode('.jpg', image_bgr)[1].tobytes()


class ScriptedVlm:
    """Test double of a VlmClient: ``answer(prompt, images_bgr)`` returns the parsed JSON
    object (or raises); every call is recorded, and ``delay_s`` simulates generation time."""

    model_name = 'scripted-vlm'

    def __init__(
        self, answer: Callable[[str, list[np.ndarray]], dict[str, Any]], delay_s: float = 0.0
    ) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.calls: list[tuple[str, list[int], float]] = []  # prompt, image indices, timeout

    def ask_json(
        self, prompt: str, images_bgr: Sequence[np.ndarray], timeout_s: float
    ) -> dict[str, Any]:
        self.calls.append((prompt, [image_index(i) for i in images_bgr], timeout_s))
        time.sleep(self.delay_s)
        return self.answer(prompt, list(images_bgr))


class FakeOpenAIServer:
    """Test double of an OpenAI-compatible server on 127.0.0.1 (an ephemeral port).

    ``replies`` is consumed in order, one per request: (HTTP status, body bytes or a dict sent
    as JSON, delay in seconds before answering). Requests are recorded as (headers, JSON body).
    ``trickle_s`` > 0 sends each body 10 bytes at a time, ``trickle_s`` apart (a slow server
    that is never silent for long); ``headers`` are added to every reply.
    """

    def __init__(
        self,
        replies: list[tuple[int, bytes | dict[str, Any], float]],
        trickle_s: float = 0.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.replies = list(replies)
        self.trickle_s = trickle_s
        self.headers = headers or {}
        self.requests: list[tuple[dict[str, str], dict[str, Any] | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - recorded (a redirected POST comes as a GET)
                server.requests.append(({k.lower(): v for k, v in self.headers.items()}, None))
                self.send_error(405)

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                length = int(self.headers.get('Content-Length', 0))
                body = json.loads(self.rfile.read(length))
                server.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status, payload, delay_s = server.replies.pop(0)
                time.sleep(delay_s)
                data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
                try:
                    self.send_response(status)
                    self.send_header('Content-Type', 'application/json')
                    self.send_header('Content-Length', str(len(data)))
                    for name, value in server.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    step = 10 if server.trickle_s > 0 else max(1, len(data))
                    for start in range(0, len(data), step):
                        self.wfile.write(data[start : start + step])
                        self.wfile.flush()
                        time.sleep(server.trickle_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f'http://127.0.0.1:{self._httpd.server_address[1]}/v1'
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), daemon=True
        )

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def chat_reply(content: str, **message: Any) -> dict[str, Any]:
    """An OpenAI chat-completion response whose first message has ``content``."""
    return {
        'id': 'x',
        'object': 'chat.completion',
        'choices': [
            {
                'index': 0,
                'finish_reason': 'stop',
                'message': {'role': 'assistant', 'content': content, **message},
            }
        ],
    }


def make_candidates(
    vpr_map: VprMap, ids: Sequence[int], coarse_scores: Sequence[float]
) -> list[Candidate]:
    """Candidates for map ids ``ids`` with the given coarse scores (score = coarse score)."""
    return [
        Candidate(
            int(j), vpr_map.content.image_names[j], vpr_map.content.poses[j], float(s), float(s)
        )
        for j, s in zip(ids, coarse_scores)
    ]


def make_query(colour: int, budget_s: float = 30.0, dim: int = 8) -> Query:
    """A query whose image is palette colour ``colour``; deadline ``budget_s`` from now."""
    descriptor = np.zeros(dim, np.float32)
    descriptor[0] = 1.0
    return Query(
        colour_image(colour), descriptor, time.monotonic() + budget_s, time_budget_s=budget_s
    )
