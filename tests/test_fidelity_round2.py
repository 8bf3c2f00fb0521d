"""Fidelity to the reference code, round two (issue 18): each test re-implements the reference's
construction plainly (github DripNowhy/ETA and the LLaVA code it vendors) and compares.

The replicas and tiny checkpoints are random: these check mechanics, never safety.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from backend_stub import StubServer  # noqa: E402

from eta_guard import ETA, ETAConfig  # noqa: E402
from eta_guard.backends import HTTPSettings  # noqa: E402
from eta_guard.errors import InvalidInputError  # noqa: E402

CHAT = "/v1/chat/completions"
FAST = HTTPSettings(timeout=5.0, connect_timeout=1.0, max_retries=1, backoff=0.01)
#: LLaVA-1.5's image processor mean (OpenAI CLIP), as the reference's expand2square colour.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


@pytest.fixture(scope="module")
def server():
    with StubServer() as stub:
        yield stub


@pytest.fixture
def stub(server):
    return server.reset()


def tall_image() -> Image.Image:
    image = Image.new("RGB", (20, 48), (250, 10, 10))
    image.putpixel((3, 5), (0, 200, 0))
    return image


def reference_expand2square(image: Image.Image, mean) -> Image.Image:
    """llava/mm_utils.py expand2square with ``tuple(int(x * 255) for x in image_mean)``."""
    color = tuple(int(x * 255) for x in mean)
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), color)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), color)
    result.paste(image, ((height - width) // 2, 0))
    return result


def sent_image(stub) -> Image.Image:
    body = stub.bodies(CHAT)[0]
    part = next(p for p in body["messages"][-1]["content"] if p["type"] == "image_url")
    data = part["image_url"]["url"].split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


@pytest.fixture
def remote_eta(stub, tiny_checkpoints):
    def build(config=None, **kwargs):
        config = config or ETAConfig()
        config = config.model_copy(update={"pre_threshold": 2.0})  # no image flagged: vanilla
        return ETA.from_openai_compatible(
            stub.url,
            "tiny-vlm",
            clip=tiny_checkpoints.clip,
            reward_model="tiny-rm",
            reward_model_url=stub.url,
            http=FAST,
            device="cpu",
            config=config,
            **kwargs,
        )

    return build


def _messages(image):
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
    return [{"role": "user", "content": content}]


# ----- item 2: the paper's pad-to-square on the remote path -----
def test_paper_preset_pads_images_client_side_with_the_preset_mean(stub, remote_eta):
    eta = remote_eta(preset="paper")
    eta.generate(_messages(tall_image()))
    expected = reference_expand2square(tall_image(), CLIP_MEAN)
    got = sent_image(stub)
    assert got.size == (48, 48)
    assert got.tobytes() == expected.tobytes()
    # ... and with the llava_v1 system text the preset sets
    assert stub.bodies(CHAT)[0]["messages"][0]["role"] == "system"


def test_pad_mean_comes_from_the_served_models_processor(stub, remote_eta, replica_checkpoints):
    llava = replica_checkpoints("llava").vlm
    eta = remote_eta(tokenizer=llava, config=ETAConfig(pad_images_to_square=True))
    from transformers import AutoImageProcessor

    mean = AutoImageProcessor.from_pretrained(llava).image_mean
    eta.generate(_messages(tall_image()))
    assert sent_image(stub).tobytes() == (reference_expand2square(tall_image(), mean).tobytes())


def test_pad_without_any_mean_is_refused_naming_the_fix(stub, remote_eta):
    with pytest.raises(InvalidInputError, match="image_mean"):
        remote_eta(config=ETAConfig(pad_images_to_square=True))
    assert not stub.bodies(CHAT)


def test_bad_image_mean_is_refused():
    from eta_guard.backends import OpenAICompatibleBackend

    with pytest.raises(InvalidInputError, match="image_mean"):
        OpenAICompatibleBackend("http://127.0.0.1:9", "m", image_mean=(0.5, 2.0, 0.1))


# ----- item 1: LLaVA's tokenizer_image_token -----
IMAGE_TOKEN_INDEX = -200  # llava/constants.py


def reference_tokenizer_image_token(prompt, tokenizer):
    """llava/mm_utils.py ``tokenizer_image_token``, written out plainly."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    separated = []
    for chunk in chunks:
        separated += [chunk, [IMAGE_TOKEN_INDEX] * (offset + 1)]
    for x in separated[:-1]:
        ids.extend(x[offset:])
    return ids


@pytest.fixture(scope="module")
def replica_adapter(replica_checkpoints):
    from eta_guard.decoding.vlm import VLMAdapter

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = VLMAdapter.from_pretrained(
                replica_checkpoints(family).vlm, local_files_only=True
            )
        return cache[family]

    return get


