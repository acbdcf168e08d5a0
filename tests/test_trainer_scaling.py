"""The penalty adds exactly λ∇P per optimizer step, whatever the gradient accumulation.

Each test runs plain SGD (no momentum, no weight decay, no clipping, constant lr), so the update
θ_before − θ_after equals lr times the gradient the Trainer formed. The reference gradient is
∇[task loss over the whole step's data + λ·P] by torch.autograd, with the task loss recomputed
from the logits and P written out as an explicit quadratic form (trainer_fixtures.hand_penalty).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from trainer_fixtures import (  # noqa: E402
    expected_gradient,
    hand_penalty,
    make_dataset,
    make_model,
    make_prior,
    make_rows,
    max_rel_error,
    one_thread,
    perturb,
    sgd_args,
    state,
    task_loss,
    update_as_gradient,
)

from hf_kfac import Prior  # noqa: E402
from hf_kfac.trainer import ContinualTrainer  # noqa: E402

LR = 0.5
TOL = 2e-5

_one_thread = pytest.fixture(autouse=True)(one_thread)


def _setup(kind: str, shape: str = "kfac", n: int = 8, ragged: bool = True) -> tuple:
    data_kind = "seq" if kind == "nokw" else kind
    base = make_model(kind)
    prior = make_prior(base, data_kind, shape=shape)
    perturb(base)
    rows = make_rows(data_kind, n, ragged=ragged)
    return base, prior, rows, make_dataset(data_kind, n, ragged=ragged)


def _one_step(base: nn.Module, prior: Prior, ds: Any, tmp_path: Path, **overrides: Any) -> tuple[dict, ContinualTrainer]:
    model = copy.deepcopy(base)
    before = state(model)
    trainer = ContinualTrainer(model=model, args=sgd_args(str(tmp_path), **overrides), train_dataset=ds, prior=prior)
    trainer.train()
    return update_as_gradient(before, model, LR), trainer


@pytest.mark.parametrize("kind", ["seq", "lm", "nokw"])
def test_update_is_task_plus_lambda_penalty_gradient_for_any_accumulation(kind: str, tmp_path: Path) -> None:
    """GA 1, 2, 4 (and average_tokens_across_devices on/off) with the same 8 examples per step give the
    same update: −lr ∇(L + λP).

    ``seq``: a BERT head that takes **kwargs but ignores num_items_in_batch (detected, then
    treated as a per-batch mean); ``lm``: a causal LM whose loss is divided by the token count
    of the whole step (the Trainer does not divide by GA); ``nokw``: accepts_loss_kwargs=False
    (the Trainer divides by GA).
    """
    base, prior, rows, ds = _setup(kind)
    lam = 0.7
    want = expected_gradient(copy.deepcopy(base), "seq" if kind == "nokw" else kind, rows, prior, lam)
    no_penalty = expected_gradient(copy.deepcopy(base), "seq" if kind == "nokw" else kind, rows, None, lam)
    assert max_rel_error(no_penalty, want)[0] > 0.05  # the penalty matters in this set-up
    for ga, bs, avg in [(1, 8, True), (2, 4, True), (4, 2, True), (2, 4, False)]:
        got, trainer = _one_step(
            base, prior, ds, tmp_path / f"ga{ga}-{avg}", gradient_accumulation_steps=ga, per_device_train_batch_size=bs,
            penalty_lambda=lam, average_tokens_across_devices=avg,
        )
        err, name = max_rel_error(got, want)
        assert err < TOL, f"GA={ga}, average_tokens_across_devices={avg}: {name} off by {err:.2e}"
    assert trainer.model_accepts_loss_kwargs is (kind == "lm")


@pytest.mark.parametrize("shape,penalty", [("diag", "ewc"), ("identity", "l2")])
def test_diagonal_and_l2_penalties_scale_like_kfac(shape: str, penalty: str, tmp_path: Path) -> None:
    base, prior, rows, ds = _setup("seq", shape=shape)
    want = expected_gradient(copy.deepcopy(base), "seq", rows, prior, 0.3)
    for ga, bs in [(1, 8), (2, 4)]:
        got, _ = _one_step(
            base, prior, ds, tmp_path / f"ga{ga}", gradient_accumulation_steps=ga, per_device_train_batch_size=bs,
            penalty=penalty, penalty_lambda=0.3,
        )
        err, name = max_rel_error(got, want)
        assert err < TOL, f"{penalty} GA={ga}: {name} off by {err:.2e}"


class _Recorder(TrainerCallback):
    """Copies the weights at the start of every optimizer step and keeps every log."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.states: list[dict] = []
        self.logs: list[dict] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.states.append(copy.deepcopy(self.model.state_dict()))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("kind", ["seq", "lm"])
