"""CLIP pre-evaluator: scores are the cosines CLIP defines, batched, cached and truncated."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from eta_guard._device import resolve_device, resolve_dtype
from eta_guard.config import DEFAULT_SAFETY_PROMPT
from eta_guard.errors import InvalidInputError
from eta_guard.evaluators.clip import CLIPPreEvaluator
from eta_guard.evaluators.clip_open_clip import import_open_clip, parse_open_clip_name
from eta_guard.testing import make_test_image

LONG_PROMPT = "unsafe violent illegal content in the picture, " * 40


@pytest.fixture(scope="module")
def pre(tiny_checkpoints):
    return CLIPPreEvaluator.from_pretrained(tiny_checkpoints.clip, device="cpu")


@pytest.fixture(scope="module")
def hf_clip(tiny_checkpoints):
    """The same checkpoint loaded independently, to compute reference cosines by hand."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_checkpoints.clip).eval()
    return model, CLIPProcessor.from_pretrained(tiny_checkpoints.clip)


@pytest.fixture(scope="module")
def images():
    return [
        make_test_image("red", (64, 64), 0),
        make_test_image("noise", (48, 80), 1),
        make_test_image("noise", (96, 40), 2),
    ]


def _pooled(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _reference_image_embeds(hf_clip, images):
    model, processor = hf_clip
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        embeds = _pooled(model.get_image_features(pixel_values=pixels))
    return embeds / embeds.norm(dim=-1, keepdim=True)


def _reference_text_embeds(hf_clip, texts):
    model, processor = hf_clip
    tokens = processor.tokenizer(
        texts, padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        embeds = _pooled(
            model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        )
    return embeds / embeds.norm(dim=-1, keepdim=True)


def test_score_equals_independent_cosine(pre, hf_clip, images):
    expected = (
        _reference_image_embeds(hf_clip, images)
        @ _reference_text_embeds(hf_clip, [DEFAULT_SAFETY_PROMPT])[0]
    )
    scores = pre.score_images(images)
    assert len(scores) == len(images)
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-5, rtol=0)


def test_batched_scores_equal_one_by_one(pre, images):
    batched = pre.score_images(images)
    single = [pre.score_images([image])[0] for image in images]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-5, rtol=0)


def test_images_are_embedded_in_one_forward(pre, images, monkeypatch):
    calls = []
    original = pre.encoder.embed_images
    monkeypatch.setattr(pre.encoder, "embed_images", lambda x: calls.append(len(x)) or original(x))
    pre.score_images(images)
    assert calls == [len(images)]


def test_embeddings_are_unit_float32_cpu(pre, images):
    embeds = pre.embed_images(images)
    texts = pre.embed_texts(["a cat", "a dog on a mat"])
    for tensor, rows in ((embeds, 3), (texts, 2)):
        assert tensor.shape[0] == rows and tensor.dtype == torch.float32
        assert tensor.device.type == "cpu"
        torch.testing.assert_close(tensor.norm(dim=-1), torch.ones(rows), atol=1e-5, rtol=0)
    assert embeds.shape[1] == texts.shape[1]


def test_prompt_embedding_is_cached_per_prompt(pre, images, monkeypatch):
    pre.score_images(images[:1])  # warm the default prompt
    calls = []
    original = pre.encoder.embed_texts
    monkeypatch.setattr(pre.encoder, "embed_texts", lambda t: calls.append(list(t)) or original(t))
    pre.score_images(images[:1])
    pre.score_images(images[1:])
    assert calls == []
    pre.score_images(images[:1], prompt="a violent scene")
    pre.score_images(images[1:], prompt="a violent scene")
    assert calls == [["a violent scene"]]


def test_long_prompt_is_truncated_to_77_tokens(pre, hf_clip, images):
    model, processor = hf_clip
    assert len(processor.tokenizer(LONG_PROMPT)["input_ids"]) > 77
    assert pre.context_length == 77
    # Untruncated, the text tower cannot even run: truncation is what makes this work.
    full = processor.tokenizer([LONG_PROMPT], return_tensors="pt")
    with pytest.raises(Exception):  # noqa: B017 - any failure proves the point
        model.get_text_features(input_ids=full["input_ids"])
    got = pre.embed_texts([LONG_PROMPT])
    torch.testing.assert_close(
        got, _reference_text_embeds(hf_clip, [LONG_PROMPT]), atol=1e-5, rtol=0
    )
    scores = pre.score_images(images, prompt=LONG_PROMPT)
    expected = _reference_image_embeds(hf_clip, images) @ got[0]
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-5, rtol=0)


def test_similarity_is_max_over_images(pre, hf_clip, images):
    texts = ["a red square.", "random noise everywhere!", LONG_PROMPT]
    image_embeds = pre.embed_images(images)
    sims = pre.similarity(image_embeds, texts)
    assert sims.shape == (3,)
    cos = _reference_image_embeds(hf_clip, images) @ _reference_text_embeds(hf_clip, texts).T
    torch.testing.assert_close(sims, cos.max(dim=0).values, atol=1e-5, rtol=0)
    # One image: plain cosine.
    one = pre.similarity(image_embeds[:1], texts)
    torch.testing.assert_close(one, cos[0], atol=1e-5, rtol=0)
    assert pre.similarity(image_embeds, []).shape == (0,)


def test_similarity_rejects_bad_embeds(pre):
    with pytest.raises(InvalidInputError, match="image_embeds"):
        pre.similarity(torch.zeros(0, 8), ["x"])
    with pytest.raises(InvalidInputError, match="list of strings"):
        pre.embed_texts("just a string")


