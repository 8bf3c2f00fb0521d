"""``ETA``: evaluate, then align, around a vision-language model wherever it runs.

One class for every backend: a local Hugging Face VLM (:meth:`ETA.from_pretrained`, run by
:class:`~eta_guard.backends.local.LocalBackend`) or an inference engine behind an
OpenAI-compatible API (:meth:`ETA.from_openai_compatible`). Every call runs through the one
async stage machine, :class:`eta_guard.engine.request.Request`; the synchronous methods drive the
same coroutines on a background event loop (:mod:`eta_guard.sync_bridge`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from eta_guard.backends.base import GeneratorBackend
from eta_guard.backends.local import LocalBackend
from eta_guard.concurrency import DEFAULT_MAX_CONCURRENCY, check_concurrency, gather_bounded
from eta_guard.config import DEFAULT_CLIP, DEFAULT_REWARD_MODEL, ETAConfig
from eta_guard.decoding.vlm import VLMAdapter
from eta_guard.engine.inputs import check_batch, check_stop
from eta_guard.engine.request import Request
from eta_guard.errors import ETAError, InvalidInputError
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.limits import RequestLimits
from eta_guard.messages import normalize_messages
from eta_guard.remote_fetch import RemoteFetchPolicy
from eta_guard.sync_bridge import aclosing, iterate_sync, run_sync
from eta_guard.verdict import ETAResult, ETAStreamChunk

Messages = Sequence[dict[str, Any]]
logger = logging.getLogger(__name__)


class ETA:
    """ETA around a vision-language model: a local one or one served by an engine.

    Args:
        generator: a :class:`~eta_guard.decoding.vlm.VLMAdapter` (a local model) or any
            :class:`~eta_guard.backends.base.GeneratorBackend` (e.g.
            :class:`~eta_guard.backends.OpenAICompatibleBackend`).
        evaluator: the pre- and post-generation evaluators (local, remote or mixed).
        config: every threshold and search knob (defaults: the evaluator's, else the paper's).

    Example (offline, on random tiny checkpoints: mechanics, not safety):
        >>> from eta_guard import ETA
        >>> from eta_guard.testing import build_tiny_checkpoints, make_test_image
        >>> ckpt = build_tiny_checkpoints("/tmp/eta-tiny")
        >>> eta = ETA.from_pretrained(ckpt.vlm, clip=ckpt.clip, reward_model=ckpt.reward_model)
        >>> messages = [{"role": "user", "content": [
        ...     {"type": "image", "image": make_test_image()},
        ...     {"type": "text", "text": "What is in this picture?"}]}]
        >>> result = eta.generate(messages, max_new_tokens=16)
        >>> result.verdict.pre_score is not None
        True
    """

    def __init__(
        self, generator: Any, evaluator: ETAEvaluator, config: ETAConfig | None = None
    ) -> None:
        if isinstance(generator, GeneratorBackend):
            self.backend: Any = generator
        elif hasattr(generator, "prepare") and hasattr(generator, "stream_greedy"):
            self.backend = LocalBackend(generator)  # a VLMAdapter (or a proxy of one)
        else:
            raise InvalidInputError(
                f"generator is {type(generator).__name__}; pass a VLMAdapter or a backend with "
                "greedy(), sample() and aclose() (see eta_guard.backends.GeneratorBackend)"
            )
        #: The local model, when there is one (None behind an engine).
        self.vlm: VLMAdapter | None = getattr(self.backend, "adapter", None)
        self.config = config or evaluator.config or ETAConfig()
        self.evaluator = evaluator.with_config(self.config)

    @classmethod
    def from_pretrained(
        cls,
        vlm: str,
        clip: str | None = DEFAULT_CLIP,
        reward_model: str | None = DEFAULT_REWARD_MODEL,
        *,
        config: ETAConfig | None = None,
        device: str | None = None,
        dtype: Any = None,
        clip_backend: str = "transformers",
        clip_pretrained: str | None = None,
        trust_remote_code: bool = False,
        local_files_only: bool = False,
        vlm_kwargs: dict[str, Any] | None = None,
        clip_kwargs: dict[str, Any] | None = None,
        reward_model_kwargs: dict[str, Any] | None = None,
        preset: Any = None,
        gates: Sequence[Any] | None = None,
        judges: Sequence[Any] | None = None,
    ) -> ETA:
        """Load the VLM, CLIP and reward model (ids resolve through the local HF cache).

        ``gates`` / ``judges``: extra evaluators as specs (``"llama-guard-vision:PATH"``,
        ``"patch-clip?grid=3"``, ``"qwen3guard:PATH"``...; docs/evaluators.md) or objects;
        ``None`` takes the preset's.

        ``vlm_kwargs`` feed ``VLMAdapter.from_pretrained`` (``model_kwargs``, ``processor_kwargs``);
        ``clip_kwargs`` / ``reward_model_kwargs`` feed the evaluators' loaders. In each,
        ``"device"`` / ``"dtype"`` place that model apart from the shared ``device`` / ``dtype``
        (``vlm_kwargs`` also takes ``"autocast_dtype"``), and ``model_kwargs`` may carry
        ``quantization_config`` / ``device_map`` (:mod:`eta_guard.placement`). ``preset="paper"``
        reproduces the paper's setup (:mod:`eta_guard.presets`); explicit arguments win over it.
        """
        from eta_guard.placement import enable_autocast, resolve_placements

        if preset is not None:
            from eta_guard.presets import get_preset

            config = get_preset(preset).apply_to_config(config)
        config = config or ETAConfig()
        place = resolve_placements(
            device=device, dtype=dtype, vlm_kwargs=vlm_kwargs, preset=preset
        )["vlm"]
        adapter = VLMAdapter.from_pretrained(
            vlm,
            device=place.device,
            dtype=place.dtype,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
            **place.kwargs,
        )
        if place.autocast_dtype is not None:
            enable_autocast(adapter.model, place.autocast_dtype)
        evaluator = ETAEvaluator.from_pretrained(
            clip=clip,
            reward_model=reward_model,
            config=config,
            device=device,
            dtype=dtype,
            clip_backend=clip_backend,
            clip_pretrained=clip_pretrained,
            trust_remote_code=trust_remote_code,
            local_files_only=local_files_only,
            clip_kwargs=clip_kwargs,
            reward_model_kwargs=reward_model_kwargs,
            preset=preset,
            gates=gates,
            judges=judges,
        )
        return cls(adapter, evaluator, config)

    @classmethod
    def from_openai_compatible(
        cls,
        base_url: str,
        model: str,
        clip: str | None = DEFAULT_CLIP,
        reward_model: str | None = DEFAULT_REWARD_MODEL,
        *,
        api_key: str | None = None,
        config: ETAConfig | None = None,
        **kwargs: Any,
    ) -> ETA:
        """ETA with the VLM served by an OpenAI-compatible engine (vLLM, SGLang).

        ``clip`` / ``reward_model`` load locally, as in :meth:`from_pretrained`; with
        ``clip_url=`` / ``reward_model_url=`` they name models served by an engine instead (CLIP
        through ``/v1/embeddings``, a sequence-classification RM through ``/classify``).
        Other keyword arguments: ``tokenizer`` (the served VLM's tokenizer, for token-exact
        sentence ends and breaking forged control tokens), ``reward_model_tokenizer`` (the served
        RM's, to the same end), ``http`` (:class:`eta_guard.backends.HTTPSettings`),
        ``send_image_uuids``, ``image_mean`` (the served model's image-processor mean, for
        ``pad_images_to_square``), ``preset``, ``gates`` / ``judges`` (evaluator specs, local or
        ``remote-llama-guard:MODEL@URL``) and the local loaders' arguments of
        :meth:`from_pretrained`. The same class as :meth:`from_pretrained` returns (see docs/scaling.md).
        """
        from eta_guard.backends.factory import openai_compatible_parts

        preset = kwargs.get("preset")
        if preset is not None:  # the same config for the engine's requests and the evaluators
            from eta_guard.presets import get_preset

            config = get_preset(preset).apply_to_config(config)
        config = config or ETAConfig()
        generator, evaluator = openai_compatible_parts(
            base_url, model, clip, reward_model, api_key=api_key, config=config, **kwargs
        )
        if config.pad_images_to_square and getattr(generator, "processor", None) is None:
            raise InvalidInputError(
                "pad_images_to_square=True pads images with the VLM image processor's mean, "
                "which this engine backend does not have: pass image_mean=, the served model's "
                "path or id as tokenizer=, or preset='paper'; or set pad_images_to_square=False "
                "(the engine then preprocesses images itself)"
            )
        return cls(generator, evaluator, config)

    @property
    def model_name(self) -> str:
        return self.backend.name

    # ------------------------------------------------------------------ async API (native)
    async def agenerate(
        self, messages: Messages, *, stop: Sequence[str] | None = None, **overrides: Any
    ) -> ETAResult:
        """Answer ``messages`` safely. ``overrides`` are ``ETAConfig`` fields for this call only."""
        return await self._result(messages, stop, overrides)

    async def astream(
        self,
        messages: Messages,
        *,
        stop: Sequence[str] | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> AsyncIterator[ETAStreamChunk]:
        """Async :meth:`stream`: the same chunks."""
        async with aclosing(self._chunks(messages, stop, overrides, cancel)) as items:
            async for chunk in items:
                yield chunk

    async def abatch(
        self,
        batch: Sequence[Messages],
        *,
        stop: Sequence[str] | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        **overrides: Any,
    ) -> list[ETAResult]:
        """Answer several conversations concurrently; results in the order of ``batch``.

        At most ``max_concurrency`` (default 8) are in flight at once: a local model batches
        their decoding, an engine their requests. An invalid conversation or a failed call
        raises its error (the first one) after the other calls were cancelled.
        """
        check_batch(batch)
        return await self._results(batch, stop, overrides, check_concurrency(max_concurrency))

    async def aclose(self) -> None:
        """Close the backend's connections of the running loop."""
        await self.backend.aclose()

    # ------------------------------------------------------------------ sync API
    def generate(
        self, messages: Messages, *, stop: Sequence[str] | None = None, **overrides: Any
    ) -> ETAResult:
        """Answer ``messages`` safely. ``overrides`` are ``ETAConfig`` fields for this call only."""
        return run_sync(self._result(messages, stop, overrides))

    def stream(
        self,
        messages: Messages,
        *,
        stop: Sequence[str] | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> Iterator[ETAStreamChunk]:
        """Yield the answer's text as it becomes final; the last chunk carries the ``ETAResult``.

        On an image that passes the CLIP check (or a trusted text-only request) tokens stream as
        they are decoded. Otherwise the greedy answer is held back until the reward model has
        judged it; an aligned answer then streams sentence by sentence.

        ``cancel``: setting this event from another thread stops the generation at its next
        token (a server whose client went away); the stream then raises
        :class:`~eta_guard.errors.RequestCancelled`. Closing the iterator stops the work too.
        """
        return iterate_sync(self._chunks(messages, stop, overrides, cancel))

    def batch(
        self,
        batch: Sequence[Messages],
        *,
        stop: Sequence[str] | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        **overrides: Any,
    ) -> list[ETAResult]:
        """Answer several conversations concurrently, as :meth:`abatch` (same arguments)."""
        check_batch(batch)
        return run_sync(self._results(batch, stop, overrides, check_concurrency(max_concurrency)))

    # ------------------------------------------------------------------ the method
    async def _result(
        self, messages: Messages, stop: Sequence[str] | None, overrides: dict[str, Any]
    ) -> ETAResult:
        result = None
        async with aclosing(
            self._arun(messages, stop, overrides, streaming=False, cancel=None)
        ) as items:
            async for item in items:
                if isinstance(item, ETAResult):
                    result = item
        assert result is not None
        return result

    async def _results(
        self,
        batch: Sequence[Messages],
        stop: Sequence[str] | None,
        overrides: dict[str, Any],
        max_concurrency: int,
    ) -> list[ETAResult]:
        calls = [functools.partial(self._result, m, stop, overrides) for m in batch]
        return await gather_bounded(calls, max_concurrency)

    async def _chunks(
        self,
        messages: Messages,
        stop: Sequence[str] | None,
        overrides: dict[str, Any],
        cancel: threading.Event | None,
    ) -> AsyncIterator[ETAStreamChunk]:
        async with aclosing(
            self._arun(messages, stop, overrides, streaming=True, cancel=cancel)
        ) as items:
            async for item in items:
                if isinstance(item, ETAResult):
                    yield ETAStreamChunk(text="", result=item)
                elif item:
                    yield ETAStreamChunk(text=item)

    async def _arun(
        self,
        messages: Messages,
        stop: Sequence[str] | None,
        overrides: dict[str, Any],
        *,
        streaming: bool,
        cancel: threading.Event | None,
    ) -> AsyncIterator[str | ETAResult]:
        cfg = self.config.with_overrides(**overrides)
        stop_list = check_stop(stop)
        conv = await asyncio.to_thread(
            normalize_messages,
            messages,
            allow_remote_images=cfg.allow_remote_images,
            allow_local_image_files=cfg.allow_local_image_files,
            max_image_pixels=cfg.max_image_pixels,
            limits=RequestLimits.from_config(cfg),
            remote=RemoteFetchPolicy.from_config(cfg),
        )
        request = Request(
            backend=self.backend,
            evaluator=self.evaluator,
            conversation=conv,
            config=cfg,
            stop=stop_list,
            streaming=streaming,
            cancel=cancel,
            model_name=self.model_name,
        )
        try:
            async with aclosing(request.run()) as items:
                async for item in items:
                    yield item
        except ETAError:
            raise
        except Exception as e:
            # A model failing mid-request (out of memory, a broken checkpoint): callers get
            # an eta_guard error whose text is safe to show a client; the cause is chained
            # and logged for operators.
            logger.error("ETA request failed", exc_info=e)
            raise ETAError(
                f"the request failed inside the model ({type(e).__name__}; details in the log)"
            ) from e


#: The name this class had when engines had their own (kept for existing code).
BackendETA = ETA
