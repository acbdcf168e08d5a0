"""Entity-linking tasks from users' own data: pair/dictionary files and BigBio KB datasets.

File formats (by extension): ``.jsonl`` / ``.json`` (one JSON object per line, or
a JSON array of objects), ``.csv`` and ``.tsv`` (with a header row), in UTF-8 (a
leading byte-order mark is fine; another encoding is a ValueError naming the file).
JSONL lines end at ``\n`` (or ``\r\n``) only, so strings may hold U+2028 or U+0085.

* Pairs file: fields ``mention`` and ``concept_id``, optionally ``split`` with
  values ``train``, ``dev`` (or ``validation``/``val``) or ``test``.
* Dictionary file: fields ``concept_id`` and ``name``, optionally ``synonyms``
  (a JSON list of strings, or in CSV/TSV one string with ``|`` between synonyms).

With a ``split`` on every pair, the splits are used as given and the task's
dictionary is the names plus the dictionary-file synonyms plus the train
mentions (``ELTask.leak_report`` tells whether such a split leaks). Without a
``split`` field (on no row), each concept's synonyms (dictionary file + pairs)
are split by the rule of :func:`hf_kfac.el.task.build_task`. Malformed rows and
pairs naming a concept missing from the dictionary raise ``ValueError`` with the
file, the line (or item) and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .task import ELTask, Pair, build_task, task_from_given_splits

__all__ = ["load_task_from_files", "load_bigbio_kb", "read_dictionary_file", "read_pairs_file"]

_SPLIT_ALIASES = {"train": "train", "training": "train", "dev": "dev", "validation": "dev",
                  "valid": "dev", "val": "dev", "test": "test", "testing": "test"}


def _read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location such as 'line 3', row dict) from a JSONL/JSON/CSV/TSV file."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if suffix in (".csv", ".tsv"):
        text = _read_text(path)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty file; the first line must be a header row")
        for row in reader:
            if None in row:
                raise ValueError(f"{path}: line {reader.line_num}: more values than header "
                                 f"columns {reader.fieldnames}; quote values that contain "
                                 "the delimiter")
            if None in row.values():
                raise ValueError(f"{path}: line {reader.line_num}: fewer values ({sum(v is not None for v in row.values())}) "
                                 f"than header columns {reader.fieldnames}; fill the missing "
                                 "values (an empty value still needs its delimiter)")
            yield f"line {reader.line_num}", row
        return
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .tsv")
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON array ({exc.msg} at line {exc.lineno})") from exc
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise ValueError(f"{path}: item {i}: expected a JSON object, got "
                                 f"{type(item).__name__}")
            yield f"item {i}", item
        return
    # split on "\n" only: str.splitlines would also split on U+2028, U+0085 ... inside JSON strings
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {n}: invalid JSON ({exc.msg}); each line must be one "
                             'JSON object such as {"mention": "...", "concept_id": "..."}') from exc
        if not isinstance(item, dict):
            raise ValueError(f"{path}: line {n}: expected a JSON object, got {type(item).__name__}")
        yield f"line {n}", item


def _read_text(path: Path) -> str:
    """The file's text as UTF-8 (a leading byte-order mark is dropped); other encodings are an error."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 (byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                         f"{exc.start}); the file must be UTF-8: re-save it as UTF-8, e.g. "
                         f"iconv -f latin1 -t utf-8") from exc


def _field(path: Path, where: str, row: Mapping[str, Any], name: str, example: str) -> str:
    """Required non-empty string field ``name`` of ``row`` (numbers become strings)."""
    if name not in row or row[name] is None:
        raise ValueError(f"{path}: {where}: missing field {name!r} (found {sorted(row)}); "
                         f"every row needs it, e.g. {example}")
    value = row[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"{path}: {where}: field {name!r} must be a string, got "
                         f"{type(value).__name__}")
    value = " ".join(value.split())
    if not value:
        raise ValueError(f"{path}: {where}: empty {name!r}; remove the row or fill the field")
    return value


