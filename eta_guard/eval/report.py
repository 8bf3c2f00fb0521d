"""The eval report: ``report.json`` (every figure) and ``report.html`` (one self-contained page,
plots embedded as PNG data URLs, no script and no external resource).

Everything shown that came from a dataset or a model (categories, answers, judge names) is
HTML-escaped: a model answer is untrusted and must not become markup in the reviewer's browser.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eta_guard.eval import plots
from eta_guard.eval.metrics import compute_metrics

RANDOM_NOTE = (
    "Numbers from random or tiny checkpoints measure the harness, not safety: they mean nothing."
)
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}.note{background:#fff6d6;border:1px solid #e6cf7a;padding:.5em .8em}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}pre{white-space:pre-wrap;font-size:.85em}
"""


def write_report(
    header: dict[str, Any],
    records: Sequence[dict[str, Any]],
    out_dir: Path,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
) -> tuple[Path, Path, dict[str, Any]]:
    """Compute the metrics of ``records`` and write ``report.json`` and ``report.html``."""
    settings = header["settings"]
    metrics = compute_metrics(
        records,
        settings["judges"],
        n_boot=n_boot,
        seed=settings.get("seed", 0),
        confidence=confidence,
    )
    if settings.get("compare_gates"):
        from eta_guard.eval.gate_compare import gate_metrics

        metrics["gates"] = gate_metrics(
            records,
            settings["compare_gates"],
            settings["judges"],
            n_boot=n_boot,
            seed=settings.get("seed", 0),
            confidence=confidence,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    report = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "metrics": metrics,
    }
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    html_path.write_text(render_html(settings, records, metrics), encoding="utf-8")
    return json_path, html_path, metrics


def render_html(
    settings: dict[str, Any], records: Sequence[dict[str, Any]], metrics: dict[str, Any]
) -> str:
    """The report page as one HTML string."""
    ok = [r for r in records if r.get("error") is None]
    title = f"eta-guard eval: {settings.get('dataset')} ({metrics['n_items']} items)"
    sections = [
        ("Run", _settings_table(settings, metrics)),
        ("Unsafe-response rate", _rates_section(metrics)),
        ("Refusal rate (keyword match; ETA's prefix ignored)", _refusal_table(metrics)),
        ("ETA's evaluators", _evaluator_section(ok, settings, metrics)),
        ("Judge agreement", _agreement_section(metrics)),
        ("Cost", _cost_section(metrics)),
        ("Answers ETA changed (first 10)", _examples(ok)),
    ]
    if metrics.get("gates"):
        sections.insert(
            2, ("Gate choices (scored on the same vanilla answers)", _gates_section(metrics))
        )
    if metrics["n_failed"]:
        rows = [[f["id"], f["error"]] for f in metrics["failed"]]
        sections.append(("Failed items", _table(["item", "error"], rows, left=2)))
    note = settings.get("note") or ""
    return render_page(title, sections, note=note)


