"""Where a prior is looked for and what is downloaded, through the real huggingface_hub client and local folders."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants, snapshot_download
from oracles import tiny_bert_config
from transformers import BertForSequenceClassification

from hf_kfac import Prior, PriorFileError, estimate_fisher
from hf_kfac.hub import resolve_prior_folder


def _model_and_prior(tmp_path: Path, tasks: int = 1) -> tuple[BertForSequenceClassification, Prior, Path]:
    """A tiny BERT saved in ``tmp_path/model`` with a diagonal prior of ``tasks`` tasks in its ``fisher/``."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    ids = torch.randint(1, 40, (4, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (4,))}
    prior = Prior(shape="diag")
    fisher = estimate_fisher(model, [batch], shape="diag", fisher_type="empirical", progress=False)
    for i in range(tasks):
        prior.add_task(model, fisher, f"task-{i}")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    prior.save_pretrained(folder / "fisher")
    return model, prior, folder


def _api(hub_server) -> HfApi:
    return HfApi(endpoint=hub_server.endpoint, token=hub_server.token)


def _fetched(repo_id: str) -> set[str]:
    """Files of every cached snapshot of ``repo_id`` (what the client downloaded)."""
    snapshots = Path(constants.HF_HUB_CACHE).glob(f"models--{repo_id.replace('/', '--')}/snapshots/*")
    return {str(p.relative_to(s)) for s in snapshots for p in s.rglob("*") if p.is_file()}


def _with_stale_root_prior(tmp_path: Path) -> tuple[Prior, Prior, Path]:
    """A model folder whose root holds a stale one-task prior and whose fisher/ holds the current two-task one."""
    model, stale, folder = _model_and_prior(tmp_path)
    stale.save_pretrained(tmp_path / "stale")
    for name in ("prior_config.json", "prior.safetensors"):  # save_pretrained refuses a folder holding a model
        shutil.copy(tmp_path / "stale" / name, folder / name)
    current = Prior(shape="diag")
    current.add_task(model, stale.slots[0].curvature, "task-0")
    current.add_task(model, stale.slots[0].curvature, "task-1")
    current.save_pretrained(folder / "fisher")
    return stale, current, folder


def test_a_stale_root_prior_never_shadows_the_subfolder(hub_server, tmp_path: Path) -> None:
    """An explicit subfolder is the only place looked at; the default refuses to guess between two priors."""
    stale, current, folder = _with_stale_root_prior(tmp_path)
    api = _api(hub_server)
    repo = api.create_repo("org/two-priors").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    for source in (folder, repo):
        assert Prior.from_pretrained(source, subfolder="fisher").num_tasks == 2, source
        assert Prior.from_pretrained(source, subfolder="").num_tasks == 1, source
        with pytest.raises(PriorFileError, match=r"two hf_kfac priors: .*prior_config.json at its root \(1 task.*"
                           r"fisher/prior_config.json \(2 task.*subfolder='fisher'.*subfolder=''"):
            Prior.from_pretrained(source)
    # the stale root prior's weights were fetched only when asked for, never the model's
    assert _fetched(repo) == {"prior_config.json", "prior.safetensors", "fisher/prior_config.json", "fisher/prior.safetensors"}


def test_one_prior_is_found_by_default_and_an_explicit_subfolder_the_repo_lacks_is_refused(hub_server, tmp_path: Path) -> None:
    """The documented lookup (the root or ``fisher/``) still works when only one of them holds a prior."""
    model, prior, folder = _model_and_prior(tmp_path)
    api = _api(hub_server)
    in_sub = api.create_repo("org/in-fisher").repo_id
    api.upload_folder(repo_id=in_sub, folder_path=str(folder))
    at_root = api.create_repo("org/at-root").repo_id
    api.upload_folder(repo_id=at_root, folder_path=str(folder / "fisher"))
    for source in (folder, folder / "fisher", in_sub, at_root):
        assert Prior.from_pretrained(source).num_tasks == 1, source
    # a local prior folder passed as itself (what ContinualTrainer(prior="out/fisher") does) with an explicit subfolder
    assert Prior.from_pretrained(folder / "fisher", subfolder="fisher").num_tasks == 1
    # an explicit subfolder the Hub repo lacks is not replaced by its root: the error says how to load the root
    with pytest.raises(PriorFileError, match=r"'org/at-root' \(revision main\) holds no hf_kfac prior in fisher/, "
                       r"but one at its root: pass subfolder=''"):
        Prior.from_pretrained(at_root, subfolder="fisher")
    assert Prior.from_pretrained(at_root, subfolder="").num_tasks == 1


def test_a_missing_prior_error_lists_the_prior_configs_the_repo_holds(hub_server, tmp_path: Path) -> None:
    """A prior pushed from prior_subfolder='prior' is named in the error, with the subfolder= that loads it."""
    model, prior, folder = _model_and_prior(tmp_path)
    (folder / "fisher").rename(folder / "prior")
    api = _api(hub_server)
    repo = api.create_repo("org/other-sub").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    for source, where in ((repo, r"'org/other-sub' \(revision main\)"), (folder, re.escape(repr(str(folder))))):
        with pytest.raises(PriorFileError, match=where + r" holds no hf_kfac prior.*prior/prior_config.json: "
                           r"pass subfolder='prior'"):
            Prior.from_pretrained(source)
        assert Prior.from_pretrained(source, subfolder="prior").num_tasks == 1


