"""Eval metrics against hand-computed values: rates, bootstrap intervals, kappa, shares, cost."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eta_guard.eval.metrics import (
    bootstrap_mean,
    cohen_kappa,
    compute_metrics,
    paired_difference,
    rate_stats,
)


def test_bootstrap_of_a_constant_is_that_constant():
    assert bootstrap_mean([1, 1, 1, 1], seed=3) == (1.0, 1.0, 1.0)
    assert bootstrap_mean([0.0] * 7, seed=3) == (0.0, 0.0, 0.0)
    assert all(math.isnan(v) for v in bootstrap_mean([]))


def test_bootstrap_interval_matches_the_binomial_quantiles():
    # Resampling 4 items with one unsafe: the resampled rate is Binomial(4, 1/4) / 4.
    # P(0) = 0.316 > 0.025 -> low = 0; P(<=2) = 0.949 < 0.975 <= P(<=3) = 0.996 -> high = 0.75.
    assert bootstrap_mean([1, 0, 0, 0], n_boot=4000, seed=0) == (0.25, 0.0, 0.75)


def test_bootstrap_is_the_percentile_method_with_the_seeded_generator():
    x = np.array([1, 0, 1, 1, 0, 0, 0, 1, 0, 0], dtype=float)
    rng = np.random.default_rng(11)  # independent reference: one resample at a time
    means = sorted(
        float(x[rng.integers(0, x.size, size=(1, x.size))[0]].mean()) for _ in range(500)
    )
    expected = np.quantile(means, [0.05, 0.95])
    mean, low, high = bootstrap_mean(x, n_boot=500, seed=11, confidence=0.90)
    assert mean == pytest.approx(0.4)
    assert (low, high) == pytest.approx(tuple(expected))
    # Same seed, same interval; another seed, (almost surely) another one.
    assert bootstrap_mean(x, n_boot=500, seed=11, confidence=0.90) == (mean, low, high)


def test_bootstrap_width_is_close_to_the_normal_approximation():
    x = np.array([1.0] * 120 + [0.0] * 280)  # p = 0.3, n = 400
    _, low, high = bootstrap_mean(x, n_boot=2000, seed=0)
    normal = 2 * 1.96 * math.sqrt(0.3 * 0.7 / 400)  # 0.0898
    assert high - low == pytest.approx(normal, rel=0.15)


def test_rate_stats_leaves_unjudged_out_and_counts_them():
    s = rate_stats([True, False, None, True, None], n_boot=200)
    assert (s["rate"], s["n"], s["unsafe"], s["unjudged"]) == (pytest.approx(2 / 3), 3, 2, 2)
    empty = rate_stats([None, None])
    assert (empty["rate"], empty["low"], empty["n"], empty["unjudged"]) == (None, None, 0, 2)


def test_paired_difference_counts_fixed_and_broken_items():
    vanilla = [True, True, True, False, False, None, True]
    eta = [False, False, True, False, True, False, None]
    d = paired_difference(vanilla, eta, n_boot=300)
    # Pairs judged in both arms: 5; fixed 2 (T->F), broken 1 (F->T): diff = (1 - 2) / 5.
    assert (d["n"], d["fixed"], d["broken"]) == (5, 2, 1)
    assert d["diff"] == pytest.approx(-0.2)
    assert d["low"] <= d["diff"] <= d["high"]


def test_kappa_on_a_known_table():
    # a\b      unsafe safe
    # unsafe     20     5
    # safe       10    15   -> p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.4
    a = [True] * 25 + [False] * 25
    b = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa(a, [not v for v in a]) == pytest.approx(-1.0)
    assert cohen_kappa([True, True], [True, True]) is None  # one class: undefined, not 1 or 0


def _record(i, *, category, aligned, verdict, judgments, refused, timings, error=None):
    return {
        "id": f"x{i}",
        "index": i,
        "category": category,
        "label": "unsafe",
        "aligned": aligned,
        "verdict": verdict,
        "judgments": judgments,
        "refused": refused,
        "timings": timings,
        "error": error,
        "vanilla_text": "v",
        "eta_text": "e",
        "question": "q",
    }


def _j(v, e):
    return {"vanilla": {"unsafe": v}, "eta": {"unsafe": e}}


V_FLAGGED = {
    "pre_score": 0.3,
    "post_score": -1.0,
    "input_unsafe": True,
    "output_unsafe": True,
    "unsafe": True,
    "skipped": {},
    "errors": {},
}
V_SAFE_IMG = {
    "pre_score": 0.1,
    "post_score": None,
    "input_unsafe": False,
    "output_unsafe": None,
    "unsafe": False,
    "skipped": {"post": "passed"},
    "errors": {},
}
V_RM_OK = {
    "pre_score": 0.3,
    "post_score": 0.5,
    "input_unsafe": True,
    "output_unsafe": False,
    "unsafe": False,
    "skipped": {},
    "errors": {},
}

RECORDS = [
    _record(
        0,
        category="a",
        aligned=True,
        verdict=V_FLAGGED,
        judgments={"k": _j(True, False), "m": _j(True, True)},
        refused={"vanilla": False, "eta": True},
        timings={"vanilla": 1.0, "total": 4.0},
    ),
    _record(
        1,
        category="a",
        aligned=True,
        verdict=V_FLAGGED,
        judgments={"k": _j(True, False), "m": _j(True, False)},
        refused={"vanilla": False, "eta": True},
        timings={"vanilla": 1.0, "total": 3.0},
    ),
    _record(
        2,
        category="b",
        aligned=False,
        verdict=V_SAFE_IMG,
        judgments={"k": _j(False, False), "m": _j(False, False)},
        refused={"vanilla": True, "eta": True},
        timings={"vanilla": 2.0, "total": 2.1},
    ),
    _record(
        3,
        category="b",
        aligned=False,
        verdict=V_RM_OK,
        judgments={"k": _j(None, None), "m": _j(True, True)},
        refused={"vanilla": False, "eta": False},
        timings={"vanilla": 1.0, "total": 1.4},
    ),
    {
        "id": "x4",
        "index": 4,
        "category": "b",
        "label": "unsafe",
        "error": "InvalidInputError: bad image",
    },
]


def test_compute_metrics_on_hand_made_records():
    m = compute_metrics(RECORDS, ["k", "m"], n_boot=200, seed=0)
    assert (m["n_items"], m["n_answered"], m["n_failed"]) == (5, 4, 1)
    assert m["failed"] == [{"id": "x4", "error": "InvalidInputError: bad image"}]
    k = m["judges"]["k"]["overall"]
    assert (k["vanilla"]["rate"], k["eta"]["rate"]) == (pytest.approx(2 / 3), 0.0)
    assert (k["vanilla"]["unjudged"], k["eta"]["unjudged"]) == (1, 1)
    assert (k["difference"]["fixed"], k["difference"]["broken"], k["difference"]["n"]) == (2, 0, 3)
    cat_a = m["judges"]["m"]["by_category"]["a"]
    assert (cat_a["vanilla"]["rate"], cat_a["eta"]["rate"]) == (1.0, 0.5)
    assert set(m["judges"]["m"]["by_category"]) == {"a", "b"}
    assert (m["refusal"]["vanilla"]["rate"], m["refusal"]["eta"]["rate"]) == (0.25, 0.75)
    e = m["evaluators"]
    assert (e["pre_fired"], e["post_ran"], e["post_fired"], e["aligned"]) == (0.75, 0.75, 0.5, 0.5)
    assert e["post_fired_when_ran"] == pytest.approx(2 / 3)
    c = m["cost"]
    assert c["overall"]["ratio"] == pytest.approx((4 + 3 + 2.1 + 1.4) / 5.0)
    assert c["aligned"]["ratio"] == pytest.approx(3.5)
    assert c["not_aligned"]["ratio"] == pytest.approx(3.5 / 3.0)


def test_agreement_counts_each_distinct_answer_once():
    m = compute_metrics(RECORDS, ["k", "m"], n_boot=100)
    a = m["agreement"]
    # Answers: x0 v,e; x1 v,e; x2 v; x3 v (k unjudged) -> 5 pairs both labelled.
    # k: T F T F F ; m: T T T F F -> table [[2,0],[1,2]]: p_o = 0.8, p_e = 0.4*0.6 + 0.6*0.4 = 0.48
    assert a["n"][0][1] == 5
    assert a["kappa"][0][1] == pytest.approx((0.8 - 0.48) / (1 - 0.48))
    assert a["agreement"][0][1] == pytest.approx(0.8)
    assert a["kappa"][0][0] == pytest.approx(1.0)
