"""Atomic, sharded, checksummed safetensors folders with a JSON config.

A prior folder holds ``prior_config.json`` and one ``prior.safetensors`` file, or shards
``prior-00001-of-0000K.safetensors`` when it is larger than ``max_shard_size``. The
config lists every file with its SHA-256, and maps every tensor to its file. Only
safetensors and JSON are ever read: nothing is unpickled or executed.

Saving replaces the whole folder, so it refuses a folder that holds anything but a prior's
own files (a model folder: save the prior into its ``fisher`` subfolder instead).

A folder is written under a temporary name beside the target, ``.<name>.tmp-*``: every
file is written and fsynced first, and ``prior_config.json`` (which lists the files with
their SHA-256) last, so a temporary folder that holds a config whose checksums all match
is complete. It is then swapped in with two renames: the existing target to
``.<name>.old-*``, the temporary folder to the target; the old folder is then renamed to
``.<name>.trash-*`` and deleted. A process killed at any point leaves either the target
(old or new prior), or, between the two renames, no target but ``.<name>.old-*`` and a
complete ``.<name>.tmp-*``. Loading a missing target restores it from those leftovers
(the complete new prior if there is one, else the old one) with a warning, and the next
save removes whatever an interrupted save left behind. Two processes must not save to the
same folder at once.

Files get the permissions of an ordinary file (``0o666 & ~umask``) and the folder those of
an ordinary folder (``0o777 & ~umask``), as ``transformers`` writes a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

logger = logging.getLogger(__name__)

PRIOR_CONFIG_NAME = "prior_config.json"
DEFAULT_PRIOR_SUBFOLDER = "fisher"  # the prior's folder beside a saved model
PRIOR_WEIGHTS_PATTERN = "prior{suffix}.safetensors"
PRIOR_WEIGHTS_NAME = "prior.safetensors"
DEFAULT_MAX_SHARD_SIZE = "2GB"

# the weight files a save writes: prior.safetensors, or prior-00001-of-00003.safetensors (huggingface_hub's suffix)
_PRIOR_WEIGHTS_RE = re.compile(r"(?:-\d+-of-\d+)?".join(map(re.escape, PRIOR_WEIGHTS_PATTERN.split("{suffix}"))))
_LEFTOVER_KINDS = ("tmp", "old", "trash")  # .<name>.<kind>-<random>: what a save puts beside its target
_FIX = "Restore the folder from a backup, or re-run consolidation and save the prior again."


class PriorFileError(ValueError):
    """A prior folder is missing, corrupted, or does not fit the model."""


def is_prior_file(name: str) -> bool:
    """Whether a file name is one a prior save writes (``prior_config.json``, ``prior*.safetensors``)."""
    return name == PRIOR_CONFIG_NAME or _PRIOR_WEIGHTS_RE.fullmatch(name) is not None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------- permissions and durability
def _umask() -> int:
    """The process umask, read without changing it where Linux allows (it is process-wide state)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o666 & ~_umask()


def _dir_mode() -> int:
    return 0o777 & ~_umask()


def _fsync_path(path: str | os.PathLike) -> None:
    """fsync a file's contents, or a folder's entries (best effort for folders: not every OS allows it)."""
    is_dir = os.path.isdir(path)
    # a file is opened for writing: Windows' FlushFileBuffers refuses a read-only handle
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if is_dir else os.O_RDWR | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def _replace_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which is fsynced, given the usual mode
    (``0o666 & ~umask``; mkstemp makes 0600) and renamed over ``path``; on any error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_path(path.parent)