def test_revision_with_a_local_folder_of_the_repos_name_is_refused(hub_server, tmp_path: Path, monkeypatch) -> None:
    """A local copy named like the repo id would be read instead of the asked-for Hub revision: refused, with the fix."""
    model, prior, folder = _model_and_prior(tmp_path)
    api = _api(hub_server)
    repo = api.create_repo("org/el").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    snapshot_download(repo, local_dir="org/el")  # a local copy under the repo id's name
    prior.add_task(model, prior.slots[0].curvature, "task-1")
    prior.save_pretrained(folder / "fisher")
    second = api.upload_folder(repo_id=repo, folder_path=str(folder)).oid
    with pytest.raises(PriorFileError, match=r"revision='[0-9a-f]{40}' was given, but 'org/el' is a local folder .* "
                       r"shadows the Hub repo 'org/el' of the same name.*run from another directory or rename"):
        Prior.from_pretrained("org/el", revision=second)
    assert Prior.from_pretrained("org/el").num_tasks == 1  # without revision: the local folder, as documented
    monkeypatch.chdir(tmp_path)
    assert Prior.from_pretrained("org/el", revision=second).num_tasks == 2  # the Hub, once nothing shadows it
    # an empty local folder of the same name says that it hides the Hub repo
    monkeypatch.chdir(work)
    (work / "org" / "empty").mkdir()
    with pytest.raises(PriorFileError, match=r"'org/empty' holds no hf_kfac prior.*shadows the Hub repo 'org/empty'"):
        Prior.from_pretrained("org/empty")


def test_only_the_files_the_config_lists_are_downloaded(hub_server, tmp_path: Path) -> None:
    """A prior that grew into shards leaves its old prior.safetensors on the Hub; it is never downloaded."""
    model, prior, folder = _model_and_prior(tmp_path)
    api = _api(hub_server)
    repo = api.create_repo("org/stale-shard").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    prior.add_task(model, prior.slots[0].curvature, "task-1")
    prior.save_pretrained(folder / "fisher", max_shard_size=2_000)
    api.upload_folder(repo_id=repo, folder_path=str(folder))  # upload_folder deletes nothing: the old file stays
    assert "fisher/prior.safetensors" in api.list_repo_files(repo)
    listed = json.loads((folder / "fisher" / "prior_config.json").read_text(encoding="utf-8"))["files"]
    assert len(listed) > 1 and "prior.safetensors" not in listed
    before = len(hub_server.requests)
    assert Prior.from_pretrained(repo).num_tasks == 2
    assert _fetched(repo) == {"fisher/prior_config.json", *(f"fisher/{n}" for n in listed)}
    assert not [r for r in hub_server.requests[before:] if r.path.endswith("/fisher/prior.safetensors")]


def test_a_file_the_config_lists_but_the_repo_lacks_is_named(hub_server, tmp_path: Path) -> None:
    model, prior, folder = _model_and_prior(tmp_path)
    api = _api(hub_server)
    repo = api.create_repo("org/half-pushed").repo_id
    api.upload_file(repo_id=repo, path_or_fileobj=str(folder / "fisher" / "prior_config.json"),
                    path_in_repo="fisher/prior_config.json")
    with pytest.raises(PriorFileError, match=r"holds an incomplete prior: fisher/prior.safetensors, listed in "
                       r"fisher/prior_config.json, is not in the repo. Push the prior again"):
        Prior.from_pretrained(repo)


def _cached(repo_id: str, path: str) -> Path:
    """The cache blob behind ``path`` of the newest snapshot of ``repo_id``."""
    snapshots = Path(constants.HF_HUB_CACHE).glob(f"models--{repo_id.replace('/', '--')}/snapshots/*")
    return (max(snapshots, key=lambda s: s.stat().st_mtime) / path).resolve()


@pytest.mark.parametrize("damaged", ["fisher/prior.safetensors", "fisher/prior_config.json"])
def test_a_damaged_hub_cache_says_to_download_again_and_force_download_does(hub_server, tmp_path: Path, damaged: str) -> None:
    """Not "re-run consolidation" (the old data is gone): force_download=True (or deleting the cache) repairs it."""
    model, prior, folder = _model_and_prior(tmp_path)
    api = _api(hub_server)
    repo = api.create_repo("org/cached").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    Prior.from_pretrained(repo)
    blob = _cached(repo, damaged)
    blob.write_bytes(blob.read_bytes()[:-40])  # bit rot, a disk that filled up, a cut rsync of ~/.cache
    cache = Path(constants.HF_HUB_CACHE) / "models--org--cached"
    with pytest.raises(PriorFileError, match="corrupted") as damaged_error:
        Prior.from_pretrained(repo)
    message = str(damaged_error.value)
    assert "Prior.from_pretrained('org/cached', force_download=True)" in message and repr(str(cache)) in message
    assert "consolidation" not in message
    repaired = Prior.load_folder(resolve_prior_folder(repo, force_download=True), model=model)
    for k, v in prior.state_dict().items():
        assert torch.equal(repaired.state_dict()[k], v)
    assert Prior.from_pretrained(repo).num_tasks == 1  # the cache itself was repaired


def test_prior_from_pretrained_force_download_repairs_a_damaged_cache(hub_server, tmp_path: Path) -> None:
    model, prior, folder = _model_and_prior(tmp_path)
    api = _api(hub_server)
    repo = api.create_repo("org/forced").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    Prior.from_pretrained(repo)
    blob = _cached(repo, "fisher/prior.safetensors")
    blob.write_bytes(blob.read_bytes()[:-40])
    assert Prior.from_pretrained(repo, force_download=True, model=model).num_tasks == 1
