"""``accumulation="merge"`` against dense weighted sums built by hand, with every task anchored elsewhere.

The claim (hf_kfac.prior module docstring): one slot anchored at the newest θ*_T (online EWC),
weight C = γ C_old + s_T, curvature (γ C_old F_old + s_T F_T) / C; diagonals add exactly, a
K-FAC layer becomes the nearest Kronecker product of the weighted sum, and a layer that is
K-FAC in one task and diagonal in another is merged as diagonals (diag(A ⊗ G) for the K-FAC
one). So the merged penalty is ½ λ (θ − θ*_T)ᵀ (Σ_t w_t F_t + C D) (θ − θ*_T) with
w_t = γ^{T−t} s_t: the tasks' curvatures summed, all centred at the newest anchor.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracles import column_major
from torch import nn

from hf_kfac import Curvature, KFACBlock, Prior

D_IN, D_OUT = 4, 3  # layer "0" (with bias): A is 5 x 5, G is 3 x 3; layer "2": 2 x 3, no bias


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_OUT), nn.Tanh(), nn.Linear(D_OUT, 2, bias=False))


def _random_psd(d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(d, d + 2, generator=g, dtype=torch.float64)
    return (x @ x.T / d).float()


def _move(model: nn.Module, seed: int, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _diag_penalty(theta: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], diag: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_p Σ_i d_pi (θ_pi − θ*_pi)², in float64."""
    return sum(((d.double()) * (theta[k].double() - anchor[k].double()) ** 2).sum() for k, d in diag.items())


def _kron_diag(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diag(A ⊗ G) over vec([W, b]) (columns stacked), reshaped to W [D_OUT, D_IN] and b [D_OUT]."""
    d = torch.kron(A.double(), G.double()).diagonal().reshape(D_IN + 1, D_OUT).T
    return d[:, :D_IN], d[:, D_IN]


def _check_value_and_gradient(prior: Prior, model: nn.Module, lam: float, oracle) -> None:
    params = dict(model.named_parameters())
    ours = prior.penalty(model, lam)
    ref = oracle(params)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-4, atol=1e-7)
    g_ours = torch.autograd.grad(ours, list(params.values()), allow_unused=True)
    g_ref = torch.autograd.grad(ref, list(params.values()), allow_unused=True)
    for name, a, b in zip(params, g_ours, g_ref):
        a = torch.zeros_like(params[name]) if a is None else a
        b = torch.zeros_like(params[name]) if b is None else b
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_merged_diagonals_sum_the_tasks_curvature_at_the_newest_anchor() -> None:
    """Three diagonal tasks, each anchored elsewhere, with decay and data-size weights and damping."""
    gamma, delta, lam, sizes = 0.6, 0.02, 1.3, [5, 7, 3]
    model = _model()
    g = torch.Generator().manual_seed(1)
    merged = Prior(shape="diag", accumulation="merge", task_weighting="data_size", decay=gamma, damping=delta)
    diags, anchors = [], []
    for t, n in enumerate(sizes):
        _move(model, 10 + t)
        d = {k: torch.rand(p.shape, generator=g) for k, p in model.named_parameters()}
        merged.add_task(model, Curvature(diag=d, n_examples=n), f"t{t}")
        diags.append(d)
        anchors.append(_params(model))
    _move(model, 20)
    T = len(sizes)
    w = [gamma ** (T - 1 - t) * n for t, n in enumerate(sizes)]  # γ² N1, γ N2, N3
    C = sum(w)
    assert merged.slot_weights() == pytest.approx([C])

    def summed(theta, anchor):
        total = sum(w[t] * _diag_penalty(theta, anchor, diags[t]) for t in range(T))
        return 0.5 * lam * (total + C * delta * sum(((theta[k].double() - anchor[k].double()) ** 2).sum() for k in theta))

    _check_value_and_gradient(merged, model, lam, lambda theta: summed(theta, anchors[-1]))
    # the test can tell the anchors apart: centred at the oldest anchor the penalty differs
    theta = _params(model)
    assert not math.isclose(float(summed(theta, anchors[-1])), float(summed(theta, anchors[0])), rel_tol=1e-2)
    # and the curvature is exactly the weighted sum: merged minus separate is affine in θ
    # (equal second differences), though their minima differ (the tasks' anchors differ)
    sep = Prior(shape="diag", accumulation="separate", task_weighting="data_size", decay=gamma, damping=delta)
    for t, n in enumerate(sizes):
        m = _model()
        with torch.no_grad():
            for k, p in m.named_parameters():
                p.copy_(anchors[t][k])
        sep.add_task(m, Curvature(diag=diags[t], n_examples=n), f"t{t}")
    h = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in theta.items()}

    def second_difference(prior: Prior) -> float:
        f = lambda s: float(prior.penalty({k: theta[k] + s * h[k] for k in theta}, lam))  # noqa: E731
        return f(1.0) + f(-1.0) - 2 * f(0.0)

    assert second_difference(merged) == pytest.approx(second_difference(sep), rel=1e-3)
    assert float(merged.penalty(theta, lam)) != pytest.approx(float(sep.penalty(theta, lam)), rel=1e-2)


@pytest.mark.parametrize("kfac_first", [True, False], ids=["kfac-then-diag", "diag-then-kfac"])
def test_layer_kfac_in_one_task_and_diagonal_in_the_other_merges_as_diagonals(kfac_first: bool) -> None:
    """Layer "0" is K-FAC in one task and diagonal in the other: merged as Σ w_t diag_t, diag(A ⊗ G) by torch.kron."""
    gamma, delta, lam, sizes = 0.8, 0.01, 0.9, [6, 2]
    model = _model()
    g = torch.Generator().manual_seed(2)
    A, G = _random_psd(D_IN + 1, g), _random_psd(D_OUT, g)
    kfac_task = Curvature(
        kfac={"0": KFACBlock(A, G, "0.weight", "0.bias")}, diag={"2.weight": torch.rand(2, D_OUT, generator=g)}, n_examples=0
    )
    diag_task = Curvature(diag={k: torch.rand(p.shape, generator=g) for k, p in model.named_parameters()}, n_examples=0)
    tasks = [kfac_task, diag_task] if kfac_first else [diag_task, kfac_task]
    prior = Prior(shape="kfac", accumulation="merge", task_weighting="data_size", decay=gamma, damping=delta)
    anchors = []
    for t, (curv, n) in enumerate(zip(tasks, sizes)):
        _move(model, 30 + t)
        prior.add_task(model, curv, f"t{t}", n_examples=n)
        anchors.append(_params(model))
    _move(model, 40)
    assert "0" not in prior.slots[0].curvature.kfac  # the mixed layer is now diagonal

    dw, db = _kron_diag(A, G)
    as_diag = {"0.weight": dw, "0.bias": db, "2.weight": kfac_task.diag["2.weight"].double()}
    diags = [as_diag, diag_task.diag] if kfac_first else [diag_task.diag, as_diag]
    w = [gamma * sizes[0], sizes[1]]
    C = sum(w)

    def oracle(theta):
        total = sum(w[t] * _diag_penalty(theta, anchors[-1], diags[t]) for t in range(2))
        damp = C * delta * sum(((theta[k].double() - anchors[-1][k].double()) ** 2).sum() for k in theta)
        return 0.5 * lam * (total + damp)

    _check_value_and_gradient(prior, model, lam, oracle)


def _nearest_kronecker_by_svd(M: torch.Tensor, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Van Loan & Pitsianis from the dense (m n) x (m n) matrix: rearrange M[i n + k, j n + l] = Σ A[i, j] G[k, l]
    into R[(i, j), (k, l)], take its top singular triple σ u vᵀ; returns A*, G* with A* ⊗ G* = σ U ⊗ V, A* PSD."""
    R = M.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)
    U, S, Vh = torch.linalg.svd(R)
    assert S[1] < 0.9 * S[0]  # a clear gap: the top pair is well defined
    a, gg = U[:, 0].reshape(m, m), Vh[0].reshape(n, n)
    if torch.trace(a) < 0:  # u vᵀ = (−u)(−v)ᵀ: choose the PSD sign
        a, gg = -a, -gg
    return a * S[0].sqrt(), gg * S[0].sqrt()