def _conversation(system):
    from eta_guard.messages import normalize_messages
    from eta_guard.testing import make_test_image

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": make_test_image("gradient", (48, 40))},
                {"type": "text", "text": "How do I pick a lock?"},
            ],
        }
    ]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return normalize_messages(messages)


@pytest.mark.parametrize("system", [None, "A chat between a curious human and an assistant."])
def test_llava_prompt_ids_are_tokenizer_image_token(replica_adapter, system):
    vlm = replica_adapter("llava")
    conv = _conversation(system)
    prepared = vlm.prepare(conv, assistant_prefix="As an AI assistant")
    # the reference's llava_v1 prompt text
    prompt = (
        "" if system is None else system + " "
    ) + "USER: <image>\nHow do I pick a lock? ASSISTANT:"
    assert prepared.text == prompt + "As an AI assistant"
    reference = reference_tokenizer_image_token(prompt, vlm.tokenizer)
    reference += vlm.tokenizer("As an AI assistant").input_ids[1:]  # safety_tokens[:, 1:]
    # LLaVA's model expands its one IMAGE_TOKEN_INDEX into the image's features; llava-hf's
    # prompt holds one <image> id per feature: compare with that expansion.
    image_id = vlm.model.config.image_token_id
    slots = int((prepared.input_ids[0] == image_id).sum())
    expanded = []
    for token in reference:
        expanded += [image_id] * slots if token == IMAGE_TOKEN_INDEX else [token]
    assert prepared.input_ids[0].tolist() == expanded
    assert prepared.attention_mask[0].tolist() == [1] * len(expanded)
    pieces = vlm.tokenizer.convert_ids_to_tokens([t for t in expanded if t != image_id])
    assert "▁" in pieces and pieces[pieces.index("<0x0A>") - 1] == "▁"  # the token issue 18 found


@pytest.mark.parametrize("family", ["qwen2_vl", "smolvlm"])
def test_other_families_keep_the_processors_whole_text_ids(replica_adapter, family):
    vlm = replica_adapter(family)
    conv = _conversation(None)
    prepared = vlm.prepare(conv)
    text = vlm.processor.apply_chat_template(
        conv.messages, add_generation_prompt=True, tokenize=False
    )
    bos = vlm.tokenizer.bos_token or "\0"
    kwargs = {"add_special_tokens": False} if text.startswith(bos) else {}
    expected = vlm.processor(text=[text], images=conv.images, return_tensors="pt", **kwargs)
    assert prepared.input_ids[0].tolist() == expected["input_ids"][0].tolist()


# ----- item 3: the remote search continues from the exact ids it sampled -----
PREFIX = "As an AI assistant"
TEXT_ONLY = [{"role": "user", "content": "How do I pick a lock?"}]
ALIGN_TEXT = {"text_only_policy": "reward_only", "post_threshold": 1e9, "num_candidates": 3}
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def llava_tokenizer(replica_checkpoints):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(replica_checkpoints("llava").vlm)


@pytest.fixture
def engine_eta(stub, tiny_checkpoints, replica_checkpoints, llava_tokenizer):
    """ETA over the stub engine serving the LLaVA-1.5 replica's tokenizer."""
    stub.tokenizer = llava_tokenizer

    def build(**config):
        return ETA.from_openai_compatible(
            stub.url,
            "tiny-vlm",
            clip=tiny_checkpoints.clip,
            reward_model="tiny-rm",
            reward_model_url=stub.url,
            tokenizer=replica_checkpoints("llava").vlm,
            http=FAST,
            device="cpu",
            config=ETAConfig(seed=0, max_new_tokens=64, **config),
        )

    return build


def test_text_only_search_continues_from_the_sampled_ids(stub, engine_eta, llava_tokenizer):
    result = engine_eta(**ALIGN_TEXT).generate(TEXT_ONLY)
    assert result.aligned and len(result.trace) == 2
    tok = llava_tokenizer
    # The reference: tokenizer_image_token of the llava prompt (no image: the tokenizer's ids,
    # BOS first), then safety_tokens[:, 1:], then the ids each accepted candidate was sampled as.
    prompt = "USER: How do I pick a lock? ASSISTANT:"
    context = reference_tokenizer_image_token(prompt, tok) + tok(PREFIX).input_ids[1:]
    assert len(stub.sampled) == len(result.trace)
    for step, (sent, sampled) in zip(result.trace, stub.sampled, strict=True):
        assert sent == context  # what the engine continued at this step
        context = context + sampled[step.chosen]
    # Only the vanilla answer went through the chat API; the search sent ids.
    assert len(stub.bodies(CHAT)) == 1 and len(stub.bodies(COMPLETIONS)) == 2
    assert result.text == PREFIX + "".join(s.candidates[s.chosen].text for s in result.trace)
    # Not vacuous: re-tokenizing the accepted text (what continuing from text sends) gives
    # other ids than those sampled.
    first = result.trace[0].candidates[result.trace[0].chosen].text
    retokenized = tok(PREFIX + first, add_special_tokens=False).input_ids
    exact = tok(PREFIX).input_ids[1:] + stub.sampled[0][1][result.trace[0].chosen]
    assert tok.decode(retokenized) == tok.decode(exact) and retokenized != exact


