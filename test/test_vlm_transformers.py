"""The transformers backend end to end on a tiny LLaVA built offline (random weights, a BPE
tokenizer trained here): chat template, image preprocessing, generation, parsing, failures."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import jinja2
import numpy as np
import pytest
from vlm_doubles import colour_image, make_candidates, make_map, make_query

from vlm_vpr.backends.rerank import create_rerankers
from vlm_vpr.backends.vlm import VlmTimeoutError, VlmUnavailableError, create_vlm_client
from vlm_vpr.backends.vlm.hf_transformers import TransformersVlm
from vlm_vpr.backends.vlm.tasks import describe_image, describe_prompt
from vlm_vpr.core.config import LocalizerConfig, RerankConfig, VlmConfig
from vlm_vpr.core.errors import ConfigError, VlmError, VlmOutputError

torch = pytest.importorskip('torch')

ANSWER = (
    '{"descriptions": [{"text": "red brick arch", "weight": 2}, '
    '{"text": "stone fountain", "weight": 1}]}'
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    '{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}'
)


@pytest.fixture(scope='module', autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> None:
    mp = pytest.MonkeyPatch()
    mp.setenv('HF_HUB_OFFLINE', '1')
    mp.setenv('TRANSFORMERS_OFFLINE', '1')
    torch.set_num_threads(1)
    yield
    mp.undo()


def build_tiny_llava(folder: Path) -> Path:
    """Save a random-initialised LLaVA (CLIP vision tower + Llama) and its processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=['<pad>', '<s>', '</s>', '<image>'],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([ANSWER, describe_prompt(3)] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token='<s>',
        eos_token='</s>',
        pad_token='<pad>',
        extra_special_tokens={'image_token': '<image>'},
    )
    image_processor = CLIPImageProcessor(
        size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy='default',
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids('<image>'),
        vision_feature_layer=-1,
        vision_feature_select_strategy='default',
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def teach_answer(client: TransformersVlm, prompt: str, answer: str, folder: Path) -> Path:
    """Fine-tune the loaded tiny model until it answers ``answer`` to ``prompt``; save it."""
    from PIL import Image

    model, processor = client.model, client.processor
    rng = np.random.default_rng(0)
    answer_ids = processor.tokenizer(
        answer + '</s>', add_special_tokens=False, return_tensors='pt'
    )['input_ids']
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(150):  # noise or flat colours, one or two images: any test input is familiar
        content: list[dict[str, object]] = []
        for _ in range(1 + step % 3 // 2):
            shape = (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3)
            pixels = (
                rng.integers(0, 255, shape)
                if step % 2
                else np.broadcast_to(rng.integers(0, 255, 3), shape)
            )
            content.append({'type': 'image', 'image': Image.fromarray(pixels.astype(np.uint8))})
        inputs = processor.apply_chat_template(
            [{'role': 'user', 'content': [*content, {'type': 'text', 'text': prompt}]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors='pt',
        )
        ids = torch.cat([inputs['input_ids'], answer_ids], dim=1)
        labels = ids.clone()
        labels[:, : inputs['input_ids'].shape[1]] = -100
        loss = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=inputs['pixel_values'],
            labels=labels,
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp('tiny_llava'))


@pytest.fixture(scope='module')
def taught_llava(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    client = TransformersVlm(VlmConfig(backend='transformers', model=str(tiny_llava)))
    return teach_answer(client, describe_prompt(3), ANSWER, tmp_path_factory.mktemp('taught'))


def config_for(folder: Path, **overrides: object) -> VlmConfig:
    fields = dict(backend='transformers', model=str(folder), max_new_tokens=64, image_size_px=64)
    fields.update(overrides)
    return VlmConfig(**fields)


def test_transformers_client_turns_garbage_generation_into_an_output_error(
    tiny_llava: Path,
) -> None:
    client = create_vlm_client(config_for(tiny_llava))
    assert isinstance(client, TransformersVlm)
    with pytest.raises(VlmOutputError, match='VLM answer'):
        describe_image(client, colour_image(1, (90, 160)), 3, 30.0)


def test_transformers_client_returns_validated_descriptions_from_a_model_that_answers_json(
    taught_llava: Path,
) -> None:
    client = create_vlm_client(config_for(taught_llava))
    described = describe_image(client, colour_image(4, (120, 90)), 3, 30.0)
    assert [d.text for d in described] == ['red brick arch', 'stone fountain']
    assert [d.weight for d in described] == pytest.approx([2 / 3, 1 / 3])


def test_transformers_client_accepts_several_images_in_one_prompt(taught_llava: Path) -> None:
    client = create_vlm_client(config_for(taught_llava))
    answer = client.ask_json(
        describe_prompt(3), [colour_image(0), colour_image(5, (30, 300))], 30.0
    )
    assert answer['descriptions'][0] == {'text': 'red brick arch', 'weight': 2}


def test_transformers_client_reports_a_timeout_when_generation_hits_the_budget(
    tiny_llava: Path,
) -> None:
    client = create_vlm_client(config_for(tiny_llava, max_new_tokens=4096))
    with pytest.raises(VlmTimeoutError, match='time limit'):
        client.ask_json('describe', [colour_image(0)], 0.05)
    with pytest.raises(VlmTimeoutError, match='no time left'):
        client.ask_json('describe', [colour_image(0)], 0.0)


def test_transformers_client_gives_generation_only_the_time_left_after_preprocessing(
    tiny_llava: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = create_vlm_client(config_for(tiny_llava, max_new_tokens=4096))
    client.model.generation_config.eos_token_id = None  # generate until a limit stops it
    prepare = client.processor.apply_chat_template

    def slow_prepare(*args: object, **kwargs: object) -> object:
        time.sleep(1.5)  # stands in for a big VLM's image preprocessing
        return prepare(*args, **kwargs)

    monkeypatch.setattr(client.processor, 'apply_chat_template', slow_prepare)
    start = time.monotonic()
    with pytest.raises(VlmTimeoutError, match='time limit'):
        client.ask_json('describe', [colour_image(0)], 2.0)
    assert time.monotonic() - start < 2.75  # was 1.5 s + a full 2.0 s of generation


def test_transformers_client_does_not_generate_when_preprocessing_spent_the_budget(
    tiny_llava: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = create_vlm_client(config_for(tiny_llava))
    prepare = client.processor.apply_chat_template

    def slow_prepare(*args: object, **kwargs: object) -> object:
        time.sleep(0.3)
        return prepare(*args, **kwargs)

    def generate(**kwargs: object) -> None:
        raise AssertionError(f'generate called with max_time={kwargs.get("max_time")}')

    monkeypatch.setattr(client.processor, 'apply_chat_template', slow_prepare)
    monkeypatch.setattr(client.model, 'generate', generate)
    with pytest.raises(VlmTimeoutError, match='preparing the images took the whole 0.2 s'):
        client.ask_json('describe', [colour_image(0)], 0.2)


@pytest.mark.parametrize(
    'error',
    [
        jinja2.TemplateError('unknown tag "vision_start"'),  # a chat template the processor
        IndexError('image token count does not match the images'),  # a processor's own error
    ],
)
def test_transformers_client_turns_any_failure_of_the_model_code_into_a_vlm_error(
    tiny_llava: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """A VlmError, which every VLM re-ranker notes and falls back from (see the garbage-model
    re-ranker test below)."""
    client = create_vlm_client(config_for(tiny_llava))

    def broken(*args: object, **kwargs: object) -> object:
        raise error

    monkeypatch.setattr(client.processor, 'apply_chat_template', broken)
    with pytest.raises(VlmError, match=f'failed to run \\({type(error).__name__}: '):
        client.ask_json('describe', [colour_image(0)], 30.0)


def test_transformers_client_names_max_new_tokens_when_the_answer_is_cut(
    taught_llava: Path,
) -> None:
    client = create_vlm_client(config_for(taught_llava, max_new_tokens=16))
    with pytest.raises(VlmOutputError, match=r'max_new_tokens = 16\).*raise vlm.max_new_tokens'):
        describe_image(client, colour_image(4, (120, 90)), 3, 30.0)


def test_transformers_client_says_a_text_only_model_folder_is_not_a_vision_model(
    tiny_llava: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaConfig

    folder = tmp_path / 'text_only'  # the tiny LLaVA's language model alone
    LlamaForCausalLM(LlavaConfig.from_pretrained(tiny_llava).text_config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llava).save_pretrained(folder)
    with pytest.raises(
        VlmUnavailableError, match='image-text-to-text \\(vision chat\\) model'
    ) as e:
        TransformersVlm(config_for(folder))
    assert 'hub id' not in str(e.value)


def test_transformers_client_loads_a_model_folder_given_with_a_tilde(
    tiny_llava: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv('HOME', str(tiny_llava.parent))
    client = TransformersVlm(config_for(Path('~') / tiny_llava.name))
    assert client.model_name == f'~/{tiny_llava.name}'  # as configured


def test_transformers_client_reports_a_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(VlmUnavailableError, match='cannot load VLM'):
        TransformersVlm(config_for(tmp_path / 'no_such_model'))


def test_transformers_client_rejects_a_model_without_chat_template(
    tiny_llava: Path, tmp_path: Path
) -> None:
    folder = tmp_path / 'no_template'
    shutil.copytree(tiny_llava, folder)
    (folder / 'chat_template.jinja').unlink()
    with pytest.raises(ConfigError, match='no chat template'):
        TransformersVlm(config_for(folder))


def test_bnb_4bit_quantization_needs_a_cuda_device(tiny_llava: Path) -> None:
    with pytest.raises(ConfigError, match="'bnb-4bit' needs a CUDA device"):
        TransformersVlm(config_for(tiny_llava, quantization='bnb-4bit'))


@pytest.mark.parametrize(
    'quantization, device, package',
    [('bnb-4bit', 'cuda', 'bitsandbytes'), ('torchao-int8', 'cpu', 'torchao')],
)
def test_quantization_without_its_package_names_the_package_to_install(
    tiny_llava: Path, monkeypatch: pytest.MonkeyPatch, quantization: str, device: str, package: str
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        'find_spec',
        lambda name, *a: None if name == package else real_find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match=f"needs the '{package}' package: pip install {package}"):
        TransformersVlm(config_for(tiny_llava, quantization=quantization, device=device))


def test_a_reranker_on_the_garbage_model_notes_the_failure_and_keeps_the_coarse_order(
    tiny_llava: Path, tmp_path: Path
) -> None:
    vpr_map = make_map(tmp_path, [(0, 0), (5, 0), (10, 0)])
    cfg = LocalizerConfig(rerank=RerankConfig(chain=('pairwise',)), vlm=config_for(tiny_llava))
    (reranker,) = create_rerankers(cfg, vpr_map)
    query = make_query(9)
    ranked = reranker.rerank(
        query, make_candidates(vpr_map, [2, 0, 1], [0.5, 0.49, 0.48]), vpr_map
    )
    assert [c.map_index for c in ranked] == [2, 0, 1]
    assert query.notes[0].startswith('pairwise: VlmOutputError: VLM answer')
    assert reranker.stats['vlm_calls'] == 1 and reranker.stats['failures'] == 1