def _write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, as UTF-8 whatever the locale (:func:`_replace_atomically`)."""
    _replace_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


def save_safetensors_atomic(tensors: dict[str, Tensor], path: str | os.PathLike) -> None:
    """``safetensors`` file at ``path``, written atomically (:func:`_replace_atomically`)."""
    _replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file (fsynced, mode ``0o666 & ~umask``) and a rename."""
    _write_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` through a temporary file (fsynced, mode ``0o666 & ~umask``) and a rename."""
    _write_atomic(path, text)


# ------------------------------------------------------------------------------ saving
def _check_replaceable(folder: Path) -> None:
    """Refuse to replace ``folder`` unless it holds nothing but a prior's own files."""
    if not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise PriorFileError(
            f"cannot save the prior to {str(folder)!r}: it exists and is not a folder. "
            f"Save it into a folder of its own, e.g. {str(folder.parent / DEFAULT_PRIOR_SUBFOLDER)!r}."
        )
    foreign = sorted(p.name for p in folder.iterdir() if not (is_prior_file(p.name) and p.is_file() and not p.is_symlink()))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise PriorFileError(
            f"refusing to save the prior to {str(folder)!r}: it holds {foreign[0]!r}{more}, which is not a file of a "
            f"saved prior ({PRIOR_CONFIG_NAME}, prior*.safetensors). Saving replaces the whole folder, so that file "
            f"would be deleted. Nothing was written. Save the prior into a subfolder of its own, e.g. "
            f"{str(folder / DEFAULT_PRIOR_SUBFOLDER)!r} (where Prior.from_pretrained({str(folder)!r}) finds it), "
            "or move the file away."
        )


def save_tensor_folder(
    folder: str | os.PathLike,
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``tensors`` (sharded) and ``config`` to ``folder``, replacing it atomically.

    The config gains ``files`` ({file: sha256}) and ``weight_map`` ({tensor: file}).
    Raises :class:`PriorFileError`, writing nothing, when ``folder`` exists and holds
    anything but a prior's own files.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_save(folder)  # a missing target whose save was interrupted comes back first
    _check_replaceable(folder)
    _discard_leftovers(folder)  # the target is current: what earlier saves left beside it is stale
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        os.chmod(tmp, _dir_mode())  # mkdtemp makes 0700
        # clone: safetensors refuses tensors that share memory (e.g. one curvature added twice)
        tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
        split = split_torch_state_dict_into_shards(
            tensors, filename_pattern=PRIOR_WEIGHTS_PATTERN, max_shard_size=max_shard_size
        )
        shards = {name: list(keys) for name, keys in split.filename_to_tensors.items()}
        if not tensors:  # an empty prior still gets its (empty) file
            shards = {PRIOR_WEIGHTS_NAME: []}
        files: dict[str, str] = {}
        for filename, keys in shards.items():
            path = tmp / filename
            save_file({k: tensors[k] for k in keys}, str(path), metadata={"format": "pt"})
            _fsync_path(path)
            os.chmod(path, _file_mode())
            files[filename] = sha256_file(path)
        config = dict(config, files=files, weight_map=dict(split.tensor_to_filename))
        # written last, after every file is on disk: a temporary folder with a config is complete
        write_json_atomic(tmp / PRIOR_CONFIG_NAME, config)
        _fsync_path(tmp)
        _swap_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename the complete folder ``new`` to ``target``; an existing ``target`` is moved aside first, then removed.

    A kill between the two renames leaves ``.<target>.old-*`` and the complete ``new``
    (``.<target>.tmp-*``): :func:`restore_interrupted_save` puts ``new`` in place.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    _fsync_path(target.parent)
    if old is not None:
        _remove_folder(old, target)


def _remove_folder(path: Path, target: Path) -> None:
    """Delete a leftover folder: renamed to ``.<target>.trash-*`` first, so a half-deleted one is never read."""
    trash = target.with_name(f".{target.name}.trash-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _leftovers(target: Path, kind: str) -> list[Path]:
    """Folders ``.<target>.<kind>-*`` beside ``target``, newest first."""
    parent = target.parent
    prefix = f".{target.name}.{kind}-"
    try:
        found = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()]
    except OSError:  # no parent folder: nothing was ever saved there
        return []

    def mtime(p: Path) -> int:
        try:
            return p.stat().st_mtime_ns
        except OSError:
            return 0

    return sorted(found, key=mtime, reverse=True)


def _discard_leftovers(target: Path) -> None:
    """Delete every ``.<target>.tmp-*``, ``.old-*`` and ``.trash-*`` left by interrupted saves."""
    for kind in _LEFTOVER_KINDS:
        for p in _leftovers(target, kind):
            if kind == "trash":
                shutil.rmtree(p, ignore_errors=True)
            else:
                _remove_folder(p, target)


def _is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a config whose every listed file exists with its recorded SHA-256."""
    try:
        with open(folder / PRIOR_CONFIG_NAME, encoding="utf-8") as f:
            config = json.load(f)
        files = config["files"]
        if not isinstance(files, dict) or not files:
            return False
        return all(
            isinstance(name, str) and is_prior_file(name) and (folder / name).is_file() and sha256_file(folder / name) == digest
            for name, digest in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def interrupted_save_source(target: str | os.PathLike) -> Path | None:
    """The folder to restore a missing ``target`` from after an interrupted save, or ``None``.

    A kill between the two renames of a save leaves no ``target``, the previous prior in
    ``.<name>.old-*`` and the new one in ``.<name>.tmp-*``: the new one is chosen when it is
    provably complete (its config lists files that all match their SHA-256), else the old one.
    """
    target = Path(target)
    if os.path.lexists(target):
        return None
    tmps = _leftovers(target, "tmp")
    if not tmps:
        # no save was caught between its renames (that always leaves a ``.tmp-*``): an ``.old-*``
        # alone is a stale leftover of a finished save, and the target was removed on purpose
        return None
    for tmp in tmps:
        if _is_complete(tmp):
            return tmp
    olds = _leftovers(target, "old")
    complete = [p for p in olds if _is_complete(p)]
    with_config = [p for p in olds if (p / PRIOR_CONFIG_NAME).is_file()]
    return (complete or with_config or [None])[0]


def restore_interrupted_save(target: str | os.PathLike) -> Path:
    """Put back a ``target`` that an interrupted save left missing; returns the folder that holds the prior.

    Normally ``target`` itself (restored by a rename, with a warning). Where the rename is not
    possible (a read-only file system), the leftover folder is returned to be read in place.
    Returns ``target`` unchanged when it exists or nothing can restore it.
    """
    target = Path(target)
    source = interrupted_save_source(target)
    if source is None:
        return target
    which = "the complete new prior" if source.name.startswith(f".{target.name}.tmp-") else "the previous prior"
    try:
        os.replace(source, target)
    except OSError as e:
        if target.is_dir():  # restored meanwhile by another process
            return target
        logger.warning(
            "%s is missing: a save of the prior was interrupted. Reading %s from %s (it could not be renamed back: %s).",
            target, which, source, e,
        )
        return source
    _fsync_path(target.parent)
    logger.warning(
        "%s was missing: a save of the prior was interrupted. Restored %s from %s.", target, which, source
    )
    return target


# ----------------------------------------------------------------------------- loading
def hub_cache_repo(path: str | os.PathLike) -> tuple[str, Path] | None:
    """``(repo id, the repo's cache folder)`` when ``path`` lies in a Hugging Face Hub cache snapshot, else ``None``.

    A cache (``huggingface_hub.constants.HF_HUB_CACHE``, or any ``cache_dir=``) holds a repo's files
    under ``<type>s--<namespace>--<name>/snapshots/<commit>/``, as links into its ``blobs/``.
    """
    parts = Path(os.path.abspath(path)).parts
    for i in range(len(parts) - 2, 0, -1):
        kind, _, name = parts[i - 1].partition("--")
        if parts[i] == "snapshots" and kind in ("models", "datasets", "spaces") and name:
            return name.replace("--", "/"), Path(*parts[:i])
    return None


def corruption_fix(path: str | os.PathLike, otherwise: str = _FIX) -> str:
    """How to fix a damaged prior file: a fresh download for a file of the Hub cache, else ``otherwise``."""
    cached = hub_cache_repo(path)
    if cached is None:
        return otherwise
    repo_id, folder = cached
    return (
        "It is a file of the Hugging Face cache, damaged since its download: download it again with "
        f"Prior.from_pretrained({repo_id!r}, force_download=True), or delete the repo's cache folder {str(folder)!r} "
        "and load again."
    )


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and parse the config JSON of a prior folder, with clear errors."""
    folder = Path(folder)
    path = folder / PRIOR_CONFIG_NAME
    if not folder.is_dir():
        raise PriorFileError(f"no prior folder at {str(folder)!r}.")
    if not path.is_file():
        raise PriorFileError(
            f"{str(path)!r} is missing: {str(folder)!r} is not a saved hf_kfac prior "
            "(a prior folder holds prior_config.json and prior*.safetensors; save one with Prior.save_pretrained)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PriorFileError(f"{str(path)!r} is corrupted (not valid JSON: {e}). {corruption_fix(path)}") from e
    if not isinstance(config, dict):
        raise PriorFileError(f"{str(path)!r} is corrupted: expected a JSON object. {corruption_fix(path)}")
    return config


def _check_file_name(cfg_path: Path, field: str, name: Any) -> None:
    if not isinstance(name, str):
        raise PriorFileError(
            f"{str(cfg_path)!r} is corrupted: `{field}` names a file {name!r} that is not a string. {corruption_fix(cfg_path)}"
        )
    if "/" in name or "\\" in name or name.startswith(".") or not is_prior_file(name) or name == PRIOR_CONFIG_NAME:
        raise PriorFileError(
            f"{str(cfg_path)!r} is corrupted: `{field}` names an unexpected file {name!r} (a prior's tensors are in "
            f"{PRIOR_WEIGHTS_NAME} or prior-NNNNN-of-NNNNN.safetensors of the same folder). {corruption_fix(cfg_path)}"
        )


def load_tensor_folder(folder: str | os.PathLike, config: dict[str, Any], verify: bool = True) -> dict[str, Tensor]:
    """Load every tensor of a prior folder, checking files, checksums and the weight map."""
    folder = Path(folder)
    cfg_path = folder / PRIOR_CONFIG_NAME
    files = config.get("files")
    weight_map = config.get("weight_map")
    for field, value in (("files", files), ("weight_map", weight_map)):
        if not isinstance(value, dict):
            problem = "is missing" if value is None else f"should be a JSON object, not {type(value).__name__}"
            raise PriorFileError(f"{str(cfg_path)!r} is corrupted: `{field}` {problem}. {corruption_fix(cfg_path)}")
    for filename, digest in files.items():
        _check_file_name(cfg_path, "files", filename)
        if not isinstance(digest, str):
            raise PriorFileError(
                f"{str(cfg_path)!r} is corrupted: `files[{filename!r}]` should be a SHA-256 string, not {digest!r}. "
                f"{corruption_fix(cfg_path)}"
            )
    for key, filename in weight_map.items():
        _check_file_name(cfg_path, f"weight_map[{key!r}]", filename)
        if filename not in files:
            raise PriorFileError(
                f"{str(cfg_path)!r} is corrupted: `weight_map[{key!r}]` names {filename!r}, which `files` does not list. "
                f"{corruption_fix(cfg_path)}"
            )
    tensors: dict[str, Tensor] = {}
    for filename, digest in files.items():
        path = folder / filename
        if not path.is_file():
            raise PriorFileError(
                f"prior file {str(path)!r} is missing; the prior in {str(folder)!r} is incomplete."
                + (f" {corruption_fix(path)}" if hub_cache_repo(path) is not None else "")
            )
        if verify and sha256_file(path) != digest:
            raise PriorFileError(
                f"prior file {str(path)!r} is corrupted: its SHA-256 does not match the one recorded in "
                f"{PRIOR_CONFIG_NAME}. {corruption_fix(path, 'Restore it, or re-run consolidation to rebuild the prior.')}"
            )
        try:
            part = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise PriorFileError(
                f"prior file {str(path)!r} is corrupted and cannot be read as safetensors: {e}. {corruption_fix(path)}"
            ) from e
        for key, value in part.items():
            if weight_map.get(key) != filename:
                raise PriorFileError(f"tensor {key!r} in {filename!r} is not listed for that file in the weight map.")
            tensors[key] = value
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise PriorFileError(f"tensor {missing[0]!r} is listed in the weight map but absent from the files ({len(missing)} missing).")
    return tensors
def check_finite(tensors: dict[str, Tensor], allowed_dtypes: dict[str, set[torch.dtype]] | set[torch.dtype]) -> None:
    """Fail on NaN/inf and on dtypes a prior file should not hold."""
    for key, t in tensors.items():
        allowed = allowed_dtypes if isinstance(allowed_dtypes, set) else allowed_dtypes.get(key, {torch.float32})
        if t.dtype not in allowed:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in allowed))
            raise PriorFileError(f"tensor {key!r} has dtype {str(t.dtype).replace('torch.', '')}, but a prior stores it as {names}.")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PriorFileError(f"tensor {key!r} holds NaN or inf values; the prior is unusable. Re-run consolidation.")