def render_page(title: str, sections: Sequence[tuple[str, str]], *, note: str = "") -> str:
    """A self-contained page; section bodies are HTML already escaped by their builders."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    for name, body in sections:
        parts.append(f"<h2>{html.escape(name)}</h2>{body}")
    parts.append("</body></html>")
    return "\n".join(parts)


def img(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a data URL."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1) -> str:
    def cell(tag: str, i: int, value: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(_fmt(value))}</{tag}>"

    out = ["<table><tr>", *(cell("th", i, h) for i, h in enumerate(head)), "</tr>"]
    for row in rows:
        out += ["<tr>", *(cell("td", i, v) for i, v in enumerate(row)), "</tr>"]
    out.append("</table>")
    return "".join(out)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _pct(stats: dict[str, Any]) -> str:
    if stats["rate"] is None:
        return "- (none judged)"
    return f"{100 * stats['rate']:.1f}% [{100 * stats['low']:.1f}, {100 * stats['high']:.1f}]"


def _settings_table(settings: dict[str, Any], metrics: dict[str, Any]) -> str:
    rows = [
        [k, json.dumps(v) if isinstance(v, (dict, list)) else v]
        for k, v in settings.items()
        if k != "config"
    ]
    config = settings.get("config") or {}
    rows += [
        [k, config[k]]
        for k in ("pre_threshold", "post_threshold", "num_candidates", "max_new_tokens", "prefix")
        if k in config
    ]
    rows += [["items answered", metrics["n_answered"]], ["items failed", metrics["n_failed"]]]
    return _table(["setting", "value"], rows, left=2)


def _rates_section(metrics: dict[str, Any]) -> str:
    conf = int(100 * metrics["bootstrap"]["confidence"])
    parts = [
        f"<p>Per judge: unsafe share of the answers it labelled, with {conf}% percentile "
        f"bootstrap intervals ({metrics['bootstrap']['n_boot']} resamples). The difference is "
        "paired (same items, ETA - vanilla); fixed = unsafe -> safe, broken = safe -> unsafe.</p>"
    ]
    for name, block in metrics["judges"].items():
        rows = []
        for cat, stats in [("overall", block["overall"]), *sorted(block["by_category"].items())]:
            d = stats["difference"]
            diff = (
                "-"
                if d["diff"] is None
                else f"{100 * d['diff']:+.1f} pts [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
            )
            unjudged = stats["vanilla"]["unjudged"] + stats["eta"]["unjudged"]
            rows.append(
                [
                    cat or "(no category)",
                    _pct(stats["vanilla"]),
                    _pct(stats["eta"]),
                    diff,
                    d["fixed"],
                    d["broken"],
                    stats["vanilla"]["n"],
                    unjudged,
                ]
            )
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(
            _table(
                ["category", "vanilla", "ETA", "ETA - vanilla", "fixed", "broken", "n", "unjudged"],
                rows,
            )
        )
        parts.append(img(plots.unsafe_rates(name, block), f"unsafe rate by category, judge {name}"))
    return "".join(parts)


def _refusal_table(metrics: dict[str, Any]) -> str:
    rows = [["all", _pct(metrics["refusal"]["vanilla"]), _pct(metrics["refusal"]["eta"])]]
    rows += [
        [f"label {k}", _pct(v["vanilla"]), _pct(v["eta"])]
        for k, v in metrics["refusal_by_label"].items()
    ]
    return _table(["items", "vanilla refused", "ETA refused"], rows)


def _evaluator_section(
    ok: Sequence[dict[str, Any]], settings: dict[str, Any], metrics: dict[str, Any]
) -> str:
    e = metrics["evaluators"]
    rows = [[k.replace("_", " "), v] for k, v in e.items()]
    config = settings.get("config", {})
    pre = [r["verdict"]["pre_score"] for r in ok if r["verdict"]["pre_score"] is not None]
    post = [r["verdict"]["post_score"] for r in ok if r["verdict"]["post_score"] is not None]
    png = plots.score_histograms(
        pre, post, config.get("pre_threshold", 0.16), config.get("post_threshold", 0.06)
    )
    return _table(["share of items", "value"], rows) + img(png, "evaluator score histograms")


def _agreement_section(metrics: dict[str, Any]) -> str:
    a = metrics["agreement"]
    names = a["judges"]
    if len(names) < 2:
        return "<p>One judge only: add another --judge to measure agreement.</p>"
    rows = []
    for i, x in enumerate(names):
        for j in range(i + 1, len(names)):
            rows.append(
                [f"{x} vs {names[j]}", a["kappa"][i][j], a["agreement"][i][j], a["n"][i][j]]
            )
    return _table(["judges", "Cohen's kappa", "raw agreement", "answers"], rows) + img(
        plots.agreement_matrix(names, a["kappa"]), "judge agreement matrix"
    )


def _gates_section(metrics: dict[str, Any]) -> str:
    gates = metrics["gates"]
    judges = list(metrics["judges"])
    head = [
        "choice",
        "category",
        "members",
        "flagged",
        "aligned",
        "n",
        *(f"unsafe: {j}" for j in judges),
    ]
    rows = []
    for name, block in gates["choices"].items():
        for cat, b in [("overall", block["overall"]), *sorted(block["by_category"].items())]:
            rows.append(
                [
                    name,
                    cat or "(no category)",
                    " | ".join(block["members"]),
                    _pct(b["flag_rate"]),
                    b["aligned"],
                    b["n"],
                    *(_pct(b["judges"][j]) for j in judges),
                ]
            )
    pairs = [
        [f"{p['a']} vs {p['b']}", p["agreement"], p["kappa"], p["only_a"], p["only_b"], p["n"]]
        for p in gates["agreement"]
    ]
    return (
        "<p>Each choice flags an item when any of its members does; the vanilla answer, the "
        "post-check and the aligned answer are computed once per item and shared. Flag rate over "
        "items with an image; unsafe: the judge's rate on the answer the choice returns.</p>"
        + _table(head, rows, left=3)
        + _table(
            ["choices", "flag agreement", "Cohen's kappa", "only first", "only second", "n"], pairs
        )
    )


def _cost_section(metrics: dict[str, Any]) -> str:
    c = metrics["cost"]
    rows = [
        [k.replace("_", " "), v["n"], v["vanilla_s"], v["eta_s"], v["ratio"]] for k, v in c.items()
    ]
    return _table(["items", "n", "vanilla s", "ETA s", "ETA / vanilla"], rows) + img(
        plots.cost_bars(c), "cost"
    )


def _examples(ok: Sequence[dict[str, Any]]) -> str:
    changed = [r for r in ok if r.get("aligned")][:10]
    if not changed:
        return "<p>ETA re-decoded no answer in this run.</p>"
    rows = [
        [r["id"], _clip(r["question"]), _clip(r["vanilla_text"]), _clip(r["eta_text"])]
        for r in changed
    ]
    return _table(["item", "question", "vanilla", "ETA"], rows, left=4)


def _clip(text: str | None, limit: int = 300) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit] + "\u2026"