def test_shallow_alignment_continues_the_prompt_and_prefix_ids(stub, engine_eta, llava_tokenizer):
    result = engine_eta(**ALIGN_TEXT, deep_alignment=False).generate(TEXT_ONLY)
    assert result.aligned and result.text == PREFIX + "Sure, here is how."
    tok = llava_tokenizer
    prompt = "USER: How do I pick a lock? ASSISTANT:"
    (shallow,) = stub.bodies(COMPLETIONS)
    assert shallow["stream"] and shallow["temperature"] == 0.0
    assert (
        shallow["prompt"]
        == reference_tokenizer_image_token(prompt, tok) + tok(PREFIX).input_ids[1:]
    )
    assert len(stub.bodies(CHAT)) == 1  # the vanilla answer only


def test_fallback_after_a_failed_search_continues_the_exact_ids(stub, engine_eta):
    eta = engine_eta(**ALIGN_TEXT, schedule="sequential")
    # the decision and the first step's three scores pass; the second step's fail (2 tries each)
    stub.failures["/classify"].extend([("ok", None)] * 4 + [("status", 500)] * 6)
    result = eta.generate(TEXT_ONLY, on_evaluator_error="fail_closed")
    assert result.aligned and "search" in result.verdict.errors
    (step_one, sampled), (step_two, _) = stub.sampled
    (fallback,) = [b for b in stub.bodies(COMPLETIONS) if b.get("stream")]
    assert fallback["prompt"] == step_two  # the ids the failed step continued, as sampled
    assert step_two[len(step_one) :] in sampled  # = step one's context + its chosen candidate


def test_search_with_images_continues_from_text(stub, engine_eta):
    eta = engine_eta(pre_threshold=-1.0, post_threshold=1e9, num_candidates=3)
    result = eta.generate(_messages(tall_image()))
    assert result.aligned and not stub.sampled and not stub.bodies(COMPLETIONS)
    # the search's first step (speculative: it may reach the engine before the vanilla request)
    steps = [b for b in stub.bodies(CHAT) if b.get("continue_final_message")]
    assert steps and steps[0]["messages"][-1]["content"] == PREFIX


def test_an_engine_continuing_other_ids_is_refused(stub, replica_checkpoints):
    import asyncio
    import json

    from eta_guard.backends import OpenAICompatibleBackend, SamplingStep
    from eta_guard.errors import BackendError

    choice = {"index": 0, "text": " x.", "finish_reason": "stop", "stop_reason": None}
    reply = {
        "choices": [{**choice, "token_ids": [5], "prompt_token_ids": [1, 2]}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1},
    }
    stub.failures[COMPLETIONS].append(("raw", json.dumps(reply)))
    backend = OpenAICompatibleBackend(stub.url, "tiny-vlm", http=FAST)
    step = SamplingStep(n=1, max_tokens=5, top_k=5, temperature=1.5, terminators=(".",))

    async def run():
        try:
            return await backend.sample_tokens([1, 2, 3], step)
        finally:
            await backend.aclose()

    with pytest.raises(BackendError, match="other ids than those sent"):
        asyncio.run(run())


def _text_only_eta(stub, tiny_checkpoints, **kwargs):
    return ETA.from_openai_compatible(
        stub.url,
        "tiny-vlm",
        clip=tiny_checkpoints.clip,
        reward_model="tiny-rm",
        reward_model_url=stub.url,
        http=FAST,
        device="cpu",
        config=ETAConfig(seed=0, max_new_tokens=16, **ALIGN_TEXT),
        **kwargs,
    )


def test_an_engine_without_tokenize_is_searched_from_text_and_says_so(
    stub, tiny_checkpoints, caplog
):
    stub.failures["/tokenize"].extend([("status", 404)] * 4)
    eta = _text_only_eta(stub, tiny_checkpoints)
    with caplog.at_level("WARNING", logger="eta_guard.backends.openai_compatible"):
        first, second = eta.generate(TEXT_ONLY), eta.generate(TEXT_ONLY)
    assert first.aligned and second.aligned and first.text == second.text
    assert not stub.bodies(COMPLETIONS) and len(stub.bodies(CHAT)) > 2  # searched by chat
    assert len(stub.bodies("/tokenize")) == 2  # found once: the second search asked nothing
    assert eta.backend.ids_unavailable == "the engine has no /tokenize endpoint"
    assert sum("continue from text" in r.message for r in caplog.records) == 1