def test_image_sources_go_through_media(pre, images, tmp_path):
    path = tmp_path / "red.png"
    images[0].save(path)
    torch.testing.assert_close(
        torch.tensor(pre.score_images([str(path)])),
        torch.tensor(pre.score_images([images[0]])),
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(InvalidInputError):
        pre.score_images([b"definitely not an image"])
    with pytest.raises(InvalidInputError, match="no images"):
        pre.score_images([])


def test_bad_load_arguments(tiny_checkpoints, tmp_path):
    with pytest.raises(InvalidInputError, match="backend"):
        CLIPPreEvaluator.from_pretrained(tiny_checkpoints.clip, backend="jax")
    with pytest.raises(InvalidInputError, match="cannot load the CLIP model"):
        CLIPPreEvaluator.from_pretrained(str(tmp_path / "missing"), local_files_only=True)
    with pytest.raises(InvalidInputError, match="open_clip"):
        CLIPPreEvaluator.from_pretrained(tiny_checkpoints.clip, pretrained="laion2b_s34b_b79k")


def test_bfloat16_load_scores_close_to_float32(tiny_checkpoints, pre, images):
    half = CLIPPreEvaluator.from_pretrained(tiny_checkpoints.clip, device="cpu", dtype="bfloat16")
    assert next(half.encoder.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(
        torch.tensor(half.score_images(images)),
        torch.tensor(pre.score_images(images)),
        atol=0.05,
        rtol=0,
    )


# ---------------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    pytest.importorskip("open_clip")
    from eta_guard import testing

    return testing.build_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


def test_open_clip_backend_matches_open_clip(tiny_open_clip, images):
    open_clip = import_open_clip()
    model_name, checkpoint = tiny_open_clip
    pre = CLIPPreEvaluator.from_pretrained(
        model_name, backend="open_clip", pretrained=checkpoint, device="cpu"
    )
    assert pre.context_length == 77
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        image_embeds = model.encode_image(
            torch.stack([preprocess(i) for i in images]), normalize=True
        )
        text_embeds = model.encode_text(
            tokenizer([DEFAULT_SAFETY_PROMPT, LONG_PROMPT]), normalize=True
        )
    torch.testing.assert_close(
        torch.tensor(pre.score_images(images)), image_embeds @ text_embeds[0], atol=1e-5, rtol=0
    )
    sims = pre.similarity(pre.embed_images(images), [DEFAULT_SAFETY_PROMPT, LONG_PROMPT])
    torch.testing.assert_close(
        sims, (image_embeds @ text_embeds.T).max(dim=0).values, atol=1e-5, rtol=0
    )
    # The one-string spec selects the backend by itself.
    spec = CLIPPreEvaluator.from_pretrained(f"open_clip:{model_name}/{checkpoint}", device="cpu")
    assert spec.name == pre.name == f"open_clip:{model_name}/{checkpoint}"
    # So does a folder saved in open_clip's layout, with or without the local-dir: schema.
    folder = os.path.dirname(checkpoint)
    for name in (folder, f"local-dir:{folder}"):
        local = CLIPPreEvaluator.from_pretrained(name, device="cpu")
        torch.testing.assert_close(
            torch.tensor(local.score_images(images)),
            torch.tensor(pre.score_images(images)),
            atol=1e-6,
            rtol=0,
        )
    torch.testing.assert_close(
        torch.tensor(spec.score_images(images)),
        torch.tensor(pre.score_images(images)),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize(
    ("name", "pretrained", "expected"),
    [
        ("ViT-B-32", "laion2b_s34b_b79k", ("ViT-B-32", "laion2b_s34b_b79k")),
        ("open_clip:ViT-B-32/laion2b_s34b_b79k", None, ("ViT-B-32", "laion2b_s34b_b79k")),
        ("open_clip:ViT-B-32//abs/ckpt.pt", None, ("ViT-B-32", "/abs/ckpt.pt")),
        ("open_clip:ViT-B-32", "openai", ("ViT-B-32", "openai")),
        ("hf-hub:timm/ViT-B-16-SigLIP", None, ("hf-hub:timm/ViT-B-16-SigLIP", None)),
        ("open_clip:hf-hub:org/repo", None, ("hf-hub:org/repo", None)),
        ("local-dir:/models/x", None, ("local-dir:/models/x", None)),
    ],
)
def test_parse_open_clip_name(name, pretrained, expected):
    assert parse_open_clip_name(name, pretrained) == expected


@pytest.mark.parametrize(
    ("name", "pretrained"),
    [("open_clip:ViT-B-32/a", "b"), ("hf-hub:org/repo", "openai"), ("open_clip:", None)],
)
def test_parse_open_clip_name_refuses_conflicts(name, pretrained):
    with pytest.raises(InvalidInputError):
        parse_open_clip_name(name, pretrained)


def test_missing_open_clip_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r"eta-guard\[open-clip\]"):
        import_open_clip()


# ---------------------------------------------------------------------------------- _device


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("auto", "auto"),
        ("float32", torch.float32),
        ("bf16", torch.bfloat16),
        ("torch.float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_resolve_dtype(value, expected):
    assert resolve_dtype(value) == expected


@pytest.mark.parametrize("value", ["float8", "int", 3])
def test_resolve_dtype_refuses(value):
    with pytest.raises(InvalidInputError, match="dtype"):
        resolve_dtype(value)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InvalidInputError, match="device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA"):
            resolve_device("cuda")
