"""`ContinualTrainer`: a `transformers.Trainer` that adds the prior's penalty and consolidates tasks.

Objective per optimizer step, whatever the gradient accumulation (K micro-batches) and the
number of processes W:

    L_task(θ) + λ P(θ),   P(θ) = ½ Σ_s c_s (θ − θ*_s)ᵀ (F_s + D_s) (θ − θ*_s),

with D_s the damping's addition: δI for diagonal terms, δI + √δ(π I⊗G + A⊗I/π) for a K-FAC
block A⊗G (see :mod:`hf_kfac.prior`).

How the penalty is scaled (see ``ContinualTrainer._penalty_coefficient``): the Trainer back-propagates
each micro-batch's ``compute_loss`` value, divided by K unless the loss is "scaled for GA" (the
model normalised it by ``num_items_in_batch``, the token count of all K micro-batches, and of all
W processes under ``average_tokens_across_devices``, where the Trainer then multiplies it by W);
DDP averages the summed gradients over the W processes. The penalty is added to the last
micro-batch of each step only (the one whose backward all-reduces), with coefficient K when the
Trainer will divide by K and 1 otherwise. Every process adds the same λ∇P (the weights are
replicated), so the average over processes is λ∇P: exactly once per optimizer step.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, get_last_checkpoint, has_length
from transformers.utils import logging as hf_logging

from .curvature import estimate_fisher
from .curvature.config import FisherConfig
from .curvature.predictive import PredictiveFn
from .distributed import all_reduce_sum_
from .enums import PenaltyType, Shape
from .modes import evaluating
from .prior import Prior, TaskRecord
from .serialization import PRIOR_CONFIG_NAME, restore_interrupted_save
from .trainer_config import PENALTY_SHAPES, ContinualConfig

__all__ = ["ContinualTrainer"]

logger = hf_logging.get_logger(__name__)

_SHAPE_TO_PENALTY = {shape: pen for pen, shape in PENALTY_SHAPES.items()}


class _ShardedIterable(IterableDataset):
    """Examples ``rank, rank + W, ...`` of the first ``limit`` examples of an iterable dataset."""

    def __init__(self, dataset: Any, rank: int, world: int, limit: int | None) -> None:
        self.dataset, self.rank, self.world, self.limit = dataset, rank, world, limit

    def __iter__(self) -> Iterator[Any]:
        it: Iterator[Any] = iter(self.dataset)
        if self.limit is not None:
            it = itertools.islice(it, self.limit)
        return itertools.islice(it, self.rank, None, self.world)


class _Unsized:
    """An iterable over a loader that hides its ``__len__`` (a DataLoader over an iterable dataset raises in it)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)


def _loss_of(outputs: Any) -> Tensor | None:
    """The ``loss`` of a model output (ModelOutput, dict or tuple), as the Trainer reads it."""
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    return getattr(outputs, "loss", None)


