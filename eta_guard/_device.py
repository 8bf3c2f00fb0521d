"""Helpers shared by every ``from_pretrained``: ``device`` / ``dtype`` arguments, load errors."""

from __future__ import annotations

from typing import Any, Literal

import torch

from eta_guard.errors import InvalidInputError

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
) -> tuple[Any, Any]:
    """``model_class.from_pretrained`` + ``processor_class.from_pretrained``, placed on ``device``.

    Load failures become an :class:`InvalidInputError` naming ``what`` (see :func:`load_error`).
    A ``device_map`` in ``model_kwargs`` means accelerate places the weights: no ``.to``. A
    ``quantization_config`` without one gets ``device_map={"": device}``: quantized weights are
    placed while they load and cannot be moved with ``.to`` afterwards.
    """
    target = resolve_device(device)
    resolved = resolve_dtype(dtype)
    model_kw = dict(model_kwargs or {})
    if resolved is not None:
        model_kw.setdefault("dtype", resolved)
    if model_kw.get("quantization_config") is not None:
        model_kw.setdefault("device_map", {"": str(target)})
    common = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    try:
        model = model_class.from_pretrained(name_or_path, **common, **model_kw)
        processor = processor_class.from_pretrained(
            name_or_path, **common, **(processor_kwargs or {})
        )
    except (OSError, ValueError, KeyError) as e:
        raise load_error(what, str(name_or_path), e, trust_remote_code=trust_remote_code) from e
    if "device_map" not in model_kw:
        model = model.to(target)
    return model, processor
