"""Response objects in the shapes the official OpenAI clients parse, plus ETA's extension.

ETA's verdict travels in one nested object, ``"eta"``, on the response and on the last streamed
chunk (as NeMo Guardrails nests its fields under ``"guardrails"``); standard fields keep their
OpenAI meaning. The extension never carries the replaced (unsafe) answer or the best-of-N
candidates: a client must not receive what the guard withheld.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

from eta_guard.verdict import ETAResult, SafetyVerdict

Kind = Literal["chat", "text"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def verdict_extension(verdict: SafetyVerdict) -> dict[str, Any]:
    """The verdict's scores, flags and thresholds (failed checks by name, no error text)."""
    return {
        "unsafe": verdict.unsafe,
        "input_unsafe": verdict.input_unsafe,
        "output_unsafe": verdict.output_unsafe,
        "scores": {
            "clip": verdict.pre_score,
            "reward": verdict.post_score,
            "image_clip": list(verdict.image_scores),
        },
        "thresholds": {"clip": verdict.pre_threshold, "reward": verdict.post_threshold},
        "skipped": dict(verdict.skipped),
        "failed_checks": sorted(verdict.errors),
        "rule": verdict.rule,
        "fired": list(verdict.fired),
        # every evaluator that ran (CLIP, the RM, gates, judges); errors by flag only
        "evaluators": [
            {
                "name": e.name,
                "side": e.side,
                "score": e.score,
                "threshold": e.threshold,
                "unsafe": e.unsafe,
                "categories": list(e.categories),
                "failed": e.error is not None,
            }
            for e in verdict.evaluators
        ],
    }


def result_extension(result: ETAResult, ignored: list[str]) -> dict[str, Any]:
    return {
        **verdict_extension(result.verdict),
        "aligned": result.aligned,
        "decoded_tokens": result.usage.decoded_tokens,
        "ignored_parameters": ignored,
    }


def usage(result: ETAResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.usage.input_tokens,
        "completion_tokens": result.usage.output_tokens,
        "total_tokens": result.usage.total_tokens,
    }


class Formatter:
    """Builds one request's response or chunks (same id, model and timestamp throughout)."""

    def __init__(self, kind: Kind, model: str) -> None:
        self.kind, self.model = kind, model
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, result: ETAResult, ignored: list[str]) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        else:
            choice = {
                "index": 0,
                "text": result.text,
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        return {
            **self._head(self.object),
            "choices": [choice],
            "usage": usage(result),
            "system_fingerprint": None,
            "eta": result_extension(result, ignored),
        }

    # ------------------------------------------------------------------ streaming
    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return sse({**self._head(obj), "choices": choices, **extra})

    def _choice(self, text: str | None, finish: str | None, *, role: bool = False) -> dict:
        if self.kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if role:
                delta["role"] = "assistant"
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

    def first_chunk(self, include_usage: bool) -> str | None:
        """Chat streams open with the assistant role (text completions have no roles)."""
        if self.kind != "chat":
            return None
        return self._chunk([self._choice("", None, role=True)], **_usage_null(include_usage))

    def text_chunk(self, text: str, include_usage: bool) -> str:
        return self._chunk([self._choice(text, None)], **_usage_null(include_usage))

    def last_chunks(self, result: ETAResult, ignored: list[str], include_usage: bool) -> list[str]:
        """The finish chunk, the usage chunk if asked, and ``[DONE]``.

        The extension rides on the finish chunk (the last with choices) and again on the usage
        chunk, so that the last chunk carries it in both modes.
        """
        eta = result_extension(result, ignored)
        out = [
            self._chunk(
                [self._choice(None if self.kind == "chat" else "", result.finish_reason)],
                **_usage_null(include_usage),
                eta=eta,
            )
        ]
        if include_usage:
            out.append(self._chunk([], usage=usage(result), eta=eta))
        out.append(DONE)
        return out


DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"


def sse(data: dict[str, Any]) -> str:
    """One server-sent event (``data: <json>``); JSON never contains a raw newline."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _usage_null(include_usage: bool) -> dict[str, Any]:
    # With include_usage, OpenAI sends "usage": null on every chunk but the usage chunk.
    return {"usage": None} if include_usage else {}
