"""`allmlp convert`: any supported weight format -> allmlp safetensors with the config in the metadata."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..models.mixer import MlpMixer, config_from_state_dict
from ..models.registry import create_model, list_models
from ..weights import load_weights, read_state_dict, save_weights
from ..weights.files import detect_format, parse_config_metadata


def model_for_weights(src: str | os.PathLike, model_name: str | None = None, gelu: str | None = None) -> nn.Module:
    """A model built to fit the weights in `src`, with the weights loaded.

    Without `model_name` the architecture is read from allmlp metadata or inferred from the tensor shapes.
    GELU cannot be read from weights: official .npz files were trained with tanh GELU, so they get it;
    other foreign files get exact GELU, which is what timm computes with them.
    """
    state_dict, metadata = read_state_dict(src)
    head = state_dict.get("head.weight")
    num_classes = 0 if head is None else head.shape[0]
    if model_name is not None:
        overrides = {} if gelu is None else {"gelu": gelu}
        model = create_model(model_name, num_classes=num_classes, **overrides)
    elif parse_config_metadata(metadata) is not None:
        return create_model(src) if gelu is None else create_model(src, gelu=gelu)
    elif "stem.proj.weight" in state_dict:
        if gelu is None:
            gelu = "tanh" if detect_format(src) == "npz" else "erf"
        model = MlpMixer(**config_from_state_dict(state_dict, gelu))
    elif "patch_embed.proj.weight" in state_dict:
        if gelu is not None:
            raise ValueError(
                f"gelu={gelu!r}: only MLP-Mixer weights take a GELU choice; CycleMLP and ViP use exact GELU"
            )
        model = registered_variant_for(state_dict, num_classes)
    else:
        raise ValueError(f"{src}: cannot infer the architecture from its keys; pass --model NAME")
    return load_weights(model, state_dict)


def registered_variant_for(state_dict: dict[str, torch.Tensor], num_classes: int) -> nn.Module:
    """The registered CycleMLP / ViP variant whose names and shapes are exactly the state dict's (the authors'
    checkpoints). Their configs cannot be read off the shapes alone (ViP's segment_dim is not in any shape)."""
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    fork_feat = "norm0.weight" in shapes  # a CycleMLP dense-prediction backbone: stage norms, no head
    overrides = {"fork_feat": True} if fork_feat else {"num_classes": num_classes}
    for name in list_models("cyclemlp_*") + ([] if fork_feat else list_models("vip_*")):
        with torch.device("meta"):
            candidate = create_model(name, **overrides)
        if {key: tuple(value.shape) for key, value in candidate.state_dict().items()} == shapes:
            return create_model(name, **overrides)
    raise ValueError(
        "weights with CycleMLP/ViP names (patch_embed, network) whose names and shapes match no registered "
        f"variant ({', '.join(list_models('cyclemlp_*') + list_models('vip_*'))}); pass --model NAME"
    )


def convert(
    src: str | os.PathLike, dst: str | os.PathLike, model_name: str | None = None, gelu: str | None = None
) -> nn.Module:
    model = model_for_weights(src, model_name, gelu)
    save_weights(model, dst)
    return model
