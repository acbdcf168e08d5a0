"""Options of Fisher estimation, shared by the estimator, the prior and the trainer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..enums import FisherType, KFACApprox, Shape


@dataclass
class FisherConfig:
    """How to estimate the Fisher of one task.

    Attributes:
        shape: ``diag`` (EWC), ``kfac`` (A ⊗ G per Linear, diagonal elsewhere) or
            ``identity`` (no curvature: an L2 anchor).
        fisher_type: ``mc``, ``empirical`` or ``exact``.
        n_samples: Labels drawn per example for ``mc``.
        kfac_approx: ``expand`` or ``reduce`` for weights shared over positions.
        exclude: fnmatch patterns of module or parameter names left out of the prior.
        force_diag: fnmatch patterns of ``nn.Linear`` modules given a diagonal Fisher.
        max_factor_ratio: A Linear whose factors hold more than this many times the
            numbers of its weight, ((d_in+1)² + d_out²) / (d_out·(d_in+1)), gets a
            diagonal Fisher instead (a 20k-class head would need a 20k² G).
        max_batches: Stop after this many batches (``None``: the whole dataloader).
        seed: Seed of the label sampler for ``mc``, offset by the process rank.
    """

    shape: Shape | str = Shape.KFAC
    fisher_type: FisherType | str = FisherType.MC
    n_samples: int = 1
    kfac_approx: KFACApprox | str = KFACApprox.EXPAND
    exclude: list[str] = field(default_factory=list)
    force_diag: list[str] = field(default_factory=list)
    max_factor_ratio: float = 10.0
    max_batches: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.shape = Shape(self.shape)
        self.fisher_type = FisherType(self.fisher_type)
        self.kfac_approx = KFACApprox(self.kfac_approx)
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if isinstance(self.force_diag, str):
            self.force_diag = [self.force_diag]
        if not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {self.n_samples!r}.")
        if not self.max_factor_ratio > 0:
            raise ValueError(f"max_factor_ratio must be > 0, got {self.max_factor_ratio!r}.")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {self.max_batches!r}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the options."""
        d = asdict(self)
        for key in ("shape", "fisher_type", "kfac_approx"):
            d[key] = str(d[key])
        return d
