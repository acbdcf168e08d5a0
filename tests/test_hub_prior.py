"""Priors through the real huggingface_hub client against the local Hub-protocol server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from oracles import tiny_bert_config
from transformers import BertForSequenceClassification

from hf_kfac import Prior, PriorFileError, estimate_fisher
from hf_kfac.hub import PriorDownloadError, describe_http_error


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


def _go_offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE=1 for real: the variable (for subprocesses and anything reading it later) and
    huggingface_hub's copy, which it reads once at import (``constants.HF_HUB_OFFLINE``; every request
    checks ``constants.is_offline_mode()``, which returns it)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert constants.is_offline_mode()


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "local_files_only"])
def test_offline_mode_uses_the_cache_and_sends_no_request(hub_server, tmp_path: Path, monkeypatch, how: str) -> None:
    """Offline (HF_HUB_OFFLINE=1, or local_files_only=True), a prior downloaded once loads from the cache
    while the server is up and holds a newer revision: the cached one-task prior comes back, the server
    sees no request, and a repo never downloaded is refused as not in the cache."""
    model, prior, folder = _model_and_prior(tmp_path)
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = api.create_repo("org/cached").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    assert Prior.from_pretrained(repo).num_tasks == 1  # cached
    prior.add_task(model, prior.slots[0].curvature, "b")
    prior.save_pretrained(folder / "fisher")
    api.upload_folder(repo_id=repo, folder_path=str(folder))  # the Hub moves on to a two-task prior
    kwargs = {"local_files_only": True} if how == "local_files_only" else {}
    if how == "HF_HUB_OFFLINE":
        _go_offline(monkeypatch)
    before = len(hub_server.requests)
    loaded = Prior.from_pretrained(repo, **kwargs)
    assert loaded.num_tasks == 1 and [t.name for t in loaded.tasks] == ["a"]
    with pytest.raises(PriorFileError, match="not in the local cache"):
        Prior.from_pretrained("org/never-downloaded", **kwargs)
    assert hub_server.requests[before:] == []
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online again
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert Prior.from_pretrained(repo).num_tasks == 2  # the newer revision was there all along


def test_cut_off_download_never_yields_a_half_written_prior(hub_server, tmp_path: Path) -> None:
    model, prior, folder = _model_and_prior(tmp_path)
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = api.create_repo("org/flaky").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    hub_server.truncate_next_downloads = 50  # every attempt is cut off midway
    with pytest.raises(PriorDownloadError, match="'org/flaky'.*retry") as failed:
        Prior.from_pretrained(repo)
    # the client's own transport error, not an HTTP status: it is kept as the cause
    assert isinstance(failed.value.__cause__, HTTPError) and not isinstance(failed.value.__cause__, HfHubHTTPError)
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


def _fetched(repo_id: str) -> set[str]:
    """Files of every cached snapshot of ``repo_id`` (what the client downloaded)."""
    from huggingface_hub import constants

    snapshots = list(Path(constants.HF_HUB_CACHE).glob(f"models--{repo_id.replace('/', '--')}/snapshots/*"))
    return {str(p.relative_to(s)) for s in snapshots for p in s.rglob("*") if p.is_file()}


def test_a_mistyped_local_path_says_no_such_folder_and_no_such_repo(hub_server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # neither name below exists as a folder here
    with pytest.raises(PriorFileError, match=r"no local folder at 'runs/exp1/model', and 'runs/exp1/model' is not a "
                       r"valid Hub repo id") as invalid:
        Prior.from_pretrained("runs/exp1/model")
    assert isinstance(invalid.value.__cause__, HFValidationError)
    with pytest.raises(PriorFileError, match=r"no local folder at 'outputs/el-disease', and Hub repo "
                       r"'outputs/el-disease' was not found \(HTTP 404") as missing:
        Prior.from_pretrained("outputs/el-disease")
    assert isinstance(missing.value.__cause__, RepositoryNotFoundError)
    with pytest.raises(PriorFileError, match=r"no local folder at 'outputs/el-disease', and .* not in the local cache") as off:
        Prior.from_pretrained("outputs/el-disease", local_files_only=True)
    assert isinstance(off.value.__cause__, LocalEntryNotFoundError)
    # the same name as an existing folder is found locally, without the Hub
    _, prior, folder = _model_and_prior(tmp_path)
    (tmp_path / "outputs").mkdir()
    folder.rename(tmp_path / "outputs" / "el-disease")
    assert Prior.from_pretrained("outputs/el-disease", local_files_only=True).state_dict().keys() == prior.state_dict().keys()


def test_a_prior_at_the_repo_root_loads_as_from_the_same_local_folder(hub_server, tmp_path: Path, caplog) -> None:
    """The Hub lookup follows the local one (``subfolder=""``: the root only; the default refuses a root and a
    ``fisher/`` that both hold a prior) and fetches only the prior's files."""
    import shutil

    model, prior, folder = _model_and_prior(tmp_path)
    # a prior at the root, beside the model weights (and the one in fisher/); save_pretrained refuses to
    # write into a folder holding other files, so its files are copied there
    prior.save_pretrained(tmp_path / "root-prior")
    for name in ("prior_config.json", "prior.safetensors"):
        shutil.copy(tmp_path / "root-prior" / name, folder / name)
    other = Prior(shape="kfac")
    other.add_task(model, prior.slots[0].curvature, "a")
    other.add_task(model, prior.slots[0].curvature, "b")
    other.save_pretrained(folder / "fisher")  # a different prior in the default subfolder
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = api.create_repo("org/root-prior").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    for sub in ("", ".", "./"):
        local, hub = Prior.from_pretrained(folder, subfolder=sub), Prior.from_pretrained(repo, subfolder=sub)
        assert hub.num_tasks == local.num_tasks == 1, sub  # the root's prior, not fisher/'s
        for k, v in prior.state_dict().items():
            assert torch.equal(hub.state_dict()[k], v)
    for source in (folder, repo):  # two priors and no subfolder given: neither is guessed
        with pytest.raises(PriorFileError, match="holds two hf_kfac priors"):
            Prior.from_pretrained(source)
    # neither the model weights nor its config were downloaded, even with subfolder "" (the whole root), nor the
    # weights of fisher/'s prior, which was never chosen (only its config, to see that it is there)
    assert _fetched(repo) == {"prior_config.json", "prior.safetensors", "fisher/prior_config.json"}
    # a prior alone at the root is no model: its prior.safetensors is not taken for model weights
    alone = api.create_repo("org/root-prior-only").repo_id
    api.upload_folder(repo_id=alone, folder_path=str(tmp_path / "root-prior"))
    with caplog.at_level("WARNING", logger="hf_kfac.hub"):
        assert Prior.from_pretrained(alone, subfolder="").num_tasks == 1
    assert "holds an hf_kfac prior but no model weights" in caplog.text


