"""Constrained decoding of JSON answers (``response_format``) with xgrammar.

Why xgrammar: it is the structured-output engine vLLM, SGLang and TensorRT-LLM use by default, so
a schema decodes to the same grammar locally as on those engines; it ships a transformers
``LogitsProcessor`` (``xgrammar.contrib.hf``), compiles JSON schemas in C++ with a cache, and
masks each step with a precomputed token bitmask (no per-token Python walk over the vocabulary,
as lm-format-enforcer does). It is an optional extra: ``pip install "eta-guard[structured]"``.

The same grammars force a tool call (``tool_choice="required"`` or a named tool) in the family's
format (:mod:`eta_guard.tools.constraints`). Only the vanilla (greedy) answer is constrained. An answer ETA aligns is the model's safe
continuation of ``As an AI assistant`` and is not JSON: callers see it fail to parse as the
schema (LangChain's ``with_structured_output(include_raw=True)`` reports it as a parsing error).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from eta_guard.errors import InvalidInputError

_EXTRA_HINT = 'response_format needs xgrammar: pip install "eta-guard[structured]"'


class JSONConstraint:
    """Builds one logits processor per ``generate`` call for a tokenizer and vocabulary size.

    Args:
        tokenizer: the VLM's Hugging Face tokenizer.
        vocab_size: the model's output size (may exceed the tokenizer's, padded).
        stop_token_ids: the ids that end an answer (the model's EOS ids).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        try:
            import xgrammar as xgr
        except ImportError as e:
            raise ImportError(_EXTRA_HINT) from e
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None
        )
        self._xgr = xgr
        self._compiler = xgr.GrammarCompiler(info)  # caches compiled grammars
        self._lock = threading.Lock()

    def logits_processor(self, constraint: dict[str, Any]) -> Any:
        """A fresh ``transformers.LogitsProcessor`` for one greedy answer (batch of one).

        Args:
            constraint: a ``response_format`` (``json_object`` / ``json_schema``) or a forced
                tool call from :func:`eta_guard.tools.constraints.decoding_constraint`.

        Raises:
            InvalidInputError: the schema cannot be compiled.
        """
        from xgrammar.contrib.hf import LogitsProcessor

        xgr = self._xgr
        kind = constraint["type"]
        what = "tool_choice" if kind == "tool_call" else "response_format"
        with self._lock:
            try:
                if kind == "tool_call":
                    call = xgr.Grammar.from_json_schema(
                        json.dumps(constraint["schema"]), any_whitespace=False
                    )
                    if constraint["format"] == "hermes":  # the call inside its tags
                        call = xgr.Grammar.concat(
                            _literal(xgr, "<tool_call>\n"), call, _literal(xgr, "\n</tool_call>")
                        )
                    grammar = self._compiler.compile_grammar(call)
                else:
                    # OpenAI's json_object is "a JSON object", not any JSON value.
                    schema = (
                        {"type": "object"}
                        if kind == "json_object"
                        else constraint["json_schema"]["schema"]
                    )
                    grammar = self._compiler.compile_json_schema(
                        json.dumps(schema), any_whitespace=False
                    )
            except (RuntimeError, ValueError, TypeError) as e:
                raise InvalidInputError(
                    f"{what}: the JSON schema cannot be used for decoding ({e})"
                ) from e
        return LogitsProcessor(grammar)


def _literal(xgr: Any, text: str) -> Any:
    """A grammar matching exactly ``text``."""
    return xgr.Grammar.from_ebnf("root ::= " + json.dumps(text))
