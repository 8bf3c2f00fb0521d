"""An agent with ETA guardrails: create_agent(..., middleware=[ETAGuardMiddleware(...)]).

The middleware judges the user's images (CLIP) and the model's answer (reward model); a
blocked turn ends with a refusal. With ``rule="eta"`` (used here) it blocks only when both are
unsafe, as ETA does; with ``rule="each"`` the image check runs before the model and blocks on
its own, and so does the answer check after it. It works around any chat model;
here the model is ETAChatModel and both share one set of loaded evaluators. The agent is
streamed: the model's tokens are held back until its answer is checked, so a blocked answer
never shows.

    python examples/langchain_agent.py               # tiny random checkpoints, offline
    python examples/langchain_agent.py --flag-all    # thresholds that flag everything: see a refusal
    python examples/langchain_agent.py --rule each   # block on either check alone

Real models: --vlm/--clip/--reward-model (or ETA_VLM / ETA_CLIP / ETA_REWARD_MODEL).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from langchain.agents import create_agent
from langchain_core.messages import HumanMessage

sys.path.insert(0, str(Path(__file__).parent))
from langchain_chain import image_b64, model_ids  # noqa: E402
from langchain_eta import ETAChatModel, ETAGuardMiddleware  # noqa: E402

from eta_guard import ETAConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlm", default=os.environ.get("ETA_VLM"))
    parser.add_argument(
        "--clip", default=os.environ.get("ETA_CLIP", "openai/clip-vit-large-patch14-336")
    )
    parser.add_argument(
        "--reward-model",
        default=os.environ.get("ETA_REWARD_MODEL", "RLHFlow/ArmoRM-Llama3-8B-v0.1"),
    )
    parser.add_argument("--image")
    parser.add_argument("--on-violation", choices=["raise", "replace", "flag"], default="replace")
    parser.add_argument(
        "--rule",
        choices=["eta", "each"],
        default="eta",
        help="eta: block when image AND answer are unsafe; each: block on either check",
    )
    parser.add_argument(
        "--flag-all", action="store_true", help="thresholds that flag everything (demo)"
    )
    args = parser.parse_args()

    llm = ETAChatModel(**model_ids(args), max_tokens=24, num_candidates=3, seed=0)
    evaluator = llm.load().evaluator  # share the loaded CLIP and reward model with the guard
    if args.flag_all:
        evaluator = evaluator.with_config(ETAConfig(pre_threshold=-2.0, post_threshold=1e9))
    guard = ETAGuardMiddleware(evaluator, on_violation=args.on_violation, rule=args.rule)

    agent = create_agent(
        model=llm, tools=[], middleware=[guard], system_prompt="You describe pictures."
    )
    request = HumanMessage(
        content=[
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image", "base64": image_b64(args.image), "mime_type": "image/png"},
        ]
    )
    # Streamed as a chat UI would show it: the answer arrives once the guard has checked it
    # (the model's tokens are held back until then), as the answer or as the refusal.
    final = None
    for mode, part in agent.stream({"messages": [request]}, stream_mode=["messages", "values"]):
        if mode == "messages":
            message, metadata = part
            print(f"streamed from {metadata['langgraph_node']!r}: {message.text!r}")
        else:
            final = part
    assert final is not None
    for message in final["messages"]:
        print(f"[{message.type}] {message.text!r}")
        for key in ("eta_verdict", "eta_guard_verdict"):  # the model's own; the guard's
            verdict = message.response_metadata.get(key)
            if verdict:
                print(
                    f"    {key}: unsafe={verdict['unsafe']} pre={verdict['pre_score']} "
                    f"post={verdict['post_score']}"
                )


if __name__ == "__main__":
    main()
