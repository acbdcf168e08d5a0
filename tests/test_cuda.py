"""On a GPU: the Fisher, the penalty and the trainer agree with the float32 CPU computation.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
The oracle is always an independent computation: the same estimator on CPU in float32, or the
penalty as explicit quadratic forms (``hand_penalty``; ``dense_compact_penalty`` for compact factors,
rebuilt as dense matrices with torch.kron).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from oracles import dense_compact_penalty, tiny_bert_config
from transformers import BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from trainer_fixtures import hand_penalty, make_dataset, make_rows  # noqa: E402

from hf_kfac import Prior, estimate_fisher  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    """Float32 products in full precision, so that CPU and GPU may be compared tightly."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(hidden_size=32, intermediate_size=64, num_attention_heads=4))


def _batches(device: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (32, 10), generator=g)
    am = torch.ones_like(ids)
    am[::3, 6:] = 0
    labels = torch.randint(0, 3, (32,), generator=g)
    return [{"input_ids": ids[i : i + 8].to(device), "attention_mask": am[i : i + 8].to(device),
             "labels": labels[i : i + 8].to(device)} for i in range(0, 32, 8)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm().clamp_min(1e-30))


@pytest.mark.parametrize("shape", ["kfac", "diag"])
def test_fisher_on_cuda_equals_the_cpu_fisher(shape: str) -> None:
    model = _model()
    ref = estimate_fisher(model, _batches("cpu"), shape=shape, fisher_type="empirical", progress=False)
    got = estimate_fisher(copy.deepcopy(model).cuda(), _batches("cuda"), shape=shape, fisher_type="empirical",
                          progress=False)
    assert got.n_examples == ref.n_examples
    for name, block in ref.kfac.items():
        assert got.kfac[name].A.dtype == torch.float32
        assert _rel(got.kfac[name].A, block.A) < 1e-5, name
        assert _rel(got.kfac[name].G, block.G) < 1e-4, name
    for name, d in ref.diag.items():
        if float(d.abs().max()) == 0.0:
            continue
        assert _rel(got.diag[name], d) < 1e-4, name


@pytest.mark.parametrize("storage", ["full", "compact"])
@pytest.mark.parametrize("shape", ["kfac", "diag"])
def test_penalty_on_cuda_equals_the_explicit_quadratic_form(shape: str, storage: str) -> None:
    if shape == "diag" and storage == "compact":
        pytest.skip("compact storage is for K-FAC factors")
    model = _model()
    prior = Prior(shape=shape, storage=storage)
    prior.add_task(model, estimate_fisher(model, _batches("cpu"), shape=shape, fisher_type="empirical",
                                          progress=False), "a", n_examples=32)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.01 * torch.randn_like(p))
    gpu = copy.deepcopy(moved).cuda()
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):  # must not change the penalty
        pen = prior.penalty(gpu, 0.5)
    pen.backward()
    params = {n: p.detach().requires_grad_(True) for n, p in moved.named_parameters()}
    # compact: the stored U diag(w) Uᵀ + diag(r) rebuilt densely, damped, and torch.kron on CPU
    oracle = dense_compact_penalty if storage == "compact" else hand_penalty
    want = oracle(params, prior, 0.5)
    want.backward()
    want_grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    assert pen.dtype == torch.float32 and pen.device.type == "cuda"
    assert abs(float(pen.detach()) - float(want.detach())) <= 1e-4 * float(want.detach())
    for n, p in gpu.named_parameters():
        if n in want_grads:
            assert _rel(p.grad, want_grads[n]) < 1e-4, n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", ["kfac", "diag"])
