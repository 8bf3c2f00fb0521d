"""ArmoRM (``RLHFlow/ArmoRM-Llama3-8B-v0.1``) in plain transformers code: no remote code needed.

The checkpoint ships its architecture (``LlamaForRewardModelWithGating``) as remote code that
imports a name transformers 5 removed, and without remote code ``AutoModelForSequenceClassification``
quietly builds a ``LlamaForSequenceClassification`` with a random ``score`` head. This module
re-implements the published architecture with the checkpoint's own parameter names, so
``from_pretrained`` loads its safetensors (sharded or not) by name:

- ``model.*``: a ``LlamaModel`` backbone;
- ``regression_layer.weight``: ``hidden -> num_objectives`` (19), no bias, read at the last
  attended token;
- ``gating.layers.{0..n}.{weight,bias}`` and ``gating.logit_scale``: ``gating_n_hidden`` ReLU
  layers of ``gating_hidden_dim``, then a linear layer to the objectives, then
  ``softmax(x / gating_temperature) * logit_scale``; read at the hidden state of the first token
  of the LAST occurrence of ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``;
- ``reward_transform_matrix``: ``[num_objectives, num_objectives]``;
- ``score = sum(gating * (rewards @ reward_transform_matrix), dim=1)``.

Sources (checked 2026-11): ``modeling_custom.py`` and ``config.json`` of the Hub repo
``RLHFlow/ArmoRM-Llama3-8B-v0.1`` (mirrored in github ``RLHFlow/RLHF-Reward-Modeling``), and
its model card (``armo-rm/README.md``). Differences from that code, on purpose: the reward
position comes from the attention mask instead of "first pad id - 1" (exact for any padding,
and a ``[PAD]`` id equal to the embedding size is never embedded), and the gating pattern is
the tokenizer's encoding of the marker text instead of hard-coded Llama-3 ids (the same ids
for the real tokenizer: ``[128009, 128006, 78191, 128007, 271]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

#: ``config.architectures`` entry that marks an ArmoRM checkpoint.
ARMORM_ARCHITECTURE = "LlamaForRewardModelWithGating"
#: The text whose last occurrence marks the gating position (Llama-3 assistant header).
GATING_MARKER = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
# Defaults of the published modelling code (config_dict.get(key, default)).
_DEFAULTS = {
    "num_objectives": 19,
    "gating_temperature": 10,
    "gating_hidden_dim": 1024,
    "gating_n_hidden": 3,
}


def is_armorm_config(config: Any) -> bool:
    """True when ``config.architectures`` names ArmoRM's ``LlamaForRewardModelWithGating``."""
    return ARMORM_ARCHITECTURE in (getattr(config, "architectures", None) or [])


def gating_pattern(tokenizer: Any) -> tuple[int, ...]:
    """Token ids of :data:`GATING_MARKER` (special tokens parsed: they are the template's own)."""
    return tuple(tokenizer.encode(GATING_MARKER, add_special_tokens=False))


def _setting(config: Any, key: str) -> Any:
    value = getattr(config, key, None)
    return _DEFAULTS[key] if value is None else value


class ArmoRMGating(nn.Module):
    """The gating MLP: ``softmax(mlp(x) / temperature, dim=1) * logit_scale``.

    Args:
        in_features: Hidden size of the backbone.
        out_features: Number of reward objectives.
        temperature: Softmax temperature (``gating_temperature``).
        hidden_dim: Width of the hidden layers (``gating_hidden_dim``).
        n_hidden: Number of ReLU hidden layers (``gating_n_hidden``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        temperature: float,
        hidden_dim: int,
        n_hidden: int,
    ) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.logit_scale = nn.Parameter(torch.ones(1))
        widths = [in_features] + [hidden_dim] * n_hidden
        layers = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        layers.append(nn.Linear(widths[-1], out_features, bias=True))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Tensor[B, hidden] -> Tensor[B, num_objectives]``."""
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        x = self.layers[-1](x)
        return F.softmax(x / self.temperature, dim=1) * self.logit_scale[0]