@pytest.mark.parametrize("delta", [0.0, 0.03], ids=["undamped", "damped"])
def test_merged_kfac_is_the_svd_nearest_kronecker_of_the_dense_weighted_sum(delta: float) -> None:
    """Two K-FAC tasks, anchored apart: the merged penalty is ½ λ vᵀ (K + C D(K / C)) v at the newest anchor,
    K the nearest Kronecker product of w₁ A₁ ⊗ G₁ + w₂ A₂ ⊗ G₂ (SVD of the rearranged dense sum), plus the
    exactly summed diagonal of layer "2"."""
    gamma, lam, sizes = 0.7, 1.1, [6, 2]
    m, n = D_IN + 1, D_OUT
    model = _model()
    g = torch.Generator().manual_seed(3)
    curvs, anchors = [], []
    prior = Prior(shape="kfac", accumulation="merge", task_weighting="data_size", decay=gamma, damping=delta)
    for t, size in enumerate(sizes):
        _move(model, 50 + t)
        c = Curvature(
            kfac={"0": KFACBlock(_random_psd(m, g), _random_psd(n, g), "0.weight", "0.bias")},
            diag={"2.weight": torch.rand(2, n, generator=g)},
            n_examples=size,
        )
        prior.add_task(model, c, f"t{t}")
        curvs.append(c)
        anchors.append(_params(model))
    _move(model, 60)
    w = [gamma * sizes[0], sizes[1]]
    C = sum(w)
    dense = sum(wt * torch.kron(c.kfac["0"].A.double(), c.kfac["0"].G.double()) for wt, c in zip(w, curvs))
    A_star, G_star = _nearest_kronecker_by_svd(dense, m, n)
    K = torch.kron(A_star, G_star)
    # the damping of the merged curvature F = K / C, as documented: δ I + √δ (π I ⊗ G + A ⊗ I / π)
    Fa, Fg = A_star / C, G_star
    pi = math.sqrt((Fa.trace().item() / m) / (Fg.trace().item() / n))
    D = delta * torch.eye(m * n, dtype=torch.float64) + math.sqrt(delta) * (
        pi * torch.kron(torch.eye(m, dtype=torch.float64), Fg) + torch.kron(Fa, torch.eye(n, dtype=torch.float64)) / pi
    )
    anchor = anchors[-1]

    def oracle(theta):
        v = column_major(theta["0.weight"] - anchor["0.weight"], theta["0.bias"] - anchor["0.bias"]).double()
        kfac = v @ (K + C * D) @ v
        d2 = sum(wt * c.diag["2.weight"].double() for wt, c in zip(w, curvs)) + C * delta
        diag = (d2 * (theta["2.weight"].double() - anchor["2.weight"].double()) ** 2).sum()
        return 0.5 * lam * (kfac + diag)

    _check_value_and_gradient(prior, model, lam, oracle)
    # the oracle is not the naive sum of factors (ΣA) ⊗ (ΣG): that one is measurably farther from the dense sum
    naive = torch.kron(sum(c.kfac["0"].A.double() for c in curvs), sum(c.kfac["0"].G.double() for c in curvs))
    naive = naive * (dense * naive).sum() / (naive * naive).sum()
    assert (dense - K).norm() < 0.99 * (dense - naive).norm()
