"""Memory estimate: parameter counts from configs on the meta device, bytes per dtype/quantization."""

from __future__ import annotations

from pathlib import Path

import pytest

from eta_guard.errors import InvalidInputError
from eta_guard.memory import estimate_memory, estimate_model, gib

REFERENCE = Path(__file__).parent / "fixtures" / "reference_configs"
LLAVA = str(REFERENCE / "llava-1.5-7b-hf")
CLIP_L = str(REFERENCE / "clip-vit-large-patch14-336")
ARMORM = str(REFERENCE / "ArmoRM-Llama3-8B-v0.1")


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    """Real parameter counts of the tiny checkpoints, loaded the ordinary way."""
    from transformers import (
        AutoModel,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
    )

    ck = tiny_checkpoints
    models = {
        "vlm": AutoModelForImageTextToText.from_pretrained(ck.vlm),
        "clip": AutoModel.from_pretrained(ck.clip),
        "reward_model": AutoModelForSequenceClassification.from_pretrained(ck.reward_model),
    }
    return {role: sum(p.numel() for p in m.parameters()) for role, m in models.items()}


def test_tiny_counts_equal_the_loaded_models_exactly(tiny_checkpoints, loaded):
    ck = tiny_checkpoints
    est = estimate_memory(ck.vlm, ck.clip, ck.reward_model, dtype="float32", kv_tokens=1)
    by_role = {m.role: m for m in est.models}
    for role, count in loaded.items():
        assert by_role[role].parameters == count, role
        assert by_role[role].weight_bytes == 4 * count
    assert est.total_bytes == sum(m.total_bytes for m in est.models)


def test_dtype_sets_bytes_per_parameter(tiny_checkpoints, loaded):
    ck = tiny_checkpoints
    est = estimate_memory(
        ck.vlm,
        ck.clip,
        ck.reward_model,
        dtype="bfloat16",
        clip_kwargs={"dtype": "float32"},
        kv_tokens=1,
    )
    by_role = {m.role: m for m in est.models}
    assert by_role["vlm"].weight_bytes == 2 * loaded["vlm"]
    assert by_role["clip"].weight_bytes == 4 * loaded["clip"]
    assert by_role["reward_model"].precision == "bfloat16"


def test_published_sizes_of_the_reference_models():
    """LLaVA-1.5-7B 7.06B, CLIP-L/336 428M, ArmoRM 7.511B (Llama-3-8B backbone + heads)."""
    llava = estimate_model(LLAVA, "vlm")
    clip = estimate_model(CLIP_L, "clip")
    armo = estimate_model(ARMORM, "reward_model")
    assert llava.parameters == 7_063_427_072
    assert clip.parameters == 427_944_193
    # Llama-3-8B without lm_head (vocab 128257) + regression 4096x19 + gating MLP
    # (4096->1024->1024->1024->19, biases) + logit scale + 19x19 transform.
    backbone = 128_257 * 4096 + 32 * 218_112_000 + 4096
    heads = 4096 * 19 + (4096 * 1024 + 1024) + 2 * (1024 * 1024 + 1024) + (1024 * 19 + 19) + 1
    assert armo.parameters == backbone + heads + 19 * 19
    assert round(armo.parameters / 1e9, 3) == 7.511


def test_paper_preset_needs_more_than_one_24gb_gpu():
    est = estimate_memory(LLAVA, CLIP_L, ARMORM, preset="paper", device="cuda", kv_tokens=1)
    by_role = {m.role: m for m in est.models}
    assert by_role["vlm"].precision == "float16"
    assert by_role["clip"].precision == "float32"
    assert by_role["reward_model"].precision == "bfloat16"
    weights = sum(m.weight_bytes for m in est.models)
    assert weights == 2 * 7_063_427_072 + 4 * 427_944_193 + 2 * by_role["reward_model"].parameters
    assert 28 < gib(weights) < 30  # the "about 31 GB" (decimal) for the three
    assert est.per_device() == {"cuda": est.total_bytes}


def test_kv_cache_term_of_llava():
    m = estimate_model(LLAVA, "vlm", dtype="float16", kv_tokens=1000, kv_sequences=6)
    # 2 (K, V) x 32 layers x 32 heads x 128 dims x 2 bytes per token and row.
    assert m.kv_cache_bytes == 2 * 32 * 32 * 128 * 2 * 1000 * 6
    assert m.total_bytes == m.weight_bytes + m.kv_cache_bytes


def test_quantized_reward_model():
    full = estimate_model(ARMORM, "reward_model", dtype="bfloat16")
    q4 = estimate_model(
        ARMORM, "reward_model", dtype="bfloat16", quantization_config={"load_in_4bit": True}
    )
    q8 = estimate_model(
        ARMORM, "reward_model", dtype="bfloat16", quantization_config={"load_in_8bit": True}
    )
    assert q4.parameters == q8.parameters == full.parameters
    assert q4.weight_bytes < q8.weight_bytes < full.weight_bytes
    # The embedding (128257 x 4096) is not a Linear: it stays bf16 in every case.
    assert q4.weight_bytes > 2 * 128_257 * 4096
    assert q4.precision.startswith("4-bit")


def test_per_model_devices_are_totalled_per_device(tiny_checkpoints):
    ck = tiny_checkpoints
    est = estimate_memory(
        ck.vlm,
        ck.clip,
        ck.reward_model,
        device="cuda:0",
        reward_model_kwargs={"device": "cuda:1"},
        kv_tokens=1,
    )
    devices = est.per_device()
    assert set(devices) == {"cuda:0", "cuda:1"}
    rm = next(m for m in est.models if m.role == "reward_model")
    assert devices["cuda:1"] == rm.total_bytes
    assert est.to_dict()["per_device"] == devices


def test_bad_inputs_raise_typed_errors(tmp_path, tiny_checkpoints):
    with pytest.raises(InvalidInputError, match="cannot read the config"):
        estimate_model(str(tmp_path / "missing"), "vlm")
    with pytest.raises(InvalidInputError, match="quantization_config"):
        estimate_model(
            tiny_checkpoints.reward_model, "reward_model", quantization_config={"bits": 3}
        )
    with pytest.raises(InvalidInputError, match="dtype"):
        estimate_model(tiny_checkpoints.clip, "clip", dtype="int8")
    with pytest.raises(InvalidInputError, match="open_clip"):
        estimate_model("open_clip:ViT-B-32/laion2b_s34b_b79k", "clip")
    with pytest.raises(InvalidInputError, match="kv_tokens"):
        estimate_memory(tiny_checkpoints.vlm, kv_tokens=0)
