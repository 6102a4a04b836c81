from .activemlp import ActiveMLP
from .cyclemlp import CycleMLP
from .mixer import MlpMixer
from .optimize import optimize_for_inference
from .registry import REGISTRY, ModelEntry, Preprocessing, WeightRelease, create_model, get_entry, list_models
from .vip import VisionPermutator

__all__ = [
    "REGISTRY",
    "ActiveMLP",
    "CycleMLP",
    "MlpMixer",
    "ModelEntry",
    "Preprocessing",
    "VisionPermutator",
    "WeightRelease",
    "create_model",
    "get_entry",
    "list_models",
    "optimize_for_inference",
]