def read_dictionary_file(path: str | os.PathLike[str]) -> dict[str, tuple[str, list[str]]]:
    """Read a dictionary file: concept id -> (name, synonyms); duplicate ids are errors."""
    path = Path(path)
    example = '{"concept_id": "D003924", "name": "Type 2 diabetes", "synonyms": ["T2DM"]}'
    concepts: dict[str, tuple[str, list[str]]] = {}
    first_seen: dict[str, str] = {}
    for where, row in _read_rows(path):
        cid = _field(path, where, row, "concept_id", example)
        name = _field(path, where, row, "name", example)
        raw = row.get("synonyms")
        synonyms: list[str] = []
        if raw is None or raw == "":
            pass
        elif isinstance(raw, str):
            synonyms = [" ".join(s.split()) for s in raw.split("|") if s.strip()]
        elif isinstance(raw, list):
            for j, s in enumerate(raw):
                if not isinstance(s, str) or not s.strip():
                    raise ValueError(f"{path}: {where}: synonym {j} of {cid!r} is empty or not a "
                                     "string; synonyms must be non-empty strings")
                synonyms.append(" ".join(s.split()))
        else:
            raise ValueError(f"{path}: {where}: 'synonyms' must be a list of strings or a "
                             f"'|'-separated string, got {type(raw).__name__}")
        if cid in concepts:
            raise ValueError(f"{path}: {where}: concept id {cid!r} already defined at "
                             f"{first_seen[cid]}; give each concept one row (put extra names in "
                             "'synonyms')")
        concepts[cid] = (name, synonyms)
        first_seen[cid] = where
    if not concepts:
        raise ValueError(f"{path}: no concepts; expected rows like {example}")
    return concepts


def read_pairs_file(path: str | os.PathLike[str],
                    known_ids: Mapping[str, Any] | None = None) -> list[tuple[str, str, str | None]]:
    """Read a pairs file: [(mention, concept id, split or None)], validating the rows.

    With ``known_ids``, a pair whose concept id is not among them is an error.
    """
    path = Path(path)
    example = '{"mention": "T2D", "concept_id": "D003924", "split": "test"}'
    pairs: list[tuple[str, str, str | None]] = []
    for where, row in _read_rows(path):
        mention = _field(path, where, row, "mention", example)
        cid = _field(path, where, row, "concept_id", example)
        split = row.get("split")
        if split is not None and split != "":
            if not isinstance(split, str) or split.strip().lower() not in _SPLIT_ALIASES:
                raise ValueError(f"{path}: {where}: unknown split {split!r}; use 'train', 'dev' "
                                 "or 'test'")
            split = _SPLIT_ALIASES[split.strip().lower()]
        else:
            split = None
        if known_ids is not None and cid not in known_ids:
            raise ValueError(f"{path}: {where}: unknown concept id {cid!r} (not in the "
                             "dictionary); add the concept to the dictionary file or fix the id")
        pairs.append((mention, cid, split))
    if not pairs:
        raise ValueError(f"{path}: no pairs; expected rows like {example}")
    with_split = [p for p in pairs if p[2] is not None]
    if with_split and len(with_split) != len(pairs):
        raise ValueError(f"{path}: {len(pairs) - len(with_split)} of {len(pairs)} rows have no "
                         "'split'; give every row a split (train/dev/test) or none at all "
                         "(then the built-in split rule is applied)")
    return pairs


def load_task_from_files(name: str, pairs_path: str | os.PathLike[str],
                         dictionary_path: str | os.PathLike[str]) -> ELTask:
    """Task from a pairs file and a dictionary file (formats in the module docstring)."""
    concepts = read_dictionary_file(dictionary_path)
    pairs = read_pairs_file(pairs_path, known_ids=concepts)
    meta = {"source": f"files:{os.fspath(pairs_path)},{os.fspath(dictionary_path)}"}
    if pairs[0][2] is None:
        merged = {cid: (n, list(syns)) for cid, (n, syns) in concepts.items()}
        for mention, cid, _ in pairs:
            merged[cid][1].append(mention)
        return build_task(name, merged, meta=meta)
    splits: dict[str, list[Pair]] = {"train": [], "dev": [], "test": []}
    for mention, cid, split in pairs:
        splits[str(split)].append((mention, cid))
    extra = [(s, cid) for cid, (_, syns) in concepts.items() for s in syns]
    return task_from_given_splits(name, {c: n for c, (n, _) in concepts.items()}, splits,
                                  extra_dictionary=extra, meta=meta)


