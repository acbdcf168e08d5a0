"""End-to-end checks of the local Hub test server with the real `huggingface_hub` client (no mocking)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from hub_server import HubServer

BIG_SIZE = 11 * 1024 * 1024  # > 10 MB: must go through LFS


@pytest.fixture
def api(hub_server: HubServer) -> HfApi:
    """An `HfApi` client bound to the test server."""
    return HfApi(token=hub_server.token)


def _repo(api: HfApi, name: str = "model") -> str:
    return api.create_repo(f"test-user/{name}").repo_id


def test_fixture_points_client_at_local_server(hub_server: HubServer) -> None:
    assert hub_server.endpoint.startswith("http://127.0.0.1:")
    assert hf_constants.ENDPOINT == hub_server.endpoint
    assert os.environ["HF_ENDPOINT"] == hub_server.endpoint
    assert os.environ["HF_HUB_DISABLE_XET"] == "1"
    assert hf_constants.HF_HUB_CACHE.startswith(os.environ["HF_HOME"])
    assert HfApi().endpoint == hub_server.endpoint
    assert HfApi().whoami()["name"] == hub_server.username  # HF_TOKEN is picked up from the env

    # Direct (non-HTTP) seeding helpers.
    repo_id = hub_server.create_repo("test-user/seeded")
    oid = hub_server.commit_files(repo_id, {"config.json": b"{}", "w.bin": b"\x00\x01"})
    assert hub_server.head(repo_id) == oid
    assert hub_server.list_files(repo_id) == [".gitattributes", "config.json", "w.bin"]
    assert Path(hf_hub_download(repo_id, "config.json")).read_bytes() == b"{}"
    with pytest.raises(LookupError):
        hub_server.head("test-user/missing")


def test_create_repo_info_exists_delete(api: HfApi) -> None:
    url = api.create_repo("test-user/my-model")
    assert url.repo_id == "test-user/my-model"
    assert url.startswith(api.endpoint)
    with pytest.raises(HfHubHTTPError) as exc_info:
        api.create_repo("test-user/my-model")
    assert exc_info.value.response.status_code == 409
    assert api.create_repo("test-user/my-model", exist_ok=True).repo_id == "test-user/my-model"
    # namespace defaults to the token's user, like on the Hub
    assert api.create_repo("no-namespace").repo_id == "test-user/no-namespace"

    info = api.repo_info("test-user/my-model")
    assert info.id == "test-user/my-model"
    assert info.sha is not None and len(info.sha) == 40
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # initial commit, like the Hub
    assert api.model_info("test-user/my-model").sha == info.sha
    assert api.repo_exists("test-user/my-model")
    assert not api.repo_exists("test-user/nope")

    api.delete_repo("test-user/my-model")
    assert not api.repo_exists("test-user/my-model")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("test-user/my-model")
    api.delete_repo("test-user/my-model", missing_ok=True)


def test_upload_small_and_lfs_files_then_download(hub_server: HubServer, api: HfApi, tmp_path: Path) -> None:
    repo_id = _repo(api)
    small = b'{"hidden_size": 8}\n'
    big = os.urandom(BIG_SIZE)
    big_path = tmp_path / "model.safetensors"
    big_path.write_bytes(big)

    api.upload_file(path_or_fileobj=small, path_in_repo="config.json", repo_id=repo_id)
    commit = api.upload_file(path_or_fileobj=str(big_path), path_in_repo="weights/model.safetensors", repo_id=repo_id)
    assert len(commit.oid) == 40

    paths = [r.path for r in hub_server.requests]
    assert any(p.startswith(f"/api/models/{repo_id}/preupload/main") for p in paths)
    assert any(p == f"/{repo_id}.git/info/lfs/objects/batch" for p in paths)
    assert any(r.method == "PUT" and r.path.startswith("/__lfs/upload/") and r.status == 200 for r in hub_server.requests)
    assert not any("xet" in p for p in paths)

    tree = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True) if isinstance(f, RepoFile)}
    assert tree["config.json"].lfs is None and tree["config.json"].size == len(small)
    assert tree["weights/model.safetensors"].lfs is not None
    assert tree["weights/model.safetensors"].size == BIG_SIZE

    info = api.model_info(repo_id, files_metadata=True)
    assert info.sha == commit.oid
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["weights/model.safetensors"].lfs.size == BIG_SIZE

    local_small = hf_hub_download(repo_id, "config.json")
    local_big = hf_hub_download(repo_id, "weights/model.safetensors")
    assert Path(local_small).read_bytes() == small
    assert Path(local_big).read_bytes() == big
    assert f"/snapshots/{commit.oid}/" in local_big
    assert hub_server.read_file(repo_id, "weights/model.safetensors") == big


def test_snapshot_download_allow_patterns_and_list_files(hub_server: HubServer, api: HfApi, tmp_path: Path) -> None:
    repo_id = _repo(api)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.txt").write_text("b")
    (folder / "c.json").write_text("{}")
    api.upload_folder(folder_path=folder, repo_id=repo_id)

    assert api.list_repo_files(repo_id) == [".gitattributes", "a.txt", "c.json", "sub/b.txt"]
    hub_server.tree_page_size = 2  # force Link-header paging
    assert api.list_repo_files(repo_id) == [".gitattributes", "a.txt", "c.json", "sub/b.txt"]
    assert any("cursor=" in r.path for r in hub_server.requests)

    snap = Path(snapshot_download(repo_id, allow_patterns=["*.txt"]))
    files = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
    assert files == ["a.txt", "sub/b.txt"]
    assert (snap / "sub" / "b.txt").read_text() == "b"

    local = Path(snapshot_download(repo_id, local_dir=tmp_path / "local", allow_patterns="*.json"))
    assert (local / "c.json").read_text() == "{}"
    assert not (local / "a.txt").exists()


def test_revisions_branches_and_old_commits(hub_server: HubServer, api: HfApi) -> None:
    repo_id = _repo(api)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="data.txt", repo_id=repo_id).oid
    second = api.create_commit(
        repo_id,
        operations=[CommitOperationAdd("data.txt", b"v2"), CommitOperationAdd("new.txt", b"new")],
        commit_message="second",
    ).oid
    assert first != second
    assert api.repo_info(repo_id).sha == second
    assert api.repo_info(repo_id, revision=first).sha == first

    assert Path(hf_hub_download(repo_id, "data.txt", revision=first)).read_bytes() == b"v1"
    assert Path(hf_hub_download(repo_id, "data.txt")).read_bytes() == b"v2"
    assert Path(hf_hub_download(repo_id, "data.txt", revision=second[:7])).read_bytes() == b"v2"
    assert api.list_repo_files(repo_id, revision=first) == [".gitattributes", "data.txt"]
    snap = Path(snapshot_download(repo_id, revision=first))
    assert snap.name == first and not (snap / "new.txt").exists()

    api.create_branch(repo_id, branch="dev", revision=first)
    dev = api.upload_file(path_or_fileobj=b"dev", path_in_repo="data.txt", repo_id=repo_id, revision="dev").oid
    assert Path(hf_hub_download(repo_id, "data.txt", revision="dev")).read_bytes() == b"dev"
    assert Path(hf_hub_download(repo_id, "data.txt", revision="main")).read_bytes() == b"v2"
    api.create_tag(repo_id, tag="v1.0", revision=first)
    assert Path(hf_hub_download(repo_id, "data.txt", revision="v1.0")).read_bytes() == b"v1"

    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "dev": dev}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": first}
    assert [c.commit_id for c in api.list_repo_commits(repo_id)][:2] == [second, first]

    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="data.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert Path(hf_hub_download(repo_id, "data.txt", revision=pr.pr_revision)).read_bytes() == b"pr"
    assert api.repo_info(repo_id).sha == second  # a PR does not move main

    api.delete_file("new.txt", repo_id)
    assert "new.txt" not in api.list_repo_files(repo_id)
    assert "new.txt" in api.list_repo_files(repo_id, revision=second)


def test_missing_repo_revision_and_file_errors(api: HfApi) -> None:
    repo_id = _repo(api)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)

    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("test-user/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/does-not-exist", "x.txt")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="test-user/does-not-exist")

    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "x.txt", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(repo_id, revision="0" * 40)

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt")
    assert api.file_exists(repo_id, "x.txt") and not api.file_exists(repo_id, "missing.txt")
    with pytest.raises(EntryNotFoundError):
        api.create_commit(repo_id, operations=[CommitOperationDelete("missing.txt")], commit_message="rm")


def test_failed_commit_leaves_repo_unchanged_then_retry(hub_server: HubServer, api: HfApi) -> None:
    repo_id = _repo(api)
    before = api.repo_info(repo_id).sha

    hub_server.fail_next_commits = 1
    with pytest.raises(HfHubHTTPError) as exc_info:
        api.upload_file(path_or_fileobj=b"payload", path_in_repo="f.txt", repo_id=repo_id)
    assert exc_info.value.response.status_code == 500
    assert hub_server.fail_next_commits == 0
    assert api.repo_info(repo_id).sha == before
    assert api.list_repo_files(repo_id) == [".gitattributes"]

    after = api.upload_file(path_or_fileobj=b"payload", path_in_repo="f.txt", repo_id=repo_id).oid
    assert after != before
    assert Path(hf_hub_download(repo_id, "f.txt")).read_bytes() == b"payload"


def test_truncated_download_fails_without_caching(hub_server: HubServer, api: HfApi) -> None:
    repo_id = _repo(api)
    payload = os.urandom(300_000)
    api.upload_file(path_or_fileobj=payload, path_in_repo="weights.bin", repo_id=repo_id)  # binary => LFS

    hub_server.truncate_next_downloads = 6  # first GET + the client's 5 resume attempts
    with pytest.raises(httpx2.RemoteProtocolError):
        hf_hub_download(repo_id, "weights.bin")
    assert hub_server.truncate_next_downloads == 0
    storage = Path(hf_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    assert not list((storage / "snapshots").rglob("weights.bin"))
    assert [p.name for p in (storage / "blobs").iterdir()] == []  # neither the blob nor a partial temp file

    # One cut only: the client resumes with a Range request and gets the right bytes.
    hub_server.truncate_next_downloads = 1
    assert Path(hf_hub_download(repo_id, "weights.bin")).read_bytes() == payload


def test_fail_next_downloads_raises(hub_server: HubServer, api: HfApi) -> None:
    repo_id = _repo(api)
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="h.txt", repo_id=repo_id)
    hub_server.fail_next_downloads = 1
    with pytest.raises(HfHubHTTPError) as exc_info:
        hf_hub_download(repo_id, "h.txt")
    assert exc_info.value.response.status_code == 500
    assert Path(hf_hub_download(repo_id, "h.txt")).read_bytes() == b"hello"


def test_subprocess_and_non_ascii_paths(hub_server: HubServer, api: HfApi) -> None:
    repo_id = _repo(api)
    api.upload_file(path_or_fileobj="héllo".encode(), path_in_repo="dir é/naïve.txt", repo_id=repo_id)
    assert Path(hf_hub_download(repo_id, "dir é/naïve.txt")).read_bytes() == "héllo".encode()

    # A subprocess only sees the environment variables set by the fixture.
    code = (
        "import sys; from huggingface_hub import hf_hub_download; "
        "sys.stdout.write(open(hf_hub_download(sys.argv[1], 'dir é/naïve.txt'), encoding='utf-8').read())"
    )
    out = subprocess.run([sys.executable, "-c", code, repo_id], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "héllo"
