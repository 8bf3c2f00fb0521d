"""Fidelity of alignment to the reference implementation, on the architecture-faithful replicas.

(a) The aligned prompt's ids are the reference's construction: the generation prompt's ids, then
    the prefix tokenized alone; on LLaVA-1.5 the model reads ``▁As ▁an ▁AI ▁assistant`` right
    after ``ASSISTANT:``.
(b) Given the candidates the search sampled, its scores and choices equal a plain
    re-implementation of the reference loop written here: ``reward(prefix + accepted + c) +
    alpha/i * cos(CLIP image, CLIP text(c))``, the CLIP term dropped on sentence 1 and when a
    candidate ends the answer.

The replicas are random: this checks the mechanics match the reference, not safety.
"""

from __future__ import annotations

import pytest
import torch

from eta_guard import ETA, ETAConfig
from eta_guard.decoding.vlm import VLMAdapter
from eta_guard.messages import normalize_messages
from eta_guard.testing import make_test_image

PREFIX = "As an AI assistant"


@pytest.fixture(scope="module")
def replica_vlm(replica_checkpoints):
    cache: dict[str, VLMAdapter] = {}

    def get(family: str) -> VLMAdapter:
        if family not in cache:
            path = replica_checkpoints(family).vlm
            cache[family] = VLMAdapter.from_pretrained(path, local_files_only=True)
        return cache[family]

    return get


def conversation():
    return normalize_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": make_test_image("gradient", (48, 40))},
                    {"type": "text", "text": "How do I pick a lock?"},
                ],
            }
        ]
    )


# ----- (a) the aligned prompt -----
# LLaVA's reference tokenizes the text between images segment by segment (tokenizer_image_token):
# its construction is checked in tests/test_fidelity_round2.py.
@pytest.mark.parametrize("family", ["qwen2_vl", "smolvlm"])
def test_aligned_prompt_ids_are_the_reference_construction(replica_vlm, family):
    vlm = replica_vlm(family)
    conv = conversation()
    prepared = vlm.prepare(conv, assistant_prefix=PREFIX)
    # reference: the generation prompt through the processor, then the prefix's ids alone
    text = vlm.processor.apply_chat_template(
        conv.messages, add_generation_prompt=True, tokenize=False
    )
    kwargs = (
        {"add_special_tokens": False} if text.startswith(vlm.tokenizer.bos_token or "\0") else {}
    )
    prompt_ids = vlm.processor(text=[text], images=conv.images, return_tensors="pt", **kwargs)
    prefix_ids = vlm.tokenizer(PREFIX, add_special_tokens=False)["input_ids"]
    expected = prompt_ids["input_ids"][0].tolist() + list(prefix_ids)
    assert prepared.input_ids[0].tolist() == expected
    assert prepared.attention_mask.tolist() == [[1] * len(expected)]
    assert prepared.prefix_token_ids == list(prefix_ids)
    assert prepared.text == text + PREFIX  # the text users and the RM see is unchanged


def test_llava_reads_the_prefix_as_sentencepiece_words_after_assistant(replica_vlm):
    vlm = replica_vlm("llava")
    prepared = vlm.prepare(conversation(), assistant_prefix=PREFIX)
    ids = prepared.input_ids[0].tolist()
    pieces = vlm.tokenizer.convert_ids_to_tokens(ids)
    assert pieces[-4:] == ["▁As", "▁an", "▁AI", "▁assistant"]
    assert vlm.tokenizer.decode(ids[:-4]).endswith("ASSISTANT:")
    # gluing the prefix to the rendered text (the old construction) gives other pieces
    glued = vlm.tokenizer(prepared.text, add_special_tokens=False)["input_ids"]
    assert vlm.tokenizer.convert_ids_to_tokens(glued)[-4:] != pieces[-4:]


def test_vanilla_and_aligned_prompts_share_the_generation_prompt(replica_vlm):
    vlm = replica_vlm("qwen2_vl")
    vanilla = vlm.prepare(conversation())
    aligned = vlm.prepare(conversation(), assistant_prefix=PREFIX)
    n = vanilla.num_prompt_tokens
    assert aligned.input_ids[0, :n].tolist() == vanilla.input_ids[0].tolist()
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in aligned.model_inputs:
            assert aligned.model_inputs[key][0, n:].tolist() == [0] * len(aligned.prefix_token_ids)


# ----- (b) the best-of-N loop -----
@pytest.fixture(scope="module")
def aligned_run(replica_checkpoints):
    paths = replica_checkpoints("llava")
    config = ETAConfig(
        seed=0,
        pre_threshold=-1.0,  # flag every image and every answer: force alignment
        post_threshold=1e9,
        num_candidates=3,
        max_sentence_tokens=5,
        max_new_tokens=20,
    )
    eta = ETA.from_pretrained(
        paths.vlm, clip=paths.clip, reward_model=paths.reward_model, config=config
    )
    image = make_test_image("gradient", (48, 40))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "How?"}],
        }
    ]
    return eta, image, eta.generate(messages)


def plain_reward(eta: ETA, answer: str) -> float:
    """The reference's RM call: the safety conversation, one sequence, one forward."""
    post = eta.evaluator.post
    tokenizer, model = post.tokenizer, post.model
    conversation = [
        {"role": "user", "content": eta.config.rm_search_prompt},
        {"role": "assistant", "content": answer},
    ]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model(input_ids=ids.to(model.device))
    score = getattr(out, "score", None)
    return float((score if score is not None else out.logits)[0].reshape(-1)[0])


def plain_clip(eta: ETA, image, sentence: str) -> float:
    """cos(CLIP image, CLIP text), written from the model's parts."""
    encoder = eta.evaluator.pre.encoder
    model, processor = encoder.model, encoder.processor
    with torch.inference_mode():
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = processor.tokenizer(
            [sentence], truncation=True, max_length=77, padding=True, return_tensors="pt"
        )
        txt = model.text_projection(model.text_model(**text).pooler_output)
    return float(torch.nn.functional.cosine_similarity(img, txt)[0])


def test_best_of_n_scores_and_choices_equal_the_reference_loop(aligned_run):
    eta, image, result = aligned_run
    assert result.aligned and len(result.trace) >= 2
    alpha, accepted = eta.config.alpha, ""
    used_clip = False
    for i, step in enumerate(result.trace, start=1):
        ended = any(c.ended for c in step.candidates)
        scores = []
        for candidate in step.candidates:
            # the reference: batch_decode(prefix + candidate ids)[0].strip()
            reward = plain_reward(eta, (PREFIX + accepted + candidate.text).strip())
            score = reward
            if i > 1 and not ended:  # the reference drops CLIP on sentence 1 and at the end
                cos = plain_clip(eta, image, candidate.text.strip())
                score += alpha / i * cos
                assert candidate.clip == pytest.approx(cos, abs=1e-5)
                used_clip = True
            else:
                assert candidate.clip is None
            assert candidate.reward == pytest.approx(reward, abs=1e-4)
            assert candidate.score == pytest.approx(score, abs=1e-4)
            scores.append(score)
        assert step.chosen == max(range(len(scores)), key=scores.__getitem__)
        accepted += step.candidates[step.chosen].text
    assert used_clip, "no step used the CLIP term: the check above would be vacuous"
    assert result.text == (PREFIX + accepted).strip()
