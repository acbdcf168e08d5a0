"""Finding a prior: a local folder first, then the Hugging Face Hub."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from .serialization import (
    DEFAULT_PRIOR_SUBFOLDER,
    PRIOR_CONFIG_NAME,
    PRIOR_WEIGHTS_NAME,
    PRIOR_WEIGHTS_PATTERN,
    PriorFileError,
    is_prior_file,
    read_config,
)

logger = logging.getLogger(__name__)

PRIOR_FILE_GLOBS = (PRIOR_CONFIG_NAME, PRIOR_WEIGHTS_NAME, PRIOR_WEIGHTS_PATTERN.format(suffix="-*-of-*"))
"""The files a prior save writes (``fnmatch``): its config, one weight file or its shards."""


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
    force_download: bool = False,
) -> Path:
    """Return a local folder holding ``prior_config.json`` for a folder or a Hub repo id.

    Where the prior is looked for, in a local folder or a Hub repo:

    * ``subfolder`` given (``"fisher"``, ``"prior"``...): in that subfolder only. A local folder that
      is itself a prior folder (it holds ``prior_config.json`` and no such subfolder) is read as is.
    * ``subfolder=""`` (or ``"."``): at the root only.
    * ``subfolder=None`` (the default): in ``fisher/`` or at the root, whichever holds one; when
      both do, :class:`PriorFileError` names both and how to pick one.

    A name that is a local folder is never looked up on the Hub, so ``revision`` with a local
    folder is refused (the folder shadows the Hub repo of the same name). Hub: the prior's
    ``prior_config.json`` is downloaded first, then only the files it lists, so neither model
    weights, nor anything executable or pickled, nor stale shards are fetched. ``force_download``
    downloads them again even when cached (a damaged cache). A name that is no local folder is
    taken as a Hub repo id; when it is not one either, the error says both.
    """
    explicit = subfolder is not None
    sub = normalise_subfolder(subfolder)
    text = str(path_or_repo)
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        if revision is not None:
            raise PriorFileError(
                f"revision={revision!r} was given, but {text!r} is a local folder ({str(local.resolve())!r}), which is "
                f"read instead of the Hub{_shadow_note(text)}: a revision applies to Hub repos only. To load the Hub "
                f"repo, run from another directory or rename that folder; to load the local folder, leave out revision."
            )
        return _pick_local(local, text, sub, explicit)
    if local.exists():
        raise PriorFileError(f"{text!r} is a file, not a prior folder: pass the folder that holds {PRIOR_CONFIG_NAME}.")
    if text.startswith((".", "/", "~")) or "\\" in text:
        raise PriorFileError(
            f"no prior folder at {text!r}: there is no local folder at {text!r}, and a path (starting with '.', "
            "'/' or '~') is not a valid Hub repo id. Check the path."
        )
    return _download(text, sub, explicit, revision, token, cache_dir, local_files_only, force_download)


# ---------------------------------------------------------------------- local folders
def _looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` (a relative path) is also a valid Hub repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.startswith((".", "/", "~")) or "\\" in text:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _shadow_note(text: str) -> str:
    """`` and shadows the Hub repo '<text>' of the same name`` when the local name is also a valid repo id, else ``""``."""
    return f" and shadows the Hub repo {text!r} of the same name" if _looks_like_repo_id(text) else ""


def _summary(config_path: Path) -> str:
    """`` (2 tasks, the last 'b' of 2026-01-02)`` from a prior config, or ``""`` when it cannot be read."""
    try:
        with open(config_path, encoding="utf-8") as f:
            tasks = json.load(f)["tasks"]
        last = tasks[-1]
        return f" ({len(tasks)} task(s), the last {last['name']!r} of {str(last.get('date', '?'))[:10]})"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return ""


def _two_priors(where: str, root: Path, in_sub: Path, sub: str, names: tuple[str, str]) -> PriorFileError:
    """Both the root and ``sub`` hold a prior, and no subfolder was given: name both and how to choose."""
    return PriorFileError(
        f"{where} holds two hf_kfac priors: {names[0]} at its root{_summary(root)} and "
        f"{names[1]}{_summary(in_sub)}, and no subfolder was given to choose. Pass "
        f"subfolder={sub!r} for the one in {sub}/ (where ContinualTrainer saves it) or subfolder='' for the one at "
        "the root, and delete the stale one."
    )


def _others_hint(found: list[str], sub: str) -> str:
    """Where else a ``prior_config.json`` was seen, and the ``subfolder=`` that loads it."""
    others = [f for f in found if f != (f"{sub}/{PRIOR_CONFIG_NAME}" if sub else PRIOR_CONFIG_NAME)]
    if not others:
        return ""
    first = str(PurePosixPath(others[0]).parent)
    first = "" if first == "." else first
    more = f" (and {len(others) - 3} more)" if len(others) > 3 else ""
    return (
        f" It holds {', '.join(others[:3])}{more}: pass subfolder={first!r} to load "
        f"{'that one' if len(others) == 1 else 'the first'} (ContinualConfig(prior_subfolder=...) for the trainer)."
    )


def _pick_local(local: Path, text: str, sub: str, explicit: bool) -> Path:
    """The prior folder of a local folder, by the rules of :func:`resolve_prior_folder`."""
    root_cfg = local / PRIOR_CONFIG_NAME
    at_root = root_cfg.is_file()
    if sub:
        sub_cfg = local / sub / PRIOR_CONFIG_NAME
        if sub_cfg.is_file():
            if at_root and not explicit:
                raise _two_priors(repr(text), root_cfg, sub_cfg, sub, (str(root_cfg), str(sub_cfg)))
            return local / sub
        if at_root and not (explicit and os.path.lexists(local / sub)):
            return local  # the folder is itself a prior folder
        if at_root:
            raise PriorFileError(
                f"{str(local / sub)!r} holds no {PRIOR_CONFIG_NAME}; {text!r} holds a prior at its root instead. "
                "Pass subfolder='' to load that one."
            )
        if (local / sub).is_dir():
            return local / sub  # read_config names the missing file
    elif at_root:
        return local
    where = f"neither {PRIOR_CONFIG_NAME} nor a {sub!r} subfolder" if sub else f"no {PRIOR_CONFIG_NAME} at its root"
    found = sorted(str(p.relative_to(local).as_posix()) for p in local.glob(f"*/{PRIOR_CONFIG_NAME}"))
    shadow = _shadow_note(text)
    raise PriorFileError(
        f"{text!r} holds no hf_kfac prior: {where}.{_others_hint(found, sub)} "
        "A model saved without consolidation has no prior; run trainer.consolidate() and save again."
        + (
            f" Note: {text!r} is a local folder ({str(local.resolve())!r}), read instead of the Hub{shadow}; to load "
            "the Hub repo, run from another directory or rename that folder."
            if shadow
            else ""
        )
    )


# -------------------------------------------------------------------------------- Hub
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


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, token: str | bool | None) -> Iterator[None]:
    """Turn the client's errors into :class:`PriorFileError` / :class:`PriorDownloadError` naming the fix."""
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

    rev = revision or "main"
    try:
        yield
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


