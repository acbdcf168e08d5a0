"""The penalty and its closed-form gradient against dense quadratic forms and autograd."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import column_major, tiny_bert_config
from torch import nn
from transformers import BertForSequenceClassification

from hf_kfac import Curvature, KFACBlock, Prior
from hf_kfac.prior import damp_factors, nearest_kronecker


def _random_psd(d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(d, d + 2, generator=g)
    return x @ x.T / d


def _linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2, bias=False))


def _curvature(model: nn.Module, g: torch.Generator, n: int = 10) -> Curvature:
    return Curvature(
        kfac={"0": KFACBlock(_random_psd(5, g), _random_psd(3, g), "0.weight", "0.bias")},
        diag={"2.weight": torch.rand(2, 3, generator=g)},
        n_examples=n,
    )


def _perturb(model: nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _dense_penalty(model: nn.Module, anchor: dict[str, torch.Tensor], curv: Curvature, lam: float, c: float) -> torch.Tensor:
    """½ λ c [vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃) + Σ d Δθ²], built with torch.kron, differentiable by autograd."""
    params = dict(model.named_parameters())
    total = torch.zeros(())
    for block in curv.kfac.values():
        dw = params[block.weight] - anchor[block.weight]
        db = params[block.bias] - anchor[block.bias] if block.bias else None
        v = column_major(dw, db)
        total = total + v @ torch.kron(block.A, block.G) @ v
    for name, d in curv.diag.items():
        total = total + (d * (params[name] - anchor[name]) ** 2).sum()
    return 0.5 * lam * c * total


def _kfac_prior_off_its_anchor() -> tuple[nn.Module, Curvature, Prior, dict[str, torch.Tensor]]:
    """A one-task K-FAC prior of ``_linear_model``, the model then moved off the anchor (returned too)."""
    model = _linear_model()
    curv = _curvature(model, torch.Generator().manual_seed(1))
    prior = Prior(shape="kfac", task_weighting="uniform")
    prior.add_task(model, curv, "a")
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    _perturb(model, 0.3, 2)
    return model, curv, prior, anchor


def test_kfac_penalty_and_gradient_match_dense_quadratic_form_and_autograd() -> None:
    model, curv, prior, anchor = _kfac_prior_off_its_anchor()
    lam = 1.7
    ours = prior.penalty(model, lam)
    grads = torch.autograd.grad(ours, list(model.parameters()))
    ref = _dense_penalty(model, anchor, curv, lam, 1.0)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_penalty_is_zero_with_zero_gradient_at_the_anchor() -> None:
    model = _linear_model()
    prior = Prior(shape="kfac")
    prior.add_task(model, _curvature(model, torch.Generator().manual_seed(0)), "a")
    pen = prior.penalty(model, 3.0)
    assert pen.item() == 0.0
    pen.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("compact", [False, True])
def test_penalty_stays_exact_across_lambda_changes_loss_scaling_and_returns_to_the_anchor(compact: bool) -> None:
    """λ rides in the cached terms and the zero-Δ skip is checked only until the weights move: the value
    and gradient must still equal the dense form for a new λ, a rescaled loss, and back at the anchor."""
    model = _linear_model()
    curv = _curvature(model, torch.Generator().manual_seed(3))
    opts = {"storage": {"format": "compact", "rank_fraction": 1.0, "eigenvector_dtype": "float32"}} if compact else {}
    prior = Prior(shape="kfac", task_weighting="uniform", **opts)
    prior.add_task(model, curv, "a")
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert prior.penalty(model, 2.0).item() == 0.0  # at the anchor: every term skipped
    for step, (lam, loss_scale) in enumerate([(2.0, 1.0), (2.0, 0.25), (5.0, 1.0), (5.0, 3.0)]):
        _perturb(model, 0.2, 10 + step)
        ours = loss_scale * prior.penalty(model, lam)
        grads = torch.autograd.grad(ours, list(model.parameters()))
        ref = loss_scale * _dense_penalty(model, anchor, curv, lam, 1.0)
        ref_grads = torch.autograd.grad(ref, list(model.parameters()))
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(anchor[k])
    back = prior.penalty(model, 5.0)
    assert back.item() == 0.0
    assert all(not g.any() for g in torch.autograd.grad(back, list(model.parameters()), allow_unused=True) if g is not None)


def test_separate_sums_tasks_with_data_weights_and_decay() -> None:
    model = _linear_model()
    g = torch.Generator().manual_seed(3)
    prior = Prior(shape="kfac", accumulation="separate", decay=0.5, task_weighting="data_size")
    c1, c2 = _curvature(model, g, n=10), _curvature(model, g, n=4)
    prior.add_task(model, c1, "a")
    a1 = {k: v.detach().clone() for k, v in model.named_parameters()}
    _perturb(model, 0.2, 4)
    prior.add_task(model, c2, "b")
    a2 = {k: v.detach().clone() for k, v in model.named_parameters()}
    _perturb(model, 0.2, 5)
    lam = 0.9
    ours = prior.penalty(model, lam)
    ref = _dense_penalty(model, a1, c1, lam, 10 * 0.5) + _dense_penalty(model, a2, c2, lam, 4.0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    g_ours = torch.autograd.grad(ours, list(model.parameters()))
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_damping_adds_pi_scaled_identity_to_each_factor() -> None:
    model = _linear_model()
    g = torch.Generator().manual_seed(6)
    curv = _curvature(model, g)
    delta = 0.05
    prior = Prior(shape="kfac", task_weighting="uniform", damping=delta)
    prior.add_task(model, curv, "a")
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    _perturb(model, 0.3, 7)
    A, G = curv.kfac["0"].A, curv.kfac["0"].G
    pi = math.sqrt((A.trace() / 5) / (G.trace() / 3))
    damped = Curvature(
        kfac={"0": KFACBlock(A + pi * math.sqrt(delta) * torch.eye(5), G + math.sqrt(delta) / pi * torch.eye(3), "0.weight", "0.bias")},
        diag={"2.weight": curv.diag["2.weight"] + delta},
    )
    torch.testing.assert_close(prior.penalty(model, 1.0), _dense_penalty(model, anchor, damped, 1.0, 1.0), rtol=1e-5, atol=1e-7)
    Ad, Gd = damp_factors(A, G, delta)
    torch.testing.assert_close(Ad, damped.kfac["0"].A)


def test_nearest_kronecker_matches_svd_of_rearranged_sum() -> None:
    g = torch.Generator().manual_seed(8)
    terms = [(2.0, _random_psd(3, g), _random_psd(4, g)), (0.5, _random_psd(3, g), _random_psd(4, g))]
    A, G = nearest_kronecker(terms)
    # Van Loan rearrangement: R = Σ c vec(A) vec(G)ᵀ; best rank one = σ u vᵀ
    R = sum(c * torch.outer(a.reshape(-1), gg.reshape(-1)) for c, a, gg in terms).double()
    U, S, Vh = torch.linalg.svd(R)
    best = S[0] * torch.kron(U[:, 0].reshape(3, 3), Vh[0].reshape(4, 4))
    torch.testing.assert_close(torch.kron(A, G).double(), best, rtol=1e-4, atol=1e-6)
    # it beats the plain sum of factors, scaled optimally
    S_dense = sum(c * torch.kron(a, gg) for c, a, gg in terms)
    naive = torch.kron(sum(t[1] for t in terms), sum(t[2] for t in terms))
    naive = naive * (S_dense * naive).sum() / (naive * naive).sum()
    assert (S_dense - torch.kron(A, G)).norm() <= (S_dense - naive).norm() + 1e-6
    # and it is positive semi-definite
    assert torch.linalg.eigvalsh(torch.kron(A, G)).min() > -1e-5


def test_merge_is_exact_for_diagonals_and_constant_in_storage() -> None:
    model = _linear_model()
    g = torch.Generator().manual_seed(9)
    merged = Prior(shape="diag", accumulation="merge", task_weighting="data_size", decay=0.8)
    sep = Prior(shape="diag", accumulation="separate", task_weighting="data_size", decay=0.8)
    sizes = []
    for t, n in enumerate([5, 7, 3]):
        d = Curvature(diag={k: torch.rand(p.shape, generator=g) for k, p in model.named_parameters()}, n_examples=n)
        merged.add_task(model, d, f"t{t}")
        sep.add_task(model, d, f"t{t}")
        sizes.append(merged.numel())
    assert len(set(sizes)) == 1 and len(merged.slots) == 1
    # with every task anchored at the same point, merging diagonals is exact
    _perturb(model, 0.4, 10)
    torch.testing.assert_close(merged.penalty(model, 1.3), sep.penalty(model, 1.3), rtol=1e-5, atol=1e-7)


def test_merge_kfac_equals_nearest_kronecker_of_weighted_sum() -> None:
    model = _linear_model()
    g = torch.Generator().manual_seed(11)
    prior = Prior(shape="kfac", accumulation="merge", task_weighting="data_size")
    c1, c2 = _curvature(model, g, n=6), _curvature(model, g, n=2)
    prior.add_task(model, c1, "a")
    prior.add_task(model, c2, "b")
    block = prior.slots[0].curvature.kfac["0"]
    A, G = nearest_kronecker([(6 / 8, c1.kfac["0"].A, c1.kfac["0"].G), (2 / 8, c2.kfac["0"].A, c2.kfac["0"].G)])
    torch.testing.assert_close(torch.kron(block.A, block.G * prior.slot_weights()[0]), torch.kron(A, G) * 8)


@pytest.mark.parametrize("lam", [-1.0, float("nan"), float("inf"), True, "1"])
def test_lambda_must_be_a_finite_non_negative_float(lam: object) -> None:
    model = _linear_model()
    prior = Prior(shape="kfac")
    prior.add_task(model, _curvature(model, torch.Generator().manual_seed(0)), "a")
    with pytest.raises(ValueError, match="λ"):
        prior.penalty(model, lam)  # type: ignore[arg-type]


def test_identity_prior_is_plain_l2() -> None:
    model = _linear_model()
    prior = Prior(shape="identity", task_weighting="uniform")
    prior.add_task(model, None, "a")
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    _perturb(model, 0.1, 12)
    ref = 0.5 * 2.0 * sum(((p - anchor[k]) ** 2).sum() for k, p in model.named_parameters())
    torch.testing.assert_close(prior.penalty(model, 2.0), ref)


@pytest.mark.parametrize("shape", ["diag", "identity"])
def test_large_diagonal_terms_taken_in_pieces_match_autograd_of_the_plain_sum(shape: str) -> None:
    """A parameter over DIAG_CHUNK elements (an embedding) is penalised piece by piece on CPU, with a
    ragged last piece; value and gradient must equal autograd of ½ λ Σ d Δθ², and a single moved row
    must be seen."""
    from hf_kfac.penalty import DIAG_CHUNK

    emb = nn.Embedding(DIAG_CHUNK // 100 + 77, 100)
    assert emb.weight.numel() > DIAG_CHUNK and emb.weight.numel() % DIAG_CHUNK != 0
    g = torch.Generator().manual_seed(4)
    d = torch.rand(emb.weight.shape, generator=g)
    prior = Prior(shape=shape, task_weighting="uniform")
    prior.add_task(emb, Curvature(diag={"weight": d}, n_examples=1) if shape == "diag" else None, "a")
    anchor = emb.weight.detach().clone()
    scale = d if shape == "diag" else torch.ones(())
    assert prior.penalty(emb, 2.0).item() == 0.0
    with torch.no_grad():
        emb.weight[-1].add_(0.5)  # one row of the last piece moves
    for _ in range(2):
        ours = prior.penalty(emb, 2.0)
        (grad,) = torch.autograd.grad(ours, [emb.weight])
        ref = 0.5 * 2.0 * (scale.double() * (emb.weight.double() - anchor.double()) ** 2).sum()
        (ref_grad,) = torch.autograd.grad(ref, [emb.weight])
        torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-5, atol=1e-8)
        assert ours.item() > 0
        _perturb(emb, 0.1, 13)


def test_penalty_on_bert_from_estimated_fisher_matches_dense_form() -> None:
    from hf_kfac import estimate_fisher

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    ids = torch.randint(1, 40, (6, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (6,))}
    curv = estimate_fisher(model, [batch], shape="kfac", fisher_type="empirical", progress=False)
    prior = Prior(shape="kfac", task_weighting="uniform")
    prior.add_task(model, curv, "a")
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    _perturb(model, 0.05, 13)
    ours = prior.penalty(model, 1.0)
    ref = _dense_penalty(model, anchor, curv, 1.0, 1.0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-8)
    names = [n for n, _ in model.named_parameters()]
    for n, a, b in zip(names, torch.autograd.grad(ours, list(model.parameters()), allow_unused=True), torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)):
        if b is None:
            assert a is None or not a.any(), n
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8, msg=n)


def test_value_and_grads_without_a_graph_equal_the_dense_form_and_its_autograd_gradient() -> None:
    """The route ContinualTrainer takes (λF(θ − θ*) added to p.grad) gives the dense form's value and gradient."""
    model, curv, prior, anchor = _kfac_prior_off_its_anchor()
    lam = 1.7
    value, grads = prior.penalty_terms("cpu", lam).value_and_grads(model)
    assert value.grad_fn is None and all(v.grad_fn is None for v in grads.values())
    ref = _dense_penalty(model, anchor, curv, lam, 1.0)
    ref_grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(ref, list(model.parameters()))))
    torch.testing.assert_close(value, ref.detach(), rtol=1e-5, atol=1e-7)
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-7, msg=name)


