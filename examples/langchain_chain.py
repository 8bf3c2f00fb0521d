"""LCEL chain with an image: prompt | ETAChatModel | StrOutputParser.

Runs offline on tiny random checkpoints (mechanics only: their answers are gibberish):

    python examples/langchain_chain.py

Real models (from the local Hugging Face cache):

    python examples/langchain_chain.py --vlm llava-hf/llava-1.5-7b-hf \
        --clip openai/clip-vit-large-patch14-336 --reward-model RLHFlow/ArmoRM-Llama3-8B-v0.1 \
        --image photo.jpg

(or set ETA_VLM / ETA_CLIP / ETA_REWARD_MODEL). ``--flag-all`` forces ETA's alignment by
setting thresholds that flag everything, to show the aligned path.
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
from pathlib import Path

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_eta import ETAChatModel


def model_ids(args: argparse.Namespace) -> dict[str, str]:
    """The three model ids: the flags, else the env vars, else freshly built tiny checkpoints."""
    if args.vlm:
        return {"vlm": args.vlm, "clip": args.clip, "reward_model": args.reward_model}
    from eta_guard.testing import build_tiny_checkpoints

    ckpt = build_tiny_checkpoints(Path(tempfile.gettempdir()) / "eta-guard-tiny")
    return {"vlm": ckpt.vlm, "clip": ckpt.clip, "reward_model": ckpt.reward_model}


def image_b64(path: str | None) -> str:
    if path:
        return base64.b64encode(Path(path).read_bytes()).decode()
    from eta_guard.testing import image_to_bytes, make_test_image

    return base64.b64encode(image_to_bytes(make_test_image("gradient"))).decode()


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
    parser.add_argument("--image", help="image file (default: a generated test picture)")
    parser.add_argument("--question", default="What is in this picture?")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--flag-all", action="store_true", help="force alignment (demo)")
    args = parser.parse_args()

    llm = ETAChatModel(**model_ids(args), max_tokens=args.max_tokens, num_candidates=3, seed=0)
    if args.flag_all:
        llm = llm.bind(pre_threshold=-2.0, post_threshold=1e9)

    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You are a helpful assistant that describes pictures."),
            (
                "human",
                [
                    {"type": "text", "text": "{question}"},
                    {"type": "image", "base64": "{image}", "mime_type": "image/png"},
                ],
            ),
        ]
    )
    inputs = {"question": args.question, "image": image_b64(args.image)}

    chain = prompt | llm | StrOutputParser()
    print("stream:", end=" ", flush=True)
    for text in chain.stream(inputs):
        print(text, end="", flush=True)
    print()

    message = (prompt | llm).invoke(inputs)  # the AIMessage, to read ETA's verdict
    verdict = message.response_metadata["eta_verdict"]
    print("aligned:", message.response_metadata["eta_aligned"])
    print(
        "CLIP score:",
        verdict["pre_score"],
        "reward:",
        verdict["post_score"],
        "unsafe:",
        verdict["unsafe"],
    )
    print("usage:", message.usage_metadata)


if __name__ == "__main__":
    main()
