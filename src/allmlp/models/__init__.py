from .asmlp import ASMLP
from .cyclemlp import CycleMLP
from .mixer import MlpMixer
from .optimize import optimize_for_inference
from .registry import REGISTRY, ModelEntry, Preprocessing, WeightRelease, create_model, get_entry, list_models
from .swinmlp import SwinMLP
from .vip import VisionPermutator

__all__ = [
    "ASMLP",
    "REGISTRY",
    "CycleMLP",
    "MlpMixer",
    "ModelEntry",
    "Preprocessing",
    "SwinMLP",
    "VisionPermutator",
    "WeightRelease",
    "create_model",
    "get_entry",
    "list_models",
    "optimize_for_inference",
]
