"""The rich tables the commands print (verdicts, search traces, memory estimates, benchmarks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eta_guard.verdict import SafetyVerdict


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def verdict_table(verdict: SafetyVerdict, *, aligned: bool | None = None) -> Any:
    from rich.table import Table

    def flag(value: bool | None, side: str) -> str:
        if side in verdict.errors:
            return f"error: {verdict.errors[side]}"
        if value is None:
            return f"skipped: {verdict.skipped.get(side, 'not evaluated')}"
        return "UNSAFE" if value else "safe"

    table = Table(title="ETA verdict", title_justify="left")
    table.add_column("check")
    table.add_column("score", justify="right")
    table.add_column("rule")
    table.add_column("result")
    table.add_row(
        "image (CLIP)",
        fmt(verdict.pre_score),
        f"unsafe iff >= {verdict.pre_threshold:g}",
        flag(verdict.input_unsafe, "pre"),
    )
    table.add_row(
        "response (RM)",
        fmt(verdict.post_score),
        f"unsafe iff <= {verdict.post_threshold:g}",
        flag(verdict.output_unsafe, "post"),
    )
    decision = "UNSAFE" if verdict.unsafe else "safe"
    if aligned is not None:
        decision += " -> aligned answer" if aligned else " -> answer returned as decoded"
    table.add_row("decision", "", "AND of the checks that ran", decision)
    return table


def trace_table(trace: list[Any]) -> Any:
    from rich.table import Table

    table = Table(title="best-of-N search (* = kept)", title_justify="left")
    for name in ("sentence", "candidate", "reward", "clip", "score", "text"):
        table.add_column(name, justify="left" if name == "text" else "right")
    for step in trace:
        for i, cand in enumerate(step.candidates):
            mark = "*" if i == step.chosen else ""
            table.add_row(
                str(step.index),
                f"{i}{mark}",
                fmt(cand.reward),
                fmt(cand.clip),
                fmt(cand.score),
                repr(cand.text),
            )
    return table


def estimate_table(estimate: Any) -> Any:
    from rich.markup import escape
    from rich.table import Table

    from eta_guard.memory import format_bytes

    table = Table(title="memory estimate (before loading; weights + VLM KV cache)")
    table.add_column("model (checkpoint)", overflow="fold", min_width=14)
    for column in ("parameters", "precision", "weights", "KV cache", "device"):
        table.add_column(column, no_wrap=column != "precision")
    for m in estimate.models:
        table.add_row(
            f"{m.role}\n[dim]{escape(m.name)}[/]",
            f"{m.parameters:,}",
            m.precision,
            format_bytes(m.weight_bytes),
            format_bytes(m.kv_cache_bytes) if m.kv_cache_bytes else "-",
            m.device or "default",
        )
    per_device = ", ".join(f"{d}: {format_bytes(b)}" for d, b in estimate.per_device().items())
    table.caption = (
        f"total {format_bytes(estimate.total_bytes)} ({per_device}); not included: activations, "
        "CUDA context (~0.5 GiB per device), fragmentation"
    )
    return table


def bench_table(report: Any) -> Any:
    from rich.table import Table

    setup = report.setup
    params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in setup["parameters"].items())
    table = Table(
        title=(
            f"eta-guard bench: {setup['size']} checkpoints ({params}); {setup['device']} "
            f"({setup['cpu']}, {setup['cpu_count']} cores, torch threads "
            f"{setup['torch_threads']}); max {setup['max_new_tokens']} new tokens, "
            f"N={setup['num_candidates']}; medians of {setup['reps']}"
        ),
        title_justify="left",
    )
    for name in ("path (ETA arm vs baseline arm)", "ETA s", "base s", "tokens", "figure", "target"):
        table.add_column(name, justify="left" if name[0] in "pft" else "right")
    rows = {
        "safe": ("safe_path_ratio", f"{report.safe_path_ratio:.2f}x", "<= 1.10x"),
        "aligned": (
            "batched_speedup",
            f"{report.batched_speedup:.2f}x per token ({report.batched_speedup_raw:.2f}x raw)",
            ">= 3x",
        ),
        "unsafe": ("unsafe_path_ratio", f"{report.unsafe_path_ratio:.2f}x", "<= 2.6x"),
        "unsafe_sequential": (
            "unsafe_sequential_ratio",
            f"{report.unsafe_sequential_ratio or 0:.2f}x",
            "-",
        ),
        "cleared": (
            "cleared_speculation_ratio",
            f"{report.cleared_speculation_ratio or 0:.2f}x",
            "-",
        ),
    }
    comparisons = (report.safe, report.aligned, report.unsafe, report.unsafe_sequential)
    for comp in (*comparisons, report.cleared):
        if comp is None:
            continue
        name, value, target = rows[comp.name]
        table.add_row(
            f"{comp.name}: {comp.eta_label} vs {comp.baseline_label}",
            f"{comp.eta_s:.2f}",
            f"{comp.baseline_s:.2f}",
            f"{comp.eta_tokens:g} / {comp.baseline_tokens:g}",
            f"{name} = {value}",
            target,
        )
    best = ", ".join(f"{k} {v:.2f}x" for k, v in report.best_figures.items())
    notes = [
        *report.notes,
        f"From each arm's fastest repetition instead: {best}.",
        f"Safe-path answer identical to plain generate's: {report.same_tokens}.",
    ]
    forwards = report.forwards or {}
    if "plain" in forwards:
        arms = [
            f"{arm.split('_')[1]} {forwards[arm]['critical_path']} "
            f"({forwards[arm]['critical_path_ratio']:.2f}x; {forwards[arm]['vlm']} VLM forwards)"
            for arm in ("unsafe_speculative", "unsafe_sequential")
            if arm in forwards
        ]
        notes.append(
            f"Forwards on the critical path: plain generate {forwards['plain']['critical_path']}; "
            f"unsafe path {', '.join(arms)}."
        )
    table.caption = "\n".join(f"- {note}" for note in notes)
    table.caption_justify = "left"
    return table
