"""The prior over consolidated tasks: anchors θ*, curvature, and their accumulation.

A prior is a list of *slots*. Each slot holds an anchor θ*_s, a curvature F_s normalised
like a mean Fisher, and a weight c_s. The penalty is

    P(θ) = ½ λ Σ_s c_s (θ − θ*_s)ᵀ (F_s + D_s) (θ − θ*_s),

where D_s is what the damping δ >= 0 adds to the curvature. A diagonal (or identity) term
gains exactly δ: D = δ I. A K-FAC block F = A ⊗ G (A over the layer's inputs, G over its
outputs) is damped factor by factor (Martens & Grosse 2015, factored Tikhonov damping):

    (A + π√δ I) ⊗ (G + √δ/π I),   π² = (tr A / d_A) / (tr G / d_G)   (π = 1 if a trace is 0),

so that D = δ I + √δ (π I ⊗ G + A ⊗ I / π). That is more than δ I, and grows with the scale
of the factors: for A = a I and G = g I, D = (δ + 2√(δ a g)) I. The product F + D does not
depend on how the scale of F is split between A and G, and π is the value that minimises
the trace of the cross terms √δ (π I ⊗ G + A ⊗ I / π). A compact block is damped by the same
rule, the π√δ and √δ/π going into the residuals of its factors.

Accumulation over tasks t = 1..T with task weights s_t (N_t, or 1) and decay γ:

- ``separate``: one slot per task, c_t = γ^{T−t} s_t. Exact; storage grows with T.
- ``merge``: one slot, anchored at the newest θ*_T (online EWC, Schwarz et al. 2018), with
  weight C = γ C_old + s_T and curvature (γ C_old F_old + s_T F_T) / C. Diagonals add
  exactly. For a K-FAC layer the weighted sum of two Kronecker products is replaced by its
  nearest single Kronecker product in Frobenius norm (Van Loan & Pitsianis): the top
  singular pair of the rearranged sum, found by power iteration in the 2-D span of the
  factors, so it costs a few inner products and keeps storage constant. Because all weights
  are positive and the factors PSD, the result is PSD. Unlike the plain sum of factors
  (ΣA) ⊗ (ΣG), it adds no cross terms A_1 ⊗ G_2 that no task measured.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import operator
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .compact import (
    EIGVEC_DTYPES,
    CompactFactor,
    CompactKFACBlock,
    StorageConfig,
    compress_curvature,
    densify_curvature,
    is_compact,
    weights_digest,
)
from .curvature.blocks import Curvature, KFACBlock
from .curvature.config import FisherConfig
from .enums import Accumulation, Shape, TaskWeighting
from .penalty import CompactKFACTerm, DiagTerm, FactorOp, KFACTerm, QuadraticPenalty
from .serialization import (
    DEFAULT_MAX_SHARD_SIZE,
    PRIOR_CONFIG_NAME,
    PriorFileError,
    check_finite,
    load_tensor_folder,
    read_config,
    restore_interrupted_save,
    save_tensor_folder,
)
from .version import __version__

FORMAT_VERSION = 2  # newest format read; full priors are still written as version 1
_COMPACT_FORMAT_VERSION = 2


@dataclass
class PriorConfig:
    """How tasks are combined and damped.

    Attributes:
        shape: ``diag``, ``kfac`` or ``identity`` (L2).
        accumulation: ``separate`` or ``merge``.
        decay: γ in (0, 1]: weight of a task shrinks by γ with each newer task.
        task_weighting: ``data_size`` (s_t = N_t, the Laplace posterior) or ``uniform``.
        damping: δ >= 0, applied to every slot's curvature at penalty time: δ is added to a
            diagonal; a K-FAC block A ⊗ G becomes (A + π√δ I) ⊗ (G + √δ/π I), which adds
            δ I + √δ (π I ⊗ G + A ⊗ I / π) (see the module docstring).
        storage: How K-FAC factors (and anchors) are stored: ``"full"`` (default),
            ``"compact"``, or a :class:`~hf_kfac.compact.StorageConfig` / dict with the
            compact options (``rank_fraction``, ``rank``, ``energy``, ``remainder``,
            ``eigenvector_dtype``, ``compute_dtype``, ``anchor``).
    """

    shape: Shape | str = Shape.KFAC
    accumulation: Accumulation | str = Accumulation.SEPARATE
    decay: float = 1.0
    task_weighting: TaskWeighting | str = TaskWeighting.DATA_SIZE
    damping: float = 0.0
    storage: StorageConfig | str | dict | None = None

    def __post_init__(self) -> None:
        self.storage = StorageConfig.coerce(self.storage)
        self.shape = Shape(self.shape)
        self.accumulation = Accumulation(self.accumulation)
        self.task_weighting = TaskWeighting(self.task_weighting)
        if not (isinstance(self.decay, (int, float)) and 0.0 < self.decay <= 1.0):
            raise ValueError(f"decay must be in (0, 1], got {self.decay!r}.")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"damping must be a finite float >= 0, got {self.damping!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("shape", "accumulation", "task_weighting"):
            d[k] = str(d[k])
        d["storage"] = self.storage.to_dict()
        return d


@dataclass
class TaskRecord:
    """One consolidated task: its name, data size, date and free-form metadata."""

    name: str
    n_examples: int
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    fisher: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Slot:
    anchor: dict[str, Tensor]
    curvature: Curvature | None  # None for an identity (L2) prior
    scale: float  # s_t (separate) or C (merge)
    tasks: list[int]


def _frob(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def nearest_kronecker(terms: list[tuple[float, Tensor, Tensor]], iters: int = 50) -> tuple[Tensor, Tensor]:
    """argmin_{A,G} ‖Σ_t c_t A_t ⊗ G_t − A ⊗ G‖_F, with A, G in the span of the A_t, G_t.

    Power iteration on coefficients: with K_A[s,t] = ⟨A_s, A_t⟩ and K_G likewise,
    α ← C K_G β and β ← C K_A α converge to the top singular pair of the rearranged sum.
    """
    if len(terms) == 1:
        c, A, G = terms[0]
        return A, G * c
    cs = torch.tensor([t[0] for t in terms], dtype=torch.float64)
    KA = torch.tensor([[_frob(s[1], t[1]) for t in terms] for s in terms], dtype=torch.float64)
    KG = torch.tensor([[_frob(s[2], t[2]) for t in terms] for s in terms], dtype=torch.float64)
    beta = cs.clone()
    alpha = cs.clone()
    for _ in range(iters):
        alpha = cs * (KG @ beta)
        alpha = alpha / alpha.norm().clamp_min(1e-300)
        beta = cs * (KA @ alpha)
        beta = beta / beta.norm().clamp_min(1e-300)
    A = sum(float(a) * t[1] for a, t in zip(alpha, terms))
    G = sum(float(b) * t[2] for b, t in zip(beta, terms))
    na, ng = _frob(A, A), _frob(G, G)
    if na == 0 or ng == 0:
        return torch.zeros_like(terms[0][1]), torch.zeros_like(terms[0][2])
    # optimal scale for fixed directions: ⟨S, A⊗G⟩ / ‖A⊗G‖²
    s = sum(c * _frob(t[1], A) * _frob(t[2], G) for c, t in zip(cs.tolist(), terms)) / (na * ng)
    return A, G * s


def _merge_curvatures(parts: list[tuple[float, Curvature]], total: float) -> Curvature:
    """(Σ_i w_i F_i) / total: diagonals exactly, K-FAC blocks by nearest Kronecker product."""
    kfac_names: set[str] = set()
    diag_layers: set[str] = set()
    for _, c in parts:
        kfac_names |= set(c.kfac)
    # a layer that is K-FAC in one part and diagonal (or absent with its params present) in another becomes diagonal
    for name in list(kfac_names):
        blocks = [c.kfac.get(name) for _, c in parts]
        ref = next(b for b in blocks if b is not None)
        for (_, c), b in zip(parts, blocks):
            if b is None and (ref.weight in c.diag or (ref.bias is not None and ref.bias in c.diag)):
                diag_layers.add(name)
            elif b is not None and (b.A.shape != ref.A.shape or b.G.shape != ref.G.shape):
                diag_layers.add(name)
    parts = [(w, densify_curvature(c)) for w, c in parts]
    out = Curvature(n_examples=sum(c.n_examples for _, c in parts))
    diag_parts = []
    for w, c in parts:
        if diag_layers & set(c.kfac):
            keep = {k: b for k, b in c.kfac.items() if k not in diag_layers}
            conv = Curvature({k: b for k, b in c.kfac.items() if k in diag_layers}, {}, c.n_examples).as_diagonal()
            c = Curvature(keep, {**c.diag, **conv.diag}, c.n_examples, c.diag_fallbacks)
        diag_parts.append((w, c))
        out.diag_fallbacks.update(c.diag_fallbacks)
    for name in kfac_names - diag_layers:
        terms = [(w / total, c.kfac[name].A, c.kfac[name].G) for w, c in diag_parts if name in c.kfac]
        ref = next(c.kfac[name] for _, c in diag_parts if name in c.kfac)
        A, G = nearest_kronecker(terms)
        out.kfac[name] = KFACBlock(A, G, ref.weight, ref.bias)
    for w, c in diag_parts:
        for pname, d in c.diag.items():
            out.diag[pname] = out.diag[pname] + d * (w / total) if pname in out.diag else d * (w / total)
    return out


_UNWRAP = (
    "Pass the unwrapped model: `model._orig_mod` for torch.compile, `model.module` for DDP/DataParallel, "
    "or accelerator.unwrap_model(model)."
)
_WRAPPER_SEGMENTS = ("_orig_mod", "module")  # what torch.compile and DDP/DataParallel put before parameter names
_PEFT_PREFIX = "base_model.model."  # where a PEFT model holds its base model's parameters


def _wrapper_of(model: nn.Module) -> str | None:
    """The wrapper ``model`` is (``torch.compile``, ``DistributedDataParallel``, ``DataParallel``), or ``None``."""
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return "torch.compile"
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return type(model).__name__
    return None


def _wrapped_name(name: str, names: Iterable[str]) -> str | None:
    """The entry of ``names`` that is ``name`` behind wrapper prefixes (``_orig_mod.``, ``module.``), or ``None``."""
    for k in names:
        if k.endswith("." + name) and all(seg in _WRAPPER_SEGMENTS for seg in k[: -len(name) - 1].split(".")):
            return k
    return None


def _wrapped_message(name: str, found: str, what: str) -> str:
    """The error for a prior parameter ``name`` that the model holds as ``found``, behind a wrapper's prefix."""
    wrapper = "torch.compile" if found.startswith("_orig_mod.") else "DDP/DataParallel"
    return (
        f"{what} parameter {name!r}, which the model holds as {found!r}: the model is wrapped ({wrapper} prefixes "
        f"{found[: -len(name)]!r} to every name), not another architecture. {_UNWRAP}"
    )


