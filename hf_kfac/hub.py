"""Finding a prior: a local folder first, then the Hugging Face Hub."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .serialization import DEFAULT_PRIOR_SUBFOLDER, PRIOR_CONFIG_NAME, PriorFileError

logger = logging.getLogger(__name__)



def resolve_prior_folder(
    path_or_repo: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """Return a local folder holding ``prior_config.json`` for a folder or a Hub repo id.

    Local: ``path_or_repo`` itself if it holds the config, else ``path_or_repo/subfolder``
    (``fisher`` by default). Hub: ``snapshot_download`` of the subfolder's ``*.json`` and
    ``*.safetensors`` only, so nothing executable or pickled is fetched.
    """
    sub = DEFAULT_PRIOR_SUBFOLDER if subfolder is None else subfolder
    local = Path(path_or_repo)
    if local.is_dir():
        if (local / PRIOR_CONFIG_NAME).is_file():
            return local
        if sub and (local / sub).is_dir():
            return local / sub
        raise PriorFileError(
            f"{str(local)!r} holds no hf_kfac prior: neither {PRIOR_CONFIG_NAME} nor a {sub!r} subfolder. "
            "A model saved without consolidation has no prior; run trainer.consolidate() and save again."
        )
    if os.path.sep in str(path_or_repo) and str(path_or_repo).startswith((".", "/", "~")):
        raise PriorFileError(f"no prior folder at {str(path_or_repo)!r}.")
    return _download(str(path_or_repo), sub, revision, token, cache_dir, local_files_only)


def _download(repo_id: str, sub: str, revision: str | None, token: str | bool | None, cache_dir, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    prefix = f"{sub}/" if sub else ""
    try:
        root = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors"],
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    except RepositoryNotFoundError as e:
        raise PriorFileError(
            f"Hub repo {repo_id!r} was not found (or is private and no valid token was given). "
            "Check the repo id, or log in with `hf auth login`."
        ) from e
    except RevisionNotFoundError as e:
        raise PriorFileError(f"revision {revision!r} does not exist in Hub repo {repo_id!r}.") from e
    except (LocalEntryNotFoundError, EntryNotFoundError) as e:
        raise PriorFileError(
            f"the prior of {repo_id!r} is not in the local cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set, or no network). Download it once online, or pass a local folder."
        ) from e
    except HfHubHTTPError as e:
        raise PriorFileError(f"downloading the prior of {repo_id!r} failed: {type(e).__name__}.") from e
    folder = Path(root) / sub if sub else Path(root)
    if not local_files_only and (folder / PRIOR_CONFIG_NAME).is_file():
        _warn_if_no_model(repo_id, revision, token, sub)
    if not (folder / PRIOR_CONFIG_NAME).is_file():
        raise PriorFileError(
            f"Hub repo {repo_id!r} (revision {revision or 'main'}) holds no hf_kfac prior in {sub + '/' if sub else 'its root'}: "
            "it was pushed without consolidation. Push it again after trainer.consolidate(), or start a new prior."
        )
    return folder


def _warn_if_no_model(repo_id: str, revision: str | None, token: str | bool | None, sub: str) -> None:
    """Warn when a repo holds a prior but no model weights at the same revision."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
    except (HfHubHTTPError, OSError):  # offline or flaky: the prior itself is fine
        return
    has_weights = any(
        f.endswith((".safetensors", ".bin")) and not f.startswith(f"{sub}/") and "/" not in f for f in files
    )
    if not has_weights:
        logger.warning(
            "Hub repo %r (revision %s) holds an hf_kfac prior but no model weights: the prior's anchors "
            "belong to a model that was not pushed. Push the model with its prior (trainer.push_to_hub()), "
            "or load the consolidated model from where it was saved.",
            repo_id,
            revision or "main",
        )
