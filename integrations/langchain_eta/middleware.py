"""``ETAGuardMiddleware``: ETA's evaluators as guardrails of a ``create_agent`` agent."""

from __future__ import annotations

import asyncio
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

from eta_guard.errors import GuardrailViolation, InvalidInputError
from eta_guard.image_score_cache import DEFAULT_MAX_ENTRIES, ImageScoreCache
from eta_guard.tools.calls import judged_text
from langchain_eta._image_checks import ImageCheck, check_images
from langchain_eta._loading import Lazy, aresolve, lazy_evaluator, resolve
from langchain_eta._messages import replace_blocks
from langchain_eta._verdicts import (
    DEFAULT_IMAGE_REPLACEMENT,
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

    ``before_model`` scores every image of the conversation the model is sent, history
    included, with CLIP: each image is decoded once, scored, and replaced in the agent's state
    by a metadata-free PNG of exactly the pixels scored (same message ids), so the model never
    gets bytes that were not scored. Scores are cached by content hash (``image_cache_size``),
    so images already in the history are neither decoded nor scored again; images that another
    middleware adds later are checked in ``wrap_model_call``. Animated images are refused
    (``InvalidInputError``). ``wrap_model_call`` runs the model and scores its
    answer with the reward model *inside the model node*, before the answer is written to the
    agent's state (its words and its tool calls: a call's name and arguments are judged as part
    of the answer, so a flagged call never runs); while it runs, the model's tokens are kept out of
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
      judged together with every image of the conversation (history included: an image in an
      earlier turn is still in front of the model) and blocked only when both are unsafe
      (``SafetyVerdict.unsafe``). Conversations without images follow
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
        replacement: Text that takes the place of a flagged image in the conversation when
            ``on_violation="replace"`` (so that later turns do not carry it).
        image_cache_size: How many image scores to remember by content hash (0: none).
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
        replacement: str = DEFAULT_IMAGE_REPLACEMENT,
        image_cache_size: int = DEFAULT_MAX_ENTRIES,
        **load_kwargs: Any,
    ) -> None:
        super().__init__()
        if evaluator is None:
            if clip is None and reward_model is None:
                raise InvalidInputError(
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
            raise InvalidInputError(f"rule={str(rule)[:40]!r} is not allowed; use 'each' or 'eta'")
        self.rule = rule
        self.allow_local_image_files = allow_local_image_files
        self.replacement = replacement
        self._scores = ImageScoreCache(image_cache_size)

    @property
    def loaded(self) -> bool:
        return not isinstance(self.evaluator, Lazy) or self.evaluator.loaded

    # ---------------------------------------------------------------- hooks
    @hook_config(can_jump_to=["end"])
    def before_model(self, state: AgentState, runtime: Runtime) -> dict[str, Any] | None:
        if not self._checks_images():
            return None
        check = self._check(state["messages"], resolve(self.evaluator))
        if check.verdict is not None and self.rule == "each":
            emit(self._event("before_model", check.verdict, check.verdict.input_unsafe))
        return self._on_input(state, check)

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: AgentState, runtime: Runtime) -> dict[str, Any] | None:
        if not self._checks_images():
            return None
        evaluator = await aresolve(self.evaluator)
        check = await asyncio.to_thread(self._check, state["messages"], evaluator)
        if check.verdict is not None and self.rule == "each":
            await aemit(self._event("before_model", check.verdict, check.verdict.input_unsafe))
        return self._on_input(state, check)

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> _CallResult:
        request, check = self._forwarded_request(request, resolve(self.evaluator))
        blocked = self._blocked_input(check, emit)
        if blocked is not None:
            return blocked
        if not self._checks_answer(check):
            return handler(request)
        with _no_token_stream():
            response = handler(request)
        answer = _answer(response)
        if answer is None:
            return response
        verdict = self._answer_verdict(
            check, resolve(self.evaluator).evaluate_output(_judged_text(answer))
        )
        emit(self._event("after_model", verdict, self._output_violation(verdict)))
        return self._on_output(response, answer, verdict)

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> _CallResult:
        evaluator = await aresolve(self.evaluator)  # a first load runs off the event loop
        request, check = await asyncio.to_thread(self._forwarded_request, request, evaluator)
        blocked = self._blocked_input(check, None)
        if blocked is not None:
            if check is not None and check.verdict is not None:
                await aemit(self._event("before_model", check.verdict, True))
            return blocked
        if not self._checks_answer(check):
            return await handler(request)
        with _no_token_stream():
            response = await handler(request)
        answer = _answer(response)
        if answer is None:
            return response
        verdict = self._answer_verdict(
            check, await evaluator.aevaluate_output(_judged_text(answer))
        )
        await aemit(self._event("after_model", verdict, self._output_violation(verdict)))
        return self._on_output(response, answer, verdict)

    # ---------------------------------------------------------------- shared core
    def _checks_images(self) -> bool:
        """Whether images are scored at all (before the model, or with the answer)."""
        return (self.check_input and self.rule == "each") or (
            self.check_output and self.rule == "eta"
        )

    def _check(self, messages: list[BaseMessage], evaluator: Any) -> ImageCheck:
        """Every image of ``messages`` (history included) decoded, normalised and scored."""
        return check_images(
            messages, evaluator, self._scores, allow_local_files=self.allow_local_image_files
        )

    def _forwarded_request(
        self, request: ModelRequest, evaluator: Any
    ) -> tuple[ModelRequest, ImageCheck | None]:
        """The request with every image as the PNG that was scored, and its image check.

        ``before_model`` already put those PNGs into the state, so this is normally a cache
        lookup per image; an image added since (e.g. by another middleware) is scored here.
        """
        if not self._checks_images():
            return request, None
        check = self._check(list(request.messages), evaluator)
        if check.rewrites:
            request = request.override(messages=check.forwarded(list(request.messages)))
        return request, check

    def _blocked_input(self, check: ImageCheck | None, emit_now: Any) -> _CallResult | None:
        """A refusal when images not seen by ``before_model`` are flagged (``rule="each"``)."""
        if check is None or check.verdict is None or self.rule != "each":
            return None
        if not check.scored_now or not check.verdict.input_unsafe or self.on_violation == "flag":
            return None
        if emit_now is not None:
            emit_now(self._event("before_model", check.verdict, True))
        if self.on_violation == "raise":
            raise GuardrailViolation(_input_message(check.verdict), check.verdict)
        refusal = AIMessage(
            content=self.refusal,
            response_metadata={GUARD_VERDICT_KEY: verdict_dict(check.verdict)},
        )
        return ExtendedModelResponse(
            model_response=ModelResponse(result=[refusal]),
            command=Command(update={"jump_to": "end"}),
        )

    def _checks_answer(self, check: ImageCheck | None) -> bool:
        """Whether the answer is judged (its tokens are then held back until it is)."""
        if not self.check_output:
            return False
        if self.rule == "each" or (check is not None and check.verdict is not None):
            return True
        return resolve(self.evaluator).config.text_only_policy != "trust"

    def _answer_verdict(self, check: ImageCheck | None, answer: Any) -> Any:
        """``rule="eta"``: the answer's verdict joined with that of every image forwarded."""
        if self.rule == "eta" and check is not None and check.verdict is not None:
            return check.verdict.merge(answer)
        return answer

    def _output_violation(self, verdict: Any) -> bool:
        return bool(verdict.unsafe if self.rule == "eta" else verdict.output_unsafe)

    def _event(self, hook: str, verdict: Any, violation: Any) -> dict[str, Any]:
        return event_data(
            f"ETAGuardMiddleware.{hook}",
            verdict,
            violation=bool(violation),
            action=self.on_violation,
        )

    def _on_input(self, state: AgentState, check: ImageCheck) -> dict[str, Any] | None:
        """State updates: images as the scored PNGs; on a violation, what ``on_violation`` says.

        Rewritten messages keep their ids, so they replace the originals in the state: later
        turns then find the PNGs (and their cached scores) instead of the original bytes.
        """
        messages = list(state["messages"])
        verdict = check.verdict
        if verdict is None:
            return None
        unsafe = self.rule == "each" and verdict.input_unsafe
        rewrites = dict(check.rewrites)
        if unsafe and self.on_violation == "raise":
            raise GuardrailViolation(_input_message(verdict), verdict)
        if unsafe and self.on_violation == "replace":
            # The flagged images leave the conversation, so that later turns are not refused.
            rewrites.update(
                {p: {"type": "text", "text": self.replacement} for p in check.flagged()}
            )
        forwarded = replace_blocks(messages, rewrites)
        changed = [new for new, old in zip(forwarded, messages, strict=True) if new is not old]
        if self.on_violation == "flag" and self.rule == "each":
            last = forwarded[check.positions[-1][0]]
            changed = [m for m in changed if m is not last] + [_flagged(last, verdict)]
        if unsafe and self.on_violation == "replace":
            refusal = AIMessage(
                content=self.refusal, response_metadata={GUARD_VERDICT_KEY: verdict_dict(verdict)}
            )
            return {"messages": [*changed, refusal], "jump_to": "end"}
        return {"messages": changed} if changed else None

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
    """The model's answer in ``response``: its words, its tool calls, or both (else ``None``)."""
    answer = next((m for m in response.result if isinstance(m, AIMessage)), None)
    if answer is None or not (answer.text or answer.tool_calls or answer.invalid_tool_calls):
        return None
    return answer


def _judged_text(answer: AIMessage) -> str:
    """What the reward model judges: the answer's words and every call it makes (an action)."""
    return judged_text(answer.text, answer.tool_calls, answer.invalid_tool_calls)


def _input_message(verdict: Any) -> str:
    gates = [e.name for e in verdict.evaluators if e.side == "pre" and e.unsafe]
    if gates:
        return (
            f"ETAGuardMiddleware: input flagged as unsafe by {', '.join(gates)} (CLIP score "
            f"{verdict.pre_score}, threshold {verdict.pre_threshold})"
        )
    return (
        f"ETAGuardMiddleware: image flagged as unsafe (CLIP score {verdict.pre_score} >= "
        f"{verdict.pre_threshold})"
    )


def _flagged(message: BaseMessage, verdict: Any) -> BaseMessage:
    meta = {**message.response_metadata, GUARD_VERDICT_KEY: verdict_dict(verdict)}
    return message.model_copy(update={"response_metadata": meta})
