"""ETA guards around a plain chat model: ETAInputGuard | model | ETAOutputGuard.

The guards need only CLIP and the reward model, so they work around any chat model. Offline,
the "plain chat model" is LangChain's GenericFakeChatModel; pass ``--model openai:gpt-4o-mini``
(any ``init_chat_model`` id, with its package and API key) to guard a real one.

    python examples/langchain_guards.py             # tiny random checkpoints, offline
    python examples/langchain_guards.py --flag-all  # thresholds that flag everything

Real evaluators: --clip/--reward-model (or ETA_CLIP / ETA_REWARD_MODEL).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_eta import ETAInputGuard, ETAOutputGuard

from eta_guard import ETAConfig, ETAEvaluator, GuardrailViolation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default=os.environ.get("ETA_CLIP"))
    parser.add_argument("--reward-model", default=os.environ.get("ETA_REWARD_MODEL"))
    parser.add_argument("--model", help="init_chat_model id of the guarded model (default: a fake)")
    parser.add_argument(
        "--flag-all", action="store_true", help="thresholds that flag everything (demo)"
    )
    args = parser.parse_args()

    if args.clip and args.reward_model:
        clip, reward_model = args.clip, args.reward_model
    else:
        from eta_guard.testing import build_tiny_checkpoints

        ckpt = build_tiny_checkpoints(Path(tempfile.gettempdir()) / "eta-guard-tiny")
        clip, reward_model = ckpt.clip, ckpt.reward_model
    config = ETAConfig(pre_threshold=-2.0, post_threshold=1e9) if args.flag_all else ETAConfig()
    evaluator = ETAEvaluator.from_pretrained(clip=clip, reward_model=reward_model, config=config)

    if args.model:
        from langchain.chat_models import init_chat_model

        model = init_chat_model(args.model)
    else:
        model = GenericFakeChatModel(
            messages=iter([AIMessage("It is a colourful gradient. Nothing more.")] * 10)
        )

    from eta_guard.testing import image_to_data_url, make_test_image

    request = [
        HumanMessage(
            content=[
                {"type": "text", "text": "What is in this picture?"},
                {
                    "type": "image_url",
                    "image_url": {"url": image_to_data_url(make_test_image("gradient"))},
                },
            ]
        )
    ]

    # 1. replace: flagged images become a text note, a flagged answer becomes a refusal.
    chain = (
        ETAInputGuard(evaluator=evaluator, on_violation="replace")
        | model
        | ETAOutputGuard(evaluator=evaluator, on_violation="replace")
    )
    print("replace, stream:", "".join(chunk.text for chunk in chain.stream(request)))

    # 2. flag: everything passes; the verdict rides along in response_metadata.
    flagged = (model | ETAOutputGuard(evaluator=evaluator, on_violation="flag")).invoke(request)
    print(
        "flag:",
        flagged.text,
        "| output_unsafe =",
        flagged.response_metadata["eta_guard_verdict"]["output_unsafe"],
    )

    # 3. raise: a GuardrailViolation carrying the verdict.
    try:
        (ETAInputGuard(evaluator=evaluator, on_violation="raise") | model).invoke(request)
        print("raise: the image passed")
    except GuardrailViolation as err:
        print("raise:", err, "| pre_score =", err.verdict.pre_score)


if __name__ == "__main__":
    main()
