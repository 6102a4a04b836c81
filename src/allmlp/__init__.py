"""allmlp: all-MLP vision models with their published weights: MLP-Mixer, CycleMLP, Vision Permutator, ResMLP, gMLP
and gMixer, Wave-MLP, Hire-MLP, AS-MLP, MS-MLP, ActiveMLP, RepMLPNet, sMLPNet, SPACH-MLP, ConvMLP and Swin-MLP."""

from .models import (
    ASMLP,
    GMLP,
    MSMLP,
    ActiveMLP,
    ConvMLP,
    CycleMLP,
    GMixer,
    HireMLP,
    MlpMixer,
    RepMLPNet,
    ResMLP,
    SMLPNet,
    Spach,
    SpachMS,
    SwinMLP,
    VisionPermutator,
    WaveMLP,
    create_model,
    get_entry,
    list_models,
    optimize_for_inference,
    reparameterize,
)
from .tools.resolution import adapt_resolution
from .weights import WeightsError, load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "MSMLP",
    "ConvMLP",
    "ASMLP",
    "ActiveMLP",
    "CycleMLP",
    "GMLP",
    "GMixer",
    "HireMLP",
    "MlpMixer",
    "RepMLPNet",
    "ResMLP",
    "SMLPNet",
    "Spach",
    "SpachMS",
    "SwinMLP",
    "VisionPermutator",
    "WaveMLP",
    "WeightsError",
    "adapt_resolution",
    "create_model",
    "get_entry",
    "list_models",
    "load_weights",
    "optimize_for_inference",
    "reparameterize",
    "save_weights",
]
