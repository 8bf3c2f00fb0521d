"""Where and how each of the three models is loaded: device, dtype, autocast, loader kwargs.

``ETA.from_pretrained``, ``ETAEvaluator.from_pretrained`` and :func:`eta_guard.memory.estimate_memory`
take a shared ``device`` / ``dtype`` and, per model, a kwargs dict (``vlm_kwargs``,
``clip_kwargs``, ``reward_model_kwargs``) that feeds that model's loader, as
sentence-transformers' ``model_kwargs`` does. Inside it, ``"device"`` and ``"dtype"`` override
the shared values for that model only, and ``model_kwargs={"quantization_config": ...,
"device_map": ...}`` goes straight to ``from_pretrained``. The VLM also takes
``"autocast_dtype"``: its forward runs under ``torch.autocast`` with that dtype (the reference
runs LLaVA under bf16 autocast).

Precedence, highest first: the per-model ``device``/``dtype``; the shared ``device``/``dtype``;
the preset's per-model dtype; transformers' default.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from eta_guard.errors import InvalidInputError

ROLES = ("vlm", "clip", "reward_model")
_PLACEMENT_KEYS = ("device", "dtype", "autocast_dtype")


@dataclass(frozen=True)
class Placement:
    """How one model is loaded.

    Attributes:
        device: Target device (``None``: CUDA if available, else CPU).
        dtype: Load dtype (``None``: transformers' default, float32).
        autocast_dtype: VLM only: run its forward under ``torch.autocast`` with this dtype.
        kwargs: The rest of the per-model kwargs, for its loader (``model_kwargs``, ...).
    """

    device: Any = None
    dtype: Any = None
    autocast_dtype: Any = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def resolve_placements(
    *,
    device: Any = None,
    dtype: Any = None,
    vlm_kwargs: Mapping[str, Any] | None = None,
    clip_kwargs: Mapping[str, Any] | None = None,
    reward_model_kwargs: Mapping[str, Any] | None = None,
    preset: Any = None,
) -> dict[str, Placement]:
    """One :class:`Placement` per role (``"vlm"``, ``"clip"``, ``"reward_model"``).

    Raises:
        InvalidInputError: A ``*_kwargs`` is not a mapping, ``autocast_dtype`` is given for CLIP
            or the RM, or a ``device``/``dtype`` value is not valid.
    """
    from eta_guard.presets import get_preset

    chosen = get_preset(preset) if preset is not None else None
    given = {"vlm": vlm_kwargs, "clip": clip_kwargs, "reward_model": reward_model_kwargs}
    out = {}
    for role in ROLES:
        raw = given[role]
        if raw is not None and not isinstance(raw, Mapping):
            raise InvalidInputError(
                f"{role}_kwargs must be a dict of loader arguments, got {type(raw).__name__}"
            )
        kwargs = dict(raw or {})
        if "autocast_dtype" in kwargs and role != "vlm":
            raise InvalidInputError(
                f"{role}_kwargs['autocast_dtype'] is a VLM setting; drop it (CLIP and the reward "
                "model run in their load dtype)"
            )
        model_device = kwargs.pop("device", device)
        preset_dtype = None
        if chosen is not None:
            preset_dtype = chosen.dtypes.get(role)
            if role in chosen.cpu_dtypes and _on_cpu(model_device, kwargs):
                preset_dtype = chosen.cpu_dtypes[role]
        model_dtype = kwargs.pop("dtype", dtype if dtype is not None else preset_dtype)
        autocast = kwargs.pop("autocast_dtype", chosen.vlm_autocast_dtype if chosen else None)
        placement = Placement(
            device=model_device,
            dtype=model_dtype,
            autocast_dtype=autocast if role == "vlm" else None,
            kwargs=kwargs,
        )
        _validate(role, placement)
        out[role] = placement
    return out


def _on_cpu(device: Any, kwargs: Mapping[str, Any]) -> bool:
    """Whether a model with this device (and no ``device_map``) lands on the CPU."""
    if (kwargs.get("model_kwargs") or {}).get("device_map") is not None:
        return False
    import torch

    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return not torch.cuda.is_available()
    try:  # no availability check: an estimate for a GPU machine may run on a laptop
        return torch.device(device).type == "cpu"
    except (RuntimeError, ValueError, TypeError) as e:
        raise InvalidInputError(
            f"device={device!r} is not a valid torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from e


def _validate(role: str, placement: Placement) -> None:
    """Check dtypes now (cheap, no torch device query) so a typo fails before any loading."""
    from eta_guard._device import resolve_dtype

    for name in ("dtype", "autocast_dtype"):
        value = getattr(placement, name)
        if value is None:
            continue
        try:
            resolved = resolve_dtype(value)
        except InvalidInputError as e:
            raise InvalidInputError(f"{role} {name}: {e}") from e
        if name == "autocast_dtype" and resolved == "auto":
            raise InvalidInputError(
                f"vlm autocast_dtype={value!r}: give a dtype ('bfloat16', 'float16') or None"
            )


def enable_autocast(model: Any, dtype: Any) -> Any:
    """Make ``model``'s forward run under ``torch.autocast(device_type, dtype)``.

    Wrapping the instance's ``forward`` (rather than a ``with`` block around calls) covers every
    caller, including ``generate`` and the best-of-N search's worker thread (autocast state is
    per thread). Returns the model.
    """
    import torch

    from eta_guard._device import module_device, resolve_dtype

    resolved = resolve_dtype(dtype)
    if not isinstance(resolved, torch.dtype):
        raise InvalidInputError(f"autocast_dtype={dtype!r}: give 'bfloat16' or 'float16'")
    device_type = module_device(model).type
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device_type, dtype=resolved):
            return forward(*args, **kwargs)

    model.forward = autocast_forward
    model._eta_autocast_dtype = resolved  # lets tests and reports see it
    return model
