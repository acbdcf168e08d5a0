"""Evaluation of entity-linking models and of a task sequence (forgetting, reduction), offline.

Per task (:func:`evaluate_task`): accuracy@1 and @5 on held-out synonyms (``dev`` or
``test`` mentions), with percentile bootstrap 95% CIs (:mod:`hf_kfac.el.metrics`) and the
per-item correctness flags (for paired bootstraps of forgetting):

* classifier: scores are the logits of the task's head, over the task's concept ids;
  a task without a head (not trained yet) gives ``None``;
* bi-encoder: the task's whole dictionary (preferred names + train mentions) is encoded
  once per call and a concept's score is the max cosine over its strings. Encoding costs
  about 300 strings/s for MiniLM on 2 CPU cores, so pass several splits in one call
  (the dictionary is shared) and cap items with ``max_items`` on small budgets.

Ties are pessimistic (a tie never helps). Nothing here downloads anything.

Sequence metrics (:func:`sequence_metrics`, :func:`bootstrap_sequence_metrics`) on an
accuracy matrix ``R[i][j]`` = accuracy on task j after training task i (T tasks):

* forgetting of task j (j < T-1) = max_{j <= i < T-1} R[i][j] - R[T-1][j] (the best
  accuracy it had after being learnt, minus its final accuracy), averaged over j < T-1;
* reduction = 1 - forgetting(method) / forgetting(finetune);
* final average accuracy = mean_j R[T-1][j]; last-task accuracy = R[T-1][T-1].

Their CIs come from a bootstrap over each task's test items, resampled jointly for every
row of R and for the baseline method (a paired bootstrap: the same items, same draws).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..modes import evaluating
from .metrics import bootstrap_ci, concept_ranks_from_string_scores, target_ranks
from .task import ELTask

__all__ = [
    "TaskEval",
    "DictionaryIndex",
    "eval_pairs",
    "encode_texts",
    "classifier_logits",
    "encode_dictionary",
    "evaluate_classifier",
    "evaluate_biencoder",
    "evaluate_task",
    "forgetting",
    "sequence_metrics",
    "bootstrap_sequence_metrics",
    "flags_to_str",
    "flags_from_str",
]


@dataclass
class TaskEval:
    """accuracy@1/@5 of one task and split, with 95% bootstrap CIs and per-item flags."""

    task: str
    split: str
    n: int
    acc1: float
    acc5: float
    ci1: tuple[float, float]
    ci5: tuple[float, float]
    correct1: np.ndarray = field(repr=False)
    correct5: np.ndarray = field(repr=False)
    seconds: float = 0.0

    def to_dict(self, flags: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"task": self.task, "split": self.split, "n": self.n, "acc1": self.acc1,
                             "acc5": self.acc5, "acc1_ci": list(self.ci1), "acc5_ci": list(self.ci5),
                             "seconds": round(self.seconds, 2)}
        if flags:
            d["correct1"] = flags_to_str(self.correct1)
            d["correct5"] = flags_to_str(self.correct5)
        return d


def flags_to_str(flags: np.ndarray) -> str:
    """Compact '0101...' form of boolean flags (for JSON)."""
    return "".join("1" if x else "0" for x in np.asarray(flags, dtype=bool))


def flags_from_str(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("ascii"), dtype=np.uint8) == ord("1")


def eval_pairs(task: ELTask, split: str, max_items: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """The (mention, concept id) pairs of ``split``; at most ``max_items`` of them, a seeded sample
    kept in the original order (the same items for every model and method)."""
    pairs = list(task.split(split))
    if max_items is not None and len(pairs) > max_items:
        keep = sorted(random.Random(seed).sample(range(len(pairs)), max_items))
        pairs = [pairs[i] for i in keep]
    return pairs


def _batches_by_length(tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int):
    """Yield (positions, encoded batch) with texts sorted by length (less padding on CPU)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    for s in range(0, len(order), batch_size):
        pos = order[s:s + batch_size]
        length = max(len(enc[i]) for i in pos)
        ids = torch.full((len(pos), length), pad, dtype=torch.long)
        am = torch.zeros((len(pos), length), dtype=torch.long)
        for r, i in enumerate(pos):
            ids[r, :len(enc[i])] = torch.as_tensor(enc[i])
            am[r, :len(enc[i])] = 1
        yield pos, ids, am


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def map_texts(model: Any, tokenizer: Any, texts: Sequence[str], fn: Callable[[Tensor, Tensor], Tensor], width: int,
              batch_size: int = 256, max_length: int = 32) -> Tensor:
    """Rows ``fn(input_ids, attention_mask)`` for ``texts`` in eval mode: ``(n, width)`` float32 on CPU, in order.

    Texts are batched by length (:func:`_batches_by_length`); every module's train/eval mode is restored.
    """
    dev = _device(model)
    out = torch.empty(len(texts), width)
    with evaluating(model):
        for pos, ids, am in _batches_by_length(tokenizer, texts, batch_size, max_length):
            out[pos] = fn(ids.to(dev), am.to(dev)).float().cpu()
    return out


