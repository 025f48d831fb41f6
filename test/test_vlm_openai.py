"""The OpenAI-compatible HTTP backend against a fake server on 127.0.0.1."""

from __future__ import annotations

import base64
import logging
import socket
import time

import cv2
import numpy as np
import pytest
from vlm_doubles import (
    FakeOpenAIServer,
    chat_reply,
    colour_image,
    make_candidates,
    make_map,
    make_query,
)

from vlm_vpr.backends.rerank.pointwise import PointwiseReranker
from vlm_vpr.backends.vlm import VlmTimeoutError, VlmUnavailableError, create_vlm_client
from vlm_vpr.backends.vlm.openai_http import OpenAiVlm
from vlm_vpr.backends.vlm.tasks import describe_image
from vlm_vpr.core.config import LocalizerConfig, RerankConfig, VlmConfig
from vlm_vpr.core.errors import VlmOutputError

GOOD = (
    '{"descriptions": [{"text": "a glass atrium", "weight": 3}, '
    '{"text": "a tall palm", "weight": 1}]}'
)


def client_for(server: FakeOpenAIServer, **overrides: object) -> OpenAiVlm:
    fields = dict(
        backend='openai',
        model='tiny-vlm',
        base_url=server.base_url,
        timeout_s=5.0,
        retries=0,
        retry_backoff_s=0.01,
        image_size_px=64,
        api_key_env='VLM_VPR_TEST_KEY',
    )
    fields.update(overrides)
    client = create_vlm_client(VlmConfig(**fields))
    assert isinstance(client, OpenAiVlm)
    return client


