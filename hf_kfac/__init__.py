"""hf_kfac: continual fine-tuning of Hugging Face models with EWC and K-FAC Laplace priors."""

from typing import TYPE_CHECKING, Any

from .compact import StorageConfig
from .curvature import Curvature, FisherConfig, KFACBlock, PredictiveOutput, estimate_fisher
from .enums import Accumulation, FisherType, KFACApprox, Likelihood, PenaltyType, Shape, StorageFormat, TaskWeighting
from .prior import Prior, PriorConfig, TaskRecord
from .hub import PriorDownloadError
from .serialization import PriorFileError
from .version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import ContinualTrainer
    from .trainer_config import ContinualConfig

_LAZY = {"ContinualTrainer": ".trainer", "ContinualConfig": ".trainer_config"}


def __getattr__(name: str) -> Any:
    """Import the trainer on first use, so that ``import hf_kfac`` does not load ``transformers.Trainer``."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Accumulation",
    "ContinualConfig",
    "ContinualTrainer",
    "Curvature",
    "FisherConfig",
    "FisherType",
    "KFACApprox",
    "KFACBlock",
    "Likelihood",
    "PenaltyType",
    "PredictiveOutput",
    "Prior",
    "PriorConfig",
    "PriorDownloadError",
    "PriorFileError",
    "Shape",
    "StorageConfig",
    "StorageFormat",
    "TaskRecord",
    "TaskWeighting",
    "__version__",
    "estimate_fisher",
]
