"""``eta-guard eval``: a VLM with and without ETA over a safety benchmark; results and a report.

Only typer and the standard library load at import time: ``eta-guard --help`` stays fast and
``import eta_guard.cli`` pulls in neither matplotlib nor scikit-learn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from eta_guard.cli.console import RANDOM_MODELS_LINE, consoles, friendly_errors
from eta_guard.cli.inputs import load_config
from eta_guard.cli.models import load_eta
from eta_guard.cli.options import ConfigOpt, ModelOptions, SetOpt, model_options
from eta_guard.errors import InvalidInputError


@model_options(guards="all")
def eval_command(
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            help="figstep | mm-safetybench | spa-vl | vlguard | siuo | mssbench | vlsbench | holisafe | jsonl.",
        ),
    ] = None,
    path: Annotated[
        Path | None,
        typer.Option("--path", help="Where the benchmark was downloaded (folder or file)."),
    ] = None,
    subset: Annotated[
        str | None,
        typer.Option(
            "--subset",
            help="figstep: SafeBench|SafeBench-Tiny; mm-safetybench: SD|TYPO|SD_TYPO|all; vlguard: unsafes|safe_unsafes|safe_safes|all; spa-vl: harm|help; siuo: gen|mcqa; mssbench: chat|embodied|all; vlsbench: a category; holisafe: SSS|SSU|USU|UUU|SUU; jsonl: a category.",
        ),
    ] = None,
    judge: Annotated[
        list[str] | None,
        typer.Option(
            "--judge",
            help="Repeatable: refusal | choice | reward | llama-guard:PATH | llama-guard-vision:PATH | md-judge:PATH | openai:MODEL@BASE_URL [default: refusal, reward].",
        ),
    ] = None,
    judge_template: Annotated[
        Path | None,
        typer.Option(
            "--judge-template",
            help="Prompt file with {question} and {response} (and optionally {safety_warning}) for md-judge / openai judges.",
        ),
    ] = None,
    judge_api_key_env: Annotated[
        str,
        typer.Option(
            "--judge-api-key-env", help="Environment variable holding the openai judge's API key."
        ),
    ] = "OPENAI_API_KEY",
    compare_gates: Annotated[
        list[str] | None,
        typer.Option(
            "--compare-gates",
            help="Repeatable, two or more: one gate choice each, MEMBER[|MEMBER...] with MEMBER 'clip', a gate of this run or an evaluator spec (e.g. --compare-gates clip --compare-gates 'clip|patch-clip?grid=3'). Vanilla answers are decoded once and shared; the first choice is the record's ETA arm.",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for results.jsonl and the report.")
    ] = Path("eta-eval"),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a stopped run in --out (same options).")
    ] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Only the first N items of the benchmark.")
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Run seed: sampling seeds per item and bootstrap.")
    ] = 0,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard", help="I/N: this process answers every N-th item from the I-th (1-based)."
        ),
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            min=1,
            max=1024,
            help="Items answered at once (a local VLM shares its decoding steps among them, an "
            "engine batches their requests). The results do not depend on it; --resume may use "
            "another value.",
        ),
    ] = 1,
    merge: Annotated[
        list[Path] | None,
        typer.Option(
            "--merge", help="Report only: merge these results files (e.g. shards) into --out."
        ),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=100, help="Bootstrap resamples for the intervals.")
    ] = 1000,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    *,
    models: ModelOptions,
) -> None:
    """Run a VLM with and without ETA over a safety benchmark; write results and a report."""
    out_console, err = consoles()
    with friendly_errors():
        if merge:
            if dataset or path is not None:
                raise InvalidInputError(
                    "--merge writes a report from existing results: drop --dataset/--path"
                )
            _report(out_console, err, merge, out, bootstrap)
            return
        _run(out_console, err, locals())


def _run(out_console: Any, err: Any, opts: dict[str, Any]) -> None:
    from eta_guard.eval.datasets import load_dataset
    from eta_guard.eval.judges import build_judge
    from eta_guard.eval.results import results_name
    from eta_guard.eval.runner import parse_shard, run_eval, select_items

    if not opts["dataset"] or opts["path"] is None:
        raise InvalidInputError("pass --dataset NAME and --path WHERE (or --merge FILES to report)")
    shard = parse_shard(opts["shard"])
    cfg = load_config(opts["config"], opts["set_"])
    judges_spec = opts["judge"] or ["refusal", "reward"]
    if len(set(judges_spec)) != len(judges_spec):
        raise InvalidInputError(f"--judge names a judge twice: {judges_spec}")
    template = None
    if opts["judge_template"] is not None:
        try:
            template = opts["judge_template"].read_text(encoding="utf-8")
        except OSError as e:
            raise InvalidInputError(f"--judge-template {str(opts['judge_template'])!r}: {e}") from e
    # The dataset is read before any model loads: a bad file fails in a second, not after minutes.
    items = select_items(
        load_dataset(opts["dataset"], opts["path"], opts["subset"]),
        limit=opts["limit"],
        shard=shard,
    )
    # Devices stay out of the settings: shards on other GPUs or machines must still merge.
    models: ModelOptions = opts["models"]
    dtypes = ("dtype", "vlm_dtype", "clip_dtype", "reward_model_dtype")
    settings = {
        "dataset": opts["dataset"],
        "path": str(Path(opts["path"]).resolve()),
        "subset": opts["subset"],
        "vlm": "tiny" if models.tiny else models.vlm,
        "clip": "tiny" if models.tiny else models.clip,
        "reward_model": "tiny" if models.tiny else models.reward_model,
        "engines": {
            k: getattr(models, k)
            for k in ("generator_url", "generator_model", "clip_url", "reward_model_url")
            if getattr(models, k) is not None
        },
        "judges": judges_spec,
        # ETA's own extra evaluators (they decide alignment; --judge scores the report)
        "gates": list(models.gate or []),
        "post_judges": list(models.post_judge or []),
        "decision_rule": models.decision_rule,
        "text_only_policy": models.text_only_policy,
        "seed": opts["seed"],
        "limit": opts["limit"],
        "shard": list(shard) if shard else None,
        "preset": models.preset,
        "dtypes": {k: getattr(models, k) for k in dtypes if getattr(models, k) is not None},
        "config": None,
        "note": RANDOM_MODELS_LINE if models.tiny else "",
    }
    eta = load_eta(err, models, cfg)
    # The loaded ETA's config is the effective one (a preset may have changed it).
    settings["config"] = eta.config.model_dump(mode="json")
    judges = [
        build_judge(
            spec,
            evaluator=eta.evaluator,
            prefix=eta.config.prefix,
            device=models.device,
            dtype=models.dtype,
            trust_remote_code=models.trust_remote_code,
            template=template,
            api_key_env=opts["judge_api_key_env"],
        )
        for spec in judges_spec
    ]
    answer = None
    if opts["compare_gates"]:
        from eta_guard.eval.gate_compare import GateComparison, resolve_choices

        choices = resolve_choices(
            opts["compare_gates"], eta, device=models.device, dtype=models.dtype
        )
        comparison = GateComparison(eta, choices)
        settings["compare_gates"] = comparison.settings
        answer = comparison.answer_item
    path = Path(opts["out"]) / results_name(shard)
    summary = _with_progress(
        err,
        lambda progress: run_eval(
            eta,
            items,
            judges,
            path,
            settings=settings,
            seed=opts["seed"],
            resume=opts["resume"],
            progress=progress,
            answer_fn=answer,
            concurrency=opts["concurrency"],
        ),
    )
    err.print(
        f"{summary.written} item(s) answered, {summary.already_done} already done, "
        f"{summary.failed} failed -> {path}",
        highlight=False,
    )
    if shard is not None:
        err.print(
            f"shard {shard[0]}/{shard[1]} done; when every shard is, write the report with: "
            f"eta-guard eval --merge {Path(opts['out']) / 'results.shard-*.jsonl'} --out DIR",
            highlight=False,
        )
        return
    _report(out_console, err, [path], Path(opts["out"]), opts["bootstrap"])


def _with_progress(err: Any, run: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:.2f} item/s" if task.speed else "- item/s")

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("eval", total=None)
        started: list[int] = []

        def progress(done: int, total: int, item_id: str) -> None:
            if not started:  # items done by an earlier run must not inflate the rate
                started.append(done)
                bar.update(task, total=total - done, completed=0)
                bar.update(task, description=f"eval ({done} done before)" if done else "eval")
                return
            bar.update(task, completed=done - started[0])

        return run(progress)


def _report(out_console: Any, err: Any, paths: list[Path], out: Path, n_boot: int) -> None:
    from eta_guard.eval.report import write_report
    from eta_guard.eval.results import load_results

    header, records = load_results(paths)
    json_path, html_path, metrics = write_report(header, records, out, n_boot=n_boot)
    out_console.print(_summary_table(metrics, header["settings"]))
    if metrics.get("gates"):
        out_console.print(_gates_table(metrics["gates"], header["settings"]["judges"]))
    err.print(f"report: {html_path} and {json_path}", highlight=False)


def _summary_table(metrics: dict[str, Any], settings: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(
        title=f"{settings['dataset']}: unsafe-response rate (95% bootstrap CI)",
        title_justify="left",
    )
    for name in ("judge", "vanilla", "ETA", "ETA - vanilla", "n", "unjudged"):
        table.add_column(name, justify="left" if name == "judge" else "right")

    def pct(s: dict[str, Any]) -> str:
        return (
            "-"
            if s["rate"] is None
            else f"{100 * s['rate']:.1f}% [{100 * s['low']:.1f}-{100 * s['high']:.1f}]"
        )

    for name, block in metrics["judges"].items():
        o = block["overall"]
        d = o["difference"]
        diff = "-" if d["diff"] is None else f"{100 * d['diff']:+.1f} pts"
        table.add_row(
            name,
            pct(o["vanilla"]),
            pct(o["eta"]),
            diff,
            str(o["vanilla"]["n"]),
            str(o["vanilla"]["unjudged"] + o["eta"]["unjudged"]),
        )
    cost = metrics["cost"]["overall"]["ratio"]
    shares = metrics["evaluators"]
    table.caption = (
        f"items {metrics['n_answered']} answered, {metrics['n_failed']} failed; ETA re-decoded "
        f"{_share(shares['aligned'])}; time ETA / vanilla {'-' if cost is None else f'{cost:.2f}x'}"
        + (f"\n{settings['note']}" if settings.get("note") else "")
    )
    table.caption_justify = "left"
    return table


def _gates_table(gates: dict[str, Any], judges: list[str]) -> Any:
    from rich.table import Table

    table = Table(title="gate choices (same vanilla answers)", title_justify="left")
    for name in ("choice", "flagged", "aligned", *(f"unsafe: {j}" for j in judges)):
        table.add_column(name, justify="left" if name == "choice" else "right")
    for name, block in gates["choices"].items():
        o = block["overall"]
        table.add_row(
            name,
            _share(o["flag_rate"]["rate"]),
            _share(o["aligned"]),
            *(_share(o["judges"][j]["rate"]) for j in judges),
        )
    return table


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