def _count(value: Any, task: str) -> int:
    """``value`` (an int, a NumPy or torch integer, or an integral float) as an int >= 0."""
    n: int | None = None
    if not isinstance(value, bool):
        try:
            n = operator.index(value)
        except TypeError:
            try:
                f = float(value)
            except (TypeError, ValueError):
                f = math.nan
            n = int(f) if math.isfinite(f) and f.is_integer() else None
    if n is None:
        raise TypeError(f"n_examples of task {task!r} must be an integer (the task's data size), got {value!r}.")
    if n < 0:
        raise ValueError(f"n_examples of task {task!r} must be >= 0 (the task's data size), got {n}.")
    return n


class Prior:
    """Anchors and curvature of consolidated tasks, with the penalty they define."""

    def __init__(self, config: PriorConfig | None = None, fisher: FisherConfig | None = None, **kwargs: Any) -> None:
        self.config = config or PriorConfig(**kwargs)
        self._fisher = fisher or FisherConfig(shape=self.config.shape if self.config.shape != Shape.IDENTITY else Shape.DIAG)
        # whether `fisher` was given (constructor, or set as the trainer does before add_task): only then is it
        # recorded for a task whose curvature does not carry the options it was estimated with
        self._fisher_declared = fisher is not None
        self.tasks: list[TaskRecord] = []
        self.slots: list[_Slot] = []
        self.param_shapes: dict[str, list[int]] = {}
        self._penalty_cache: dict[Any, QuadraticPenalty] = {}

    @property
    def fisher(self) -> FisherConfig:
        """The Fisher options of the prior's tasks (saved with it; recorded for tasks whose curvature does not
        carry its own)."""
        return self._fisher

    @fisher.setter
    def fisher(self, value: FisherConfig) -> None:
        self._fisher = value
        self._fisher_declared = True

    # ----------------------------------------------------------------- building
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        names = ", ".join(str(t.name) for t in self.tasks)
        return (
            f"Prior(shape={self.config.shape}, accumulation={self.config.accumulation}, tasks=[{names}], "
            f"slots={len(self.slots)}, numel={self.numel()})"
        )

    def add_task(
        self,
        model: nn.Module,
        curvature: Curvature | None,
        name: str,
        n_examples: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> TaskRecord:
        """Fold one task into the prior, anchored at ``model``'s current parameters.

        Args:
            model: The model after training on the task; its parameters become θ*.
            curvature: The task's Fisher (``None`` for an identity prior, which then
                anchors every trainable parameter).
            name: Task name, recorded in the history and model card.
            n_examples: Task data size N_t (defaults to ``curvature.n_examples``).
            metadata: Anything JSON-serialisable to keep with the task (λ, metrics...).

        Raises ``ValueError`` / ``TypeError``, leaving the prior as it was, for anything the saved
        prior could not hold or :meth:`load_folder` would refuse: a name that is not a string, a
        count that is not an integer >= 0, metadata that is not JSON, a wrapped model
        (``torch.compile``, DDP), a curvature that does not fit the model, a parameter whose shape
        differs from the one the prior recorded for it, or a NaN/inf weight in the anchor.
        """
        if (curvature is None) != (self.config.shape == Shape.IDENTITY):
            raise ValueError(
                f"a prior of shape {self.config.shape!s} needs "
                + ("no curvature (pass curvature=None)." if curvature is None or self.config.shape == Shape.IDENTITY else "a curvature.")
            )
        # every check before anything changes: a refused task leaves the prior as it was
        if not isinstance(name, str):
            raise TypeError(
                f"the task name must be a string, got {type(name).__name__} {name!r}: it is saved in "
                f"{PRIOR_CONFIG_NAME} and shown in the model card. Pass name=str(...)."
            )
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata of task {name!r} must be a dict, got {type(metadata).__name__}.")
        try:
            json.dumps(metadata or {})
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"metadata of task {name!r} must be JSON-serialisable (it is saved with the prior): {e}. Convert NumPy "
                "or torch scalars with float(...) / int(...) (or .item())."
            ) from None
        wrapper = _wrapper_of(model)
        if wrapper is not None:
            raise ValueError(
                f"add_task got a model wrapped by {wrapper}, whose parameter names carry the wrapper's prefix: the prior "
                f"would cover names the model itself does not have. {_UNWRAP}"
            )
        params = dict(model.named_parameters())
        fisher_record = self._fisher_record(curvature)
        if curvature is None:
            names = [n for n, p in params.items() if p.requires_grad]
            n = _count(n_examples if n_examples is not None else 0, name)
        else:
            names = curvature.param_names()
            n = _count(n_examples if n_examples is not None else curvature.n_examples, name)
            curvature = curvature.to(device="cpu", dtype=torch.float32)
            self._check_curvature(curvature, params)
        s_t = float(n) if self.config.task_weighting == TaskWeighting.DATA_SIZE else 1.0
        if s_t <= 0:
            raise ValueError(
                f"task {name!r} has no data (n_examples={n}); with task_weighting='data_size' it would get weight 0."
            )
        for x in names:
            old = self.param_shapes.get(x)
            if old is not None and list(params[x].shape) != old:
                raise ValueError(
                    f"parameter {x!r} has shape {list(params[x].shape)} in the model but {old} in the prior: a parameter "
                    "covered by the prior changed shape (a head with another number of labels, a resized vocabulary). "
                    "Give the new head a new name (another module attribute, so that it is a new parameter), or leave it "
                    "out of the prior (exclude=[...] / the trainer's fisher_exclude; requires_grad=False for an L2 prior), "
                    "or start a new prior."
                )
        anchor = {x: params[x].detach().to(device="cpu", dtype=torch.float32).clone() for x in names}
        for x, a in anchor.items():
            if not bool(torch.isfinite(a).all()):
                raise ValueError(
                    f"parameter {x!r} of the model holds NaN or inf (in float32), so it cannot be the anchor of task "
                    f"{name!r}: training diverged (an overflow under fp16, a learning rate too high). Consolidate a "
                    "checkpoint whose weights are finite, or leave the parameter out of the prior (exclude=[...] / the "
                    "trainer's fisher_exclude; requires_grad=False for an L2 prior)."
                )
        # the new state is built in locals and checked as the loader would check it; the prior changes only then
        record = TaskRecord(name=name, n_examples=n, fisher=fisher_record, metadata=dict(metadata or {}))
        t = len(self.tasks)
        shapes = {**self.param_shapes, **{x: list(params[x].shape) for x in names}}
        slots = list(self.slots)
        if self.config.accumulation == Accumulation.SEPARATE or not slots:
            slot = _Slot(anchor, curvature, s_t, [t])
            slots.append(slot)
        else:
            old_slot = slots[0]
            gamma = self.config.decay
            total = gamma * old_slot.scale + s_t
            merged = None
            if curvature is not None:
                assert old_slot.curvature is not None
                merged = _merge_curvatures([(gamma * old_slot.scale, old_slot.curvature), (s_t, curvature)], total)
            slot = _Slot({**old_slot.anchor, **anchor}, merged, total, old_slot.tasks + [t])
            slots[0] = slot
        if self.config.storage.compact and slot.curvature is not None and slot.curvature.kfac:
            slot.curvature = compress_curvature(slot.curvature, self.config.storage)
        candidate = copy.copy(self)
        candidate.tasks, candidate.slots, candidate.param_shapes = self.tasks + [record], slots, shapes
        candidate._check_loadable({}, f"task {name!r} was refused (the prior is unchanged)")
        self.tasks.append(record)
        self.slots[:] = slots
        self.param_shapes.update(shapes)
        self._penalty_cache.clear()
        return record

    def _fisher_record(self, curvature: Curvature | None) -> dict[str, Any]:
        """The Fisher options a task's curvature was estimated with, as far as they are known.

        ``{"shape": "identity"}`` for an L2 task (no Fisher); the options the curvature carries
        (``curvature.fisher_config``, a :class:`FisherConfig` or its dict) if any; else the prior's
        ``fisher`` if it was given (the trainer sets it before each task) and fits the curvature;
        else only the shape, read from the curvature (``kfac`` if it holds a K-FAC block).
        """
        if curvature is None:
            return {"shape": str(Shape.IDENTITY)}
        carried = getattr(curvature, "fisher_config", None)
        if isinstance(carried, dict):
            try:
                carried = FisherConfig(**carried)
            except (TypeError, ValueError):
                carried = None
        if isinstance(carried, FisherConfig):
            return carried.to_dict()
        shape = Shape.KFAC if curvature.kfac else Shape.DIAG
        # a kfac estimate whose every Linear fell back to a diagonal holds no K-FAC block
        if self._fisher_declared and (self.fisher.shape == shape or (self.fisher.shape == Shape.KFAC and shape == Shape.DIAG)):
            return self.fisher.to_dict()
        return {"shape": str(shape)}

    @staticmethod
    def _check_curvature(c: Curvature, params: dict[str, nn.Parameter]) -> None:
        """Refuse a curvature that names a parameter ``params`` lacks, does not fit a parameter's shape,
        or holds NaN/inf; each error names the parameter and the fix."""
        refit = "Estimate the Fisher on this model (estimate_fisher(model, ...)) and pass that curvature."
        for pname in c.param_names():
            if pname not in params:
                found = _wrapped_name(pname, params)
                if found is not None:
                    raise ValueError(_wrapped_message(pname, found, "the curvature covers"))
                raise ValueError(
                    f"the curvature covers parameter {pname!r}, which is not a parameter of the model: it was "
                    f"estimated on another model (or the parameter was renamed). {refit}"
                )

        def finite(t: Tensor | CompactFactor) -> bool:
            parts = t.tensors().values() if isinstance(t, CompactFactor) else (t,)
            return all(bool(torch.isfinite(x).all()) for x in parts)

        diverged = (
            "the Fisher estimate diverged (an overflow under fp16 autocast, or non-finite weights or outputs). "
            "Re-estimate it at finite weights in float32 or bf16, or leave the parameter out (exclude=[...], "
            "the trainer's fisher_exclude)."
        )
        for mname, b in c.kfac.items():
            w = params[b.weight]
            if w.dim() != 2:
                raise ValueError(
                    f"the curvature has a K-FAC block {mname!r} for parameter {b.weight!r}, whose shape "
                    f"{list(w.shape)} is not a 2-D weight. {refit}"
                )
            d_out, d_in = w.shape
            if b.bias is not None and list(params[b.bias].shape) != [d_out]:
                raise ValueError(
                    f"the K-FAC block {mname!r} pairs weight {b.weight!r} ({list(w.shape)}) with bias {b.bias!r} of "
                    f"shape {list(params[b.bias].shape)}, not [{d_out}]. {refit}"
                )
            d_a = d_in + (1 if b.bias is not None else 0)
            for f, t, d in (("A", b.A, d_a), ("G", b.G, d_out)):
                if list(t.shape) != [d, d]:
                    why = f"{d_in} inputs + 1 for the bias" if f == "A" and b.bias is not None else (
                        f"{d_in} inputs" if f == "A" else f"{d_out} outputs")
                    raise ValueError(
                        f"the K-FAC factor {f} of parameter {b.weight!r} (module {mname!r}) has shape {list(t.shape)}, "
                        f"but the model's parameter of shape {list(w.shape)} needs [{d}, {d}] ({why}): the curvature "
                        f"was estimated on another model. {refit}"
                    )
                if not finite(t):
                    raise ValueError(f"the K-FAC factor {f} of parameter {b.weight!r} (module {mname!r}) holds NaN or inf: {diverged}")
        for pname, d in c.diag.items():
            if list(d.shape) != list(params[pname].shape):
                raise ValueError(
                    f"the diagonal Fisher of parameter {pname!r} has shape {list(d.shape)}, but the parameter has shape "
                    f"{list(params[pname].shape)}: the curvature was estimated on another model. {refit}"
                )
            if not finite(d):
                raise ValueError(f"the diagonal Fisher of parameter {pname!r} holds NaN or inf: {diverged}")

    def slot_weights(self) -> list[float]:
        """c_s of every slot: γ^{age} s_t (separate) or C (merge)."""
        if self.config.accumulation == Accumulation.MERGE:
            return [s.scale for s in self.slots]
        T = len(self.slots)
        return [s.scale * self.config.decay ** (T - 1 - i) for i, s in enumerate(self.slots)]

    def numel(self) -> int:
        """Stored numbers: anchors plus curvature."""
        n = 0
        for s in self.slots:
            n += sum(t.numel() for t in s.anchor.values())
            if s.curvature is not None:
                n += s.curvature.numel()
        return n

    def nbytes(self, anchors: bool = True) -> int:
        """Bytes of the tensors held in memory: curvature, plus anchors unless ``anchors=False``."""
        return sum(t.numel() * t.element_size() for k, t in self.state_dict().items() if anchors or ".anchor." not in k)

    # ------------------------------------------------------------------ penalty
    def penalty_terms(self, device: torch.device | str = "cpu", scale: float = 1.0) -> QuadraticPenalty:
        """The damped terms of the penalty on ``device``, each weighted by ``scale``·c_s (cached).

        :meth:`penalty` passes ``scale`` = λ, so that λ rides in the factors instead of costing a
        pass over every gradient at each step; the cache keeps the terms of the latest λ per device.
        The cached terms are rebuilt when anything they are made from changes: λ, the damping,
        the decay, the accumulation, the compute dtype of compact factors, or a slot (replaced, or
        its scale set). Tensors edited in place are not noticed: clear ``_penalty_cache`` then.
        """
        device = torch.device(device)
        key = self._penalty_key(device, scale)
        if key in self._penalty_cache:
            return self._penalty_cache[key]
        for old in [k for k in self._penalty_cache if k[:2] == key[:2]]:
            del self._penalty_cache[old]
        delta = float(self.config.damping)
        if not (math.isfinite(delta) and delta >= 0):
            raise ValueError(f"prior.config.damping must be a finite float >= 0, got {self.config.damping!r}.")
        if not 0.0 < float(self.config.decay) <= 1.0:
            raise ValueError(f"prior.config.decay must be in (0, 1], got {self.config.decay!r}.")
        kfac_terms: list[KFACTerm] = []
        diag_terms: list[DiagTerm] = []
        for slot, c in zip(self.slots, self.slot_weights()):
            c = c * float(scale)
            anchor = {k: v.to(device) for k, v in slot.anchor.items()}
            if slot.curvature is None:
                for pname, a in anchor.items():
                    diag_terms.append(DiagTerm(pname, a, torch.tensor(c * (1.0 + delta), device=device)))
                continue
            for block in slot.curvature.kfac.values():
                w = anchor[block.weight]
                if block.bias is not None:
                    w = torch.cat([w, anchor[block.bias].unsqueeze(1)], dim=1)
                if is_compact(block):
                    Aop, Gop = compact_factor_ops(block.A.to(device), block.G.to(device), delta,
                                                  EIGVEC_DTYPES[StorageConfig.coerce(self.config.storage).compute_dtype])
                    kfac_terms.append(CompactKFACTerm(block.weight, block.bias, w, Aop, Gop.scaled(c)))
                    continue
                A, G = block.A.to(device), block.G.to(device)
                if delta > 0:
                    A, G = damp_factors(A, G, delta)
                kfac_terms.append(KFACTerm(block.weight, block.bias, w, A, G * c))
            for pname, d in slot.curvature.diag.items():
                diag_terms.append(DiagTerm(pname, anchor[pname], (d.to(device) + delta) * c))
        pen = QuadraticPenalty(kfac_terms, diag_terms)
        self._penalty_cache[key] = pen
        return pen

    def _penalty_key(self, device: torch.device, scale: float) -> tuple[Any, ...]:
        """Everything the prepared penalty terms depend on; device first (the cache keeps one entry per device)."""
        cfg = self.config
        storage = StorageConfig.coerce(cfg.storage)
        slots = tuple((id(s), id(s.anchor), id(s.curvature), float(s.scale)) for s in self.slots)
        return (device.type, device.index, float(scale), float(cfg.damping), float(cfg.decay), str(cfg.accumulation),
                str(storage.compute_dtype), id(self.slots), slots)

    def penalty(self, model: nn.Module | dict[str, Tensor], lam: float) -> Tensor:
        """½ λ Σ_s c_s (θ − θ*_s)ᵀ (F_s + D_s) (θ − θ*_s), differentiable w.r.t. the parameters.

        D_s is the damping: δ I on diagonal terms, δ I + √δ (π I ⊗ G + A ⊗ I / π) on a K-FAC
        block A ⊗ G (its factors damped as (A + π√δ I) ⊗ (G + √δ/π I); see the module docstring).
        The gradient λ c_s (F_s + D_s)(θ − θ*_s) is computed in closed form in the forward call.
        """
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"the penalty strength λ must be a finite float >= 0, got {lam!r}.")
        params = dict(model.named_parameters()) if isinstance(model, nn.Module) else model
        if not self.slots:
            return torch.zeros(())
        device = next(iter(params.values())).device if params else torch.device("cpu")
        return self.penalty_terms(device, lam)(params, 1.0)

    # -------------------------------------------------------------- compatibility
    def check_compatible(self, model: nn.Module) -> None:
        """Fail, naming the first mismatch, unless every prior parameter exists in ``model`` with its shape."""
        params = dict(model.named_parameters())
        for name, shape in self.param_shapes.items():
            if name not in params:
                found = _wrapped_name(name, params)
                if found is not None:
                    raise PriorFileError(_wrapped_message(name, found, "the prior covers"))
                if f"{_PEFT_PREFIX}{name}" in params:
                    raise PriorFileError(
                        f"the prior covers {name!r} of the full model, but this is a PEFT model (it holds the weight as "
                        f"{_PEFT_PREFIX + name!r}, frozen under the adapter): a prior on the full model's weights cannot "
                        "constrain an adapter's. Continue with the full model (no adapter), or start a new prior for "
                        "the adapter (train it without this prior, then consolidate)."
                    )
                raise PriorFileError(
                    f"the prior covers parameter {name!r}, which the model does not have: the prior was made for "
                    "another architecture. Load the model the prior was saved with, or start a new prior."
                )
            if list(params[name].shape) != list(shape):
                raise PriorFileError(
                    f"parameter {name!r} has shape {list(params[name].shape)} in the model but {list(shape)} in the "
                    "prior (another vocabulary or head size?). Load the matching model, or start a new prior."
                )

    # ------------------------------------------------------------ serialisation
    def state_dict(self, anchor_refs: dict[int, str] | None = None) -> dict[str, Tensor]:
        """Flat tensors: ``slots.{i}.anchor.{p}``, ``slots.{i}.kfac.{m}.A|G``, ``slots.{i}.diag.{p}``.

        A compact block stores ``slots.{i}.kfac.{m}.A.eigvecs|eigvals|residual`` (and G
        likewise). Anchors of the slots in ``anchor_refs`` are left out (stored by reference).
        """
        out: dict[str, Tensor] = {}
        for i, s in enumerate(self.slots):
            if not anchor_refs or i not in anchor_refs:
                for k, v in s.anchor.items():
                    out[f"slots.{i}.anchor.{k}"] = v
            if s.curvature is not None:
                for m, b in s.curvature.kfac.items():
                    if is_compact(b):
                        for f, fac in (("A", b.A), ("G", b.G)):
                            for part, t in fac.tensors().items():
                                out[f"slots.{i}.kfac.{m}.{f}.{part}"] = t
                    else:
                        out[f"slots.{i}.kfac.{m}.A"] = b.A
                        out[f"slots.{i}.kfac.{m}.G"] = b.G
                for k, v in s.curvature.diag.items():
                    out[f"slots.{i}.diag.{k}"] = v
        return out

    def config_dict(self, anchor_refs: dict[int, str] | None = None) -> dict[str, Any]:
        """The JSON config of a saved prior (without the file list)."""
        slots = []
        compact = False
        for i, s in enumerate(self.slots):
            entry: dict[str, Any] = {"scale": s.scale, "tasks": s.tasks, "anchor": sorted(s.anchor)}
            if anchor_refs and i in anchor_refs:
                entry["anchor_ref"] = {"sha256": anchor_refs[i]}
                compact = True
            if s.curvature is not None:
                entry["n_examples"] = s.curvature.n_examples
                kfac: dict[str, Any] = {}
                for m, b in s.curvature.kfac.items():
                    spec: dict[str, Any] = {"weight": b.weight, "bias": b.bias}
                    if is_compact(b):
                        spec.update(format="compact", rank_A=b.A.rank, rank_G=b.G.rank)
                        compact = True
                    kfac[m] = spec
                entry["kfac"] = kfac
                entry["diag"] = sorted(s.curvature.diag)
                entry["diag_fallbacks"] = s.curvature.diag_fallbacks
            slots.append(entry)
        return {
            # full priors keep version 1, so that older hf_kfac releases still read them
            "format_version": _COMPACT_FORMAT_VERSION if compact else 1,
            "hf_kfac_version": __version__,
            "prior": self.config.to_dict(),
            "fisher": self.fisher.to_dict(),
            "tasks": [asdict(t) for t in self.tasks],
            "slots": slots,
            "params": self.param_shapes,
        }

    def anchor_references(self, model: nn.Module | None) -> dict[int, str]:
        """Slots whose anchor may be stored as a reference to ``model``'s weights: {slot: sha256}.

        Only for ``storage.format="compact"`` with ``anchor="auto"``, and only where every
        anchor tensor equals the model's parameter bit for bit (in float32).
        """
        st = self.config.storage
        if model is None or not st.compact or st.anchor != "auto":
            return {}
        params = dict(model.named_parameters())
        refs: dict[int, str] = {}
        for i, s in enumerate(self.slots):
            if not s.anchor or any(k not in params for k in s.anchor):
                continue
            same = all(
                tuple(params[k].shape) == tuple(v.shape)
                and torch.equal(params[k].detach().to(device="cpu", dtype=torch.float32), v)
                for k, v in s.anchor.items()
            )
            if same:
                refs[i] = weights_digest({k: params[k] for k in s.anchor})
        return refs

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        *,
        model: nn.Module | None = None,
    ) -> Path:
        """Save as safetensors (sharded past ``max_shard_size``) plus ``prior_config.json``, atomically.

        With a compact storage config (``anchor="auto"``) and ``model`` given, an anchor equal to
        the model's current weights is stored as a reference (a SHA-256 of those weights) rather
        than a copy; save the model beside the prior and load both together
        (``Prior.from_pretrained(folder, model=model)``).

        The save replaces ``folder`` as a whole, so it raises :class:`PriorFileError` (and writes
        nothing) when ``folder`` holds anything but a prior's own files: save beside a model
        into its subfolder, ``<model folder>/fisher``. A save killed at any point leaves the old
        or the new prior, which loading restores (see :mod:`hf_kfac.serialization`).

        The state is first checked as :meth:`load_folder` would check the files (config entries,
        tensor shapes, dtypes, NaN/inf): a prior that would not load raises
        :class:`PriorFileError` and ``folder`` is left as it was.
        """
        refs = self.anchor_references(model)
        cfg = self._check_loadable(
            refs,
            f"refusing to save the prior to {str(folder)!r} (nothing was written; what is there is unchanged)",
            " Was the prior (its tasks, slots, param_shapes or config) changed by hand? Prior.add_task checks what it adds.",
        )
        return save_tensor_folder(folder, self.state_dict(refs), cfg, max_shard_size)

    def _check_loadable(self, refs: dict[int, str], refused: str, hint: str = "") -> dict[str, Any]:
        """The config the prior saves as (through JSON, as written), after the loader's checks on it and
        on the tensors; raises :class:`PriorFileError` starting with ``refused`` if the loader would refuse it.

        Slots in ``refs`` (anchors stored as references) have their in-memory anchors checked instead.
        """
        try:
            cfg = json.loads(json.dumps(self.config_dict(refs), sort_keys=True))
        except (TypeError, ValueError) as e:
            raise PriorFileError(
                f"{refused}: the prior in memory would not load back: its config cannot be written as JSON ({e}). "
                "Task metadata must be JSON-serialisable."
            ) from None
        tensors = self.state_dict(refs)

        def anchor_ref(i: int, sc: dict[str, Any], shapes: dict[str, list[int]]) -> dict[str, Tensor]:
            held = {f"slots.{i}.anchor.{p}": t for p, t in self.slots[i].anchor.items()}
            check_finite(held, {torch.float32})
            seen: set[str] = set()
            return {p: _take(held, f"slots.{i}.anchor.{p}", shapes.get(p), seen) for p in sc["anchor"]}

        try:
            Prior._from_config(cfg, _ConfigCheck(None), lambda: tensors, anchor_ref, where="the prior")
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            what = str(e) if isinstance(e, PriorFileError) else f"{type(e).__name__}: {e}"
            raise PriorFileError(
                f"{refused}: the prior in memory would not load back: {what}{hint}"
            ) from e
        return cfg

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        model: nn.Module | None = None,
    ) -> "Prior":
        """Load a prior from a local folder, or from a Hub repo.

        A local folder is tried first (with ``revision`` given, a local folder named like the repo
        is refused rather than read in its place); otherwise ``path_or_repo`` is a Hub repo id,
        read through ``huggingface_hub``: ``prior_config.json`` first, then only the safetensors
        files it lists, so caching, revisions, tokens and ``HF_HUB_OFFLINE`` behave as usual and
        ``force_download=True`` replaces a damaged cache. The prior is looked for in ``subfolder``
        alone when one is given (``""``: the root; a local folder that is itself a prior folder is
        read as is), else in ``fisher/`` or at the root, whichever holds one; both is an error.
        When ``model`` is given, the prior is checked against it. A local prior folder that an
        interrupted save left missing is restored first, with a warning.
        """
        from .hub import resolve_prior_folder

        folder = _restore_local(path_or_repo, subfolder)
        if folder is None:
            folder = resolve_prior_folder(
                path_or_repo,
                subfolder=subfolder,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                force_download=force_download,
            )
        prior = cls.load_folder(folder, model=model)
        if model is not None:
            prior.check_compatible(model)
        return prior

    @classmethod
    def load_folder(cls, folder: str | os.PathLike, *, model: nn.Module | None = None) -> "Prior":
        """Load and validate a local prior folder.

        ``model`` is needed only for a compact prior that stores its anchor as a reference to
        the weights saved beside it; those weights are checked against the recorded SHA-256.
        A missing ``folder`` that an interrupted save left beside its leftovers is restored
        first, with a warning. Every missing or malformed entry of ``prior_config.json`` is a
        :class:`PriorFileError` naming the file and the entry.
        """
        folder = restore_interrupted_save(Path(folder))
        cfg = read_config(folder)
        return cls._from_config(
            cfg,
            _ConfigCheck(folder / PRIOR_CONFIG_NAME),
            lambda: load_tensor_folder(folder, cfg),
            lambda i, sc, shapes: _resolve_anchor_ref(folder, i, sc, shapes, model),
            where=f"the prior in {str(folder)!r}",
        )

    @classmethod
    def _from_config(
        cls,
        cfg: dict[str, Any],
        check: "_ConfigCheck",
        load_tensors: Callable[[], dict[str, Tensor]],
        anchor_ref: Callable[[int, dict[str, Any], dict[str, list[int]]], dict[str, Tensor]],
        where: str,
    ) -> "Prior":
        """A prior built from its parsed config and tensors, with every check of :meth:`load_folder`.

        ``load_tensors`` is called once the config has passed its checks; ``anchor_ref(i, slot_config,
        param_shapes)`` gives the anchor of a slot stored as a reference. ``save_pretrained`` and
        ``add_task`` run the same checks on the state they are about to write or keep.
        """
        version = check.field(cfg, "format_version", "int")
        if version > FORMAT_VERSION:
            raise PriorFileError(
                f"{where} has format version {version}, newer than this hf_kfac "
                f"({__version__}) reads (version {FORMAT_VERSION}). Upgrade hf_kfac: pip install -U hf-kfac."
            )
        if version < 1:
            raise check.error("format_version", f"is {version}; saved priors have version 1 to {FORMAT_VERSION}")
        prior = cls(
            check.build(PriorConfig, check.field(cfg, "prior", "dict"), "prior"),
            check.build(FisherConfig, check.field(cfg, "fisher", "dict"), "fisher"),
        )
        prior._fisher_declared = False  # the saved options are the last task's, not the next one's
        for i, t in enumerate(check.field(cfg, "tasks", "list")):
            check.item(t, f"tasks[{i}]", "dict")
            check.field(t, "name", "str", f"tasks[{i}]")
            check.field(t, "n_examples", "count", f"tasks[{i}]")
            prior.tasks.append(check.build(TaskRecord, t, f"tasks[{i}]"))
        params = check.field(cfg, "params", "dict")
        for k, v in params.items():
            check.item(v, f"params[{k!r}]", "shape")
        prior.param_shapes = {k: list(v) for k, v in params.items()}
        slots_cfg = [check.slot(sc, i, prior) for i, sc in enumerate(check.field(cfg, "slots", "list"))]
        tensors = load_tensors()
        # bfloat16 is allowed for the eigenvectors of compact factors only
        check_finite(tensors, {k: ({torch.float32, torch.bfloat16} if k.endswith(".eigvecs") else {torch.float32}) for k in tensors})
        expected: set[str] = set()
        for i, sc in enumerate(slots_cfg):
            if "anchor_ref" in sc:
                anchor = anchor_ref(i, sc, prior.param_shapes)
            else:
                anchor = {p: _take(tensors, f"slots.{i}.anchor.{p}", prior.param_shapes.get(p), expected) for p in sc["anchor"]}
            curv = None
            if "kfac" in sc:
                curv = Curvature(n_examples=int(sc.get("n_examples") or 0), diag_fallbacks=dict(sc.get("diag_fallbacks") or {}))
                for m, spec in sc["kfac"].items():
                    wshape = prior.param_shapes.get(spec["weight"])
                    if wshape is None or len(wshape) != 2:
                        raise PriorFileError(f"the prior config lists K-FAC layer {m!r} without a 2-D weight shape.")
                    if spec["bias"] is not None and prior.param_shapes.get(spec["bias"]) != [wshape[0]]:
                        raise check.error(
                            f"slots[{i}].kfac[{m!r}].bias",
                            f"names {spec['bias']!r}, whose shape {prior.param_shapes.get(spec['bias'])} in `params` is not "
                            f"[{wshape[0]}], the output size of the weight {spec['weight']!r}",
                        )
                    d_in = wshape[1] + (1 if spec["bias"] is not None else 0)
                    if spec.get("format", "full") == "compact":
                        facs = []
                        for f, d in (("A", d_in), ("G", wshape[0])):
                            k = spec.get(f"rank_{f}")
                            if not isinstance(k, int) or not 1 <= k <= d:
                                raise PriorFileError(f"the prior config gives compact layer {m!r} an invalid rank_{f} {k!r}.")
                            key = f"slots.{i}.kfac.{m}.{f}"
                            fac = CompactFactor(
                                _take(tensors, f"{key}.eigvecs", [d, k], expected),
                                _take(tensors, f"{key}.eigvals", [k], expected),
                                _take(tensors, f"{key}.residual", [d], expected),
                            )
                            if (fac.eigvals < 0).any() or (fac.residual < 0).any():
                                raise PriorFileError(f"tensor {key!r} of the prior has negative eigenvalues or residual; the file is corrupted.")
                            facs.append(fac)
                        curv.kfac[m] = CompactKFACBlock(facs[0], facs[1], spec["weight"], spec["bias"])
                        continue
                    A = _take(tensors, f"slots.{i}.kfac.{m}.A", [d_in, d_in], expected)
                    G = _take(tensors, f"slots.{i}.kfac.{m}.G", [wshape[0], wshape[0]], expected)
                    curv.kfac[m] = KFACBlock(A, G, spec["weight"], spec["bias"])
                for p in sc["diag"]:
                    curv.diag[p] = _take(tensors, f"slots.{i}.diag.{p}", prior.param_shapes.get(p), expected)
            prior.slots.append(_Slot(anchor, curv, float(sc["scale"]), list(sc["tasks"])))
        extra = sorted(set(tensors) - expected)
        if extra:
            raise PriorFileError(f"tensor {extra[0]!r} in the prior files is not described by {PRIOR_CONFIG_NAME}.")
        return prior


