"""hf_kfac: continual fine-tuning of Hugging Face models with EWC and K-FAC Laplace priors."""

from .curvature import Curvature, FisherConfig, KFACBlock, PredictiveOutput, estimate_fisher
from .enums import Accumulation, FisherType, KFACApprox, Likelihood, PenaltyType, Shape, StorageFormat, TaskWeighting
from .prior import Prior, PriorConfig, TaskRecord
from .serialization import PriorFileError
from .version import __version__

__all__ = [
    "Accumulation",
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
    "PriorFileError",
    "TaskRecord",
    "Shape",
    "StorageFormat",
    "TaskWeighting",
    "__version__",
    "estimate_fisher",
]
