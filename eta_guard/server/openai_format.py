"""Response objects in the shapes the official OpenAI clients parse, plus ETA's extension.

ETA's verdict travels in one nested object, ``"eta"``, on the response and on the last streamed
chunk (as NeMo Guardrails nests its fields under ``"guardrails"``); standard fields keep their
OpenAI meaning. The extension never carries the replaced (unsafe) answer or the best-of-N
candidates: a client must not receive what the guard withheld (of the calls ETA dropped, only
the tool names are reported).

Tool calls: when tools are offered, the calls are parsed from the whole answer and judged with
it, then sent as ``message.tool_calls`` (``finish_reason: "tool_calls"``), or streamed after the
answer's words as OpenAI's deltas: per call, one delta with its ``index``, ``id``, ``type`` and
``function.name`` (empty arguments), then one with ``function.arguments``.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

from eta_guard.tools.answers import GuardedAnswer, guarded_answer
from eta_guard.tools.streaming import ContentStream
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


def result_extension(
    result: ETAResult, ignored: list[str], answer: GuardedAnswer | None = None
) -> dict[str, Any]:
    out = {
        **verdict_extension(result.verdict),
        "aligned": result.aligned,
        "decoded_tokens": result.usage.decoded_tokens,
        "ignored_parameters": ignored,
    }
    if answer is not None:
        # Names only: the dropped calls' arguments are what the guard withheld.
        out["dropped_tool_calls"] = [call.name for call in answer.dropped]
        out["invalid_tool_calls"] = [
            {"name": c.name, "arguments": c.arguments, "error": c.error}
            for c in answer.invalid_tool_calls
        ]
    return out


def usage(result: ETAResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.usage.input_tokens,
        "completion_tokens": result.usage.output_tokens,
        "total_tokens": result.usage.total_tokens,
    }


class Formatter:
    """Builds one request's response or chunks (same id, model and timestamp throughout)."""

    def __init__(self, kind: Kind, model: str, *, tool_parser: str | None = None) -> None:
        self.kind, self.model = kind, model
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.tool_parser = tool_parser
        # While tools are offered, streamed words stop before anything that may be a call.
        self._content = ContentStream(tool_parser) if tool_parser else None

    def _answer(self, result: ETAResult) -> GuardedAnswer | None:
        return guarded_answer(result, self.tool_parser) if self.tool_parser else None

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, result: ETAResult, ignored: list[str]) -> dict[str, Any]:
        answer = self._answer(result)
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
            finish: str = result.finish_reason
            if answer is not None:
                message["content"] = answer.content or (None if answer.tool_calls else "")
                if answer.tool_calls:
                    message["tool_calls"] = [call.to_openai() for call in answer.tool_calls]
                    finish = "tool_calls"
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "finish_reason": finish,
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
            "eta": result_extension(result, ignored, answer),
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

    def text_chunk(self, text: str, include_usage: bool) -> str | None:
        """A chunk of streamed text (None while tools are offered and it may begin a call)."""
        if self._content is not None:
            text = self._content.feed(text)
            if not text:
                return None
        return self._chunk([self._choice(text, None)], **_usage_null(include_usage))

    def last_chunks(self, result: ETAResult, ignored: list[str], include_usage: bool) -> list[str]:
        """The answer's remaining words and its calls (tools offered), the finish chunk, the
        usage chunk if asked, and ``[DONE]``.

        The extension rides on the finish chunk (the last with choices) and again on the usage
        chunk, so that the last chunk carries it in both modes.

        Raises:
            RuntimeError: the words streamed are not the start of the final answer.
        """
        answer = self._answer(result)
        eta = result_extension(result, ignored, answer)
        out: list[str] = []
        finish: str = result.finish_reason
        if answer is not None and self._content is not None:
            rest = self._content.finish(answer.content)
            if rest:
                out.append(self._chunk([self._choice(rest, None)], **_usage_null(include_usage)))
            for i, call in enumerate(answer.tool_calls):
                out += self._call_chunks(i, call.to_openai(), include_usage)
            if answer.tool_calls:
                finish = "tool_calls"
        out.append(
            self._chunk(
                [self._choice(None if self.kind == "chat" else "", finish)],
                **_usage_null(include_usage),
                eta=eta,
            )
        )
        if include_usage:
            out.append(self._chunk([], usage=usage(result), eta=eta))
        out.append(DONE)
        return out

    def _call_chunks(self, index: int, call: dict[str, Any], include_usage: bool) -> list[str]:
        """One call as OpenAI streams it: its header, then its arguments."""
        head = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        body = {"index": index, "function": {"arguments": call["function"]["arguments"]}}
        return [
            self._chunk(
                [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [part]},
                        "finish_reason": None,
                        "logprobs": None,
                    }
                ],
                **_usage_null(include_usage),
            )
            for part in (head, body)
        ]


DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"


def sse(data: dict[str, Any]) -> str:
    """One server-sent event (``data: <json>``); JSON never contains a raw newline."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _usage_null(include_usage: bool) -> dict[str, Any]:
    # With include_usage, OpenAI sends "usage": null on every chunk but the usage chunk.
    return {"usage": None} if include_usage else {}
