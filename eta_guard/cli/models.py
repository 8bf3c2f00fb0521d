"""The one loader of models from options: every command's ETA or ETAEvaluator is built here.

A local VLM loads with ``ETA.from_pretrained``; a VLM on an engine (``--generator-url``) with
``ETA.from_openai_compatible``; evaluators alone (``evaluate``, ``calibrate``, ``serve
--moderation-only``) with :func:`eta_guard.backends.factory.build_evaluator`. CLIP and the RM
each load locally or, with ``--clip-url`` / ``--reward-model-url``, are called on an engine
under the names ``--clip`` / ``--reward-model``. Bearer keys come from environment variables,
never from the command line (``ps`` shows that). Options that cannot apply to a model served
elsewhere are refused, never ignored.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

from eta_guard.cli.console import RANDOM_MODELS_LINE, quiet_transformers, status
from eta_guard.cli.options import ModelOptions
from eta_guard.errors import ETAError, InvalidInputError

if TYPE_CHECKING:
    from rich.console import Console

    from eta_guard.config import ETAConfig

#: Environment variables holding the bearer keys of the engines behind the ``--*-url`` options.
GENERATOR_API_KEY_ENV = "ETA_GUARD_GENERATOR_API_KEY"
CLIP_API_KEY_ENV = "ETA_GUARD_CLIP_API_KEY"
REWARD_MODEL_API_KEY_ENV = "ETA_GUARD_REWARD_MODEL_API_KEY"

ROLES = ("vlm", "clip", "reward_model")


def placement(models: ModelOptions, roles: tuple[str, ...] = ROLES) -> dict[str, Any]:
    """``--vlm-device cuda:1 --clip-dtype float16`` -> ``{"vlm_kwargs": {"device": ...}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    for role in roles:
        for setting in ("device", "dtype"):
            value = getattr(models, f"{role}_{setting}")
            if value is not None:
                out.setdefault(f"{role}_kwargs", {})[setting] = value
    return out


def engine(models: ModelOptions) -> tuple[str, str] | None:
    """``(url, served model)`` for ``--generator-url`` / ``--generator-model``, or None."""
    url, model = models.generator_url, models.generator_model
    if url is None and model is None:
        return None
    if url is None or not model:
        raise InvalidInputError(
            "--generator-url and --generator-model go together: the engine's URL and the name "
            "it serves the VLM under"
        )
    return url, model


def model_paths(err: Console, models: ModelOptions, *, need_vlm: bool) -> dict[str, str | None]:
    """Checkpoint (or served) names: the random tiny ones with ``--tiny``, else the given or
    default ones."""
    from eta_guard.config import DEFAULT_CLIP, DEFAULT_REWARD_MODEL

    if models.tiny:
        given = [
            f"--{name.replace('_', '-')}" for name in ROLES if getattr(models, name) is not None
        ]
        if given:
            raise InvalidInputError(f"--tiny builds its own models; drop {', '.join(given)}")
        from eta_guard.bench import default_cache_dir
        from eta_guard.testing import build_tiny_checkpoints

        quiet_transformers()
        with status(err, "building random tiny checkpoints (first run only)"):
            ckpt = build_tiny_checkpoints(models.cache_dir or default_cache_dir(), size="tiny")
        return {"vlm": ckpt.vlm, "clip": ckpt.clip, "reward_model": ckpt.reward_model}
    if need_vlm and not models.vlm:
        raise InvalidInputError(
            "pass --vlm CHECKPOINT (a Hub id in the local cache or a folder), or --tiny"
        )
    return {
        "vlm": models.vlm,
        "clip": models.clip or DEFAULT_CLIP,
        "reward_model": models.reward_model or DEFAULT_REWARD_MODEL,
    }


def note_random(err: Console, models: ModelOptions) -> None:
    if models.tiny:
        err.print(f"[yellow]{RANDOM_MODELS_LINE}[/]")


def check_options(models: ModelOptions, *, vlm: Literal["none", "local", "engine"]) -> None:
    """Refuse options that cannot apply: placement of a model served elsewhere, a local VLM with
    remote evaluators (not built yet), a preset that pads images with an engine, a missing
    tokenizer."""
    refused = []
    for role, url in (("clip", models.clip_url), ("reward_model", models.reward_model_url)):
        if url is not None:
            flag = role.replace("_", "-")
            refused += [
                f"--{flag}-{s}" for s in ("device", "dtype") if getattr(models, f"{role}_{s}")
            ]
    if vlm == "engine":
        refused += [f"--vlm-{s}" for s in ("device", "dtype") if getattr(models, f"vlm_{s}")]
    if refused:
        raise InvalidInputError(
            f"{', '.join(refused)}: that model runs on an engine, so options for a local model "
            "cannot apply; configure the engine, or drop its --*-url option"
        )
    remote_evaluators = models.clip_url is not None or models.reward_model_url is not None
    if remote_evaluators and vlm == "local":
        raise InvalidInputError(
            "--clip-url / --reward-model-url with a local VLM are not supported yet: serve the "
            "VLM on an engine too (--generator-url), or load CLIP and the RM locally"
        )
    if vlm == "engine" and models.preset is not None and _pads_images(models.preset):
        raise InvalidInputError(
            "--preset with --generator-url is not supported yet: the paper preset pads images "
            "to a square with the VLM processor's mean colour, which the engine path cannot do "
            "client-side yet; drop --preset (its other parts: --set system_prompt=... "
            "--set seed=1 --clip-dtype float32 --reward-model-dtype bfloat16)"
        )


def _pads_images(preset: str) -> bool:
    """Whether ``preset`` pads images to a square (what the engine path cannot do client-side)."""
    from eta_guard.presets import get_preset

    return bool(get_preset(preset).config.get("pad_images_to_square"))


def evaluator_args(models: ModelOptions, paths: dict[str, str | None]) -> dict[str, Any]:
    """``build_evaluator`` / ``from_openai_compatible`` arguments for CLIP and the RM."""
    args: dict[str, Any] = {
        "device": models.device,
        "dtype": models.dtype,
        "trust_remote_code": models.trust_remote_code,
        **placement(models, ("clip", "reward_model")),
    }
    if models.clip_url is not None:
        args["clip_url"] = models.clip_url
        args["clip_api_key"] = os.environ.get(CLIP_API_KEY_ENV) or None
    if models.reward_model_url is not None:
        args["reward_model_url"] = models.reward_model_url
        args["reward_model_api_key"] = os.environ.get(REWARD_MODEL_API_KEY_ENV) or None
        # The served RM's tokenizer breaks forged chat markers in answers (untrusted text).
        args["reward_model_tokenizer"] = paths["reward_model"]
    return args


class ModelLoader:
    """What the options describe, checked and resolved now; the weights load in :meth:`eta` or
    :meth:`evaluator` (``serve`` calls those in the background)."""

    def __init__(
        self, err: Console, models: ModelOptions, cfg: ETAConfig, *, vlm: bool = True
    ) -> None:
        self.err, self.models, self.cfg = err, models, with_rule_options(cfg, models)
        if models.threads is not None:
            set_torch_threads(models.threads)
        self.guards = guard_args(models)  # parsed now: a bad spec is refused before any load
        self.generator = engine(models) if vlm else None
        where: Literal["none", "local", "engine"] = "none"
        if vlm:
            where = "local" if self.generator is None else "engine"
        check_options(models, vlm=where)
        self.paths = model_paths(err, models, need_vlm=where == "local")
        if where == "engine" and self.paths["vlm"] is None:
            # Without the served model's tokenizer, control markers in message text (e.g.
            # "<|im_end|>") would reach the engine as control tokens: refuse rather than serve.
            raise InvalidInputError(
                "--generator-url needs --vlm: the served model's id or local path, whose "
                "tokenizer keeps chat-template markers in message text from acting as control "
                "tokens and ends sentences on the same token as a local run"
            )

    def estimate(self) -> str | None:
        """Print the memory the local models will take, before any loads; return why it
        could not be made."""
        return print_estimate(
            self.err,
            local_paths(self.paths, self.models),
            local_load_args(self.models),
            self.cfg,
            guards=[*self.guards.get("gates", ()), *self.guards.get("judges", ())],
        )

    def evaluator(self, *, clip: bool = True, reward_model: bool = True) -> Any:
        """An ``ETAEvaluator`` with CLIP and/or the RM, each local or on an engine."""
        from eta_guard.backends.factory import build_evaluator

        quiet_transformers()
        return build_evaluator(
            self.paths["clip"] if clip else None,
            self.paths["reward_model"] if reward_model else None,
            config=self.cfg,
            preset=self.models.preset,
            **evaluator_args(self.models, self.paths),
            **self.guards,
        )

    def eta(self) -> Any:
        """The ``ETA``: the VLM local (``from_pretrained``) or on the engine."""
        from eta_guard.pipeline import ETA

        quiet_transformers()
        if self.generator is not None:
            return ETA.from_openai_compatible(
                self.generator[0],
                self.generator[1],
                clip=self.paths["clip"],
                reward_model=self.paths["reward_model"],
                api_key=os.environ.get(GENERATOR_API_KEY_ENV) or None,
                config=self.cfg,
                tokenizer=self.paths["vlm"],
                **evaluator_args(self.models, self.paths),
                **self.guards,
                **({"preset": self.models.preset} if self.models.preset else {}),
            )
        assert self.paths["vlm"] is not None  # model_paths refused a missing --vlm
        return ETA.from_pretrained(
            self.paths["vlm"],
            clip=self.paths["clip"],
            reward_model=self.paths["reward_model"],
            config=self.cfg,
            **local_load_args(self.models),
            **self.guards,
        )


def set_torch_threads(n: int) -> None:
    """``--threads``: torch's CPU threads, here and on the CPU model thread.

    torch applies its thread count to a thread once, at that thread's first parallel region:
    the model thread, which runs every CPU forward (:mod:`eta_guard.model_thread`), must be
    told itself in case it already ran one.
    """
    import torch

    from eta_guard.model_thread import model_thread

    torch.set_num_threads(n)
    model_thread("cpu").call(torch.set_num_threads, n)


def guard_args(models: ModelOptions) -> dict[str, Any]:
    """``gates=`` / ``judges=`` from ``--gate`` / ``--post-judge`` (specs parsed now, so a bad one
    is refused before any weight loads); nothing when neither is given (a preset's then apply)."""
    from eta_guard.evaluators.specs import parse_spec

    out: dict[str, Any] = {}
    for key, role, given in (
        ("gates", "gate", models.gate),
        ("judges", "judge", models.post_judge),
    ):
        if given:
            out[key] = [parse_spec(spec, role=role) for spec in given]  # type: ignore[arg-type]
    return out


def with_rule_options(cfg: ETAConfig, models: ModelOptions) -> ETAConfig:
    """``cfg`` with ``--decision-rule`` / ``--text-only-policy`` applied (validated by ETAConfig)."""
    overrides = {
        key: getattr(models, key)
        for key in ("decision_rule", "text_only_policy")
        if getattr(models, key) is not None
    }
    return cfg.with_overrides(**overrides) if overrides else cfg


def load_evaluator(
    err: Console,
    models: ModelOptions,
    cfg: ETAConfig,
    *,
    clip: bool = True,
    reward_model: bool = True,
) -> Any:
    """An ``ETAEvaluator`` loaded now (``evaluate``, ``calibrate``)."""
    loader = ModelLoader(err, models, cfg, vlm=False)
    note_random(err, models)
    with status(err, "loading evaluators"):
        return loader.evaluator(clip=clip, reward_model=reward_model)


def load_eta(err: Console, models: ModelOptions, cfg: ETAConfig, *, note: bool = True) -> Any:
    """The ``ETA`` loaded now, its memory estimate printed first (``generate``, ``eval``...)."""
    loader = ModelLoader(err, models, cfg)
    if note:
        note_random(err, models)
    missing = loader.estimate()
    with status(err, "loading the models"):
        eta = loader.eta()
    if missing:  # said after loading: a checkpoint that cannot load reports its own error first
        err.print(f"[dim]memory estimate unavailable: {missing}[/]", highlight=False)
    return eta


def local_load_args(models: ModelOptions) -> dict[str, Any]:
    return {
        "device": models.device,
        "dtype": models.dtype,
        "preset": models.preset,
        "trust_remote_code": models.trust_remote_code,
        **placement(models),
    }


def local_paths(paths: dict[str, str | None], models: ModelOptions) -> dict[str, str | None]:
    """``paths`` without the models served elsewhere (nothing of theirs loads here)."""
    served = {
        "vlm": models.generator_url,
        "clip": models.clip_url,
        "reward_model": models.reward_model_url,
    }
    return {role: None if served[role] else name for role, name in paths.items()}


def print_estimate(
    err: Console,
    paths: dict[str, str | None],
    load_args: dict[str, Any],
    cfg: ETAConfig,
    *,
    guards: Any = (),
) -> str | None:
    """Print the memory estimate on stderr before any weight loads; return why it could not be
    made (it never blocks loading)."""
    from eta_guard.cli.tables import estimate_table
    from eta_guard.memory import estimate_memory

    try:
        estimate = estimate_memory(
            paths["vlm"],
            paths["clip"],
            paths["reward_model"],
            num_candidates=cfg.num_candidates,
            guards=guards,
            **load_args,
        )
    except ETAError as e:
        return str(e)
    err.print(estimate_table(estimate))
    return None
