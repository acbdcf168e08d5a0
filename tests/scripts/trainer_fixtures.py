"""Tiny models, data, priors and hand-computed reference gradients for the trainer tests.

Shared by the single-process tests and the torchrun worker ``dist_trainer.py``. The references
never use hf_kfac's penalty code: the penalty is rebuilt from the prior's stored anchors and
factors as an explicit quadratic form and differentiated with torch.autograd, and the task loss
is recomputed from the logits (not from the model's own loss).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from oracles import tiny_bert_config  # noqa: E402

if TYPE_CHECKING:
    import datasets

    from hf_kfac import Prior
    from hf_kfac.trainer_config import ContinualConfig

SEQ = 6
VOCAB = 40


def make_model(kind: str, seed: int = 0, dropout: float = 0.0, **overrides: Any) -> nn.Module:
    """A tiny random BERT: ``seq`` (sequence classification), ``tok`` (token classification),
    ``mlm`` (masked LM), ``lm`` (causal LM, BertLMHeadModel) or ``nokw`` (sequence classification
    flagged ``accepts_loss_kwargs = False``)."""
    from transformers import (
        BertForMaskedLM,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertLMHeadModel,
    )

    torch.manual_seed(seed)
    kw = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **overrides)
    if kind in ("seq", "nokw"):
        model = BertForSequenceClassification(tiny_bert_config(**kw))
        if kind == "nokw":
            model.accepts_loss_kwargs = False
        return model
    if kind == "tok":
        return BertForTokenClassification(tiny_bert_config(**kw))
    if kind == "mlm":
        return BertForMaskedLM(tiny_bert_config(**kw))
    if kind == "lm":
        return BertLMHeadModel(tiny_bert_config(is_decoder=True, **kw))
    raise ValueError(kind)


def make_rows(kind: str, n: int, seed: int = 1, ragged: bool = True) -> dict[str, list]:
    """Columns of a dataset of ``n`` pre-padded examples for a model of ``kind``.

    ``ragged``: padding and -100 labels vary per example (token-level kinds); otherwise every
    example has the same number of valid labels.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    am = torch.ones_like(ids)
    if ragged:
        for i in range(n):
            am[i, 3 + i % (SEQ - 2) :] = 0
        ids[am == 0] = 0
    if kind in ("seq", "nokw"):
        labels: Tensor = torch.randint(0, 3, (n,), generator=g)
    elif kind == "tok":
        labels = torch.randint(0, 3, (n, SEQ), generator=g)
        labels[am == 0] = -100
    elif kind == "mlm":
        labels = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        labels[am == 0] = -100
        if ragged:
            labels[::2, 1] = -100
    elif kind == "lm":
        labels = ids.clone()
        labels[am == 0] = -100
        # position 0 is never a target after the shift; -100 there keeps the Trainer's token count (which
        # does not shift for BertLMHeadModel, whose loss_type is unset) equal to the shifted count
        labels[:, 0] = -100
        if ragged:
            labels[::3, 2] = -100
    else:
        raise ValueError(kind)
    return {"input_ids": ids.tolist(), "attention_mask": am.tolist(), "labels": labels.tolist()}


def make_dataset(kind: str, n: int, seed: int = 1, ragged: bool = True) -> "datasets.Dataset":
    import datasets

    return datasets.Dataset.from_dict(make_rows(kind, n, seed, ragged))


def batches_of(rows: dict[str, list], bs: int) -> list[dict[str, Tensor]]:
    n = len(rows["labels"])
    full = {k: torch.tensor(v) for k, v in rows.items()}
    return [{k: v[i : i + bs] for k, v in full.items()} for i in range(0, n, bs)]


def make_prior(
    model: nn.Module, kind: str, shape: str = "kfac", damping: float = 0.1, n: int = 8, seed: int = 5
) -> "Prior":
    """A one-task prior anchored at ``model``'s weights, with an empirical Fisher on random data."""
    from hf_kfac import Prior, estimate_fisher

    rows = make_rows(kind, n, seed=seed)
    prior = Prior(shape=shape, damping=damping)
    curv = None
    if shape != "identity":
        curv = estimate_fisher(model, batches_of(rows, 4), shape=shape, fisher_type="empirical", progress=False)
    prior.add_task(model, curv, "a", n_examples=n)
    return prior


