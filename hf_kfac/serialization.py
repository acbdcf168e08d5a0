"""Atomic, sharded, checksummed safetensors folders with a JSON config.

A prior folder holds ``prior_config.json`` and one ``prior.safetensors`` file, or shards
``prior-00001-of-0000K.safetensors`` when it is larger than ``max_shard_size``. The
config lists every file with its SHA-256, and maps every tensor to its file. Only
safetensors and JSON are ever read: nothing is unpickled or executed.

A folder is written under a temporary name beside the target and renamed into place
when complete, so an interrupted save leaves the previous folder intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

PRIOR_CONFIG_NAME = "prior_config.json"
DEFAULT_PRIOR_SUBFOLDER = "fisher"  # the prior's folder beside a saved model
PRIOR_WEIGHTS_PATTERN = "prior{suffix}.safetensors"
PRIOR_WEIGHTS_NAME = "prior.safetensors"
DEFAULT_MAX_SHARD_SIZE = "2GB"


class PriorFileError(ValueError):
    """A prior folder is missing, corrupted, or does not fit the model."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensor_folder(
    folder: str | os.PathLike,
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``tensors`` (sharded) and ``config`` to ``folder``, replacing it atomically.

    The config gains ``files`` ({file: sha256}) and ``weight_map`` ({tensor: file}).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        # clone: safetensors refuses tensors that share memory (e.g. one curvature added twice)
        tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
        split = split_torch_state_dict_into_shards(
            tensors, filename_pattern=PRIOR_WEIGHTS_PATTERN, max_shard_size=max_shard_size
        )
        files: dict[str, str] = {}
        for filename, keys in split.filename_to_tensors.items():
            path = tmp / filename
            save_file({k: tensors[k] for k in keys}, str(path), metadata={"format": "pt"})
            files[filename] = sha256_file(path)
        if not tensors:  # an empty prior still gets its (empty) file
            save_file({}, str(tmp / PRIOR_WEIGHTS_NAME), metadata={"format": "pt"})
            files[PRIOR_WEIGHTS_NAME] = sha256_file(tmp / PRIOR_WEIGHTS_NAME)
        config = dict(config, files=files, weight_map=dict(split.tensor_to_filename))
        write_json_atomic(tmp / PRIOR_CONFIG_NAME, config)
        _swap_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first, then removed."""
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
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PriorFileError(f"{str(path)!r} is corrupted (not valid JSON: {e}). Restore it from a backup or re-run consolidation.") from e
    if not isinstance(config, dict):
        raise PriorFileError(f"{str(path)!r} is corrupted: expected a JSON object.")
    return config


def load_tensor_folder(folder: str | os.PathLike, config: dict[str, Any], verify: bool = True) -> dict[str, Tensor]:
    """Load every tensor of a prior folder, checking files, checksums and the weight map."""
    folder = Path(folder)
    files = config.get("files")
    weight_map = config.get("weight_map")
    if not isinstance(files, dict) or not isinstance(weight_map, dict):
        raise PriorFileError(f"{str(folder / PRIOR_CONFIG_NAME)!r} is corrupted: it lacks the `files` or `weight_map` entry.")
    tensors: dict[str, Tensor] = {}
    for filename, digest in files.items():
        if "/" in filename or "\\" in filename or filename.startswith("."):
            raise PriorFileError(f"the prior config names an unexpected file {filename!r}.")
        path = folder / filename
        if not path.is_file():
            raise PriorFileError(f"prior file {str(path)!r} is missing; the prior in {str(folder)!r} is incomplete.")
        if verify and sha256_file(path) != digest:
            raise PriorFileError(
                f"prior file {str(path)!r} is corrupted: its SHA-256 does not match the one recorded in "
                f"{PRIOR_CONFIG_NAME}. Restore it, or re-run consolidation to rebuild the prior."
            )
        try:
            part = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise PriorFileError(f"prior file {str(path)!r} is corrupted and cannot be read as safetensors: {e}") from e
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
