"""Helpers shared by every ``from_pretrained``: ``device`` / ``dtype`` arguments, load errors."""

from __future__ import annotations

from typing import Any, Literal

import torch

from eta_guard.errors import InvalidInputError
from eta_guard.model_thread import model_thread

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Map ``None`` / ``"auto"`` to CUDA when available, else CPU; validate anything else.

    Raises:
        InvalidInputError: The device string is malformed, or names CUDA on a machine without it.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise InvalidInputError(
            f"device={device!r} is not a str or torch.device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        )
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise InvalidInputError(
            f"device={device!r} is not a valid torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(
            f"device={device!r} asks for CUDA but torch sees no CUDA device; pass device='cpu' "
            "or device='auto'"
        )
    return resolved


def resolve_dtype(dtype: Any) -> torch.dtype | Literal["auto"] | None:
    """Map a dtype argument to a ``torch.dtype``, ``"auto"`` (the checkpoint's own) or ``None``.

    Accepts ``None``, a ``torch.dtype``, or one of ``"auto"``, ``"float32"``, ``"bfloat16"``,
    ``"float16"`` (also ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"half"``, ``"torch.float16"``).

    Raises:
        InvalidInputError: Anything else.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
    raise InvalidInputError(
        f"dtype={dtype!r} is not supported; use None, 'auto', 'float32', 'bfloat16', 'float16' "
        "or a torch.dtype"
    )


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a parameterless module)."""
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (float32 if none)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def load_error(
    what: str, name: str, error: Exception, *, trust_remote_code: bool
) -> InvalidInputError:
    """Turn a checkpoint-loading failure into an :class:`InvalidInputError` that says how to fix it.

    Args:
        what: What was being loaded, e.g. ``"reward model"``.
        name: The checkpoint id or path the caller gave.
        error: The exception raised by the loader (chain it with ``raise ... from error``).
        trust_remote_code: The value the caller passed.
    """
    text = str(error)
    if "trust_remote_code" in text and not trust_remote_code:
        return InvalidInputError(
            f"cannot load the {what} {name!r}: the checkpoint ships its own modelling code; "
            "pass trust_remote_code=True (only for checkpoints you trust)"
        )
    if isinstance(error, OSError):
        hint = (
            "check the path, or that the model id is in the local Hugging Face cache "
            "(no network is used with HF_HUB_OFFLINE=1 or local_files_only=True)"
        )
    else:
        hint = "see the chained error"
    short = text if len(text) <= 300 else text[:297] + "..."
    return InvalidInputError(
        f"cannot load the {what} {name!r}: {type(error).__name__}: {short}; {hint}"
    )


#: The opt-out a caller passes (argument or ``model_kwargs`` key) to accept random new weights.
ALLOW_NEW_WEIGHTS = "allow_new_weights"
_MAX_KEYS_SHOWN = 8


def _opt_out(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(
            f"{ALLOW_NEW_WEIGHTS}={value!r} must be True or False (True accepts checkpoints "
            "that load with newly initialised, random weights)"
        )
    return value


def check_no_new_weights(what: str, name: str, info: dict[str, Any]) -> None:
    """Refuse a model that ``from_pretrained`` completed with newly initialised weights.

    Args:
        what: What was loaded, e.g. ``"reward model"``.
        name: The checkpoint id or path.
        info: transformers' loading info (``output_loading_info=True``).

    Raises:
        InvalidInputError: ``missing_keys`` or ``mismatched_keys`` is not empty.
    """
    missing = sorted(str(k) for k in info.get("missing_keys") or ())
    mismatched = sorted(
        str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or ()
    )
    new = missing + [k for k in mismatched if k not in missing]
    if not new:
        return
    shown = ", ".join(new[:_MAX_KEYS_SHOWN]) + (
        f", ... ({len(new)} in all)" if len(new) > _MAX_KEYS_SHOWN else ""
    )
    raise InvalidInputError(
        f"the {what} {name!r} loaded with newly initialised (random) weights: {shown}; the "
        "checkpoint does not match the model class it was loaded as (e.g. a custom "
        "architecture loaded as a generic one), so its outputs would be random. Use a checkpoint "
        "whose architecture eta-guard supports, or, only if you mean it, pass "
        f"{ALLOW_NEW_WEIGHTS}=True (e.g. in model_kwargs / reward_model_kwargs)"
    )


def load_pretrained(
    what: str,
    name_or_path: str,
    model_class: Any,
    processor_class: Any,
    *,
    device: str | torch.device | None = None,
    dtype: Any = None,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    processor_kwargs: dict[str, Any] | None = None,
    allow_new_weights: bool = False,
) -> tuple[Any, Any]:
    """``model_class.from_pretrained`` + ``processor_class.from_pretrained``, placed on ``device``.

    Load failures become an :class:`InvalidInputError` naming ``what`` (see :func:`load_error`).
    A ``device_map`` in ``model_kwargs`` means accelerate places the weights: no ``.to``. A
    ``quantization_config`` without one gets ``device_map={"": device}``: quantized weights are
    placed while they load and cannot be moved with ``.to`` afterwards.

    A checkpoint that lacks weights the model class needs (transformers would initialise them
    at random, e.g. a classification head under another architecture's layout) is refused,
    unless ``allow_new_weights=True`` is passed here or as ``model_kwargs["allow_new_weights"]``.

    Raises:
        InvalidInputError: The checkpoint cannot be loaded, or it loaded with new weights.
    """
    target = resolve_device(device)
    resolved = resolve_dtype(dtype)
    # Loading is usually the process's first torch work: it runs on the model thread so that
    # thread owns torch's OpenMP pool (see eta_guard.model_thread).
    return model_thread(target).call(
        _load,
        what,
        name_or_path,
        model_class,
        processor_class,
        target=target,
        resolved=resolved,
        local_files_only=local_files_only,
        trust_remote_code=trust_remote_code,
        model_kwargs=model_kwargs,
        processor_kwargs=processor_kwargs,
        allow_new_weights=allow_new_weights,
    )


def _load(
    what: str,
    name_or_path: str,
    model_class: Any,
    processor_class: Any,
    *,
    target: torch.device,
    resolved: Any,
    local_files_only: bool,
    trust_remote_code: bool,
    model_kwargs: dict[str, Any] | None,
    processor_kwargs: dict[str, Any] | None,
    allow_new_weights: bool,
) -> tuple[Any, Any]:
    model_kw = dict(model_kwargs or {})
    allow_new_weights = _opt_out(model_kw.pop(ALLOW_NEW_WEIGHTS, False)) or _opt_out(
        allow_new_weights
    )
    if resolved is not None:
        model_kw.setdefault("dtype", resolved)
    model_kw.pop("output_loading_info", None)  # always asked for: the check below needs it
    if model_kw.get("quantization_config") is not None:
        model_kw.setdefault("device_map", {"": str(target)})
    common = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    try:
        model, info = model_class.from_pretrained(
            name_or_path, **common, **model_kw, output_loading_info=True
        )
        processor = processor_class.from_pretrained(
            name_or_path, **common, **(processor_kwargs or {})
        )
    except (OSError, ValueError, KeyError) as e:
        raise load_error(what, str(name_or_path), e, trust_remote_code=trust_remote_code) from e
    if not allow_new_weights:
        check_no_new_weights(what, str(name_or_path), info)
    if "device_map" not in model_kw:
        model = model.to(target)
    return model, processor
