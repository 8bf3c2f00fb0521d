"""Benchmark (not a test): the model thread and the step batcher on random checkpoints.

Prints, side by side in one run on the same model and prompts (medians of ``--reps``):

1. time per token of greedy decoding called sync through the model thread, async through the
   model thread (``acall``), and the old way (``asyncio.to_thread``: a second torch thread);
   the ratios async/sync and to_thread/sync (issue 15 measured 1.46x for the old way).
2. step batcher at 1, 4 and 8 concurrent greedy rows (distinct prompts) vs the same prompts
   decoded one after another with HF ``generate``: tokens/s and the speed-up, and the model
   forwards on the critical path (a batched forward counts once).
3. the same prompts as concurrent requests through ``LocalBackend`` (the request path: a session,
   one prefill, a greedy job on the model's decode scheduler) vs one request after another
   through it: tokens/s, the speed-up and the forwards (answers checked equal).

Arms are interleaved per repetition; medians and the fastest repetitions are printed.

Random weights: cost only, never quality. Usage::

    python scripts/bench_batching.py --size bench --tokens 32 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from eta_guard.model_thread import model_thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="bench", choices=["tiny", "bench"])
    parser.add_argument("--family", default="llava")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", default="1,4,8")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-threads", action="store_true", help="only the batcher part")
    parser.add_argument("--dir", default=tempfile.gettempdir() + "/eta-bench-batching")
    args = parser.parse_args()
    args.conversations = []
    worker = model_thread("cpu")
    vlm, prompts = worker.call(_load, args)  # loading: the first torch work, on the model thread
    if not args.skip_threads:
        _thread_ratios(vlm, prompts[0], args)
    _batcher_throughput(vlm, prompts, args)
    _backend_concurrency(vlm, prompts, args)


def _load(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from eta_guard.decoding.vlm import VLMAdapter
    from eta_guard.messages import normalize_messages
    from eta_guard.testing import build_tiny_checkpoints, make_test_image

    ckpt = build_tiny_checkpoints(args.dir, vlm_family=args.family, size=args.size)
    vlm = VLMAdapter.from_pretrained(ckpt.vlm, device="cpu", dtype="float32")
    colors = ["red", "green", "blue", "noise", "gradient", "checker", "red", "green"]
    prompts = []
    for i, color in enumerate(colors):
        text = "Describe the picture" + " in more detail" * (i % 4) + "."
        content = [
            {"type": "image", "image": make_test_image(color)},
            {"type": "text", "text": text},
        ]
        conversation = normalize_messages([{"role": "user", "content": content}])
        args.conversations.append(conversation)
        prompts.append(vlm.prepare(conversation))
    return vlm, prompts


def _per_token(vlm, prepared, tokens: int) -> float:
    start = time.perf_counter()
    out = vlm.generate_greedy(prepared, max_new_tokens=tokens)
    return (time.perf_counter() - start) / max(1, len(out.token_ids))


def _thread_ratios(vlm, prepared, args) -> None:
    worker = model_thread("cpu")
    run = lambda: _per_token(vlm, prepared, args.tokens)  # noqa: E731
    worker.call(run)  # warm-up
    sync, async_, old = [], [], []
    for _ in range(args.reps):
        sync.append(worker.call(run))
        async_.append(asyncio.run(worker.acall(run)))
        old.append(asyncio.run(asyncio.to_thread(run)))
    s, a, o = (statistics.median(x) for x in (sync, async_, old))
    print(
        f"[model thread] ms/token: sync {s * 1e3:.1f}  async(acall) {a * 1e3:.1f}  "
        f"to_thread {o * 1e3:.1f}  | async/sync {a / s:.2f}x  to_thread/sync {o / s:.2f}x"
    )


def _batcher_throughput(vlm, prompts, args) -> None:
    from eta_guard.backends.step_batcher import StepBatcher

    worker = model_thread("cpu")

    def sequential(n: int) -> tuple[float, int, int]:
        start, tokens = time.perf_counter(), 0
        for prepared in prompts[:n]:
            tokens += len(vlm.generate_greedy(prepared, max_new_tokens=args.tokens).token_ids)
        return time.perf_counter() - start, tokens, tokens  # one forward per token

    def batched(n: int) -> tuple[float, int, int]:
        batcher = StepBatcher(vlm.model, eos_token_ids=vlm.eos_token_ids, max_rows=n)
        start = time.perf_counter()
        jobs = [
            batcher.submit(batcher.prefill(p.model_inputs), max_new_tokens=args.tokens)
            for p in prompts[:n]
        ]
        batcher.run(jobs)
        elapsed = time.perf_counter() - start
        # critical path: prefills run one after another, then one forward per step
        return elapsed, sum(len(j.tokens[0]) for j in jobs), batcher.forwards

    for n in [int(x) for x in args.rows.split(",")]:
        worker.call(batched, n)  # warm-up
        seq, bat = [], []
        for _ in range(args.reps):  # arms interleaved
            seq.append(worker.call(sequential, n))
            bat.append(worker.call(batched, n))
        _print("step batcher", n, seq, bat)


def _print(name: str, n: int, seq: list, bat: list) -> None:
    seq_s, bat_s = (statistics.median(t for t, _, _ in x) for x in (seq, bat))
    seq_best, bat_best = (min(t for t, _, _ in x) for x in (seq, bat))
    seq_tok, bat_tok = seq[0][1], bat[0][1]
    print(
        f"[{name}] rows={n}: sequential {seq_tok / seq_s:.1f} tok/s, "
        f"batched {bat_tok / bat_s:.1f} tok/s (median {(bat_tok / bat_s) / (seq_tok / seq_s):.2f}x, "
        f"fastest {(bat_tok / bat_best) / (seq_tok / seq_best):.2f}x); "
        f"forwards: sequential {seq[0][2]}, batched {bat[0][2]}"
    )


def _backend_concurrency(vlm, prompts, args) -> None:
    """Concurrent requests through LocalBackend vs one after another through it."""
    from eta_guard.backends.local import LocalBackend
    from eta_guard.decoding.protocol import Completion

    backend = LocalBackend(vlm)
    batcher = backend.scheduler.batcher
    conversations = args.conversations

    async def answer(conversation) -> list[int]:
        session = await backend.session(conversation)
        try:
            async for item in session.greedy(max_tokens=args.tokens):
                if isinstance(item, Completion):
                    return list(item.token_ids or ())
        finally:
            await session.aclose()
        return []

    def run(n: int, together: bool) -> tuple[float, int, int, list]:
        async def go():
            if together:
                return await asyncio.gather(*(answer(c) for c in conversations[:n]))
            return [await answer(c) for c in conversations[:n]]

        before, start = batcher.forwards, time.perf_counter()
        answers = asyncio.run(go())
        elapsed = time.perf_counter() - start
        return elapsed, sum(len(a) for a in answers), batcher.forwards - before, answers

    for n in [int(x) for x in args.rows.split(",")]:
        run(n, True)  # warm-up
        seq, bat = [], []
        for _ in range(args.reps):  # arms interleaved
            seq.append(run(n, False))
            bat.append(run(n, True))
        assert all(b[3] == seq[0][3] for b in bat), "batched answers differ from sequential ones"
        _print("LocalBackend requests", n, [x[:3] for x in seq], [x[:3] for x in bat])


if __name__ == "__main__":
    main()