def _listed_files(config: dict[str, Any]) -> list[str]:
    """The weight files a prior config lists; malformed entries are left for the loader to report."""
    files = config.get("files")
    if not isinstance(files, dict):
        return []
    return [
        n for n in files
        if isinstance(n, str) and is_prior_file(n) and n != PRIOR_CONFIG_NAME and not n.startswith(".")
    ]


def _download(
    repo_id: str,
    sub: str,
    explicit: bool,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    force_download: bool,
) -> Path:
    """Download ``prior_config.json`` (of the root and of ``sub``), pick the prior, then the files it lists."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    rev = revision or "main"
    configs = [PRIOR_CONFIG_NAME] + ([f"{sub}/{PRIOR_CONFIG_NAME}"] if sub else [])
    common = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only, force_download=force_download)
    with _hub_errors(repo_id, revision, token):
        base = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[glob.escape(c) for c in configs], **common))
    # the snapshot folder is named by the commit: later files come from the same commit even if the branch moves
    commit = base.name if re.fullmatch(r"[0-9a-f]{40}", base.name) else revision
    offline = local_files_only or constants.is_offline_mode()
    at_root = (base / PRIOR_CONFIG_NAME).is_file()
    in_sub = bool(sub) and (base / sub / PRIOR_CONFIG_NAME).is_file()
    where = f"Hub repo {repo_id!r} (revision {rev})"
    if in_sub and at_root and not explicit:
        raise _two_priors(
            where, base / PRIOR_CONFIG_NAME, base / sub / PRIOR_CONFIG_NAME, sub,
            (PRIOR_CONFIG_NAME, f"{sub}/{PRIOR_CONFIG_NAME}"),
        )
    if in_sub:
        rel = sub
    elif at_root and (not sub or not explicit):
        rel = ""
    else:
        raise _no_hub_prior(where, repo_id, commit, sub, explicit, at_root, token, offline)
    folder = base / rel if rel else base
    prefix = f"{rel}/" if rel else ""
    for name in _listed_files(read_config(folder)):
        try:
            with _hub_errors(repo_id, revision, token):
                hf_hub_download(repo_id, prefix + name, revision=commit, **common)
        except PriorFileError as e:
            if isinstance(e.__cause__, RemoteEntryNotFoundError):
                raise PriorFileError(
                    f"{where} holds an incomplete prior: {prefix + name}, listed in {prefix}{PRIOR_CONFIG_NAME}, is "
                    "not in the repo. Push the prior again (trainer.push_to_hub(), or upload the whole prior folder)."
                ) from e.__cause__
            raise
    if not offline:
        _warn_if_no_model(repo_id, revision, token)
    return folder


def _no_hub_prior(
    where: str,
    repo_id: str,
    commit: str | None,
    sub: str,
    explicit: bool,
    at_root: bool,
    token: str | bool | None,
    offline: bool,
) -> PriorFileError:
    """The error for a repo (or a cached snapshot) without a prior where one was looked for; lists the others."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    looked = "at its root" if not sub else f"in {sub}/" if explicit else f"neither in {sub}/ nor at its root"
    if at_root:  # an explicit subfolder that is not there, and a prior at the root
        return PriorFileError(
            f"{where} holds no hf_kfac prior {looked}, but one at its root: pass subfolder='' to load it "
            "(or Prior.from_pretrained(repo, subfolder='') and pass that Prior to ContinualTrainer)."
        )
    found: list[str] | None = None
    if not offline:
        try:
            files = HfApi().list_repo_files(repo_id, revision=commit, token=token)
            found = sorted(f for f in files if f == PRIOR_CONFIG_NAME or f.endswith(f"/{PRIOR_CONFIG_NAME}"))
        except (HTTPError, OSError):
            found = None
    if found is None:
        return PriorFileError(
            f"the local cache of {where} holds no hf_kfac prior {looked}, and the Hub cannot be reached (HF_HUB_OFFLINE "
            "is set, local_files_only=True, or no network). Download the prior once online, or check subfolder."
        )
    return PriorFileError(
        f"{where} holds no hf_kfac prior {looked}.{_others_hint(found, sub)}"
        + ("" if found else " It was pushed without consolidation: push it again after trainer.consolidate(), "
           "or start a new prior.")
    )


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