def test_short_last_accumulation_step_still_gets_one_penalty(kind: str, tmp_path: Path) -> None:
    """12 examples, batch 4, GA 2: the second step has a single micro-batch (K = 1 instead of 2)."""
    base, prior, rows, ds = _setup(kind, n=12)
    model = copy.deepcopy(base)
    rec = _Recorder(model)
    args = sgd_args(
        str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        train_sampling_strategy="sequential", penalty_lambda=0.5,
    )
    ContinualTrainer(model=model, args=args, train_dataset=ds, prior=prior, callbacks=[rec]).train()
    assert len(rec.states) == 2
    before = copy.deepcopy(base)
    before.load_state_dict(rec.states[1])
    tail = {k: v[8:] for k, v in rows.items()}
    want = expected_gradient(copy.deepcopy(before), kind, tail, prior, 0.5)
    got = update_as_gradient(state(before), model, LR)
    err, name = max_rel_error(got, want)
    assert err < TOL, f"{name} off by {err:.2e}"


def test_task_and_penalty_losses_are_logged_over_the_window(tmp_path: Path) -> None:
    """Two steps in one logging window: loss_penalty = mean_s λP(θ_s), loss_task = mean_s L(θ_s)."""
    base, prior, rows, ds = _setup("seq")
    model = copy.deepcopy(base)
    rec = _Recorder(model)
    lam = 0.4
    args = sgd_args(
        str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2, logging_steps=2,
        penalty_lambda=lam,
    )
    ContinualTrainer(model=model, args=args, train_dataset=ds, prior=prior, callbacks=[rec]).train()
    pens, tasks = [], []
    ref = copy.deepcopy(base)
    for sd in rec.states:
        ref.load_state_dict(sd)
        ref.train()
        with torch.no_grad():
            pens.append(float(hand_penalty(dict(ref.named_parameters()), prior, lam)))
            tasks.append(float(task_loss(ref, "seq", rows)))
    train_logs = [x for x in rec.logs if "loss" in x]
    assert len(train_logs) == 1
    log = train_logs[0]
    assert log["loss_penalty"] == pytest.approx(sum(pens) / 2, rel=1e-5)
    assert log["loss_task"] == pytest.approx(sum(tasks) / 2, rel=1e-5)
    assert log["loss"] == pytest.approx(log["loss_task"] + log["loss_penalty"], rel=1e-6)
    assert pens[1] != pytest.approx(pens[0])  # the window really averaged two different values


def test_no_penalty_columns_without_a_penalty(tmp_path: Path) -> None:
    base, _, _, ds = _setup("seq")
    model = copy.deepcopy(base)
    rec = _Recorder(model)
    args = sgd_args(str(tmp_path), penalty="none", penalty_lambda=None)
    ContinualTrainer(model=model, args=args, train_dataset=ds, callbacks=[rec]).train()
    log = next(x for x in rec.logs if "loss" in x)
    assert "loss_penalty" not in log and "loss_task" not in log


def test_the_loss_normalisation_check_is_what_fixes_bert_under_accumulation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the check, a BERT head's per-batch-mean loss is not divided by GA (the test above would fail)."""
    base, prior, rows, ds = _setup("seq")
    full = {k: torch.tensor(v) for k, v in rows.items()}
    model = copy.deepcopy(base).eval()
    try:
        with torch.no_grad():
            honours = float(model(**full, num_items_in_batch=3).loss) != float(model(**full, num_items_in_batch=6).loss)
    except TypeError:
        pytest.skip("this transformers version's BERT takes no loss kwargs")
    if honours:
        pytest.skip("this transformers version's BERT loss honours num_items_in_batch")
    want = expected_gradient(copy.deepcopy(base), "seq", rows, prior, 0.7)
    monkeypatch.setattr(ContinualTrainer, "check_loss_normalisation", False)
    got, trainer = _one_step(
        base, prior, ds, tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=4, penalty_lambda=0.7
    )
    assert trainer.model_accepts_loss_kwargs is True
    assert max_rel_error(got, want)[0] > 0.05
