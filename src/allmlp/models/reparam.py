"""Structural re-parameterisation: a trained model's deploy form, with its parallel training-time branches
(convolutions, BatchNorms) folded into fewer layers that compute the same function in eval mode.

A module that can fold itself implements `reparameterized() -> nn.Module`, returning its deploy form (a new
module; it must not change itself). `reparameterize(model)` copies the model, replaces each such module by its
deploy form (outermost first: a foldable module's children are its own business), and returns the copy; the
input model is left untouched. A module whose constructor takes `deploy` (RepVGG-style families, RepMLPNet) keeps
`deploy=True` in its `config`, so that `save_weights` records the deploy form and `create_model(file)` rebuilds it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def can_reparameterize(module: nn.Module) -> bool:
    return callable(getattr(module, "reparameterized", None))


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    """The deploy form of `model` (a new model; `model` is unchanged): every module that implements
    `reparameterized()` replaced by what that returns. Equal to `model` in eval mode (BatchNorms are folded with
    their running statistics). A model without such modules is an error."""
    if can_reparameterize(model):
        folded = model.reparameterized()
    else:
        folded = copy.deepcopy(model)
        if not _replace_children(folded):
            raise ValueError(
                f"{type(model).__name__} has no module that folds itself (a `reparameterized()` method): nothing "
                "to reparameterize"
            )
    for module in folded.modules():
        config = getattr(module, "config", None)
        if isinstance(config, dict) and "deploy" in config:
            config["deploy"] = True
    return folded


def _replace_children(module: nn.Module) -> bool:
    """Replace the foldable descendants of `module` in place by their deploy forms; whether there were any."""
    found = False
    for name, child in module.named_children():
        if can_reparameterize(child):
            setattr(module, name, child.reparameterized())
            found = True
        else:
            found = _replace_children(child) or found
    return found
