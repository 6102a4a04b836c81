from .cyclemlp import CycleMLP
from .hiremlp import HireMLP
from .mixer import MlpMixer
from .optimize import optimize_for_inference
from .registry import REGISTRY, ModelEntry, Preprocessing, WeightRelease, create_model, get_entry, list_models
from .vip import VisionPermutator
from .wavemlp import WaveMLP

__all__ = [
    "REGISTRY",
    "CycleMLP",
    "HireMLP",
    "MlpMixer",
    "ModelEntry",
    "Preprocessing",
    "VisionPermutator",
    "WaveMLP",
    "WeightRelease",
    "create_model",
    "get_entry",
    "list_models",
    "optimize_for_inference",
]
