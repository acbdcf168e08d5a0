"""The model's predictive distribution, as the Fisher needs it.

The Fisher of a model with outputs z and likelihood p(y | z) is
F = E_x E_{y~p(y|z(x))}[∇_θ log p(y|z) ∇_θ log p(y|z)ᵀ] = E_x[J_θᵀ H_z J_θ], where
H_z = E_y[∇_z log p ∇_z log pᵀ] is the likelihood's Fisher in output space. This module
turns a batch into outputs z (:class:`PredictiveOutput`) and yields the output-space
vectors v whose back-propagation gives the gradients in that expectation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..enums import FisherType, Likelihood

IGNORE_INDEX = -100
MAX_EXACT_PASSES = 20_000  # backward passes per batch that fisher_type="exact" may take


@dataclass
class PredictiveOutput:
    """Outputs of a model on one batch, shaped ``(N, *positions, C)``.

    Attributes:
        logits: Natural parameters: class logits (categorical) or means (gaussian).
            The first dimension indexes examples; the middle dimensions, if any,
            index output positions (tokens).
        labels: True targets: class ids ``(N, *positions)`` with ``-100`` for ignored
            positions (categorical), or ``(N, *positions, C)`` values (gaussian).
            Only the ``empirical`` Fisher needs them.
        likelihood: The likelihood p(y | logits).
        mask: Optional ``(N, *positions)`` bool tensor of positions that count. For a
            categorical likelihood the default is ``labels != -100`` where labels are
            given, and every position otherwise.
    """

    logits: Tensor
    labels: Tensor | None = None
    likelihood: Likelihood | str = Likelihood.CATEGORICAL
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        self.likelihood = Likelihood(self.likelihood)
        if self.logits.dim() < 2:
            raise ValueError(
                f"logits must have shape (N, ..., C); got {tuple(self.logits.shape)}. "
                "Add a class dimension (e.g. logits.unsqueeze(-1) for a single regression output)."
            )

    def flat(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """Return ``(logits (N, P, C) float32, labels (N, P[, C]) or None, mask (N, P) bool)``."""
        n, c = self.logits.shape[0], self.logits.shape[-1]
        z = self.logits.float().reshape(n, -1, c)
        p = z.shape[1]
        labels = self.labels
        if labels is not None:
            if self.likelihood == Likelihood.CATEGORICAL:
                if labels.numel() != n * p:
                    raise ValueError(
                        f"labels of shape {tuple(labels.shape)} do not match logits of shape "
                        f"{tuple(self.logits.shape)}: expected {n * p} class ids, one per output position."
                    )
                if labels.is_floating_point():
                    if not bool(torch.isfinite(labels).all()) or bool((labels != labels.round()).any()):
                        raise ValueError(
                            f"categorical labels must be class ids; got a {labels.dtype} tensor with "
                            "non-integer values. Pass integer class ids (torch.long), or use "
                            "likelihood='gaussian' for real-valued targets."
                        )
                labels = labels.reshape(n, p).long()
            else:
                if labels.numel() != z.numel():
                    raise ValueError(
                        f"gaussian targets of shape {tuple(labels.shape)} do not match outputs of "
                        f"shape {tuple(self.logits.shape)}."
                    )
                labels = labels.reshape(n, p, c).float()
        if self.mask is not None:
            mask = self.mask.reshape(n, p).bool()
        elif labels is not None and self.likelihood == Likelihood.CATEGORICAL:
            mask = labels != IGNORE_INDEX
        else:
            mask = torch.ones(n, p, dtype=torch.bool, device=z.device)
        if labels is not None and self.likelihood == Likelihood.CATEGORICAL:
            check_class_ids(labels, mask, c, allow_ignored=True)
        return z, labels, mask


def check_class_ids(labels: Tensor, mask: Tensor, n_classes: int, allow_ignored: bool = False) -> None:
    """Raise a ValueError naming the first label at a counted position (``mask``) outside [0, n_classes).

    Checked whatever the Fisher type: a class id the model cannot predict means the labels belong to
    another task or head, even where (``mc``, ``exact``) labels only mark ignored positions.
    ``allow_ignored``: a -100 where an explicit mask counts the position passes (``mc`` and ``exact``
    do not read it); the ``empirical`` Fisher, which needs a class there, calls this without it.
    """
    bad = mask & ((labels < 0) | (labels >= n_classes))
    if allow_ignored:
        bad &= labels != IGNORE_INDEX
    if not bool(bad.any()):
        return
    value = int(labels[bad][0])
    if value == IGNORE_INDEX:
        raise ValueError(
            f"label {IGNORE_INDEX} (ignored) at a position the PredictiveOutput's mask counts: the empirical "
            "Fisher needs a class id there. Leave the position out of the mask, or give its true class."
        )
    if value < 0:
        raise ValueError(
            f"label {value} at a position that counts: class ids must be in [0, {n_classes}). "
            f"Use {IGNORE_INDEX} for ignored positions (no other negative value is ignored)."
        )
    raise ValueError(
        f"label {value} at a position that counts, but the model predicts {n_classes} classes: class ids must be "
        f"in [0, {n_classes}). Check that the labels belong to this model's task (its num_labels or head), "
        f"or use {IGNORE_INDEX} for positions to ignore."
    )


PredictiveFn = Callable[[nn.Module, Mapping[str, Any]], PredictiveOutput]
"""A function ``(model, batch) -> PredictiveOutput``; the one hook custom models implement."""


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token, so logits and labels must be shifted by one."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    except ImportError:  # pragma: no cover - transformers is a dependency
        causal_names = set()
    name = type(model).__name__
    return name in causal_names or name.endswith("ForCausalLM")


def default_predictive_fn(model: nn.Module, batch: Mapping[str, Any]) -> PredictiveOutput:
    """Predictive distribution of a transformers model that returns ``logits`` and takes ``labels``.

    Works for sequence classification (``(N, C)`` logits; ``problem_type="regression"``
    gives a gaussian likelihood), token classification and masked LM (``(N, T, C)``,
    ``-100`` ignored), causal LM (logits and labels shifted by one position) and
    encoder-decoder LM (T5, BART: p(y_t | x, y_<t) with the decoder fed the shifted ``labels``,
    as in training, when the batch has no ``decoder_input_ids``).
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
    labels = batch.get("labels", batch.get("label"))
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" not in inputs \
            and "decoder_inputs_embeds" not in inputs:
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if labels is None or prepare is None:
            raise ValueError(
                f"{type(model).__name__} is an encoder-decoder model: its Fisher needs the decoder's "
                "inputs. Put `labels` (the target token ids, -100 for padding) in the batch, or "
                "`decoder_input_ids`."
            )
        inputs["decoder_input_ids"] = prepare(labels=labels)
    out = model(**inputs)
    logits = _get_logits(out)
    problem_type = getattr(config, "problem_type", None)
    if problem_type is None and labels is not None and labels.is_floating_point() and logits.dim() == 2 \
            and logits.shape[-1] > 1 and tuple(labels.shape) == tuple(logits.shape):
        problem_type = "multi_label_classification"  # what the model's own loss infers from such labels
    if problem_type == "multi_label_classification":
        raise NotImplementedError(
            "multi-label classification (independent Bernoulli outputs) has no built-in predictive "
            "distribution; pass predictive_fn= returning a PredictiveOutput for your model."
        )
    if problem_type == "regression" or (
        problem_type is None and getattr(config, "num_labels", 2) == 1 and logits.shape[-1] == 1
        and logits.dim() == 2
    ):
        if labels is not None:
            if labels.numel() != logits.numel():
                raise ValueError(
                    f"regression targets of shape {tuple(labels.shape)} do not match outputs of shape "
                    f"{tuple(logits.shape)}: expected {logits.numel()} values, one per output. Pass the "
                    "batch's own targets as `labels` (or a predictive_fn for another target layout)."
                )
            labels = labels.reshape(logits.shape)
        return PredictiveOutput(logits, labels, Likelihood.GAUSSIAN)
    if _is_causal_lm(model):
        if labels is not None and tuple(labels.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"causal-LM labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)}: "
                f"expected {tuple(logits.shape[:-1])}, one token id per input position (the shape of input_ids, "
                "unshifted: the shift by one position is done here)."
            )
        logits = logits[:, :-1]
        labels = labels[:, 1:] if labels is not None else None
        mask = None
        if labels is None and "attention_mask" in batch:
            mask = batch["attention_mask"][:, 1:].bool()
        return PredictiveOutput(logits, labels, Likelihood.CATEGORICAL, mask)
    mask = None
    if labels is None and logits.dim() == 3 and "attention_mask" in batch:
        mask = batch["attention_mask"].bool()
    return PredictiveOutput(logits, labels, Likelihood.CATEGORICAL, mask)


