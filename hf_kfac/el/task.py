"""Entity-linking tasks and the deterministic, leak-free split rule.

An :class:`ELTask` maps mentions (strings) to concept ids of one vocabulary.

Split rule (:func:`build_task`), applied to ``concept id -> (preferred name,
synonyms)``; anyone can regenerate a split from the same vocabulary with it:

1. Concepts are ordered by sorted concept id. Within a concept, synonyms keep
   their input order. A *mention* is a synonym whose case-folded, whitespace-
   collapsed form differs from the concept's preferred name; duplicates within a
   concept (same case-folded form) are kept once (first occurrence).
2. Every string gets ``normalization_key`` (:mod:`hf_kfac.el.normalize`: folds
   case, accents, punctuation, word order, plural -s, a few UK/US spellings,
   stop words). Mentions with an empty key are dropped.
3. Ambiguity is decided **per key**: a key reached by the names or mentions of
   more than one concept is ambiguous, and every mention with that key is
   dropped from all splits and from the dictionary. (Per key rather than per
   exact string: a string that is a variant of two concepts' strings could
   otherwise put one concept's variant in test and the other's in train.)
   Preferred names are never dropped: every concept stays in the dictionary
   under its name, even when two names share a key.
4. A mention whose key equals the key of its own concept's preferred name goes
   to train (it is a trivial re-spelling of the name).
5. Every other mention goes by ``u = int(sha1(key.encode("utf-8")).hexdigest()[:16],
   16) / 2**64``: ``u < 0.7`` -> train, ``u < 0.8`` -> dev, else test. All
   mentions with one key (a variant family) thus land in one split.
6. ``train`` holds mention pairs only (not the names); ``dictionary`` is every
   concept's preferred name plus the train mentions. Use ``dictionary`` as the
   training set when the names should be trained on too.

Consequences: no dev/test string or key occurs in train or in the dictionary,
and no key is shared by two splits (``ELTask.leak_report`` checks this).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .normalize import normalization_key

__all__ = [
    "ELTask",
    "build_task",
    "split_of_key",
    "canonical_form",
    "TRAIN_FRACTION",
    "DEV_FRACTION",
]

TRAIN_FRACTION = 0.7
DEV_FRACTION = 0.1

Pair = tuple[str, str]


def canonical_form(text: str) -> str:
    """Case-folded, whitespace-collapsed form used for exact-string comparisons."""
    return " ".join(text.casefold().split())


def split_of_key(key: str) -> str:
    """Split ('train'/'dev'/'test') of a normalisation key by its SHA-1 hash (rule 5)."""
    u = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64
    if u < TRAIN_FRACTION:
        return "train"
    if u < TRAIN_FRACTION + DEV_FRACTION:
        return "dev"
    return "test"


@dataclass
class ELTask:
    """An entity-linking task: concepts, mention splits and the candidate dictionary.

    Attributes:
        name: task name ("diseases", "drugs", "phenotypes" or user-given).
        concept_names: concept id -> preferred name; its order is the concept order
            (sorted ids for built tasks) and defines class indices for classifiers.
        train: (mention, concept id) pairs for training; synonyms only, no names.
        dev: held-out (mention, concept id) pairs for model selection.
        test: held-out (mention, concept id) pairs for the final evaluation.
        dictionary: (string, concept id) candidate strings for retrieval: each
            concept's name plus the train mentions (plus, for user data with given
            splits, the synonyms listed in the dictionary file).
        meta: provenance and drop counts (source, package version, ...).
    """

    name: str
    concept_names: dict[str, str]
    train: list[Pair]
    dev: list[Pair]
    test: list[Pair]
    dictionary: list[Pair]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def concept_ids(self) -> list[str]:
        """Concept ids in class-index order."""
        return list(self.concept_names)

    @property
    def concept_index(self) -> dict[str, int]:
        """Concept id -> class index (position in ``concept_names``)."""
        return {cid: i for i, cid in enumerate(self.concept_names)}

    def dictionary_index(self) -> tuple[list[str], list[int]]:
        """Dictionary strings and, aligned, the class index of each string's concept."""
        index = self.concept_index
        self.check_concepts("dictionary", self.dictionary, index)
        return [s for s, _ in self.dictionary], [index[c] for _, c in self.dictionary]

    def check_concepts(self, what: str, pairs: Sequence[Pair], known: Mapping[str, int] | None = None) -> None:
        """Raise a ValueError naming the task, ``what`` (a split or "dictionary") and a pair whose concept
        id is not among ``known`` (default: the task's concepts)."""
        known = self.concept_index if known is None else known
        bad = [(s, c) for s, c in pairs if c not in known]
        if bad:
            s, c = bad[0]
            raise ValueError(
                f"task {self.name!r}: {len(bad)} {what} pair(s) name a concept that is not among the task's "
                f"{len(known)} concepts (concept_names), e.g. {s!r} -> {c!r}. Every concept id used by the "
                "splits and the dictionary must be a key of concept_names, spelt exactly alike (case, prefixes "
                "such as 'MESH:'); a hand-built or filtered ELTask likely dropped it from concept_names or "
                "spells it differently (ELTask.subset keeps them in step).")

    def split(self, which: str) -> list[Pair]:
        """Pairs of one split: 'train', 'dev' (alias 'validation') or 'test'."""
        which = {"validation": "dev", "val": "dev"}.get(which, which)
        if which not in ("train", "dev", "test"):
            raise ValueError(f"unknown split {which!r}; use 'train', 'dev' or 'test'")
        return {"train": self.train, "dev": self.dev, "test": self.test}[which]

    def subset(self, n_concepts: int | None, seed: int = 0, max_train: int | None = None) -> ELTask:
        """Deterministic sub-task on ``n_concepts`` concepts drawn with ``seed``.

        Concepts are sampled with ``random.Random(seed)`` from the sorted ids (all of
        them when ``n_concepts`` is None or not smaller than the task); their
        pairs are kept in order. ``max_train`` then keeps a seeded sample of at most
        that many train pairs (original order). The dictionary is rebuilt as the
        kept concepts' names plus the kept train mentions (plus extra dictionary
        synonyms of user data), so dev/test strings still never appear in it.
        """
        rng = random.Random(seed)
        ids = sorted(self.concept_names)
        if n_concepts is not None and n_concepts < len(ids):
            if n_concepts <= 0:
                raise ValueError(f"n_concepts must be positive, got {n_concepts}")
            keep = set(rng.sample(ids, n_concepts))
        else:
            keep = set(ids)
        names = {c: n for c, n in self.concept_names.items() if c in keep}
        train = [p for p in self.train if p[1] in keep]
        if max_train is not None and len(train) > max_train:
            if max_train < 0:
                raise ValueError(f"max_train must be >= 0, got {max_train}")
            chosen = sorted(rng.sample(range(len(train)), max_train))
            train = [train[i] for i in chosen]
        train_set = set(train)
        dropped_train = {p for p in self.train if p[1] in keep} - train_set
        dictionary = [p for p in self.dictionary if p[1] in keep and p not in dropped_train]
        meta = dict(self.meta)
        meta["subset"] = {"n_concepts": n_concepts, "seed": seed, "max_train": max_train,
                          "parent_concepts": len(self.concept_names)}
        return ELTask(
            name=self.name,
            concept_names=names,
            train=train,
            dev=[p for p in self.dev if p[1] in keep],
            test=[p for p in self.test if p[1] in keep],
            dictionary=dictionary,
            meta=meta,
        )

    def stats(self) -> dict[str, Any]:
        """Sizes: concepts, pairs per split, dictionary strings, concepts seen per split."""
        out: dict[str, Any] = {
            "name": self.name,
            "concepts": len(self.concept_names),
            "train": len(self.train),
            "dev": len(self.dev),
            "test": len(self.test),
            "dictionary": len(self.dictionary),
            "train_concepts": len({c for _, c in self.train}),
            "dev_concepts": len({c for _, c in self.dev}),
            "test_concepts": len({c for _, c in self.test}),
        }
        for k in ("dropped_ambiguous", "dropped_empty_key", "duplicates_removed"):
            if k in self.meta:
                out[k] = self.meta[k]
        return out

    def leak_report(self) -> dict[str, int]:
        """Counts of leaks between splits (all zero for tasks made by :func:`build_task`).

        Strings are compared by :func:`canonical_form`, keys by ``normalization_key``.
        """
        forms = {s: {canonical_form(m) for m, _ in getattr(self, s)} for s in ("train", "dev", "test")}
        keys = {s: {normalization_key(m) for m, _ in getattr(self, s)} for s in ("train", "dev", "test")}
        dict_forms = {canonical_form(m) for m, _ in self.dictionary}
        dict_keys = {normalization_key(m) for m, _ in self.dictionary}
        return {
            "dev_strings_in_dictionary": len(forms["dev"] & dict_forms),
            "test_strings_in_dictionary": len(forms["test"] & dict_forms),
            "dev_strings_in_train": len(forms["dev"] & forms["train"]),
            "test_strings_in_train": len(forms["test"] & forms["train"]),
            "dev_test_shared_strings": len(forms["dev"] & forms["test"]),
            "dev_keys_in_dictionary": len(keys["dev"] & dict_keys),
            "test_keys_in_dictionary": len(keys["test"] & dict_keys),
            "train_dev_shared_keys": len(keys["train"] & keys["dev"]),
            "train_test_shared_keys": len(keys["train"] & keys["test"]),
            "dev_test_shared_keys": len(keys["dev"] & keys["test"]),
        }

    def __repr__(self) -> str:
        s = self.stats()
        return (f"ELTask(name={self.name!r}, concepts={s['concepts']}, train={s['train']}, "
                f"dev={s['dev']}, test={s['test']}, dictionary={s['dictionary']})")