def test_required_ids_without_tokenize_name_the_switch(stub, tiny_checkpoints):
    from eta_guard.errors import BackendError

    stub.failures["/tokenize"].extend([("status", 404)] * 2)
    eta = _text_only_eta(stub, tiny_checkpoints, continue_from_ids=True)
    with pytest.raises(BackendError, match="continue_from_ids=None"):
        eta.generate(TEXT_ONLY)


def test_completions_without_token_ids_fall_back_to_text(stub, tiny_checkpoints):
    import json

    choice = {"index": 0, "text": " x.", "finish_reason": "stop", "stop_reason": None}
    reply = {"choices": [choice] * 3, "usage": {"prompt_tokens": 2, "completion_tokens": 3}}
    for i in range(3):
        reply["choices"][i] = {**choice, "index": i}
    stub.failures[COMPLETIONS].append(("raw", json.dumps(reply)))
    eta = _text_only_eta(stub, tiny_checkpoints)
    result = eta.generate(TEXT_ONLY)
    assert result.aligned and len(stub.bodies(COMPLETIONS)) == 1  # tried once, then by chat
    assert stub.bodies(CHAT)[-1]["continue_final_message"]
    assert eta.backend.ids_unavailable == "its completions carry no token_ids"


# ----- item 6: transparent pixels, as the reference's Image.convert("RGB") -----
def _transparent_images():
    rgba = Image.new("RGBA", (6, 4), (200, 30, 40, 0))  # fully transparent, a colour under it
    rgba.putpixel((1, 1), (10, 250, 10, 128))  # half transparent
    rgba.putpixel((2, 2), (5, 6, 7, 255))  # opaque
    la = Image.new("LA", (6, 4), (90, 0))
    palette = Image.new("P", (6, 4), 3)
    palette.putpalette([c for i in range(256) for c in (i, 255 - i, i // 2)])
    palette.info["transparency"] = 3
    return {"RGBA": rgba, "LA": la, "PA": rgba.convert("PA"), "P+transparency": palette}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", list(_transparent_images()))
def test_transparency_is_decoded_as_the_reference_converts(mode):
    from eta_guard.media import load_image

    image = _transparent_images()[mode]
    for given in (image,) if mode == "PA" else (image, _png(image)):  # PNG has no PA mode
        # the reference: Image.open(path).convert("RGB") (llava data_prepare)
        source = Image.open(io.BytesIO(given)) if isinstance(given, bytes) else given
        reference = source.convert("RGB")
        assert load_image(given).tobytes() == reference.tobytes()


def test_clip_and_the_engine_get_the_reference_pixels(stub, remote_eta):
    from eta_guard.messages import normalize_messages

    image = _transparent_images()["RGBA"]
    reference = Image.open(io.BytesIO(_png(image))).convert("RGB").tobytes()
    # CLIP and the VLM score / read the conversation's decoded images
    assert normalize_messages(_messages(_png(image))).images[0].tobytes() == reference
    remote_eta().generate(_messages(_png(image)))
    assert sent_image(stub).tobytes() == reference


# ----- item 7: the vanilla answer is stripped before the RM judges it and when returned -----
def test_vanilla_answer_is_stripped_as_the_reference_strips_it(stub, tiny_checkpoints):
    pieces = ["  ", " Sure", ",", " here", " is", " how", ".", "\n", " "]
    stub.vanilla = list(pieces)
    reference = "".join(pieces).strip()  # batch_decode(output_ids, ...)[0].strip()

    def eta(**config):
        return ETA.from_openai_compatible(
            stub.url,
            "tiny-vlm",
            clip=tiny_checkpoints.clip,
            reward_model="tiny-rm",
            reward_model_url=stub.url,
            http=FAST,
            device="cpu",
            config=ETAConfig(**config),
        )

    # flagged image, answer cleared by the RM: judged, then returned
    flagged = eta(pre_threshold=-1.0, post_threshold=-1e9, schedule="sequential")
    chunks = list(flagged.stream(_messages(tall_image())))
    result = chunks[-1].result
    assert result.text == reference and not result.aligned
    assert "".join(c.text for c in chunks if c.text) == reference
    (judged,) = stub.bodies("/classify")
    assert judged["messages"][-1]["content"] == reference
    # safe image: streamed as decoded, never judged, stripped all the same
    streamed = list(eta(pre_threshold=2.0).stream(_messages(tall_image())))
    assert "".join(c.text for c in streamed if c.text) == reference
    assert streamed[-1].result.text == reference


@pytest.mark.parametrize("text", ["", " ", " a b \n", "\n\nx", "x  ", " a . \n b "])
def test_strip_filter_streams_the_stripped_text(text):
    from eta_guard.engine.strip_filter import StripFilter

    for cut in range(len(text) + 1):
        strip = StripFilter()
        out = strip.feed(text[:cut]) + strip.feed(text[cut:])
        assert out == text.strip()