def encode_texts(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 256,
                 max_length: int = 32) -> Tensor:
    """L2-normalised bi-encoder embeddings ``(n, D)`` (float32, CPU), in the order of ``texts``."""
    return map_texts(model, tokenizer, texts, model.encode, int(model.config.hidden_size), batch_size, max_length)


def classifier_logits(model: Any, tokenizer: Any, texts: Sequence[str], task: str, batch_size: int = 256,
                      max_length: int = 32) -> Tensor:
    """Logits ``(n, C)`` of ``task``'s head for ``texts``."""
    return map_texts(model, tokenizer, texts,
                     lambda ids, am: model(input_ids=ids, attention_mask=am, task=task).logits,
                     len(model.concept_ids(task)), batch_size, max_length)


def _result(task: str, split: str, ranks: torch.Tensor | np.ndarray, n_boot: int, seed: int,
            seconds: float) -> TaskEval:
    r = ranks.cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
    c1, c5 = r < 1, r < 5
    b1, b5 = bootstrap_ci(c1, n_boot=n_boot, seed=seed), bootstrap_ci(c5, n_boot=n_boot, seed=seed)
    return TaskEval(task, split, int(r.size), b1.estimate, b5.estimate, (b1.low, b1.high), (b5.low, b5.high),
                    c1, c5, seconds)


def evaluate_classifier(model: Any, tokenizer: Any, task: ELTask, split: str = "test", *,
                        max_items: int | None = None, item_seed: int = 0, n_boot: int = 1000, seed: int = 0,
                        batch_size: int = 256, max_length: int = 32) -> TaskEval | None:
    """accuracy@1/@5 over the concepts of ``task``'s head; ``None`` if the model has no head for it."""
    import time

    if not model.has_head(task.name):
        return None
    t0 = time.perf_counter()
    pairs = eval_pairs(task, split, max_items, item_seed)
    if not pairs:
        raise ValueError(f"task {task.name!r} has no {split} items to evaluate")
    head_ids = model.concept_ids(task.name)
    index = {c: i for i, c in enumerate(head_ids)}
    missing = [c for _, c in pairs if c not in index]
    if missing:
        raise ValueError(f"{len(missing)} {split} item(s) of {task.name!r} have concepts the head lacks "
                         f"(e.g. {missing[0]!r}): the head was built for another concept set")
    logits = classifier_logits(model, tokenizer, [m for m, _ in pairs], task.name, batch_size, max_length)
    ranks = target_ranks(logits, torch.tensor([index[c] for _, c in pairs]))
    return _result(task.name, split, ranks, n_boot, seed, time.perf_counter() - t0)


@dataclass
class DictionaryIndex:
    """Encoded dictionary of a task: string embeddings and each string's concept index."""

    embeddings: torch.Tensor
    string_to_concept: torch.Tensor
    n_concepts: int
    concept_index: dict[str, int]
    seconds: float = 0.0


def encode_dictionary(model: Any, tokenizer: Any, task: ELTask, batch_size: int = 256,
                      max_length: int = 32) -> DictionaryIndex:
    """Encode ``task.dictionary`` once (reuse the result for every split at one model state)."""
    import time

    t0 = time.perf_counter()
    strings, idx = task.dictionary_index()
    emb = encode_texts(model, tokenizer, strings, batch_size, max_length)
    return DictionaryIndex(emb, torch.tensor(idx, dtype=torch.long), len(task.concept_names), task.concept_index,
                           time.perf_counter() - t0)


def evaluate_biencoder(model: Any, tokenizer: Any, task: ELTask, split: str = "test", *,
                       index: DictionaryIndex | None = None, max_items: int | None = None, item_seed: int = 0,
                       n_boot: int = 1000, seed: int = 0, batch_size: int = 256, max_length: int = 32,
                       chunk: int = 512) -> TaskEval:
    """accuracy@1/@5 over ``task``'s full dictionary, max over each concept's strings."""
    import time

    t0 = time.perf_counter()
    if index is None:
        index = encode_dictionary(model, tokenizer, task, batch_size, max_length)
    pairs = eval_pairs(task, split, max_items, item_seed)
    if not pairs:
        raise ValueError(f"task {task.name!r} has no {split} items to evaluate")
    task.check_concepts(f"{split} split", pairs, index.concept_index)
    q = encode_texts(model, tokenizer, [m for m, _ in pairs], batch_size, max_length)
    targets = torch.tensor([index.concept_index[c] for _, c in pairs])
    ranks = []
    for s in range(0, q.shape[0], chunk):
        scores = q[s:s + chunk] @ index.embeddings.T
        ranks.append(concept_ranks_from_string_scores(scores, index.string_to_concept, index.n_concepts,
                                                      targets[s:s + chunk]))
    return _result(task.name, split, torch.cat(ranks), n_boot, seed, time.perf_counter() - t0)