def build_task(
    name: str,
    concepts: Mapping[str, tuple[str, Iterable[str]]],
    meta: Mapping[str, Any] | None = None,
) -> ELTask:
    """Apply the module's split rule to ``concept id -> (preferred name, synonyms)``."""
    ids = sorted(concepts)
    names: dict[str, str] = {}
    mentions: list[tuple[str, str, str]] = []  # (mention, concept id, key)
    key_owners: dict[str, set[str]] = {}
    name_key: dict[str, str] = {}
    duplicates = 0
    empty = 0
    for cid in ids:
        if not isinstance(cid, str) or not cid:
            raise ValueError(f"concept ids must be non-empty strings, got {cid!r}")
        pref, syns = concepts[cid]
        if not isinstance(pref, str) or not pref.strip():
            raise ValueError(f"concept {cid!r} has an empty preferred name")
        pref = " ".join(pref.split())
        names[cid] = pref
        nk = normalization_key(pref)
        name_key[cid] = nk
        if nk:
            key_owners.setdefault(nk, set()).add(cid)
        seen = {canonical_form(pref)}
        if isinstance(syns, (str, bytes)) or syns is None:
            raise ValueError(f"concept {cid!r}: synonyms must be a list of strings, got "
                             f"{type(syns).__name__} {syns!r}; write ({pref!r}, [{syns!r}]) for one synonym, "
                             "or [] for none")
        for syn in syns:
            if not isinstance(syn, str):
                raise ValueError(f"concept {cid!r}: synonym {syn!r} is a {type(syn).__name__}, not a string "
                                 "(a missing value such as None or NaN?); drop it or give the text")
            syn = " ".join(syn.split())
            form = canonical_form(syn)
            if form in seen:
                duplicates += form != canonical_form(pref)
                continue
            seen.add(form)
            key = normalization_key(syn)
            if not key:
                empty += 1
                continue
            mentions.append((syn, cid, key))
            key_owners.setdefault(key, set()).add(cid)

    train: list[Pair] = []
    dev: list[Pair] = []
    test: list[Pair] = []
    out = {"train": train, "dev": dev, "test": test}
    ambiguous_keys = {k for k, owners in key_owners.items() if len(owners) > 1}
    dropped = 0
    for syn, cid, key in mentions:
        if key in ambiguous_keys:
            dropped += 1
            continue
        where = "train" if key == name_key[cid] else split_of_key(key)
        out[where].append((syn, cid))
    dictionary = [(names[c], c) for c in ids] + list(train)
    info: dict[str, Any] = dict(meta or {})
    info.update({
        "split_rule": "hf_kfac.el.task (sha1 of normalisation key; 70/10/20)",
        "dropped_ambiguous": dropped,
        "dropped_empty_key": empty,
        "duplicates_removed": duplicates,
        "ambiguous_keys": len(ambiguous_keys),
        "concepts_sharing_name_key": sum(
            1 for c in ids if name_key[c] and name_key[c] in ambiguous_keys),
    })
    return ELTask(name=name, concept_names=names, train=train, dev=dev, test=test,
                  dictionary=dictionary, meta=info)


def task_from_given_splits(
    name: str,
    concept_names: Mapping[str, str],
    splits: Mapping[str, Sequence[Pair]],
    extra_dictionary: Sequence[Pair] = (),
    meta: Mapping[str, Any] | None = None,
    dedupe: bool = True,
) -> ELTask:
    """Task from user-given splits: dictionary = names + ``extra_dictionary`` + train.

    With ``dedupe`` exact duplicate pairs within a split are kept once. The split
    is used as given; ``ELTask.leak_report`` tells whether it leaks.
    """
    def _dedupe(pairs: Sequence[Pair]) -> list[Pair]:
        if not dedupe:
            return list(pairs)
        return list(dict.fromkeys(pairs))

    names = {c: concept_names[c] for c in sorted(concept_names)}
    train = _dedupe(splits.get("train", []))
    dictionary = list(dict.fromkeys([(n, c) for c, n in names.items()]
                                    + list(extra_dictionary) + train))
    info = dict(meta or {})
    info["split_rule"] = "given"
    return ELTask(name=name, concept_names=names, train=train,
                  dev=_dedupe(splits.get("dev", [])), test=_dedupe(splits.get("test", [])),
                  dictionary=dictionary, meta=info)