def _restore_local(path_or_repo: str | os.PathLike, subfolder: str | None) -> Path | None:
    """A local prior folder that an interrupted save left missing, restored; ``None`` when there is none.

    ``path_or_repo`` is the prior folder, or a folder whose ``subfolder`` (``fisher`` by default) is.
    """
    local = Path(path_or_repo).expanduser()
    from .hub import normalise_subfolder

    sub = normalise_subfolder(subfolder)
    targets = []
    if not os.path.lexists(local):
        targets.append(local)
    elif local.is_dir() and not (local / PRIOR_CONFIG_NAME).is_file() and sub and not os.path.lexists(local / sub):
        targets.append(local / sub)
    for target in targets:
        folder = restore_interrupted_save(target)
        if folder.is_dir():
            return folder
    return None


_CONFIG_FIX = "Restore the prior folder from a backup, or re-run consolidation and save the prior again."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _ConfigCheck:
    """Checks of the entries of ``prior_config.json``: each failure is a :class:`PriorFileError` that
    names the file, the entry (``slots[0].kfac['0'].weight``) and the fix."""

    _KINDS: dict[str, tuple[str, Any]] = {
        "int": ("an integer", _is_int),
        "count": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
        "weight": ("a finite number > 0", lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and v > 0),
        "str": ("a string", lambda v: isinstance(v, str)),
        "str|null": ("a string or null", lambda v: v is None or isinstance(v, str)),
        "list": ("a JSON list", lambda v: isinstance(v, list)),
        "dict": ("a JSON object", lambda v: isinstance(v, dict)),
        "names": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "indices": ("a list of integers", lambda v: isinstance(v, list) and all(_is_int(x) for x in v)),
        "shape": ("a list of integers >= 0", lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)),
    }

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: the config of a prior in memory, about to be saved (the caller says so)

    def error(self, field: str, problem: str) -> PriorFileError:
        if self.path is None:
            return PriorFileError(f"its config entry `{field}` {problem}.")
        return PriorFileError(f"{str(self.path)!r} is corrupted: `{field}` {problem}. {_CONFIG_FIX}")

    def item(self, value: Any, field: str, kind: str) -> Any:
        desc, ok = self._KINDS[kind]
        if not ok(value):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise self.error(field, f"should be {desc}, not {type(value).__name__} {shown}")
        return value

    def field(self, obj: dict[str, Any], key: str, kind: str, where: str = "", required: bool = True) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in obj:
            if required:
                raise self.error(name, "is missing")
            return None
        return self.item(obj[key], name, kind)

    def build(self, cls: Any, kwargs: dict[str, Any], field: str) -> Any:
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, KeyError) as e:
            raise self.error(field, f"is invalid ({e})") from e

    def slot(self, sc: Any, i: int, prior: "Prior") -> dict[str, Any]:
        """Check slot ``i`` of the config: types, and the names it uses against ``params`` and ``tasks``."""
        where = f"slots[{i}]"
        self.item(sc, where, "dict")
        self.field(sc, "scale", "weight", where)
        tasks = self.field(sc, "tasks", "indices", where)
        bad = [t for t in tasks if not 0 <= t < len(prior.tasks)]
        if bad:
            raise self.error(f"{where}.tasks", f"refers to task {bad[0]}, but `tasks` lists {len(prior.tasks)} task(s)")
        anchor = self.field(sc, "anchor", "names", where)
        self.field(sc, "anchor_ref", "dict", where, required=False)
        for p in anchor:
            if p not in prior.param_shapes:
                raise self.error(f"{where}.anchor", f"names parameter {p!r}, which `params` does not list")
        if "kfac" not in sc:
            if prior.config.shape != Shape.IDENTITY or "diag" in sc:
                raise self.error(f"{where}.kfac", f"is missing (a {prior.config.shape!s} prior keeps its curvature there)")
            return sc
        self.field(sc, "n_examples", "count", where, required=False)
        self.field(sc, "diag_fallbacks", "dict", where, required=False)
        covered = set()
        for m, spec in self.field(sc, "kfac", "dict", where).items():
            w = f"{where}.kfac[{m!r}]"
            self.item(spec, w, "dict")
            names = [self.field(spec, "weight", "str", w), self.field(spec, "bias", "str|null", w)]
            fmt = self.field(spec, "format", "str", w, required=False)
            if fmt not in (None, "full", "compact"):
                raise self.error(f"{w}.format", f"is {fmt!r}; a K-FAC block is stored as 'full' or 'compact'")
            for key, p in zip(("weight", "bias"), names):
                if p is not None and p not in anchor:
                    raise self.error(f"{w}.{key}", f"names parameter {p!r}, which the slot's `anchor` does not list")
            covered.update(p for p in names if p is not None)
        for p in self.field(sc, "diag", "names", where):
            if p not in anchor:
                raise self.error(f"{where}.diag", f"names parameter {p!r}, which the slot's `anchor` does not list")
            if p in covered:
                raise self.error(f"{where}.diag", f"names parameter {p!r}, which a K-FAC block of the slot already covers")
        return sc


