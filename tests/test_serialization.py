"""Saving and loading priors: bit-exact round trips and a clear error for every bad file."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from oracles import tiny_bert_config
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

import hf_kfac.serialization as ser
from hf_kfac import Prior, PriorFileError, estimate_fisher


@pytest.fixture(scope="module")
def model_and_prior() -> tuple[BertForSequenceClassification, Prior]:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    ids = torch.randint(1, 40, (6, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (6,))}
    prior = Prior(shape="kfac", accumulation="separate", damping=1e-3)
    prior.add_task(model, estimate_fisher(model, [batch], shape="kfac", fisher_type="empirical", progress=False), "a", metadata={"lambda": 1.0})
    prior.add_task(model, estimate_fisher(model, [batch], shape="kfac", fisher_type="mc", progress=False), "b")
    return model, prior


def _save(prior: Prior, tmp_path: Path, **kw) -> Path:
    return prior.save_pretrained(tmp_path / "fisher", **kw)


def test_round_trip_is_bit_exact(model_and_prior, tmp_path: Path) -> None:
    model, prior = model_and_prior
    loaded = Prior.from_pretrained(_save(prior, tmp_path), model=model)
    a, b = prior.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32
        assert torch.equal(a[k], b[k]), k
    assert [t.name for t in loaded.tasks] == ["a", "b"] and loaded.tasks[0].metadata == {"lambda": 1.0}
    assert loaded.config == prior.config and loaded.slot_weights() == prior.slot_weights()
    # the parent folder works too (the `fisher` subfolder is found)
    assert Prior.from_pretrained(tmp_path).num_tasks == 2


def test_large_priors_are_sharded(model_and_prior, tmp_path: Path) -> None:
    model, prior = model_and_prior
    folder = _save(prior, tmp_path, max_shard_size=20_000)
    shards = sorted(p.name for p in folder.glob("prior-*.safetensors"))
    assert len(shards) > 1
    cfg = json.loads((folder / "prior_config.json").read_text())
    assert set(cfg["files"]) == set(shards)
    loaded = Prior.from_pretrained(folder)
    for k, v in prior.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_missing_files_are_named(model_and_prior, tmp_path: Path) -> None:
    _, prior = model_and_prior
    folder = _save(prior, tmp_path)
    (folder / "prior.safetensors").unlink()
    with pytest.raises(PriorFileError, match="prior.safetensors.*missing"):
        Prior.from_pretrained(folder)
    (folder / "prior_config.json").unlink()
    with pytest.raises(PriorFileError, match="prior_config.json.*missing"):
        Prior.load_folder(folder)
    with pytest.raises(PriorFileError, match="no prior folder"):
        Prior.from_pretrained(tmp_path / "nowhere" / "fisher")


def test_corrupted_files_are_detected(model_and_prior, tmp_path: Path) -> None:
    _, prior = model_and_prior
    folder = _save(prior, tmp_path)
    path = folder / "prior.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(PriorFileError, match="corrupted.*SHA-256"):
        Prior.from_pretrained(folder)
    path.write_bytes(b"not a safetensors file")
    cfg = json.loads((folder / "prior_config.json").read_text())
    cfg["files"]["prior.safetensors"] = ser.sha256_file(path)
    (folder / "prior_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PriorFileError, match="cannot be read as safetensors"):
        Prior.from_pretrained(folder)
    (folder / "prior_config.json").write_text("{ not json")
    with pytest.raises(PriorFileError, match="not valid JSON"):
        Prior.from_pretrained(folder)


def test_future_format_version_is_refused(model_and_prior, tmp_path: Path) -> None:
    _, prior = model_and_prior
    folder = _save(prior, tmp_path)
    cfg = json.loads((folder / "prior_config.json").read_text())
    cfg["format_version"] = 99
    (folder / "prior_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PriorFileError, match="format version 99.*Upgrade hf_kfac"):
        Prior.from_pretrained(folder)


def _rewrite_tensor(folder: Path, key: str, value: torch.Tensor) -> None:
    path = folder / "prior.safetensors"
    tensors = load_file(str(path))
    tensors[key] = value
    save_file(tensors, str(path))
    cfg = json.loads((folder / "prior_config.json").read_text())
    cfg["files"]["prior.safetensors"] = ser.sha256_file(path)
    (folder / "prior_config.json").write_text(json.dumps(cfg))


def test_nan_and_wrong_dtype_are_refused(model_and_prior, tmp_path: Path) -> None:
    _, prior = model_and_prior
    folder = _save(prior, tmp_path)
    key = "slots.0.diag.classifier.weight" if "slots.0.diag.classifier.weight" in prior.state_dict() else next(iter(prior.state_dict()))
    bad = prior.state_dict()[key].clone()
    bad.view(-1)[0] = float("nan")
    _rewrite_tensor(folder, key, bad)
    with pytest.raises(PriorFileError, match="NaN or inf"):
        Prior.from_pretrained(folder)
    _rewrite_tensor(folder, key, prior.state_dict()[key].double())
    with pytest.raises(PriorFileError, match="dtype float64"):
        Prior.from_pretrained(folder)
    _rewrite_tensor(folder, key, prior.state_dict()[key][:1].clone())
    with pytest.raises(PriorFileError, match="shape"):
        Prior.from_pretrained(folder)


def test_model_mismatch_names_the_parameter(model_and_prior, tmp_path: Path) -> None:
    _, prior = model_and_prior
    folder = _save(prior, tmp_path)
    other_vocab = BertForSequenceClassification(tiny_bert_config(vocab_size=41))
    with pytest.raises(PriorFileError, match="bert.embeddings.word_embeddings.weight.*shape"):
        Prior.from_pretrained(folder, model=other_vocab)
    other_arch = BertForSequenceClassification(tiny_bert_config(num_hidden_layers=1))
    with pytest.raises(PriorFileError, match="bert.encoder.layer.1.*does not have"):
        Prior.from_pretrained(folder, model=other_arch)


def test_interrupted_save_keeps_the_previous_prior(model_and_prior, tmp_path: Path, monkeypatch) -> None:
    _, prior = model_and_prior
    folder = _save(prior, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ser, "write_json_atomic", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(prior, tmp_path)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert before == after
    assert [p.name for p in tmp_path.iterdir()] == ["fisher"]  # no temporary folder left behind
    assert Prior.from_pretrained(folder).num_tasks == 2


# ------------------------------------------------- saving never deletes what is not the prior's
def test_a_stale_old_copy_never_brings_back_a_prior_removed_on_purpose(model_and_prior, tmp_path: Path) -> None:
    """Only a save caught between its renames (which leaves a ``.tmp-*``) is recovered on load."""
    import shutil

    _, prior = model_and_prior
    folder = _save(prior, tmp_path)
    shutil.copytree(folder, tmp_path / ".fisher.old-stale1")  # left by a cleanup that failed
    shutil.rmtree(folder)  # the user deletes the prior
    with pytest.raises(PriorFileError, match="no prior folder"):
        Prior.from_pretrained(folder)
    assert not folder.exists()


def test_files_are_fsynced_through_a_writable_handle(model_and_prior, tmp_path: Path, monkeypatch) -> None:
    """Windows flushes only handles open for writing: a read-only fsync of a file would fail there."""
    real_open, real_fsync = os.open, os.fsync
    modes: dict[int, int] = {}

    def opening(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        modes[fd] = flags
        return fd

    def syncing(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode) and modes.get(fd, os.O_RDWR) & (os.O_WRONLY | os.O_RDWR) == 0:
            raise OSError(9, "Bad file descriptor (read-only handle)")
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "fsync", syncing)
    _, prior = model_and_prior
    folder = _save(prior, tmp_path)
    assert Prior.from_pretrained(folder).num_tasks == 2


def test_saving_into_a_model_folder_is_refused_and_deletes_nothing(model_and_prior, tmp_path: Path) -> None:
    _, prior = model_and_prior
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(b"\x00weights\xff" * 100)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(PriorFileError, match=r"'config\.json'.*would be deleted.*'[^']*model/fisher'"):
        prior.save_pretrained(folder)
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # byte-identical, nothing added or removed
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left beside it
    # a single foreign file among the prior's own files is refused as well, and named
    prior_folder = _save(prior, tmp_path)
    (prior_folder / "notes.txt").write_text("mine")
    with pytest.raises(PriorFileError, match=r"'notes\.txt'"):
        prior.save_pretrained(prior_folder)
    assert (prior_folder / "notes.txt").read_text() == "mine"
    # the suggested subfolder works and is found from the model folder
    prior.save_pretrained(folder / "fisher")
    assert Prior.from_pretrained(folder).num_tasks == prior.num_tasks
    assert (folder / "config.json").read_text() == '{"model_type": "bert"}'


def test_saving_over_a_prior_replaces_all_its_files(model_and_prior, tmp_path: Path) -> None:
    _, prior = model_and_prior
    folder = _save(prior, tmp_path, max_shard_size=20_000)
    assert len(list(folder.glob("prior-*-of-*.safetensors"))) > 1
    _save(prior, tmp_path)  # the old shards are the prior's own files: replaced without complaint
    assert sorted(p.name for p in folder.iterdir()) == ["prior.safetensors", "prior_config.json"]


# ------------------------------------------------------------------ file modes and fsync
@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)], ids=["umask022", "umask027"])
def test_saved_files_get_the_modes_of_ordinary_files(model_and_prior, tmp_path: Path, umask, dir_mode, file_mode) -> None:
    _, prior = model_and_prior
    old = os.umask(umask)
    try:
        folder = _save(prior, tmp_path, max_shard_size=20_000)
        ser.write_text_atomic(tmp_path / "README.md", "# card\n")
        ser.write_json_atomic(tmp_path / "extra.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == dir_mode
    files = [*folder.iterdir(), tmp_path / "README.md", tmp_path / "extra.json"]
    assert len(files) > 4
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p.name


def test_every_file_is_fsynced_before_it_is_renamed_into_place(model_and_prior, tmp_path: Path, monkeypatch) -> None:
    _, prior = model_and_prior
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", os.path.realpath(src)))
        return real_replace(src, dst, **kw)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the fsynced file")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ser.write_text_atomic(tmp_path / "README.md", "# card\n")
    _save(prior, tmp_path, max_shard_size=20_000)
    monkeypatch.undo()
    renamed = [(i, path) for i, (kind, path) in enumerate(events) if kind == "replace"]
    readme_tmp = next(p for _, p in renamed if ".README.md." in p)
    folder_tmp = next(p for _, p in renamed if ".fisher.tmp-" in Path(p).name)
    for i, src in renamed:
        synced = {p for kind, p in events[:i] if kind == "fsync"}
        if src == readme_tmp or src.endswith(".tmp") and ".prior_config.json." in src:
            assert src in synced, f"{src} renamed before it was fsynced"
        if src == folder_tmp:  # the folder goes into place only when every file in it is on disk
            names = ["prior_config.json", *[p.name for p in (tmp_path / "fisher").glob("prior-*.safetensors")]]
            assert len(names) > 2
            for name in names:
                assert any(p == os.path.join(src, name) or (name == "prior_config.json" and ".prior_config.json." in p)
                           for p in synced), f"{name} not fsynced before the folder was renamed into place"


# ------------------------------------------------------------------- malformed configs
def _drop(path):
    def edit(cfg):
        *head, last = path
        node = cfg
        for key in head:
            node = node[key]
        del node[last]
    return edit


def _set(path, value):
    def edit(cfg):
        *head, last = path
        node = cfg
        for key in head:
            node = node[key]
        node[last] = value
    return edit


def _first_kfac(cfg) -> str:
    return next(iter(cfg["slots"][0]["kfac"]))


def _first_tensor(cfg) -> str:
    return next(iter(cfg["weight_map"]))


MALFORMED = {
    "missing anchor": (_drop(["slots", 0, "anchor"]), r"`slots\[0\]\.anchor` is missing"),
    "missing scale": (_drop(["slots", 0, "scale"]), r"`slots\[0\]\.scale` is missing"),
    "scale not a number": (_set(["slots", 0, "scale"], "big"), r"`slots\[0\]\.scale` should be a finite number > 0, not str"),
    "missing diag": (_drop(["slots", 0, "diag"]), r"`slots\[0\]\.diag` is missing"),
    "missing kfac weight": (
        lambda cfg: cfg["slots"][0]["kfac"][_first_kfac(cfg)].pop("weight"),
        r"`slots\[0\]\.kfac\['[^']+'\]\.weight` is missing",
    ),
    "kfac bias of wrong type": (
        lambda cfg: cfg["slots"][0]["kfac"][_first_kfac(cfg)].update(bias=3),
        r"`slots\[0\]\.kfac\['[^']+'\]\.bias` should be a string or null, not int",
    ),
    "missing format_version": (_drop(["format_version"]), r"`format_version` is missing"),
    "format_version a string": (_set(["format_version"], "1"), r"`format_version` should be an integer, not str"),
    "slots not a list": (_set(["slots"], {"0": {}}), r"`slots` should be a JSON list, not dict"),
    "missing tasks": (_drop(["tasks"]), r"`tasks` is missing"),
    "task without a name": (_drop(["tasks", 0, "name"]), r"`tasks\[0\]\.name` is missing"),
    "unknown shape": (lambda cfg: cfg["prior"].update(shape="cubic"), r"`prior` is invalid .*cubic"),
    "param shape not a list": (lambda cfg: cfg["params"].update({next(iter(cfg["params"])): "2x3"}), r"`params\['[^']+'\]` should be a list"),
    "slot refers to an unknown task": (_set(["slots", 0, "tasks"], [7]), r"`slots\[0\]\.tasks` refers to task 7"),
    "missing weight_map": (_drop(["weight_map"]), r"`weight_map` is missing"),
    "weight map names a path": (
        lambda cfg: cfg["weight_map"].update({_first_tensor(cfg): "../prior.safetensors"}),
        r"`weight_map\['[^']+'\]` names an unexpected file '\.\./prior\.safetensors'",
    ),
    "weight map names a hidden file": (
        lambda cfg: cfg["weight_map"].update({_first_tensor(cfg): ".prior.safetensors"}),
        r"`weight_map\['[^']+'\]` names an unexpected file '\.prior\.safetensors'",
    ),
    "weight map names a file not listed": (
        lambda cfg: cfg["weight_map"].update({_first_tensor(cfg): "prior-00002-of-00002.safetensors"}),
        r"`weight_map\['[^']+'\]` names 'prior-00002-of-00002\.safetensors', which `files` does not list",
    ),
    "files name a subfolder": (
        lambda cfg: cfg.update(files={"sub/prior.safetensors": v for v in cfg["files"].values()}),
        r"`files` names an unexpected file 'sub/prior\.safetensors'",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_config_is_a_prior_file_error_naming_file_field_and_fix(model_and_prior, tmp_path: Path, case: str) -> None:
    _, prior = model_and_prior
    folder = _save(prior, tmp_path)
    cfg_path = folder / "prior_config.json"
    cfg = json.loads(cfg_path.read_text())
    edit, field = MALFORMED[case]
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(PriorFileError) as info:
        Prior.from_pretrained(folder)
    message = str(info.value)
    assert str(cfg_path) in message  # the file
    assert re.search(field, message), message  # the field
    assert "re-run consolidation" in message  # the fix


_ASCII_LOCALE_CHILD = r"""
import json, locale, sys
from pathlib import Path
import torch
from torch import nn
from hf_kfac import Curvature, Prior
from hf_kfac.model_card import save_model_card
assert locale.getpreferredencoding(False).lower().replace("-", "") != "utf8", locale.getpreferredencoding(False)
d = Path(sys.argv[1])
model = nn.Linear(3, 2)
prior = Prior(shape="diag")
curv = Curvature(diag={k: torch.ones_like(p) for k, p in model.named_parameters()}, n_examples=5)
prior.add_task(model, curv, "maladies-\u00e9")
prior.save_pretrained(d / "fisher")
save_model_card(d, prior, repo_id="org/x")
# a config as another JSON writer may leave it: raw UTF-8, not \u escapes
cfg = d / "fisher" / "prior_config.json"
cfg.write_bytes(json.dumps(json.loads(cfg.read_bytes()), ensure_ascii=False).encode("utf-8"))
assert Prior.from_pretrained(d).tasks[0].name == "maladies-\u00e9"
"""


def test_text_files_are_read_and_written_as_utf8_under_an_ascii_locale(tmp_path: Path) -> None:
    """LC_ALL=C makes open()'s default encoding ASCII: the card (λ, γ, –) and the config must not depend on it."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]), LC_ALL="C",
               LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, "-c", _ASCII_LOCALE_CHILD, str(tmp_path)], env=env, capture_output=True,
                       text=True, encoding="utf-8", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    card = (tmp_path / "README.md").read_bytes().decode("utf-8")
    assert "| λ |" in card and "maladies-é" in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "fisher"]  # no temporary file left behind
