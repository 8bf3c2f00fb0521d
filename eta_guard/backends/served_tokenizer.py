"""The served model's tokenizer, given to a remote client as an object or a path / HF id."""

from __future__ import annotations

from typing import Any

from eta_guard.errors import InvalidInputError


def load_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` itself, or the one ``AutoTokenizer`` loads from a path / id; None stays None.

    Raises:
        InvalidInputError: the path / id holds no loadable tokenizer.
    """
    if tokenizer is None or not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as e:
        raise InvalidInputError(
            f"tokenizer={tokenizer!r} cannot be loaded ({e}); pass the served model's tokenizer "
            "folder or HF id, or tokenizer=None to send sentence ends as stop strings"
        ) from e


__all__ = ["load_tokenizer"]
