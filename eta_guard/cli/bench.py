"""``eta-guard bench``: ETA's costs side by side on random checkpoints (its own models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from eta_guard.cli.console import consoles, friendly_errors, quiet_transformers
from eta_guard.cli.options import CacheOpt, DeviceOpt
from eta_guard.cli.tables import bench_table
from eta_guard.errors import InvalidInputError


def bench(
    size: Annotated[
        str, typer.Option("--size", help="Checkpoint size: bench (~100M VLM) or tiny.")
    ] = "bench",
    tokens: Annotated[
        int, typer.Option("--tokens", min=1, help="Answer budget (max_new_tokens).")
    ] = 128,
    reps: Annotated[int, typer.Option("--reps", min=1, help="Measured repetitions.")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Warm-up repetitions.")] = 1,
    candidates: Annotated[int, typer.Option("--candidates", min=1, help="N of best-of-N.")] = 5,
    sentence_tokens: Annotated[
        int, typer.Option("--sentence-tokens", min=1, help="Longest candidate sentence.")
    ] = 32,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Sampling seed (repetition r uses seed + r).")
    ] = 0,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="CPU threads for torch [default: torch's]."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write every figure to this JSON file.")
    ] = None,
) -> None:
    """Measure ETA's costs side by side on random checkpoints and print a table."""
    out, err = consoles()
    with friendly_errors():
        if size not in ("bench", "tiny"):
            raise InvalidInputError(f"--size must be 'bench' or 'tiny'; got {size!r}")
        quiet_transformers()
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from eta_guard.bench import run_benchmark

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task("starting", total=None)

            def progress(done: int, total: int, label: str) -> None:
                bar.update(task, completed=done, total=total, description=label)

            report = run_benchmark(
                size=size,  # type: ignore[arg-type]
                max_new_tokens=tokens,
                reps=reps,
                warmup=warmup,
                num_candidates=candidates,
                max_sentence_tokens=sentence_tokens,
                seed=seed,
                cache_dir=cache_dir,
                device=device,
                threads=threads,
                progress=progress,
            )
        out.print(bench_table(report))
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report.to_dict(), indent=2))
            out.print(f"figures written to {json_path}", highlight=False)