def evaluate_task(model: Any, tokenizer: Any, task: ELTask, splits: Sequence[str] = ("test",),
                  **kwargs: Any) -> dict[str, TaskEval | None]:
    """Evaluate ``task`` on each split with the formulation's protocol (one dictionary encoding)."""
    formulation = getattr(model, "formulation", None)
    if formulation == "classifier":
        return {s: evaluate_classifier(model, tokenizer, task, s, **kwargs) for s in splits}
    if formulation == "bi-encoder":
        enc_kw = {k: kwargs[k] for k in ("batch_size", "max_length") if k in kwargs}
        index = encode_dictionary(model, tokenizer, task, **enc_kw)
        return {s: evaluate_biencoder(model, tokenizer, task, s, index=index, **kwargs) for s in splits}
    raise TypeError(f"not an entity-linking model: {type(model).__name__}")


# ------------------------------------------------------------------ sequence metrics
def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _starts(R: Sequence[Sequence[Any]], start_rows: Sequence[int] | None) -> list[int]:
    n_cols = len(R[0]) if R else 0
    if start_rows is None:
        return list(range(n_cols))
    if len(start_rows) != n_cols:
        raise ValueError(f"start_rows has {len(start_rows)} entries for {n_cols} tasks")
    return [int(s) for s in start_rows]


def forgetting(R: Sequence[Sequence[float | None]],
               start_rows: Sequence[int] | None = None) -> tuple[list[float], float]:
    """Per-task forgetting and its mean; see the module doc. ``nan`` when undefined.

    ``R`` has one row per evaluation point and one column per task. ``start_rows[j]`` is
    the first row at which task j had been learnt (default ``j``: row i = after training
    task i). Tasks with ``start_rows[j] >= last row`` (the last task) have no forgetting.
    """
    T = len(R)
    starts = _starts(R, start_rows)
    per: list[float] = []
    for j, s in enumerate(starts):
        if s >= T - 1:
            continue
        earlier = [_nan(R[i][j]) for i in range(max(s, 0), T - 1)]
        earlier = [x for x in earlier if not math.isnan(x)]
        last = _nan(R[T - 1][j])
        per.append(max(earlier) - last if earlier and not math.isnan(last) else float("nan"))
    vals = [x for x in per if not math.isnan(x)]
    return per, (float(np.mean(vals)) if vals else float("nan"))


def sequence_metrics(R: Sequence[Sequence[float | None]],
                     baseline_R: Sequence[Sequence[float | None]] | None = None,
                     start_rows: Sequence[int] | None = None) -> dict[str, Any]:
    """forgetting (per task and mean), final average accuracy, last-task accuracy, and the reduction
    of forgetting relative to ``baseline_R`` (fine-tuning) when given."""
    T = len(R)
    per, f = forgetting(R, start_rows)
    final = [_nan(x) for x in R[T - 1]]
    out: dict[str, Any] = {
        "forgetting": f,
        "forgetting_per_task": per,
        "final_avg_acc": float(np.nanmean(final)) if not all(math.isnan(x) for x in final) else float("nan"),
        "last_task_acc": final[-1],
    }
    if baseline_R is not None:
        _, fb = forgetting(baseline_R, start_rows)
        out["reduction"] = 1.0 - f / fb if fb and not math.isnan(fb) and fb > 0 else float("nan")
    return out


def _interval(x: np.ndarray, confidence: float) -> list[float]:
    x = x[~np.isnan(x)]
    if x.size == 0:
        return [float("nan"), float("nan")]
    a = (1 - confidence) / 2
    lo, hi = np.quantile(x, [a, 1 - a])
    return [float(lo), float(hi)]


def _boot_rows(flags: Sequence[Sequence[np.ndarray | None]], idx: list[np.ndarray]) -> list[list[np.ndarray | None]]:
    """acc[i][j] per bootstrap draw: flags[i][j][idx[j]].mean(-1) (None where R is null)."""
    return [[None if f is None else np.asarray(f, dtype=np.float64)[idx[j]].mean(-1)
             for j, f in enumerate(row)] for row in flags]


def _boot_forgetting(acc: list[list[np.ndarray | None]], n_boot: int, starts: list[int]) -> np.ndarray:
    T = len(acc)
    per = []
    for j, s in enumerate(starts):
        if s >= T - 1:
            continue
        rows = [acc[i][j] for i in range(max(s, 0), T - 1) if acc[i][j] is not None]
        if not rows or acc[T - 1][j] is None:
            continue
        per.append(np.max(np.stack(rows), axis=0) - acc[T - 1][j])
    return np.mean(np.stack(per), axis=0) if per else np.full(n_boot, np.nan)


