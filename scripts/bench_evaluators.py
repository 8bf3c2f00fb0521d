"""Latency of one check per evaluator, on random replicas (CPU): the table of docs/evaluators.md.

Each evaluator is built from its spec the way ETA builds it (``build_guards``), warmed up once,
then timed on one request (one 336x336 image where it reads images, one short question, one
short answer for judges): median of ``--runs`` runs. The load average (``os.getloadavg``) is
printed before and after: on a shared machine, say so next to the numbers. Random weights: the
times are of the mechanics (prompt length, decode steps), not of real checkpoints' quality.

    python scripts/bench_evaluators.py --runs 7 --out /tmp/eta-bench-evaluators
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "eta-bench-ev")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from eta_guard.evaluators.base import GuardRequest, user_messages
    from eta_guard.evaluators.clip import CLIPPreEvaluator
    from eta_guard.evaluators.specs import build_guards
    from eta_guard.replicas.clip import build_clip_replica
    from eta_guard.replicas.llama_guard_vision import build_llama_guard_vision_replica
    from eta_guard.replicas.shieldgemma2 import build_shieldgemma2_replica
    from eta_guard.replicas.text_guards import (
        build_llama_guard_3_text_replica,
        build_qwen3guard_replica,
    )
    from eta_guard.testing import build_tiny_checkpoints, make_test_image

    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tiny = build_tiny_checkpoints(out / "tiny")
    paths = {
        "clip336": out / "clip336",
        "lg3v": out / "lg3v",
        "sg2": out / "sg2",
        "lg3t": out / "lg3t",
        "q3g": out / "q3g",
    }
    builders = {
        "clip336": build_clip_replica,
        "lg3v": build_llama_guard_vision_replica,
        "sg2": build_shieldgemma2_replica,
        "lg3t": build_llama_guard_3_text_replica,
        "q3g": build_qwen3guard_replica,
    }
    for key, path in paths.items():
        if not (path / "config.json").exists():
            builders[key](path)

    image = make_test_image(size=(336, 336))
    question = "I want to go to a new world from here, give me some encouragement."
    answer = "You can do it! Take the step and fly."
    with_image = GuardRequest(user_messages(question, 1), [image])
    text_only = GuardRequest(user_messages(question, 0))
    judged = GuardRequest(user_messages(question, 1), [image], answer)
    judged_text = GuardRequest(user_messages(question, 0), response=answer)

    clip_tiny = CLIPPreEvaluator.from_pretrained(tiny.clip, device="cpu")
    clip_336 = CLIPPreEvaluator.from_pretrained(str(paths["clip336"]), device="cpu")

    def gate(spec: str, clip=None):
        return build_guards([spec], clip=clip, device="cpu")[0][0]

    def judge(spec: str):
        return build_guards((), [spec], device="cpu")[1][0]

    rows = [
        ("CLIP (tiny testing checkpoint)", lambda: clip_tiny.score_images([image])),
        (
            "CLIP (ViT-L/14-336 replica: real input size, tiny widths)",
            lambda: clip_336.score_images([image]),
        ),
        (
            "patch-clip?grid=3 (10 views), ViT-L/14-336 replica",
            _check(gate("patch-clip?grid=3", clip_336), with_image),
        ),
        (
            "llama-guard-vision (3 Vision replica), gate: image + question",
            _check(gate(f"llama-guard-vision:{paths['lg3v']}"), with_image),
        ),
        (
            "llama-guard-vision, judge: image + question + answer",
            _check(judge(f"llama-guard-vision:{paths['lg3v']}"), judged),
        ),
        (
            "shieldgemma2?policies=dangerous (replica), 1 policy",
            _check(gate(f"shieldgemma2:{paths['sg2']}?policies=dangerous"), with_image),
        ),
        (
            "shieldgemma2 (replica), 3 policies",
            _check(gate(f"shieldgemma2:{paths['sg2']}"), with_image),
        ),
        (
            "llama-guard-text (3 8B replica), gate: text-only question",
            _check(gate(f"llama-guard-text:{paths['lg3t']}"), text_only),
        ),
        (
            "llama-guard-text, judge: question + answer",
            _check(judge(f"llama-guard-text:{paths['lg3t']}"), judged_text),
        ),
        (
            "qwen3guard (Gen 0.6B replica), gate: text-only question",
            _check(gate(f"qwen3guard:{paths['q3g']}"), text_only),
        ),
        (
            "qwen3guard, judge: question + answer",
            _check(judge(f"qwen3guard:{paths['q3g']}"), judged_text),
        ),
    ]
    load_before = os.getloadavg()
    results = []
    for name, fn in rows:
        fn()  # warm-up (first-call allocations, template compilation)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results.append((name, statistics.median(times)))
    load_after = os.getloadavg()
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        f"(1 min); torch threads {args.threads}; median of {args.runs} runs"
    )
    print("| evaluator | one check (median) |\n|---|---|")
    for name, seconds in results:
        print(f"| {name} | {seconds * 1000:.1f} ms |")


def _check(evaluator, request):
    return lambda: evaluator.check([request])


if __name__ == "__main__":
    main()
