"""Containers for the curvature of one task: K-FAC blocks and diagonals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class KFACBlock:
    """Kronecker-factored Fisher of one ``nn.Linear``: F ≈ A ⊗ G.

    With W̃ = [W, b] (d_out × (d_in+1)) and ā = [a; 1], A = E[ā āᵀ] and G = E[g gᵀ],
    where g is the gradient of the log-likelihood w.r.t. the layer's output.
    The quadratic form is vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃) = ⟨ΔW̃, G ΔW̃ A⟩ (column-major vec).

    Attributes:
        A: Input factor, ``(d_in + has_bias, d_in + has_bias)``.
        G: Output-gradient factor, ``(d_out, d_out)``.
        weight: Name of the weight parameter.
        bias: Name of the bias parameter, or ``None``.
    """

    A: Tensor
    G: Tensor
    weight: str
    bias: str | None = None

    @property
    def in_features(self) -> int:
        """d_in (without the bias column)."""
        return self.A.shape[0] - (1 if self.bias is not None else 0)

    @property
    def out_features(self) -> int:
        """d_out."""
        return self.G.shape[0]

    def to(self, *args, **kwargs) -> "KFACBlock":
        """Move both factors (``Tensor.to`` arguments)."""
        return KFACBlock(self.A.to(*args, **kwargs), self.G.to(*args, **kwargs), self.weight, self.bias)

    def dense(self) -> Tensor:
        """The dense block A ⊗ G over vec(W̃) (column-major), for tests and small layers."""
        return torch.kron(self.A, self.G)

    def diagonal(self) -> tuple[Tensor, Tensor | None]:
        """diag(A ⊗ G) reshaped to the weight and the bias: d[i, j] = G_ii A_jj."""
        d = torch.outer(torch.diagonal(self.G), torch.diagonal(self.A))
        if self.bias is None:
            return d, None
        return d[:, :-1].contiguous(), d[:, -1].contiguous()


@dataclass
class Curvature:
    """The Fisher of one task: K-FAC blocks per Linear module, diagonals per parameter.

    Every trainable, non-excluded parameter appears exactly once: as the weight or
    bias of a block in ``kfac``, or as a key of ``diag``.

    Attributes:
        kfac: Module name -> :class:`KFACBlock`.
        diag: Parameter name -> diagonal of its Fisher, shaped like the parameter.
        n_examples: Number of examples N the Fisher is a mean over.
        diag_fallbacks: Module name -> why a Linear got a diagonal instead of K-FAC.
        fisher_config: The options it was estimated with (:func:`estimate_fisher` sets it; a
            curvature built by hand has none). A prior records them with the task.
    """

    kfac: dict[str, KFACBlock] = field(default_factory=dict)
    diag: dict[str, Tensor] = field(default_factory=dict)
    n_examples: int = 0
    diag_fallbacks: dict[str, str] = field(default_factory=dict)
    fisher_config: Any = None  # FisherConfig | None

    def param_names(self) -> list[str]:
        """Names of all parameters the curvature covers."""
        names = list(self.diag)
        for block in self.kfac.values():
            names.append(block.weight)
            if block.bias is not None:
                names.append(block.bias)
        return names

    def numel(self) -> int:
        """Number of stored curvature numbers."""
        n = sum(t.numel() for t in self.diag.values())
        return n + sum(b.A.numel() + b.G.numel() for b in self.kfac.values())

    def to(self, *args, **kwargs) -> "Curvature":
        """Move every tensor (``Tensor.to`` arguments)."""
        return Curvature(
            {k: b.to(*args, **kwargs) for k, b in self.kfac.items()},
            {k: t.to(*args, **kwargs) for k, t in self.diag.items()},
            self.n_examples,
            dict(self.diag_fallbacks),
            self.fisher_config,
        )

    def scaled(self, c: float) -> "Curvature":
        """The curvature times c (applied to G for K-FAC blocks)."""
        return Curvature(
            {k: KFACBlock(b.A, b.G * c, b.weight, b.bias) for k, b in self.kfac.items()},
            {k: t * c for k, t in self.diag.items()},
            self.n_examples,
            dict(self.diag_fallbacks),
            self.fisher_config,
        )

    def as_diagonal(self) -> "Curvature":
        """Every K-FAC block replaced by its exact diagonal, diag(A ⊗ G)."""
        diag = dict(self.diag)
        for block in self.kfac.values():
            dw, db = block.diagonal()
            diag[block.weight] = dw
            if block.bias is not None:
                diag[block.bias] = db
        return Curvature({}, diag, self.n_examples, dict(self.diag_fallbacks), self.fisher_config)
