"""Fisher estimation: diagonal (EWC) and Kronecker-factored (K-FAC)."""

from .blocks import Curvature, KFACBlock
from .config import FisherConfig
from .estimate import estimate_fisher
from .predictive import PredictiveFn, PredictiveOutput, default_predictive_fn

__all__ = [
    "Curvature",
    "FisherConfig",
    "KFACBlock",
    "PredictiveFn",
    "PredictiveOutput",
    "default_predictive_fn",
    "estimate_fisher",
]
