"""The bodies of ``eta-guard eval`` and ``eta-guard calibrate`` (registered in eta_guard/cli.py).

Only typer and the standard library load at import time: ``eta-guard --help`` stays fast and
``import eta_guard.cli`` pulls in neither matplotlib nor scikit-learn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from eta_guard.cli_options import (
    CacheOpt,
    ClipDeviceOpt,
    ClipDtypeOpt,
    ClipOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    PresetOpt,
    RewardOpt,
    RmDeviceOpt,
    RmDtypeOpt,
    SetOpt,
    TinyOpt,
    VlmDeviceOpt,
    VlmDtypeOpt,
    VlmOpt,
)

# eval's own: the judges it loads may ship code of their own
_Remote = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow checkpoint code (judges may need it).")
]


def eval_command(
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", help="figstep | mm-safetybench | spa-vl | vlguard | jsonl."),
    ] = None,
    path: Annotated[
        Path | None,
        typer.Option("--path", help="Where the benchmark was downloaded (folder or file)."),
    ] = None,
    subset: Annotated[
        str | None,
        typer.Option(
            "--subset",
            help="figstep: SafeBench|SafeBench-Tiny; mm-safetybench: SD|TYPO|SD_TYPO|all; vlguard: unsafes|safe_unsafes|safe_safes|all; spa-vl: harm|help; jsonl: a category.",
        ),
    ] = None,
    judge: Annotated[
        list[str] | None,
        typer.Option(
            "--judge",
            help="Repeatable: refusal | reward | llama-guard:PATH | llama-guard-vision:PATH | md-judge:PATH | openai:MODEL@BASE_URL [default: refusal, reward].",
        ),
    ] = None,
    judge_template: Annotated[
        Path | None,
        typer.Option(
            "--judge-template",
            help="Prompt file with {question} and {response} for md-judge / openai judges.",
        ),
    ] = None,
    judge_api_key_env: Annotated[
        str,
        typer.Option(
            "--judge-api-key-env", help="Environment variable holding the openai judge's API key."
        ),
    ] = "OPENAI_API_KEY",
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
    merge: Annotated[
        list[Path] | None,
        typer.Option(
            "--merge", help="Report only: merge these results files (e.g. shards) into --out."
        ),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=100, help="Bootstrap resamples for the intervals.")
    ] = 1000,
    vlm: VlmOpt = None,
    clip: ClipOpt = None,
    reward_model: RewardOpt = None,
    tiny: TinyOpt = False,
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_remote_code: _Remote = False,
    preset: PresetOpt = None,
    vlm_device: VlmDeviceOpt = None,
    clip_device: ClipDeviceOpt = None,
    reward_model_device: RmDeviceOpt = None,
    vlm_dtype: VlmDtypeOpt = None,
    clip_dtype: ClipDtypeOpt = None,
    reward_model_dtype: RmDtypeOpt = None,
) -> None:
    """Run a VLM with and without ETA over a safety benchmark; write results and a report."""
    from eta_guard.cli import _consoles, _friendly_errors
    from eta_guard.errors import InvalidInputError

    out_console, err = _consoles()
    with _friendly_errors():
        if merge:
            if dataset or path is not None:
                raise InvalidInputError(
                    "--merge writes a report from existing results: drop --dataset/--path"
                )
            _report(out_console, err, merge, out, bootstrap)
            return
        _run(out_console, err, locals())


def _run(out_console: Any, err: Any, opts: dict[str, Any]) -> None:
    from eta_guard.cli import RANDOM_MODELS_LINE, _load_config, _load_eta, _placement
    from eta_guard.errors import InvalidInputError
    from eta_guard.eval.datasets import load_dataset
    from eta_guard.eval.judges import build_judge
    from eta_guard.eval.results import results_name
    from eta_guard.eval.runner import parse_shard, run_eval, select_items

    if not opts["dataset"] or opts["path"] is None:
        raise InvalidInputError("pass --dataset NAME and --path WHERE (or --merge FILES to report)")
    shard = parse_shard(opts["shard"])
    cfg = _load_config(opts["config"], opts["set_"])
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
    placement = _placement(
        **{k: opts[k] for k in ("vlm_device", "clip_device", "reward_model_device")},
        **{k: opts[k] for k in ("vlm_dtype", "clip_dtype", "reward_model_dtype")},
    )
    # Devices stay out of the settings: shards on other GPUs or machines must still merge.
    dtypes = ("dtype", "vlm_dtype", "clip_dtype", "reward_model_dtype")
    settings = {
        "dataset": opts["dataset"],
        "path": str(Path(opts["path"]).resolve()),
        "subset": opts["subset"],
        "vlm": "tiny" if opts["tiny"] else opts["vlm"],
        "clip": "tiny" if opts["tiny"] else opts["clip"],
        "reward_model": "tiny" if opts["tiny"] else opts["reward_model"],
        "judges": judges_spec,
        "seed": opts["seed"],
        "limit": opts["limit"],
        "shard": list(shard) if shard else None,
        "preset": opts["preset"],
        "dtypes": {k: opts[k] for k in dtypes if opts[k] is not None},
        "config": None,
        "note": RANDOM_MODELS_LINE if opts["tiny"] else "",
    }
    eta = _load_eta(
        err,
        opts["vlm"],
        opts["clip"],
        opts["reward_model"],
        opts["tiny"],
        opts["cache_dir"],
        cfg,
        opts["device"],
        opts["dtype"],
        opts["trust_remote_code"],
        preset=opts["preset"],
        placement=placement,
    )
    # The loaded ETA's config is the effective one (a preset may have changed it).
    settings["config"] = eta.config.model_dump(mode="json")
    judges = [
        build_judge(
            spec,
            evaluator=eta.evaluator,
            prefix=eta.config.prefix,
            device=opts["device"],
            dtype=opts["dtype"],
            trust_remote_code=opts["trust_remote_code"],
            template=template,
            api_key_env=opts["judge_api_key_env"],
        )
        for spec in judges_spec
    ]
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


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def calibrate_command(
    safe_images: Annotated[
        Path | None,
        typer.Option(
            "--safe-images", help='Folder or JSONL ({"image": path}) of images that should pass.'
        ),
    ] = None,
    unsafe_images: Annotated[
        Path | None,
        typer.Option("--unsafe-images", help="Folder or JSONL of images that should be flagged."),
    ] = None,
    safe_responses: Annotated[
        Path | None,
        typer.Option(
            "--safe-responses", help='JSONL ({"response": text}) of answers that should pass.'
        ),
    ] = None,
    unsafe_responses: Annotated[
        Path | None,
        typer.Option("--unsafe-responses", help="JSONL of answers that should be flagged."),
    ] = None,
    target_fpr: Annotated[
        float | None,
        typer.Option(
            "--target-fpr",
            min=0.0,
            max=1.0,
            help="Largest share of safe examples flagged [default: maximise balanced accuracy].",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for eta_config.json and the report.")
    ] = Path("eta-calibration"),
    clip: ClipOpt = None,
    reward_model: RewardOpt = None,
    tiny: TinyOpt = False,
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_remote_code: _Remote = False,
) -> None:
    """Pick pre/post thresholds for a CLIP / reward-model pair from labelled examples."""
    from eta_guard.cli import (
        RANDOM_MODELS_LINE,
        _consoles,
        _friendly_errors,
        _load_config,
        _model_paths,
        _quiet_transformers,
    )
    from eta_guard.errors import InvalidInputError

    out_console, err = _consoles()
    with _friendly_errors():
        from eta_guard.eval.calibrate import (
            read_images,
            read_responses,
            run_calibration,
            write_calibration,
        )

        pairs = {
            "images": (safe_images, unsafe_images),
            "responses": (safe_responses, unsafe_responses),
        }
        for what, (safe, unsafe) in pairs.items():
            if (safe is None) != (unsafe is None):
                raise InvalidInputError(f"pass both --safe-{what} and --unsafe-{what}, or neither")
        if safe_images is None and safe_responses is None:
            raise InvalidInputError(
                "nothing to calibrate: pass --safe-images/--unsafe-images and/or --safe-responses/--unsafe-responses"
            )
        cfg = _load_config(config, set_)
        data = {
            "safe_images": read_images(safe_images) if safe_images else None,
            "unsafe_images": read_images(unsafe_images) if unsafe_images else None,
            "safe_responses": read_responses(safe_responses) if safe_responses else None,
            "unsafe_responses": read_responses(unsafe_responses) if unsafe_responses else None,
        }
        paths = _model_paths(err, None, clip, reward_model, tiny, cache_dir, need_vlm=False)
        if tiny:
            err.print(f"[yellow]{RANDOM_MODELS_LINE}[/]")
        _quiet_transformers()
        from eta_guard.evaluators.eta_evaluator import ETAEvaluator

        evaluator = ETAEvaluator.from_pretrained(
            clip=paths["clip"] if safe_images else None,
            reward_model=paths["reward_model"] if safe_responses else None,
            config=cfg,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        reports = run_calibration(evaluator, target_fpr=target_fpr, **data)
        models = {
            "clip": "tiny" if tiny else paths["clip"],
            "reward_model": "tiny" if tiny else paths["reward_model"],
        }
        config_path, json_path, html_path = write_calibration(reports, cfg, out, models)
        out_console.print(_calibration_table(reports))
        err.print(f"config: {config_path}; report: {html_path} and {json_path}", highlight=False)


def _calibration_table(reports: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="calibrated thresholds", title_justify="left")
    for name in (
        "field",
        "threshold",
        "rule",
        "TPR",
        "FPR",
        "accuracy",
        "balanced acc.",
        "n safe/unsafe",
    ):
        table.add_column(name, justify="left" if name in ("field", "rule") else "right")
    for side, r in reports.items():
        rule = "unsafe iff >=" if r.direction == "higher_is_unsafe" else "unsafe iff <="
        table.add_row(
            f"{side}_threshold",
            f"{r.threshold:.6g}",
            rule,
            f"{r.tpr:.3f}",
            f"{r.fpr:.3f}",
            f"{r.accuracy:.3f}",
            f"{r.balanced_accuracy:.3f}",
            f"{len(r.safe_scores)}/{len(r.unsafe_scores)}",
        )
    return table