def test_autocast_on_cuda_gives_float32_factors_close_to_float32(shape: str, dtype: torch.dtype) -> None:
    model = _model().cuda()
    ref = estimate_fisher(model, _batches("cuda"), shape=shape, fisher_type="empirical", progress=False)
    amp = estimate_fisher(model, _batches("cuda"), shape=shape, fisher_type="empirical", autocast_dtype=dtype,
                          progress=False)
    tol_a, tol_g = (0.03, 0.1) if dtype == torch.bfloat16 else (0.005, 0.02)
    g_scale = max((float(b.G.abs().max()) for b in ref.kfac.values()), default=0.0)
    for name, block in ref.kfac.items():
        assert amp.kfac[name].A.dtype == amp.kfac[name].G.dtype == torch.float32
        assert torch.isfinite(amp.kfac[name].G).all(), name
        assert _rel(amp.kfac[name].A, block.A) < tol_a, name
        if float(block.G.abs().max()) < 1e-6 * g_scale:  # zero in exact arithmetic (the attention keys)
            continue
        assert _rel(amp.kfac[name].G, block.G) < tol_g, name
    scale = max(float(d.abs().max()) for d in ref.diag.values()) if ref.diag else 0.0
    for name, d in ref.diag.items():
        assert amp.diag[name].dtype == torch.float32
        if float(d.abs().max()) < 1e-9 * scale:  # zero in exact arithmetic (e.g. the attention key bias)
            continue
        assert _rel(amp.diag[name], d) < tol_g, name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_with_mixed_precision_on_cuda(tmp_path: Path, precision: str) -> None:
    """Task A under autocast, consolidation, then task B with the penalty, all on the GPU."""
    from hf_kfac.trainer import ContinualTrainer
    from hf_kfac.trainer_config import ContinualConfig

    def args(out: Path, steps: int) -> ContinualConfig:
        return ContinualConfig(output_dir=str(out), report_to="none", disable_tqdm=True, per_device_train_batch_size=4,
                               max_steps=steps, save_strategy="no", learning_rate=1e-3, logging_steps=1, seed=0,
                               penalty="kfac", penalty_lambda=10.0, fisher_type="empirical",
                               dataloader_num_workers=0, **{precision: True})

    rows_a = make_rows("seq", 16, seed=1, ragged=False)
    model = _model()
    trainer = ContinualTrainer(model=model, args=args(tmp_path / "a", 4), train_dataset=make_dataset("seq", 16, seed=1,
                                                                                                   ragged=False))
    trainer.train()
    assert next(model.parameters()).device.type == "cuda"
    assert trainer.accelerator.mixed_precision == precision
    trainer.consolidate(task_name="a")
    got = trainer.prior.slots[0].curvature
    # oracle: the estimator called directly on the trained model, same rows, same autocast
    batches = [{k: torch.tensor(v[i : i + 4]).cuda() for k, v in rows_a.items()} for i in range(0, 16, 4)]
    want = estimate_fisher(model, batches, shape="kfac", fisher_type="empirical",
                           autocast_dtype=torch.bfloat16 if precision == "bf16" else torch.float16, progress=False)
    for name, block in want.kfac.items():
        assert got.kfac[name].A.dtype == torch.float32
        assert _rel(got.kfac[name].A, block.A) < 1e-3, name
        assert _rel(got.kfac[name].G, block.G) < 1e-3, name
    trainer.save_model()

    model_b = BertForSequenceClassification.from_pretrained(tmp_path / "a").cuda()
    trainer_b = ContinualTrainer(model=model_b, args=args(tmp_path / "b", 6), prior=str(tmp_path / "a"),
                                 train_dataset=make_dataset("seq", 24, seed=2, ragged=False))
    out = trainer_b.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert all(torch.isfinite(p).all() for p in model_b.parameters())
    logged = [h["loss_penalty"] for h in trainer_b.state.log_history if "loss_penalty" in h]
    assert logged and logged[-1] > 0
    params = {n: p.detach().cpu() for n, p in model_b.named_parameters()}
    pen = float(trainer_b.penalty_value(model_b).detach())
    want_pen = float(hand_penalty(params, trainer_b.prior, 10.0))
    assert abs(pen - want_pen) <= 1e-3 * want_pen


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_step_gradient_under_mixed_precision_holds_lambda_penalty_gradient_once(tmp_path: Path, precision: str) -> None:
    """λF(θ − θ*) is added to p.grad after the backward pass; under fp16 the task gradient there is still
    multiplied by the GradScaler's scale S, so the penalty's must be too: p.grad / S = ∇L + λ∇P."""
    from trainer_fixtures import expected_gradient, make_model, make_prior, perturb, sgd_args
    from transformers import TrainerCallback

    from hf_kfac.trainer import ContinualTrainer

    base = make_model("seq")
    prior = make_prior(base, "seq")
    perturb(base)
    rows = make_rows("seq", 8)
    lam = 0.7
    want = expected_gradient(copy.deepcopy(base), "seq", rows, prior, lam)  # float32, CPU, autograd
    task_only = expected_gradient(copy.deepcopy(base), "seq", rows, None, lam)
    names = list(want)
    flat = lambda d: torch.cat([d[k].reshape(-1).float().cpu() for k in names])  # noqa: E731
    assert float((flat(want) - flat(task_only)).norm() / flat(want).norm()) > 0.1  # the penalty matters here
    seen: dict = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):  # noqa: ANN001, ANN003
            scaler = trainer.accelerator.scaler
            seen["scale"] = float(scaler.get_scale()) if scaler is not None else 1.0
            seen["grads"] = {n: p.grad.detach().float().cpu() / seen["scale"] for n, p in model.named_parameters()
                             if p.grad is not None}

    model = copy.deepcopy(base).cuda()
    trainer = ContinualTrainer(model=model, args=sgd_args(str(tmp_path), use_cpu=False, penalty_lambda=lam,
                                                          **{precision: True}),
                               train_dataset=make_dataset("seq", 8), prior=prior, callbacks=[Grab()])
    trainer.train()
    if precision == "fp16":
        assert seen["scale"] > 1.0  # the loss was scaled: the case this test is about
    got = seen["grads"]
    assert set(names) <= set(got)
    assert float((flat(got) - flat(want)).norm() / flat(want).norm()) < 2e-2