def perturb(model: nn.Module, scale: float = 0.05, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _damped(A: Tensor, G: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """A + π√δ I and G + √δ/π I with π² = (tr A / d_A) / (tr G / d_G)."""
    ta, tg = float(torch.trace(A)) / A.shape[0], float(torch.trace(G)) / G.shape[0]
    pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
    r = math.sqrt(delta)
    return A + pi * r * torch.eye(A.shape[0]), G + (r / pi) * torch.eye(G.shape[0])


def hand_penalty(params: dict[str, Tensor], prior: "Prior", lam: float) -> Tensor:
    """λ · ½ Σ_s c_s vec(Δ)ᵀ (F_s + δI) vec(Δ), as explicit quadratic forms (c_s = N_t, no decay).

    For a K-FAC block, vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃) = tr(ΔW̃ᵀ G ΔW̃ A) with ΔW̃ = [ΔW, Δb]."""
    delta = float(prior.config.damping)
    total = torch.zeros(())
    for slot in prior.slots:
        c = float(sum(prior.tasks[t].n_examples for t in slot.tasks)) if prior.config.task_weighting == "data_size" else 1.0
        curv = slot.curvature
        if curv is None:
            for name, anchor in slot.anchor.items():
                d = params[name].float() - anchor
                total = total + 0.5 * c * (1.0 + delta) * (d * d).sum()
            continue
        for block in curv.kfac.values():
            dw = params[block.weight].float() - slot.anchor[block.weight]
            if block.bias is not None:
                dw = torch.cat([dw, (params[block.bias].float() - slot.anchor[block.bias]).unsqueeze(1)], dim=1)
            A, G = _damped(block.A, block.G, delta) if delta > 0 else (block.A, block.G)
            total = total + 0.5 * c * torch.trace(dw.T @ G @ dw @ A)
        for name, diag in curv.diag.items():
            d = params[name].float() - slot.anchor[name]
            total = total + 0.5 * c * ((diag + delta) * d * d).sum()
    return lam * total


def task_loss(model: nn.Module, kind: str, rows: dict[str, list]) -> Tensor:
    """The task objective over all of ``rows``: mean cross-entropy over every valid label (shifted for ``lm``)."""
    full = {k: torch.tensor(v) for k, v in rows.items()}
    logits = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits.float()
    labels = full["labels"]
    if kind == "lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != -100
    return nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum") / keep.sum()


def expected_gradient(
    model: nn.Module, kind: str, rows: dict[str, list], prior: "Prior | None", lam: float
) -> dict[str, Tensor]:
    """∇θ [task_loss + hand_penalty] by autograd, in train mode (dropout must be 0)."""
    model.train()
    model.zero_grad()
    params = dict(model.named_parameters())
    loss = task_loss(model, kind, rows) + (hand_penalty(params, prior, lam) if prior is not None else 0.0)
    loss.backward()
    out = {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}
    model.zero_grad()
    return out


def sgd_args(output_dir: str, **overrides: Any) -> "ContinualConfig":
    """ContinualConfig for one plain SGD step: the update is −lr·gradient exactly."""
    from hf_kfac.trainer_config import ContinualConfig

    kw: dict[str, Any] = dict(
        output_dir=output_dir,
        optim="sgd",
        learning_rate=0.5,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        max_steps=1,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        penalty="kfac",
        penalty_lambda=1.0,
    )
    kw.update(overrides)
    return ContinualConfig(**kw)


def update_as_gradient(before: dict[str, Tensor], model: nn.Module, lr: float) -> dict[str, Tensor]:
    """(θ_before − θ_after) / lr."""
    return {k: (before[k] - p.detach().cpu()) / lr for k, p in model.named_parameters()}


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters()}


def max_rel_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> tuple[float, str]:
    """max over parameters of ‖got − want‖ / (‖want‖ + 1e-8), and the worst parameter."""
    worst, name = 0.0, ""
    for k, w in want.items():
        e = float((got[k] - w).norm() / (w.norm() + 1e-8))
        if e > worst:
            worst, name = e, k
    return worst, name


def one_thread() -> Iterator[None]:
    """Generator for an autouse fixture: run a test with one intra-op thread, then restore.

    Tiny models gain nothing from more threads, and on a loaded 2-core machine OpenMP threads
    that spin against other processes make each op 10-20 times slower.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def leave_process_group() -> None:
    """End a torchrun script: leave the process group together (exiting with gloo's threads still live
    can abort a rank, "terminate called without an active exception", on a loaded machine)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
