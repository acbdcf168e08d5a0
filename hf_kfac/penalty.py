"""The quadratic penalty ½ λ Σ_terms (θ − θ*)ᵀ F (θ − θ*), with a closed-form gradient.

Back-propagating through the quadratic form would build a graph of the matmuls at every
training step. Instead :class:`QuadraticPenalty` computes, once per step and without a
graph, M = ∂/∂θ ½ΔᵀFΔ = FΔ for every term (G̃ ΔW̃ Ã for a K-FAC block: two matmuls,
or four thin ones for compact factors, see :class:`FactorOp`) and the value ½⟨Δ, M⟩, and
returns λ·M as the gradient in backward. Terms whose Δ is exactly zero (the first step
after consolidation) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def _delta(w: Tensor, b: Tensor | None, anchor: Tensor) -> Tensor:
    """ΔW̃ = [W − W*, b − b*] in float32 (one pass: the differences are written into place)."""
    if b is None:
        return w.detach().float() - anchor
    out = torch.empty(anchor.shape, dtype=torch.float32, device=anchor.device)
    torch.sub(w.detach().float(), anchor[:, :-1], out=out[:, :-1])
    torch.sub(b.detach().float(), anchor[:, -1], out=out[:, -1])
    return out


class _SkipWhileStill:
    """Skips a term while its Δ is exactly zero (the first step after consolidation).

    The check costs a pass over Δ and a sync, so it is made only until Δ is first nonzero:
    afterwards the weights have moved and stay off the anchor in practice (and a zero Δ
    would give the right value and gradient, 0, anyway).
    """

    moved: bool = False

    def still(self, delta: Tensor) -> bool:
        if self.moved:
            return False
        if not torch.any(delta):
            return True
        self.moved = True
        return False


def _split(m: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    if not has_bias:
        return m, None
    return m[:, :-1], m[:, -1]


@dataclass
class KFACTerm(_SkipWhileStill):
    """½ ⟨ΔW̃, G ΔW̃ A⟩ for one Linear, with ΔW̃ = [W − W*, b − b*] (weights folded into G)."""

    weight: str
    bias: str | None
    anchor: Tensor  # (d_out, d_in + has_bias)
    A: Tensor
    G: Tensor

    def apply(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """Return (value, ∂/∂W, ∂/∂b), or None when ΔW̃ = 0."""
        delta = _delta(w, b, self.anchor)
        if self.still(delta):
            return None
        m = self.G @ (delta @ self.A)
        value = 0.5 * torch.dot(delta.reshape(-1), m.reshape(-1))
        return (value, *_split(m, b is not None))


@dataclass
class FactorOp:
    """A Kronecker factor F = U diag(w) Uᵀ + diag(r) (low rank) or a dense matrix, applied to ΔW̃.

    Exactly one of ``dense`` and ``(U, w, r)`` is set. Applying the low-rank form to a
    d_out × d_in matrix costs 4·d_out·d_in·k flops against 2·d_out·d_in·d for the dense one.
    The matrix products run in the dtype of ``U`` (or ``dense``): float32, or bfloat16 where
    the hardware has fast bf16 products (inputs are rounded to bf16, products accumulate in
    float32, the diagonal part and the result stay float32).
    """

    dense: Tensor | None = None
    U: Tensor | None = None
    w: Tensor | None = None
    r: Tensor | None = None

    @property
    def _lowp(self) -> bool:
        return (self.dense if self.dense is not None else self.U).dtype != torch.float32

    def right(self, x: Tensor) -> Tensor:
        """x F (F acts on rows: the input side)."""
        if self.dense is not None:
            return (x.to(self.dense.dtype) @ self.dense).float() if self._lowp else x @ self.dense
        if not self._lowp:
            return torch.addmm(x * self.r, (x @ self.U) * self.w, self.U.T)
        p = (x.to(self.U.dtype) @ self.U).float().mul_(self.w).to(self.U.dtype)
        return (p @ self.U.T).float().addcmul_(x, self.r)

    def left(self, x: Tensor) -> Tensor:
        """F x (F acts on columns: the output side)."""
        if self.dense is not None:
            return (self.dense @ x.to(self.dense.dtype)).float() if self._lowp else self.dense @ x
        if not self._lowp:
            return torch.addmm(x * self.r.unsqueeze(1), self.U, (self.U.T @ x) * self.w.unsqueeze(1))
        p = (self.U.T @ x.to(self.U.dtype)).float().mul_(self.w.unsqueeze(1)).to(self.U.dtype)
        return (self.U @ p).float().addcmul_(x, self.r.unsqueeze(1))

    def scaled(self, c: float) -> "FactorOp":
        if self.dense is not None:
            return FactorOp(dense=self.dense * c)
        return FactorOp(U=self.U, w=self.w * c, r=self.r * c)


@dataclass
class CompactKFACTerm(_SkipWhileStill):
    """½ ⟨ΔW̃, G̃ ΔW̃ Ã⟩ with factors in compact (low rank + diagonal) or dense form."""

    weight: str
    bias: str | None
    anchor: Tensor
    A: FactorOp
    G: FactorOp

    def apply(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None] | None:
        delta = _delta(w, b, self.anchor)
        if self.still(delta):
            return None
        m = self.G.left(self.A.right(delta))
        value = 0.5 * torch.dot(delta.reshape(-1), m.reshape(-1))
        return (value, *_split(m, b is not None))


# Elements per piece of a diagonal term on CPU (2 MiB of float32): Δ, d⊙Δ and their dot product
# are formed piece by piece while the piece is still in cache, instead of in three whole-tensor
# passes. It halves the cost of the word-embedding term (30522 × 384 in MiniLM). On accelerators
# a term is one piece (one kernel per op, no host sync per piece).
DIAG_CHUNK = 1 << 19


@dataclass
class DiagTerm(_SkipWhileStill):
    """½ Σ d ⊙ (θ − θ*)² for one parameter (d may be a scalar for an L2 term)."""

    param: str
    anchor: Tensor
    d: Tensor

    def apply(self, p: Tensor) -> tuple[Tensor, Tensor] | None:
        """Return (value, ∂/∂θ = d ⊙ Δθ), or None when Δθ = 0.

        Memory traffic: one read of θ, θ* and d and one write of the gradient (see DIAG_CHUNK).
        """
        n = self.anchor.numel()
        step = DIAG_CHUNK if p.device.type == "cpu" else max(n, 1)
        dev = self.anchor.device
        flat_p, flat_a = p.detach().reshape(-1), self.anchor.reshape(-1)
        flat_d = self.d.reshape(-1) if self.d.dim() else self.d
        m = torch.empty(self.anchor.shape, dtype=torch.float32, device=dev)
        flat_m = m.view(-1)
        buf = torch.empty(min(step, n), dtype=torch.float32, device=dev)
        value = torch.zeros((), dtype=torch.float32, device=dev)
        for s in range(0, n, step):
            e = min(s + step, n)
            delta = buf[: e - s]
            torch.sub(flat_p[s:e], flat_a[s:e], out=delta)
            self.still(delta)  # records the first nonzero piece; no check once moved
            torch.mul(flat_d[s:e] if self.d.dim() else flat_d, delta, out=flat_m[s:e])
            value += torch.dot(delta, flat_m[s:e])
        if not self.moved:
            return None
        return 0.5 * value, m


class _PenaltyFunction(torch.autograd.Function):
    """value = λ Σ ½⟨Δ, FΔ⟩; backward returns λ F Δ per parameter, computed in forward."""

    @staticmethod
    def forward(ctx, lam: float, terms: "QuadraticPenalty", names: list[str], *params: Tensor) -> Tensor:  # type: ignore[override]
        value, grads = terms.evaluate(dict(zip(names, params)))
        ctx.lam = lam
        ctx.names = names
        ctx.dtypes = [p.dtype for p in params]
        ctx.grads = grads
        return value * lam

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        out = []
        scale = grad_out * ctx.lam
        # the usual case (λ folded into the terms, loss not rescaled): no pass over the gradients
        unit = scale.device.type == "cpu" and float(scale) == 1.0
        for name, dtype in zip(ctx.names, ctx.dtypes):
            g = ctx.grads.get(name)
            # out of place: a graph kept with retain_graph=True may be run backward again
            out.append(None if g is None else (g if unit else g * scale).to(dtype))
        return (None, None, None, *out)


class QuadraticPenalty:
    """A prepared set of penalty terms on one device; call it with the model's parameters."""

    def __init__(self, kfac: list[KFACTerm | CompactKFACTerm], diag: list[DiagTerm]) -> None:
        self.kfac = kfac
        self.diag = diag
        names: list[str] = []
        shapes: dict[str, tuple[int, ...]] = {}
        for t in kfac:
            names.append(t.weight)
            d_out, d_in = t.anchor.shape
            shapes[t.weight] = (d_out, d_in - (t.bias is not None))
            if t.bias is not None:
                names.append(t.bias)
                shapes[t.bias] = (d_out,)
        for t in diag:
            names.append(t.param)
            shapes[t.param] = tuple(t.anchor.shape)
        self.names = list(dict.fromkeys(names))
        self.shapes = shapes

    def _check(self, params: dict[str, Tensor]) -> None:
        """Every covered parameter exists in ``params`` with the shape the prior's anchor holds it in."""
        missing = [n for n in self.names if n not in params]
        if missing:
            prefixes = [p for p in ("_orig_mod.", "module.") if any(k.startswith(p) for k in params)]
            hint = (
                f" The model's parameter names start with {prefixes[0]!r}: pass the unwrapped model "
                "(`model._orig_mod` for torch.compile, `model.module` for DDP, or accelerator.unwrap_model(model))."
                if prefixes
                else " Was the prior made for another architecture?"
            )
            raise KeyError(
                f"the prior covers parameter {missing[0]!r}, which the model does not have "
                f"({len(missing)} missing in all).{hint}"
            )
        for n in self.names:
            if tuple(params[n].shape) != self.shapes[n]:
                raise ValueError(
                    f"parameter {n!r} has shape {list(params[n].shape)} in the model but {list(self.shapes[n])} in "
                    "the prior: the prior was made for a model with another layer size (a head with another number "
                    "of labels, a resized vocabulary). Give a changed layer a new name, or start a new prior."
                )

    def evaluate(self, params: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """(Σ ½⟨Δ, FΔ⟩, {name: FΔ}) in float32, without a graph; terms with Δ = 0 are left out."""
        grads: dict[str, Tensor] = {}
        first = next(iter(params.values()), None)
        value = torch.zeros((), dtype=torch.float32, device=first.device if first is not None else None)

        def add(name: str, g: Tensor) -> None:
            grads[name] = grads[name] + g if name in grads else g

        with torch.no_grad():
            for t in self.kfac:
                res = t.apply(params[t.weight], params[t.bias] if t.bias is not None else None)
                if res is None:
                    continue
                v, gw, gb = res
                value = value + v
                add(t.weight, gw)
                if gb is not None and t.bias is not None:
                    add(t.bias, gb)
            for t in self.diag:
                res = t.apply(params[t.param])
                if res is None:
                    continue
                v, g = res
                value = value + v
                add(t.param, g)
        return value, grads

    def value_and_grads(self, params: dict[str, Tensor] | nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
        """½ Σ (θ − θ*)ᵀ F (θ − θ*) and its gradient F (θ − θ*) per parameter, float32, with no graph.

        For a training loop that adds the gradient to ``p.grad`` itself (ContinualTrainer does, after
        the task loss's backward, so that data-parallel wrappers never see the penalty).
        """
        if isinstance(params, nn.Module):
            params = dict(params.named_parameters())
        self._check(params)
        with torch.autocast(device_type=next(iter(params.values())).device.type if params else "cpu", enabled=False):
            return self.evaluate({n: params[n] for n in self.names})

    def __call__(self, params: dict[str, Tensor] | nn.Module, lam: float) -> Tensor:
        """½ λ Σ (θ − θ*)ᵀ F (θ − θ*) with its closed-form gradient attached."""
        if isinstance(params, nn.Module):
            params = dict(params.named_parameters())
        self._check(params)
        tensors = [params[n] for n in self.names]
        if not tensors:
            return torch.zeros(())
        # The prior is float32 and ΔW is a small difference: an enclosing autocast region (a custom
        # loop, accelerator.autocast()) must not run these products in bf16/fp16.
        with torch.autocast(device_type=tensors[0].device.type, enabled=False):
            return _PenaltyFunction.apply(float(lam), self, self.names, *tensors)
