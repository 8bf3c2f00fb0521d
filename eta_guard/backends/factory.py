"""Building a :class:`BackendETA` over an OpenAI-compatible engine, each evaluator local or remote."""

from __future__ import annotations

from typing import Any

from eta_guard.backends._http import HTTPSettings
from eta_guard.config import ETAConfig
from eta_guard.errors import InvalidInputError
from eta_guard.prompting import ImageMean


def eta_from_openai_compatible(
    base_url: str,
    model: str,
    clip: str | None,
    reward_model: str | None,
    *,
    api_key: str | None = None,
    config: ETAConfig | None = None,
    tokenizer: Any = None,
    image_mean: Any = None,
    preset: Any = None,
    reward_model_tokenizer: Any = None,
    clip_url: str | None = None,
    reward_model_url: str | None = None,
    http: HTTPSettings | None = None,
    send_image_uuids: bool = True,
    device: str | None = None,
    dtype: Any = None,
    clip_backend: str = "transformers",
    clip_pretrained: str | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool = False,
    clip_kwargs: dict[str, Any] | None = None,
    reward_model_kwargs: dict[str, Any] | None = None,
) -> Any:
    """See :meth:`eta_guard.pipeline.ETA.from_openai_compatible`."""
    from eta_guard.backends.eta_backend import BackendETA
    from eta_guard.backends.openai_compatible import OpenAICompatibleBackend
    from eta_guard.backends.remote_evaluators import RemoteCLIP, RemoteRewardModel
    from eta_guard.evaluators.eta_evaluator import ETAEvaluator

    if preset is not None:
        from eta_guard.presets import get_preset

        preset = get_preset(preset)
        config = preset.apply_to_config(config)
    config = config or ETAConfig()
    if clip is None and reward_model is None:
        raise InvalidInputError("clip=None and reward_model=None: ETA needs at least one evaluator")
    if clip_url is not None and clip is None:
        raise InvalidInputError("clip_url was given with clip=None: name CLIP's served model")
    if reward_model_url is not None and reward_model is None:
        raise InvalidInputError(
            "reward_model_url was given with reward_model=None: name the RM's served model"
        )
    generator = OpenAICompatibleBackend(
        base_url,
        model,
        api_key=api_key,
        tokenizer=tokenizer,
        http=http,
        image_mean=image_mean,
        send_image_uuids=send_image_uuids,
    )
    if generator.processor is None and preset is not None and preset.vlm_image_mean:
        # The served model's processor config is not at hand: the preset's model's mean.
        generator.processor = ImageMean.of(preset.vlm_image_mean)
    local_clip = clip if clip_url is None else None
    local_rm = reward_model if reward_model_url is None else None
    pre: Any = None
    post: Any = None
    if local_clip is not None or local_rm is not None:
        local = ETAEvaluator.from_pretrained(
            clip=local_clip,
            reward_model=local_rm,
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
        )
        pre, post = local.pre, local.post
    if clip_url is not None and clip is not None:
        pre = RemoteCLIP(clip_url, clip, prompt=config.safety_prompt, api_key=api_key, http=http)
    if reward_model_url is not None and reward_model is not None:
        post = RemoteRewardModel(
            reward_model_url,
            reward_model,
            api_key=api_key,
            http=http,
            tokenizer=reward_model_tokenizer,
        )
    # The evaluator's lock guards local models' per-call state; HTTP calls need none, and
    # holding it would queue every request's RM calls behind one another.
    remote_only = (pre is None or clip_url is not None) and (
        post is None or reward_model_url is not None
    )
    lock: Any = _NoLock() if remote_only else None
    return BackendETA(generator, ETAEvaluator(pre, post, config, lock=lock), config)


class _NoLock:
    """A context manager that locks nothing (for evaluators that are all remote)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
