"""saint: training-free similarity-aware token pruning for ViTs and VLMs."""

from .adapters.common import TokenStats
from .api import is_patched, patch, per_image, stats, token_mask, token_sizes, unpatch
from .calibration import Calibration, CalibrationWarning, calibrate
from .methods import METHODS, get_method

__all__ = [
    "METHODS",
    "Calibration",
    "CalibrationWarning",
    "TokenStats",
    "calibrate",
    "get_method",
    "is_patched",
    "patch",
    "per_image",
    "stats",
    "token_mask",
    "token_sizes",
    "unpatch",
]
__version__ = "0.1.0"
