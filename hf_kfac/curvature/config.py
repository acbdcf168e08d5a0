"""Options of Fisher estimation, shared by the estimator, the prior and the trainer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..enums import FisherType, KFACApprox, Shape


def _is_int(x: Any) -> bool:
    """An integer, not a bool (``True`` would pass ``isinstance(x, int)``)."""
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class FisherConfig:
    """How to estimate the Fisher of one task.

    Attributes:
        shape: ``diag`` (EWC), ``kfac`` (A ⊗ G per Linear, diagonal elsewhere) or
            ``identity`` (no curvature: an L2 anchor).
        fisher_type: ``mc``, ``empirical`` or ``exact``.
        n_samples: Labels drawn per example for ``mc``.
        kfac_approx: ``expand`` or ``reduce`` for weights shared over positions.
        exclude: fnmatch patterns of module or parameter names left out of the prior (a module's
            pattern covers everything inside it: ``"bert.embeddings"``).
        force_diag: fnmatch patterns of ``nn.Linear`` modules (or modules holding them) given a
            diagonal Fisher.
        max_factor_ratio: A Linear whose factors hold more than this many times the
            numbers of its weight, (d̃² + d_out²) / (d_out·d̃) with d̃ = d_in + 1 if it has a
            bias else d_in, gets a diagonal Fisher instead (a 20k-class head would need a 20k² G).
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
        for name in ("exclude", "force_diag"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                raise TypeError(f"{name} must be a list of fnmatch patterns (strings), got {value!r}.")
            setattr(self, name, list(value))
        if not _is_int(self.n_samples) or self.n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {self.n_samples!r}.")
        if isinstance(self.max_factor_ratio, bool) or not isinstance(self.max_factor_ratio, (int, float)) \
                or not self.max_factor_ratio > 0:
            raise ValueError(f"max_factor_ratio must be a number > 0, got {self.max_factor_ratio!r}.")
        if self.max_batches is not None and (not _is_int(self.max_batches) or self.max_batches < 1):
            raise ValueError(f"max_batches must be an integer >= 1 or None, got {self.max_batches!r}.")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the options."""
        d = asdict(self)
        for key in ("shape", "fisher_type", "kfac_approx"):
            d[key] = str(d[key])
        return d
