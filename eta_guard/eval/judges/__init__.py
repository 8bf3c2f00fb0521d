"""Judges, pluggable, several per run; :func:`build_judge` turns a ``--judge`` spec into one.

Specs: ``refusal``; ``choice`` (multiple-choice items: the safe option's letter); ``reward`` (the run's own reward model); ``llama-guard:PATH``,
``llama-guard-vision:PATH``, ``md-judge:PATH`` (local HF checkpoints); ``openai:MODEL@BASE_URL``.
"""

from __future__ import annotations

from typing import Any

from eta_guard.errors import InvalidInputError
from eta_guard.eval.judges.base import Judge, JudgeInput, Judgment, parse_safe_unsafe
from eta_guard.eval.judges.refusal import REFUSAL_PHRASES, RefusalJudge, find_refusal

__all__ = [
    "REFUSAL_PHRASES",
    "Judge",
    "JudgeInput",
    "Judgment",
    "RefusalJudge",
    "build_judge",
    "find_refusal",
    "parse_safe_unsafe",
]

SPEC_HELP = (
    "refusal | choice | reward | llama-guard:PATH | llama-guard-vision:PATH | md-judge:PATH | "
    "openai:MODEL@BASE_URL"
)


def build_judge(
    spec: str,
    *,
    evaluator: Any = None,
    prefix: str | None = None,
    device: str | None = None,
    dtype: Any = None,
    trust_remote_code: bool = False,
    template: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
) -> Judge:
    """Build the judge a ``--judge`` spec names (see :data:`SPEC_HELP`).

    Raises:
        InvalidInputError: An unknown kind or a spec without its argument.
    """
    kind, _, arg = spec.partition(":")
    if kind == "refusal" and not arg:
        return RefusalJudge(**({"prefix": prefix} if prefix is not None else {}))
    if kind == "choice" and not arg:
        from eta_guard.eval.judges.choice import ChoiceJudge

        return ChoiceJudge()
    if kind == "reward" and not arg:
        if evaluator is None:
            raise InvalidInputError("--judge reward needs the run's reward model")
        from eta_guard.eval.judges.reward import RewardJudge

        return RewardJudge(evaluator)
    if kind in ("llama-guard", "llama-guard-vision", "md-judge") and arg:
        from eta_guard.eval.judges.hf import HFGuardJudge

        return HFGuardJudge.from_pretrained(
            arg,
            format=kind,  # type: ignore[arg-type]
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            template=template,
            name=spec,
        )
    if kind == "openai" and "@" in arg:
        from eta_guard.eval.judges.openai_compat import OpenAICompatibleJudge

        model, _, url = arg.partition("@")
        if model and url.startswith(("http://", "https://")):
            return OpenAICompatibleJudge(model, url, api_key_env=api_key_env, template=template)
    raise InvalidInputError(f"--judge {spec!r} is not a judge spec; use {SPEC_HELP}")
