"""No silent random heads: every loader refuses a checkpoint that loads with new weights.

A weight is removed from a copy of a tiny checkpoint; transformers would initialise it at
random (a log line only). The VLM, CLIP and reward-model loaders raise ``InvalidInputError``
naming the key and the opt-out; ``allow_new_weights=True`` accepts it on purpose.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from eta_guard.decoding.vlm import VLMAdapter
from eta_guard.errors import InvalidInputError
from eta_guard.evaluators.clip import CLIPPreEvaluator
from eta_guard.evaluators.reward import RewardPostEvaluator


def _without(source: str, tmp: Path, prefix: str) -> tuple[str, list[str]]:
    """A copy of ``source`` whose ``model.safetensors`` lacks every key starting with ``prefix``."""
    target = tmp / Path(source).name
    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    dropped = sorted(k for k in weights if k.startswith(prefix))
    assert dropped, f"no key starts with {prefix!r}"
    save_file(
        {k: v for k, v in weights.items() if k not in dropped},
        str(target / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return str(target), dropped


def test_reward_model_without_its_head_is_refused(tiny_checkpoints, tmp_path):
    path, dropped = _without(tiny_checkpoints.reward_model, tmp_path, "score.")
    with pytest.raises(InvalidInputError, match="reward model") as info:
        RewardPostEvaluator.from_pretrained(path, device="cpu")
    assert all(k in str(info.value) for k in dropped) and "allow_new_weights=True" in str(
        info.value
    )
    rm = RewardPostEvaluator.from_pretrained(path, device="cpu", allow_new_weights=True)
    assert len(rm.score(["ok"], "be safe")) == 1


def test_clip_without_its_projection_is_refused(tiny_checkpoints, tmp_path):
    path, dropped = _without(tiny_checkpoints.clip, tmp_path, "visual_projection.")
    with pytest.raises(InvalidInputError, match="visual_projection.weight"):
        CLIPPreEvaluator.from_pretrained(path, device="cpu")
    clip = CLIPPreEvaluator.from_pretrained(
        path, device="cpu", model_kwargs={"allow_new_weights": True}
    )
    assert clip is not None


def test_vlm_without_its_projector_is_refused(tiny_checkpoints, tmp_path):
    path, dropped = _without(tiny_checkpoints.vlm, tmp_path, "multi_modal_projector.")
    with pytest.raises(InvalidInputError, match="VLM.*multi_modal_projector.linear_1.weight"):
        VLMAdapter.from_pretrained(path, device="cpu")
    vlm = VLMAdapter.from_pretrained(path, device="cpu", model_kwargs={"allow_new_weights": True})
    assert vlm is not None


def test_the_opt_out_must_be_a_bool(tiny_checkpoints):
    with pytest.raises(InvalidInputError, match="allow_new_weights='yes'"):
        RewardPostEvaluator.from_pretrained(
            tiny_checkpoints.reward_model, device="cpu", model_kwargs={"allow_new_weights": "yes"}
        )


def test_open_clip_without_weights_is_refused(tmp_path):
    pytest.importorskip("open_clip")
    from eta_guard.testing import build_tiny_open_clip

    model_name, _checkpoint = build_tiny_open_clip(tmp_path)  # registers the architecture
    with pytest.raises(InvalidInputError, match="pretrained=None.*allow_new_weights"):
        CLIPPreEvaluator.from_pretrained(model_name, backend="open_clip", device="cpu")
    clip = CLIPPreEvaluator.from_pretrained(
        model_name,
        backend="open_clip",
        device="cpu",
        model_kwargs={"allow_new_weights": True},
    )
    assert clip is not None
