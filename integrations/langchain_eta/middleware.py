"""``ETAGuardMiddleware``: ETA's evaluators as guardrails of a ``create_agent`` agent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from langchain.agents.middleware import (
    AgentMiddleware,
    AgentState,
    ExtendedModelResponse,
    ModelRequest,
    ModelResponse,
    hook_config,
)
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables.config import var_child_runnable_config
from langgraph.constants import TAG_NOSTREAM
from langgraph.runtime import Runtime
from langgraph.types import Command

from eta_guard.errors import GuardrailViolation
from langchain_eta._loading import Lazy, aresolve, lazy_evaluator, local_files, resolve
from langchain_eta._messages import image_sources
from langchain_eta._verdicts import (
    DEFAULT_REFUSAL,
    GUARD_VERDICT_KEY,
    OnViolation,
    aemit,
    check_on_violation,
    emit,
    event_data,
    verdict_dict,
)

_CallResult = ModelResponse | ExtendedModelResponse


class ETAGuardMiddleware(AgentMiddleware):
    """Checks images before each model call and answers before they leave it, for any chat model.

    ``before_model`` scores the images of the messages added since the model last spoke (the
    user's turn, tool results) with CLIP. ``wrap_model_call`` runs the model and scores its
    answer with the reward model *inside the model node*, before the answer is written to the
    agent's state; while it runs, the model's tokens are kept out of
    ``stream_mode="messages"`` (the model call is tagged ``"nostream"``), so a streamed agent
    shows the checked answer (or the refusal) as one message and never the unchecked text. On
    a violation:

    - ``on_violation="raise"``: raise ``GuardrailViolation`` (``.verdict`` says why).
    - ``"replace"``: end the run with an ``AIMessage(refusal)`` (after the model, it takes the
      place of the flagged answer, tool calls included, under the same message id).
    - ``"flag"``: go on; the verdict goes into ``response_metadata["eta_guard_verdict"]`` of
      the checked message (the model's own ``"eta_verdict"``, e.g. ``ETAChatModel``'s, is
      kept).

    ``rule`` says what a violation is:

    - ``"each"`` (default): each check blocks on its own flag (image flagged by CLIP before
      the model; answer flagged by the reward model after it).
    - ``"eta"``: ETA's own rule. Nothing is blocked before the model; after it, the answer is
      judged together with the images of the current turn (from the last user message on) and
      blocked only when both are unsafe (``SafetyVerdict.unsafe``). Turns without images follow
      ``config.text_only_policy``: ``"trust"`` skips the check (and streams the model's tokens
      as usual), ``"reward_only"`` uses the reward model alone.

    Every check emits an ``eta_verdict`` custom callback event (``source``
    ``"ETAGuardMiddleware.before_model"`` for the image check, ``".after_model"`` for the answer
    check).

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

        Stream (the answer arrives once checked, as one message):

        .. code-block:: python

            request = {"messages": [{"role": "user", "content": "Hi"}]}
            for message, metadata in agent.stream(request, stream_mode="messages"):
                print(message.text)

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
        check_output: Check the model's answer (and hold its tokens back until then).
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

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> _CallResult:
        images = self._output_images(request)
        if images is None:
            return handler(request)
        with _no_token_stream():
            response = handler(request)
        answer = _answer(response)
        if answer is None:
            return response
        verdict = self._images_evaluator(resolve(self.evaluator)).evaluate(
            images=images or None, response=answer.text
        )
        emit(self._event("after_model", verdict, self._output_violation(verdict)))
        return self._on_output(response, answer, verdict)

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> _CallResult:
        if self.check_output:
            await aresolve(self.evaluator)  # _output_images may read its config: load off the loop
        images = self._output_images(request)
        if images is None:
            return await handler(request)
        with _no_token_stream():
            response = await handler(request)
        answer = _answer(response)
        if answer is None:
            return response
        evaluator = self._images_evaluator(await aresolve(self.evaluator))
        verdict = await evaluator.aevaluate(images=images or None, response=answer.text)
        await aemit(self._event("after_model", verdict, self._output_violation(verdict)))
        return self._on_output(response, answer, verdict)

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

    def _output_images(self, request: ModelRequest) -> list[str] | None:
        """The images the answer is judged with (``[]``: none); ``None``: no answer check.

        Decided before the model runs, so that its tokens are held back only when its answer
        will be checked. ``rule="each"`` judges the answer alone; ``rule="eta"`` with the
        images of the current turn of the messages the model is sent.
        """
        if not self.check_output:
            return None
        if self.rule == "each":
            return []
        turn = _current_turn(request.messages)
        images = [
            src for _, _, src in image_sources(turn, allow_local_files=self.allow_local_image_files)
        ]
        if not images and resolve(self.evaluator).config.text_only_policy == "trust":
            return None
        return images

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
            content=self.refusal, response_metadata={GUARD_VERDICT_KEY: verdict_dict(verdict)}
        )
        return {"messages": [refusal], "jump_to": "end"}

    def _on_output(self, response: ModelResponse, answer: AIMessage, verdict: Any) -> _CallResult:
        if self.on_violation == "flag":
            flagged = _flagged(answer, verdict)
            result = [flagged if m is answer else m for m in response.result]
            return ModelResponse(result=result, structured_response=response.structured_response)
        if not self._output_violation(verdict):
            return response
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
            name=answer.name,
            response_metadata={GUARD_VERDICT_KEY: verdict_dict(verdict)},
        )
        return ExtendedModelResponse(
            model_response=ModelResponse(result=[refusal]),
            command=Command(update={"jump_to": "end"}),
        )


@contextmanager
def _no_token_stream() -> Iterator[None]:
    """Within: chat models called from this context don't feed ``stream_mode="messages"``.

    Adds langgraph's ``"nostream"`` tag to the config that ``create_agent``'s model call reads
    from the context: langgraph's messages stream then ignores that call's tokens and its end
    (callback handlers that ignore the tag, e.g. ``astream_events``, still see them). The
    model node's output, the checked answer, is streamed instead.
    """
    config = var_child_runnable_config.get() or {}
    tags = [*(config.get("tags") or []), TAG_NOSTREAM]
    token = var_child_runnable_config.set({**config, "tags": tags})
    try:
        yield
    finally:
        var_child_runnable_config.reset(token)


def _answer(response: ModelResponse) -> AIMessage | None:
    """The model's answer in ``response`` if it has text to check (tool calls alone: ``None``)."""
    answer = next((m for m in response.result if isinstance(m, AIMessage)), None)
    return answer if answer is not None and answer.text else None


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
    meta = {**message.response_metadata, GUARD_VERDICT_KEY: verdict_dict(verdict)}
    return message.model_copy(update={"response_metadata": meta})
