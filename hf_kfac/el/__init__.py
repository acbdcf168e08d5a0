"""Medical entity linking for continual fine-tuning: tasks (data side) and metrics.

Data (stdlib only, imported here): :class:`ELTask`, :func:`build_task`,
:func:`load_builtin_task` ("diseases"/"drugs"/"phenotypes", aliases A/B/C),
:func:`load_task_from_files`, :func:`load_bigbio_kb`, :func:`normalization_key`.
Metrics (torch/numpy) live in :mod:`hf_kfac.el.metrics` and are imported on first
attribute access, so ``import hf_kfac.el`` stays light (no torch, no transformers).
"""

from __future__ import annotations

from typing import Any

from .builtin import BUILTIN_TASKS, load_builtin_task
from .loaders import load_bigbio_kb, load_task_from_files
from .normalize import normalization_key
from .safe_pickle import DataOnlyUnpickler, UnsafePickleError, load_data_pickle
from .task import ELTask, build_task, split_of_key

_METRICS = {
    "accuracy_at_k", "accuracy_from_ranks", "target_ranks", "reduce_string_scores",
    "concept_ranks_from_string_scores", "accuracy_at_k_from_predictions",
    "ranks_from_predictions", "hits_at_k", "bootstrap_ci", "paired_bootstrap",
}

__all__ = [
    "BUILTIN_TASKS", "ELTask", "build_task", "split_of_key", "load_builtin_task",
    "load_task_from_files", "load_bigbio_kb", "normalization_key", "DataOnlyUnpickler",
    "UnsafePickleError", "load_data_pickle", *sorted(_METRICS),
]


def __getattr__(name: str) -> Any:
    """Lazily import metric functions (they need torch)."""
    if name in _METRICS:
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
