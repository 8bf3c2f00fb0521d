"""The two evaluator interfaces beside CLIP and the reward model: gates and judges (torch-free).

A *gate* (pre-generation evaluator) sees what the user sent: the images and the conversation's
text, so harm that lives only in the image+question combination (SIUO-style) can be caught before
generation. A *judge* (post-generation evaluator) sees the answer and, when it wants it, the
conversation that led to it. Both return a :class:`GuardScore` per request, higher = more unsafe,
unsafe iff ``score >= threshold``. ETA's CLIP and reward model keep their own classes and
directions (``eta_guard.evaluators.clip`` / ``reward``); :class:`eta_guard.ETAEvaluator` runs
them first and these after, and ``ETAConfig.decision_rule`` combines the sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class GuardRequest:
    """One request as an evaluator sees it.

    Attributes:
        messages: HF chat-template messages (``{"role", "content": [parts]}``; image parts are
            bare ``{"type": "image"}`` placeholders, one per entry of ``images``, in order).
            For a gate they end with the user's turn; for a judge too (the answer is apart).
        images: The decoded images the guarded model receives.
        response: The answer to judge (judges only).
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    response: str | None = None

    @property
    def text(self) -> str:
        """All text parts of the messages joined by blank lines."""
        return "\n\n".join(
            str(part.get("text", ""))
            for message in self.messages
            for part in message.get("content", [])
            if isinstance(part, dict) and part.get("type") == "text"
        )


@dataclass(frozen=True)
class GuardScore:
    """An evaluator's answer for one request: ``score`` (higher = more unsafe) and categories."""

    score: float
    categories: tuple[str, ...] = ()


#: What a gate reads when it has no ``applies_to`` attribute: requests with images only.
DEFAULT_APPLIES_TO = frozenset({"images"})


def applies_to(gate: object) -> frozenset[str]:
    """The requests a gate reads: ``"images"`` (with images), ``"text_only"`` (without)."""
    return frozenset(getattr(gate, "applies_to", DEFAULT_APPLIES_TO))


@runtime_checkable
class GateEvaluator(Protocol):
    """A pre-generation evaluator over images and text (unsafe iff score >= ``threshold``).

    A gate may set ``applies_to`` (default :data:`DEFAULT_APPLIES_TO`): ``"images"`` for
    requests with images, ``"text_only"`` for requests without (run under
    ``ETAConfig.text_only_policy="guard"``; a text guard has only this one).
    """

    name: str
    threshold: float

    def check(self, requests: list[GuardRequest]) -> list[GuardScore]:
        """One score per request, in order (batched where the model allows)."""
        ...


@runtime_checkable
class JudgeEvaluator(Protocol):
    """A post-generation evaluator over the answer (and the conversation); same contract."""

    name: str
    threshold: float

    def check(self, requests: list[GuardRequest]) -> list[GuardScore]:
        """One score per request (each with ``response`` set), in order."""
        ...


def user_messages(text: str | None, num_images: int) -> list[dict[str, Any]]:
    """A one-turn conversation: ``num_images`` image placeholders then ``text`` (if any)."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    if text:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]
