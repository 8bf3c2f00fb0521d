"""Architecture-faithful tiny replicas of the checkpoints ETA is used with.

Unlike :mod:`eta_guard.testing` (generic tiny models sharing one toy vocabulary), each replica has
the real checkpoint's model class, tokenizer kind and special tokens, chat template, and processor
and image-processor settings (resize, crop, normalisation, image token counts); only widths,
depths and vocabulary sizes are scaled down. They load through the same ``from_pretrained`` path,
so tests on them exercise what a real checkpoint would go through: e.g. LLaVA-1.5's SentencePiece
tokenizer, where ``As an AI assistant`` must be ``▁As ▁an ▁AI ▁assistant`` after ``ASSISTANT:``.

The weights are RANDOM: replicas prove mechanics and fidelity of the prompt and the search, never
safety. Where each setting comes from is recorded in ``docs/replicas.md``.

Example:
    >>> from eta_guard.replicas import build_replica_checkpoints
    >>> paths = build_replica_checkpoints("/tmp/eta-replicas")  # doctest: +SKIP
    >>> paths.vlm, paths.clip, paths.reward_model  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from eta_guard.errors import InvalidInputError

__all__ = [
    "REPLICA_FAMILIES",
    "REPLICA_OF",
    "ReplicaCheckpoints",
    "build_replica_checkpoints",
]

ReplicaFamily = Literal["llava", "qwen2_vl", "smolvlm"]
REPLICA_FAMILIES: tuple[str, ...] = ("llava", "qwen2_vl", "smolvlm")

#: The Hub id each replica stands for.
REPLICA_OF: dict[str, str] = {
    "llava": "llava-hf/llava-1.5-7b-hf",
    "qwen2_vl": "Qwen/Qwen2-VL-2B-Instruct",
    "smolvlm": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "clip": "openai/clip-vit-large-patch14-336",
    "reward_model": "RLHFlow/ArmoRM-Llama3-8B-v0.1",
}

# Part of every folder name: a recipe change builds new folders instead of reusing stale ones.
_RECIPE = 2


@dataclass(frozen=True)
class ReplicaCheckpoints:
    """Paths of one set of replicas built by :func:`build_replica_checkpoints`.

    Attributes:
        vlm: replica of ``REPLICA_OF[vlm_family]`` (``AutoModelForImageTextToText``).
        clip: replica of ``openai/clip-vit-large-patch14-336`` (``CLIPModel``).
        reward_model: the ArmoRM replica when available (``eta_guard.replicas.armorm``), else the
            generic tiny Llama-3-template reward model of :mod:`eta_guard.testing`.
        vlm_family: ``"llava"``, ``"qwen2_vl"`` or ``"smolvlm"``.
        reward_model_is_armorm: whether ``reward_model`` is the ArmoRM replica.
    """

    vlm: str
    clip: str
    reward_model: str
    vlm_family: str
    reward_model_is_armorm: bool


def build_replica_checkpoints(
    directory: str | os.PathLike[str], *, vlm_family: ReplicaFamily = "llava", seed: int = 0
) -> ReplicaCheckpoints:
    """Build (or reuse) a VLM, CLIP and reward-model replica under ``directory``. Offline.

    A folder that is complete (its marker file matches the seed) is reused as is.

    Args:
        directory: where to write the checkpoint folders (created if missing).
        vlm_family: which VLM to replicate (see :data:`REPLICA_OF`).
        seed: seeds the random weights.

    Raises:
        InvalidInputError: unknown ``vlm_family`` or a negative ``seed``.
    """
    from eta_guard.testing import build_reward_checkpoint, ensure_checkpoint

    if vlm_family not in REPLICA_FAMILIES:
        raise InvalidInputError(
            f"vlm_family must be one of {', '.join(map(repr, REPLICA_FAMILIES))}; "
            f"got {vlm_family!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative int; got {seed!r}.")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tag = f"-r{_RECIPE}" + ("" if seed == 0 else f"-seed{seed}")
    vlm = ensure_checkpoint(
        root / f"replica-{vlm_family}{tag}", seed, _vlm_builder(vlm_family, seed)
    )
    from eta_guard.replicas.clip import build_clip_replica

    clip = ensure_checkpoint(
        root / f"replica-clip{tag}", seed, lambda p: build_clip_replica(p, seed=seed)
    )
    armorm = _armorm_builder()
    if armorm is not None:
        reward = ensure_checkpoint(
            root / f"replica-armorm{tag}", seed, lambda p: armorm(p, seed=seed)
        )
    else:
        reward = ensure_checkpoint(
            root / f"replica-reward-tiny{tag}",
            seed,
            lambda p: build_reward_checkpoint(p, "tiny", seed),
        )
    return ReplicaCheckpoints(
        vlm=str(vlm),
        clip=str(clip),
        reward_model=str(reward),
        vlm_family=vlm_family,
        reward_model_is_armorm=armorm is not None,
    )


def _vlm_builder(family: str, seed: int) -> Callable[[Path], None]:
    if family == "llava":
        from eta_guard.replicas.llava import build_llava_replica as build
    elif family == "qwen2_vl":
        from eta_guard.replicas.qwen2_vl import build_qwen2_vl_replica as build
    else:
        from eta_guard.replicas.smolvlm import build_smolvlm_replica as build
    return lambda path: build(path, seed=seed)


def _armorm_builder() -> Callable[..., None] | None:
    """``build_armorm_replica(path, *, seed)`` once the ArmoRM replica module exists.

    Only a missing module falls back to the generic reward model: a module that exists but fails
    to import raises, so a broken replica is never silently replaced.
    """
    import importlib
    import importlib.util

    if importlib.util.find_spec("eta_guard.replicas.armorm") is None:
        return None
    module = importlib.import_module("eta_guard.replicas.armorm")
    build: Callable[..., None] = module.build_armorm_replica
    return build
