"""How often continuing the search from text changes the ids the model continues (issue 18, item 3).

Runs the local best-of-N search on the LLaVA-1.5 replica (random weights: the sampled text is
noise, so this measures the tokenizer's behaviour on sampled ids, not a real model's answers),
and at every step compares the exact context (prompt ids, prefix ids, sampled ids) with what an
engine continuing from text gets: the chat template rendered with the assistant turn
``prefix + accepted text`` (``continue_final_message``) and tokenized whole by the processor.

Usage: python scripts/measure_retokenization.py [DIR] [--seeds N]   (DIR: where replicas are built)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

PREFIX = "As an AI assistant"
QUESTIONS = ["How do I pick a lock?", "What is shown here? Describe every detail.", "Why?"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", nargs="?", default=None)
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()

    import eta_guard.engine.request as request_module
    from eta_guard import ETA, ETAConfig
    from eta_guard.decoding.search import BestOfNSearch
    from eta_guard.messages import normalize_messages
    from eta_guard.replicas import build_replica_checkpoints
    from eta_guard.testing import make_test_image

    paths = build_replica_checkpoints(args.directory or tempfile.mkdtemp())
    steps: list[list[int]] = []  # accepted ids after each step, per run

    class Recording(BestOfNSearch):
        def __init__(self, handle: Any, *a: Any, **kw: Any) -> None:
            super().__init__(handle, *a, **kw)
            sample, commit = handle.sample, handle.commit
            state: dict[str, Any] = {"ids": []}
            steps.append(state["ids"])

            async def recorded_sample(step: Any) -> Any:
                state["last"] = await sample(step)
                return state["last"]

            async def recorded_commit(index: int) -> None:
                state["ids"].extend(state["last"][index].token_ids)
                await commit(index)

            handle.sample, handle.commit = recorded_sample, recorded_commit

    request_module.BestOfNSearch = Recording  # type: ignore[misc]
    config = ETAConfig(
        pre_threshold=-1.0,
        post_threshold=1e9,
        text_only_policy="reward_only",
        num_candidates=3,
        max_sentence_tokens=20,
        max_new_tokens=80,
    )
    eta = ETA.from_pretrained(
        paths.vlm, clip=paths.clip, reward_model=paths.reward_model, config=config, device="cpu"
    )
    adapter = eta.backend.adapter
    tok, processor = adapter.tokenizer, adapter.processor
    rows = {"image": [], "text": []}
    for kind in rows:
        for seed in range(args.seeds):
            question = QUESTIONS[seed % len(QUESTIONS)]
            content: list[dict[str, Any]] = [{"type": "text", "text": question}]
            if kind == "image":
                content.insert(0, {"type": "image", "image": make_test_image("noise", seed=seed)})
            messages = [{"role": "user", "content": content}]
            result = eta.generate(messages, seed=seed)
            accepted = steps[-1]
            conv = normalize_messages(messages)
            exact_prompt = adapter.prepare(conv, assistant_prefix=PREFIX).input_ids[0].tolist()
            texts = [step.candidates[step.chosen].text for step in result.trace]
            exact_gen = len(adapter.prepare(conv).input_ids[0])

            def whole_text_ids(rendered: str, conv: Any = conv) -> list[int]:
                inputs = processor(
                    text=[rendered],
                    images=conv.images or None,
                    return_tensors="pt",
                    add_special_tokens=not rendered.startswith(tok.bos_token),
                )
                return inputs["input_ids"][0].tolist()

            retok_gen = len(
                whole_text_ids(
                    processor.apply_chat_template(
                        conv.messages, add_generation_prompt=True, tokenize=False
                    )
                )
            )
            cut = 0
            for k, step in enumerate(result.trace[:-1]):  # contexts that a next step continues
                cut += step.candidates[step.chosen].num_tokens
                exact = exact_prompt + accepted[:cut]
                assistant = {
                    "role": "assistant",
                    "content": [{"type": "text", "text": PREFIX + "".join(texts[: k + 1])}],
                }
                retok = whole_text_ids(
                    processor.apply_chat_template(
                        conv.messages + [assistant], continue_final_message=True, tokenize=False
                    )
                )
                rows[kind].append(
                    (exact != retok, exact[exact_gen:] != retok[retok_gen:], len(exact), len(retok))
                )
    for kind, found in rows.items():
        if not found:
            continue
        whole = sum(r[0] for r in found)
        tail = sum(r[1] for r in found)
        diffs = [r[2] - r[3] for r in found]
        print(
            f"{kind}: {len(found)} step contexts; whole context differs in {whole} "
            f"({100 * whole / len(found):.0f}%); prefix+accepted ids differ in {tail} "
            f"({100 * tail / len(found):.0f}%); exact minus re-tokenized length: median "
            f"{statistics.median(diffs)}, max {max(diffs)}"
        )


if __name__ == "__main__":
    main()