def _load_hf_dataset(dataset_or_path: Any, config: str | None, load_kwargs: dict[str, Any]) -> Any:
    """``datasets.load_dataset`` for a Hub id, a local dataset folder or one data file."""
    import datasets  # local import: keeps hf_kfac.el light

    if isinstance(dataset_or_path, (datasets.DatasetDict, datasets.Dataset)):
        return dataset_or_path
    path = Path(os.fspath(dataset_or_path))
    if path.is_file():
        suffix = path.suffix.lower()
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(suffix)
        if builder is None:
            raise ValueError(f"{path}: unsupported data file {suffix!r} for a BigBio KB dataset; "
                             "use .json/.jsonl/.parquet or a dataset folder")
        return datasets.load_dataset(builder, data_files=str(path), **load_kwargs)
    return datasets.load_dataset(os.fspath(dataset_or_path), config, **load_kwargs)


def load_bigbio_kb(
    name: str,
    dataset_or_path: Any,
    *,
    config: str | None = None,
    dictionary_path: str | os.PathLike[str] | None = None,
    db_name: str | None = None,
    entity_types: str | Sequence[str] | None = None,
    prefix_db_name: bool = True,
    on_unknown: Literal["error", "drop"] = "error",
    dedupe: bool = True,
    **load_kwargs: Any,
) -> ELTask:
    """Task from a dataset in the BigBio KB schema (``entities`` with ``text``/``normalized``).

    ``dataset_or_path`` is a Hub id, a local dataset folder, one .json/.jsonl/.parquet
    file (one split, 'train') or an already loaded ``datasets`` (Dataset)Dict;
    ``config`` and ``load_kwargs`` (e.g. ``cache_dir``) go to ``datasets.load_dataset``.
    Each entity gives one pair: mention = its ``text`` pieces joined by a space,
    concept id = ``"{db_name}:{db_id}"`` (just ``db_id`` with ``prefix_db_name=False``).
    Entities are skipped (counted in ``meta``) when their type is not in
    ``entity_types``, when they have no normalisation (for ``db_name`` if given), or
    several distinct ones. Split names train / validation (dev, valid) / test map to
    train / dev / test; other split names are an error. Corpus-level duplicate
    pairs are kept once per split with ``dedupe``.

    Concept names come from ``dictionary_path`` (the dictionary file format of
    :func:`load_task_from_files`, ids written as the concept ids above); a pair
    whose concept is not there raises ValueError (``on_unknown="error"``) or is
    dropped (``"drop"``). Without a dictionary, the concepts are those seen in
    train, each named by its most frequent train mention (ties: smallest string),
    and dev/test pairs of unseen concepts are dropped (counted in ``meta``).
    When the dataset has only a train split, the split rule of ``build_task`` is
    applied to the concepts' synonyms (dictionary synonyms + mentions).
    ``entity_types`` may be one type (``"Disease"``) or several. When no concept or
    no pair is left (wrong ``entity_types`` / ``db_name``, or no train split and no
    ``dictionary_path``), ValueError says so.
    """
    data = _load_hf_dataset(dataset_or_path, config, load_kwargs)
    import datasets

    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({"train": data})
    source = (os.fspath(dataset_or_path) if isinstance(dataset_or_path, (str, os.PathLike))
              else "<dataset>")
    splits: dict[str, list[Pair]] = {}
    counts: Counter[str] = Counter()
    if on_unknown not in ("error", "drop"):
        raise ValueError(f"on_unknown must be 'error' or 'drop', got {on_unknown!r}")
    if isinstance(entity_types, str):  # one type, not its characters
        entity_types = [entity_types]
    types = set(entity_types) if entity_types is not None else None
    for split_name in data:
        split = _SPLIT_ALIASES.get(split_name.lower())
        if split is None:
            raise ValueError(f"{source}: split {split_name!r} is not train/validation/test; "
                             "select or rename the splits before loading")
        if split in splits:
            raise ValueError(f"{source}: two splits map to {split!r}; keep only one of them")
        pairs: list[Pair] = []
        for i, example in enumerate(data[split_name]):
            entities = example.get("entities")
            if entities is None:
                raise ValueError(f"{source}: split {split_name!r} row {i}: no 'entities' field; "
                                 "is this a BigBio *_bigbio_kb config?")
            for j, ent in enumerate(entities):
                where = f"{source}: split {split_name!r} row {i} entity {j} (id {ent.get('id')!r})"
                if types is not None and ent.get("type") not in types:
                    counts["skipped_type"] += 1
                    continue
                if "text" not in ent or "normalized" not in ent:
                    raise ValueError(f"{where}: missing 'text' or 'normalized'; BigBio KB "
                                     "entities need both")
                pieces = ent["text"] or []
                if isinstance(pieces, str):
                    pieces = [pieces]
                mention = " ".join(" ".join(str(p) for p in pieces).split())
                if not mention:
                    raise ValueError(f"{where}: empty mention text; remove or fix the entity")
                ids = set()
                for norm in ent["normalized"] or []:
                    db, dbid = norm.get("db_name") or "", norm.get("db_id") or ""
                    if not dbid or (db_name is not None and db != db_name):
                        continue
                    ids.add(f"{db}:{dbid}" if prefix_db_name and db else str(dbid))
                if not ids:
                    counts["skipped_unnormalized"] += 1
                    continue
                if len(ids) > 1:
                    counts["skipped_multi_concept"] += 1
                    continue
                pairs.append((mention, ids.pop()))
        splits[split] = pairs

    meta: dict[str, Any] = {"source": f"bigbio_kb:{source}"}
    if dictionary_path is not None:
        concepts = read_dictionary_file(dictionary_path)
    else:
        freq: dict[str, Counter[str]] = {}
        for mention, cid in splits.get("train", []):
            freq.setdefault(cid, Counter())[mention] += 1
        concepts = {cid: (min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0], [])
                    for cid, c in freq.items()}
    for split, pairs in splits.items():
        kept = [p for p in pairs if p[1] in concepts]
        if len(kept) != len(pairs):
            unknown = next(p for p in pairs if p[1] not in concepts)
            if dictionary_path is not None and on_unknown == "error":
                raise ValueError(f"{source}: split {split!r}: concept id {unknown[1]!r} (mention "
                                 f"{unknown[0]!r}) is not in the dictionary {dictionary_path}; "
                                 "add it there, or pass on_unknown='drop'")
            counts[f"dropped_unknown_{split}"] += len(pairs) - len(kept)
        splits[split] = kept
    meta.update(counts)
    if not concepts or not any(splits.values()):
        raise ValueError(f"{source}: no concepts or pairs remain (counts: {dict(counts) or 'none'}; splits: "
                         f"{sorted(splits)}); check entity_types / db_name"
                         + ("" if dictionary_path is not None else
                            ", or pass dictionary_path= (without it, concepts come from the train split only)"))
    if set(splits) == {"train"}:
        merged = {cid: (n, list(syns)) for cid, (n, syns) in concepts.items()}
        for mention, cid in splits["train"]:
            merged[cid][1].append(mention)
        return build_task(name, merged, meta=meta)
    extra = [(s, cid) for cid, (_, syns) in concepts.items() for s in syns]
    return task_from_given_splits(name, {c: n for c, (n, _) in concepts.items()}, splits,
                                  extra_dictionary=extra, meta=meta, dedupe=dedupe)
