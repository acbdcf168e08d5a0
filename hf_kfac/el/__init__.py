"""Medical entity linking for continual fine-tuning: tasks (data side) and metrics.

Data (stdlib only, imported here): :class:`ELTask`, :func:`build_task`,
:func:`load_builtin_task` ("diseases"/"drugs"/"phenotypes", aliases A/B/C),
:func:`load_task_from_files`, :func:`load_bigbio_kb`, :func:`normalization_key`.
Metrics (torch/numpy) live in :mod:`hf_kfac.el.metrics`; models (:class:`ELClassifier`,
:class:`ELBiEncoder`, :func:`load_el_model`, predictive functions) in :mod:`hf_kfac.el.models`;
evaluation (:func:`evaluate_task`, forgetting) in :mod:`hf_kfac.el.evaluation`; datasets and
collators in :mod:`hf_kfac.el.collate`. They are imported on first attribute access, so
``import hf_kfac.el`` stays light (no torch, no transformers).
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

_MODELS = {
    "ELClassifier", "ELBiEncoder", "ELModelConfig", "load_el_model", "build_el_model", "default_encoder_path",
    "classifier_predictive_fn", "biencoder_predictive_fn", "predictive_fn_for",
}
_EVALUATION = {
    "TaskEval", "evaluate_task", "evaluate_classifier", "evaluate_biencoder", "encode_dictionary", "forgetting",
    "sequence_metrics", "bootstrap_sequence_metrics",
}
_COLLATE = {"ELCollator", "classifier_dataset", "pair_dataset"}

__all__ = [
    "BUILTIN_TASKS", "ELTask", "build_task", "split_of_key", "load_builtin_task",
    "load_task_from_files", "load_bigbio_kb", "normalization_key", "DataOnlyUnpickler",
    "UnsafePickleError", "load_data_pickle", *sorted(_METRICS), *sorted(_MODELS), *sorted(_EVALUATION),
    *sorted(_COLLATE),
]


def __getattr__(name: str) -> Any:
    """Lazily import metric functions (they need torch)."""
    if name in _METRICS:
        from . import metrics

        return getattr(metrics, name)
    if name in _MODELS:
        from . import models

        return getattr(models, name)
    if name in _EVALUATION:
        from . import evaluation

        return getattr(evaluation, name)
    if name in _COLLATE:
        from . import collate

        return getattr(collate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
