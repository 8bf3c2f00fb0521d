"""The 'paper' preset, per-model placement and the VLM's view of a conversation.

Tiny random checkpoints: these tests prove the mechanics (settings reach the loaders, models run
in mixed dtypes, the prompt is built as the reference builds it), never safety.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from PIL import Image

from eta_guard import ETA, ETAConfig, ETAEvaluator
from eta_guard.errors import InvalidInputError
from eta_guard.messages import Conversation, normalize_messages
from eta_guard.placement import resolve_placements
from eta_guard.presets import LLAVA_V1_SYSTEM_PROMPT, PAPER, get_preset
from eta_guard.prompting import expand_to_square, for_vlm, pad_color

#: llava-hf/llava-1.5-7b-hf chat_template.json (after its "Fix system message" commit).
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
#: Forces the aligned path on random models: every image unsafe, every answer unsafe.
ALWAYS_ALIGN = {"pre_threshold": -1.0, "post_threshold": 1e9}


def _messages(image: Image.Image, system: str | None = None) -> list[dict]:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Q?"}],
        }
    ]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


# ----------------------------------------------------------------------------- placement


def test_precedence_per_model_then_shared_then_preset():
    places = resolve_placements(
        device="cpu",
        dtype=None,
        vlm_kwargs={"dtype": "float32"},
        reward_model_kwargs={"device": "cuda:1", "model_kwargs": {"device_map": "auto"}},
        preset="paper",
    )
    assert places["vlm"].dtype == "float32"  # per-model beats the preset
    assert places["vlm"].autocast_dtype == "bfloat16"  # from the preset
    assert places["clip"].dtype == "float32" and places["clip"].device == "cpu"
    assert places["reward_model"].device == "cuda:1"
    assert places["reward_model"].dtype == "bfloat16"
    assert places["reward_model"].kwargs == {"model_kwargs": {"device_map": "auto"}}
    shared = resolve_placements(dtype="float16", preset="paper", device="cpu")
    assert {p.dtype for p in shared.values()} == {"float16"}  # shared explicit beats the preset


def test_preset_vlm_dtype_depends_on_the_device():
    # torch's CPU autocast cannot run float16 weights under bfloat16: bf16 weights on the CPU.
    assert resolve_placements(preset="paper", device="cpu")["vlm"].dtype == "bfloat16"
    assert resolve_placements(preset="paper", device="cuda:0")["vlm"].dtype == "float16"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vlm_kwargs": ["cpu"]}, "vlm_kwargs must be a dict"),
        ({"clip_kwargs": {"autocast_dtype": "bfloat16"}}, "VLM setting"),
        ({"reward_model_kwargs": {"dtype": "int4"}}, "reward_model dtype"),
        ({"vlm_kwargs": {"autocast_dtype": "auto"}}, "autocast_dtype"),
        ({"preset": "papers"}, "preset='papers' is not known"),
    ],
)
def test_bad_placement_raises(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        resolve_placements(**kwargs)


def test_placement_reaches_each_loader(tiny_checkpoints):
    """Per-model device/dtype/quantization_config/device_map arrive at the right loader."""
    ck = tiny_checkpoints
    quant = object()
    seen: dict[str, dict] = {}

    def recorder(role):
        def load(name, **kwargs):
            seen[role] = kwargs
            return mock.MagicMock(name=role)

        return load

    with (
        mock.patch("eta_guard.pipeline.VLMAdapter.from_pretrained", recorder("vlm")),
        mock.patch("eta_guard.evaluators.clip.CLIPPreEvaluator.from_pretrained", recorder("clip")),
        mock.patch(
            "eta_guard.evaluators.reward.RewardPostEvaluator.from_pretrained",
            recorder("reward_model"),
        ),
    ):
        ETA.from_pretrained(
            ck.vlm,
            clip=ck.clip,
            reward_model=ck.reward_model,
            device="cpu",
            dtype="float32",
            vlm_kwargs={"model_kwargs": {"device_map": {"": "cpu"}}},
            clip_kwargs={"device": "cpu", "dtype": "bfloat16"},
            reward_model_kwargs={
                "dtype": "float16",
                "model_kwargs": {"quantization_config": quant},
            },
        )
    assert seen["vlm"]["device"] == "cpu" and seen["vlm"]["dtype"] == "float32"
    assert seen["vlm"]["model_kwargs"] == {"device_map": {"": "cpu"}}
    assert seen["clip"]["dtype"] == "bfloat16"
    assert seen["reward_model"]["dtype"] == "float16"
    assert seen["reward_model"]["model_kwargs"]["quantization_config"] is quant


def test_quantized_model_is_placed_while_loading_not_moved():
    """bitsandbytes weights cannot be ``.to()``-moved: a quantization_config gets a device_map."""
    from eta_guard._device import load_pretrained

    model = mock.MagicMock()
    no_new_weights = {"missing_keys": [], "mismatched_keys": []}
    model_class = mock.Mock(from_pretrained=mock.Mock(return_value=(model, no_new_weights)))
    processor_class = mock.Mock()
    quant = {"load_in_4bit": True}
    load_pretrained(
        "reward model",
        "x",
        model_class,
        processor_class,
        device="cpu",
        model_kwargs={"quantization_config": quant},
    )
    kwargs = model_class.from_pretrained.call_args.kwargs
    assert kwargs["quantization_config"] is quant and kwargs["device_map"] == {"": "cpu"}
    model.to.assert_not_called()


def test_mixed_dtypes_run_end_to_end_on_cpu(tiny_checkpoints, test_image):
    """VLM fp32, CLIP bf16, RM bf16: the aligned path (CLIP and RM inside best-of-N) runs."""
    ck = tiny_checkpoints
    eta = ETA.from_pretrained(
        ck.vlm,
        clip=ck.clip,
        reward_model=ck.reward_model,
        device="cpu",
        dtype="float32",
        clip_kwargs={"dtype": "bfloat16"},
        reward_model_kwargs={"dtype": "bfloat16"},
        config=ETAConfig(num_candidates=2, max_sentence_tokens=4, seed=0, **ALWAYS_ALIGN),
    )
    assert eta.vlm.model.dtype == torch.float32
    assert eta.evaluator.pre.encoder.model.dtype == torch.bfloat16
    assert eta.evaluator.post.model.dtype == torch.bfloat16
    result = eta.generate(_messages(test_image), max_new_tokens=8)
    assert result.aligned and result.trace
    assert all(isinstance(c.score, float) for step in result.trace for c in step.candidates)


def test_evaluator_takes_per_model_placement(tiny_checkpoints, test_image):
    ck = tiny_checkpoints
    evaluator = ETAEvaluator.from_pretrained(
        clip=ck.clip,
        reward_model=ck.reward_model,
        device="cpu",
        clip_kwargs={"dtype": "float32"},
        reward_model_kwargs={"dtype": "bfloat16"},
    )
    assert evaluator.pre.encoder.model.dtype == torch.float32
    assert evaluator.post.model.dtype == torch.bfloat16
    verdict = evaluator.evaluate(images=[test_image], response="No.")
    assert verdict.pre_score is not None and verdict.post_score is not None


# ----------------------------------------------------------------------------- preset


@pytest.fixture(scope="module")
def paper_eta(tiny_checkpoints):
    ck = tiny_checkpoints
    return ETA.from_pretrained(
        ck.vlm,
        clip=ck.clip,
        reward_model=ck.reward_model,
        device="cpu",
        preset="paper",
        config=ETAConfig(num_candidates=2, max_sentence_tokens=4),
    )


def test_paper_preset_loads_the_reference_setup(paper_eta):
    cfg = paper_eta.config
    assert cfg.system_prompt == LLAVA_V1_SYSTEM_PROMPT
    assert cfg.pad_images_to_square is True and cfg.seed == 1
    assert cfg.num_candidates == 2  # the caller's explicit field survives the preset
    assert paper_eta.evaluator.pre.encoder.model.dtype == torch.float32
    assert paper_eta.evaluator.post.model.dtype == torch.bfloat16
    assert paper_eta.vlm.model.dtype == torch.bfloat16  # CPU: see cpu_dtypes
    assert paper_eta.vlm.model._eta_autocast_dtype == torch.bfloat16


def test_paper_preset_autocasts_the_vlm_forward(paper_eta):
    seen = []
    hook = paper_eta.vlm.model.get_input_embeddings().register_forward_hook(
        lambda *_: seen.append(torch.is_autocast_enabled("cpu"))
    )
    try:
        prepared = paper_eta.vlm.prepare(normalize_messages(_messages(Image.new("RGB", (8, 8)))))
        paper_eta.vlm.generate_greedy(prepared, max_new_tokens=2)
    finally:
        hook.remove()
    assert seen and all(seen)


def test_paper_preset_runs_the_aligned_path(paper_eta, test_image):
    result = paper_eta.generate(_messages(test_image), max_new_tokens=8, **ALWAYS_ALIGN)
    assert result.aligned and result.text.startswith("As an AI assistant")


def test_explicit_config_field_beats_the_preset():
    cfg = PAPER.apply_to_config(ETAConfig(system_prompt="Be brief.", seed=7))
    assert cfg.system_prompt == "Be brief." and cfg.seed == 7
    assert cfg.pad_images_to_square is True
    assert get_preset("PAPER") is PAPER


# ----------------------------------------------------------------------------- prompting


def test_expand_to_square_matches_llava():
    tall = Image.new("RGB", (3, 6), (255, 0, 0))
    out = expand_to_square(tall, (1, 2, 3))
    assert out.size == (6, 6)
    # Centred at (6 - 3) // 2 = 1: columns 0 and 4-5 are padding.
    assert [out.getpixel((x, 0)) for x in range(6)] == [(1, 2, 3)] + [(255, 0, 0)] * 3 + [
        (1, 2, 3)
    ] * 2
    wide = Image.new("RGB", (5, 2), (0, 255, 0))
    assert expand_to_square(wide, (9, 9, 9)).getpixel((0, 1)) == (0, 255, 0)
    assert expand_to_square(wide, (9, 9, 9)).getpixel((0, 0)) == (9, 9, 9)
    square = Image.new("RGB", (4, 4))
    assert expand_to_square(square, (0, 0, 0)) is square


def test_pad_color_is_the_reference_int_of_the_mean():
    clip_mean = mock.Mock(image_mean=[0.48145466, 0.4578275, 0.40821073])
    assert pad_color(mock.Mock(image_processor=clip_mean)) == (122, 116, 104)
    with pytest.raises(InvalidInputError, match="pad_images_to_square"):
        pad_color(mock.Mock(image_processor=mock.Mock(image_mean=None)))


def test_system_prompt_is_a_default_and_the_input_is_untouched():
    image = Image.new("RGB", (4, 8))
    conv = normalize_messages(_messages(image))
    cfg = ETAConfig(system_prompt="SYS", pad_images_to_square=True)
    processor = mock.Mock(image_processor=mock.Mock(image_mean=[0.5, 0.5, 0.5]))
    seen = for_vlm(conv, cfg, processor)
    assert seen.messages[0] == {"role": "system", "content": [{"type": "text", "text": "SYS"}]}
    assert seen.images[0].size == (8, 8) and conv.images[0].size == (4, 8)
    assert conv.messages[0]["role"] == "user"  # not modified
    own = for_vlm(normalize_messages(_messages(image, system="Mine")), cfg, processor)
    assert [m["role"] for m in own.messages].count("system") == 1
    assert "Mine" in str(own.messages[0]) and "SYS" not in str(own.messages)
    plain = normalize_messages(_messages(image))
    assert for_vlm(plain, ETAConfig(), processor) is plain


def test_padding_cannot_blow_up_a_thin_image():
    """A 1 x 10000 strip passes a 20000-pixel limit; its 10000 x 10000 square must not."""
    conv = Conversation(
        messages=[{"role": "user", "content": []}], images=[Image.new("RGB", (1, 10_000))]
    )
    cfg = ETAConfig(pad_images_to_square=True, max_image_pixels=20_000)
    processor = mock.Mock(image_processor=mock.Mock(image_mean=[0.5, 0.5, 0.5]))
    with pytest.raises(InvalidInputError, match="max_image_pixels=20000"):
        for_vlm(conv, cfg, processor)


def test_llava_hf_template_gives_the_reference_llava_v1_prompt(paper_eta):
    """With llava-hf's template the VLM prompt is the reference conv_llava_v1 prompt, exactly."""
    processor = paper_eta.vlm.processor
    conv = for_vlm(
        Conversation(
            messages=[
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}
            ],
            images=[Image.new("RGB", (4, 4))],
        ),
        paper_eta.config,
        processor,
    )
    rendered = processor.apply_chat_template(
        conv.messages, chat_template=LLAVA_HF_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    # Reference: conv_llava_v1 (SeparatorStyle.TWO, sep " "): system + sep + "USER: " + msg + sep
    # + "ASSISTANT:", with msg = "<image>\n" + question.
    assert rendered == LLAVA_V1_SYSTEM_PROMPT + " USER: <image>\nQ? ASSISTANT:"


def test_pipeline_pads_for_the_vlm_only(paper_eta):
    tall = Image.new("RGB", (20, 60), (200, 10, 10))
    clip_sizes, vlm_sizes = [], []
    real_eval, real_prepare = paper_eta.evaluator.evaluate_input, paper_eta.vlm.prepare

    def spy_eval(images, *a, **k):
        clip_sizes.extend(i.size for i in images)
        return real_eval(images, *a, **k)

    def spy_prepare(conversation, **k):
        vlm_sizes.extend(i.size for i in conversation.images)
        return real_prepare(conversation, **k)

    with (
        mock.patch.object(ETAEvaluator, "evaluate_input", side_effect=spy_eval, autospec=False),
        mock.patch.object(paper_eta.vlm, "prepare", side_effect=spy_prepare),
    ):
        paper_eta.generate(_messages(tall), max_new_tokens=2, pre_threshold=2.0)
    assert clip_sizes == [(20, 60)]
    assert vlm_sizes == [(60, 60)]


def test_prompting_fields_validate_and_round_trip(tmp_path):
    with pytest.raises(InvalidInputError, match="system_prompt"):
        ETAConfig(system_prompt="")
    cfg = ETAConfig(system_prompt=LLAVA_V1_SYSTEM_PROMPT, pad_images_to_square=True)
    cfg.save(tmp_path / "c.json")
    assert ETAConfig.load(tmp_path / "c.json") == cfg


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paper_preset_on_cuda(tiny_checkpoints, test_image):
    ck = tiny_checkpoints
    eta = ETA.from_pretrained(
        ck.vlm,
        clip=ck.clip,
        reward_model=ck.reward_model,
        device="cuda",
        preset="paper",
        config=ETAConfig(num_candidates=2, max_sentence_tokens=4),
    )
    assert eta.vlm.model.dtype == torch.float16 and eta.vlm.device.type == "cuda"
    assert eta.evaluator.pre.encoder.model.dtype == torch.float32
    assert eta.evaluator.post.model.dtype == torch.bfloat16
    result = eta.generate(_messages(test_image), max_new_tokens=8, **ALWAYS_ALIGN)
    assert result.aligned


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_split_placement_on_cuda(tiny_checkpoints, test_image, dtype):
    """VLM and RM on CUDA in 16-bit, CLIP on the CPU in fp32: every hop moves its tensors."""
    ck = tiny_checkpoints
    eta = ETA.from_pretrained(
        ck.vlm,
        clip=ck.clip,
        reward_model=ck.reward_model,
        device="cuda",
        dtype=dtype,
        clip_kwargs={"device": "cpu", "dtype": "float32"},
        config=ETAConfig(num_candidates=2, max_sentence_tokens=4, seed=0),
    )
    assert eta.evaluator.pre.device.type == "cpu" and eta.evaluator.post.device.type == "cuda"
    result = eta.generate(_messages(test_image), max_new_tokens=8, **ALWAYS_ALIGN)
    assert result.aligned and result.trace
