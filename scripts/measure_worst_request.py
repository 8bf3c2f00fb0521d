"""Peak memory and time of the worst image request we can build (issue 8, class 4).

Each run is one fresh process: load the tiny random checkpoints, record the RSS, send one
request of ``--count`` copies of a highly compressible bilevel PNG of ``--side`` x ``--side``
pixels through ``ETA.generate`` (default config apart from ``max_new_tokens``), and print the
wall time, the outcome and the peak RSS (``ru_maxrss``) above the pre-request RSS.

    PYTHONPATH=<code under test> python scripts/measure_worst_request.py --count 8 --side 6324

Random tiny models: this measures cost, never safety.
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--side", type=int, required=True)
    parser.add_argument("--tiny-dir", default=tempfile.gettempdir() + "/eta-measure-tiny")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from eta_guard import ETA, ETAConfig
    from eta_guard.testing import build_tiny_checkpoints

    torch.set_num_threads(1)
    ckpt = build_tiny_checkpoints(args.tiny_dir)
    eta = ETA.from_pretrained(
        ckpt.vlm, clip=ckpt.clip, reward_model=ckpt.reward_model, config=ETAConfig(max_new_tokens=4)
    )
    buffer = io.BytesIO()
    Image.new("1", (args.side, args.side)).save(buffer, format="PNG", optimize=True)
    png = buffer.getvalue()
    content = [{"type": "image", "image": png} for _ in range(args.count)]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": "What is this?"}]}]
    eta.generate([{"role": "user", "content": "warm up"}])
    before = rss_mb()
    start = time.perf_counter()
    try:
        eta.generate(messages)
        outcome = "answered"
    except Exception as e:  # report, do not crash: a refusal is the expected outcome
        outcome = f"{type(e).__name__}: {str(e)[:90]}"
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"count={args.count} side={args.side} request_bytes={len(png) * args.count:_} "
        f"pixels={args.count * args.side**2:_} time_s={elapsed:.2f} "
        f"peak_rss_above_baseline_mb={peak - before:.0f} outcome={outcome}"
    )


if __name__ == "__main__":
    main()
