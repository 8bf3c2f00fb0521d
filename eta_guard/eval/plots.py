"""The report's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

VANILLA, ETA = "#c44e52", "#4c72b0"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the eval report needs matplotlib: pip install 'eta-guard[eval]'") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def unsafe_rates(judge: str, block: dict[str, Any]) -> bytes:
    """Unsafe rate, vanilla vs ETA, overall and per category, with bootstrap intervals."""
    plt = _pyplot()
    rows = [("overall", block["overall"]), *sorted(block["by_category"].items())]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 3.8))
    width = 0.38
    for offset, arm, color, label in (
        (-width / 2, "vanilla", VANILLA, "vanilla"),
        (width / 2, "eta", ETA, "ETA"),
    ):
        xs: list[float] = []
        ys: list[float] = []
        errs: list[list[float]] = [[], []]
        for i, (_, stats) in enumerate(rows):
            s = stats[arm]
            if s["rate"] is None:
                continue
            xs.append(i + offset)
            ys.append(100 * s["rate"])
            errs[0].append(100 * (s["rate"] - s["low"]))
            errs[1].append(100 * (s["high"] - s["rate"]))
        ax.bar(xs, ys, width, yerr=errs, capsize=3, color=color, label=label)
    names = [_short(name or "(no category)") for name, _ in rows]
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    ax.set_ylabel("unsafe answers (%)")
    ax.set_ylim(0, 122)  # headroom for the legend above the 100% bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(f"judge: {judge}")
    ax.legend(frameon=False, loc="upper right", ncol=2)
    return _png(fig)


def score_histograms(
    pre: Sequence[float], post: Sequence[float], pre_threshold: float, post_threshold: float
) -> bytes:
    """ETA's evaluator scores over the run: CLIP (image) and RM (vanilla answer)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for ax, values, threshold, title, rule in (
        (axes[0], pre, pre_threshold, "pre: CLIP cosine (image)", "unsafe iff >="),
        (axes[1], post, post_threshold, "post: reward (vanilla answer)", "unsafe iff <="),
    ):
        if values:
            ax.hist(values, bins=min(30, max(5, len(values) // 3)), color="#8c8c8c")
        else:
            ax.text(0.5, 0.5, "never ran", ha="center", va="center", transform=ax.transAxes)
        ax.axvline(threshold, color="black", linestyle="--", label=f"{rule} {threshold:g}")
        ax.set_title(title)
        ax.set_ylabel("items")
        ax.legend(frameon=False, fontsize=8)
    return _png(fig)


def agreement_matrix(names: Sequence[str], kappa: Sequence[Sequence[float | None]]) -> bytes:
    """Cohen's kappa between every pair of judges (blank where undefined)."""
    plt = _pyplot()
    import numpy as np

    n = len(names)
    grid = np.array([[np.nan if v is None else v for v in row] for row in kappa], dtype=float)
    fig, ax = plt.subplots(figsize=(1.3 * n + 2.5, 1.1 * n + 1.5))
    image = ax.imshow(grid, vmin=-1, vmax=1, cmap="RdBu")
    for i in range(n):
        for j in range(n):
            text = "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}"
            dark = not np.isnan(grid[i, j]) and abs(grid[i, j]) > 0.5
            ax.text(
                j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black"
            )
    ax.set_xticks(range(n), [_short(x) for x in names], rotation=30, ha="right")
    ax.set_yticks(range(n), [_short(x) for x in names])
    ax.set_title("Cohen's kappa between judges")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(fig)


def cost_bars(cost: dict[str, Any]) -> bytes:
    """Mean seconds per item, vanilla decode vs the whole ETA call, by alignment."""
    plt = _pyplot()
    groups = [(k, cost[k]) for k in ("overall", "not_aligned", "aligned") if cost[k]["n"]]
    fig, ax = plt.subplots(figsize=(6, 3.3))
    width = 0.38
    top = 0.0
    for i, (_, block) in enumerate(groups):
        n = block["n"]
        ax.bar(
            i - width / 2,
            block["vanilla_s"] / n,
            width,
            color=VANILLA,
            label="vanilla" if i == 0 else None,
        )
        ax.bar(i + width / 2, block["eta_s"] / n, width, color=ETA, label="ETA" if i == 0 else None)
        top = max(top, block["vanilla_s"] / n, block["eta_s"] / n)
        ratio = block["ratio"]
        if ratio is not None:
            ax.text(
                i,
                max(block["vanilla_s"], block["eta_s"]) / n,
                f"{ratio:.2f}x",
                ha="center",
                va="bottom",
            )
    ax.set_xticks(range(len(groups)), [f"{k.replace('_', ' ')} (n={b['n']})" for k, b in groups])
    ax.set_ylim(0, top * 1.25 or 1.0)
    ax.set_ylabel("seconds per item")
    ax.set_title("cost: ETA / vanilla time")
    ax.legend(frameon=False)
    return _png(fig)


def roc_curve_plot(
    side: str,
    safe: Sequence[float],
    unsafe: Sequence[float],
    higher_is_unsafe: bool,
    threshold: float,
) -> bytes:
    """ROC of one evaluator on labelled data (unsafe = positive), with the chosen point."""
    plt = _pyplot()
    from sklearn.metrics import auc, roc_curve

    y = [0] * len(safe) + [1] * len(unsafe)
    scores = [s if higher_is_unsafe else -s for s in (*safe, *unsafe)]
    fpr, tpr, _ = roc_curve(y, scores)
    flag = (lambda s: s >= threshold) if higher_is_unsafe else (lambda s: s <= threshold)
    point = (sum(map(flag, safe)) / len(safe), sum(map(flag, unsafe)) / len(unsafe))
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot(fpr, tpr, color=ETA, label=f"AUC {auc(fpr, tpr):.3f}")
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":")
    ax.scatter([point[0]], [point[1]], color="black", zorder=3, label=f"threshold {threshold:.4g}")
    ax.set_xlabel("false-positive rate (safe flagged)")
    ax.set_ylabel("true-positive rate (unsafe flagged)")
    ax.set_title(f"{side} evaluator ROC")
    ax.legend(frameon=False, loc="lower right")
    return _png(fig)


def score_distributions(
    side: str, safe: Sequence[float], unsafe: Sequence[float], threshold: float
) -> bytes:
    """Scores of the safe and the unsafe examples, with the chosen threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.3))
    bins = min(30, max(5, (len(safe) + len(unsafe)) // 3))
    ax.hist(safe, bins=bins, alpha=0.6, color=ETA, label=f"safe (n={len(safe)})")
    ax.hist(unsafe, bins=bins, alpha=0.6, color=VANILLA, label=f"unsafe (n={len(unsafe)})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_title(f"{side} evaluator scores")
    ax.legend(frameon=False, fontsize=8)
    return _png(fig)


def _short(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
