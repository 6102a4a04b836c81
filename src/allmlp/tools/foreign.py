"""Models of other libraries for the research tools: torchvision and timm models, named `torchvision:NAME` and
`timm:NAME`, with weights from a local state-dict file (no downloads).

timm is optional: it is imported only when a `timm:` model is asked for. torchvision ResNets whose state dict has
a 3 x 3 `conv1` are rebuilt as the small-image variant `small_image_resnet` makes (the CIFAR-style stem of He et
al. 2016, Section 4.2: no max-pool), so the ResNets of `allmlp invariance` load back by name.
"""

from __future__ import annotations

import os

import torch
from torch import nn

FOREIGN_SOURCES = ("torchvision", "timm")


def small_image_resnet(arch: str = "resnet18", num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """A torchvision ResNet for small images (28 x 28 MNIST, 32 x 32 CIFAR): a 3 x 3 stride-1 stem convolution
    with `in_chans` inputs and no max-pool, so the first stage keeps the full input resolution."""
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if not hasattr(model, "conv1") or not hasattr(model, "maxpool"):
        raise ValueError(f"torchvision:{arch} is not a ResNet (it has no conv1 / maxpool stem to replace)")
    model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def split_spec(spec: str) -> tuple[str, str]:
    """('torchvision' | 'timm' | 'allmlp', name) of a model spec such as `torchvision:resnet18`."""
    source, sep, name = spec.partition(":")
    if not sep:
        return "allmlp", spec
    if source not in FOREIGN_SOURCES or not name:
        raise ValueError(
            f"model {spec!r}: expected a registered allmlp name or one of "
            f"{', '.join(s + ':NAME' for s in FOREIGN_SOURCES)}"
        )
    return source, name


def _state_dict(weights: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The file's tensors under their own names (allmlp's format detection would rename a timm Mixer's keys)."""
    from ..weights.files import read_weights

    tensors, _ = read_weights(weights)
    if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{weights}: expected a PyTorch or safetensors state dict, got NumPy arrays")
    return tensors


def load_foreign(spec: str, weights: str | os.PathLike | None, img_size: int | None = None) -> nn.Module:
    """A torchvision or timm model by spec, with `weights` (a state dict file) loaded strictly; in eval mode.

    Without weights the model keeps its random initialisation (a baseline). The head size is taken from the file.
    img_size: built for this input size (timm models with a fixed size, such as ViTs; others take any size).
    """
    source, name = split_spec(spec)
    state = _state_dict(weights) if weights is not None else None
    if source == "timm":
        try:
            import timm
        except ImportError as err:
            raise ValueError(f"model {spec!r} needs timm, which is not installed (pip install timm)") from err
        from timm.models import get_pretrained_cfg

        options = {}
        if state is not None:
            head = [v for k, v in state.items() if k.endswith(("head.weight", "fc.weight", "classifier.weight"))]
            options["num_classes"] = head[-1].shape[0] if head else 0
        default = get_pretrained_cfg(name)
        if img_size is not None and default is not None and default.fixed_input_size:
            options["img_size"] = img_size  # e.g. a ViT's position embeddings are made for one size
        try:
            model = timm.create_model(name, pretrained=False, **options)
        except RuntimeError as err:  # timm's "Unknown model"
            raise ValueError(f"model {spec!r}: {err}") from err
    else:
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"model {spec!r}: torchvision has no model {name!r}")
        num_classes = state["fc.weight"].shape[0] if state is not None and "fc.weight" in state else 1000
        conv1 = state.get("conv1.weight") if state is not None else None
        if conv1 is not None and conv1.shape[-1] == 3:
            model = small_image_resnet(name, num_classes, conv1.shape[1])
        else:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not fit {spec}: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
            )
    return model.eval()
