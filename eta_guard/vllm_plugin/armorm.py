"""ArmoRM as a vLLM pooling model (imported by vLLM's model registry, never by eta_guard).

The backbone is vLLM's own ``LlamaModel``; the heads are ArmoRM's, with the checkpoint's
parameter names (``regression_layer``, ``gating.*``, ``reward_transform_matrix``), and the score
is the one :class:`eta_guard.evaluators.armorm.LlamaForRewardModelWithGating` computes: rewards
at the last prompt token, the gate at the first token of the last
:data:`~eta_guard.evaluators.armorm.GATING_MARKER` (found with the same
:func:`~eta_guard.evaluators.armorm.last_occurrence`), ``sum(gate * (rewards @ transform))``.

The pooler needs every prompt token's hidden state (the gate sits anywhere in the prompt), so
the model declares whole-prompt pooling: vLLM then disables prefix caching and chunked prefill by
default. A request whose hidden states are incomplete anyway (prefix caching forced on) or whose
prompt lacks the marker gets a NaN score, never a guessed one: raising inside the engine would
stop it for every client, and ETA's remote RM refuses non-finite scores as an evaluator error.
Only the ``classify`` task is served (``/classify``; ``use_activation`` applies vLLM's sigmoid).
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.pooler import Pooler, PoolingParamsUpdate
from vllm.model_executor.layers.pooler.tokwise.methods import AllPool
from vllm.model_executor.models.interfaces_base import default_pooling_type
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors
from vllm.tasks import PoolingTask
from vllm.v1.pool.metadata import PoolingMetadata

from eta_guard.evaluators.armorm import ArmoRMGating, gating_pattern, last_occurrence

logger = init_logger(__name__)

# Defaults of the published modelling code (config_dict.get(key, default)), as in
# eta_guard.evaluators.armorm.
_DEFAULTS = {
    "num_objectives": 19,
    "gating_temperature": 10,
    "gating_hidden_dim": 1024,
    "gating_n_hidden": 3,
}


def _setting(config: Any, key: str) -> Any:
    value = getattr(config, key, None)
    return _DEFAULTS[key] if value is None else value


class ArmoRMPooler(Pooler):
    """Scores each finished prompt from all of its hidden states (``classify`` only)."""

    def __init__(self, model: ArmoRMForVLLM) -> None:
        super().__init__()
        self.pooling = AllPool()  # whole prompts, chunked prefill included
        # A bound method, not a submodule: the heads' parameters stay the model's (their
        # checkpoint names).
        self.score_rows = model.score_rows
        self.pattern = model.gating_token_pattern

    def get_supported_tasks(self) -> Set[PoolingTask]:
        return {"classify"}

    def get_pooling_updates(self, task: PoolingTask) -> PoolingParamsUpdate:
        return PoolingParamsUpdate(requires_token_ids=True)

    def forward(
        self, hidden_states: torch.Tensor, pooling_metadata: PoolingMetadata
    ) -> list[torch.Tensor | None]:
        per_prompt = self.pooling(hidden_states, pooling_metadata)
        token_ids = pooling_metadata.get_prompt_token_ids_cpu()
        outputs: list[torch.Tensor | None] = []
        for hidden, ids, params in zip(
            per_prompt, token_ids, pooling_metadata.pooling_params, strict=True
        ):
            if hidden is None:  # a prompt still being prefilled in chunks
                outputs.append(None)
                continue
            score = self._score_one(hidden, ids)
            outputs.append(torch.sigmoid(score) if params.use_activation else score)
        return outputs

    def _score_one(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        nan = torch.full((1,), float("nan"), dtype=torch.float32, device=hidden.device)
        if hidden.shape[0] != ids.shape[0]:
            logger.warning(
                "ArmoRM needs every prompt token's hidden state (%d of %d computed): "
                "serve it without --enable-prefix-caching; returning NaN",
                hidden.shape[0],
                ids.shape[0],
            )
            return nan
        ids_row = ids.reshape(1, -1).long()
        try:
            gate_at = int(last_occurrence(ids_row, torch.ones_like(ids_row), self.pattern)[0])
        except ValueError:
            logger.warning("ArmoRM gating marker not in the prompt; returning NaN")
            return nan
        return self.score_rows(hidden[-1:], hidden[gate_at : gate_at + 1])


@default_pooling_type(seq_pooling_type="MEAN")  # whole-prompt pooling: see the module docstring
class ArmoRMForVLLM(nn.Module):
    """``LlamaForRewardModelWithGating`` for vLLM's pooling runner."""

    is_pooling_model = True
    pooler: Pooler

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        from transformers import AutoTokenizer

        model_config = vllm_config.model_config
        config = model_config.hf_config
        self.config = config
        self.model = LlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        n = int(_setting(config, "num_objectives"))
        self.regression_layer = nn.Linear(config.hidden_size, n, bias=False)
        self.reward_transform_matrix = nn.Parameter(torch.eye(n), requires_grad=False)
        self.gating = ArmoRMGating(
            config.hidden_size,
            n,
            temperature=float(_setting(config, "gating_temperature")),
            hidden_dim=int(_setting(config, "gating_hidden_dim")),
            n_hidden=int(_setting(config, "gating_n_hidden")),
        )
        tokenizer = AutoTokenizer.from_pretrained(
            model_config.tokenizer, revision=model_config.tokenizer_revision
        )
        self.gating_token_pattern = gating_pattern(tokenizer)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        self.pooler = ArmoRMPooler(self)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def score_rows(self, reward_hidden: torch.Tensor, gate_hidden: torch.Tensor) -> torch.Tensor:
        """``Tensor[B]`` scores from the hidden states at the reward and gate positions."""
        dtype = self.regression_layer.weight.dtype
        rewards = self.regression_layer(reward_hidden.to(dtype))
        gating_output = self.gating(gate_hidden.to(dtype))
        return torch.sum(gating_output * (rewards @ self.reward_transform_matrix), dim=1)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=["lm_head."])
        return loader.load_weights(weights)