@dataclass
class ArmoRMOutput(ModelOutput):
    """ArmoRM's outputs (the names of the published ``CustomOutput``).

    Attributes:
        score: ``Tensor[B]``, the preference score (what ETA thresholds).
        rewards: ``Tensor[B, num_objectives]``, the regression layer's output.
        gating_output: ``Tensor[B, num_objectives]``, the gating weights.
        logits: Same as ``score``.
    """

    score: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    gating_output: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class LlamaForRewardModelWithGating(LlamaPreTrainedModel):
    """ArmoRM with the published class and parameter names (see the module docstring).

    ``gating_token_pattern`` must be set (by :class:`RewardPostEvaluator`, from the tokenizer)
    before a forward: it is the token ids of :data:`GATING_MARKER`.
    """

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.num_objectives = int(_setting(config, "num_objectives"))
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, self.num_objectives, bias=False)
        self.reward_transform_matrix = nn.Parameter(
            torch.eye(self.num_objectives), requires_grad=False
        )
        self.gating = ArmoRMGating(
            config.hidden_size,
            self.num_objectives,
            temperature=float(_setting(config, "gating_temperature")),
            hidden_dim=int(_setting(config, "gating_hidden_dim")),
            n_hidden=int(_setting(config, "gating_n_hidden")),
        )
        self.gating_token_pattern: tuple[int, ...] | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Only runs for weights a checkpoint lacks (refused by eta_guard unless opted out).
        super()._init_weights(module)
        if isinstance(module, ArmoRMGating):
            init.ones_(module.logit_scale)
        elif isinstance(module, LlamaForRewardModelWithGating):
            init.copy_(module.reward_transform_matrix, torch.eye(module.num_objectives))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ArmoRMOutput:
        """Score ``input_ids`` (``Tensor[B, L]``, padded anywhere the mask is 0).

        Raises:
            ValueError: ``gating_token_pattern`` is unset, a row lacks the gating marker, or an
                attended id is outside the embedding.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attended = attention_mask.bool()
        vocab = self.model.embed_tokens.num_embeddings
        if bool(((input_ids < 0) | (input_ids >= vocab))[attended].any()):
            raise ValueError(f"an attended token id is outside the embedding (size {vocab})")
        # Padding may use an id equal to the embedding size ([PAD]); it is masked, so any valid
        # id gives the same result; 0 never indexes out of range.
        safe_ids = input_ids.masked_fill(~attended, 0)
        hidden = self.model(input_ids=safe_ids, attention_mask=attention_mask, **kwargs)[0]
        rows = torch.arange(input_ids.shape[0], device=hidden.device)
        reward_at = last_attended(attention_mask).to(hidden.device)
        gate_at = self.gating_positions(input_ids, attention_mask).to(hidden.device)
        return self.head(hidden[rows, reward_at], hidden[rows, gate_at])

    def forward_shared_prefix(
        self, prefix_ids: torch.Tensor, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor
    ) -> ArmoRMOutput:
        """Score rows that share ``prefix_ids`` (``Tensor[1, P]``), running the prefix once.

        ``suffix_ids`` / ``suffix_mask`` (``Tensor[B, S]``) hold each row's rest, right-padded,
        with at least one attended token per row. The gate may sit in the prefix or a suffix;
        the result equals :meth:`forward` on the concatenated rows (up to float rounding).
        """
        from transformers import DynamicCache

        batch, prefix_len = suffix_ids.shape[0], prefix_ids.shape[1]
        cache = DynamicCache(config=self.config)
        prefix_hidden = self.model(input_ids=prefix_ids, cache=cache, use_cache=True)[0]
        cache.batch_repeat_interleave(batch)
        attended = suffix_mask.bool()
        full_mask = torch.cat(
            [torch.ones_like(suffix_mask[:, :1]).expand(batch, prefix_len), suffix_mask], dim=1
        )
        suffix_hidden = self.model(
            input_ids=suffix_ids.masked_fill(~attended, 0),
            attention_mask=full_mask,
            cache=cache,
            use_cache=True,
        )[0]
        hidden = torch.cat([prefix_hidden.expand(batch, -1, -1), suffix_hidden], dim=1)
        full_ids = torch.cat([prefix_ids.expand(batch, -1), suffix_ids], dim=1)
        rows = torch.arange(batch, device=hidden.device)
        reward_at = (prefix_len + last_attended(suffix_mask)).to(hidden.device)
        gate_at = self.gating_positions(full_ids, full_mask).to(hidden.device)
        return self.head(hidden[rows, reward_at], hidden[rows, gate_at])

    def head(self, reward_hidden: torch.Tensor, gate_hidden: torch.Tensor) -> ArmoRMOutput:
        """Scores from the backbone's last hidden states at the reward and gating positions.

        Args:
            reward_hidden: ``Tensor[B, hidden]`` at each row's last attended token.
            gate_hidden: ``Tensor[B, hidden]`` at each row's gating position.
        """
        rewards = self.regression_layer(reward_hidden)
        gating_output = self.gating(gate_hidden)
        score = torch.sum(gating_output * (rewards @ self.reward_transform_matrix), dim=1)
        return ArmoRMOutput(score=score, rewards=rewards, gating_output=gating_output, logits=score)

    def gating_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``Tensor[B]``: start of the last gating marker among each row's attended tokens."""
        pattern = self.gating_token_pattern
        if not pattern:
            raise ValueError(
                "gating_token_pattern is not set; set it to gating_pattern(tokenizer) "
                "(RewardPostEvaluator does this)"
            )
        return last_occurrence(input_ids, attention_mask, pattern)


def last_attended(attention_mask: torch.Tensor) -> torch.Tensor:
    """``Tensor[B]``: index of each row's last attended position (any padding side)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.bool().long()).argmax(-1)


def last_occurrence(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pattern: Sequence[int]
) -> torch.Tensor:
    """``Tensor[B]``: start of the last fully attended occurrence of ``pattern`` in each row.

    Raises:
        ValueError: A row has no occurrence.
    """
    k = len(pattern)
    if input_ids.shape[-1] < k:
        raise ValueError("the ArmoRM gating marker was not found: the input is too short")
    target = torch.tensor(list(pattern), dtype=input_ids.dtype, device=input_ids.device)
    windows = input_ids.unfold(-1, k, 1)  # [B, L-k+1, k]
    valid = attention_mask.bool().long().unfold(-1, k, 1).all(-1)
    found = (windows == target).all(-1) & valid
    if not bool(found.any(-1).all()):
        raise ValueError(
            "the ArmoRM gating marker (<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
            "\\n\\n) was not found in a row; render the conversation with the RM's chat template"
        )
    starts = torch.arange(found.shape[-1], device=input_ids.device)
    return (starts * found.long()).argmax(-1)
