"""Dataset loaders, one module per benchmark layout, and :func:`load_dataset` to pick one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from eta_guard.eval.datasets.base import DatasetError, EvalItem
from eta_guard.eval.datasets.figstep import load_figstep
from eta_guard.eval.datasets.holisafe import load_holisafe
from eta_guard.eval.datasets.jsonl import load_jsonl
from eta_guard.eval.datasets.mmsafetybench import load_mmsafetybench
from eta_guard.eval.datasets.mssbench import load_mssbench
from eta_guard.eval.datasets.siuo import load_siuo
from eta_guard.eval.datasets.spavl import load_spavl
from eta_guard.eval.datasets.vlguard import load_vlguard
from eta_guard.eval.datasets.vlsbench import load_vlsbench

LOADERS: dict[str, Callable[..., list[EvalItem]]] = {
    "figstep": load_figstep,
    "mm-safetybench": load_mmsafetybench,
    "spa-vl": load_spavl,
    "vlguard": load_vlguard,
    "siuo": load_siuo,
    "mssbench": load_mssbench,
    "vlsbench": load_vlsbench,
    "holisafe": load_holisafe,
    "jsonl": load_jsonl,
}

__all__ = ["LOADERS", "DatasetError", "EvalItem", "load_dataset"]


def load_dataset(name: str, path: str | Path, subset: str | None = None) -> list[EvalItem]:
    """Load benchmark ``name`` (a key of :data:`LOADERS`) from ``path``, in a stable order."""
    loader = LOADERS.get(name)
    if loader is None:
        raise DatasetError(f"--dataset {name!r} is not known; use one of {sorted(LOADERS)}")
    return loader(path, subset)
