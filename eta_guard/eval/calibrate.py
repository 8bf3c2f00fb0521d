"""``eta-guard calibrate``: pick ETA's thresholds for any CLIP / reward-model pair from labelled
examples (:mod:`eta_guard.calibration`), and write the config and an ROC report.

Inputs: safe and unsafe images (a folder of image files, or a JSONL of ``{"image": path}``
lines, paths relative to the file) for ``pre_threshold``; safe and unsafe responses (a JSONL of
``{"response": text}`` lines) for ``post_threshold``. Either side may be left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eta_guard.calibration import (
    CalibrationReport,
    calibrate_post_threshold,
    calibrate_pre_threshold,
)
from eta_guard.eval.datasets.base import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def read_images(path: Path) -> list[str]:
    """Image paths from a folder (sorted, image suffixes only) or a JSONL of ``{"image": ...}``."""
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    out = []
    for source, row in _jsonl(path):
        value = row.get("image")
        if not isinstance(value, str) or not value:
            raise DatasetError(f"{source}: 'image' must be a path; got {value!r}")
        image = path.parent / value
        if not image.is_file():
            raise DatasetError(f"{source}: image file {str(image)!r} does not exist")
        out.append(str(image))
    return out


def read_responses(path: Path) -> list[str]:
    """Responses from a JSONL of ``{"response": text}`` lines."""
    out = []
    for source, row in _jsonl(path):
        value = row.get("response")
        if not isinstance(value, str):
            raise DatasetError(f"{source}: 'response' must be a string; got {value!r}")
        out.append(value)
    return out


def _jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise DatasetError(f"{path} is neither a folder nor a JSONL file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{number}: not valid JSON: {e.msg}") from e
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object")
        rows.append((f"{path}:{number}", row))
    if not rows:
        raise DatasetError(f"{path}: no lines")
    return rows


def run_calibration(
    evaluator: Any,
    *,
    safe_images: list[str] | None,
    unsafe_images: list[str] | None,
    safe_responses: list[str] | None,
    unsafe_responses: list[str] | None,
    target_fpr: float | None,
) -> dict[str, CalibrationReport]:
    """Calibrate every side that has both classes of examples: ``{"pre": ..., "post": ...}``."""
    reports = {}
    if safe_images is not None and unsafe_images is not None:
        reports["pre"] = calibrate_pre_threshold(
            evaluator, safe_images, unsafe_images, target_fpr=target_fpr
        )
    if safe_responses is not None and unsafe_responses is not None:
        reports["post"] = calibrate_post_threshold(
            evaluator, safe_responses, unsafe_responses, target_fpr=target_fpr
        )
    return reports


def write_calibration(
    reports: dict[str, CalibrationReport], base_config: Any, out_dir: Path, models: dict[str, Any]
) -> tuple[Path, Path, Path]:
    """Write ``eta_config.json``, ``calibration.json`` and ``calibration.html`` to ``out_dir``."""
    from eta_guard.eval import plots
    from eta_guard.eval.report import img, render_page

    out_dir.mkdir(parents=True, exist_ok=True)
    config = base_config
    for report in reports.values():
        config = report.apply(config)
    config_path = out_dir / "eta_config.json"
    config.save(config_path)
    summary = {
        "models": models,
        "sides": {side: _summary(r) for side, r in reports.items()},
        "config": config.model_dump(mode="json"),
    }
    json_path = out_dir / "calibration.json"
    json_path.write_text(json.dumps(summary, indent=2))
    sections = []
    for side, r in reports.items():
        higher = r.direction == "higher_is_unsafe"
        rows = "".join(
            f"<tr><th class=l>{k}</th><td>{v:.4g}</td></tr>"
            for k, v in (
                ("threshold", r.threshold),
                ("TPR (unsafe flagged)", r.tpr),
                ("FPR (safe flagged)", r.fpr),
                ("accuracy", r.accuracy),
                ("balanced accuracy", r.balanced_accuracy),
            )
        )
        body = (
            f"<table>{rows}</table>"
            + img(
                plots.roc_curve_plot(side, r.safe_scores, r.unsafe_scores, higher, r.threshold),
                f"{side} ROC",
            )
            + img(
                plots.score_distributions(side, r.safe_scores, r.unsafe_scores, r.threshold),
                f"{side} scores",
            )
        )
        title = "pre (CLIP, images)" if side == "pre" else "post (reward model, responses)"
        sections.append((title, body))
    note = "Thresholds hold for these checkpoints and this kind of data only; re-check on held-out examples."
    html_path = out_dir / "calibration.html"
    html_path.write_text(render_page("eta-guard calibrate", sections, note=note), encoding="utf-8")
    return config_path, json_path, html_path


def _summary(r: CalibrationReport) -> dict[str, Any]:
    return {
        "threshold": r.threshold,
        "direction": r.direction,
        "tpr": r.tpr,
        "fpr": r.fpr,
        "accuracy": r.accuracy,
        "balanced_accuracy": r.balanced_accuracy,
        "target_fpr": r.target_fpr,
        "n_safe": len(r.safe_scores),
        "n_unsafe": len(r.unsafe_scores),
    }