def _resolve_anchor_ref(
    folder: Path, i: int, sc: dict[str, Any], shapes: dict[str, list[int]], model: nn.Module | None
) -> dict[str, Tensor]:
    """The anchor of slot ``i`` taken from ``model``, after checking the recorded SHA-256."""
    ref = sc["anchor_ref"]
    digest = ref.get("sha256") if isinstance(ref, dict) else None
    if not isinstance(digest, str):
        raise PriorFileError(f"{str(folder / PRIOR_CONFIG_NAME)!r} is corrupted: slot {i} has an anchor_ref without sha256.")
    if model is None:
        raise PriorFileError(
            f"the prior in {str(folder)!r} stores its anchor (slot {i}) as a reference to the model weights it was "
            "saved beside, not as a copy. Load it together with that model: Prior.from_pretrained(folder, model=model)."
        )
    params = dict(model.named_parameters())
    missing = [p for p in sc["anchor"] if p not in params]
    if missing:
        found = _wrapped_name(missing[0], params)
        if found is not None:
            raise PriorFileError(_wrapped_message(missing[0], found, "the prior's anchor covers"))
        raise PriorFileError(f"the prior's anchor covers parameter {missing[0]!r}, which the model does not have.")
    chosen = {p: params[p] for p in sc["anchor"]}
    for p, t in chosen.items():
        if shapes.get(p) is not None and list(t.shape) != list(shapes[p]):
            raise PriorFileError(f"parameter {p!r} has shape {list(t.shape)} in the model but {shapes[p]} in the prior.")
    if weights_digest(chosen) != digest:
        other = sorted({str(t.dtype).replace("torch.", "") for t in chosen.values() if t.dtype != torch.float32})
        if other:
            raise PriorFileError(
                f"the prior in {str(folder)!r} stores its anchor (slot {i}) as a reference to the float32 weights it "
                f"was saved beside (SHA-256 {digest[:12]}…), but the model given holds {other[0]} weights, which "
                "cannot match them. Load the model in float32 to read the prior (from_pretrained(..., "
                "dtype=torch.float32)), then cast it (model.to(torch.bfloat16)): the prior keeps its float32 anchor."
            )
        raise PriorFileError(
            f"the prior in {str(folder)!r} anchors slot {i} at the model weights it was saved beside (SHA-256 "
            f"{digest[:12]}…), but the model given has other weights. Load the model from the same folder (or "
            "checkpoint) as the prior; a prior saved mid-task stores its anchor in full."
        )
    return {p: t.detach().to(device="cpu", dtype=torch.float32).clone() for p, t in chosen.items()}


