"""Priors through the real huggingface_hub client against the local Hub-protocol server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from oracles import tiny_bert_config
from transformers import BertForSequenceClassification

from hf_kfac import Prior, PriorFileError, estimate_fisher


def _model_and_prior(tmp_path: Path) -> tuple[BertForSequenceClassification, Prior, Path]:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    ids = torch.randint(1, 40, (4, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (4,))}
    prior = Prior(shape="kfac")
    prior.add_task(model, estimate_fisher(model, [batch], shape="kfac", fisher_type="empirical", progress=False), "a")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    prior.save_pretrained(folder / "fisher")
    return model, prior, folder


def test_prior_round_trips_through_the_hub_with_revisions(hub_server, tmp_path: Path) -> None:
    model, prior, folder = _model_and_prior(tmp_path)
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = api.create_repo("org/el-disease").repo_id
    first = api.upload_folder(repo_id=repo, folder_path=str(folder)).oid
    loaded = Prior.from_pretrained(repo, model=model)
    for k, v in prior.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # a second task pushed later; the first revision stays loadable by its commit sha
    prior.add_task(model, None if prior.config.shape == "identity" else prior.slots[0].curvature, "b")
    prior.save_pretrained(folder / "fisher")
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    assert Prior.from_pretrained(repo).num_tasks == 2
    assert Prior.from_pretrained(repo, revision=first).num_tasks == 1
    # only the prior's JSON and safetensors were fetched, never the model weights or pickles
    from huggingface_hub import constants

    snapshots = list(Path(constants.HF_HUB_CACHE).glob("models--org--el-disease/snapshots/*"))
    fetched = {str(p.relative_to(s)) for s in snapshots for p in s.rglob("*") if p.is_file()}
    assert fetched == {"fisher/prior_config.json", "fisher/prior.safetensors"}


def test_missing_repo_and_revision_give_clear_errors(hub_server) -> None:
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    with pytest.raises(PriorFileError, match="not found"):
        Prior.from_pretrained("org/does-not-exist")
    repo = api.create_repo("org/empty").repo_id
    with pytest.raises(PriorFileError, match="revision 'v9' does not exist"):
        Prior.from_pretrained(repo, revision="v9")


def test_model_without_prior_is_explained(hub_server, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    model.save_pretrained(tmp_path / "m")
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = api.create_repo("org/no-prior").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(tmp_path / "m"))
    with pytest.raises(PriorFileError, match="holds no hf_kfac prior.*consolidat"):
        Prior.from_pretrained(repo)
    with pytest.raises(PriorFileError, match="holds no hf_kfac prior"):
        Prior.from_pretrained(tmp_path / "m")


def test_offline_mode_uses_the_cache(hub_server, tmp_path: Path, monkeypatch) -> None:
    model, prior, folder = _model_and_prior(tmp_path)
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = api.create_repo("org/cached").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    Prior.from_pretrained(repo)
    hub_server.stop()
    loaded = Prior.from_pretrained(repo, local_files_only=True)
    assert loaded.num_tasks == 1
    with pytest.raises(PriorFileError, match="not in the local cache"):
        Prior.from_pretrained("org/never-downloaded", local_files_only=True)


def test_cut_off_download_never_yields_a_half_written_prior(hub_server, tmp_path: Path) -> None:
    model, prior, folder = _model_and_prior(tmp_path)
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = api.create_repo("org/flaky").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    hub_server.truncate_next_downloads = 50  # every attempt is cut off midway
    with pytest.raises(Exception):
        Prior.from_pretrained(repo)
    hub_server.truncate_next_downloads = 0
    loaded = Prior.from_pretrained(repo, model=model)
    for k, v in prior.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_prior_without_model_is_explained(hub_server, tmp_path: Path, caplog) -> None:
    _, prior, folder = _model_and_prior(tmp_path)
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = api.create_repo("org/prior-only").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder / "fisher"), path_in_repo="fisher")
    with caplog.at_level("WARNING", logger="hf_kfac.hub"):
        loaded = Prior.from_pretrained(repo)
    assert loaded.num_tasks == 1
    assert "holds an hf_kfac prior but no model weights" in caplog.text
    caplog.clear()
    full = api.create_repo("org/with-model").repo_id
    api.upload_folder(repo_id=full, folder_path=str(folder))
    with caplog.at_level("WARNING", logger="hf_kfac.hub"):
        Prior.from_pretrained(full)
    assert "no model weights" not in caplog.text
