"""``eta-guard eval`` and ``eta-guard calibrate``: benchmarks, judges, metrics and reports.

Loaders read the layouts the safety benchmarks publish (files the user downloaded; nothing is
fetched), a run answers every item with ETA (one ETA call gives the vanilla and the ETA answer),
judges label both answers, and :mod:`eta_guard.eval.metrics` turns the records into unsafe rates
with bootstrap intervals. Plotting needs the ``eval`` extra (matplotlib, scikit-learn, pyarrow);
nothing here is imported by ``import eta_guard``.
"""

from __future__ import annotations
