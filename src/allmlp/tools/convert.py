"""`allmlp convert`: any supported weight format -> allmlp safetensors with the config in the metadata."""

from __future__ import annotations

import functools
import inspect
import os

import torch
from torch import nn

from ..models.mixer import MlpMixer, config_from_state_dict
from ..models.registry import create_model, get_entry, list_models
from ..models.reparam import reparameterize
from ..weights import head_keys, load_weights, read_state_dict, save_weights
from ..weights.files import detect_format, parse_config_metadata


def model_for_weights(src: str | os.PathLike, model_name: str | None = None, gelu: str | None = None) -> nn.Module:
    """A model built to fit the weights in `src`, with the weights loaded.

    Without `model_name` the architecture is read from allmlp metadata or inferred from the tensor shapes.
    GELU cannot be read from weights: official .npz files were trained with tanh GELU, so they get it;
    other foreign files get exact GELU, which is what timm computes with them.
    """
    state_dict, metadata = read_state_dict(src)
    if model_name is not None:
        overrides = {} if gelu is None else {"gelu": gelu}
        with torch.device("meta"):
            head = state_dict.get(head_keys(create_model(model_name, **overrides))[0])
        num_classes = 0 if head is None else head.shape[0]
        model = create_model(model_name, num_classes=num_classes, **overrides)
    elif parse_config_metadata(metadata) is not None:
        return create_model(src) if gelu is None else create_model(src, gelu=gelu)
    elif is_timm_mixer(state_dict):
        if gelu is None:
            gelu = "tanh" if detect_format(src) == "npz" else "erf"
        model = MlpMixer(**config_from_state_dict(state_dict, gelu))
    else:
        if gelu is not None:
            raise ValueError(
                f"gelu={gelu!r}: only MLP-Mixer weights take a GELU choice; the other families use exact GELU"
            )
        model = registered_variant_for(state_dict)
    return load_weights(model, src)  # read again: the model says which entry of a training checkpoint to take


def is_timm_mixer(state_dict: dict[str, torch.Tensor]) -> bool:
    """MLP-Mixer weights in timm's (= allmlp's) names. timm's gMixer has the same names, but its gated MLPs' fc1 is
    twice as wide as fc2's input; gMLP has no `mlp_tokens`, and timm's ResMLP is renamed to FB's names on reading.
    Those go to `registered_variant_for`."""
    fc1, fc2 = state_dict.get("blocks.0.mlp_tokens.fc1.weight"), state_dict.get("blocks.0.mlp_tokens.fc2.weight")
    return "stem.proj.weight" in state_dict and fc1 is not None and fc2 is not None and fc1.shape[0] == fc2.shape[1]


# constructor options that give a registered model's weights another layout: dense backbones, deploy forms
_OTHER_FORMS = (("fork_feat", True), ("deploy", True), ("classifier_head", False))


def _variants(name: str) -> list[dict]:
    """The configurations a registered model's weights can come in: with a head (of any size), and where the
    architecture has them, as a dense-prediction backbone (`fork_feat=True`, ConvMLP's `classifier_head=False`) or
    in deploy form (`deploy`)."""
    accepted = inspect.signature(get_entry(name).architecture.__init__).parameters
    return [{}] + [{option: value} for option, value in _OTHER_FORMS if option in accepted]


@functools.cache
def _meta_shapes(name: str, overrides: tuple[tuple[str, object], ...]) -> tuple[dict[str, tuple[int, ...]], str]:
    """A registered model's parameter and buffer shapes with these constructor overrides, and its classifier's
    name. Built on the meta device once per process: a scan builds every registered variant (seconds), and a
    program that converts several files needs them only once."""
    with torch.device("meta"):
        model = create_model(name, **dict(overrides))
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    return shapes, model.pretrained_cfg.get("classifier", "head")


def registered_variant_for(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The registered model whose parameter and buffer names and shapes are exactly the state dict's (the authors'
    checkpoints keep their own module names), with the checkpoint's number of classes. Configs cannot be read off
    the shapes alone (ViP's segment_dim, for one, is in no shape), so every registered variant is tried on the meta
    device."""
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    for name in list_models():
        for overrides in _variants(name):
            candidate_shapes, classifier = _meta_shapes(name, tuple(overrides.items()))
            head = shapes.get(f"{classifier}.weight")
            if head is not None and "fork_feat" not in overrides:
                overrides = {**overrides, "num_classes": head[0]}
                candidate_shapes, _ = _meta_shapes(name, tuple(overrides.items()))
            if candidate_shapes == shapes:
                return create_model(name, **overrides)
    raise ValueError(
        "weights whose names and shapes match no registered model (an unknown variant, or a file of another "
        "library); pass --model NAME"
    )


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    model_name: str | None = None,
    gelu: str | None = None,
    deploy: bool = False,
) -> nn.Module:
    """Write the weights in `src` as allmlp safetensors; with `deploy`, the model's deploy form
    (`allmlp.reparameterize`: RepMLPNet's locality injection) instead of the trained one."""
    model = model_for_weights(src, model_name, gelu)
    if deploy:
        model = reparameterize(model.eval())
    save_weights(model, dst)
    return model
