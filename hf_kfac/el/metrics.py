"""Entity-linking metrics: accuracy@k, string->concept score reduction, bootstrap CIs.

* A classifier scores the task's concepts directly: ``scores[n, C]`` with class
  index = position in ``ELTask.concept_names``.
* A bi-encoder scores dictionary strings: ``string_scores[n, S]``; a concept's
  score is the max over its strings (:func:`reduce_string_scores`), with
  ``string_to_concept`` from ``ELTask.dictionary_index()``.

The rank of the gold concept is the number of candidates ranked above it. Ties
are resolved deterministically by ``ties``:

* ``"pessimistic"`` (default): every other candidate with an equal score counts
  as above the gold one, so a tie never helps (a constant scorer gets 0 acc@1).
* ``"first"``: equal scores are ordered by candidate index (a stable sort).
* ``"optimistic"``: equal scores never count as above.

Everything is pure torch/numpy; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

__all__ = [
    "TieMode",
    "target_ranks",
    "accuracy_from_ranks",
    "hits_at_k",
    "accuracy_at_k",
    "reduce_string_scores",
    "concept_ranks_from_string_scores",
    "ranks_from_predictions",
    "accuracy_at_k_from_predictions",
    "BootstrapCI",
    "PairedBootstrap",
    "bootstrap_ci",
    "paired_bootstrap",
]

TieMode = Literal["pessimistic", "first", "optimistic"]
ArrayLike = torch.Tensor | np.ndarray | Sequence[float] | Sequence[int]
NOT_FOUND = np.iinfo(np.int64).max  # rank of a gold concept absent from a prediction list


def _as_tensor(x: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def target_ranks(scores: ArrayLike, targets: ArrayLike, ties: TieMode = "pessimistic") -> torch.Tensor:
    """0-based rank of ``targets[i]`` among the candidates scored in ``scores[i]``.

    ``scores`` is ``[n, C]`` (higher is better), ``targets`` ``[n]`` class indices.
    Returns a ``[n]`` int64 tensor on the scores' device. NaN scores are an error.
    """
    s = _as_tensor(scores)
    if not s.is_floating_point():
        s = s.double()
    t = _as_tensor(targets, torch.long).to(s.device)
    if s.dim() != 2 or t.dim() != 1 or s.shape[0] != t.shape[0]:
        raise ValueError(f"scores must be [n, C] and targets [n]; got {tuple(s.shape)} and "
                         f"{tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= s.shape[1]):
        raise ValueError(f"targets must be class indices in [0, {s.shape[1]})")
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN; ranks would be meaningless")
    gold = s.gather(1, t[:, None])
    above = (s > gold).sum(1)
    if ties == "optimistic":
        return above
    equal = s == gold
    if ties == "pessimistic":
        return above + equal.sum(1) - 1
    if ties == "first":
        cols = torch.arange(s.shape[1], device=s.device)
        return above + (equal & (cols[None, :] < t[:, None])).sum(1)
    raise ValueError(f"ties must be 'pessimistic', 'first' or 'optimistic', got {ties!r}")


def hits_at_k(ranks: ArrayLike, k: int) -> np.ndarray:
    """Boolean array: gold concept within the top ``k`` (rank < k), one entry per item."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = ranks.cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
    return r < k


