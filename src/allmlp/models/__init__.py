from .mixer import MlpMixer
from .registry import REGISTRY, ModelEntry, Preprocessing, WeightRelease, create_model, get_entry, list_models

__all__ = [
    "REGISTRY",
    "MlpMixer",
    "ModelEntry",
    "Preprocessing",
    "WeightRelease",
    "create_model",
    "get_entry",
    "list_models",
]
