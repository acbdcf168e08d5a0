"""The damped K-FAC penalty is the formula the docstrings state, checked against dense forms built by hand.

K-FAC damping is factored: (A + π√δ I) ⊗ (G + √δ/π I) with π² = (tr A / d_A) / (tr G / d_G), so
the curvature gains D = δ I + √δ (π I ⊗ G + A ⊗ I / π), not δ I; for A = a I, G = g I that is
(δ + 2√(δ a g)) I. Diagonal terms gain exactly δ.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracles import column_major
from torch import nn

from hf_kfac import Curvature, KFACBlock, Prior

D_IN, D_OUT = 4, 3  # layer "0": A is (D_IN + 1) x (D_IN + 1) with the bias, G is D_OUT x D_OUT


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_OUT), nn.Tanh(), nn.Linear(D_OUT, 2, bias=False))


def _random_psd(d: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(d, d + 2, generator=g, dtype=torch.float64)
    return (scale * x @ x.T / d).float()


def _move(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _prior(model: nn.Module, curv: Curvature, delta: float, compact: bool = False) -> Prior:
    opts = {"storage": {"format": "compact", "rank_fraction": 1.0, "eigenvector_dtype": "float32"}} if compact else {}
    prior = Prior(shape="kfac", task_weighting="uniform", damping=delta, **opts)
    prior.add_task(model, curv, "a")
    return prior


def test_isotropic_factors_gain_delta_plus_two_sqrt_delta_a_g() -> None:
    """A = a I, G = g I: the damped quadratic form is (a g + δ + 2√(δ a g)) ‖ΔW̃‖², a closed form."""
    a, g, delta, lam = 0.7, 2.3, 0.05, 1.3
    model = _model()
    curv = Curvature(kfac={"0": KFACBlock(a * torch.eye(D_IN + 1), g * torch.eye(D_OUT), "0.weight", "0.bias")},
                     diag={"2.weight": torch.zeros(2, D_OUT)}, n_examples=1)
    prior = _prior(model, curv, delta)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    _move(model, 1)
    p = dict(model.named_parameters())
    sq = ((p["0.weight"] - anchor["0.weight"]) ** 2).sum() + ((p["0.bias"] - anchor["0.bias"]) ** 2).sum()
    sq2 = ((p["2.weight"] - anchor["2.weight"]) ** 2).sum()
    expected = 0.5 * lam * ((a * g + delta + 2 * math.sqrt(delta * a * g)) * sq + delta * sq2)
    torch.testing.assert_close(prior.penalty(model, lam), expected.detach(), rtol=1e-5, atol=1e-7)
    # the old docstring's "about δ I" would be far off here: 2√(δ a g) ≈ 0.57 against δ = 0.05
    wrong = 0.5 * lam * ((a * g + delta) * sq + delta * sq2)
    assert not torch.allclose(prior.penalty(model, lam), wrong.detach(), rtol=1e-2)


@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (50.0, 0.02)], ids=["balanced", "lopsided"])
def test_damped_kfac_penalty_equals_dense_curvature_plus_stated_damping(compact: bool, scales) -> None:
    """½ λ vᵀ (A ⊗ G + δ I + √δ (π I ⊗ G + A ⊗ I / π)) v + ½ λ Σ (d + δ) Δθ², built with torch.kron."""
    delta, lam = 0.03, 0.8
    model = _model()
    gen = torch.Generator().manual_seed(5)
    A, G = _random_psd(D_IN + 1, gen, scales[0]), _random_psd(D_OUT, gen, scales[1])
    d = torch.rand(2, D_OUT, generator=gen)
    curv = Curvature(kfac={"0": KFACBlock(A, G, "0.weight", "0.bias")}, diag={"2.weight": d}, n_examples=1)
    prior = _prior(model, curv, delta, compact)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    _move(model, 6)

    A64, G64 = A.double(), G.double()
    pi = math.sqrt((A64.trace().item() / (D_IN + 1)) / (G64.trace().item() / D_OUT))
    I_a, I_g = torch.eye(D_IN + 1, dtype=torch.float64), torch.eye(D_OUT, dtype=torch.float64)
    dense = (
        torch.kron(A64, G64)
        + delta * torch.eye((D_IN + 1) * D_OUT, dtype=torch.float64)
        + math.sqrt(delta) * (pi * torch.kron(I_a, G64) + torch.kron(A64, I_g) / pi)
    )
    p = dict(model.named_parameters())
    v = column_major(p["0.weight"] - anchor["0.weight"], p["0.bias"] - anchor["0.bias"]).double()
    ref = 0.5 * lam * (v @ dense @ v + ((d.double() + delta) * (p["2.weight"] - anchor["2.weight"]).double() ** 2).sum())
    ours = prior.penalty(model, lam)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-4, atol=1e-7)
    for name, a, b in zip(p, torch.autograd.grad(ours, list(p.values())), torch.autograd.grad(ref, list(p.values()))):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
