"""Saving and loading priors: bit-exact round trips and a clear error for every bad file."""

from __future__ import annotations

import json
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