def test_a_graph_kept_with_retain_graph_gives_the_same_penalty_gradient_twice() -> None:
    model, _, prior, _ = _kfac_prior_off_its_anchor()
    pen = 3.0 * prior.penalty(model, 1.7)  # a scaled loss: the backward scales the gradients
    first = torch.autograd.grad(pen, list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(pen, list(model.parameters()))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_parameter_whose_shape_changed_since_the_prior_is_refused_naming_both_shapes() -> None:
    """A diagonal term would otherwise compare the first numel entries of the flat tensors and return a number."""
    model = _linear_model()
    prior = Prior(shape="diag")
    prior.add_task(model, Curvature(diag={n: torch.ones_like(p) for n, p in model.named_parameters()}, n_examples=4), "a")
    grown = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 5, bias=False))
    with pytest.raises(ValueError, match=r"'2.weight' has shape \[5, 3\] in the model but \[2, 3\] in the prior"):
        prior.penalty(dict(grown.named_parameters()), 1.0)


def test_a_compiled_models_prefixed_names_are_named_as_such() -> None:
    model = _linear_model()
    prior = Prior(shape="diag")
    prior.add_task(model, Curvature(diag={n: torch.ones_like(p) for n, p in model.named_parameters()}, n_examples=4), "a")
    prefixed = {f"_orig_mod.{n}": p for n, p in model.named_parameters()}
    with pytest.raises(KeyError, match=r"start with '_orig_mod\.': pass the unwrapped model"):
        prior.penalty(prefixed, 1.0)