def test_an_http_error_names_its_status_and_server_message_but_never_the_token(hub_server, tmp_path: Path) -> None:
    _, prior, folder = _model_and_prior(tmp_path)
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = api.create_repo("org/http-500").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    secret = "hf_SecretTokenNeverShown0123"
    hub_server.fail_next_downloads = 1
    with pytest.raises(PriorDownloadError, match=r"'org/http-500'.*HTTP 500: Injected download failure") as failed:
        Prior.from_pretrained(repo, token=secret)
    assert isinstance(failed.value.__cause__, HfHubHTTPError) and failed.value.__cause__.response.status_code == 500
    assert secret not in str(failed.value)
    assert Prior.from_pretrained(repo, token=secret).num_tasks == 1  # a retry succeeds


@pytest.mark.parametrize(
    "status,headers,cls,hint",
    [
        (403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model org/x is restricted."}, "GatedRepoError", "gated"),
        (401, {"X-Error-Message": "Invalid credentials in Authorization header"}, "HfHubHTTPError", "no valid token"),
        (403, {"X-Error-Message": "Forbidden for hf_SecretTokenNeverShown0123"}, "HfHubHTTPError", "lacks read access"),
    ],
)
def test_access_errors_are_described_by_status_server_message_and_fix(status, headers, cls, hint) -> None:
    """The client's own error for a real response (hf_raise_for_status), as snapshot_download would raise it."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/x/revision/main")
    response = httpx2.Response(status, headers=headers, request=request)
    with pytest.raises(HfHubHTTPError) as raised:
        hf_raise_for_status(response)
    assert type(raised.value).__name__ == cls
    text = describe_http_error(raised.value, token="hf_SecretTokenNeverShown0123")
    assert text.startswith(f"HTTP {status}: ") and hint in text
    assert headers["X-Error-Message"].split(" for ")[0] in text and "hf_SecretTokenNeverShown0123" not in text


def test_a_sharded_prior_is_fetched_whole_and_nothing_else(hub_server, tmp_path: Path) -> None:
    model, prior, folder = _model_and_prior(tmp_path)
    prior.save_pretrained(folder / "fisher", max_shard_size=2_000)
    shards = sorted(p.name for p in (folder / "fisher").iterdir() if p.suffix == ".safetensors")
    assert len(shards) > 1 and "prior.safetensors" not in shards
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = api.create_repo("org/sharded").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    loaded = Prior.from_pretrained(repo, model=model)
    for k, v in prior.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert _fetched(repo) == {f"fisher/{n}" for n in ["prior_config.json", *shards]}
