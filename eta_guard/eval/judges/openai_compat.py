"""A judge behind any OpenAI-compatible chat-completions endpoint (vLLM, TGI, OpenAI, ...).

The answer goes into a judge prompt (default: the MD-Judge-style template) sent as one user
message at temperature 0; the reply's first line is read as ``safe`` / ``unsafe``. The question
and the answer are untrusted (a steered answer may imitate the judge's turn markers to forge a
verdict): every well-known chat-template marker in them, and the judge tokenizer's control
strings when ``tokenizer`` is given, are broken with a zero-width space before they are sent. Network and
HTTP failures become unjudged items with the error recorded, after ``retries`` retries on
429 / 5xx / timeouts. The API key is read from an environment variable, never from the command
line (where it would land in shell history and in the run's saved settings).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from eta_guard.backends.control_markers import control_strings_of, neutralize_known
from eta_guard.eval.judges.base import JudgeInput, Judgment, parse_safe_unsafe
from eta_guard.eval.judges.prompts import MD_JUDGE_STYLE_TEMPLATE, check_template, fill_template


class OpenAICompatibleJudge:
    """Judge with a chat model behind ``{base_url}/chat/completions``.

    Args:
        model: The served model's name.
        base_url: e.g. ``http://localhost:8000/v1``.
        api_key_env: Environment variable holding the bearer token (unset: no auth header).
        template: Judge prompt with ``{question}`` and ``{response}``.
        timeout: Seconds per request.
        retries: Extra attempts on 429, 5xx and transport errors.
        client: An ``httpx.Client`` to use (tests pass one with a mock transport).
        tokenizer: The judge model's tokenizer, whose control strings are broken in the text too
            (without it, the well-known markers of common chat formats are).
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        template: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        max_tokens: int = 16,
        client: Any = None,
        name: str | None = None,
        tokenizer: Any = None,
    ) -> None:
        import httpx

        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.template = check_template(template or MD_JUDGE_STYLE_TEMPLATE)
        self.retries = max(0, retries)
        self.max_tokens = max_tokens
        key = os.environ.get(api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = client or httpx.Client(timeout=timeout)
        self.headers = headers
        self.name = name or f"openai:{model}"
        self.markers = control_strings_of(tokenizer) if tokenizer is not None else ()

    def judge(self, inputs: Sequence[JudgeInput]) -> list[Judgment]:
        return [self._one(item) for item in inputs]

    def _one(self, item: JudgeInput) -> Judgment:
        import httpx

        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": fill_template(
                        self.template,
                        neutralize_known(item.question, self.markers),
                        neutralize_known(item.response, self.markers),
                        neutralize_known(item.safety_warning or "", self.markers) or None,
                    ),
                }
            ],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0**attempt, 10.0))
            try:
                reply = self.client.post(self.url, json=body, headers=self.headers)
            except httpx.HTTPError as e:
                error = f"request failed: {type(e).__name__}: {e}"
                continue
            if reply.status_code == 429 or reply.status_code >= 500:
                error = f"HTTP {reply.status_code} from {self.url}"
                continue
            if reply.status_code != 200:
                return Judgment(
                    unsafe=None,
                    error=f"HTTP {reply.status_code} from {self.url}: {reply.text[:200]}",
                )
            try:
                content = reply.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                return Judgment(unsafe=None, error=f"unexpected reply body: {reply.text[:200]}")
            return parse_safe_unsafe(content)
        return Judgment(unsafe=None, error=error)