def _last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` that holds ``trainer_state.json`` (else the Trainer's pick)."""
    last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
    if last is None:
        return None
    steps = []
    for name in os.listdir(folder):
        m = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if m and os.path.isdir(os.path.join(folder, name)):
            steps.append((int(m.group(1)), name))
    for _, name in sorted(steps, reverse=True):
        path = os.path.join(folder, name)
        if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            if os.path.basename(path) != os.path.basename(last):
                logger.warning("Skipping the incomplete checkpoint %s; resuming from %s.", last, path)
            return path
    return last


def _accepts_kwarg(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (the prior's optional ``model=`` for compact storage)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False


def _same_prior(a: Path, b: Path) -> bool:
    """Whether two prior folders hold the same prior (their configs, which list file checksums, are equal)."""
    try:
        with open(a / PRIOR_CONFIG_NAME, encoding="utf-8") as fa, open(b / PRIOR_CONFIG_NAME, encoding="utf-8") as fb:
            return json.load(fa) == json.load(fb)
    except (OSError, ValueError):
        return False


class ContinualTrainer(Trainer):
    """A `transformers.Trainer` for continual learning with an EWC / K-FAC Laplace prior.

    Usage::

        args = ContinualConfig(output_dir="el-disease", penalty="kfac", penalty_lambda=1e-3)
        trainer = ContinualTrainer(model=model, args=args, train_dataset=task_a)
        trainer.train()
        trainer.consolidate(task_name="diseases")  # Fisher of task A folded into the prior
        trainer.save_model()                       # model + prior in el-disease/fisher/
        # later, with new data only:
        model = AutoModelForTokenClassification.from_pretrained("el-disease")
        trainer = ContinualTrainer(model=model, args=args_b, train_dataset=task_b, prior="el-disease")
        trainer.train(); trainer.consolidate(task_name="drugs")

    Training minimises L_task(θ) + λ·P(θ) with P(θ) = ½ Σ_s c_s (θ − θ*_s)ᵀ(F_s + D_s)(θ − θ*_s)
    (D_s: the damping, see :mod:`hf_kfac.prior`). The penalty contributes exactly λ∇P to the gradient of each
    optimizer step, independent of ``gradient_accumulation_steps``, the number of processes and
    ``average_tokens_across_devices`` (see the module docstring). ``loss`` is logged as the total;
    ``loss_task`` and ``loss_penalty`` (λP) are logged beside it, averaged over the logging window.

    Args:
        model, args, **kwargs: As for `transformers.Trainer`; ``args`` must be a :class:`ContinualConfig`.
        prior: The prior to continue: a local folder (the model folder, which holds it in
            ``args.prior_subfolder``, or that subfolder itself), a Hub repo id, or a :class:`Prior`
            (updated in place by :meth:`consolidate`). ``None`` starts without one; the first
            :meth:`consolidate` creates it. It is checked against the model at once: a prior
            made for another architecture or vocabulary fails here, naming the parameter.
        prior_revision: Hub revision (branch, tag or commit) of a prior given as a repo id; the
            token is ``args.hub_token``.
        predictive_fn: The one hook for models that are not transformers models returning
            ``logits`` and taking ``labels``: a function ``(model, batch) -> PredictiveOutput``
            (:class:`hf_kfac.PredictiveOutput`: ``logits`` shaped ``(N, *positions, C)``, optional
            ``labels`` with -100 ignored, ``likelihood`` 'categorical' or 'gaussian', optional
            ``mask``). It is only used by :meth:`consolidate` to estimate the Fisher; training
            uses the model's own loss as usual. The default handles sequence and token
            classification, regression, masked LM and causal LM (shifted) out of the box.

    Support: single-process and DDP (``torchrun`` / ``accelerate launch``, any number of
    processes, CPU or GPU) are supported, with gradient accumulation and bf16/fp16 mixed
    precision (the prior is always kept in float32). DeepSpeed ZeRO-1/2 might work but is
    untested (a warning says so). DeepSpeed ZeRO-3, FSDP, tensor, context and sequence
    parallelism are refused at init for any penalty other than ``none`` (and by
    :meth:`consolidate` always): parameters or sequences are sharded there, so the
    per-parameter penalty and the Fisher hooks would see partial tensors.

    Checkpoints: every ``checkpoint-N/`` and every ``save_model`` folder holds the prior in
    ``args.prior_subfolder`` (written atomically, before the model, and before any Hub push of
    that folder). ``train(resume_from_checkpoint=...)`` restores the prior from the checkpoint,
    so a fresh trainer need not be given it.

    Models that accept ``**kwargs`` make the Trainer treat their loss as normalised by
    ``num_items_in_batch``; many (e.g. BERT heads in transformers 5.x) ignore it and return a
    per-batch mean, which the Trainer would then neither divide by the accumulation steps nor
    undo the multiplication by the number of processes. On the first training step the trainer
    evaluates the loss twice in eval mode with two values of ``num_items_in_batch``; if the loss
    does not change it treats it as a per-batch mean (``model_accepts_loss_kwargs = False``), so
    that the task gradient, too, does not depend on accumulation or processes. Set the class
    attribute ``check_loss_normalisation = False`` to keep the Trainer's default.
    """

    args: ContinualConfig
    check_loss_normalisation: bool = True

    def __init__(
        self,
        model: nn.Module | None = None,
        args: ContinualConfig | None = None,
        *trainer_args: Any,
        prior: str | os.PathLike | Prior | None = None,
        prior_revision: str | None = None,
        predictive_fn: PredictiveFn | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = ContinualConfig(output_dir="tmp_trainer")
        if not isinstance(args, ContinualConfig):
            raise TypeError(
                f"ContinualTrainer needs args=ContinualConfig(...), got {type(args).__name__}. ContinualConfig "
                "takes every TrainingArguments option plus penalty, penalty_lambda, fisher_type, ..."
            )
        if predictive_fn is not None and not callable(predictive_fn):
            raise TypeError(f"predictive_fn must be a function (model, batch) -> PredictiveOutput, got {predictive_fn!r}.")
        super().__init__(model, args, *trainer_args, **kwargs)
        self.predictive_fn: PredictiveFn | None = predictive_fn
        self.prior: Prior | None = None
        self._penalty_sum: Tensor | None = None
        self._in_training_step = False
        # (parameters, λF(θ − θ*) by name) of the current micro-batch, added to p.grad after its backward
        self._pending_penalty_grads: tuple[dict[str, nn.Parameter], dict[str, Tensor]] | None = None
        self._penalty_steps = 0
        self._loss_check_done = False
        self._loss_check_tries = 0
        self._saving_checkpoint = False
        reason = self._unsupported_parallelism()
        if reason is not None and self.args.penalty != PenaltyType.NONE:
            raise ValueError(
                f"{reason} is not supported with penalty={str(self.args.penalty)!r}: parameters (or sequences) are "
                "sharded across processes, so the per-parameter penalty and the Fisher hooks would see partial "
                "tensors. Use DDP (torchrun / accelerate launch without DeepSpeed ZeRO-3 or FSDP), or penalty='none'."
            )
        if prior is not None:
            self.prior = self._adopt_prior(self._load_prior(prior, prior_revision), source=str(prior))

    # ------------------------------------------------------------ parallelism
    def _zero_stage(self) -> int | None:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", None)
        if stage is None and plugin is not None:
            cfg = getattr(plugin, "deepspeed_config", None) or {}
            stage = cfg.get("zero_optimization", {}).get("stage")
        return int(stage) if stage is not None else None

    def _unsupported_parallelism(self) -> str | None:
        """The name of a sharded-parameter setup this trainer refuses, or ``None``."""
        dist_type = str(getattr(self.accelerator, "distributed_type", ""))
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_fsdp_xla_enabled", False) or dist_type.endswith("FSDP"):
            return "FSDP"
        if getattr(self, "is_deepspeed_enabled", False) or dist_type.endswith("DEEPSPEED"):
            stage = self._zero_stage()
            if stage is None or stage >= 3:
                return f"DeepSpeed ZeRO-{stage if stage is not None else '?'}"
            logger.warning(
                "ContinualTrainer under DeepSpeed ZeRO-%d is untested: DDP and single-process are the supported setups.",
                stage,
            )
        if dist_type.endswith("MEGATRON_LM"):
            return "Megatron-LM"
        if getattr(self, "is_distributed_loading_by_transformers", False):
            return "A model sharded at load time (tensor parallelism)"
        for getter, name in (("get_tp_size", "Tensor parallelism"), ("get_cp_size", "Context parallelism"),
                             ("get_sp_size", "Sequence parallelism")):
            try:
                if int(getattr(self, getter)()) > 1:
                    return name
            except (AttributeError, TypeError):  # pragma: no cover - older transformers
                pass
        return None

    # ------------------------------------------------------------------ prior
    def _load_prior(self, prior: str | os.PathLike | Prior, revision: str | None) -> Prior:
        if isinstance(prior, Prior):
            return prior
        if isinstance(prior, (str, os.PathLike)):
            # model=: a compact prior may store its anchor as a reference to the weights saved beside it
            return Prior.from_pretrained(
                prior, subfolder=self.args.prior_subfolder, revision=revision, token=self.args.hub_token,
                model=self.model,
            )
        raise TypeError(
            f"prior must be a folder, a Hub repo id or a hf_kfac.Prior, got {type(prior).__name__}."
        )

    def _adopt_prior(self, prior: Prior, source: str) -> Prior:
        """Check ``prior`` against the model and the config; apply the config's damping and decay overrides."""
        if self.model is not None:
            prior.check_compatible(self.model)
        args = self.args
        if args.penalty == PenaltyType.NONE:
            logger.warning(
                "A prior (%d task(s)) was given but penalty='none': it is not applied, only saved with the model.",
                prior.num_tasks,
            )
            return prior
        want = args.prior_shape
        if prior.config.shape != want:
            have = _SHAPE_TO_PENALTY.get(Shape(prior.config.shape), prior.config.shape)
            raise ValueError(
                f"the prior from {source} has shape {str(prior.config.shape)!r} (penalty={str(have)!r}), but "
                f"penalty={str(args.penalty)!r} needs shape {str(want)!r}. Set penalty={str(have)!r} to continue "
                "this prior, or start a new prior (prior=None)."
            )
        for name, value, stored in (
            ("prior_accumulation", args.prior_accumulation, prior.config.accumulation),
            ("prior_task_weighting", args.prior_task_weighting, prior.config.task_weighting),
        ):
            if value is not None and value != stored:
                raise ValueError(
                    f"{name}={str(value)!r}, but the prior from {source} was built with {str(stored)!r}; its stored "
                    f"tasks cannot be re-weighted. Leave {name}=None to keep {str(stored)!r}, or start a new prior."
                )
        want_storage = args.prior_storage_config
        if want_storage is not None and want_storage.to_dict() != prior.config.storage.to_dict():
            raise ValueError(
                f"prior_storage={args.prior_storage!r}, but the prior from {source} stores its factors as "
                f"{prior.config.storage.to_dict()}; a prior keeps one storage format for all its tasks. Leave "
                "prior_storage=None to keep it, or start a new prior."
            )
        changed = False
        if args.prior_damping is not None and args.prior_damping != prior.config.damping:
            logger.info("Prior damping %g replaced by prior_damping=%g.", prior.config.damping, args.prior_damping)
            prior.config.damping = args.prior_damping
            changed = True
        if args.prior_decay is not None and args.prior_decay != prior.config.decay:
            logger.info("Prior decay %g replaced by prior_decay=%g.", prior.config.decay, args.prior_decay)
            prior.config.decay = args.prior_decay
            changed = True
        if changed:
            self._reset_penalty_cache(prior)
        return prior

    @staticmethod
    def _reset_penalty_cache(prior: Prior) -> None:
        """Drop the prior's device copies of anchors and curvature (rebuilt at the next penalty)."""
        cache = getattr(prior, "_penalty_cache", None)
        if isinstance(cache, dict):
            cache.clear()

    def _prior_folder(self, output_dir: str | os.PathLike) -> Path:
        return Path(output_dir) / self.args.prior_subfolder

    def _write_prior(self, folder: Path, beside_model: bool = False) -> None:
        """Write the prior atomically (main process only; the caller checks ``should_save``).

        ``beside_model``: the model's current weights are saved in the same folder, so a prior with
        compact storage may keep an anchor equal to them as a reference instead of a copy.
        """
        assert self.prior is not None
        if beside_model and self.model is not None and _accepts_kwarg(self.prior.save_pretrained, "model"):
            self.prior.save_pretrained(folder, model=self._unwrapped())
        else:
            self.prior.save_pretrained(folder)

    # ---------------------------------------------------------------- penalty
    def _penalty_active(self) -> bool:
        return (
            self.prior is not None
            and len(self.prior.slots) > 0
            and self.args.penalty != PenaltyType.NONE
            and self.args.penalty_lambda > 0
        )

    def _unwrapped(self, model: nn.Module | None = None) -> nn.Module:
        return self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)

    def penalty_value(self, model: nn.Module | None = None) -> Tensor:
        """λ·P(θ) at the current weights, differentiable (0 without a prior or with λ = 0)."""
        if not self._penalty_active():
            return torch.zeros((), device=self.args.device)
        assert self.prior is not None
        return self.prior.penalty(self._unwrapped(model), self.args.penalty_lambda)

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Tensor | int | None) -> bool:
        """Mirror of `Trainer.training_step`'s decision whether to divide the loss by the GA steps."""
        forced = getattr(self, "loss_is_scaled_for_ga", None)
        if forced is not None:
            return bool(forced)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _penalty_coefficient(self, num_items_in_batch: Tensor | int | None) -> float:
        """Factor on λP in the last micro-batch's loss so that it contributes λ∇P once per optimizer step.

        K = micro-batches in this step. If the Trainer divides the loss by K, the factor is K
        (K·λP/K = λP), else 1. Each of the W processes adds the same λ∇P, which DDP's average keeps.
        """
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            return 1.0
        return float(getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps)

    def _check_loss_normalisation(self, model: nn.Module, inputs: Mapping[str, Any], num_items_in_batch: Any) -> None:
        """Find out once whether a model that takes ``**kwargs`` really divides its loss by ``num_items_in_batch``.

        Two eval-mode, no-grad forward passes of the first micro-batch with n and 2n: a loss that
        halves honours it, an unchanged loss is a per-batch mean. The verdict is all-reduced so that
        every process decides alike (the Trainer's token counting gathers over processes).
        """
        if (
            not self.model_accepts_loss_kwargs
            or self.compute_loss_func is not None
            or self.label_smoother is not None
            or getattr(self, "loss_is_scaled_for_ga", None) is not None
            or self.args.n_gpu > 1
        ):
            self._loss_check_done = True
            return
        if num_items_in_batch is None or "labels" not in inputs:
            return
        verdict = self._probe_loss_normalisation(model, inputs, num_items_in_batch)
        votes = torch.zeros(3, dtype=torch.float32, device=self.args.device)
        votes[verdict] = 1.0
        all_reduce_sum_([votes])
        honours, ignores = float(votes[2]) > 0, float(votes[1]) > 0
        if honours:
            self._loss_check_done = True
        elif ignores:
            self._loss_check_done = True
            self.model_accepts_loss_kwargs = False
            logger.warning(
                "%s accepts **kwargs but its loss ignores num_items_in_batch (it is a per-batch mean). "
                "ContinualTrainer treats it as such, so that the Trainer divides it by the gradient accumulation "
                "steps and does not multiply it by the number of processes.",
                type(self._unwrapped(model)).__name__,
            )
        else:
            self._loss_check_tries += 1
            self._loss_check_done = self._loss_check_tries >= 3

    def _probe_loss_normalisation(self, model: nn.Module, inputs: Mapping[str, Any], n: Any) -> int:
        """0: inconclusive, 1: the loss ignores ``num_items_in_batch``, 2: the loss is divided by it."""
        inner = self._unwrapped(model)
        try:
            with evaluating(inner), torch.no_grad():
                l1 = _loss_of(inner(**inputs, num_items_in_batch=n))
                l2 = _loss_of(inner(**inputs, num_items_in_batch=n * 2))
        except Exception as e:  # noqa: BLE001 - the probe must never break training
            logger.info("Could not check the loss normalisation of the model (%s); keeping the Trainer's default.", e)
            return 0
        if not isinstance(l1, Tensor) or not isinstance(l2, Tensor) or l1.numel() != 1 or l2.numel() != 1:
            return 0
        a, b = float(l1), float(l2)
        if not (math.isfinite(a) and math.isfinite(b)) or a == 0.0:
            return 0
        if abs(a - b) <= 1e-5 * abs(a):
            return 1
        if abs(a - 2.0 * b) <= 1e-3 * abs(a):
            return 2
        return 0

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The Trainer's task loss, plus c·λP(θ) on the last micro-batch of each optimizer step in training.

        c = ``_penalty_coefficient`` (K or 1), so that the penalty's gradient is exactly λ∇P per step.
        Inside :meth:`training_step` the value is added detached and λ∇P = λF(θ − θ*) goes straight into
        ``p.grad`` after the backward pass (:meth:`_add_penalty_grads`); called from anywhere else the
        penalty is differentiable. Evaluation losses carry no penalty.
        """
        training = model.training
        if training and self.check_loss_normalisation and not self._loss_check_done:
            self._check_loss_normalisation(model, inputs, num_items_in_batch)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not (training and self._penalty_active() and self.accelerator.sync_gradients):
            return result
        loss, outputs = result if return_outputs else (result, None)
        if self._in_training_step and self._penalty_grads_direct():
            assert self.prior is not None
            params = dict(self._unwrapped(model).named_parameters())
            terms = self.prior.penalty_terms(next(iter(params.values())).device, self.args.penalty_lambda)
            pen, grads = terms.value_and_grads(params)
            self._pending_penalty_grads = params, grads
        else:
            pen = self.penalty_value(model)
        detached = pen.detach()
        self._penalty_sum = detached if self._penalty_sum is None else self._penalty_sum + detached
        self._penalty_steps += 1
        loss = loss + self._penalty_coefficient(num_items_in_batch) * pen.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def _penalty_grads_direct(self) -> bool:
        """Whether λ∇P is added to ``p.grad`` after backward rather than back-propagated.

        Under DDP the penalty must not go through autograd: with ``find_unused_parameters`` (the
        Trainer's default for transformers models) DDP marks a parameter the forward did not use
        (an earlier task's head) ready after the forward, and a penalty gradient reaching it in
        backward marks it twice, which DDP refuses. λ∇P is the same on every process, so adding it
        after DDP's average is exact. DeepSpeed keeps its own gradient buffers, and LOMO/AdaLOMO
        update the weights inside the backward pass: those back-propagate it.
        """
        fused = str(getattr(self.args.optim, "value", self.args.optim)).lower() in ("lomo", "adalomo")
        return self.accelerator.distributed_type != DistributedType.DEEPSPEED and not fused

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """`Trainer.training_step`, then p.grad += s·λF(θ − θ*) on the last micro-batch of a step (s: the fp16 loss scale)."""
        self._in_training_step, self._pending_penalty_grads = True, None
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False
        pending, self._pending_penalty_grads = self._pending_penalty_grads, None
        if pending is not None and pending[1]:
            self._add_penalty_grads(*pending)
        return loss

    def _add_penalty_grads(self, params: dict[str, nn.Parameter], grads: dict[str, Tensor]) -> None:
        """p.grad += s·g for every penalised trainable parameter; s = the GradScaler's scale under fp16, else 1."""
        scaler = getattr(self.accelerator, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        with torch.no_grad():
            for name, g in grads.items():
                p = params[name]
                if not p.requires_grad:
                    continue
                g = (g * scale if scale != 1.0 else g).to(device=p.device, dtype=p.dtype)
                if p.grad is None:
                    p.grad = g.contiguous()
                else:
                    p.grad.add_(g)

    # ---------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``loss_penalty`` (mean λP over the window) and ``loss_task`` (= loss − loss_penalty) to training logs."""
        if "loss" in logs and self.args.penalty != PenaltyType.NONE:
            pen = 0.0
            if self._penalty_steps > 0 and self._penalty_sum is not None:
                pen = float(self._penalty_sum.item()) / self._penalty_steps  # the only sync, at logging time
            self._penalty_sum, self._penalty_steps = None, 0
            logs["loss_penalty"] = pen
            logs["loss_task"] = logs["loss"] - pen
        super().log(logs, start_time)

    # --------------------------------------------------------------- training
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> Any:
        """`Trainer.train`; resuming also restores the prior saved in the checkpoint.

        ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint (one with
        ``trainer_state.json``, which the Trainer writes last), skipping one torn by a crash.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = _last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if self.model is not None and not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                f"{type(self.model).__name__} has no trainable parameter (every requires_grad is False), so there "
                "is nothing to train. A PEFT adapter loaded with PeftModel.from_pretrained is frozen unless you pass "
                "is_trainable=True; otherwise unfreeze the parameters to train (param.requires_grad_(True))."
            )
        if resume_from_checkpoint is not None:
            self._restore_prior(os.fspath(resume_from_checkpoint))
        elif self.prior is not None and self.model is not None:
            self.prior.check_compatible(self.model)
        self._penalty_sum, self._penalty_steps = None, 0
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
        )

    def _restore_prior(self, checkpoint: str) -> None:
        folder = self._prior_folder(checkpoint)
        # a save killed between its two renames leaves the prior in a hidden sibling: put it back
        folder = restore_interrupted_save(folder)
        if not folder.is_dir():
            if self.prior is not None:
                logger.warning(
                    "Checkpoint %s holds no prior in %r; keeping the prior given to the trainer (%d task(s)).",
                    checkpoint,
                    self.args.prior_subfolder,
                    self.prior.num_tasks,
                )
            return
        # PriorFileError on a missing, corrupted or tampered file
        if self.model is not None and _accepts_kwarg(Prior.load_folder, "model"):
            prior = Prior.load_folder(folder, model=self.model)
        else:
            prior = Prior.load_folder(folder)
        self.prior = self._adopt_prior(prior, source=str(folder))
        logger.info("Restored the prior (%d task(s)) from %s.", prior.num_tasks, folder)

    # ----------------------------------------------------------- consolidation
    def _autocast_dtype(self) -> torch.dtype | None:
        mp = str(getattr(self.accelerator, "mixed_precision", "no") or "no")
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)

    def get_fisher_dataloader(self, dataset: Any) -> DataLoader:
        """This process's shard of the data used for the Fisher.

        The first ``min(fisher_max_examples, fisher_max_batches · fisher_batch_size)`` examples are
        chosen over all processes together (for a map-style dataset of n examples, the indices
        ``sorted(torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[:limit])``;
        for an iterable one, the first ``limit``); process r of W takes examples
        r, r + W, ... of them, in order, batched by ``fisher_batch_size`` with the Trainer's data
        collator. Shards are disjoint and may differ by one example: the estimator all-reduces
        sums and counts, so the Fisher does not depend on W.
        """
        args = self.args
        bs = args.fisher_batch_size or args.per_device_train_batch_size
        limits = [x for x in (args.fisher_max_examples, (args.fisher_max_batches or 0) * bs or None) if x is not None]
        limit = min(limits) if limits else None
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        collator = self.data_collator
        num_workers = args.dataloader_num_workers
        data: Dataset | IterableDataset
        if isinstance(dataset, IterableDataset) or not has_length(dataset):
            collator = self._get_collator_with_removed_columns(collator, description="Fisher")
            data = _ShardedIterable(dataset, rank, world, limit)
            num_workers = 0
        else:
            n = len(dataset)
            if limit is None or limit >= n:
                chosen = list(range(n))
            else:
                g = torch.Generator().manual_seed(int(args.seed))
                chosen = sorted(torch.randperm(n, generator=g)[:limit].tolist())
            mine = chosen[rank::world]
            if hasattr(dataset, "select") and hasattr(dataset, "column_names"):  # datasets.Dataset
                data = self._remove_unused_columns(dataset, description="Fisher").select(mine)
            else:
                collator = self._get_collator_with_removed_columns(collator, description="Fisher")
                data = Subset(dataset, mine)
        return DataLoader(
            data,
            batch_size=bs,
            shuffle=False,
            drop_last=False,
            collate_fn=collator,
            num_workers=num_workers,
            pin_memory=bool(args.dataloader_pin_memory) and self.args.device.type == "cuda",
        )

    def consolidate(
        self,
        dataset: Any = None,
        task_name: str | None = None,
        n_examples: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> TaskRecord:
        """Fold the current task into the prior, anchored at the current weights, and save it.

        Estimates the Fisher of the (unwrapped) model at its current weights on ``dataset``
        (default: the train dataset) with the Trainer's data collator, ``fisher_batch_size`` and
        the ``fisher_max_*`` limits, under the accelerator's autocast when mixed precision is on.
        Under DDP every process must call it; each estimates on its own shard and the estimator
        all-reduces. ``penalty='l2'`` estimates nothing (identity curvature). The prior is created
        on first use, records the task (name, ``n_examples`` = the dataset size by default, date,
        λ, penalty, Fisher options, and ``metadata`` such as metrics), and is written to
        ``output_dir/<prior_subfolder>`` by the main process.

        Returns:
            The task's :class:`TaskRecord`.
        """
        args = self.args
        if args.penalty == PenaltyType.NONE:
            raise ValueError(
                "consolidate() needs a prior, but penalty='none'. Set penalty='kfac', 'ewc' or 'l2' "
                "(penalty_lambda=0.0 trains without penalising while still allowing consolidation)."
            )
        reason = self._unsupported_parallelism()
        if reason is not None:
            raise ValueError(
                f"consolidate() is not supported under {reason}: the Fisher hooks would see sharded parameters "
                "or sequences. Consolidate in a DDP or single-process run."
            )
        if self.model is None:
            raise ValueError("consolidate() needs a model; pass model= (or model_init=) to the trainer.")
        if dataset is None:
            dataset = self.train_dataset
            if dataset is None:
                raise ValueError("consolidate() has no data: pass consolidate(dataset=...) or give the trainer a train_dataset.")
        size = len(dataset) if has_length(dataset) else None
        if size == 0:
            raise ValueError(
                "consolidate() got an empty dataset: the Fisher needs at least one example of the task. "
                "Pass the task's training data (or a non-empty sample of it)."
            )
        if task_name is not None and (not isinstance(task_name, str) or not task_name.strip()):
            raise TypeError(
                f"task_name={task_name!r} is not valid: it must be a non-empty string (it names the task in the "
                "prior's history and model card). Pass e.g. task_name=str(...)."
            )
        if n_examples is not None and (not isinstance(n_examples, int) or isinstance(n_examples, bool) or n_examples < 1):
            raise ValueError(f"n_examples={n_examples!r} is not valid: it must be an integer >= 1 (the task's data size).")
        meta_in = dict(metadata or {})
        try:
            json.dumps(meta_in)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata must be JSON-serialisable (it is saved with the prior): {e}") from None
        shape = args.prior_shape
        assert shape is not None
        if shape == Shape.IDENTITY and n_examples is None and size is None:
            raise ValueError("penalty='l2' with an iterable dataset: pass consolidate(n_examples=...) (the task's data size).")
        if self.prior is not None and self.prior.config.shape != shape:
            raise ValueError(
                f"the prior has shape {str(self.prior.config.shape)!r} but penalty={str(args.penalty)!r} needs {str(shape)!r}."
            )
        prior = self.prior if self.prior is not None else Prior(args.to_prior_config())
        name = task_name if task_name is not None else f"task-{prior.num_tasks + 1}"
        model = self._unwrapped()
        curvature = None
        if shape == Shape.IDENTITY:
            prior.fisher = FisherConfig(shape=Shape.IDENTITY)
        else:
            fisher_config = args.to_fisher_config()
            loader: Any = self.get_fisher_dataloader(dataset)
            if isinstance(loader.dataset, IterableDataset):
                loader = _Unsized(loader)  # estimate_fisher calls len() on anything that has __len__
            curvature = estimate_fisher(
                model,
                loader,
                fisher_config,
                predictive_fn=self.predictive_fn,
                autocast_dtype=self._autocast_dtype(),
                progress=not args.disable_tqdm,
            )
            prior.fisher = fisher_config
        meta: dict[str, Any] = {
            "penalty": str(args.penalty),
            "lambda": args.penalty_lambda,
            "fisher_type": str(args.fisher_type) if curvature is not None else None,
            "n_fisher_examples": curvature.n_examples if curvature is not None else 0,
            "global_step": int(self.state.global_step),
            "num_processes": int(self.accelerator.num_processes),
        }
        base = _hub_name_of(model)
        if prior.num_tasks == 0 and base is not None:
            meta["base_model"] = base  # the model cards of every later update name it, not the update's own repo
        meta.update(meta_in)
        n = n_examples if n_examples is not None else size
        record = prior.add_task(model, curvature, name, n, meta)
        self._reset_penalty_cache(prior)
        self.prior = prior
        if args.should_save:
            self._write_prior(self._prior_folder(args.output_dir))
        self.accelerator.wait_for_everyone()
        return record

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the prior into ``output_dir/<prior_subfolder>`` (first, atomically), then the model.

        A compact prior may store an anchor equal to the saved weights as a reference to them. Such a
        prior is written only after the weights: first a self-contained one (full anchors), then the
        model, then the one with references, so that a save killed at any point leaves a prior that loads.
        """
        out = output_dir if output_dir is not None else self.args.output_dir
        by_reference = False
        if self.args.should_save:
            if self.prior is not None:
                # checkpoints keep full anchors: they are restored before the checkpoint's weights are loaded
                by_reference = (
                    not self._saving_checkpoint
                    and self.model is not None
                    and bool(self.prior.anchor_references(self._unwrapped()))
                )
                self._write_prior(self._prior_folder(out), beside_model=False)
            elif (self._prior_folder(out) / PRIOR_CONFIG_NAME).is_file():
                logger.warning(
                    "%s holds a prior from an earlier run, but this trainer has none: it may not match the model saved now.",
                    self._prior_folder(out),
                )
        super()._save(output_dir, state_dict=state_dict)
        if by_reference:
            self._write_prior(self._prior_folder(out), beside_model=True)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """`Trainer._save_checkpoint`, which writes the prior through :meth:`_save` (before any push)."""
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _push_will_run(self) -> bool:
        """Whether `Trainer._push_from_checkpoint` is about to upload ``output_dir``."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return False
        in_progress = getattr(self, "push_in_progress", None)
        return bool(self.args.hub_always_push or in_progress is None or in_progress.is_done())

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Bring ``output_dir/<prior_subfolder>`` up to date before the Trainer uploads ``output_dir``.

        The Trainer copies only the model files of the checkpoint into ``output_dir`` before pushing it.
        """
        if self.prior is not None and self._push_will_run():
            src, dst = self._prior_folder(checkpoint_folder), self._prior_folder(self.args.output_dir)
            if not _same_prior(src, dst):
                self._write_prior(dst)
        super()._push_from_checkpoint(checkpoint_folder)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """The hf_kfac card with the task history when there is a prior, else the Trainer's card."""
        card_fn: Callable[..., Any] | None = None
        if self.prior is not None and self.prior.tasks:
            try:
                from .model_card import save_model_card as card_fn
            except ImportError:  # pragma: no cover - model_card is part of the package
                card_fn = None
        if card_fn is None:
            super().create_model_card(
                language=language, license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from,
                tasks=tasks, dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args,
            )
            return
        if not self.is_world_process_zero():
            return
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id or Path(self.args.output_dir).name
        extra: dict[str, Any] = {}
        if language is not None:
            extra["language"] = language
        card_fn(
            self.args.output_dir,
            self.prior,
            repo_id=repo_id,
            model_name=model_name,
            model_class=type(self._unwrapped()).__name__,
            model_module=type(self._unwrapped()).__module__,
            adapter_base=_adapter_base(self._unwrapped()),
            base_model=finetuned_from or _base_model(self.prior, self._unwrapped(), repo_id),
            penalty=str(self.args.penalty),
            prior_subfolder=self.args.prior_subfolder,
            tags=[tags] if isinstance(tags, str) else list(tags or []),
            license=license,
            datasets=[dataset] if isinstance(dataset, str) else dataset,
            **extra,
        )



def _adapter_base(model: nn.Module) -> tuple[str, str, str | None] | None:
    """For a PEFT model: its base model's class, module and Hub id (for the card's loading snippet)."""
    get_base = getattr(model, "get_base_model", None)
    if type(model).__module__.split(".")[0] != "peft" or not callable(get_base):
        return None
    base = get_base()
    configs = getattr(model, "peft_config", None) or {}
    config = configs.get(getattr(model, "active_adapter", None)) or next(iter(configs.values()), None)
    name = getattr(config, "base_model_name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    return type(base).__name__, type(base).__module__, name or None


def _base_model(prior: Prior, model: nn.Module, repo_id: str) -> str | None:
    """The Hub model the task sequence started from: recorded with the first task, else the id the model
    was loaded from, unless that is the repo being written (a model continued from its own repo)."""
    for task in prior.tasks:
        base = (task.metadata or {}).get("base_model")
        if isinstance(base, str) and base:
            return base
    base = _hub_name_of(model)
    return None if base == repo_id else base


def _hub_name_of(model: nn.Module) -> str | None:
    """The Hub id the model was loaded from, or None for local folders and models built in code."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name
