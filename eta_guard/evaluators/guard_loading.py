"""Loading a guard checkpoint: the one block every local guard's ``from_pretrained`` shares.

Guards never run checkpoint code (``trust_remote_code=False``), and a checkpoint that loads with
newly initialised weights is refused (:func:`eta_guard._device.load_pretrained`).
"""

from __future__ import annotations

from typing import Any


def load_guard(
    cls: Any,
    name_or_path: str,
    model_class: Any,
    processor_class: Any,
    *,
    device: Any = None,
    dtype: Any = None,
    local_files_only: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    processor_kwargs: dict[str, Any] | None = None,
    allow_new_weights: bool = False,
    default_name: str,
    **kwargs: Any,
) -> Any:
    """``cls(model, processor, **kwargs)`` over ``model_class`` / ``processor_class`` loaded from
    ``name_or_path``; ``kwargs["name"]`` defaults to ``default_name``."""
    from eta_guard._device import load_pretrained

    model, processor = load_pretrained(
        "guard model",
        name_or_path,
        model_class,
        processor_class,
        device=device,
        dtype=dtype,
        local_files_only=local_files_only,
        trust_remote_code=False,
        model_kwargs=model_kwargs,
        processor_kwargs=processor_kwargs,
        allow_new_weights=allow_new_weights,
    )
    kwargs.setdefault("name", default_name)
    return cls(model, processor, **kwargs)
