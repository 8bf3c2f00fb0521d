"""The vLLM fixtures' weight layout (no engine needed): vLLM 0.32 loads a LLaVA only from
llava-hf's names (``vision_tower.vision_model.*``), and transformers must load that layout to
the same tensors, since the same folder is the local model."""

from __future__ import annotations

import torch
from safetensors import safe_open

from eta_guard.backends.vllm_fixtures import engine_layout
from eta_guard.testing import build_tiny_checkpoints


def _keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_engine_layout_copy_has_llava_hf_names_and_loads_the_same_weights(tmp_path):
    from transformers import LlavaForConditionalGeneration

    source = build_tiny_checkpoints(tmp_path / "ckpt").vlm
    before = _keys(tmp_path / "ckpt" / "vlm-llava-tiny")
    out = engine_layout(source, copy_to=tmp_path / "engine")
    after = _keys(out)
    vision = {k for k in after if k.startswith("vision_tower.")}
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert {k for k in after if not k.startswith("vision_tower.")} == {
        k for k in before if not k.startswith("vision_tower.")
    }
    assert _keys(tmp_path / "ckpt" / "vlm-llava-tiny") == before  # the source is untouched
    engine_layout(out)  # idempotent
    assert _keys(out) == after
    a = LlavaForConditionalGeneration.from_pretrained(source).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