def test_openai_client_returns_validated_descriptions_and_sends_the_image_as_base64_jpeg(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv('VLM_VPR_TEST_KEY', 'sk-secret-123')
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer([(200, chat_reply(GOOD), 0.0)]) as server:
        described = describe_image(client_for(server), colour_image(3, (120, 200)), 3, 5.0)
    assert [d.text for d in described] == ['a glass atrium', 'a tall palm']
    assert [d.weight for d in described] == pytest.approx([0.75, 0.25])
    headers, body = server.requests[0]
    assert headers['authorization'] == 'Bearer sk-secret-123'
    assert body['model'] == 'tiny-vlm'
    assert body['response_format'] == {'type': 'json_object'}
    image_part, text_part = body['messages'][0]['content']
    assert text_part['type'] == 'text' and '"descriptions"' in text_part['text']
    prefix = 'data:image/jpeg;base64,'
    assert image_part['image_url']['url'].startswith(prefix)
    jpeg = base64.b64decode(image_part['image_url']['url'][len(prefix) :])
    sent = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert max(sent.shape[:2]) == 64  # shrunk to vlm.image_size_px
    assert 'sk-secret-123' not in caplog.text


def test_openai_client_omits_response_format_when_json_mode_is_off() -> None:
    with FakeOpenAIServer([(200, chat_reply('{"score": 4}'), 0.0)]) as server:
        answer = client_for(server, json_mode=False).ask_json('rate', [colour_image(0)], 5.0)
    assert answer == {'score': 4}
    assert 'response_format' not in server.requests[0][1]


def test_openai_client_raises_an_output_error_on_malformed_json() -> None:
    with FakeOpenAIServer([(200, chat_reply('{"descriptions": [{"text": "a'), 0.0)]) as server:
        with pytest.raises(VlmOutputError, match='not JSON'):
            client_for(server).ask_json('describe', [colour_image(0)], 5.0)


def test_openai_client_raises_an_output_error_on_a_refusal() -> None:
    reply = chat_reply(None, refusal='I cannot help with that.')
    with FakeOpenAIServer([(200, reply, 0.0)]) as server:
        with pytest.raises(VlmOutputError, match='refused'):
            client_for(server).ask_json('describe', [colour_image(0)], 5.0)


def test_openai_client_raises_an_output_error_on_a_reply_that_is_not_a_chat_completion() -> None:
    with FakeOpenAIServer([(200, b'<html>gateway</html>', 0.0)]) as server:
        with pytest.raises(VlmOutputError, match='not an OpenAI chat completion'):
            client_for(server).ask_json('describe', [colour_image(0)], 5.0)


def test_openai_client_times_out_on_a_reply_slower_than_the_timeout() -> None:
    with FakeOpenAIServer([(200, chat_reply(GOOD), 3.0)]) as server:
        start = time.monotonic()
        with pytest.raises(VlmTimeoutError, match='did not answer within 0.3 s'):
            client_for(server, timeout_s=0.3).ask_json('describe', [colour_image(0)], 5.0)
        assert time.monotonic() - start < 2.0  # 0.3 s, not the reply's 3 s


def test_openai_client_stops_retrying_when_the_callers_budget_is_spent() -> None:
    replies = [(200, chat_reply(GOOD), 3.0)] * 3
    with FakeOpenAIServer(replies) as server:
        start = time.monotonic()
        with pytest.raises(VlmTimeoutError):
            client_for(server, timeout_s=5.0, retries=2).ask_json('d', [colour_image(0)], 0.4)
        assert time.monotonic() - start < 2.0  # the 0.4 s budget, not a 3 s reply
        assert len(server.requests) == 1


def test_openai_client_retries_an_http_500_and_returns_the_next_answer() -> None:
    with FakeOpenAIServer(
        [(500, b'overloaded', 0.0), (200, chat_reply('{"score": 9}'), 0.0)]
    ) as server:
        answer = client_for(server, retries=1).ask_json('rate', [colour_image(0)], 5.0)
    assert answer == {'score': 9}
    assert len(server.requests) == 2


def test_openai_client_reports_http_500_once_retries_are_used_up() -> None:
    with FakeOpenAIServer([(500, b'boom', 0.0)] * 2) as server:
        with pytest.raises(VlmUnavailableError, match='HTTP 500'):
            client_for(server, retries=1).ask_json('rate', [colour_image(0)], 5.0)
    assert len(server.requests) == 2


def test_openai_client_does_not_retry_http_401_and_names_the_key_variable() -> None:
    with FakeOpenAIServer([(401, b'{"error": "bad key"}', 0.0)] * 2) as server:
        with pytest.raises(VlmUnavailableError, match='HTTP 401.*vlm.api_key_env'):
            client_for(server, retries=1).ask_json('rate', [colour_image(0)], 5.0)
    assert len(server.requests) == 1


def test_openai_client_reports_a_refused_connection() -> None:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    config = VlmConfig(
        backend='openai',
        model='m',
        base_url=f'http://127.0.0.1:{port}/v1',
        retries=1,
        retry_backoff_s=0.01,
    )
    with pytest.raises(VlmUnavailableError, match='cannot reach .*start the server'):
        OpenAiVlm(config).ask_json('rate', [colour_image(0)], 5.0)


def test_openai_client_times_out_on_a_server_that_trickles_its_answer() -> None:
    # 10 bytes every 0.2 s: never silent for the 1 s timeout, but done only after ~4 s
    with FakeOpenAIServer([(200, chat_reply(GOOD), 0.0)], trickle_s=0.2) as server:
        start = time.monotonic()
        with pytest.raises(VlmTimeoutError, match='did not answer within 1.0 s'):
            client_for(server, timeout_s=1.0).ask_json('describe', [colour_image(0)], 5.0)
        assert time.monotonic() - start < 2.5  # 1 s, not the ~4 s the whole answer takes


def test_openai_client_reads_a_slowly_sent_answer_that_ends_in_time() -> None:
    with FakeOpenAIServer([(200, chat_reply('{"score": 4}'), 0.0)], trickle_s=0.01) as server:
        assert client_for(server).ask_json('rate', [colour_image(0)], 5.0) == {'score': 4}


@pytest.mark.parametrize('key', ['sk-secret\r\nX-Injected: 1', 'sk-\u2013secret', 'sk-\tsecret'])
def test_openai_client_rejects_an_api_key_no_header_can_carry_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv('VLM_VPR_TEST_KEY', key)
    with FakeOpenAIServer([(200, chat_reply('{"score": 1}'), 0.0)]) as server:
        with pytest.raises(
            VlmUnavailableError, match=r"'VLM_VPR_TEST_KEY' \(vlm.api_key_env\)"
        ) as caught:
            client_for(server, retries=1).ask_json('rate', [colour_image(0)], 5.0)
    assert server.requests == []
    assert 'secret' not in str(caught.value)


def test_openai_client_strips_white_space_around_the_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv('VLM_VPR_TEST_KEY', ' sk-secret-123\n')  # as `cat keyfile` gives it
    with FakeOpenAIServer([(200, chat_reply('{"score": 1}'), 0.0)]) as server:
        assert client_for(server).ask_json('rate', [colour_image(0)], 5.0) == {'score': 1}
    assert server.requests[0][0]['authorization'] == 'Bearer sk-secret-123'


@pytest.mark.parametrize('host', ['[::1', 'a' * 64])
def test_openai_client_reports_a_base_url_http_client_refuses_without_raising_it_raw(
    host: str,
) -> None:
    config = VlmConfig(backend='openai', model='m', base_url=f'http://{host}/v1', retries=0)
    with pytest.raises(VlmUnavailableError, match='failed .*check vlm.base_url'):
        OpenAiVlm(config).ask_json('rate', [colour_image(0)], 5.0)


def test_openai_client_names_max_new_tokens_when_the_answer_is_cut_at_the_limit() -> None:
    cut = chat_reply('{"descriptions": [{"text": "a long red brick wall with a row of')
    cut['choices'][0]['finish_reason'] = 'length'
    complete = chat_reply('{"score": 6}')
    complete['choices'][0]['finish_reason'] = 'length'
    with FakeOpenAIServer([(200, cut, 0.0), (200, complete, 0.0)]) as server:
        client = client_for(server, max_new_tokens=32)
        with pytest.raises(VlmOutputError, match=r'vlm.max_new_tokens = 32\).*raise vlm.max_new'):
            client.ask_json('describe', [colour_image(0)], 5.0)
        assert client.ask_json('rate', [colour_image(0)], 5.0) == {'score': 6}


@pytest.mark.parametrize('json_mode', [True, False])
def test_openai_client_http_400_hint_fits_the_json_mode_setting(json_mode: bool) -> None:
    body = b'{"error": "image input is not supported - you may need to provide the mmproj"}'
    with FakeOpenAIServer([(400, body, 0.0)]) as server:
        with pytest.raises(VlmUnavailableError, match='HTTP 400') as caught:
            client_for(server, json_mode=json_mode).ask_json('rate', [colour_image(0)], 5.0)
    message = str(caught.value)
    assert '--mmproj' in message and 'context size' in message
    assert ('set vlm.json_mode false' in message) == json_mode


@pytest.mark.parametrize(
    'answer',
    ['{"score": ' + '9' * 400 + '}', '{"score": ' + '9' * 5000 + '}', '[' * 3000 + ']' * 3000],
    ids=['400 digits', '5000 digits', 'deep nesting'],
)
def test_a_reranker_notes_a_garbage_answer_from_the_server_and_keeps_the_order(
    tmp_path, answer: str
) -> None:
    vpr_map = make_map(tmp_path, [(10.0 * j, 0.0) for j in range(3)])
    config = LocalizerConfig(rerank=RerankConfig(vlm_always=True))
    with FakeOpenAIServer([(200, chat_reply(answer), 0.0)] * 3) as server:
        reranker = PointwiseReranker(config, vpr_map, client_for(server))
        query = make_query(3)
        candidates = make_candidates(vpr_map, [0, 1, 2], [0.7, 0.9, 0.8])  # not score order
        ranked = reranker.rerank(query, candidates, vpr_map)
    assert [c.map_index for c in ranked] == [0, 1, 2]
    assert query.notes[0].startswith('pointwise: VlmOutputError: ')
    assert reranker.stats['failures'] == 1


def test_openai_client_follows_no_redirect_and_names_where_it_points(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv('VLM_VPR_TEST_KEY', 'sk-secret-123')
    with FakeOpenAIServer([(200, chat_reply(GOOD), 0.0)]) as elsewhere:
        moved = {'Location': elsewhere.base_url + '/chat/completions'}
        with FakeOpenAIServer([(302, b'', 0.0)], headers=moved) as server:
            with pytest.raises(VlmUnavailableError, match='HTTP 302.*redirects to http'):
                client_for(server).ask_json('describe', [colour_image(0)], 5.0)
    assert elsewhere.requests == []  # the API key went nowhere else


def test_openai_client_never_quotes_a_key_the_server_sends_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv('VLM_VPR_TEST_KEY', 'sk-secret-123')
    echo = b'{"error": "invalid api key sk-secret-123"}'
    replies = [(500, echo, 0.0), (401, echo, 0.0), (200, echo, 0.0)]
    with FakeOpenAIServer(replies) as server:
        with pytest.raises(VlmUnavailableError, match='HTTP 401') as unavailable:
            client_for(server, retries=1).ask_json('describe', [colour_image(0)], 5.0)
        with pytest.raises(VlmOutputError, match='not an OpenAI chat completion') as odd:
            client_for(server).ask_json('describe', [colour_image(0)], 5.0)
    said = [str(unavailable.value), str(odd.value), caplog.text]
    assert all('<api key>' in text for text in said)
    assert not any('sk-secret-123' in text for text in said)


def test_openai_client_refuses_a_reply_too_large_for_a_chat_completion() -> None:
    huge = b'{"choices": "' + b'x' * 9_000_000 + b'"}'
    with FakeOpenAIServer([(200, huge, 0.0)]) as server:
        with pytest.raises(VlmOutputError, match='reply over 8 MB'):
            client_for(server).ask_json('describe', [colour_image(0)], 5.0)


def test_openai_client_bounds_a_slow_name_lookup_by_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolve = socket.getaddrinfo

    def slow_resolver(host: str, *args: object, **kwargs: object) -> object:
        if host == 'gpu-box.lan':
            time.sleep(3.0)  # a resolver that does not answer (no DNS on the robot's network)
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, 'getaddrinfo', slow_resolver)
    client = OpenAiVlm(VlmConfig(backend='openai', model='m', base_url='http://gpu-box.lan/v1'))
    start = time.monotonic()
    with pytest.raises(VlmTimeoutError, match='did not answer within 0.5 s'):
        client.ask_json('describe', [colour_image(0)], 0.5)
    assert time.monotonic() - start < 2.0  # 0.5 s, not the lookup's 3 s


def test_a_socket_the_late_name_lookup_opens_is_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lookup finishes on its helper thread after the call gave up; the connection it then
    opens must not stay open (the deadline's timer is cancelled when the call returns)."""
    from vlm_vpr.backends.vlm import openai_http

    resolve, shut = socket.getaddrinfo, []

    def slow_resolver(host: str, *args: object, **kwargs: object) -> object:
        if host == 'gpu-box.lan':
            time.sleep(1.0)
            host = '127.0.0.1'
        return resolve(host, *args, **kwargs)

    shut_down = openai_http._shut_down
    monkeypatch.setattr(socket, 'getaddrinfo', slow_resolver)
    monkeypatch.setattr(
        openai_http, '_shut_down', lambda sock: shut.append(sock) or shut_down(sock)
    )
    with FakeOpenAIServer([]) as server:
        url = server.base_url.replace('127.0.0.1', 'gpu-box.lan')
        client = OpenAiVlm(VlmConfig(backend='openai', model='m', base_url=url, retries=0))
        with pytest.raises(VlmTimeoutError, match='did not answer within 0.3 s'):
            client.ask_json('describe', [colour_image(0)], 0.3)
        deadline = time.monotonic() + 5.0
        while not shut and time.monotonic() < deadline:  # the lookup ends 1 s after the call
            time.sleep(0.05)
        assert len(shut) == 1
