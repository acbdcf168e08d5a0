"""String enums for every option that selects an approximation or a mode.

Each enum subclasses ``str`` so that configs and JSON files can hold the plain
value (``"kfac"``) and compare equal to the member (``Shape.KFAC``).
"""

from __future__ import annotations

from enum import Enum


class _StrEnum(str, Enum):
    """A ``str`` enum whose constructor names the valid values on a bad one."""

    @classmethod
    def _missing_(cls, value: object) -> None:
        valid = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{value!r} is not a valid {cls.__name__}; choose one of {valid}.")

    def __str__(self) -> str:
        return str(self.value)


class Shape(_StrEnum):
    """Structure of the Fisher approximation.

    ``diag``: one number per parameter (EWC). ``kfac``: F ≈ A ⊗ G per ``nn.Linear``,
    diagonal elsewhere. ``identity``: F = I, an anchor-only L2 prior.
    """

    DIAG = "diag"
    KFAC = "kfac"
    IDENTITY = "identity"


class FisherType(_StrEnum):
    """Where the labels in E[∇log p(y|x) ∇log p(y|x)ᵀ] come from.

    ``mc``: y sampled from the model's predictive distribution (``n_samples`` draws).
    ``empirical``: the true labels. ``exact``: the expectation over every class,
    computed in closed form (one backward pass per class and output position).
    """

    MC = "mc"
    EMPIRICAL = "empirical"
    EXACT = "exact"


class KFACApprox(_StrEnum):
    """How K-FAC treats a weight shared over sequence positions (Eschenhagen et al. 2023).

    ``expand``: every non-padding position is an example.
    ``reduce``: inputs are averaged and output gradients summed over positions first.
    """

    EXPAND = "expand"
    REDUCE = "reduce"


class Accumulation(_StrEnum):
    """How the curvature of several tasks is combined.

    ``separate``: one anchor and Fisher per task, quadratic forms summed (exact, grows).
    ``merge``: one anchor and one Fisher in constant storage (online EWC; nearest
    Kronecker product for K-FAC layers).
    """

    SEPARATE = "separate"
    MERGE = "merge"


class TaskWeighting(_StrEnum):
    """Weight of each task's mean Fisher in the prior.

    ``data_size``: N_t (the Laplace posterior precision, Σ_t N_t F_t).
    ``uniform``: 1 per task (classic EWC).
    """

    DATA_SIZE = "data_size"
    UNIFORM = "uniform"


class Likelihood(_StrEnum):
    """Likelihood of the model's outputs, which fixes the Fisher's loss Hessian.

    ``categorical``: softmax over the last dimension of the logits.
    ``gaussian``: unit-variance normal with the outputs as mean (regression, MSE).
    """

    CATEGORICAL = "categorical"
    GAUSSIAN = "gaussian"


class PenaltyType(_StrEnum):
    """The regulariser the trainer adds to the task loss."""

    NONE = "none"
    L2 = "l2"
    EWC = "ewc"
    KFAC = "kfac"


class StorageFormat(_StrEnum):
    """How K-FAC factors are stored: ``full`` matrices, or ``compact`` (see ``hf_kfac.compact``)."""

    FULL = "full"
    COMPACT = "compact"
