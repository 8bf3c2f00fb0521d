"""The generator in this process: a :class:`~eta_guard.decoding.vlm.VLMAdapter` behind the async interface.

:class:`eta_guard.pipeline.ETA` drives the adapter directly (its search reuses one KV cache across
sentences, which a text-level interface cannot express); this backend puts the same adapter behind
:class:`~eta_guard.backends.base.GeneratorBackend`, so that :class:`BackendETA` runs on it too (the
same code path as a remote engine, e.g. to compare them). Model calls run one at a time in a worker
thread: the model keeps per-call state.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING

from eta_guard.backends.base import Completion, SamplingStep

if TYPE_CHECKING:
    from eta_guard.decoding.vlm import VLMAdapter
    from eta_guard.messages import Conversation


class LocalBackend:
    """A :class:`~eta_guard.backends.base.GeneratorBackend` over a local VLM.

    Args:
        adapter: the loaded VLM (``VLMAdapter.from_pretrained(...)``).
    """

    def __init__(self, adapter: VLMAdapter) -> None:
        self.adapter = adapter
        self.name = adapter.name
        self._lock = threading.Lock()

    async def greedy(
        self,
        conversation: Conversation,
        *,
        assistant_text: str = "",
        max_tokens: int,
        stop: Sequence[str] | None = None,
    ) -> AsyncIterator[str | Completion]:
        from eta_guard.pipeline import _iterate_in_thread

        def run() -> Iterator[str | Completion]:
            with self._lock:
                prepared = self.adapter.prepare(conversation, assistant_prefix=assistant_text)
                stream = self.adapter.stream_greedy(prepared, max_new_tokens=max_tokens, stop=stop)
                yield from stream  # deltas as the tokens are decoded
                out = stream.output
                assert out is not None
                eos = set(self.adapter.eos_token_ids)
                yield Completion(
                    text=out.text,
                    num_tokens=len(out.token_ids),
                    finish_reason=out.finish_reason,
                    ended=bool(out.token_ids) and out.token_ids[-1] in eos,
                    prompt_tokens=prepared.num_prompt_tokens,
                    token_ids=tuple(out.token_ids),
                )

        async for item in _iterate_in_thread(run):
            yield item

    async def sample(
        self, conversation: Conversation, *, assistant_text: str, step: SamplingStep
    ) -> list[Completion]:
        return await asyncio.to_thread(self._sample, conversation, assistant_text, step)

    def _sample(
        self, conversation: Conversation, assistant_text: str, step: SamplingStep
    ) -> list[Completion]:
        import torch

        from eta_guard.decoding.stopping import SentenceEndCriteria, candidate_lengths

        adapter = self.adapter
        with self._lock, torch.inference_mode():
            prepared = adapter.prepare(conversation, assistant_prefix=assistant_text)
            start = prepared.num_prompt_tokens
            criteria = SentenceEndCriteria(
                adapter.tokenizer, step.terminators, start_length=start, rule=step.rule
            )
            config = adapter.generation_config(
                max_new_tokens=adapter.max_new_tokens_for(prepared, step.max_tokens),
                do_sample=True,
                top_k=step.top_k,
                temperature=step.temperature,
                num_return_sequences=step.n,
            )
            with torch.random.fork_rng(devices=[]):
                if step.seed is not None:
                    torch.manual_seed(step.seed)
                out = adapter.model.generate(
                    **prepared.model_inputs,
                    generation_config=config,
                    stopping_criteria=[criteria],
                    cache=adapter.new_cache(),
                )
            sequences = out.sequences
            lengths, ended = candidate_lengths(
                sequences, start, eos_token_ids=adapter.eos_token_ids, sentence_end=criteria
            )
            context = prepared.input_ids[0]
            result = []
            for row in range(step.n):
                ids = sequences[row, start : start + lengths[row]].tolist()
                sentence_end = not ended[row] and bool(
                    criteria(sequences[row : row + 1, : start + lengths[row]])[0]
                )
                result.append(
                    Completion(
                        text=adapter.decode_continuation(context, ids),
                        num_tokens=len(ids),
                        finish_reason="stop" if ended[row] or sentence_end else "length",
                        ended=ended[row],
                        prompt_tokens=start,
                    )
                )
            return result

    async def aclose(self) -> None:
        return None
