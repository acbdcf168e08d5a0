"""Finding a prior: a local folder first, then the Hugging Face Hub."""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

from .serialization import (
    DEFAULT_PRIOR_SUBFOLDER,
    PRIOR_CONFIG_NAME,
    PRIOR_WEIGHTS_NAME,
    PRIOR_WEIGHTS_PATTERN,
    PriorFileError,
)

logger = logging.getLogger(__name__)

PRIOR_FILE_GLOBS = (PRIOR_CONFIG_NAME, PRIOR_WEIGHTS_NAME, PRIOR_WEIGHTS_PATTERN.format(suffix="-*-of-*"))
"""The files a prior save writes (``fnmatch``): its config, one weight file or its shards; nothing else is fetched."""


class PriorDownloadError(PriorFileError):
    """Downloading a prior from the Hub failed (network, HTTP status, access); retrying may help."""


def normalise_subfolder(subfolder: str | None) -> str:
    """``None`` -> ``fisher``; ``"."``, ``"./"`` and ``""`` -> ``""`` (the folder or repo root)."""
    sub = DEFAULT_PRIOR_SUBFOLDER if subfolder is None else str(subfolder)
    return "/".join(PurePosixPath(sub.replace("\\", "/")).parts)


def prior_file_patterns(sub: str) -> list[str]:
    """``allow_patterns`` of a prior in ``sub`` (``""``: the repo root): its config and its weight files only."""
    prefix = f"{sub}/" if sub else ""
    return [prefix + g for g in PRIOR_FILE_GLOBS]


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

    Local folder and Hub repo are looked up the same way: the root itself if it holds the
    config, else its ``subfolder`` (``fisher`` by default; ``""`` or ``"."``: the root only).
    Hub: ``snapshot_download`` of ``prior_config.json`` and ``prior[-*-of-*].safetensors`` of the root
    and of the subfolder only, so neither model weights nor anything executable or pickled
    is fetched. A name that is no local folder is taken as a Hub repo id; when it is not
    one either, the error says both.
    """
    sub = normalise_subfolder(subfolder)
    text = str(path_or_repo)
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        if (local / PRIOR_CONFIG_NAME).is_file():
            return local
        if sub and (local / sub).is_dir():
            return local / sub
        where = f"neither {PRIOR_CONFIG_NAME} nor a {sub!r} subfolder" if sub else f"no {PRIOR_CONFIG_NAME}"
        raise PriorFileError(
            f"{text!r} holds no hf_kfac prior: {where}. "
            "A model saved without consolidation has no prior; run trainer.consolidate() and save again."
        )
    if local.exists():
        raise PriorFileError(f"{text!r} is a file, not a prior folder: pass the folder that holds {PRIOR_CONFIG_NAME}.")
    if text.startswith((".", "/", "~")) or "\\" in text:
        raise PriorFileError(
            f"no prior folder at {text!r}: there is no local folder at {text!r}, and a path (starting with '.', "
            "'/' or '~') is not a valid Hub repo id. Check the path."
        )
    return _download(text, sub, revision, token, cache_dir, local_files_only)


def _scrub(text: str, token: str | bool | None) -> str:
    return text.replace(token, "***") if isinstance(token, str) and token else text


def describe_http_error(e: BaseException, token: str | bool | None = None) -> str:
    """``HTTP <status>: <server message>`` of a Hub HTTP error, with a hint for 401/403/gated; never the token."""
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    server = getattr(e, "server_message", None)
    if not server and response is not None:
        server = response.headers.get("X-Error-Message")
    text = f"HTTP {status}" if status is not None else type(e).__name__
    if server:
        text += f": {str(server).strip()}"
    from huggingface_hub.errors import GatedRepoError

    if isinstance(e, GatedRepoError):
        text += " (a gated repo: accept its access conditions on its Hub page, with the account of your token)"
    elif status == 401:
        text += " (no valid token: log in with `hf auth login`, or pass token=)"
    elif status == 403:
        text += " (the token lacks read access to this repo: check its permissions, or the repo's access conditions)"
    elif status == 429:
        text += " (rate-limited: wait and retry)"
    elif isinstance(status, int) and status >= 500:
        text += " (a server error: retry later)"
    return _scrub(text, token)


def _download(repo_id: str, sub: str, revision: str | None, token: str | bool | None, cache_dir, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        HTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = list(dict.fromkeys(prior_file_patterns("") + (prior_file_patterns(sub) if sub else [])))
    rev = revision or "main"
    try:
        root = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    except HFValidationError as e:
        raise PriorFileError(
            f"no local folder at {repo_id!r}, and {repo_id!r} is not a valid Hub repo id (one is 'name' or "
            "'namespace/name'). Check the path (relative to the current directory) or the repo id."
        ) from e
    except GatedRepoError as e:
        raise PriorDownloadError(
            f"downloading the prior of Hub repo {repo_id!r} was refused: {describe_http_error(e, token)}."
        ) from e
    except RepositoryNotFoundError as e:
        raise PriorFileError(
            f"no local folder at {repo_id!r}, and Hub repo {repo_id!r} was not found ({describe_http_error(e, token)}; "
            "or it is private and no valid token was given). Check the path or the repo id, or log in with `hf auth login`."
        ) from e
    except RevisionNotFoundError as e:
        raise PriorFileError(f"revision {revision!r} does not exist in Hub repo {repo_id!r}.") from e
    except RemoteEntryNotFoundError as e:
        raise PriorFileError(
            f"Hub repo {repo_id!r} (revision {rev}) holds no hf_kfac prior: {describe_http_error(e, token)}."
        ) from e
    except LocalEntryNotFoundError as e:
        raise PriorFileError(
            f"no local folder at {repo_id!r}, and the prior of Hub repo {repo_id!r} is not in the local cache and the "
            "Hub cannot be reached (HF_HUB_OFFLINE is set, local_files_only=True, or no network). Check the path, "
            "or download the prior once online."
        ) from e
    except HfHubHTTPError as e:
        raise PriorDownloadError(
            f"downloading the prior of Hub repo {repo_id!r} (revision {rev}) failed: {describe_http_error(e, token)}."
        ) from e
    except (HTTPError, ConnectionError, TimeoutError) as e:
        # a cut-off or refused connection (httpx2.RemoteProtocolError, ConnectError, timeouts...)
        raise PriorDownloadError(
            f"downloading the prior of Hub repo {repo_id!r} (revision {rev}) failed on the network "
            f"({type(e).__name__}: {_scrub(str(e), token)}). Nothing half-written is kept in the cache: retry."
        ) from e
    base = Path(root)
    if (base / PRIOR_CONFIG_NAME).is_file():  # the same order as for a local folder: the root, then the subfolder
        folder = base
    elif sub and (base / sub / PRIOR_CONFIG_NAME).is_file():
        folder = base / sub
    else:
        where = f"{sub}/ nor in its root" if sub else "its root"
        raise PriorFileError(
            f"Hub repo {repo_id!r} (revision {rev}) holds no hf_kfac prior in {where}: "
            "it was pushed without consolidation. Push it again after trainer.consolidate(), or start a new prior."
        )
    if not local_files_only:
        _warn_if_no_model(repo_id, revision, token)
    return folder


def _warn_if_no_model(repo_id: str, revision: str | None, token: str | bool | None) -> None:
    """Warn when a repo holds a prior but no model weights at the same revision."""
    import fnmatch

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
    except (HTTPError, OSError):  # offline or flaky: the prior itself is fine
        return
    has_weights = any(
        f.endswith((".safetensors", ".bin")) and "/" not in f and not any(fnmatch.fnmatchcase(f, g) for g in PRIOR_FILE_GLOBS)
        for f in files
    )
    if not has_weights:
        logger.warning(
            "Hub repo %r (revision %s) holds an hf_kfac prior but no model weights: the prior's anchors "
            "belong to a model that was not pushed. Push the model with its prior (trainer.push_to_hub()), "
            "or load the consolidated model from where it was saved.",
            repo_id,
            revision or "main",
        )