def _reduction_interval(f_boot: np.ndarray, fb: np.ndarray, confidence: float) -> dict[str, Any]:
    """``reduction_ci`` from paired draws of forgetting (method ``f_boot``, fine-tuning ``fb``).

    A draw where fine-tuning forgets nothing (``fb <= 0``, or undefined) has no reduction. When more
    than (1 - confidence) / 2 of the draws are such, a percentile interval over the others would
    misstate the uncertainty: ``reduction_ci`` is ``None`` with a ``reduction_ci_reason``. Otherwise the
    interval is over the defined draws. ``reduction_ci_dropped`` is the fraction of draws left out."""
    defined = np.isfinite(fb) & np.isfinite(f_boot) & (fb > 0)
    dropped = float(1.0 - defined.mean()) if defined.size else 1.0
    out: dict[str, Any] = {"reduction_ci_dropped": dropped}
    limit = (1.0 - confidence) / 2
    if dropped > limit:
        out["reduction_ci"] = None
        out["reduction_ci_reason"] = (
            f"fine-tuning forgets nothing (forgetting <= 0) in {dropped:.1%} of the {defined.size} bootstrap "
            f"draws, where the reduction is undefined; that is more than the {limit:.1%} a {confidence:.0%} "
            "interval may leave out, so no CI is given (forgetting_diff_vs_baseline_ci has no such gap)")
        return out
    red = 1.0 - f_boot[defined] / fb[defined]
    out["reduction_ci"] = _interval(red, confidence)
    return out


def bootstrap_sequence_metrics(flags: Sequence[Sequence[np.ndarray | None]],
                               baseline_flags: Sequence[Sequence[np.ndarray | None]] | None = None,
                               n_boot: int = 1000, seed: int = 0, confidence: float = 0.95,
                               start_rows: Sequence[int] | None = None) -> dict[str, Any]:
    """95% CIs of the sequence metrics from per-item correctness flags ``flags[i][j]`` (bool arrays
    over task j's items, ``None`` where R[i][j] is null).

    Items of each task are resampled with replacement, the same draw for every row and for
    ``baseline_flags`` (paired). Returns point estimates and ``[low, high]`` intervals of
    forgetting, final average accuracy, last-task accuracy and (with a baseline) reduction; the
    reduction's interval is ``None`` (with ``reduction_ci_reason``) when too many draws have no
    reduction, see :func:`_reduction_interval`.
    """
    T = len(flags)
    n_tasks = len(flags[0]) if flags else 0
    starts = _starts(flags, start_rows)
    rng = np.random.default_rng(seed)
    sizes = []
    for j in range(n_tasks):
        n = {len(row[j]) for row in flags if row[j] is not None}
        if baseline_flags is not None:
            n |= {len(row[j]) for row in baseline_flags if row[j] is not None}
        if len(n) > 1:
            raise ValueError(f"task {j}: rows have different numbers of items {sorted(n)}; flags must be paired")
        sizes.append(n.pop() if n else 0)
    idx = [rng.integers(0, max(n, 1), size=(n_boot, max(n, 1))) for n in sizes]
    acc = _boot_rows(flags, idx)
    R = [[None if f is None else float(np.mean(f)) for f in row] for row in flags]
    point = sequence_metrics(R, None if baseline_flags is None else
                             [[None if f is None else float(np.mean(f)) for f in row] for row in baseline_flags],
                             start_rows=starts)
    f_boot = _boot_forgetting(acc, n_boot, starts)
    final = [a for a in acc[T - 1] if a is not None]
    out: dict[str, Any] = {
        "forgetting": point["forgetting"],
        "forgetting_ci": _interval(f_boot, confidence),
        "final_avg_acc": point["final_avg_acc"],
        "final_avg_acc_ci": _interval(np.mean(np.stack(final), axis=0), confidence) if final else [float("nan")] * 2,
        "last_task_acc": point["last_task_acc"],
        "last_task_acc_ci": (_interval(acc[T - 1][-1], confidence) if acc[T - 1][-1] is not None
                             else [float("nan")] * 2),
    }
    if baseline_flags is not None:
        fb = _boot_forgetting(_boot_rows(baseline_flags, idx), n_boot, starts)
        out["reduction"] = point.get("reduction", float("nan"))
        out.update(_reduction_interval(f_boot, fb, confidence))
        out["forgetting_diff_vs_baseline"] = float(point["forgetting"] - sequence_metrics(
            [[None if f is None else float(np.mean(f)) for f in row] for row in baseline_flags],
            start_rows=starts)["forgetting"])
        out["forgetting_diff_vs_baseline_ci"] = _interval(f_boot - fb, confidence)
    return out
