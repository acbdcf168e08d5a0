"""What hf_kfac.el's loaders and build_task accept and refuse: encodings, JSONL line splitting, short CSV
rows, BigBio KB options, and synonyms that are not lists of strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_kfac.el.loaders import load_bigbio_kb, read_dictionary_file
from hf_kfac.el.task import build_task


# ------------------------------------------------------------------ 6. encodings and short rows
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_utf8_with_byte_order_mark_is_read(tmp_path: Path, suffix: str) -> None:
    body = {".csv": "concept_id,name\nD1,Asthma\n",
            ".jsonl": json.dumps({"concept_id": "D1", "name": "Asthma"}) + "\n",
            ".json": json.dumps([{"concept_id": "D1", "name": "Asthma"}])}[suffix]
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(("\ufeff" + body).encode("utf-8"))  # what Excel's "CSV UTF-8" writes
    assert read_dictionary_file(path) == {"D1": ("Asthma", [])}


def test_a_file_that_is_not_utf8_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("concept_id,name\nD1,Sjögren syndrome\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv: not valid UTF-8.*must be UTF-8"):
        read_dictionary_file(path)


def test_a_short_csv_row_says_it_has_fewer_values_than_the_header(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    path.write_text("concept_id,name,synonyms\nD1\n")
    with pytest.raises(ValueError, match=r"line 2: fewer values \(1\) than header columns") as info:
        read_dictionary_file(path)
    assert "missing field" not in str(info.value)


# ------------------------------------------------------------------ 7. JSONL lines
@pytest.mark.parametrize("char", ["\u2028", "\x85", "\u2029"])
def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path: Path, char: str) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"concept_id": "D1", "name": f"Coxsackie{char}virus", "synonyms": [f"asthma{char}bronchial"]},
            {"concept_id": "D2", "name": "Gout"}]
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    got = read_dictionary_file(path)
    assert set(got) == {"D1", "D2"} and got["D2"] == ("Gout", [])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[1]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: invalid JSON"):  # line numbers still count "\n" only
        read_dictionary_file(bad)


# ------------------------------------------------------------------ 8. BigBio KB
def _bigbio(folder: Path, splits: dict[str, list[tuple[str, str, str]]]) -> Path:
    """A local BigBio KB dataset: split -> [(mention, db_id, type)], one document per entity."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, ents in splits.items():
        lines = []
        for i, (text, dbid, typ) in enumerate(ents):
            lines.append(json.dumps({"id": f"{split}{i}", "document_id": f"{split}{i}", "passages": [], "events": [],
                                     "coreferences": [], "relations": [], "entities": [
                                         {"id": f"e{i}", "type": typ, "text": [text], "offsets": [[0, 1]],
                                          "normalized": [{"db_name": "MESH", "db_id": dbid}]}]}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_bigbio_entity_types_may_be_one_string(tmp_path: Path) -> None:
    data = _bigbio(tmp_path / "ds", {"train": [("heart attack", "D1", "Disease"), ("aspirin", "D9", "Chemical")],
                                     "validation": [("MI", "D1", "Disease")], "test": [("infarct", "D1", "Disease")]})
    task = load_bigbio_kb("c", str(data), entity_types="Disease", cache_dir=str(tmp_path / "cache"))
    assert set(task.concept_names) == {"MESH:D1"} and task.meta["skipped_type"] == 1
    assert task.dev == [("MI", "MESH:D1")] and task.test == [("infarct", "MESH:D1")]


def test_bigbio_on_unknown_is_validated(tmp_path: Path) -> None:
    data = _bigbio(tmp_path / "ds", {"train": [("heart attack", "D1", "Disease")]})
    with pytest.raises(ValueError, match=r"on_unknown must be 'error' or 'drop', got 'raise'"):
        load_bigbio_kb("c", str(data), on_unknown="raise", cache_dir=str(tmp_path / "cache"))  # type: ignore[arg-type]


def test_bigbio_with_nothing_left_is_an_error_suggesting_a_dictionary(tmp_path: Path) -> None:
    # no train split and no dictionary: no concept can be named
    data = _bigbio(tmp_path / "ds", {"validation": [("MI", "D1", "Disease")], "test": [("infarct", "D1", "Disease")]})
    with pytest.raises(ValueError, match=r"no concepts or pairs remain.*dictionary_path"):
        load_bigbio_kb("c", str(data), cache_dir=str(tmp_path / "cache"))
    data2 = _bigbio(tmp_path / "ds2", {"train": [("heart attack", "D1", "Disease")]})
    with pytest.raises(ValueError, match=r"no concepts or pairs remain.*entity_types"):
        load_bigbio_kb("c", str(data2), entity_types=["Chemical"], cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------ 13. build_task's synonyms
def test_build_task_refuses_synonyms_given_as_one_string() -> None:
    with pytest.raises(ValueError, match=r"concept 'C1': synonyms must be a list of strings, got str"):
        build_task("x", {"C1": ("Asthma", "wheezing disease")})


@pytest.mark.parametrize("missing", [None, float("nan"), 3])
def test_build_task_refuses_synonyms_that_are_not_strings(missing: object) -> None:
    with pytest.raises(ValueError, match=r"concept 'C1': synonym .* not a string"):
        build_task("x", {"C1": ("Asthma", [missing, "wheezing"])})
    task = build_task("x", {"C1": ("Asthma", ["wheezing", "bronchial asthma"])})  # lists of strings still work
    assert {m for m, _ in task.train + task.dev + task.test} <= {"wheezing", "bronchial asthma"}
