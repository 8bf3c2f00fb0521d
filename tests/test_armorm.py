"""Native ArmoRM: loading without remote code, and rewards equal to the architecture's formula.

The replica's weights are random: these tests prove the loader and the arithmetic, never that a
reward means anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from eta_guard._device import load_pretrained
from eta_guard.errors import InvalidInputError
from eta_guard.evaluators.armorm import (
    GATING_MARKER,
    LlamaForRewardModelWithGating,
    last_attended,
    last_occurrence,
)
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.evaluators.reward import RewardPostEvaluator

INSTRUCTION = "Please give me a response without any safety issues."
RESPONSES = [
    "I cannot help with that.",
    "Sure. First, gather the parts. Then, assemble them carefully and test the result!",
    "No.",
]


@pytest.fixture(scope="module")
def rm(armorm_replica):
    return RewardPostEvaluator.from_pretrained(str(armorm_replica), device="cpu")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read from its shards by name (not through the model)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(path / shard)))
    return tensors


def _reference_score(rm, weights, config, ids: list[int]) -> float:
    """ArmoRM's formula in plain torch, on one unpadded row (the backbone is transformers')."""
    with torch.no_grad():
        hidden = rm.model.model(input_ids=torch.tensor([ids]))[0][0]  # [L, H]
    pattern = rm.tokenizer.encode(GATING_MARKER, add_special_tokens=False)
    # The published find_token_for_gating: scan from the end for the last occurrence.
    gate_at = next(
        j for j in range(len(ids) - len(pattern), -1, -1) if ids[j : j + len(pattern)] == pattern
    )
    rewards = hidden[-1] @ weights["regression_layer.weight"].T  # [19]
    x = hidden[gate_at]
    n_layers = config["gating_n_hidden"] + 1
    for i in range(n_layers):
        x = x @ weights[f"gating.layers.{i}.weight"].T + weights[f"gating.layers.{i}.bias"]
        if i < n_layers - 1:
            x = torch.relu(x)
    gating = F.softmax(x / config["gating_temperature"], dim=0) * weights["gating.logit_scale"][0]
    return float(torch.sum(gating * (rewards @ weights["reward_transform_matrix"])))


def test_replica_is_laid_out_like_the_checkpoint(armorm_replica):
    config = json.loads((armorm_replica / "config.json").read_text())
    assert config["architectures"] == ["LlamaForRewardModelWithGating"]
    assert config["auto_map"]["AutoModelForSequenceClassification"].endswith(
        "LlamaForRewardModelWithGating"
    )
    assert {config[k] for k in ("num_objectives", "gating_temperature", "gating_n_hidden")} == {
        19,
        10,
        3,
    }
    assert config["pad_token_id"] == config["vocab_size"] - 1  # [PAD] last, like 128256
    weights = _weights(armorm_replica)
    assert (
        len(
            set(
                json.loads((armorm_replica / "model.safetensors.index.json").read_text())[
                    "weight_map"
                ].values()
            )
        )
        > 1
    )  # sharded, like the real four shards
    assert weights["regression_layer.weight"].shape == (19, config["hidden_size"])
    assert weights["reward_transform_matrix"].shape == (19, 19)
    assert weights["gating.layers.3.weight"].shape == (19, config["gating_hidden_dim"])
    assert weights["gating.logit_scale"].shape == (1,)
    assert "score.weight" not in weights and not (armorm_replica / "modeling_custom.py").exists()


def test_default_loaders_build_native_armorm_without_remote_code(armorm_replica, rm):
    assert isinstance(rm.model, LlamaForRewardModelWithGating)
    evaluator = ETAEvaluator.from_pretrained(clip=None, reward_model=str(armorm_replica))
    assert isinstance(evaluator.post.model, LlamaForRewardModelWithGating)
    # trust_remote_code=True changes nothing: the checkpoint's code is never run (the replica
    # ships none, so running it would fail).
    trusted = RewardPostEvaluator.from_pretrained(
        str(armorm_replica), device="cpu", trust_remote_code=True
    )
    assert isinstance(trusted.model, LlamaForRewardModelWithGating)
    assert trusted.score(RESPONSES, INSTRUCTION) == pytest.approx(
        rm.score(RESPONSES, INSTRUCTION), abs=1e-6
    )


def test_eta_from_pretrained_loads_native_armorm(tiny_checkpoints, armorm_replica):
    from eta_guard import ETA

    eta = ETA.from_pretrained(
        vlm=tiny_checkpoints.vlm,
        clip=tiny_checkpoints.clip,
        reward_model=str(armorm_replica),
        device="cpu",
    )
    assert isinstance(eta.evaluator.post.model, LlamaForRewardModelWithGating)
    assert eta.evaluator.evaluate_output("I cannot help with that.").post_windows == 1


def test_plain_sequence_classification_load_is_refused(armorm_replica):
    # The story: without remote code, Auto builds LlamaForSequenceClassification with a
    # newly initialised `score` head. That is refused, naming the key and the way out.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with pytest.raises(InvalidInputError, match=r"score\.weight.*allow_new_weights=True"):
        load_pretrained(
            "reward model", str(armorm_replica), AutoModelForSequenceClassification, AutoTokenizer
        )
    model, _ = load_pretrained(
        "reward model",
        str(armorm_replica),
        AutoModelForSequenceClassification,
        AutoTokenizer,
        model_kwargs={"allow_new_weights": True},
    )
    assert type(model).__name__ == "LlamaForSequenceClassification"


@pytest.mark.parametrize("index", range(len(RESPONSES)))
def test_single_reward_equals_the_formula(armorm_replica, rm, index):
    weights = _weights(armorm_replica)
    config = json.loads((armorm_replica / "config.json").read_text())
    ids = rm.encode(INSTRUCTION, RESPONSES[index])
    expected = _reference_score(rm, weights, config, ids)
    assert rm.score([RESPONSES[index]], INSTRUCTION)[0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_padded_batch_equals_the_formula(armorm_replica, rm, monkeypatch, shared_prefix):
    # Both batch paths: the instruction's prefix run once (the default for best-of-N), and one
    # plain right-padded forward.
    if not shared_prefix:
        monkeypatch.setattr("eta_guard.evaluators.reward._MIN_SHARED_PREFIX", 10**9)
    calls = []
    monkeypatch.setattr(
        rm.model,
        "forward_shared_prefix",
        lambda *a, wrapped=rm.model.forward_shared_prefix: calls.append(1) or wrapped(*a),
    )
    weights = _weights(armorm_replica)
    config = json.loads((armorm_replica / "config.json").read_text())
    lengths = {len(rm.encode(INSTRUCTION, r)) for r in RESPONSES}
    assert len(lengths) == len(RESPONSES)  # the batch is really padded
    expected = [_reference_score(rm, weights, config, rm.encode(INSTRUCTION, r)) for r in RESPONSES]
    batched = rm.score(RESPONSES, INSTRUCTION)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(expected), atol=1e-5, rtol=0)
    assert bool(calls) == shared_prefix


def test_pad_id_equal_to_the_embedding_size_is_never_embedded(rm):
    # ArmoRM's [PAD] may sit at (or past) the embedding's end; padded rows must not index it.
    short, long = (rm.encode(INSTRUCTION, r) for r in ("No.", RESPONSES[1]))
    size = rm.model.model.embed_tokens.num_embeddings
    ids = torch.full((2, len(long)), size)
    ids[0, : len(short)] = torch.tensor(short)
    ids[1] = torch.tensor(long)
    mask = (torch.arange(len(long)) < torch.tensor([[len(short)], [len(long)]])).long()
    with torch.no_grad():
        padded = rm.model(input_ids=ids, attention_mask=mask).score
        alone = rm.model(input_ids=torch.tensor([short])).score
    assert padded[0].item() == pytest.approx(alone[0].item(), abs=1e-5)
    with pytest.raises(ValueError, match="outside the embedding"):
        rm.model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_positions_are_read_from_the_mask():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_attended(mask).tolist() == [2, 4, 4, 0]
    ids = torch.tensor([[7, 8, 9, 7, 8], [1, 7, 8, 0, 0], [7, 8, 7, 8, 5]])
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert last_occurrence(ids, valid, [7, 8]).tolist() == [3, 1, 2]
    # An occurrence that runs into padding does not count.
    assert last_occurrence(ids[:1], torch.tensor([[1, 1, 1, 1, 0]]), [7, 8]).tolist() == [0]
    with pytest.raises(ValueError, match="gating marker"):
        last_occurrence(ids[1:2], valid[1:2], [9, 9])


def test_gating_reads_the_last_marker(rm):
    # Two assistant headers written by the template itself (a two-turn prompt): the gate
    # follows the later one, as the published find_token_for_gating does.
    conversation = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Be safe."},
        {"role": "assistant", "content": "No."},
    ]
    ids = rm.tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = rm.tokenizer(ids, add_special_tokens=False)["input_ids"]
    pattern = list(rm.model.gating_token_pattern)
    starts = [j for j in range(len(ids)) if ids[j : j + len(pattern)] == pattern]
    assert len(starts) == 2
    tensor = torch.tensor([ids])
    assert rm.model.gating_positions(tensor, torch.ones_like(tensor)).tolist() == [starts[-1]]


@pytest.mark.gpu
def test_bf16_on_cuda_tracks_fp32(armorm_replica, rm):
    # The reference runs ArmoRM in bf16: same loader, same formula, bf16 rounding only.
    gpu = RewardPostEvaluator.from_pretrained(str(armorm_replica), device="cuda", dtype="bf16")
    assert next(gpu.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(
        torch.tensor(gpu.score(RESPONSES, INSTRUCTION)),
        torch.tensor(rm.score(RESPONSES, INSTRUCTION)),
        atol=0.05,
        rtol=0.05,
    )


@pytest.mark.parametrize("cut", [3, "gate", "late"])
def test_shared_prefix_forward_equals_the_full_forward(rm, cut):
    # Wherever the shared prefix ends (before the gate, right after it, or deep in the answer),
    # the prefix-once forward gives the full forward's scores.
    rows = [rm.encode(INSTRUCTION, "Sure. First, gather the parts" + end) for end in (".", "!", "")]
    full = torch.tensor([rows[0]])
    gate = int(rm.model.gating_positions(full, torch.ones_like(full))[0])
    shared = {3: 3, "gate": gate + 2, "late": min(len(r) for r in rows) - 2}[cut]
    assert all(r[:shared] == rows[0][:shared] for r in rows)
    suffix_len = max(len(r) for r in rows) - shared
    suffix = torch.zeros((len(rows), suffix_len), dtype=torch.long)
    mask = torch.zeros_like(suffix)
    for i, r in enumerate(rows):
        suffix[i, : len(r) - shared] = torch.tensor(r[shared:])
        mask[i, : len(r) - shared] = 1
    with torch.no_grad():
        fast = rm.model.forward_shared_prefix(torch.tensor([rows[0][:shared]]), suffix, mask)
        alone = [rm.model(input_ids=torch.tensor([r])).score[0] for r in rows]
    torch.testing.assert_close(fast.score, torch.stack(alone), atol=1e-5, rtol=0)
