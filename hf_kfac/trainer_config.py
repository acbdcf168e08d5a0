"""`ContinualConfig`: `transformers.TrainingArguments` plus the options of the continual-learning prior.

The penalty added to the task loss L(θ) is

    λ · P(θ),   P(θ) = ½ Σ_s c_s (θ − θ*_s)ᵀ (F_s + D_s) (θ − θ*_s),

with λ = ``penalty_lambda``, F_s the consolidated Fisher (``penalty``: ``ewc`` diagonal, ``kfac``
Kronecker-factored, ``l2`` identity), D_s the damping δ = ``prior_damping`` adds (δI on diagonal terms;
δI + √δ(π I⊗G + A⊗I/π) on a K-FAC block A⊗G, see :mod:`hf_kfac.prior`) and c_s the task weights (N_t with
``prior_task_weighting="data_size"``, 1 with ``"uniform"``, times γ^age with γ = ``prior_decay``).

Because L is a mean over the current task's N_new examples while c_s = N_t counts the old task's
examples, λ = 1/N_new makes L + λP = (1/N_new)·[N_new·L + ½ Σ_s N_s ΔᵀF_sΔ], the negative log of the
Laplace-approximated posterior over all tasks divided by N_new; a larger λ protects old tasks more.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from transformers import TrainingArguments

from .curvature.config import FisherConfig
from .enums import Accumulation, FisherType, KFACApprox, PenaltyType, Shape, TaskWeighting
from .compact import StorageConfig
from .prior import PriorConfig

__all__ = ["ContinualConfig", "PENALTY_SHAPES"]

PENALTY_SHAPES: dict[PenaltyType, Shape] = {
    PenaltyType.L2: Shape.IDENTITY,
    PenaltyType.EWC: Shape.DIAG,
    PenaltyType.KFAC: Shape.KFAC,
}
"""The prior shape each penalty uses (``none`` has no prior)."""

_DEFAULT_LAMBDA = 1.0
# names with the extension of a file the model, tokenizer or Trainer writes (config.json, model.safetensors,
# training_args.bin, optimizer.pt, rng_state.pth, README.md, spiece.model, vocab.txt, ...)
_FILE_NAME = re.compile(r"\.(json|safetensors|bin|pt|pth|md|txt|model|msgpack|h5|ckpt|onnx|gguf)$", re.IGNORECASE)


def _choices(enum: type) -> str:
    return ", ".join(repr(m.value) for m in enum)  # type: ignore[attr-defined]


def _as_enum(name: str, value: Any, enum: type, fix: str = "") -> Any:
    """``enum(value)``, re-raising with the field name, the bad value and the valid choices."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(
            f"{name}={value!r} is not valid; choose one of {_choices(enum)}.{(' ' + fix) if fix else ''}"
        ) from None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class ContinualConfig(TrainingArguments):
    """Training arguments of :class:`~hf_kfac.trainer.ContinualTrainer`.

    Every option of `transformers.TrainingArguments` plus the penalty, the Fisher estimation
    used by ``consolidate()`` and the prior's accumulation. The ``prior_*`` options left at
    ``None`` keep the value stored in a loaded prior, or take the core default for a new one
    (separate, γ = 1, data_size, δ = 0). Set explicitly, ``prior_damping`` overrides a loaded
    prior's (it acts at penalty time) and so does ``prior_decay``, with an effect that depends
    on the accumulation: with ``separate`` the decay is applied at penalty time, so the new γ
    re-weights every stored task; with ``merge`` the past decay is already folded into the
    stored merged weight, so the new γ only acts on future merges (each later task shrinks the
    stored weight by γ). ``prior_accumulation`` and ``prior_task_weighting`` must match a loaded
    prior (its stored tasks were combined with them).
    """

    # ------------------------------------------------------------------ penalty
    penalty: str = field(
        default="kfac",
        metadata={
            "help": "Regulariser added to the task loss: 'kfac' (K-FAC Laplace), 'ewc' (diagonal Fisher), "
            "'l2' (distance to the anchor) or 'none' (plain fine-tuning).",
            "choices": [m.value for m in PenaltyType],
        },
    )
    penalty_lambda: float | None = field(
        default=None,
        metadata={
            "help": "Penalty strength λ >= 0 (default 1.0, or 0.0 with penalty='none'). With "
            "prior_task_weighting='data_size', λ = 1/N (N: examples of the current task) gives the Laplace posterior."
        },
    )
    # ----------------------------------------------------------- Fisher options
    fisher_type: str = field(
        default="mc",
        metadata={
            "help": "Labels of the Fisher: 'mc' (sampled from the model), 'empirical' (true labels) or 'exact' "
            "(every class; one backward pass per class and output position).",
            "choices": [m.value for m in FisherType],
        },
    )
    fisher_n_samples: int = field(default=1, metadata={"help": "Labels sampled per example for fisher_type='mc'."})
    kfac_approx: str = field(
        default="expand",
        metadata={
            "help": "K-FAC for weights shared over positions: 'expand' (every token is an example) or 'reduce' "
            "(positions averaged/summed per example first).",
            "choices": [m.value for m in KFACApprox],
        },
    )
    fisher_max_examples: int | None = field(
        default=None,
        metadata={"help": "Use at most this many examples (a random subset, seeded by `seed`) in consolidate(); None: all."},
    )
    fisher_max_batches: int | None = field(
        default=None,
        metadata={
            "help": "Use at most this many batches of fisher_batch_size examples in consolidate(), counted over all "
            "processes together; None: all."
        },
    )
    fisher_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of Fisher estimation per process; None: per_device_train_batch_size."},
    )
    fisher_exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "fnmatch patterns of module or parameter names left out of the prior (e.g. '*.embeddings.*')."},
    )
    fisher_force_diag: list[str] = field(
        default_factory=list,
        metadata={"help": "fnmatch patterns of nn.Linear modules given a diagonal Fisher instead of K-FAC."},
    )
    kfac_max_factor_ratio: float = field(
        default=10.0,
        metadata={
            "help": "A Linear whose K-FAC factors would hold more than this many times the numbers of its weight "
            "gets a diagonal Fisher (e.g. a large classification head)."
        },
    )
    # ------------------------------------------------------------ prior options
    prior_damping: float | None = field(
        default=None,
        metadata={"help": "Damping δ >= 0 added at penalty time: δ to a diagonal Fisher, factored (π√δ, √δ/π) to the two K-FAC factors; None: the loaded prior's, else 0."},
    )
    prior_accumulation: str | None = field(
        default=None,
        metadata={
            "help": "How tasks combine: 'separate' (one anchor and Fisher per task, exact) or 'merge' (online, "
            "constant storage); None: the loaded prior's, else 'separate'.",
            "choices": [m.value for m in Accumulation],
        },
    )
    prior_decay: float | None = field(
        default=None,
        metadata={
            "help": "Decay γ in (0, 1] of older tasks' weights; None: the loaded prior's, else 1.0. Set on a loaded "
            "prior, it re-weights every stored task with accumulation 'separate' (γ is applied at penalty time), "
            "but only future merges with 'merge' (the past decay is already folded into the merged weight)."
        },
    )
    prior_task_weighting: str | None = field(
        default=None,
        metadata={
            "help": "Weight of each task: 'data_size' (N_t, the Laplace posterior) or 'uniform' (classic EWC); "
            "None: the loaded prior's, else 'data_size'.",
            "choices": [m.value for m in TaskWeighting],
        },
    )
    prior_storage: dict | str | None = field(
        default=None,
        metadata={
            "help": "How a new prior stores K-FAC factors: 'full', 'compact' (eigenpairs + remainder; with prior_accumulation='merge' "
            "at most the model's size), or a JSON object of StorageConfig fields, e.g. '{\"format\": \"compact\", "
            "\"compute_dtype\": \"bfloat16\"}'; None: the loaded prior's, else 'full'."
        },
    )
    prior_subfolder: str = field(
        default="fisher",
        metadata={"help": "Subfolder of the model folder (and of every checkpoint) that holds the prior."},
    )

    def __post_init__(self) -> None:
        self._validate_continual_options()
        super().__post_init__()

    # --------------------------------------------------------------- validation
    def _validate_continual_options(self) -> None:
        """Normalise the enums and check every continual-learning option (errors name the field and the fix)."""
        self.penalty = _as_enum("penalty", self.penalty, PenaltyType)
        lam = self.penalty_lambda
        if lam is None:
            self.penalty_lambda = 0.0 if self.penalty == PenaltyType.NONE else _DEFAULT_LAMBDA
        else:
            if not _is_number(lam) or not math.isfinite(lam) or lam < 0:
                raise ValueError(
                    f"penalty_lambda={lam!r} is not valid: it must be a finite float >= 0 "
                    "(0 disables the penalty while still allowing consolidate())."
                )
            if self.penalty == PenaltyType.NONE and lam > 0:
                raise ValueError(
                    f"penalty_lambda={lam!r} has no effect with penalty='none'. Set penalty='kfac', 'ewc' or 'l2' "
                    "to use the prior, or penalty_lambda=0.0 to train without it."
                )
            self.penalty_lambda = float(lam)
        self.fisher_type = _as_enum("fisher_type", self.fisher_type, FisherType)
        self.kfac_approx = _as_enum("kfac_approx", self.kfac_approx, KFACApprox)
        if self.prior_accumulation is not None:
            self.prior_accumulation = _as_enum("prior_accumulation", self.prior_accumulation, Accumulation)
        if self.prior_task_weighting is not None:
            self.prior_task_weighting = _as_enum("prior_task_weighting", self.prior_task_weighting, TaskWeighting)
        if not isinstance(self.fisher_n_samples, int) or isinstance(self.fisher_n_samples, bool) or self.fisher_n_samples < 1:
            raise ValueError(f"fisher_n_samples={self.fisher_n_samples!r} is not valid: it must be an integer >= 1.")
        for name in ("fisher_max_examples", "fisher_max_batches", "fisher_batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name}={v!r} is not valid: it must be an integer >= 1, or None for no limit.")
        r = self.kfac_max_factor_ratio
        if not _is_number(r) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"kfac_max_factor_ratio={r!r} is not valid: it must be a finite float > 0 (default 10).")
        if self.prior_damping is not None:
            d = self.prior_damping
            if not _is_number(d) or not math.isfinite(d) or d < 0:
                raise ValueError(f"prior_damping={d!r} is not valid: it must be a finite float >= 0 (e.g. 1e-4).")
            self.prior_damping = float(d)
        if self.prior_decay is not None:
            g = self.prior_decay
            if not _is_number(g) or not (0.0 < g <= 1.0):
                raise ValueError(f"prior_decay={g!r} is not valid: γ must be in (0, 1] (1.0: no decay).")
            self.prior_decay = float(g)
        for name in ("fisher_exclude", "fisher_force_diag"):
            v = getattr(self, name)
            if v is None:
                v = []
            if isinstance(v, str):
                v = [p.strip() for p in v.split(",") if p.strip()]
            if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) and p for p in v):
                raise ValueError(f"{name}={v!r} is not valid: it must be a list of fnmatch patterns (strings).")
            setattr(self, name, list(v))
        self._validate_storage()
        self._validate_subfolder()

    def _validate_storage(self) -> None:
        value = self.prior_storage
        if value is None:
            return
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"prior_storage={self.prior_storage!r} is not valid JSON ({e}).") from None
        try:
            coerced = StorageConfig.coerce(value)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"prior_storage={self.prior_storage!r} is not valid: {e} Use 'full', 'compact' or a JSON object of "
                "StorageConfig fields."
            ) from None
        # a StorageConfig object is kept as its dict: the arguments must stay JSON-serialisable
        # (to_json_string, the loggers' hyperparameter records, training_args.bin readers)
        self.prior_storage = coerced.to_dict() if isinstance(value, StorageConfig) else value

    def _validate_subfolder(self) -> None:
        sub = self.prior_subfolder
        bad = None
        if not isinstance(sub, str) or not sub.strip():
            bad = "it must be a non-empty folder name"
        else:
            parts = PurePosixPath(sub.replace("\\", "/")).parts
            if PurePosixPath(sub).is_absolute() or PureWindowsPath(sub).is_absolute() or ".." in parts:
                bad = "it must be a relative path inside the model folder"
            elif not parts:  # ".", "./": the model folder itself
                bad = "it must name a subfolder, not the model folder itself (the prior's files would mix with the model's)"
            elif any(p.startswith((".", "_")) for p in parts):
                bad = "names starting with '.' or '_' are skipped by the Trainer's Hub uploads"
            elif parts[0].startswith("checkpoint-") or parts[0] in ("runs", "last-checkpoint"):
                bad = "it would collide with the Trainer's checkpoint or log folders"
            elif _FILE_NAME.search(parts[0]):
                bad = (f"{parts[0]!r} is the name of a file the model, tokenizer or Trainer writes into the model "
                       "folder (the save would fail after training)")
        if bad:
            raise ValueError(f"prior_subfolder={sub!r} is not valid: {bad}. Use e.g. prior_subfolder='fisher'.")

    # ------------------------------------------------------------------ helpers
    @property
    def prior_shape(self) -> Shape | None:
        """The prior shape of ``penalty`` (``None`` for ``penalty='none'``)."""
        return PENALTY_SHAPES.get(PenaltyType(self.penalty))

    def to_fisher_config(self) -> FisherConfig:
        """The core :class:`FisherConfig` of ``consolidate()`` (``penalty`` 'ewc' → diag, 'kfac' → kfac).

        ``max_batches`` is recorded as given; the trainer applies ``fisher_max_examples`` and
        ``fisher_max_batches`` globally (over all processes) before handing the data to the estimator.
        """
        shape = self.prior_shape
        if shape is None or shape == Shape.IDENTITY:
            raise ValueError(
                f"penalty={str(self.penalty)!r} estimates no Fisher; set penalty='kfac' or 'ewc' to get a FisherConfig."
            )
        return FisherConfig(
            shape=shape,
            fisher_type=self.fisher_type,
            n_samples=self.fisher_n_samples,
            kfac_approx=self.kfac_approx,
            exclude=list(self.fisher_exclude),
            force_diag=list(self.fisher_force_diag),
            max_factor_ratio=float(self.kfac_max_factor_ratio),
            max_batches=self.fisher_max_batches,
            seed=int(self.seed),
        )

    @property
    def prior_storage_config(self) -> StorageConfig | None:
        """``prior_storage`` as a :class:`StorageConfig` (``None`` when unset)."""
        return None if self.prior_storage is None else StorageConfig.coerce(self.prior_storage)

    def to_prior_config(self) -> PriorConfig:
        """The core :class:`PriorConfig` of a new prior; options left at ``None`` take the core defaults."""
        shape = self.prior_shape
        if shape is None:
            raise ValueError("penalty='none' keeps no prior; set penalty='kfac', 'ewc' or 'l2' to build one.")
        default = PriorConfig()
        return PriorConfig(
            shape=shape,
            accumulation=self.prior_accumulation if self.prior_accumulation is not None else default.accumulation,
            decay=self.prior_decay if self.prior_decay is not None else default.decay,
            task_weighting=self.prior_task_weighting if self.prior_task_weighting is not None else default.task_weighting,
            damping=self.prior_damping if self.prior_damping is not None else default.damping,
            storage=self.prior_storage_config,
        )
