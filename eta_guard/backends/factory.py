"""The parts of an ETA over an OpenAI-compatible engine: the generator and the evaluators, each local or remote."""

from __future__ import annotations

from typing import Any

from eta_guard.backends._http import HTTPSettings
from eta_guard.config import ETAConfig
from eta_guard.errors import InvalidInputError
from eta_guard.prompting import ImageMean


def openai_compatible_parts(
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
    http: HTTPSettings | None = None,
    send_image_uuids: bool = True,
    continue_from_ids: bool | None = None,
    **evaluator_kwargs: Any,
) -> tuple[Any, Any]:
    """``(generator, evaluator)`` for :meth:`eta_guard.pipeline.ETA.from_openai_compatible`.

    ``evaluator_kwargs`` feed :func:`build_evaluator`; remote evaluators use ``api_key`` unless
    ``clip_api_key`` / ``reward_model_api_key`` name their own engines' keys.
    """
    from eta_guard.backends.openai_compatible import OpenAICompatibleBackend

    if preset is not None:
        from eta_guard.presets import get_preset

        preset = get_preset(preset)
        config = preset.apply_to_config(config)
        evaluator_kwargs["preset"] = preset
    config = config or ETAConfig()
    if clip is None and reward_model is None:
        raise InvalidInputError("clip=None and reward_model=None: ETA needs at least one evaluator")
    evaluator_kwargs.setdefault("clip_api_key", api_key)
    evaluator_kwargs.setdefault("reward_model_api_key", api_key)
    evaluator = build_evaluator(clip, reward_model, config=config, http=http, **evaluator_kwargs)
    generator = OpenAICompatibleBackend(
        base_url,
        model,
        api_key=api_key,
        tokenizer=tokenizer,
        http=http,
        image_mean=image_mean,
        send_image_uuids=send_image_uuids,
        continue_from_ids=continue_from_ids,
    )
    if generator.processor is None and preset is not None and preset.vlm_image_mean:
        # The served model's processor config is not at hand: the preset's model's mean.
        generator.processor = ImageMean.of(preset.vlm_image_mean)
    return generator, evaluator


def build_evaluator(
    clip: str | None,
    reward_model: str | None,
    *,
    config: ETAConfig | None = None,
    clip_url: str | None = None,
    reward_model_url: str | None = None,
    clip_api_key: str | None = None,
    reward_model_api_key: str | None = None,
    reward_model_tokenizer: Any = None,
    http: HTTPSettings | None = None,
    device: str | None = None,
    dtype: Any = None,
    clip_backend: str = "transformers",
    clip_pretrained: str | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool = False,
    clip_kwargs: dict[str, Any] | None = None,
    reward_model_kwargs: dict[str, Any] | None = None,
    preset: Any = None,
    gates: Any = None,
    judges: Any = None,
) -> Any:
    """An ``ETAEvaluator`` whose CLIP and RM each load locally or, given ``clip_url`` /
    ``reward_model_url``, are served by an engine under the names ``clip`` / ``reward_model``.
    ``None`` leaves a side out (at least one is needed). ``gates`` / ``judges``: evaluator specs
    or objects (``None``: the preset's)."""
    from eta_guard.backends.remote_evaluators import RemoteCLIP, RemoteRewardModel
    from eta_guard.backends.remote_guard import RemoteLlamaGuard
    from eta_guard.evaluators.eta_evaluator import ETAEvaluator

    config = config or ETAConfig()
    if clip is None and reward_model is None and not (gates or judges):
        raise InvalidInputError("clip=None and reward_model=None: nothing to evaluate with")
    if clip_url is not None and clip is None:
        raise InvalidInputError("clip_url was given with clip=None: name CLIP's served model")
    if reward_model_url is not None and reward_model is None:
        raise InvalidInputError(
            "reward_model_url was given with reward_model=None: name the RM's served model"
        )
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
            gates=(),
            judges=(),
        )
        pre, post = local.pre, local.post
    if clip_url is not None and clip is not None:
        pre = RemoteCLIP(
            clip_url, clip, prompt=config.safety_prompt, api_key=clip_api_key, http=http
        )
    if reward_model_url is not None and reward_model is not None:
        post = RemoteRewardModel(
            reward_model_url,
            reward_model,
            api_key=reward_model_api_key,
            http=http,
            tokenizer=reward_model_tokenizer,
        )
    if preset is not None:
        from eta_guard.presets import get_preset

        chosen = get_preset(preset)
        gates = chosen.gates if gates is None else gates
        judges = chosen.judges if judges is None else judges
    from eta_guard.evaluators.specs import build_guards

    guards = build_guards(
        gates or (),
        judges or (),
        clip=pre,
        device=device,
        dtype=dtype,
        local_files_only=local_files_only,
        http=http,
    )
    # The evaluator's lock guards local models' per-call state; HTTP calls need none, and
    # holding it would queue every request's RM calls behind one another.
    remote_only = (pre is None or clip_url is not None) and (
        post is None or reward_model_url is not None
    )
    remote_only = remote_only and all(
        isinstance(g, RemoteLlamaGuard) for g in [*guards[0], *guards[1]]
    )
    lock: Any = _NoLock() if remote_only else None
    return ETAEvaluator(pre, post, config, lock=lock, gates=guards[0], judges=guards[1])


class _NoLock:
    """A context manager that locks nothing (for evaluators that are all remote)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