def accuracy_from_ranks(ranks: ArrayLike, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """accuracy@k = fraction of items whose gold rank is < k, for each k in ``ks``."""
    out = {}
    for k in ks:
        hits = hits_at_k(ranks, k)
        if hits.size == 0:
            raise ValueError("no items to score")
        out[int(k)] = float(hits.mean())
    return out


def accuracy_at_k(scores: ArrayLike, targets: ArrayLike, ks: Iterable[int] = (1, 5),
                  ties: TieMode = "pessimistic") -> dict[int, float]:
    """accuracy@k of a score matrix ``[n, C]`` against gold class indices ``[n]``."""
    return accuracy_from_ranks(target_ranks(scores, targets, ties), ks)


def reduce_string_scores(string_scores: ArrayLike, string_to_concept: ArrayLike,
                         n_concepts: int) -> torch.Tensor:
    """Concept scores ``[n, n_concepts]``: max of ``string_scores[n, S]`` over each concept's strings.

    ``string_to_concept[s]`` is the concept index of dictionary string ``s``. A
    concept without strings gets ``-inf``.
    """
    s = _as_tensor(string_scores)
    if not s.is_floating_point():
        s = s.double()
    idx = _as_tensor(string_to_concept, torch.long).to(s.device)
    if s.dim() != 2 or idx.dim() != 1 or s.shape[1] != idx.shape[0]:
        raise ValueError(f"string_scores must be [n, S] and string_to_concept [S]; got "
                         f"{tuple(s.shape)} and {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_concepts):
        raise ValueError(f"string_to_concept must hold concept indices in [0, {n_concepts})")
    out = torch.full((s.shape[0], n_concepts), float("-inf"), dtype=s.dtype, device=s.device)
    return out.scatter_reduce(1, idx[None, :].expand_as(s), s, reduce="amax", include_self=True)


def concept_ranks_from_string_scores(string_scores: ArrayLike, string_to_concept: ArrayLike,
                                     n_concepts: int, targets: ArrayLike,
                                     ties: TieMode = "pessimistic") -> torch.Tensor:
    """Gold-concept ranks after the max-over-strings reduction (bi-encoder evaluation)."""
    return target_ranks(reduce_string_scores(string_scores, string_to_concept, n_concepts),
                        targets, ties)


def ranks_from_predictions(predictions: Sequence[Sequence[Hashable]],
                           gold: Sequence[Hashable]) -> np.ndarray:
    """Gold ranks in ranked prediction lists (best first).

    Repeated predictions count once (first occurrence), so a ranking of dictionary
    strings mapped to their concepts is a max-over-strings concept ranking. A gold
    concept absent from its list gets rank ``NOT_FOUND``.
    """
    if len(predictions) != len(gold):
        raise ValueError(f"{len(predictions)} prediction lists but {len(gold)} gold labels")
    ranks = np.empty(len(gold), dtype=np.int64)
    for i, (preds, g) in enumerate(zip(predictions, gold, strict=True)):
        ranks[i] = NOT_FOUND
        for r, p in enumerate(dict.fromkeys(preds)):
            if p == g:
                ranks[i] = r
                break
    return ranks


def accuracy_at_k_from_predictions(predictions: Sequence[Sequence[Hashable]],
                                   gold: Sequence[Hashable],
                                   ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """accuracy@k of ranked prediction lists (see :func:`ranks_from_predictions`)."""
    return accuracy_from_ranks(ranks_from_predictions(predictions, gold), ks)


class BootstrapCI(NamedTuple):
    """Point estimate (the mean) and percentile bootstrap interval."""

    estimate: float
    low: float
    high: float


class PairedBootstrap(NamedTuple):
    """mean(a) - mean(b) on paired items, its percentile bootstrap interval, and the
    fraction of bootstrap differences <= 0 (small: a is reliably larger)."""

    estimate: float
    low: float
    high: float
    fraction_le_zero: float


def _as_1d_float(values: ArrayLike, what: str) -> np.ndarray:
    raw = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if raw.ndim > 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {raw.shape}")
    v = raw.astype(np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError(f"{what} is empty")
    if np.isnan(v).any():
        raise ValueError(f"{what} contains NaN")
    return v


def _bootstrap_means(v: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``v``; chunked to bound memory."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    n = v.size
    chunk = max(1, min(n_boot, 4_000_000 // n))
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        out[start:start + m] = v[idx].mean(axis=1)
    return out


def _interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(values: ArrayLike, n_boot: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> BootstrapCI:
    """Mean of ``values`` (e.g. 0/1 correct flags -> accuracy) with a percentile bootstrap CI."""
    v = _as_1d_float(values, "values")
    means = _bootstrap_means(v, n_boot, seed)
    low, high = _interval(means, confidence)
    return BootstrapCI(float(v.mean()), low, high)


def paired_bootstrap(a: ArrayLike, b: ArrayLike, n_boot: int = 1000, seed: int = 0,
                     confidence: float = 0.95) -> PairedBootstrap:
    """Paired bootstrap of mean(a) - mean(b); items are resampled jointly.

    For forgetting on one test set: ``a`` = correct flags before the update, ``b`` =
    correct flags after it, item for item; the estimate is acc_before - acc_after.
    """
    va, vb = _as_1d_float(a, "a"), _as_1d_float(b, "b")
    if va.shape != vb.shape:
        raise ValueError(f"paired samples need equal lengths, got {va.size} and {vb.size}")
    d = va - vb
    means = _bootstrap_means(d, n_boot, seed)
    low, high = _interval(means, confidence)
    return PairedBootstrap(float(d.mean()), low, high, float((means <= 0).mean()))