def _take(tensors: dict[str, Tensor], key: str, shape: Iterable[int] | None, seen: set[str]) -> Tensor:
    if key not in tensors:
        raise PriorFileError(f"tensor {key!r} is described by {PRIOR_CONFIG_NAME} but missing from the prior files.")
    t = tensors[key]
    if shape is None or list(t.shape) != list(shape):
        raise PriorFileError(f"tensor {key!r} has shape {list(t.shape)}, but the prior config implies {shape}.")
    seen.add(key)
    return t


def compact_factor_ops(
    A: CompactFactor, G: CompactFactor, delta: float, dtype: torch.dtype = torch.float32
) -> tuple[FactorOp, FactorOp]:
    """Penalty operators of compact factors, damped like :func:`damp_factors` (δ goes into the residual).

    ``dtype`` is the dtype of the operators' matrix products (see :class:`~hf_kfac.penalty.FactorOp`).
    """
    ra, rg = A.residual, G.residual
    if delta > 0:
        ta, tg = A.trace() / A.dim, G.trace() / G.dim
        pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
        r = math.sqrt(delta)
        ra, rg = ra + pi * r, rg + r / pi
    return _factor_op(A, ra, dtype), _factor_op(G, rg, dtype)


def _factor_op(F: CompactFactor, residual: Tensor, dtype: torch.dtype) -> FactorOp:
    # U diag(w) Uᵀ x costs 4·k flops per entry of x, a dense factor 2·d: keep the cheaper
    if 2 * F.rank > F.dim:
        return FactorOp(dense=CompactFactor(F.eigvecs, F.eigvals, residual).dense().to(dtype))
    # U is kept column-major (Uᵀ contiguous). Both products of each side (x U, p Uᵀ and Uᵀ x, U p)
    # then run about twice as fast on CPU in bfloat16, and the MiniLM compact penalty in float32
    # about a third faster, than with a row-major U (one thread, this project's CPU).
    U = F.eigvecs.to(dtype).T.contiguous().T
    return FactorOp(U=U, w=F.eigvals.float(), r=residual.float())


def damp_factors(A: Tensor, G: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """(A + π√δ I, G + √δ/π I) with π² = (tr A / d_A) / (tr G / d_G) (π = 1 if a trace is 0).

    Their product is A ⊗ G + δ I + √δ (π I ⊗ G + A ⊗ I / π): the damping adds more than δ I,
    e.g. (δ + 2√(δ a g)) I for A = a I, G = g I.
    """
    ta, tg = float(torch.trace(A)) / A.shape[0], float(torch.trace(G)) / G.shape[0]
    pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
    r = math.sqrt(delta)
    eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return A + (pi * r) * eye_a, G + (r / pi) * eye_g
