"""The quadratic penalty ½ λ Σ_terms (θ − θ*)ᵀ F (θ − θ*), with a closed-form gradient.

Back-propagating through the quadratic form would build a graph of the matmuls at every
training step. Instead :class:`QuadraticPenalty` computes, once per step and without a
graph, M = ∂/∂θ ½ΔᵀFΔ = FΔ for every term (G̃ ΔW̃ Ã for a K-FAC block: two matmuls)
and the value ½⟨Δ, M⟩, and returns λ·M as the gradient in backward. Terms whose Δ is
exactly zero (the first step after consolidation) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class KFACTerm:
    """½ ⟨ΔW̃, G ΔW̃ A⟩ for one Linear, with ΔW̃ = [W − W*, b − b*] (weights folded into G)."""

    weight: str
    bias: str | None
    anchor: Tensor  # (d_out, d_in + has_bias)
    A: Tensor
    G: Tensor

    def apply(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """Return (value, ∂/∂W, ∂/∂b), or None when ΔW̃ = 0."""
        wt = w.detach().float()
        if b is not None:
            wt = torch.cat([wt, b.detach().float().unsqueeze(1)], dim=1)
        delta = wt - self.anchor
        if not torch.any(delta):
            return None
        m = self.G @ delta @ self.A
        value = 0.5 * torch.sum(delta * m)
        if b is None:
            return value, m, None
        return value, m[:, :-1], m[:, -1]


@dataclass
class DiagTerm:
    """½ Σ d ⊙ (θ − θ*)² for one parameter (d may be a scalar for an L2 term)."""

    param: str
    anchor: Tensor
    d: Tensor

    def apply(self, p: Tensor) -> tuple[Tensor, Tensor] | None:
        """Return (value, ∂/∂θ), or None when Δθ = 0."""
        delta = p.detach().float() - self.anchor
        if not torch.any(delta):
            return None
        m = self.d * delta
        return 0.5 * torch.sum(delta * m), m


class _PenaltyFunction(torch.autograd.Function):
    """value = λ Σ ½⟨Δ, FΔ⟩; backward returns λ F Δ per parameter, computed in forward."""

    @staticmethod
    def forward(ctx, lam: float, terms: "QuadraticPenalty", names: list[str], *params: Tensor) -> Tensor:  # type: ignore[override]
        by_name = dict(zip(names, params))
        grads: dict[str, Tensor] = {}
        value = torch.zeros((), dtype=torch.float32, device=params[0].device if params else None)

        def add(name: str, g: Tensor) -> None:
            grads[name] = grads[name] + g if name in grads else g

        for t in terms.kfac:
            res = t.apply(by_name[t.weight], by_name[t.bias] if t.bias is not None else None)
            if res is None:
                continue
            v, gw, gb = res
            value = value + v
            add(t.weight, gw)
            if gb is not None and t.bias is not None:
                add(t.bias, gb)
        for t in terms.diag:
            res = t.apply(by_name[t.param])
            if res is None:
                continue
            v, g = res
            value = value + v
            add(t.param, g)
        ctx.lam = lam
        ctx.names = names
        ctx.dtypes = [p.dtype for p in params]
        ctx.grads = grads
        return value * lam

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        out = []
        for name, dtype in zip(ctx.names, ctx.dtypes):
            g = ctx.grads.get(name)
            out.append(None if g is None else (grad_out * ctx.lam * g).to(dtype))
        ctx.grads = None
        return (None, None, None, *out)


class QuadraticPenalty:
    """A prepared set of penalty terms on one device; call it with the model's parameters."""

    def __init__(self, kfac: list[KFACTerm], diag: list[DiagTerm]) -> None:
        self.kfac = kfac
        self.diag = diag
        names: list[str] = []
        for t in kfac:
            names.append(t.weight)
            if t.bias is not None:
                names.append(t.bias)
        names += [t.param for t in diag]
        self.names = list(dict.fromkeys(names))

    def __call__(self, params: dict[str, Tensor] | nn.Module, lam: float) -> Tensor:
        """½ λ Σ (θ − θ*)ᵀ F (θ − θ*) with its closed-form gradient attached."""
        if isinstance(params, nn.Module):
            params = dict(params.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(
                f"the prior covers parameter {missing[0]!r}, which the model does not have "
                f"({len(missing)} missing in all). Was the prior made for another architecture?"
            )
        tensors = [params[n] for n in self.names]
        if not tensors:
            return torch.zeros(())
        return _PenaltyFunction.apply(float(lam), self, self.names, *tensors)
