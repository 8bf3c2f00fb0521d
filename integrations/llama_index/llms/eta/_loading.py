"""Load the engine (or only its evaluator) once, on first use, thread-safely.

The LlamaIndex adapters take either model ids/paths (loaded lazily, never in ``__init__``) or
ready engine objects. These helpers turn either into the object the adapter needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eta_guard.errors import InvalidInputError
from eta_guard.lazy import Lazy, lazy_engine, lazy_evaluator

__all__ = [
    "Lazy",
    "evaluator_source",
    "lazy_engine",
    "lazy_evaluator",
    "local_files_allowed",
    "model_type_of",
]


def evaluator_source(source: Any, *, where: str) -> Lazy[Any]:
    """A :class:`Lazy` ``ETAEvaluator`` behind ``source``, without loading anything now.

    ``source`` may be an ``ETAEvaluator``, an ``ETA`` (its ``.evaluator``), or an
    :class:`~llama_index.llms.eta.ETAMultiModalLLM` (the evaluator of its engine, loaded when
    first needed): one set of weights then serves generation, retrieval and filtering.
    """
    from eta_guard.evaluators.eta_evaluator import ETAEvaluator
    from eta_guard.pipeline import ETA

    if isinstance(source, ETAEvaluator):
        return Lazy.ready(source)
    if isinstance(source, ETA):
        return Lazy.ready(source.evaluator)
    engine = getattr(source, "_engine", None)
    if isinstance(engine, Lazy):  # an ETAMultiModalLLM
        return Lazy(lambda: engine.get().evaluator)
    raise InvalidInputError(
        f"{where}: expected an ETAEvaluator, an ETA or an ETAMultiModalLLM, got "
        f"{type(source).__module__}.{type(source).__qualname__}"
    )


def local_files_allowed(explicit: bool | None, config: Any, *, default: bool) -> bool:
    """The local-file policy of one adapter call: ``explicit`` if set, else an ``ETAConfig``
    whose ``allow_local_image_files`` was set explicitly, else the adapter's ``default``.

    Defaults: off where messages come from users (``ETAMultiModalLLM``); on where images
    come from the application's own index or from the developer (embeddings, postprocessor,
    evaluator). The engine's default for the field never decides for an adapter.
    """
    if explicit is not None:
        return bool(explicit)
    if config is not None and "allow_local_image_files" in config.model_fields_set:
        return bool(config.allow_local_image_files)
    return default


def model_type_of(vlm: str | None) -> str | None:
    """The ``model_type`` in a checkpoint's ``config.json`` without loading it (a local folder, or
    a hub id already in the Hugging Face cache); ``None`` when it cannot be read offline."""
    if not vlm:
        return None
    path: Any = Path(vlm) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(vlm, "config.json")
        except Exception:  # not a repo id, no cache: unknown, never an error here
            return None
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return None
    try:
        model_type = json.loads(Path(path).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None
