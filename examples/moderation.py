"""Standalone moderation with ETAEvaluator: an input filter (images) and an output filter (text).

No VLM is involved: CLIP screens images before they reach any model, and the reward model screens
any model's answers, each on its own or together under ETA's AND rule.

    python examples/moderation.py                 # offline, random tiny checkpoints
    python examples/moderation.py --clip openai/clip-vit-large-patch14-336 \\
        --reward-model RLHFlow/ArmoRM-Llama3-8B-v0.1   # the reference models

The tiny checkpoints are RANDOM: their scores mean nothing. So that both outcomes show, this
script then sets each threshold to the median of the scores it sees, and says so. With the
reference checkpoints it keeps the paper's thresholds; for other real models, calibrate them with
``eta_guard.calibration``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from eta_guard import ETAConfig, ETAEvaluator
from eta_guard.testing import make_test_image

IMAGES = {kind: make_test_image(kind, (96, 96)) for kind in ("red", "noise", "checker", "gradient")}
RESPONSES = [
    "I can't help with that, but here is some safety advice.",
    "Sure, here is how to do it step by step.",
    "The picture shows a red square.",
    "Yes.",
]


def input_filter(evaluator: ETAEvaluator, images: dict) -> dict[str, bool]:
    """Which images may go on to the model (the pre-generation check, one batched CLIP pass)."""
    verdicts = evaluator.evaluate_batch([{"images": [image]} for image in images.values()])
    for name, verdict in zip(images, verdicts, strict=True):
        status = "BLOCK" if verdict.input_unsafe else "pass "
        print(f"  {status} image {name:<9} CLIP cosine {verdict.pre_score:+.4f}")
    return {name: not v.input_unsafe for name, v in zip(images, verdicts, strict=True)}


def output_filter(evaluator: ETAEvaluator, responses: list[str]) -> list[bool]:
    """Which responses may be shown (the post-generation check, one batched RM pass)."""
    verdicts = evaluator.evaluate_batch([{"response": text} for text in responses])
    for text, verdict in zip(responses, verdicts, strict=True):
        status = "BLOCK" if verdict.output_unsafe else "pass "
        print(f"  {status} reward {verdict.post_score:+.4f}  {text!r}")
    return [not v.output_unsafe for v in verdicts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", help="CLIP checkpoint (default: random tiny one)")
    parser.add_argument("--reward-model", help="reward model (default: random tiny one)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow checkpoint code (ArmoRM no longer needs it)",
    )
    args = parser.parse_args()

    tiny = not (args.clip and args.reward_model)
    if tiny:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from eta_guard.testing import build_tiny_checkpoints

        ckpt = build_tiny_checkpoints(Path(tempfile.gettempdir()) / "eta-guard-examples")
        clip, reward_model = ckpt.clip, ckpt.reward_model
        print("NOTE: RANDOM tiny checkpoints: the verdicts show the mechanics, not safety.")
    else:
        clip, reward_model = args.clip, args.reward_model
    evaluator = ETAEvaluator.from_pretrained(
        clip=clip, reward_model=reward_model, trust_remote_code=args.trust_remote_code
    )

    if tiny:  # random scores: put each threshold in the middle so that both outcomes show
        pre = statistics.median(evaluator.score_images(list(IMAGES.values())))
        post = statistics.median(evaluator.score_responses(RESPONSES))
        evaluator = evaluator.with_config(ETAConfig(pre_threshold=pre, post_threshold=post))
        print(f"(thresholds set to the median scores: pre {pre:+.4f}, post {post:+.4f})")

    print("\nInput filter (CLIP vs the unsafe-content prompt; unsafe iff cosine >= pre_threshold):")
    allowed = input_filter(evaluator, IMAGES)
    print(
        "\nOutput filter (reward model in ETA's safety format; unsafe iff reward <= post_threshold):"
    )
    shown = output_filter(evaluator, RESPONSES)

    print("\nETA's rule on one exchange (unsafe only if the image AND the response are):")
    verdict = evaluator.evaluate(images=[IMAGES["noise"]], response=RESPONSES[1])
    print(
        f"  image unsafe={verdict.input_unsafe}, response unsafe={verdict.output_unsafe} "
        f"-> unsafe={verdict.unsafe}"
    )
    print(
        f"\n{sum(allowed.values())}/{len(allowed)} images passed, "
        f"{sum(shown)}/{len(shown)} responses passed."
    )


if __name__ == "__main__":
    main()
