from .cyclemlp import CycleMLP
from .mixer import MlpMixer
from .optimize import optimize_for_inference
from .registry import REGISTRY, ModelEntry, Preprocessing, WeightRelease, create_model, get_entry, list_models
from .smlp import SMLPNet
from .spach import Spach, SpachMS
from .vip import VisionPermutator

__all__ = [
    "REGISTRY",
    "CycleMLP",
    "MlpMixer",
    "ModelEntry",
    "Preprocessing",
    "SMLPNet",
    "Spach",
    "SpachMS",
    "VisionPermutator",
    "WeightRelease",
    "create_model",
    "get_entry",
    "list_models",
    "optimize_for_inference",
]