def _get_logits(out: Any) -> Tensor:
    """The ``logits`` of a model output (ModelOutput, dict, tuple or tensor)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        if "logits" in out.keys():
            return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"the model returned {type(out).__name__} without `logits`; pass predictive_fn= "
        "returning a PredictiveOutput (see hf_kfac.curvature.predictive)."
    )


def output_vectors(
    z: Tensor,
    labels: Tensor | None,
    mask: Tensor,
    likelihood: Likelihood,
    fisher_type: FisherType,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, float]]:
    """Yield ``(v, w)``: output-space vectors and weights with Σ_k w_k v_k v_kᵀ giving the Fisher.

    Per output position with logits z and p = softmax(z), ∇_z(-log p_y) = p − e_y, so:

    - ``mc``: v = p − e_y with y ~ p, w = 1/S for each of S samples;
    - ``empirical``: v = p − e_y with the true y, w = 1 (a negative y at a position that
      counts is an error: only -100 marks an ignored position);
    - ``exact``: H = diag(p) − ppᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ, so one vector
      v = √p_c (p − e_c) per class c and output position (positions one at a time, so
      that no cross-position terms enter), w = 1.

    For a unit-variance gaussian, ∇_z(-log p) = z − y, H = I: ``mc`` draws y ~ N(z, I),
    ``exact`` uses the unit vectors. Masked positions get v = 0.
    """
    z = z.detach()
    n, p, c = z.shape
    m = mask.unsqueeze(-1).to(z.dtype)
    if fisher_type == FisherType.EMPIRICAL and labels is None:
        raise ValueError(
            "the empirical Fisher needs the true labels, but the batch has none: add `labels` "
            "to the batch or use fisher_type='mc'."
        )
    if fisher_type == FisherType.EXACT:
        passes = int(mask.any(0).sum()) * c
        if passes > MAX_EXACT_PASSES:
            raise ValueError(
                f"the exact Fisher of this batch needs {passes} backward passes ({c} classes x "
                f"{int(mask.any(0).sum())} output positions), more than {MAX_EXACT_PASSES}. "
                "Use fisher_type='mc' (unbiased, 1 pass per sample) for large label spaces."
            )
    if likelihood == Likelihood.CATEGORICAL:
        probs = torch.softmax(z, dim=-1)
        if fisher_type == FisherType.EMPIRICAL:
            check_class_ids(labels, mask, c)
            y = torch.where(mask, labels, torch.zeros_like(labels))  # positions left out: any class, v is masked to 0
            yield (probs - nn.functional.one_hot(y, c).to(z.dtype)) * m, 1.0
        elif fisher_type == FisherType.MC:
            for _ in range(n_samples):
                y = torch.multinomial(probs.reshape(-1, c), 1, generator=generator).reshape(n, p)
                yield (probs - nn.functional.one_hot(y, c).to(z.dtype)) * m, 1.0 / n_samples
        else:
            eye = torch.eye(c, dtype=z.dtype, device=z.device)
            sqrt_p = probs.sqrt()
            for pos in range(p):
                if not mask[:, pos].any():
                    continue
                for k in range(c):
                    v = torch.zeros_like(z)
                    v[:, pos] = sqrt_p[:, pos, k : k + 1] * (probs[:, pos] - eye[k])
                    yield v * m, 1.0
    else:
        if fisher_type == FisherType.EMPIRICAL:
            yield (z - labels) * m, 1.0
        elif fisher_type == FisherType.MC:
            for _ in range(n_samples):
                noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
                yield noise * m, 1.0 / n_samples
        else:
            for pos in range(p):
                if not mask[:, pos].any():
                    continue
                for k in range(c):
                    v = torch.zeros_like(z)
                    v[:, pos, k] = 1.0
                    yield v * m, 1.0
