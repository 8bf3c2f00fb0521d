"""``ETAGuardMiddleware``: ETA's evaluators as guardrails of a ``create_agent`` agent."""

from __future__ import annotations

from typing import Any, Literal

from langchain.agents.middleware import AgentMiddleware, AgentState, hook_config
from langchain_core.messages import AIMessage, BaseMessage
from langgraph.runtime import Runtime

from eta_guard.errors import GuardrailViolation
from langchain_eta._loading import Lazy, aresolve, lazy_evaluator, local_files, resolve
from langchain_eta._messages import image_sources
from langchain_eta._verdicts import (
    DEFAULT_REFUSAL,
    VERDICT_KEY,
    OnViolation,
    aemit,
    check_on_violation,
    emit,
    event_data,
    verdict_dict,
)


class ETAGuardMiddleware(AgentMiddleware):
    """Checks images before each model call and answers after it, for any chat model.

    ``before_model`` scores the images of the messages added since the model last spoke (the
    user's turn, tool results) with CLIP; ``after_model`` scores the model's answer with the
    reward model. On a violation:

    - ``on_violation="raise"``: raise ``GuardrailViolation`` (``.verdict`` says why).
    - ``"replace"``: jump to the end with an ``AIMessage(refusal)`` (after the model, it replaces
      the flagged answer, tool calls included, under the same message id).
    - ``"flag"``: go on; the verdict goes into ``response_metadata["eta_verdict"]`` of the
      checked message.

    ``rule`` says what a violation is:

    - ``"each"`` (default): each check blocks on its own flag (image flagged by CLIP before
      the model; answer flagged by the reward model after it).
    - ``"eta"``: ETA's own rule. Nothing is blocked before the model; after it, the answer is
      judged together with the images of the current turn (from the last user message on) and
      blocked only when both are unsafe (``SafetyVerdict.unsafe``). Turns without images follow
      ``config.text_only_policy``: ``"trust"`` skips the check, ``"reward_only"`` uses the
      reward model alone.

    Every check emits an ``eta_verdict`` custom callback event.

    Example (offline, on tiny random checkpoints; any chat model in place of the fake one):
        .. code-block:: python

            from eta_guard.testing import build_tiny_checkpoints
            from langchain.agents import create_agent
            from langchain_core.language_models import GenericFakeChatModel
            from langchain_core.messages import AIMessage
            from langchain_eta import ETAGuardMiddleware

            ckpt = build_tiny_checkpoints("/tmp/eta-tiny")
            guard = ETAGuardMiddleware(
                clip=ckpt.clip, reward_model=ckpt.reward_model, rule="eta"
            )  # loaded on first use; or ETAGuardMiddleware(evaluator)
            chat_model = GenericFakeChatModel(messages=iter([AIMessage("Hello!")] * 3))
            agent = create_agent(model=chat_model, tools=[], middleware=[guard])
            agent.invoke({"messages": [{"role": "user", "content": "Hi"}]})["messages"][-1].text

        Async:

        .. code-block:: python

            await agent.ainvoke({"messages": [{"role": "user", "content": "Hi"}]})

    Args:
        evaluator: A ready ``eta_guard.ETAEvaluator``. Leave out to load ``clip`` and
            ``reward_model`` on first use.
        clip: CLIP id or path (``None``: no image check).
        reward_model: Reward-model id or path (``None``: no answer check).
        config: ``ETAConfig`` of the evaluator (thresholds, failure policy).
        on_violation: ``"raise"``, ``"replace"`` or ``"flag"``.
        refusal: The answer given instead of a blocked one.
        rule: ``"each"`` or ``"eta"`` (see above).
        allow_local_image_files: Read image ``url``s that are local paths or ``file:`` URLs
            (off: they are refused, since messages may come from untrusted users).
        check_input: Run the image check before the model.
        check_output: Run the answer check after the model.
        **load_kwargs: More ``ETAEvaluator.from_pretrained`` options (``device``, ``dtype``...).
    """

    def __init__(
        self,
        evaluator: Any = None,
        *,
        clip: str | None = None,
        reward_model: str | None = None,
        config: Any = None,
        on_violation: OnViolation = "replace",
        refusal: str = DEFAULT_REFUSAL,
        check_input: bool = True,
        check_output: bool = True,
        rule: Literal["each", "eta"] = "each",
        allow_local_image_files: bool = False,
        **load_kwargs: Any,
    ) -> None:
        super().__init__()
        if evaluator is None:
            if clip is None and reward_model is None:
                raise ValueError(
                    "ETAGuardMiddleware needs evaluator=... or clip= / reward_model= ids"
                )
            evaluator = lazy_evaluator(
                clip=clip, reward_model=reward_model, config=config, **load_kwargs
            )
        self.evaluator: Any = evaluator
        self.on_violation = check_on_violation(on_violation)
        self.refusal = refusal
        self.check_input = check_input
        self.check_output = check_output
        if rule not in ("each", "eta"):
            raise ValueError(f"rule={rule!r} is not allowed; use 'each' or 'eta'")
        self.rule = rule
        self.allow_local_image_files = allow_local_image_files

    @property
    def loaded(self) -> bool:
        return not isinstance(self.evaluator, Lazy) or self.evaluator.loaded

    # ---------------------------------------------------------------- hooks
    @hook_config(can_jump_to=["end"])
    def before_model(self, state: AgentState, runtime: Runtime) -> dict[str, Any] | None:
        found = self._new_images(state)
        if not found:
            return None
        verdict = self._images_evaluator(resolve(self.evaluator)).evaluate_input(
            [src for _, src in found]
        )
        emit(self._event("before_model", verdict, verdict.input_unsafe))
        return self._on_input(state, found, verdict)

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: AgentState, runtime: Runtime) -> dict[str, Any] | None:
        found = self._new_images(state)
        if not found:
            return None
        evaluator = self._images_evaluator(await aresolve(self.evaluator))
        verdict = await evaluator.aevaluate_input([src for _, src in found])
        await aemit(self._event("before_model", verdict, verdict.input_unsafe))
        return self._on_input(state, found, verdict)

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: AgentState, runtime: Runtime) -> dict[str, Any] | None:
        answer, request = self._output_request(state)
        if answer is None:
            return None
        verdict = self._images_evaluator(resolve(self.evaluator)).evaluate(**request)
        emit(self._event("after_model", verdict, self._output_violation(verdict)))
        return self._on_output(answer, verdict)

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: AgentState, runtime: Runtime) -> dict[str, Any] | None:
        if self.rule == "eta":
            await aresolve(self.evaluator)  # _output_request reads its config: load off the loop
        answer, request = self._output_request(state)
        if answer is None:
            return None
        evaluator = self._images_evaluator(await aresolve(self.evaluator))
        verdict = await evaluator.aevaluate(**request)
        await aemit(self._event("after_model", verdict, self._output_violation(verdict)))
        return self._on_output(answer, verdict)

    # ---------------------------------------------------------------- shared core
    def _images_evaluator(self, evaluator: Any) -> Any:
        """The evaluator, reading local image files only if ``allow_local_image_files``."""
        return local_files(evaluator, self.allow_local_image_files)

    def _new_images(self, state: AgentState) -> list[tuple[int, str]]:
        """``(message index, source)`` of images added since the last AI message."""
        if not self.check_input or self.rule == "eta":
            return []
        messages = state["messages"]
        start = next(
            (i + 1 for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], AIMessage)),
            0,
        )
        found = image_sources(messages[start:], allow_local_files=self.allow_local_image_files)
        return [(start + i, src) for i, _, src in found]

    def _output_request(self, state: AgentState) -> tuple[AIMessage | None, dict[str, Any]]:
        """The answer to check and the ``evaluate(...)`` arguments (``None``: nothing to check)."""
        messages = state["messages"]
        if not self.check_output or not messages or not isinstance(messages[-1], AIMessage):
            return None, {}
        answer = messages[-1]
        if not answer.text:
            return None, {}
        if self.rule == "each":
            return answer, {"response": answer.text}
        turn = _current_turn(messages[:-1])
        images = [
            src for _, _, src in image_sources(turn, allow_local_files=self.allow_local_image_files)
        ]
        if not images and resolve(self.evaluator).config.text_only_policy == "trust":
            return None, {}
        return answer, {"images": images or None, "response": answer.text}

    def _output_violation(self, verdict: Any) -> bool:
        return bool(verdict.unsafe if self.rule == "eta" else verdict.output_unsafe)

    def _event(self, hook: str, verdict: Any, violation: Any) -> dict[str, Any]:
        return event_data(
            f"ETAGuardMiddleware.{hook}",
            verdict,
            violation=bool(violation),
            action=self.on_violation,
        )

    def _on_input(
        self, state: AgentState, found: list[tuple[int, str]], verdict: Any
    ) -> dict[str, Any] | None:
        if self.on_violation == "flag":
            last = state["messages"][found[-1][0]]
            return {"messages": [_flagged(last, verdict)]}
        if not verdict.input_unsafe:
            return None
        if self.on_violation == "raise":
            raise GuardrailViolation(
                f"ETAGuardMiddleware: image flagged as unsafe (CLIP score {verdict.pre_score} >= "
                f"{verdict.pre_threshold})",
                verdict,
            )
        refusal = AIMessage(
            content=self.refusal, response_metadata={VERDICT_KEY: verdict_dict(verdict)}
        )
        return {"messages": [refusal], "jump_to": "end"}

    def _on_output(self, answer: AIMessage, verdict: Any) -> dict[str, Any] | None:
        if self.on_violation == "flag":
            return {"messages": [_flagged(answer, verdict)]}
        if not self._output_violation(verdict):
            return None
        if self.on_violation == "raise":
            raise GuardrailViolation(
                f"ETAGuardMiddleware: answer flagged as unsafe (reward {verdict.post_score} <= "
                f"{verdict.post_threshold}"
                + (
                    f"; image CLIP score {verdict.pre_score})"
                    if verdict.pre_score is not None
                    else ")"
                ),
                verdict,
            )
        refusal = AIMessage(
            content=self.refusal,
            id=answer.id,
            response_metadata={VERDICT_KEY: verdict_dict(verdict)},
        )
        return {"messages": [refusal], "jump_to": "end"}


def _current_turn(messages: list[BaseMessage]) -> list[BaseMessage]:
    """The messages from the start of the last user turn on (tool results included)."""
    last_human = next(
        (i for i in range(len(messages) - 1, -1, -1) if messages[i].type == "human"), None
    )
    if last_human is None:
        return []
    start = next(
        (i + 1 for i in range(last_human, -1, -1) if isinstance(messages[i], AIMessage)), 0
    )
    return list(messages[start:])


def _flagged(message: BaseMessage, verdict: Any) -> BaseMessage:
    meta = {**message.response_metadata, VERDICT_KEY: verdict_dict(verdict)}
    return message.model_copy(update={"response_metadata": meta})
