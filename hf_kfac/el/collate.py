"""Training data of the entity-linking models: tokenised datasets and padding collators.

Datasets are pre-tokenised ``datasets.Dataset`` objects whose column names are the
arguments of the model's ``forward``, so the ``Trainer``'s ``remove_unused_columns``
keeps them all:

* classifier (:func:`classifier_dataset`): ``input_ids``, ``attention_mask``,
  ``task_id`` (index of the task's head in ``model.task_names``) and ``labels`` (class
  index within that head). By default the training strings are the task's
  **dictionary** (each concept's preferred name plus the train mentions), so concepts
  without any train synonym are still learnt from their name.
* bi-encoder (:func:`pair_dataset`): ``input_ids``/``attention_mask`` of a string,
  ``pos_input_ids``/``pos_attention_mask`` of a positive (its concept's name or
  another dictionary string of the concept, drawn with a seed) and ``concept`` (a
  62-bit key of (task, concept id), used to mask same-concept in-batch candidates).

Collators pad dynamically and put the mention's ``input_ids`` and ``attention_mask``
first in the batch: the Fisher estimator takes the batch size from the first tensor
and matches each module's positions to the first ``*attention_mask`` of the right shape.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .models import concept_key
from .task import ELTask

__all__ = [
    "classifier_examples",
    "pair_examples",
    "classifier_dataset",
    "pair_dataset",
    "ELCollator",
    "tokenize_strings",
]


def tokenize_strings(tokenizer: Any, texts: Sequence[str], max_length: int = 32) -> dict[str, list[list[int]]]:
    """Token ids and attention masks (unpadded lists), truncated to ``max_length``."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def classifier_examples(task: ELTask, source: str = "dictionary") -> list[tuple[str, int]]:
    """(string, class index) pairs: ``source`` = ``dictionary`` (names + train mentions) or ``train``."""
    index = task.concept_index
    pairs = task.dictionary if source == "dictionary" else task.split(source)
    task.check_concepts(source, pairs, index)
    return [(s, index[c]) for s, c in pairs]


def pair_examples(task: ELTask, seed: int = 0, pairs_per_string: int = 1) -> list[tuple[str, str, str]]:
    """(string, positive string, concept id) triples for bi-encoder training.

    Every dictionary string (names and train mentions) of a concept with at least two
    strings is paired with another string of the same concept, drawn with ``seed``
    (``pairs_per_string`` draws, without repeating a positive while others remain).
    """
    rng = random.Random(seed)
    by_concept: dict[str, list[str]] = {}
    for s, c in task.dictionary:
        lst = by_concept.setdefault(c, [])
        if s not in lst:
            lst.append(s)
    out: list[tuple[str, str, str]] = []
    for s, c in task.dictionary:
        others = [o for o in by_concept[c] if o != s]
        if not others:
            continue
        picks = rng.sample(others, min(pairs_per_string, len(others)))
        while len(picks) < pairs_per_string:
            picks.append(rng.choice(others))
        out.extend((s, p, c) for p in picks)
    return out


def classifier_dataset(task: ELTask, tokenizer: Any, task_id: int, source: str = "dictionary",
                       max_length: int = 32):
    """Tokenised classifier training set of ``task`` (see module doc)."""
    from datasets import Dataset

    ex = classifier_examples(task, source)
    enc = tokenize_strings(tokenizer, [s for s, _ in ex], max_length)
    return Dataset.from_dict({
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "task_id": [int(task_id)] * len(ex),
        "labels": [y for _, y in ex],
    })


def pair_dataset(task: ELTask, tokenizer: Any, seed: int = 0, pairs_per_string: int = 1, max_length: int = 32):
    """Tokenised bi-encoder training pairs of ``task`` (see module doc)."""
    from datasets import Dataset

    ex = pair_examples(task, seed, pairs_per_string)
    a = tokenize_strings(tokenizer, [s for s, _, _ in ex], max_length)
    b = tokenize_strings(tokenizer, [p for _, p, _ in ex], max_length)
    return Dataset.from_dict({
        "input_ids": a["input_ids"],
        "attention_mask": a["attention_mask"],
        "pos_input_ids": b["input_ids"],
        "pos_attention_mask": b["attention_mask"],
        "concept": [concept_key(task.name, c) for _, _, c in ex],
    })


def _pad(seqs: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


class ELCollator:
    """Pads ``input_ids``/``attention_mask`` (and ``pos_*``) of a list of examples; stacks the rest.

    Mention and positive sequences are padded to one common length, so both attention masks
    have the same shape and the mention's (first in the batch) is the one the Fisher
    estimator picks for the hooked mention path.
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = int(pad_token_id)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> "ELCollator":
        pad = getattr(tokenizer, "pad_token_id", None)
        return cls(0 if pad is None else pad)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        keys = list(features[0])
        seq_keys = [k for k in ("input_ids", "attention_mask", "pos_input_ids", "pos_attention_mask") if k in keys]
        length = max(len(f[k]) for f in features for k in seq_keys) if seq_keys else 0
        batch: dict[str, torch.Tensor] = {}
        for k in seq_keys:
            pad = self.pad_token_id if k.endswith("input_ids") else 0
            batch[k] = _pad([f[k] for f in features], pad, length)
        for k in keys:
            if k in batch:
                continue
            vals = [f[k] for f in features]
            if isinstance(vals[0], str):
                continue
            batch[k] = torch.as_tensor(vals, dtype=torch.long)
        return batch
