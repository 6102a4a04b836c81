from .activemlp import ActiveMLP
from .asmlp import ASMLP
from .convmlp import ConvMLP
from .cyclemlp import CycleMLP
from .gmlp import GMLP, GMixer
from .hiremlp import HireMLP
from .mixer import MlpMixer
from .msmlp import MSMLP
from .optimize import optimize_for_inference
from .registry import REGISTRY, ModelEntry, Preprocessing, WeightRelease, create_model, get_entry, list_models
from .reparam import reparameterize
from .repmlp import RepMLPNet
from .resmlp import ResMLP
from .smlp import SMLPNet
from .spach import Spach, SpachMS
from .swinmlp import SwinMLP
from .vip import VisionPermutator
from .wavemlp import WaveMLP

__all__ = [
    "ASMLP",
    "REGISTRY",
    "MSMLP",
    "ConvMLP",
    "ActiveMLP",
    "CycleMLP",
    "GMLP",
    "GMixer",
    "HireMLP",
    "MlpMixer",
    "ModelEntry",
    "Preprocessing",
    "RepMLPNet",
    "ResMLP",
    "SMLPNet",
    "Spach",
    "SpachMS",
    "SwinMLP",
    "VisionPermutator",
    "WaveMLP",
    "WeightRelease",
    "create_model",
    "get_entry",
    "list_models",
    "optimize_for_inference",
    "reparameterize",
]
